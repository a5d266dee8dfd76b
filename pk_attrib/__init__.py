"""pk_attrib: explain a trained model's predictions in terms of its training examples.

A training callback (`PathRecorder`) records the path the weights take; the path kernel of
Domingos (2020) turns it into an exact decomposition of any prediction into one
contribution per training example.
"""

from importlib.metadata import PackageNotFoundError, version

from .exceptions import (
    CorruptStoreError,
    FormatVersionError,
    IndexOutOfRangeError,
    MissingBatchIndicesError,
    NotAStoreError,
    PkAttribError,
    PkAttribWarning,
    RecordingError,
    StoreError,
    StoreMismatchError,
    UnsupportedError,
)
from .path import Step, TrainingPath
from .recorder import PathRecorder

try:
    __version__ = version("pk-attrib")
except PackageNotFoundError:  # running from a bare checkout
    __version__ = "0.0.0+unknown"

__all__ = [
    "CorruptStoreError",
    "FormatVersionError",
    "IndexOutOfRangeError",
    "MissingBatchIndicesError",
    "NotAStoreError",
    "PathRecorder",
    "PkAttribError",
    "PkAttribWarning",
    "RecordingError",
    "Step",
    "StoreError",
    "StoreMismatchError",
    "TrainingPath",
    "UnsupportedError",
    "__version__",
]
