"""Recording a PyTorch Lightning run: `PathRecorderCallback`.

One line in the training script records the run::

    trainer = lightning.pytorch.Trainer(
        max_epochs=5, callbacks=[pk.integrations.lightning.PathRecorderCallback(store="runs/exp")]
    )

The callback taps the training DataLoader as Lightning obtains it (the one passed to
``fit``, or what the LightningModule's or DataModule's ``train_dataloader()`` returns, on each
reload too), before Lightning makes its first iterator: every pass over it draws through a
recording wrapper of its sampler (`LoaderTap`), and the n-th batch Lightning trains on is the
n-th batch its sampler drew. ``on_train_batch_start`` notes each batch's indices before its
``training_step`` runs; every batch since the previous optimizer step belongs to the next one
(``accumulate_grad_batches``). The `PathRecorder` is created in ``on_train_start``, on the
LightningModule and the optimizer ``configure_optimizers`` returned, once a checkpoint being
resumed from is loaded.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

from torch.utils.data import DataLoader

from ..exceptions import PkAttribWarning, RecordingError
from ..record.path import TrainingPath
from ..record.recorder import PathRecorder
from ..record.sampling import LoaderTap

try:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule
except ImportError as exc:  # the framework is an optional extra
    raise ImportError(
        "pk_attrib.integrations.lightning needs lightning: pip install 'pk-attrib[integrations]' "
        f"({exc})"
    ) from exc


class PathRecorderCallback(Callback):
    """A Lightning ``Callback`` that records the run with a `PathRecorder`.

    ``callback.recorder`` and ``callback.path`` give the recorder and its path after
    training; the recorder is closed when training ends (or fails). Explain the
    LightningModule itself (its parameter names are the recorded ones), with the loss its
    ``training_step`` computes.

    What stays exact: with ``accumulate_grad_batches=n`` Lightning divides each batch's loss
    by n, in a shorter last group too: explain with ``accumulation=n``. Not exact, and reported
    by the explainer's step check as a `ReconstructionWarning`: gradient clipping
    (``gradient_clip_val``), mixed precision (``precision="16-mixed"``, ``"bf16-mixed"``) and
    dropout; the callback warns at the start of training about the first two. One process
    and one optimizer only: distributed training, several optimizers and several training
    DataLoaders at once are refused.

    Args:
        store: A folder to write the path to, or None to keep it in memory
            (``callback.path``).
        **recorder_kwargs: Passed on to `PathRecorder` (``every``, ``dtype``, ``truncate``,
            ...); ``dataset_size`` defaults to the length of the training DataLoader's dataset.

    Example:
        ```python
        callback = pk.integrations.lightning.PathRecorderCallback(store="runs/exp")
        lightning.pytorch.Trainer(max_epochs=5, callbacks=[callback]).fit(module, loader)
        path = callback.path
        ```
    """

    def __init__(self, store: str | os.PathLike | None = None, **recorder_kwargs: Any):
        self.store = store
        self.recorder_kwargs = recorder_kwargs
        self.recorder: PathRecorder | None = None
        self._tap: LoaderTap | None = None
        self._hooked: tuple[Any, str] | None = None  # (module, hook) whose loaders get tapped
        self._unconfirmed = False  # a batch was noted and has not run (yet)

    @property
    def path(self) -> TrainingPath:
        """The recorded path (complete once training has ended)."""
        if self.recorder is None:
            raise RecordingError("nothing was recorded yet: fit with this callback first")
        return self.recorder.path

    # -- Lightning's hooks ----------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        """Tap the training DataLoader where Lightning will get it from."""
        if trainer.world_size > 1:
            raise RecordingError(
                f"distributed training ({trainer.world_size} processes): each process sees its "
                "own share of every batch; record a single-process run"
            )
        if len(trainer.optimizers) != 1:
            raise RecordingError(
                f"configure_optimizers returned {len(trainer.optimizers)} optimizers: a "
                "recording follows one optimizer, which updates every trained parameter"
            )
        _warn_inexact(trainer)
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not hasattr(source, "instance"):
            raise RecordingError(
                "this Lightning version does not say where the training DataLoader comes from: "
                "the callback supports lightning>=2.2,<3"
            )
        self._tap = LoaderTap()
        instance = source.instance
        if isinstance(instance, (LightningModule, LightningDataModule)):
            name = getattr(source, "name", "train_dataloader")
            made = getattr(instance, name)

            @functools.wraps(made)  # (Lightning's is_overridden looks through __wrapped__)
            def train_dataloader(*args, **kwargs):
                loaders = made(*args, **kwargs)
                self._attach(loaders)
                return loaders

            object.__setattr__(instance, name, train_dataloader)
            self._hooked = (instance, name)
        else:
            self._attach(instance)

    def on_train_start(self, trainer, pl_module) -> None:
        """Create the recorder on the LightningModule and its optimizer."""
        if self._tap is None or not self._tap.loaders:
            raise RecordingError("the training DataLoader was not seen: no dataset indices")
        options = {"dataset_size": len(self._tap.loaders[-1].dataset), **self.recorder_kwargs}
        self.recorder = PathRecorder(pl_module, trainer.optimizers[0], self.store, **options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """A batch is about to be trained on: note its indices."""
        if self.recorder is not None and self._tap is not None:
            self.recorder.record_batch(self._tap.next_indices())
            self._unconfirmed = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """The batch ran."""
        self._unconfirmed = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Forget a group of batches cut short by ``on_train_batch_start`` returning -1.

        The batch it was about to run did not run, and Lightning zeroes the gradients at the
        next epoch's first batch, so the batches noted since the last step belong to none.
        """
        if self._unconfirmed and self.recorder is not None:
            self.recorder.discard_batches()
        self._unconfirmed = False

    def on_train_end(self, trainer, pl_module) -> None:
        """Close the recorder: the path ends at the final weights."""
        self._finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Close the recorder, keeping the steps recorded so far."""
        self._finish()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Leave the DataLoader and its source as they were."""
        self._finish()

    # -----------------------------------------------------------------------------------------

    def _attach(self, loaders: Any) -> None:
        found = loaders
        if not isinstance(found, DataLoader):
            flattened = getattr(found, "flattened", None)  # a CombinedLoader
            found = flattened if flattened is not None else found
            if isinstance(found, (list, tuple)) and len(found) == 1:
                found = found[0]
        if not isinstance(found, DataLoader):
            raise RecordingError(
                "the training data is not one torch DataLoader "
                f"({type(loaders).__name__}): a recording needs one DataLoader over a "
                "map-style dataset, whose indices each batch's examples have"
            )
        self._tap.attach(found)

    def _finish(self) -> None:
        if self._hooked is not None:
            instance, name = self._hooked
            if name in instance.__dict__:
                object.__delattr__(instance, name)
            self._hooked = None
        if self._tap is not None:
            self._tap.detach()
            self._tap = None
        if self.recorder is not None:
            self.recorder.close()


def _warn_inexact(trainer) -> None:
    """Say at the start what will not be explained exactly."""
    reasons = []
    clip = trainer.gradient_clip_val
    if clip is not None and clip > 0:
        reasons.append(f"gradient clipping (gradient_clip_val={clip})")
    if "mixed" in str(trainer.precision):
        reasons.append(f"mixed precision (precision={trainer.precision!r})")
    if reasons:
        warnings.warn(
            f"this run uses {' and '.join(reasons)}, which the exact decomposition does not "
            "model: the steps it changes are reported by the explainer's step check "
            "(ReconstructionWarning) and their effect is left unexplained",
            PkAttribWarning,
            stacklevel=2,
        )
