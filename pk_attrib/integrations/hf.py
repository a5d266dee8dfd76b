"""Recording a HuggingFace ``transformers.Trainer`` run: `PathRecorderCallback`.

One line in the training script records the run::

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[pk.integrations.hf.PathRecorderCallback(store="runs/exp")])

The callback hooks the optimizer the Trainer builds (unwrapped from accelerate's
``AcceleratedOptimizer``), and learns each micro-batch's dataset indices from the Trainer's
training DataLoader: every pass over it draws through a recording wrapper of its sampler
(`LoaderTap`), and the n-th micro-batch the Trainer takes is the n-th batch its sampler drew
(accelerate's ``DataLoaderShard`` iterates the loader underneath in order). The Trainer says
when a micro-batch starts: ``on_step_begin`` before the first of each optimizer step,
``on_substep_end`` before each further one (gradient accumulation), so its indices and the
random-number state its forward starts in are noted before that forward runs.
``remove_unused_columns`` drops columns of each item, not items: the indices stay those of
the dataset passed to the Trainer.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ..exceptions import PkAttribWarning, RecordingError
from ..record.path import TrainingPath
from ..record.recorder import PathRecorder
from ..record.sampling import LoaderTap

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the framework is an optional extra
    raise ImportError(
        "pk_attrib.integrations.hf needs transformers: pip install 'pk-attrib[integrations]' "
        f"({exc})"
    ) from exc

_RESUME_HINT = (
    ". The Trainer does so when it resumes from a checkpoint in the middle of an epoch (it "
    "skips the epoch's first batches with a new DataLoader): resume with "
    "TrainingArguments(ignore_data_skip=True), or from a checkpoint at an epoch's end"
)


class PathRecorderCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that records the run with a `PathRecorder`.

    The recorder is created when training begins (``on_train_begin``: the Trainer's model and
    optimizer exist then) and closed after the last step; ``callback.recorder`` and
    ``callback.path`` give it and its path afterwards. Every optimizer step gets the dataset
    indices of its micro-batches, gradient accumulation included. The path ends at the
    weights the last step reached: with ``load_best_model_at_end`` the Trainer then loads an
    earlier checkpoint, so load the path's final weights back (``callback.path.load_into(model)``)
    before explaining.

    What stays exact: the Trainer computes the loss inside the model (its mean over the
    micro-batch, for the models' own losses), and with gradient accumulation it either
    divides it by the number of micro-batches of the step (models whose ``forward`` takes no
    ``**kwargs``: explain with ``accumulation="mean"``) or not (models whose ``forward``
    takes ``**kwargs``, such as ``BertForSequenceClassification``: ``accumulation="sum"``);
    docs/guide/integrations.md has the table and an example. Not exact, and reported by the
    explainer's step check as a `ReconstructionWarning`: gradient clipping (the Trainer's
    default ``max_grad_norm=1.0``: pass ``max_grad_norm=0``), mixed precision (``fp16``,
    ``bf16``), and dropout (build the model with its dropout probabilities at 0). The
    callback warns at the start of training about clipping and mixed precision. One process
    only: distributed training is refused.

    Args:
        store: A folder to write the path to, or None to keep it in memory
            (``callback.path``).
        **recorder_kwargs: Passed on to `PathRecorder` (``every``, ``dtype``, ``truncate``,
            ...); ``dataset_size`` defaults to the length of the Trainer's training set.

    Example:
        ```python
        callback = pk.integrations.hf.PathRecorderCallback(store="runs/exp")
        Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
        path = callback.path
        ```
    """

    def __init__(self, store: str | os.PathLike | None = None, **recorder_kwargs: Any):
        self.store = store
        self.recorder_kwargs = recorder_kwargs
        self.recorder: PathRecorder | None = None
        self._tap: LoaderTap | None = None

    @property
    def path(self) -> TrainingPath:
        """The recorded path (complete once training has ended)."""
        if self.recorder is None:
            raise RecordingError("nothing was recorded yet: train with this callback first")
        return self.recorder.path

    # -- the Trainer's events -----------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        """Create the recorder on the Trainer's model and optimizer; tap its DataLoader."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        loader = kwargs.get("train_dataloader")
        if model is None or optimizer is None or loader is None:
            raise RecordingError(
                "the Trainer did not pass its model, optimizer and train_dataloader to "
                "on_train_begin: this transformers version is not supported"
            )
        if args.world_size > 1:
            raise RecordingError(
                f"distributed training ({args.world_size} processes): each process sees its "
                "own share of every batch; record a single-process run"
            )
        _warn_inexact(args)
        loader = getattr(loader, "base_dataloader", loader)  # inside accelerate's DataLoaderShard
        options = {"dataset_size": len(loader.dataset), **self.recorder_kwargs}
        self.recorder = PathRecorder(model, _torch_optimizer(optimizer), self.store, **options)
        self._tap = LoaderTap()
        try:
            self._tap.attach(loader)
        except Exception:
            self._finish()
            raise

    def on_step_begin(self, args, state, control, **kwargs):
        """The first micro-batch of an optimizer step is about to run: note its indices."""
        self._next_batch()

    def on_substep_end(self, args, state, control, **kwargs):
        """A micro-batch ran and another one of the same step follows: note its indices."""
        if not (control.should_epoch_stop or control.should_training_stop):
            self._next_batch()

    def on_step_end(self, args, state, control, **kwargs):
        """After the last step, close the recorder (see `on_epoch_end`)."""
        if control.should_training_stop:
            self._finish()

    def on_epoch_end(self, args, state, control, **kwargs):
        """After the last step, close the recorder: the path ends at the weights it reached.

        Closing waits no longer: with ``load_best_model_at_end`` the Trainer then loads an
        earlier checkpoint into the model, before ``on_train_end``.
        """
        if control.should_training_stop or state.global_step >= state.max_steps:
            self._finish()

    def on_train_end(self, args, state, control, **kwargs):
        """Close the recorder if still open, and untap the DataLoader."""
        self._finish()

    # -----------------------------------------------------------------------------------------

    def _next_batch(self) -> None:
        if self.recorder is not None and self._tap is not None:
            self.recorder.record_batch(self._tap.next_indices(_RESUME_HINT))

    def _finish(self) -> None:
        if self._tap is not None:
            self._tap.detach()
            self._tap = None
        if self.recorder is not None:
            self.recorder.close()


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its step is hooked)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _warn_inexact(args) -> None:
    """Say at the start what will not be explained exactly (the Trainer clips by default)."""
    reasons = []
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        reasons.append(f"gradient clipping (max_grad_norm={args.max_grad_norm})")
    if args.fp16 or args.bf16:
        reasons.append("mixed precision (fp16/bf16)")
    if reasons:
        warnings.warn(
            f"this run uses {' and '.join(reasons)}, which the exact decomposition does not "
            "model: the steps it changes are reported by the explainer's step check "
            "(ReconstructionWarning) and their effect is left unexplained. For an exact "
            "recording pass TrainingArguments(max_grad_norm=0) and train in float32/float64",
            PkAttribWarning,
            stacklevel=2,
        )
