"""Adagrad: learning-rate decay, weight decay and maximize (PyTorch's convention).

Adagrad divides G_s by sqrt(S_s) + ε, with S_s the sum of every G_r² so far (``sum``): not
linear in G_s, but recorded after every step, with the step count t. Held at its recorded
value the step is linear in G_s and carries nothing else from step to step:

    Δ_s = −η'_s D_s G_s,   η'_s = η_s / (1 + (t − 1) · lr_decay),   D_s = 1 / (sqrt(S_s) + ε),

so v_s = η'_s D_s φ_s, like plain SGD with a per-coordinate learning rate.
"""

from __future__ import annotations

import math

import torch

from ...record.path import Step
from .base import Hyper, Rule
from .moments import safe_sqrt


class AdagradRule(Rule):
    """Adagrad (lr_decay, weight decay, maximize), with the recorded sums and step counts."""

    KINDS = ("adagrad",)
    OPTIONS = frozenset(
        {"lr_decay", "eps", "weight_decay", "initial_accumulator_value", "maximize"}
    )
    HYPER = {
        "eps": Hyper("number", required=True),
        "lr_decay": Hyper("number"),
        "weight_decay": Hyper("number"),
        "initial_accumulator_value": Hyper("number"),
        "maximize": Hyper("flag"),
    }

    _scale_of: tuple | None = None  # (step index, η'_s D_s): the last step asked for

    def _rate(self, step: Step) -> torch.Tensor:
        """η'_s = η_s / (1 + (t − 1) lr_decay) per coordinate (0 where skipped)."""
        t = self._recorded(step, "step", fill=1.0)
        return self._eta(step) / (1.0 + (t - 1.0) * self.vec.hyper(step, "lr_decay"))

    def _scale(self, step: Step) -> torch.Tensor:
        """η'_s D_s per coordinate, (d,)."""
        if self._scale_of is None or self._scale_of[0] != step.index:
            root = torch.sqrt(self._recorded(step, "sum")) + self.vec.hyper(step, "eps")
            self._scale_of = (step.index, self._rate(step) / root)
        return self._scale_of[1]

    def memoryless(self, step: Step) -> bool:
        """No state enters Δ_s but the recorded sum."""
        return True

    def begin(self, s, step, phi, w):
        """v_s = η'_s D_s φ_s."""
        self._carry = None
        return self._scale(step) * phi, None

    # -- the step check: every step on its own ----------------------------------------------

    def passes_through(self, step: Step) -> bool:
        """Δ_s uses no state carried from the step before (the sum is recorded)."""
        return True

    def uses_state(self, step: Step) -> bool:
        """Δ_s does not depend on a state recovered from the step before."""
        return False

    def recover(self, step, delta, G, w):
        """No state to recover (NaN)."""
        return torch.full_like(delta, math.nan)

    def recovery_uncertainty(self, step, floor):
        """Nothing recovered: no uncertainty."""
        return torch.zeros_like(floor)

    def carry_uncertainty(self, step, unc):
        """Nothing carried."""
        return torch.zeros_like(unc)

    def prediction_uncertainty(self, step, unc):
        """Δ̂_s does not depend on the state before the step."""
        return torch.zeros_like(unc)

    def advance(self, step, prev, G, w):
        """No state (zeros)."""
        return torch.zeros_like(G)

    def predict(self, step, prev, G, w):
        """Δ̂_s = −η'_s D_s G_s."""
        return -self._scale(step) * G

    # -- counterfactual scores ---------------------------------------------------------------

    def counterfactual_state(self) -> int:
        """The sum of squared gradients."""
        return 1

    def step_map(self, step, w, state, G, frozen=False):
        """S_s = S_{s−1} + G_s², then w_s+1 = w_s − η'_s G_s / (sqrt(S_s) + ε).

        Where the step skipped a parameter nothing moves. ``frozen`` holds S_s at the value G_s
        gives it, without its dependence on G_s.
        """
        (total,) = state
        g = G.detach() if frozen else G
        skip = self._mask(step.skipped)
        grown = g * g if skip is None else torch.where(skip, 0.0, g * g)
        total = total + grown
        root = safe_sqrt(total) + self.vec.hyper(step, "eps")
        return w - self._rate(step) * G / root, (total,)

    def state_point(self, step, previous, w, delta, G):
        """The sum before the step.

        As recorded after the step before (or before the recording began), or the
        ``initial_accumulator_value`` for a fresh state.
        """
        found = self._state_before(step, previous).get("sum", {})
        if not found and step.fresh_state:
            start = self.vec.hyper(step, "initial_accumulator_value")
            return (torch.zeros_like(w) + start,)
        return (self._flat_state(found),)
