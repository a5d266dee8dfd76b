"""Errors and warnings raised by pk_attrib.

Every class subclasses a built-in exception so that callers can catch either the
pk_attrib class or the built-in one. Messages name the cause and the fix.
"""


class PkAttribError(Exception):
    """Base class of every pk_attrib error."""


class RecordingError(PkAttribError, RuntimeError):
    """The training loop did something the recorder cannot record faithfully."""


class MissingBatchIndicesError(RecordingError):
    """An optimizer step happened without any batch indices to attribute it to."""


class IndexOutOfRangeError(RecordingError, IndexError):
    """A recorded dataset index lies outside the training dataset."""


class ArgumentError(PkAttribError, ValueError):
    """An argument has a value the call cannot take (also a ValueError, as Captum's)."""


class ArgumentTypeError(ArgumentError, TypeError, AssertionError):
    """An argument is missing or of the wrong type.

    Also a TypeError, and an AssertionError because Captum's TracInCP asserts these (its
    ``influence(None)``, ``layers`` that are not a list of names, a non-int ``batch_size``).
    """


class StoreError(PkAttribError, OSError):
    """A store folder cannot be read or written."""


class NotAStoreError(StoreError):
    """The folder exists but holds something other than a pk_attrib store."""


class NoCheckpointsError(NotAStoreError, ArgumentError):
    """No checkpoints where the path or ``checkpoints=`` points (a missing or empty folder).

    A NotAStoreError (an OSError) and an ArgumentError (a ValueError, what TracInCP raises
    for it) alike, whichever argument named them; an empty list of checkpoints too.
    """


class FormatVersionError(StoreError):
    """The store was written in a format version this library cannot read."""


class CorruptStoreError(StoreError):
    """A tensor file is missing, or its content does not match the recorded hash."""


class StoreChangedError(StoreError):
    """The store changed while it was being read: a recorder is writing it. Load it again."""


class StoreMismatchError(PkAttribError, ValueError):
    """A store, model or optimizer do not belong together."""


class UnsupportedError(PkAttribError, NotImplementedError):
    """The requested computation has no exact rule for this path or optimizer."""


class DistributedError(PkAttribError, RuntimeError):
    """The ranks of a distributed recording or attribution lost each other or disagree.

    A rank died or stopped calling in (the others fail instead of waiting, bounded by the
    process group's timeout), another rank raised an error, or the ranks made different calls.
    """


class PkAttribWarning(UserWarning):
    """Base class of pk_attrib warnings."""


class NonFiniteError(PkAttribError, FloatingPointError):
    """A gradient or output along the path is NaN or infinite."""


class LossReductionError(PkAttribError, ValueError):
    """How the training loss reduced over the batch cannot be known."""


class VectorizationWarning(PkAttribWarning):
    """torch.func.vmap cannot batch the model: it is evaluated one example at a time."""


class ReconstructionWarning(PkAttribWarning):
    """Recorded steps are not rebuilt by the example gradients (dropout, clipping, ...)."""


class QuadratureWarning(PkAttribWarning):
    """The adaptive quadrature could not reach its tolerance on some steps."""


class RowDependenceError(PkAttribError, ValueError):
    """``output_fn`` computes a query's value from other queries' outputs (a batch mean).

    pk_attrib explains each query's own value, so ``output_fn(outputs, target)[j]`` must depend
    on row j of the outputs only; this is checked on the first call with an ``output_fn``.
    """
