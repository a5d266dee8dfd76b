"""NAdam (momentum decay, coupled or decoupled weight decay, maximize).

NAdam's step at step count t, with μ_k = β1 (1 − 0.5 · 0.96^(k ψ)) (ψ: ``momentum_decay``)
and Π_t = μ_1 ⋯ μ_t (the recorded ``mu_product``), is

    Δ_s = −η_s (a_t G_s + b_t m_s) / (sqrt(v_s / (1 − β2^t)) + ε) − η_s λ' w_s,
    a_t = (1 − μ_t) / (1 − Π_t),   b_t = μ_{t+1} / (1 − Π_t μ_{t+1}),

with m_s = β1 m_{s−1} + (1 − β1) G_s. With the recorded v_s, t and Π_t it is linear in m_s
and G_s: `moments.FirstMomentRule` with Dm_s = b_t / denominator and Dg_s = a_t / denominator.
λ' is the decay of the groups with ``decoupled_weight_decay``.
"""

from __future__ import annotations

import torch

from ...record.path import Step
from .base import Hyper
from .moments import FirstMomentRule, safe_sqrt


class NAdamRule(FirstMomentRule):
    """NAdam, with the recorded second moments, step counts and momentum products."""

    KINDS = ("nadam",)
    OPTIONS = frozenset(
        {"betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize"}
    )
    HYPER = {
        "betas": Hyper("betas", required=True),
        "eps": Hyper("number", required=True),
        "momentum_decay": Hyper("number", required=True),
        "weight_decay": Hyper("number"),
        "decoupled_weight_decay": Hyper("flag"),
        "maximize": Hyper("flag"),
    }

    def _coefficients(self, step: Step):
        """(a_t, b_t, 1 − β2^t) per coordinate, (d,) each.

        Per parameter in Python floats from its recorded t and Π_t, as PyTorch computes them.
        (A parameter without state yet, skipped: Π read as 0, so all stay finite; η_s is 0.)
        """

        def terms(values, hyper):
            t, product = values
            beta1, beta2 = (float(b) for b in hyper["betas"])
            psi = float(hyper["momentum_decay"])
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * psi))
            return (1.0 - mu) / (1.0 - product), mu_next / (1.0 - product * mu_next), 1.0 - beta2**t

        return self._scalar_terms(step, terms, ("step", "mu_product"), (1.0, 0.0))

    def _build_denominator(self, step: Step):
        """(b_t, a_t) / (sqrt(v_s / (1 − β2^t)) + ε), elementwise (d,) each."""
        a, b, bias2 = self._coefficients(step)
        v = self._recorded(step, "exp_avg_sq")
        root = torch.sqrt(v / bias2) + self.vec.hyper(step, "eps")
        return b / root, a / root

    # -- counterfactual scores ---------------------------------------------------------------

    def _moments(self) -> tuple[str, ...]:
        """The second moment (Π_t does not depend on the gradients: read as recorded)."""
        return ("exp_avg_sq",)

    def step_map(self, step, w, state, G, frozen=False):
        """m_s, v_s from G_s, then w_s+1 = w_s − η λ' w_s − η (a_t G_s + b_t m_s) / root(v_s).

        Where the step skipped a parameter nothing moves. ``frozen`` holds v_s at the value
        G_s gives it, without its dependence on G_s.
        """
        m, v = state
        m = self._moment_after(step, m, G)
        v = self._second_moment(step, v, G, frozen)
        a, b, bias2 = self._coefficients(step)
        root = safe_sqrt(v / bias2) + self.vec.hyper(step, "eps")
        update = self._eta(step) * (a * G + b * m) / root
        return w - self._decay(step, w) - update, (m, v)
