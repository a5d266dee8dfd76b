"""Adamax (weight decay, maximize), with the infinity norm the recorder kept.

Adamax divides its first moment by an infinity norm u_s = max(β2 u_{s−1}, |G_s| + ε): not
linear in G_s, but recorded after every step (``exp_inf``). Held at its recorded value, the
step Δ_s = −η_s m_s / ((1 − β1^t) u_s) is linear in m_s = β1 m_{s−1} + (1 − β1) G_s, so Adam's
adjoint applies with D_s = 1 / ((1 − β1^t) u_s) (`moments.FirstMomentRule`).
"""

from __future__ import annotations

import torch

from ...record.path import Step
from .base import Hyper
from .moments import FirstMomentRule


class AdamaxRule(FirstMomentRule):
    """Adamax (weight decay and maximize too), with the recorded infinity norms."""

    KINDS = ("adamax",)
    OPTIONS = frozenset({"betas", "eps", "weight_decay", "maximize"})
    HYPER = {
        "betas": Hyper("betas", required=True),
        "eps": Hyper("number", required=True),
        "weight_decay": Hyper("number"),
        "maximize": Hyper("flag"),
    }

    def _build_denominator(self, step: Step):
        """D_s = 1 / ((1 − β1^t) u_s), u_s the recorded ``exp_inf``, elementwise (d,)."""
        norm = self._recorded(step, "exp_inf")
        return 1.0 / ((1.0 - self._beta1(step) ** self._steps(step)) * norm), None

    # -- counterfactual scores ---------------------------------------------------------------

    def _moments(self) -> tuple[str, ...]:
        """The infinity norm."""
        return ("exp_inf",)

    def step_map(self, step, w, state, G, frozen=False):
        """m_s, u_s = max(β2 u_{s−1}, |G_s| + ε), then w_s+1 = w_s − η m_s / ((1 − β1^t) u_s).

        Where the step skipped a parameter nothing moves. ``frozen`` holds u_s at the value G_s
        gives it, without its dependence on G_s.
        """
        m, norm = state
        m = self._moment_after(step, m, G)
        g = G.detach() if frozen else G
        grown = torch.maximum(self._beta(step, 1) * norm, g.abs() + self.vec.hyper(step, "eps"))
        skip = self._mask(step.skipped)
        norm = grown if skip is None else torch.where(skip, norm, grown)
        positive = norm > 0  # (0 only where a skipped parameter never had a gradient)
        ratio = torch.where(positive, m / torch.where(positive, norm, 1.0), 0.0)
        step_size = self._eta(step) / (1.0 - self._beta1(step) ** self._steps(step))
        return w - step_size * ratio, (m, norm)
