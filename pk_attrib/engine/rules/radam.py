"""RAdam (decoupled weight decay, maximize), with the second moments the recorder kept.

RAdam's step is Δ_s = −η_s D_s m_s − η_s λ' w_s with, at step count t,

    D_s = r_t sqrt(1 − β2^t) / ((1 − β1^t)(sqrt(v_s) + ε))   where ρ_t > 5 (rectified),
    D_s = 1 / (1 − β1^t)                                      before that,

ρ_t = ρ_∞ − 2 t β2^t / (1 − β2^t), ρ_∞ = 2 / (1 − β2) − 1 and
r_t = sqrt((ρ_t − 4)(ρ_t − 2) ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2) ρ_t)). The switch depends on t
only, and with the recorded v_s the step is linear in m_s: Adam's adjoint
(`moments.FirstMomentRule`). λ' is the decay of the groups with ``decoupled_weight_decay``.
"""

from __future__ import annotations

import torch

from ...record.path import Step
from .base import Hyper
from .moments import FirstMomentRule, safe_sqrt


class RAdamRule(FirstMomentRule):
    """RAdam (decoupled weight decay and maximize too), with the recorded second moments."""

    KINDS = ("radam",)
    OPTIONS = frozenset({"betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize"})
    HYPER = {
        "betas": Hyper("betas", required=True),
        "eps": Hyper("number", required=True),
        "weight_decay": Hyper("number"),
        "decoupled_weight_decay": Hyper("flag"),
        "maximize": Hyper("flag"),
    }

    def _rectification(self, step: Step):
        """(1 / (1 − β1^t), r_t sqrt(1 − β2^t) or 0, 1 where rectified else 0), (d,) each.

        Per parameter in Python floats from its step count t, as PyTorch computes them: the
        switch ρ_t > 5 is then PyTorch's own.
        """

        def terms(values, hyper):
            (t,) = values
            beta1, beta2 = (float(b) for b in hyper["betas"])
            bias2 = 1.0 - beta2**t
            rho_inf = 2.0 / (1.0 - beta2) - 1.0
            rho = rho_inf - 2.0 * t * beta2**t / bias2
            if rho <= 5.0:
                return 1.0 / (1.0 - beta1**t), 0.0, 0.0
            rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
            return 1.0 / (1.0 - beta1**t), rect * bias2**0.5, 1.0

        inverse1, scale, rectified = self._scalar_terms(step, terms, ("step",), (1.0,))
        return inverse1, scale, rectified.bool()

    def _build_denominator(self, step: Step):
        """D_s above, elementwise (d,) (v_s read only at rectified steps)."""
        inverse1, scale, rectified = self._rectification(step)
        if not bool(rectified.any()):
            return inverse1, None
        root = torch.sqrt(self._recorded(step, "exp_avg_sq")) + self.vec.hyper(step, "eps")
        return torch.where(rectified, inverse1 * scale / root, inverse1), None

    # -- counterfactual scores ---------------------------------------------------------------

    def _moments(self) -> tuple[str, ...]:
        """The second moment."""
        return ("exp_avg_sq",)

    def step_map(self, step, w, state, G, frozen=False):
        """m_s, v_s from G_s, then w_s+1 = w_s − η λ' w_s − η D_s(v_s) m_s.

        Where the step skipped a parameter nothing moves. ``frozen`` holds v_s at the value
        G_s gives it, without its dependence on G_s.
        """
        m, v = state
        m = self._moment_after(step, m, G)
        v = self._second_moment(step, v, G, frozen)
        inverse1, scale, rectified = self._rectification(step)
        adaptive = scale / (safe_sqrt(v) + self.vec.hyper(step, "eps"))
        D = inverse1 * torch.where(rectified, adaptive, 1.0)
        return w - self._decay(step, w) - self._eta(step) * D * m, (m, v)
