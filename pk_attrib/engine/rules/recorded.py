"""Reading the optimizer state the recorder kept after each step, per coordinate.

What an adaptive optimizer's step divides by (second moments, sums, norms) and its step
counts are recorded after every step (`record.optimizers.STATE_AFTER_STEP`); a rule reads them
back as (d,) vectors in the order of the differentiated parameters.
"""

from __future__ import annotations

import torch

from ...exceptions import UnsupportedError
from ...record.path import Step


class RecordedState:
    """Mixin of `base.Rule`: the recorded state of a step as (d,) vectors.

    Reads ``self.path``, ``self._names`` (the differentiated parameters), ``self.vec`` (their
    param groups, dtype and device) and ``self.kind``.
    """

    def _recorded(self, step: Step, key, fill: float = 1.0) -> torch.Tensor:
        """(d,): the optimizer state ``key`` recorded after the step, per coordinate.

        Args:
            step: The step.
            key: A state key (``"exp_avg_sq"``), or a function of a parameter's name to its
                key (amsgrad per param group). A scalar state (a step count) is spread over
                its parameter's coordinates.
            fill: The value of a parameter the step skipped that has no state yet (it never
                had a gradient; η_s is 0 there).

        Raises:
            UnsupportedError: A parameter the step moved has no recorded state.
        """
        key_of = key if callable(key) else (lambda _: key)
        state, shapes = step.optimizer_state, self.path.param_shapes
        parts = []
        for n in self._names:
            found = self._found(step, state, key_of(n), n)
            size = shapes[n].numel()
            parts.append(
                torch.full((size,), fill) if found is None else found.reshape(-1).expand(size)
            )
        return torch.cat(parts).to(self.vec.device, self.vec.dtype)

    def _scalar_terms(self, step: Step, compute, keys: tuple[str, ...], fill: tuple):
        """(d,) tensors of numbers computed per parameter from its scalar state, as PyTorch does.

        PyTorch computes bias corrections, RAdam's rectification and NAdam's momentum schedule
        in Python floats from each parameter's step count: so does this, once per parameter.

        Args:
            step: The step.
            compute: ``compute(values, hyper) -> tuple of floats``, ``values`` the parameter's
                recorded scalars under ``keys`` (floats), ``hyper`` its param group's settings.
            keys: The scalar state keys ``compute`` reads (``("step",)``).
            fill: Their values for a parameter the step skipped that has no state yet.

        Returns:
            A tuple of (d,) tensors in the computation dtype, one per number ``compute`` gives.

        Raises:
            UnsupportedError: A parameter the step moved has no recorded state.
        """
        state, shapes = step.optimizer_state, self.path.param_shapes
        columns = []
        for n in self._names:
            found = [self._found(step, state, key, n) for key in keys]
            values = fill if any(v is None for v in found) else tuple(float(v) for v in found)
            columns.append(compute(values, step.hyper[self.vec.group_of.get(n, 0)]))
        sizes = torch.tensor([shapes[n].numel() for n in self._names])
        return tuple(
            torch.repeat_interleave(torch.tensor(column, dtype=torch.float64), sizes).to(
                self.vec.device, self.vec.dtype
            )
            for column in zip(*columns, strict=True)
        )

    def _found(self, step: Step, state: dict, key: str, name: str) -> torch.Tensor | None:
        """Parameter ``name``'s recorded state ``key`` (None for one the step skipped).

        Raises:
            UnsupportedError: The step moved the parameter and recorded no such state.
        """
        found = state.get(key, {}).get(name)
        if found is None and name not in step.skipped:
            cls = (self.path.optimizer or {}).get("class", self.kind).rpartition(".")[2]
            raise UnsupportedError(
                f"step {step.index} has no recorded {cls} state ({key} of {name}): the exact "
                f"{self.kind} rule needs a path recorded by PathRecorder at every step; use "
                "mode='checkpoint'"
            )
        return found
