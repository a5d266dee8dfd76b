"""pk_attrib: explain a trained model's predictions in terms of its training examples.

A training callback (`PathRecorder`) records the path the weights take; the path kernel of
Domingos (2020) turns it into an exact decomposition of any prediction into one
contribution per training example.
"""

from importlib.metadata import PackageNotFoundError, version

from .decomposition import Decomposition, Diagnostics, Ranked, TopK
from .engine import QuadratureWarning, ReconstructionWarning
from .exceptions import (
    CorruptStoreError,
    FormatVersionError,
    IndexOutOfRangeError,
    LossReductionError,
    MissingBatchIndicesError,
    NonFiniteError,
    NotAStoreError,
    PkAttribError,
    PkAttribWarning,
    RecordingError,
    StoreError,
    StoreMismatchError,
    UnsupportedError,
    VectorizationWarning,
)
from .path import Step, TrainingPath
from .projection import ProjectorKind
from .quadrature import Quadrature
from .recorder import PathRecorder

try:
    __version__ = version("pk-attrib")
except PackageNotFoundError:  # running from a bare checkout
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # PathKernelInfluence subclasses captum's DataInfluence, and importing captum imports
    # matplotlib: load it on first use so that `import pk_attrib` stays light.
    if name == "PathKernelInfluence":
        from .attribution import PathKernelInfluence

        return PathKernelInfluence
    if name in ("testing", "viz"):  # pk.testing / pk.viz without importing them first
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pk_attrib' has no attribute {name!r}")


__all__ = [
    "CorruptStoreError",
    "Decomposition",
    "Diagnostics",
    "FormatVersionError",
    "IndexOutOfRangeError",
    "LossReductionError",
    "MissingBatchIndicesError",
    "NonFiniteError",
    "NotAStoreError",
    "PathKernelInfluence",
    "PathRecorder",
    "PkAttribError",
    "PkAttribWarning",
    "ProjectorKind",
    "Quadrature",
    "QuadratureWarning",
    "Ranked",
    "ReconstructionWarning",
    "RecordingError",
    "Step",
    "StoreError",
    "StoreMismatchError",
    "TopK",
    "TrainingPath",
    "UnsupportedError",
    "VectorizationWarning",
    "__version__",
]
