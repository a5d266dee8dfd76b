"""Optimizers with a first moment and a recorded denominator: Adam, AdamW, Adamax, NAdam, RAdam.

Each keeps a first moment m_s = β1 m_{s−1} + (1 − β1) G_s and moves the weights by

    Δ_s = −η_s (Dm_s ⊙ m_s + Dg_s ⊙ G_s) − η_s λ' w_s,

where Dm_s and Dg_s are fixed by what the recorder kept after the step (second moments,
Adamax's infinity norm, step counts, NAdam's momentum product) and λ' is the decoupled weight
decay (AdamW; NAdam and RAdam with ``decoupled_weight_decay``). What the step divides by
depends on G_s (v_s holds G_s², Adamax's norm |G_s|), but held at its recorded value the step
is linear in m_s and G_s, and so in the gradients: the decomposition is exact. Each
optimizer's module says what Dm_s and Dg_s are (Dg_s = 0 but for NAdam); the adjoint is the
same for all, walking backwards:

    u_s = η_s Dm_s ⊙ φ_s + β1 u_{s+1},     v_s = (1 − β1) u_s + η_s Dg_s ⊙ φ_s,

and the decoupled decay adds the non-example term −η_s λ' φ_s · w_s.
"""

from __future__ import annotations

import math

import torch

from ...record.path import Step
from .base import Rule


def is_zero(x) -> bool:
    """Whether ``x`` is the number 0 (a 0-dim tensor: the same in every param group)."""
    return not isinstance(x, torch.Tensor) or (x.dim() == 0 and float(x) == 0.0)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x), with derivative 0 (not inf) where x is 0 (the moment is 0 there too)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


class FirstMomentRule(Rule):
    """Base of the first-moment optimizers: the adjoint and step check of Δ_s above.

    Subclasses give `_build_denominator` (Dm_s, Dg_s) and, for counterfactual scores,
    `_moments` and `step_map`.
    """

    STATE_KEY = "exp_avg"

    def __init__(self, path, vectors, names, kind):
        super().__init__(path, vectors, names, kind)
        self._denominators: dict[int, tuple] = {}

    # -- the step's coefficients ------------------------------------------------------------

    def _decoupled(self, step: Step) -> torch.Tensor:
        """1 where the weight decay is decoupled (not part of G_s), 0 where it is coupled.

        Per param group ``decoupled_weight_decay`` (AdamW's groups without the key: 1).
        """
        default = self.kind == "adamw"
        return self.vec.vec(
            [float(bool(h.get("decoupled_weight_decay", default))) for h in step.hyper]
        )

    def coupled_decay(self, step):
        """λ of the coupled weight decay (zero where it is decoupled)."""
        return self.vec.hyper(step, "weight_decay") * (1.0 - self._decoupled(step))

    def _decoupled_decay(self, step: Step) -> torch.Tensor:
        """λ' of the decoupled weight decay −η_s λ' w_s (zero where it is coupled)."""
        return self.vec.hyper(step, "weight_decay") * self._decoupled(step)

    def _denominator(self, step: Step) -> tuple:
        """(Dm_s, Dg_s or None, β1 carried), kept for the last two steps asked for.

        A step's sweep, its check and the check of the step after it each need them.
        """
        found = self._denominators.get(step.index)
        if found is None:
            found = (*self._build_denominator(step), self._beta1(step, carried=True))
            self._denominators[step.index] = found
            if len(self._denominators) > 2:
                del self._denominators[next(iter(self._denominators))]
        return found

    def _build_denominator(self, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Dm_s, Dg_s) per coordinate, (d,) each (Dg_s None where the step has no G_s term)."""
        raise NotImplementedError

    def _beta(self, step: Step, which: int, carried: bool = False) -> torch.Tensor:
        """β1 (which=0) or β2 per coordinate; ``carried``: 1 where the step skipped it."""
        beta = self.vec.vec([float(h["betas"][which]) for h in step.hyper])
        skip = self._mask(step.skipped) if carried else None
        return beta if skip is None else torch.where(skip, 1.0, beta)

    def _beta1(self, step: Step, carried: bool = False) -> torch.Tensor:
        """β1 per coordinate; ``carried``: 1 where the step skipped the parameter."""
        return self._beta(step, 0, carried)

    # -- the adjoint ------------------------------------------------------------------------

    def begin(self, s, step, phi, w):
        """v_s = (1 − β1) u_s + η_s Dg_s φ_s; u_s = η_s Dm_s φ_s + β1 u_{s+1}; decoupled decay.

        Where the step skipped a parameter, β1 reads 1 (its moment is carried unchanged).
        """
        eta = self._eta(step)
        Dm, Dg, beta1 = self._denominator(step)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        if self._carry is not None and not next_fresh:  # in place: the carry is ours alone
            u = self._carry.mul_(self._carry_factor).addcmul_(phi, eta * Dm)
        else:
            u = (eta * Dm) * phi
        self._carry, self._carry_factor = u, beta1
        v = (1.0 - beta1) * u
        if Dg is not None:
            v.addcmul_(phi, eta * Dg)
        lam = self._decoupled_decay(step)
        extra = None if is_zero(lam) else -(phi @ (eta * lam * w))
        return v, extra

    # -- the step check ---------------------------------------------------------------------

    def _direct(self, step: Step, G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """What moves w_s besides the first moment: η_s (λ' w_s + Dg_s G_s)."""
        eta = self._eta(step)
        _, Dg, _ = self._denominator(step)
        lam = self._decoupled_decay(step)
        out = 0.0 if is_zero(lam) else eta * lam * w
        return out if Dg is None else out + eta * Dg * G

    def recover(self, step, delta, G, w):
        """m_s from Δ_s = −η_s Dm_s m_s − η_s (λ' w_s + Dg_s G_s) (NaN where η_s Dm_s = 0)."""
        Dm, _, _ = self._denominator(step)
        moved = delta + self._direct(step, G, w)
        scale = self._eta(step) * Dm
        return torch.where(scale != 0, -moved / torch.where(scale != 0, scale, 1.0), math.nan)

    def recovery_uncertainty(self, step, floor):
        """How far the recovered first moment can be off from the rounding ``floor`` of Δ_s."""
        Dm, _, _ = self._denominator(step)
        scale = (self._eta(step) * Dm).abs()
        return torch.where(scale != 0, floor / torch.where(scale != 0, scale, 1.0), 0.0)

    def carry_uncertainty(self, step, unc):
        """The uncertainty of m_s from that of m_{s−1} (scaled by β1, 1 where skipped)."""
        return self._beta1(step, carried=True).abs() * unc

    def prediction_uncertainty(self, step, unc):
        """How far Δ̂_s moves with m_{s−1} off by ``unc`` (η_s Dm_s β1 unc)."""
        Dm, _, beta1 = self._denominator(step)
        return (self._eta(step) * Dm * beta1).abs() * unc

    def advance(self, step, prev, G, w):
        """m̂_s = β1 m_{s−1} + (1 − β1) G_s ((1 − β1) G_s for a fresh first moment)."""
        beta1 = self._beta1(step, carried=True)
        return (1.0 - beta1) * G if prev is None else beta1 * prev + (1.0 - beta1) * G

    def predict(self, step, prev, G, w):
        """Δ̂_s from m̂_s = β1 m_{s−1} + (1 − β1) G_s."""
        eta = self._eta(step)
        Dm, _, _ = self._denominator(step)
        m = self.advance(step, prev, G, w)
        return torch.where(eta != 0, -self._direct(step, G, w) - eta * Dm * m, 0.0)

    # -- counterfactual scores ---------------------------------------------------------------

    def _moments(self) -> tuple[str, ...]:
        """The state keys `step_map` carries after the first moment (``("exp_avg_sq",)``)."""
        raise NotImplementedError

    def counterfactual_state(self) -> int:
        """The first moment and the state keys of `_moments`."""
        return 1 + len(self._moments())

    def _steps(self, step: Step) -> torch.Tensor:
        """The step count t after the step, per coordinate (1 where there is none yet)."""
        return self._recorded(step, "step", fill=1.0)

    def state_point(self, step, previous, w, delta, G):
        """The state (m, then the `_moments` keys) before the step.

        The `_moments` as recorded after the step before (or before the recording; zeros for
        a fresh state); m from the recorded Δ_s, which shows m_s = β1 m + (1 − β1) G_s.
        """
        found = self._state_before(step, previous)
        m_after = self.recover(step, delta, G, w).nan_to_num(nan=0.0)  # NaN: η_s Dm_s = 0
        beta1 = self._beta1(step, carried=True)
        moves = beta1 != 0
        m = torch.where(moves, (m_after - (1.0 - beta1) * G) / torch.where(moves, beta1, 1.0), 0.0)
        return (m, *(self._flat_state(found.get(key, {})) for key in self._moments()))

    def _moment_after(self, step: Step, m: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """m_s = β1 m_{s−1} + (1 − β1) G_s (β1 reads 1 where the step skipped the parameter)."""
        beta1 = self._beta1(step, carried=True)
        return beta1 * m + (1.0 - beta1) * G

    def _second_moment(self, step: Step, v, G, frozen: bool) -> torch.Tensor:
        """v_s = β2 v_{s−1} + (1 − β2) G_s² (G_s held constant when ``frozen``)."""
        beta2 = self._beta(step, 1, carried=True)
        g = G.detach() if frozen else G
        return beta2 * v + (1.0 - beta2) * g * g

    def _decay(self, step: Step, w: torch.Tensor):
        """η_s λ' w_s, the decoupled weight decay's share of the step."""
        lam = self._decoupled_decay(step)
        return 0.0 if is_zero(lam) else self._eta(step) * lam * w
