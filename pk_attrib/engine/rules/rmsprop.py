"""RMSprop: momentum, centered, weight decay and maximize (PyTorch's convention).

RMSprop divides G_s by a_s = sqrt(q_s) + ε, with q_s = r_s (``square_avg``, an average of G²) or,
centered, r_s − ḡ_s² (``grad_avg`` ḡ_s, an average of G): not linear in G_s, but recorded
after every step. Held at its recorded value D_s = 1 / a_s, the step is linear in G_s:

    Δ_s = −η_s D_s G_s                                without momentum,
    Δ_s = −η_s b_s,  b_s = μ b_{s−1} + D_s G_s       with momentum μ (b starts at 0).

The adjoint of the buffer carries the query side backwards by μ a step, as SGD's does, and
D_s scales it at the step that made the gradient: v_s = D_s u_s with u_s = η_s φ_s + μ u_{s+1}
(v_s = η_s D_s φ_s without momentum).
"""

from __future__ import annotations

import math

import torch

from ...record.path import Step
from .base import Hyper, Rule
from .moments import safe_sqrt


class RMSpropRule(Rule):
    """RMSprop with momentum, centered, weight decay and maximize (PyTorch convention)."""

    KINDS = ("rmsprop",)
    OPTIONS = frozenset({"alpha", "eps", "momentum", "centered", "weight_decay", "maximize"})
    HYPER = {
        "alpha": Hyper("number", required=True),
        "eps": Hyper("number", required=True),
        "momentum": Hyper("number"),
        "centered": Hyper("flag"),
        "weight_decay": Hyper("number"),
        "maximize": Hyper("flag"),
    }
    STATE_KEY = "momentum_buffer"

    _terms_of: tuple | None = None  # (step index, its terms): the last step asked for
    _layout: tuple[bool, bool] | None = None  # (any group centered, any momentum): all steps

    def memoryless(self, step: Step) -> bool:
        """Without momentum in any group RMSprop carries nothing Δ depends on linearly."""
        return all(float(h.get("momentum", 0.0)) == 0.0 for h in step.hyper)

    def _centered(self, step: Step) -> list[bool]:
        return [bool(h.get("centered", False)) for h in step.hyper]

    def _terms(self, step: Step):
        """(η, D, carry, moving) per coordinate at this step (~9 calls a step: kept).

        ``moving``: the momentum buffer takes this step's gradient (μ ≠ 0 and not skipped;
        PyTorch leaves the buffer untouched at a step with μ = 0). ``carry`` scales the
        buffer before the step into the one after it: μ where it moves, 1 elsewhere.
        """
        if self._terms_of is not None and self._terms_of[0] == step.index:
            return self._terms_of[1]
        eta = self._eta(step)
        mu = self.vec.hyper(step, "momentum")
        moving = mu != 0
        skip = self._mask(step.skipped)
        if skip is not None:
            moving = moving & ~skip
        terms = (eta, self._denominator(step), torch.where(moving, mu, 1.0), moving)
        self._terms_of = (step.index, terms)
        return terms

    def _denominator(self, step: Step) -> torch.Tensor:
        """D_s = 1 / (sqrt(r_s [− ḡ_s²]) + ε) from the recorded averages, (d,)."""
        square = self._recorded(step, "square_avg")
        centered = self._centered(step)
        if any(centered):  # (the other groups read square_avg in its place, unused)
            group_of = self.vec.group_of
            mean = self._recorded(
                step, lambda n: "grad_avg" if centered[group_of.get(n, 0)] else "square_avg"
            )
            square = square - torch.where(self.vec.vec(centered).bool(), mean * mean, 0.0)
        return 1.0 / (torch.sqrt(square) + self.vec.hyper(step, "eps"))

    def begin(self, s, step, phi, w):
        """v_s = D_s u_s where the buffer moves, η_s D_s φ_s elsewhere.

        u_s = η_s φ_s + μ_{s+1} u_{s+1} is the adjoint of the buffer b_s.
        """
        eta, D, carry, moving = self._terms(step)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        pending = self._carry if not next_fresh else None
        if pending is None and not bool(moving.any()):  # no momentum: no state to carry
            self._carry, self._carry_factor = None, carry
            return (eta * D) * phi, None
        u = torch.where(moving, eta * phi, 0.0)
        if pending is not None:
            u = u + self._carry_factor * pending
        self._carry, self._carry_factor = u, carry
        return D * torch.where(moving, u, eta * phi), None

    # -- the step check ---------------------------------------------------------------------

    def uses_state(self, step: Step) -> torch.Tensor:
        """Where Δ_s depends on the buffer before the step: where the buffer moves."""
        return self._terms(step)[3]

    def passes_through(self, step: Step) -> bool:
        """A step where no buffer moves (momentum 0, or skipped) carries them unchanged."""
        return not bool(self._terms(step)[3].any())

    def recover(self, step, delta, G, w):
        """The momentum buffer b_s from Δ_s = −η_s b_s (NaN where Δ_s does not show it)."""
        eta, _, _, moving = self._terms(step)
        known = moving & (eta != 0)
        return torch.where(known, -delta / torch.where(known, eta, 1.0), math.nan)

    def recovery_uncertainty(self, step, floor):
        """How far the recovered buffer can be off from the rounding ``floor`` of Δ_s."""
        eta, _, _, moving = self._terms(step)
        known = moving & (eta != 0)
        return torch.where(known, floor / torch.where(known, eta.abs(), 1.0), 0.0)

    def carry_uncertainty(self, step, unc):
        """The uncertainty of the buffer after the step, from the one before it."""
        return self._terms(step)[2].abs() * unc

    def prediction_uncertainty(self, step, unc):
        """How far Δ̂_s can move with the buffer before the step off by ``unc``."""
        eta, _, carry, moving = self._terms(step)
        return torch.where(moving, (eta * carry).abs() * unc, 0.0)

    def advance(self, step, prev, G, w):
        """b̂_s = μ_s b_{s−1} + D_s G_s (D_s G_s for a fresh buffer, which starts at 0)."""
        _, D, carry, moving = self._terms(step)
        fresh = torch.where(moving, D * G, 0.0)
        return fresh if prev is None else carry * prev + fresh

    def predict(self, step, prev, G, w):
        """Δ̂_s = −η_s b̂_s where the buffer moves, −η_s D_s G_s elsewhere."""
        eta, D, _, moving = self._terms(step)
        update = torch.where(moving, self.advance(step, prev, G, w), D * G)
        return torch.where(eta != 0, -eta * update, 0.0)

    # -- counterfactual scores ---------------------------------------------------------------

    def _state_layout(self) -> tuple[bool, bool]:
        """(whether any step is centered, whether any uses momentum)."""
        if self._layout is None:
            steps = list(self.path)
            self._layout = (
                any(any(self._centered(step)) for step in steps),
                not all(self.memoryless(step) for step in steps),
            )
        return self._layout

    def counterfactual_state(self) -> int:
        """The state tensors: r (square_avg), ḡ (grad_avg) if centered, b with momentum."""
        centered, momentum = self._state_layout()
        return 1 + int(centered) + int(momentum)

    def step_map(self, step, w, state, G, frozen=False):
        """r_s, ḡ_s from G_s, D_s from them, then the buffer and w_s+1 = w_s − η_s (b_s or D_s G_s).

        Where the step skipped a parameter nothing moves. ``frozen`` holds D_s at the value
        G_s gives it, without its dependence on G_s.
        """
        eta, _, carry, moving = self._terms(step)
        centered, momentum = self._state_layout()
        square, *rest = state
        skip = self._mask(step.skipped)
        alpha = self.vec.hyper(step, "alpha")
        alpha = alpha if skip is None else torch.where(skip, 1.0, alpha)
        g = G.detach() if frozen else G
        square = alpha * square + (1.0 - alpha) * g * g
        after, variance = [square], square
        if centered:
            mean = alpha * rest.pop(0) + (1.0 - alpha) * g
            on = self.vec.vec(self._centered(step)).bool()
            variance = square - torch.where(on, mean * mean, 0.0)
            after.append(mean)
        scaled = G / (safe_sqrt(variance) + self.vec.hyper(step, "eps"))
        update = scaled
        if momentum:
            buffer = carry * rest.pop(0) + torch.where(moving, scaled, 0.0)
            update = torch.where(moving, buffer, scaled)
            after.append(buffer)
        return w - eta * update, tuple(after)

    def state_point(self, step, previous, w, delta, G):
        """The state (r, [ḡ], [b]) before the step.

        The averages as recorded after the step before (or before the recording; zeros for a
        fresh state); the buffer enters the step linearly, so any value does (zeros).
        """
        found = self._state_before(step, previous)
        centered, momentum = self._state_layout()
        point = [self._flat_state(found.get("square_avg", {}))]
        if centered:
            point.append(self._flat_state(found.get("grad_avg", {})))
        if momentum:
            point.append(torch.zeros_like(w))
        return tuple(point)
