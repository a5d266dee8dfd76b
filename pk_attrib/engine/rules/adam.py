"""Adam and AdamW (amsgrad, maximize), with the second moments the recorder kept.

With the recorded second moment v_s (and step count) fixed, Adam's step is linear in its first
moment m_s = β1 m_{s−1} + (1 − β1) G_s: Δ_s = −η_s D_s m_s with
D_s = 1 / ((1 − β1^t)(sqrt(v_s / (1 − β2^t)) + ε)); AdamW's decoupled decay −η_s λ w_s is a
non-example term.
"""

from __future__ import annotations

import math

import torch

from ...exceptions import UnsupportedError
from ...record.path import Step
from .base import Hyper, Rule


class AdamRule(Rule):
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
    }

    def __init__(self, path, vectors, names, kind):
        super().__init__(path, vectors, names, kind)
        self.decoupled = kind == "adamw"
        self._denominators: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def coupled_decay(self, step):
        """Adam's L2 weight decay enters G; AdamW's decoupled decay does not."""
        lam = self.vec.hyper(step, "weight_decay")
        return torch.zeros_like(lam) if self.decoupled else lam

    def _denominator(self, step: Step, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_s, β1 carried) of `_build_denominator`, kept for the last two steps asked for.

        A step's sweep, its check and the check of the step after it each need them.
        """
        found = self._denominators.get(step.index)
        if found is None:
            found = self._build_denominator(step, names)
            self._denominators[step.index] = found
            if len(self._denominators) > 2:
                del self._denominators[next(iter(self._denominators))]
        return found

    def _build_denominator(self, step: Step, names: list[str]):
        """D_s = 1 / ((1 − β1^t)(sqrt(v_s / (1 − β2^t)) + ε)), elementwise (d,).

        v_s is ``max_exp_avg_sq`` for the param groups with amsgrad, ``exp_avg_sq`` otherwise.
        """
        state = step.optimizer_state
        amsgrad = [bool(h.get("amsgrad", False)) for h in step.hyper]
        keys = {
            n: "max_exp_avg_sq" if amsgrad[self.vec.group_of.get(n, 0)] else "exp_avg_sq"
            for n in names
        }
        absent = {
            n for n in names if n not in state.get(keys[n], {}) or n not in state.get("step", {})
        }
        missing = sorted(
            {k for n, k in keys.items() if n in absent - step.skipped and n not in state.get(k, {})}
        )
        if missing or absent - step.skipped:
            raise UnsupportedError(
                f"step {step.index} has no recorded Adam state ({', '.join(missing or ['step'])}"
                "): the exact Adam rule needs a path recorded by PathRecorder; use "
                "mode='checkpoint'"
            )
        dtype, device = self.vec.dtype, self.vec.device
        shapes = self.path.param_shapes
        # a skipped parameter that never had a gradient has no state yet; η_s = 0 there
        v = torch.cat(
            [
                torch.ones(shapes[n].numel()) if n in absent else state[keys[n]][n].reshape(-1)
                for n in names
            ]
        ).to(device, dtype)
        t = torch.cat(
            [
                torch.ones(shapes[n].numel())
                if n in absent
                else state["step"][n].reshape(1).expand(shapes[n].numel())
                for n in names
            ]
        ).to(device, dtype)
        beta1 = self._beta1(step)
        beta2 = self.vec.vec([float(h["betas"][1]) for h in step.hyper])
        eps = self.vec.hyper(step, "eps")
        D = 1.0 / ((1.0 - beta1**t) * (torch.sqrt(v / (1.0 - beta2**t)) + eps))
        return D, self._beta1(step, carried=True)

    def _beta1(self, step: Step, carried: bool = False) -> torch.Tensor:
        """β1 per coordinate; ``carried``: 1 where the step skipped the parameter."""
        beta1 = self.vec.vec([float(h["betas"][0]) for h in step.hyper])
        skip = self._mask(step.skipped) if carried else None
        return beta1 if skip is None else torch.where(skip, 1.0, beta1)

    def begin(self, s, step, phi, w):
        """v_s = (1 − β1) u_s; u_s = η_s D_s φ_s + β1 u_{s+1}; AdamW decay as extra term.

        Where the step skipped a parameter, β1 reads 1 (its moment is carried unchanged).
        """
        eta = self._eta(step)
        D, beta1 = self._denominator(step, self._names)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        if self._carry is not None and not next_fresh:  # in place: the carry is ours alone
            u = self._carry.mul_(self._carry_factor).addcmul_(phi, eta * D)
        else:
            u = (eta * D) * phi
        self._carry, self._carry_factor = u, beta1
        extra = None
        if self.decoupled:
            lam = self.vec.hyper(step, "weight_decay")
            extra = -(phi @ (eta * lam * w))
        return (1.0 - beta1) * u, extra

    STATE_KEY = "exp_avg"

    def recover(self, step, delta, G, w):
        """The first moment m_s from Δ_s = −η_s λ w_s − η_s D_s m_s (NaN where η_s D_s = 0)."""
        eta = self._eta(step)
        D, _ = self._denominator(step, self._names)
        moved = delta + (eta * self.vec.hyper(step, "weight_decay") * w if self.decoupled else 0.0)
        scale = eta * D
        return torch.where(scale != 0, -moved / torch.where(scale != 0, scale, 1.0), math.nan)

    def recovery_uncertainty(self, step, floor):
        """How far the recovered first moment can be off from the rounding ``floor`` of Δ_s."""
        D, _ = self._denominator(step, self._names)
        scale = (self._eta(step) * D).abs()
        return torch.where(scale != 0, floor / torch.where(scale != 0, scale, 1.0), 0.0)

    def carry_uncertainty(self, step, unc):
        """The uncertainty of m_s from that of m_{s−1} (scaled by β1, 1 where skipped)."""
        return self._beta1(step, carried=True).abs() * unc

    def prediction_uncertainty(self, step, unc):
        """How far Δ̂_s = −η_s D_s (β1 m_{s−1} + ...) moves with m_{s−1} off by ``unc``."""
        D, beta1 = self._denominator(step, self._names)
        return (self._eta(step) * D * beta1).abs() * unc

    def advance(self, step, prev, G, w):
        """m̂_s = β1 m_{s−1} + (1 − β1) G_s ((1 − β1) G_s for a fresh first moment)."""
        beta1 = self._beta1(step, carried=True)
        return (1.0 - beta1) * G if prev is None else beta1 * prev + (1.0 - beta1) * G

    def predict(self, step, prev, G, w):
        """Δ̂_s from m̂_s = β1 m_{s−1} + (1 − β1) G_s."""
        eta = self._eta(step)
        D, _ = self._denominator(step, self._names)
        m = self.advance(step, prev, G, w)
        decay = eta * self.vec.hyper(step, "weight_decay") * w if self.decoupled else 0.0
        return torch.where(eta != 0, -decay - eta * D * m, 0.0)

    # -- counterfactual scores ---------------------------------------------------------------

    def counterfactual_state(self) -> int:
        """Two state tensors (m and v), three (and v_max) when a param group uses amsgrad."""
        groups = (self.path.optimizer or {}).get("groups", [])
        return 3 if any(g["hyper"].get("amsgrad", False) for g in groups) else 2

    def _flat_state(self, found: dict[str, torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """(d,): the named tensors, ``fill`` for a parameter that has none."""
        shapes = self.path.param_shapes
        parts = [
            found[n].reshape(-1) if n in found else torch.full((shapes[n].numel(),), fill)
            for n in self._names
        ]
        return torch.cat(parts).to(self.vec.device, self.vec.dtype)

    def step_map(self, step, w, state, G, frozen=False):
        """Adam's update: m, v (and v_max) from G_s, then w_s+1 = w_s − η λ w_s − η m̂/(√v̂ + ε).

        Where the step skipped a parameter its β's read 1 and η 0: nothing moves. ``frozen``
        holds the second moment at the value G_s gives it, without its dependence on G_s.
        """
        eta = self._eta(step)
        beta1 = self._beta1(step, carried=True)
        beta2 = self.vec.vec([float(h["betas"][1]) for h in step.hyper])
        skip = self._mask(step.skipped)
        carried2 = beta2 if skip is None else torch.where(skip, 1.0, beta2)
        t = self._flat_state(
            {n: c.reshape(1).expand(self.path.param_shapes[n].numel()) for n, c in
             step.optimizer_state.get("step", {}).items()},
            fill=1.0,
        )  # fmt: skip
        m, v, *rest = state
        m = beta1 * m + (1.0 - beta1) * G
        g2 = G.detach() if frozen else G
        v = carried2 * v + (1.0 - carried2) * g2 * g2
        after = (m, v)
        second = v
        if rest:
            amsgrad = self.vec.vec([float(bool(h.get("amsgrad", False))) for h in step.hyper])
            biggest = torch.maximum(rest[0], v)
            after = (m, v, biggest)
            second = torch.where(amsgrad.bool(), biggest, v)
        scaled = second / (1.0 - beta2**t)
        positive = scaled > 0  # (√ has no derivative at 0; m is 0 wherever v is)
        root = torch.where(positive, torch.sqrt(torch.where(positive, scaled, 1.0)), 0.0)
        step_size = eta / (1.0 - self._beta1(step) ** t)
        update = step_size * m / (root + self.vec.hyper(step, "eps"))
        decay = eta * self.vec.hyper(step, "weight_decay") * w if self.decoupled else 0.0
        return w - decay - update, after

    def state_point(self, step, previous, w, delta, G):
        """The state (m, v[, v_max]) before the step.

        v and v_max as recorded after the step before (or before the recording; zeros for a
        fresh state); m from the recorded Δ_s, which shows m_s = β1 m + (1 − β1) G_s.
        """
        if step.fresh_state:
            found = {}
        elif previous is not None:
            found = previous.optimizer_state
        else:
            found = step.initial_state
        v = self._flat_state(found.get("exp_avg_sq", {}))
        point = [None, v]
        if self.counterfactual_state() == 3:
            point.append(self._flat_state(found.get("max_exp_avg_sq", {})))
        m_after = self.recover(step, delta, G, w).nan_to_num(nan=0.0)  # NaN: η_s D_s = 0
        beta1 = self._beta1(step, carried=True)
        moves = beta1 != 0
        m = torch.where(moves, (m_after - (1.0 - beta1) * G) / torch.where(moves, beta1, 1.0), 0.0)
        point[0] = m
        return tuple(point)
