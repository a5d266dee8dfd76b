"""`Step`: what one step of a `TrainingPath` holds, read on first access.

The weights before and after it, its batch (dataset indices and micro-batch sizes), the
learning rates and hyperparameters in effect, the optimizer state recorded after it, the
model's buffers, and the random-number state each micro-batch's forward pass started from.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from .optimizers import SCALAR_STATE, STATE_AFTER_STEP

if TYPE_CHECKING:  # (a step belongs to its path; the path builds its steps)
    from .path import TrainingPath

# Optimizer terms recorded after a step (Adam, RMSprop, ...), by tensor-key prefix.
STATE_KEYS = tuple(dict.fromkeys(k for keys in STATE_AFTER_STEP.values() for k in keys))


def _named(path: TrainingPath, meta: dict[str, Any], key: str) -> frozenset[str]:
    """The parameters a raw step's metadata lists under ``key`` (by index), by name."""
    indices = meta.get(key)
    if not indices:
        return frozenset()
    names = path.param_names
    return frozenset(names[i] for i in indices)


class Step:
    """Everything one step of a path holds. Tensors are loaded on first access.

    Attributes:
        index: The step number s in the path (0..len(path)-1).
        raw_steps: The optimizer steps this step spans (``range``; one unless ``every > 1``).
        lr: Learning rate of each param group in effect at the step.
        lr_sum: Learning rates summed over the optimizer steps the step spans.
        hyper: Hyperparameters of each param group at the step.
        fresh_state: True when the optimizer had no state (momentum, moments) before it.
        skipped: Names of the parameters the step left alone: they had no gradient
            (``grad is None``), so the optimizer neither moved them nor touched their state
            (no weight decay, no momentum), as PyTorch's optimizers do (with ``every > 1``:
            left alone by every optimizer step the step spans).
        fresh_params: Names of the parameters whose optimizer state starts at this step
            while others already had some (a layer whose first gradient comes late: SGD then
            starts its momentum buffer at the gradient, without dampening).
    """

    def __init__(self, path: TrainingPath, index: int, raws: range):
        self._path = path
        self.index = index
        self.raw_steps = raws
        meta = path._backend.meta(raws[0])
        self.lr: tuple[float, ...] = tuple(meta.get("lr", ()))
        sums = [0.0] * len(self.lr)
        for r in raws:
            for g, lr in enumerate(path._backend.meta(r).get("lr", ())):
                sums[g] += lr
        self.lr_sum: tuple[float, ...] = tuple(sums)
        self.hyper: list[dict[str, Any]] = meta.get("hyper") or [
            g["hyper"] for g in (path.optimizer or {}).get("groups", [])
        ]
        self.fresh_state: bool = bool(meta.get("fresh_state", False))
        skipped = _named(path, meta, "skipped")
        for r in raws[1:]:  # (every=k) left alone by every optimizer step the step spans
            if not skipped:
                break
            skipped &= _named(path, path._backend.meta(r), "skipped")
        self.skipped: frozenset[str] = skipped
        self.fresh_params: frozenset[str] = _named(path, meta, "fresh")

    @functools.cached_property
    def params(self) -> dict[str, torch.Tensor]:
        """w_s by parameter name."""
        return self._path.params(self.index)

    @functools.cached_property
    def next_params(self) -> dict[str, torch.Tensor]:
        """w_{s+1} by parameter name (w_S, the final parameters, for the last step)."""
        return self._path.params(min(self.index + 1, len(self._path)))

    @functools.cached_property
    def delta(self) -> dict[str, torch.Tensor]:
        """Δ_s = w_{s+1} − w_s by parameter name."""
        return {n: self.next_params[n] - w for n, w in self.params.items()}

    @functools.cached_property
    def indices(self) -> torch.Tensor | None:
        """Dataset indices of the step's batch (all micro-batches, repeats kept), int64 (B,)."""
        parts = [self._path._batch(r)[0] for r in self.raw_steps]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts) if parts else None

    @functools.cached_property
    def batch_sizes(self) -> torch.Tensor | None:
        """Sizes of the micro-batches accumulated into the step, int64 (n_micro,)."""
        parts = [self._path._batch(r)[1] for r in self.raw_steps]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts) if parts else None

    @functools.cached_property
    def parts(self) -> list[tuple[tuple[float, ...], torch.Tensor, torch.Tensor]]:
        """Per optimizer step spanned: ``(lr per group, indices (B,), micro-batch sizes)``.

        One entry unless the path was recorded with ``every > 1``; empty for checkpoints.
        """
        backend, out = self._path._backend, []
        for r in self.raw_steps:
            idx, sizes = self._path._batch(r)
            if idx is not None:
                out.append((tuple(backend.meta(r).get("lr", ())), idx, sizes))
        return out

    @functools.cached_property
    def parts_skipped(self) -> list[frozenset[str]]:
        """For each entry of `parts`: the parameters that optimizer step skipped."""
        backend = self._path._backend
        return [
            _named(self._path, backend.meta(r), "skipped")
            for r in self.raw_steps
            if backend.has(r, "idx")
        ]

    @functools.cached_property
    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer terms recorded after the step: ``{"exp_avg_sq": {name: tensor}, ...}``.

        What the optimizer's rule divides by, and step counts (`STATE_AFTER_STEP`): Adam/AdamW
        record ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) and ``step``, RMSprop
        ``square_avg`` (and ``grad_avg`` when centered), Adagrad ``sum`` and ``step``, Adamax
        ``exp_inf`` and ``step``, NAdam ``exp_avg_sq``, ``mu_product`` and ``step``, RAdam
        ``exp_avg_sq`` and ``step``; SGD records nothing. Empty when nothing was recorded.
        """
        raw, backend = self.raw_steps[0], self._path._backend
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key in STATE_KEYS:
            found = {n: backend.tensor(raw, f"{key}/{n}") for n in self._path.param_names}
            found = {n: t for n, t in found.items() if t is not None}
            for n, t in found.items():  # (a step count is a scalar)
                shape = torch.Size([]) if key in SCALAR_STATE else self._path.param_shapes[n]
                self._path._checked(t, raw, f"{key}/{n}", shape)
            if found:
                out[key] = found
        return out

    @functools.cached_property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers (BatchNorm statistics, ...) at w_s, by name.

        A recording keeps them when the step's first batch was handed to the loop (before
        its forward passes updated them); a path of checkpoints, each checkpoint's. Empty
        when the path holds none (the model's own are used, constant along the path).
        """
        return self._path.buffers(self.index)

    @functools.cached_property
    def train_modules(self) -> bool | frozenset[str] | None:
        """Which modules were in train mode when the step's batches ran.

        True: all of them; a set: those named (``""`` is the model itself; empty: none, the
        model ran in eval mode); None for a path recorded without it (or of checkpoints).
        """
        mode = self._path._backend.meta(self.raw_steps[0]).get("train")
        if mode is None or mode is True:
            return mode
        return frozenset(mode or ())

    @functools.cached_property
    def rng_states(self) -> list[tuple[torch.Tensor, ...]] | None:
        """Per micro-batch, the random-number state its forward pass started from.

        ``(cpu_state, *cuda_states)`` uint8 tensors, in the order of `batch_sizes` (every
        micro-batch of every optimizer step the step spans); None for a path recorded
        without them. (A recording keeps a state only when it moved since the last one kept:
        a model without random operations keeps one an epoch.)
        """
        out = []
        for r in self.raw_steps:
            n = len(self._path._batch(r)[1] if self._path._batch(r)[1] is not None else [])
            for i in range(n):
                found = self._path._rng_state(r, i)
                if found is None:
                    return None
                out.append(found)
        return out

    @functools.cached_property
    def initial_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer buffers that existed before the step: ``{"momentum_buffer": {...}, ...}``.

        Only recorded when the recording began on an optimizer that already had state.
        """
        raw, backend = self.raw_steps[0], self._path._backend
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key in self._path._backend.meta(raw).get("initial_state", []):
            out[key] = {n: backend.tensor(raw, f"init/{key}/{n}") for n in self._path.param_names}
            out[key] = {n: t for n, t in out[key].items() if t is not None}
        return out

    def __repr__(self) -> str:
        n = None if self.indices is None else len(self.indices)
        return f"Step(index={self.index}, lr={self.lr}, batch={n})"
