"""Paths recorded every k steps, explained exactly: the steps between snapshots are replayed.

A recording with ``every=k`` keeps the weights and the optimizer's state at every k-th step,
and at every step what is small (the batch's indices, learning rates, hyperparameters, the
random-number states). From snapshot j the engine recomputes each step as training took it,
w_{s+1} = the optimizer's step (`Rule.step_map`) from w_s, its state and the step's batch
gradient, holds the segment's weights (k × the model), and the exact sweep walks them as it
walks a path recorded at every step. The replayed weights at the end of a segment are compared
with the next snapshot: a difference beyond rounding (non-deterministic kernels, a loop the
recording does not describe) is reported, naming the segment, and the next segment starts from
its own snapshot, so errors never carry past one segment.

`replayed_path` builds that path: a `TrainingPath` over `ReplayBackend`, which answers for the
weights (and Adam's per-step second moments and step counts) between snapshots by replaying.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Any

import torch

from ..exceptions import ReconstructionWarning, UnsupportedError
from ..record.path import TrainingPath
from .rules import make_rule

# a rule's state as its step map carries it, by the optimizer state's names
_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
# what a recording at every step keeps after each step, which the exact rules read
_AFTER = ("exp_avg_sq", "max_exp_avg_sq", "step")
# A segment's replayed end against the next snapshot, relative to its last step: a replay
# takes each step with the training loop's own operations (the batch's gradient, the
# optimizer's update), so in float64 it ends within ~1e-13 of the snapshot (a step's
# rounding, k times); in float32 Adam turns the gradient's rounding into ±lr on coordinates
# whose gradient is rounding, as the step check allows (`WARN_RECONSTRUCTION`).
_DRIFT = {torch.float64: 1e-8, torch.float32: 1e-3}


class SegmentTensors:
    """A replayed segment's tensors by raw step and key: in memory, or spilled to a file.

    A segment holds k + 1 weight vectors (and, for Adam, k second moments). Where that would
    pass ``limit`` bytes, every tensor but a scalar is written to an unnamed temporary file
    as it is made and read back with ``preadv`` when asked for, so a replay holds a few
    copies of the model whatever k (the file is gone when the segment is). A tensor kept in
    memory never holds more than its own bytes: a view into a larger tensor (one parameter
    split from a step's flat weights) is copied, or each step's whole vector would stay
    alive through it.

    Args:
        limit: Bytes the segment may keep in memory (its expected size decides once).
        expected: Bytes the segment's tensors will take.
    """

    def __init__(self, limit: int, expected: int):
        self._memory: dict[tuple[int, str], torch.Tensor] = {}
        self._spilled: dict[tuple[int, str], tuple[int, torch.dtype, torch.Size]] = {}
        self._file = tempfile.TemporaryFile() if expected > limit else None  # noqa: SIM115
        self._end = 0

    @property
    def spilled(self) -> bool:
        """Whether the tensors go to a file."""
        return self._file is not None

    def put(self, raw: int, key: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (on the CPU) as ``key`` of raw step ``raw``."""
        tensor = tensor.detach()
        if self._file is None or tensor.numel() <= 1:
            if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # (not the larger tensor it views)
            self._memory[(raw, key)] = tensor
            return
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(self._file.fileno(), data, self._end)
        self._spilled[(raw, key)] = (self._end, tensor.dtype, tensor.shape)
        self._end += data.nbytes

    def get(self, raw: int, key: str) -> torch.Tensor | None:
        """A fresh copy of ``key`` of raw step ``raw`` (None: not kept)."""
        found = self._memory.get((raw, key))
        if found is not None:
            return found.clone()
        where = self._spilled.get((raw, key))
        if where is None:
            return None
        offset, dtype, shape = where
        out = torch.empty(shape, dtype=dtype)
        view = out.reshape(-1).view(torch.uint8).numpy()
        done = os.preadv(self._file.fileno(), [view], offset)
        if done != view.nbytes:  # (the file is this process's own: only a full disk ends it)
            raise OSError(f"a replayed segment's spill file ended after {done} bytes")
        return out

    def close(self) -> None:
        """Drop the file (its tensors)."""
        if self._file is not None:
            self._file.close()

    def __del__(self):
        self.close()


def replayed_path(path: TrainingPath, engine) -> TrainingPath:
    """The path step by step, its steps between snapshots replayed (see the module).

    Args:
        path: A path recorded with ``every > 1`` whose manifest says it is ``replayable``.
        engine: The engine (its gradients and the optimizer's rule).

    Raises:
        UnsupportedError: ``layers=`` (every parameter must move in a replay).
    """
    if engine.fm.partial:
        raise UnsupportedError(
            "a path recorded every few steps is explained by replaying the steps between its "
            "snapshots, which moves every trained parameter: drop layers="
        )
    manifest = copy.copy(path.manifest)
    manifest.update(every=1, approximate=False, approximate_reasons=[])
    view = TrainingPath(manifest, None)
    view._backend = ReplayBackend(path, view, engine)
    return view


class ReplayBackend:
    """The raw steps of a recording every k steps, the weights between snapshots replayed."""

    def __init__(self, path: TrainingPath, view: TrainingPath, engine):
        self.inner = path._backend
        self.path, self.view, self.engine = path, view, engine
        self.every = path.every
        self.manifest = path.manifest
        self._segments: dict[int, SegmentTensors] = {}
        self._keys: dict[int, set[str]] | None = None

    # -- what the inner backend holds -------------------------------------------------------

    def n_raw(self) -> int:
        """Number of raw optimizer steps held."""
        return self.inner.n_raw()

    def meta(self, raw: int) -> dict[str, Any]:
        """Metadata of raw step ``raw``."""
        return self.inner.meta(raw)

    def has_final(self) -> bool:
        """Whether the final parameters were recorded."""
        return self.inner.has_final()

    def final_params(self):
        """The final parameters (None for an interrupted run)."""
        return self.inner.final_params()

    def final_buffer(self, name: str):
        """Buffer ``name`` at the end of the run."""
        return self.inner.final_buffer(name)

    def keys_by_step(self) -> dict[int, set[str]]:
        """The tensor keys of every raw step, the replayed ones included."""
        if self._keys is None:
            keys = self.inner.keys_by_step()
            weights = {f"w/{n}" for n in self.path.param_names}
            after = {f"{k}/{n}" for k in _AFTER for n in self.path.param_names}
            adam = (self.path.optimizer or {}).get("kind") in ("adam", "adamw")
            for found in keys.values():
                found |= weights
                if adam:
                    found |= after
            self._keys = keys
        return self._keys

    def has(self, raw: int, key: str) -> bool:
        """Whether raw step ``raw`` holds (or replays) tensor ``key``."""
        return key in self.keys_by_step()[raw]

    def tensor(self, raw: int, key: str) -> torch.Tensor | None:
        """Tensor ``key`` of raw step ``raw``: recorded, or replayed from its snapshot."""
        replayed = key.startswith("w/") and raw % self.every != 0
        replayed |= key.split("/", 1)[0] in _AFTER and not self.inner.has(raw, key)
        if not replayed:
            return self.inner.tensor(raw, key)
        return self._segment(raw - raw % self.every).get(raw, key)

    # -- the replay -------------------------------------------------------------------------

    def _segment(self, first: int) -> SegmentTensors:
        """Replay raw steps first .. first + k − 1 from their snapshot (the last two kept).

        Two segments of k + 1 weight vectors may pass ``memory_budget``: then a segment's
        weights (and second moments) are spilled to a temporary file as they are made.
        """
        found = self._segments.get(first)
        if found is not None:
            return found
        engine, fm, path = self.engine, self.engine.fm, self.path
        rule = _rule(engine, self.view)
        kind = rule.kind if rule.kind != "adamw" else "adam"
        keys = _STATE.get(kind)
        if keys is None:
            raise UnsupportedError(
                f"the {rule.kind} rule cannot replay the steps between snapshots yet: record "
                "with every=1, or explain in checkpoint mode"
            )
        names, shapes = path.param_names, path.param_shapes
        last = min(first + self.every, self.n_raw())
        state = {}  # the optimizer's state before step `first`, by key
        for key in keys[: rule.counterfactual_state()]:
            parts = []
            for n in names:
                value = self.inner.tensor(first, f"state/{key}/{n}")
                parts.append(torch.zeros(shapes[n].numel()) if value is None else value.reshape(-1))
            state[key] = torch.cat(parts).to(fm.device, fm.dtype)
        counts = {
            n: float(t) if (t := self.inner.tensor(first, f"state/step/{n}")) is not None else 0.0
            for n in names
        }
        sizes = [shapes[n].numel() for n in names]
        per_step = sum(sz * torch.empty((), dtype=path.param_dtypes[n]).element_size()
                       for n, sz in zip(names, sizes, strict=True))  # fmt: skip
        per_step *= 2 if kind == "adam" else 1  # (and its second moments)
        out = SegmentTensors(fm.memory_budget // 4, (last - first + 1) * per_step)
        self._segments[first] = out  # (filled step by step: the steps read through it)
        w = previous = fm.flatten(path._raw_params(first))
        carried = tuple(state[k] for k in keys[: rule.counterfactual_state()])
        try:
            for r in range(first, last):
                step = self.view.step(r)
                for n in names if kind == "adam" else ():  # the step count after the step
                    if n not in step.skipped:
                        counts[n] += 1.0
                    out.put(r, f"step/{n}", torch.tensor(counts[n], dtype=torch.float64))
                sign, lam = rule.coefficients(step)
                G = sign * engine.step_gradient(step, w) + lam * w
                w_next, carried = rule.step_map(step, w, carried, G)
                carried = tuple(c.detach() for c in carried)
                if kind == "adam":  # the second moments after the step, as recorded
                    after = dict(zip(keys, carried, strict=False))
                    for key in ("exp_avg_sq", "max_exp_avg_sq"):
                        if key in after:
                            parts = torch.split(after[key], sizes)
                            for n, part in zip(names, parts, strict=True):
                                out.put(r, f"{key}/{n}", part.reshape(shapes[n]).cpu())
                # the weights as training stored them (in their own dtypes), and from there on
                stored = {
                    n: part.reshape(shapes[n]).to("cpu", path.param_dtypes[n])
                    for n, part in zip(names, torch.split(w_next.detach(), sizes), strict=True)
                }
                for n, t in stored.items():
                    out.put(r + 1, f"w/{n}", t)
                previous, w = w, fm.flatten(stored)
        except BaseException:
            self._segments.pop(first, None)
            out.close()
            raise
        self._check_drift(first, last, w, previous)
        while len(self._segments) > 2:
            self._segments.pop(next(iter(self._segments))).close()
        return out

    def _check_drift(self, first: int, last: int, replayed, previous) -> None:
        """Compare the segment's replayed end with the snapshot (or final weights) recorded.

        Measured as the step check measures a step: the difference beyond rounding, over the
        size of the segment's last step (which takes the difference).
        """
        fm, path = self.engine.fm, self.path
        if last == self.n_raw():
            if not self.has_final():
                return
            recorded = fm.flatten(path.final)
        else:
            recorded = fm.flatten(path._raw_params(last))
        eps = max(torch.finfo(t).eps for t in path.param_dtypes.values())
        floor = 8 * eps * (recorded.abs() + replayed.abs())
        off = float(((replayed - recorded).abs() - floor).clamp_min(0).norm())
        moved = float((recorded - previous).norm())
        error = off / moved if moved else (0.0 if off == 0 else float("inf"))
        limit = _DRIFT.get(fm.dtype, 1e-3)
        if error > limit:
            warnings.warn(
                f"replaying optimizer steps {first}..{last - 1} from their snapshot does not "
                f"reach the snapshot recorded at step {last}: the replayed weights are off by "
                f"{error:.2e} of the segment's movement (non-deterministic kernels, or a "
                "training loop the recording does not describe). The segment's last step "
                "takes the difference (its step check and 'unexplained' show it); the next "
                "segment starts from its own snapshot",
                ReconstructionWarning,
                stacklevel=2,
            )


def _rule(engine, view):
    """The optimizer's rule over every parameter (the engine's vectors)."""
    return make_rule(view, engine.vectors, engine.fm.active_names)
