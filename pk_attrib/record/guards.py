"""What a recording refuses before a step: one it could not explain, or could not hold.

A step that would update a parameter the recording does not hold (added to the optimizer or
unfrozen after the recorder was made), a parameter whose dtype changed (``model.half()``), or a
learning rate that is not a finite number >= 0 (a scheduler gone wrong) stops the training
loop with a `RecordingError` naming it, instead of a path that would explain another run.
"""

from __future__ import annotations

import math

import torch

from ..exceptions import RecordingError


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
    dtypes = [p.dtype for p in params.values()]
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
