"""Captum compatibility: TracInCP's arguments, training sets given as DataLoaders, ``layers``.

Helpers for `PathKernelInfluence`'s constructor, kept apart so that it reads as the API.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .exceptions import LossReductionError
from .gradients import Reduction
from .path import TrainingPath


def dataset_of(train: Dataset | DataLoader) -> Dataset:
    """The Dataset behind a training set given as a Dataset or a non-shuffling DataLoader."""
    if isinstance(train, DataLoader):
        if isinstance(train.sampler, RandomSampler) or (
            train.batch_sampler is not None
            and isinstance(train.batch_sampler.sampler, RandomSampler)
        ):
            raise ValueError(
                "train_dataset is a shuffling DataLoader, so its order would not match the "
                "recorded dataset indices: pass the Dataset, or a DataLoader with shuffle=False"
            )
        return train.dataset
    return train


def loss_reduction(loss_fn, given: str | None, needed: bool) -> Reduction:
    """How the training loop reduced the loss over a batch (explicit, or read from loss_fn)."""
    if given is not None:
        try:
            return Reduction(given)
        except ValueError:
            valid = ", ".join(repr(r.value) for r in Reduction)
            raise LossReductionError(f"loss_reduction={given!r}: use one of {valid}") from None
    found = getattr(loss_fn, "reduction", None)
    if found in ("mean", "sum"):
        return Reduction(found)
    if not needed:  # checkpoints weigh every example alike: the reduction plays no part
        return Reduction.SUM
    raise LossReductionError(
        "cannot tell how the training loss combined the examples of a batch "
        f"({'reduction=' + repr(found) if found else type(loss_fn).__name__ + ' has no reduction'}"
        "): pass loss_reduction='mean' (PyTorch's default) or 'sum', as in the training loop"
    )


def example_key(items) -> bytes:
    """A byte key identifying an example by its tensors, to find it in the training set."""
    return b"".join(torch.as_tensor(t).cpu().numpy().tobytes() for t in items)


def checkpoint_files(checkpoints: Any) -> list[str]:
    """Checkpoint files from a folder (sorted), one file, or a list, as TracInCP reads them."""
    if isinstance(checkpoints, (str, os.PathLike)):
        folder = Path(checkpoints)
        if folder.is_dir():
            return sorted(glob.glob(os.path.join(folder, "*")))
        return [str(folder)]
    if isinstance(checkpoints, Iterable):
        return [str(c) for c in checkpoints]
    raise TypeError(f"checkpoints must be a folder, a file or a list of files, got {checkpoints!r}")


def path_from_tracincp(model, checkpoints, load_func) -> TrainingPath:
    """Build a checkpoint path the way TracInCP reads checkpoints (load_func returns the lr)."""
    if load_func is None:
        from captum.influence._core.tracincp import _load_flexible_state_dict as load_func
    scratch = copy.deepcopy(model)
    states, lrs = [], []
    for file in checkpoint_files(checkpoints):
        lrs.append(float(load_func(scratch, file)))
        states.append({n: p.detach().clone() for n, p in scratch.named_parameters()})
    if not states:
        raise ValueError(f"no checkpoint files found in {checkpoints!r}")
    return TrainingPath.from_checkpoints(states, lrs, model=model)


def layer_params(model: torch.nn.Module, layers: list[str] | None, names: list[str]):
    """Recorded parameter names inside the given modules (None: all)."""
    if layers is None:
        return None
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not modules of the model (valid: "
            f"{[n for n in modules if n][:8]}...)"
        )
    chosen = [
        n
        for n in names
        if any(n == f"{m}.{n.split('.')[-1]}" or n.startswith(m + ".") for m in layers)
    ]
    if not chosen:
        raise ValueError(f"layers {layers} hold no recorded (trainable) parameters")
    return chosen


def locate(dataset: Dataset, inputs: Any) -> torch.Tensor:
    """Training indices of the given examples (a batch or a DataLoader of batches).

    Raises:
        ValueError: An example is not in the dataset.
    """
    batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
    lookup: dict[bytes, int] = {}
    for i in range(len(dataset)):
        lookup.setdefault(example_key(dataset[i]), i)
    found = []
    for batch in batches:
        *x, labels = batch
        for r in range(labels.shape[0]):
            key = example_key([t[r] for t in x] + [labels[r]])
            if key not in lookup:
                raise ValueError(
                    f"example {r} of the inputs is not in train_dataset: exact "
                    "self-influence is defined for training examples; use "
                    "mode='checkpoint' for TracIn's self-influence of other examples"
                )
            found.append(lookup[key])
    return torch.tensor(found, dtype=torch.int64)
