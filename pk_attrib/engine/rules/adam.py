"""Adam and AdamW (amsgrad, maximize), with the second moments the recorder kept.

With the recorded second moment v_s (and step count t) fixed, Adam's step is linear in its
first moment: Δ_s = −η_s D_s m_s with D_s = 1 / ((1 − β1^t)(sqrt(v_s / (1 − β2^t)) + ε))
(`moments.FirstMomentRule`); AdamW's decoupled decay −η_s λ w_s is a non-example term.
"""

from __future__ import annotations

import torch

from ...record.path import Step
from .base import Hyper
from .moments import FirstMomentRule, safe_sqrt


class AdamRule(FirstMomentRule):
    """Adam and AdamW (amsgrad and maximize too), with the recorded second moments."""

    KINDS = ("adam", "adamw")
    OPTIONS = frozenset(
        {"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"}
    )
    HYPER = {
        "betas": Hyper("betas", required=True),
        "eps": Hyper("number", required=True),
        "weight_decay": Hyper("number"),
        "amsgrad": Hyper("flag"),
        "maximize": Hyper("flag"),
        "decoupled_weight_decay": Hyper("flag"),
    }

    def _build_denominator(self, step: Step):
        """D_s = 1 / ((1 − β1^t)(sqrt(v_s / (1 − β2^t)) + ε)), elementwise (d,).

        v_s is ``max_exp_avg_sq`` for the param groups with amsgrad, ``exp_avg_sq`` otherwise.
        """
        amsgrad = [bool(h.get("amsgrad", False)) for h in step.hyper]
        group_of = self.vec.group_of
        v = self._recorded(
            step, lambda n: "max_exp_avg_sq" if amsgrad[group_of.get(n, 0)] else "exp_avg_sq"
        )
        t = self._steps(step)
        beta1, beta2 = self._beta(step, 0), self._beta(step, 1)
        eps = self.vec.hyper(step, "eps")
        return 1.0 / ((1.0 - beta1**t) * (torch.sqrt(v / (1.0 - beta2**t)) + eps)), None

    # -- counterfactual scores ---------------------------------------------------------------

    def _moments(self) -> tuple[str, ...]:
        """v, and v_max when a param group uses amsgrad."""
        groups = (self.path.optimizer or {}).get("groups", [])
        if any(g["hyper"].get("amsgrad", False) for g in groups):
            return ("exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg_sq",)

    def step_map(self, step, w, state, G, frozen=False):
        """Adam's update: m, v (and v_max) from G_s, then w_s+1 = w_s − η λ w_s − η m̂/(√v̂ + ε).

        Where the step skipped a parameter its β's read 1 and η 0: nothing moves. ``frozen``
        holds the second moment at the value G_s gives it, without its dependence on G_s.
        """
        eta = self._eta(step)
        t = self._steps(step)
        m, v, *rest = state
        m = self._moment_after(step, m, G)
        v = self._second_moment(step, v, G, frozen)
        after = (m, v)
        second = v
        if rest:
            amsgrad = self.vec.vec([float(bool(h.get("amsgrad", False))) for h in step.hyper])
            biggest = torch.maximum(rest[0], v)
            after = (m, v, biggest)
            second = torch.where(amsgrad.bool(), biggest, v)
        root = safe_sqrt(second / (1.0 - self._beta(step, 1) ** t))
        step_size = eta / (1.0 - self._beta1(step) ** t)
        update = step_size * m / (root + self.vec.hyper(step, "eps"))
        return w - self._decay(step, w) - update, after
