"""pk_attrib: explain a trained model's predictions in terms of its training examples.

A training callback (`PathRecorder`) records the path the weights take; the path kernel of
Domingos (2020) turns it into an exact decomposition of any prediction into one
contribution per training example.

The package follows the pipeline: `pk_attrib.record` (a training run in, a `TrainingPath`
out), `pk_attrib.engine` (a path and queries in, a `Decomposition` out), `pk_attrib.explain`
(`PathKernelInfluence`, the Captum-style API on top), then `viz`, `cli` and `testing`.
"""

from importlib.metadata import PackageNotFoundError, version

from .decomposition import Decomposition, Diagnostics, Ranked, TopK
from .engine.projection import ProjectorKind
from .engine.quadrature import Quadrature
from .exceptions import (
    ArgumentError,
    ArgumentTypeError,
    CorruptStoreError,
    DistributedError,
    FormatVersionError,
    IndexOutOfRangeError,
    LossReductionError,
    MissingBatchIndicesError,
    NoCheckpointsError,
    NonFiniteError,
    NotAStoreError,
    PkAttribError,
    PkAttribWarning,
    QuadratureWarning,
    ReconstructionWarning,
    RecordingError,
    RowDependenceError,
    StoreChangedError,
    StoreError,
    StoreMismatchError,
    UnsupportedError,
    VectorizationWarning,
)
from .record.path import Step, TrainingPath
from .record.recorder import PathRecorder

try:
    __version__ = version("pk-attrib")
except PackageNotFoundError:  # running from a bare checkout
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # PathKernelInfluence subclasses captum's DataInfluence, and importing captum imports
    # matplotlib: load it on first use so that `import pk_attrib` stays light.
    if name == "PathKernelInfluence":
        from .explain.explainer import PathKernelInfluence

        return PathKernelInfluence
    if name == "TracInCP":
        from .explain.tracincp import TracInCP

        return TracInCP
    if name in ("integrations", "testing", "viz"):  # pk.viz etc. without importing them first
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pk_attrib' has no attribute {name!r}")


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "CorruptStoreError",
    "Decomposition",
    "Diagnostics",
    "DistributedError",
    "FormatVersionError",
    "IndexOutOfRangeError",
    "LossReductionError",
    "MissingBatchIndicesError",
    "NoCheckpointsError",
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
    "RowDependenceError",
    "Step",
    "StoreChangedError",
    "StoreError",
    "StoreMismatchError",
    "TopK",
    "TracInCP",
    "TrainingPath",
    "UnsupportedError",
    "VectorizationWarning",
    "__version__",
]
