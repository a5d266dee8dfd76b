"""What a recording refuses before a step: one it could not explain, or could not hold.

Batch indices that are not integers, or lie outside the training set, are refused when
noted (`batch_indices`).

A step that would update a parameter the recording does not hold (added to the optimizer or
unfrozen after the recorder was made), a parameter whose dtype changed (``model.half()``), or a
learning rate that is not a finite number >= 0 (a scheduler gone wrong) stops the training
loop with a `RecordingError` naming it, instead of a path that would explain another run.
"""

from __future__ import annotations

import array
import math
from typing import Any

import numpy as np
import torch

from ..exceptions import IndexOutOfRangeError, RecordingError
from .optimizers import group_lr

_INT = {int}


def batch_indices(indices: Any, size: int | None) -> torch.Tensor | array.array:
    """One (micro-)batch's dataset indices, checked, in a container of their own.

    A list (or tuple) of Python ints, what a batch sampler yields, comes back as an
    ``array.array`` of type ``"q"`` (int64): the recorder calls this on the training
    thread, where making a tensor costs several times more, and the tensor is made later
    (`pk_attrib.record.finish.index_tensor`). Anything else comes back as a tensor.

    Args:
        indices: Dataset indices, int (B,) tensor, array or list (or one int).
        size: The training set's length (None: unknown, no upper bound).

    Returns:
        The indices, (B,) int64 (a tensor or an ``array.array("q")``), a copy (the caller
        may reuse its list or array).

    Raises:
        TypeError: The indices are not integers.
        IndexOutOfRangeError: An index lies outside ``[0, size)``.
    """
    if type(indices) in (list, tuple) and indices and set(map(type, indices)) == _INT:
        low, high = min(indices), max(indices)
        _check_range(low, high, size)
        if high < 1 << 63:  # (else: numpy's error below)
            return array.array("q", indices)
    if isinstance(indices, (list, tuple)):  # (numpy reads a list 5x faster than torch)
        values = np.asarray(indices)
        if values.dtype.kind in "iu" and values.size:  # (a fresh array: nobody else's)
            values = values.reshape(-1).astype(np.int64, copy=False)
            _check_range(int(values.min()), int(values.max()), size)
            return torch.from_numpy(values)
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.numel() == 0:  # an empty list reads as float32
        idx = idx.to(torch.int64)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"batch indices must be integers, got dtype {idx.dtype}")
    idx = idx.to("cpu", torch.int64, copy=True)
    if idx.numel():
        low, high = torch.aminmax(idx)
        _check_range(int(low), int(high), size)
    return idx


def all_finite(tensors) -> bool:
    """Whether every tensor holds finite numbers only.

    A finite sum says so in one pass without a (numel,) mask (NaN and inf carry into the
    sum); a sum that overflows is checked element by element.
    """
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())):
            if not bool(torch.isfinite(t).all()):
                return False
    return True


def _check_range(low: int, high: int, size: int | None) -> None:
    if low < 0 or (size is not None and high >= size):
        raise IndexOutOfRangeError(
            f"batch indices span [{low}, {high}] but the training dataset has {size} "
            "examples: pass the indices into the dataset the recorder was given "
            "(dataset_size=)"
        )


def learning_rates(groups: list[dict], raw: int) -> list[float]:
    """The param groups' learning rates as Python floats, refused unless finite and >= 0.

    Called at every step: plain floats pass a quick test; anything else (a tensor, an int,
    a bad rate) goes through `group_lr` and `check_learning_rates`.

    Raises:
        RecordingError: Naming the step and its learning rates.
    """
    lrs = [g["lr"] for g in groups]
    if all(map(_plain_rate, lrs)):
        return lrs
    lrs = [group_lr(g) for g in groups]
    check_learning_rates(lrs, raw)
    return lrs


def _plain_rate(lr: Any) -> bool:
    return type(lr) is float and 0.0 <= lr < math.inf


def check_learning_rates(lrs: list[float], raw: int) -> None:
    """Refuse a step whose learning rates are not finite numbers >= 0.

    Raises:
        RecordingError: Naming the step and its learning rates.
    """
    if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        raise RecordingError(
            f"optimizer step {raw} has learning rate(s) {lrs}: a step with a NaN, "
            "infinite or negative learning rate cannot be explained (check the scheduler)"
        )


def check_parameters(optimizer: torch.optim.Optimizer, recorder, raw: int) -> None:
    """Refuse a step that would update a parameter the recording does not hold.

    Args:
        optimizer: The optimizer about to step.
        recorder: The `PathRecorder` (its parameters, their dtypes and the optimizer's
            groups when it was made).
        raw: The step's number.

    Raises:
        RecordingError: A dtype changed, or a parameter the recording does not hold trains.
    """
    params, dtypes_then = recorder._params, recorder._dtypes
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    unfrozen = [p for p in recorder._left_out if p.requires_grad and p.grad is not None]
    dtypes = [p.dtype for p in recorder._param_list]  # (every step: it does little else)
    if dtypes != dtypes_then:
        name, was, now = next(
            (n, a, b) for n, a, b in zip(params, dtypes_then, dtypes, strict=True) if a != b
        )
        raise RecordingError(
            f"parameter {name} changed its dtype from {was} to {now} during the recording "
            "(model.double(), .half(), ...): one recording holds one dtype per parameter; "
            "create a new PathRecorder, into a new store, after converting the model"
        )
    if sizes == recorder._group_sizes and not unfrozen:
        return
    names = {id(p): n for n, p in recorder.model.named_parameters()}
    recorded = {id(p) for p in params.values()}
    new = [
        names.get(id(p), "<not in the model>")
        for g in optimizer.param_groups
        for p in g["params"]
        if id(p) not in recorded and p.requires_grad
    ]
    raise RecordingError(
        f"optimizer step {raw} would update parameters this recording does not hold "
        f"({', '.join(new[:5]) or 'added param groups'}): they were added to the optimizer "
        "or unfrozen after the recorder was created. Create the PathRecorder after "
        "setting which parameters train (a new recorder, into a new store for a new phase)"
    )
