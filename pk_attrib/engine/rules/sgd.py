"""SGD: momentum, dampening, nesterov, weight decay and maximize (PyTorch's convention).

The momentum buffer b_s = μ b_{s−1} + (1 − dampening) G_s (started at G_s) moves the weights by
Δ_s = −η_s b_s, or −η_s (G_s + μ b_s) with nesterov; the adjoint of the buffer carries the query
side backwards by μ a step.
"""

from __future__ import annotations

import math

import torch

from ...record.path import Step
from .base import Hyper, Rule


class SGDRule(Rule):
    """SGD with momentum, dampening, nesterov, weight decay and maximize (PyTorch convention)."""

    KINDS = ("sgd",)
    OPTIONS = frozenset({"momentum", "dampening", "nesterov", "weight_decay", "maximize"})
    HYPER = {
        "momentum": Hyper("number"),
        "dampening": Hyper("number"),
        "weight_decay": Hyper("number"),
        "nesterov": Hyper("flag"),
        "maximize": Hyper("flag"),
    }

    _terms_of: tuple | None = None  # (step index, its terms): the last step asked for
    _has_buffer: bool | None = None  # whether any step uses momentum (counterfactual scores)

    def memoryless(self, step: Step) -> bool:
        """Plain SGD (no momentum in any group) keeps no state between steps."""
        return all(float(h.get("momentum", 0.0)) == 0.0 for h in step.hyper)

    def _terms(self, step: Step):
        """(η, μ, d, nesterov, c, moving) per coordinate at this step.

        ``moving``: the momentum buffer takes this step's gradient (μ ≠ 0 and not skipped;
        PyTorch leaves the buffer untouched at a step with μ = 0 and resumes from it later).
        d = 1 − dampening where it moves, 1 where the buffer starts here (PyTorch starts it at
        the gradient), 0 where it does not move. c scales the buffer before the step into the
        one after it: μ where it moves, 0 where it starts, 1 where it is carried unchanged.
        """
        if self._terms_of is not None and self._terms_of[0] == step.index:  # ~9 calls a step
            return self._terms_of[1]
        terms = self._build_terms(step)
        self._terms_of = (step.index, terms)
        return terms

    def _build_terms(self, step: Step):
        eta = self._eta(step)
        mu = self.vec.hyper(step, "momentum")
        damp = 1.0 - self.vec.hyper(step, "dampening")
        nesterov = self.vec.hyper(step, "nesterov", False)
        moving = mu != 0
        skip = self._mask(step.skipped)
        if skip is not None:
            moving = moving & ~skip
        carry = torch.where(moving, mu, 1.0)
        starts = moving if step.fresh_state else self._mask(step.fresh_params)
        if starts is not None:
            damp = torch.where(starts, 1.0, damp)
            carry = torch.where(starts & moving, 0.0, carry)
        damp = torch.where(moving, damp, 0.0)
        return eta, mu, damp, nesterov, carry, moving

    def plain_scale(self, step):
        """η_s where no buffer moves at step s and none is carried into it (plain SGD)."""
        return self._plain(step, self._terms(step))

    def _plain(self, step, terms):
        """`plain_scale` from the step's `_terms`; begins the step when it returns η_s."""
        eta, _, _, _, carry, moving = terms
        pending = self._carry if not self._next_fresh else None
        if pending is not None or bool(moving.any()):
            return None
        self._next_fresh = step.fresh_state
        self._carry, self._carry_factor = None, carry
        return eta

    def begin(self, s, step, phi, w):
        """v_s = d_s u_s (+ η_s φ_s with nesterov); u_s = η_s c_s φ_s + μ_{s+1} u_{s+1}."""
        terms = self._terms(step)
        eta = self._plain(step, terms)
        if eta is not None:  # plain SGD: no state to carry
            return eta * phi, None
        eta, mu, damp, nesterov, carry, moving = terms
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        pending = self._carry if not next_fresh else None
        if all(t.dim() == 0 for t in terms) and (
            pending is None or torch.as_tensor(self._carry_factor).dim() == 0
        ):  # one value for every coordinate: the same sums as below, with scalars
            return self._begin_scalar(phi, pending, *(t.item() for t in terms)), None
        # u_s: adjoint of the buffer b_s = μ_s b_{s−1} + d_s G_s, used by P_s = b_s or G_s + μ_s b_s
        direct = torch.where(nesterov.bool(), mu, torch.ones_like(mu))
        u = torch.where(moving, eta * direct * phi, 0.0)
        if pending is not None:
            u = u + self._carry_factor * pending
        self._carry, self._carry_factor = u, carry
        v = damp * u + nesterov * eta * phi
        return torch.where(moving, v, eta * phi), None

    def _begin_scalar(self, phi, pending, eta, mu, damp, nesterov, carry, moving):
        """`begin` where every hyper-parameter is one number: two passes over (n, d).

        u_s = η_s c_s φ_s (where the buffer moves) + μ_{s+1} u_{s+1}, kept for step s − 1;
        v_s = d_s u_s + [nesterov] η_s φ_s where it moves, η_s φ_s where it does not.
        """
        direct = mu if nesterov else 1.0
        u = phi * (eta * direct) if moving else None
        if pending is not None:
            factor = float(self._carry_factor)
            u = pending * factor if u is None else u.add_(pending, alpha=factor)
        if u is None:
            u = torch.zeros_like(phi)
        self._carry, self._carry_factor = u, torch.tensor(carry, dtype=phi.dtype, device=phi.device)
        if not moving:
            return phi * eta
        if nesterov:
            return torch.add(u * damp, phi, alpha=eta)
        return u if damp == 1.0 else u * damp  # (u is not changed in place later)

    STATE_KEY = "momentum_buffer"

    def uses_state(self, step: Step) -> torch.Tensor:
        """Where Δ_s depends on the buffer before the step: where the buffer moves."""
        return self._terms(step)[5]

    def passes_through(self, step: Step) -> bool:
        """A step where no buffer moves (momentum 0, or skipped) carries them unchanged."""
        return not bool(self._terms(step)[5].any())

    def recover(self, step, delta, G, w):
        """The momentum buffer b_s from Δ_s = −η_s P_s (NaN where Δ_s does not show it)."""
        eta, mu, _, nesterov, _, moving = self._terms(step)
        p = torch.where(eta != 0, -delta / torch.where(eta != 0, eta, 1.0), math.nan)
        safe_mu = torch.where(mu != 0, mu, 1.0)
        buffer = torch.where(nesterov.bool(), (p - G) / safe_mu, p)
        return torch.where(moving, buffer, math.nan)

    def recovery_uncertainty(self, step, floor):
        """How far the recovered buffer can be off from the rounding ``floor`` of Δ_s."""
        eta, mu, _, nesterov, _, moving = self._terms(step)
        scale = (eta * torch.where(nesterov.bool(), mu, 1.0)).abs()
        known = moving & (scale != 0)
        return torch.where(known, floor / torch.where(known, scale, 1.0), 0.0)

    def carry_uncertainty(self, step, unc):
        """The uncertainty of the buffer after the step, from the one before it."""
        return self._terms(step)[4].abs() * unc

    def prediction_uncertainty(self, step, unc):
        """How far Δ̂_s can move with the buffer before the step off by ``unc``."""
        eta, mu, _, nesterov, carry, moving = self._terms(step)
        sensitivity = (eta * carry * torch.where(nesterov.bool(), mu, 1.0)).abs()
        return torch.where(moving, sensitivity * unc, 0.0)

    def advance(self, step, prev, G, w):
        """b̂_s = c_s b_{s−1} + d_s G_s (d_s G_s for a fresh buffer)."""
        _, _, damp, _, carry, _ = self._terms(step)
        if prev is None:
            return damp * G
        return torch.where(carry == 0, 0.0, carry * prev) + damp * G

    def predict(self, step, prev, G, w):
        """Δ̂_s = −η_s P̂_s with b̂_s = μ_s b_{s−1} + d_s G_s."""
        eta, mu, _, nesterov, _, moving = self._terms(step)
        if prev is None and eta.dim() == 0 and not bool(moving.any()):  # no buffer: −η G
            return G * -eta  # (one (d,) vector)
        buffer = self.advance(step, prev, G, w)
        update = torch.where(nesterov.bool(), G + mu * buffer, buffer)
        return torch.where(eta != 0, -eta * torch.where(moving, update, G), 0.0)

    # -- counterfactual scores ---------------------------------------------------------------

    def counterfactual_state(self) -> int:
        """One momentum buffer when any step of the path uses momentum, else none."""
        if self._has_buffer is None:
            self._has_buffer = not all(self.memoryless(step) for step in self.path)
        return int(self._has_buffer)

    def step_map(self, step, w, state, G, frozen=False):
        """w_s+1 = w_s − η_s P_s; b_s = c_s b_s−1 + d_s G_s; P_s = b_s, G_s + μ b_s or G_s."""
        eta, mu, damp, nesterov, carry, moving = self._terms(step)
        if not state:
            return w - eta * G, ()
        (before,) = state
        buffer = carry * before + damp * G
        update = torch.where(moving, torch.where(nesterov.bool(), G + mu * buffer, buffer), G)
        return w - eta * update, (buffer,)

    def state_point(self, step, previous, w, delta, G):
        """SGD's step is linear in its state: any point will do (zeros)."""
        return tuple(torch.zeros_like(w) for _ in range(self.counterfactual_state()))
