"""Optimizer rules: how each recorded step depends on the example gradients (DESIGN.md §1).

Every supported optimizer makes Δ_s a linear function of the "effective gradients"
G_r = σ Σ_{j∈B_r} κ_j g_j(w_r) + λ_r w_r of the current and earlier steps (σ = −1 with
``maximize``, κ_j the loss-reduction weight, λ the coupled weight decay), plus terms that
do not depend on examples (AdamW's decoupled decay). So

    Σ_s φ_s · Δ_s = − Σ_r v_r · G_r + (non-example terms),

and the rule's job is to produce v_r, walking the steps **backwards** (the adjoint
recursion, O(n_queries × d) memory, no per-example optimizer buffer).

Each rule also rebuilds Δ̂_s from the recomputed gradient G_s and the optimizer state
recovered from the recorded Δ_{s−1} (a one-step check: errors do not compound), and
reports ‖Δ_s − Δ̂_s‖ / ‖Δ_s‖ for every step. A step with learning rate 0 does not show the
state in its Δ; the check then carries the state forward from the step before it.

A parameter without a gradient at a step (``grad is None``: unused by the batch, or set to
None by the loop) is skipped by the optimizer: not moved, no weight decay, its state carried
unchanged. The rules mask such coordinates per step (`Step.skipped`).

Optimizer state that existed before the recording began (a recorder created on an
optimizer that had already stepped) is not an example's doing: its output effect is a
term of its own (`Rule.initial_state_term`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .exceptions import UnsupportedError
from .optim import SCHEDULER_KEYS
from .path import Step, TrainingPath

SUPPORTED = {
    "sgd": {"momentum", "dampening", "nesterov", "weight_decay", "maximize"},
    "adam": {"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"},
}
# Steps whose check may wait for the state before them (each holds four (d,) vectors).
_MAX_WAITING = 8


class GroupVectors:
    """Turns per-param-group values into per-coordinate (d,) vectors."""

    def __init__(self, path: TrainingPath, names: list[str], dtype: torch.dtype, device):
        self.group_of: dict[str, int] = {}  # parameter name -> its param group
        for g, group in enumerate((path.optimizer or {}).get("groups", [])):
            for name in group["params"]:
                self.group_of[name] = g
        shapes = path.param_shapes
        ids = [torch.full((shapes[n].numel(),), self.group_of.get(n, 0)) for n in names]
        self.ids = torch.cat(ids).to(device)
        self.dtype = dtype
        self.device = device
        self.n_groups = max(1, len((path.optimizer or {}).get("groups", [])))
        self._cache: dict[tuple[float, ...], torch.Tensor] = {}

    def vec(self, values) -> torch.Tensor:
        """(n_groups,) values -> (d,) vector (a 0-dim tensor when all groups agree)."""
        key = tuple(float(v) for v in values)
        found = self._cache.get(key)
        if found is None:
            if len(set(key)) == 1:  # broadcasts like the (d,) vector, at no cost
                found = torch.tensor(key[0], dtype=self.dtype, device=self.device)
            else:
                found = torch.tensor(key, dtype=self.dtype, device=self.device)[self.ids]
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = found
        return found

    def hyper(self, step: Step, key: str, default: Any = 0.0) -> torch.Tensor:
        """Per-coordinate value of hyperparameter ``key`` at this step."""
        return self.vec([float(h.get(key, default)) for h in step.hyper])


def _relative_error(delta: torch.Tensor, predicted: torch.Tensor, floor: torch.Tensor) -> float:
    """‖Δ − Δ̂‖ / ‖Δ‖ over the coordinates Δ̂ is known for (NaN: state that was not known).

    Per coordinate, what the rounding of the stored weights explains (``floor``, (d,)) is
    not counted: a float32 step much smaller than its weight is mostly rounding.
    """
    unknown = predicted.isnan()
    if bool(unknown.any()):
        delta, predicted, floor = delta[~unknown], predicted[~unknown], floor[~unknown]
        if not bool((delta != 0).any()):  # nothing left that moved: no check at all
            return math.nan
    norm = float(delta.norm())
    diff = float(((delta - predicted).abs() - floor).clamp_min(0.0).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


class Rule:
    """Base class: the backward adjoint sweep and the one-step reconstruction check.

    Call `begin(s, step, phi, w)` for s = S−1, ..., 0, then `finish_step` with the
    recomputed effective gradient; read `errors` at the end.
    """

    STATE_KEY = ""  # the optimizer state this rule carries between steps (its state_dict key)

    def __init__(self, path: TrainingPath, vectors: GroupVectors):
        self.path = path
        self.vec = vectors
        self.errors: dict[int, float] = {}
        self._carry: torch.Tensor | None = None  # adjoint of the state after this step
        # how the state before this step enters it (μ, β1): it scales the carry back
        self._carry_factor: torch.Tensor | float = 0.0
        self._next_fresh = True
        # steps (nearest last) whose check waits for the state after the step before them
        self._waiting: list[tuple] = []
        self._masks: dict[frozenset[str], torch.Tensor] = {}
        self._rounding: torch.Tensor | None = None  # 2 eps of each coordinate's stored dtype
        self._eps = torch.finfo(vectors.dtype).eps  # of the computation

    def _floor(self, delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per coordinate, how much of Δ_s the rounding of the stored weights can explain.

        The optimizer's update w + u rounds to the parameter's dtype (AdamW's decay once
        more): Δ_s is known to about 2 eps (|w_s| + |Δ_s|), eps of that parameter's dtype.
        """
        if self._rounding is None:
            dtypes = self.path.param_dtypes
            eps = self._per_param(lambda n: 2.0 * torch.finfo(dtypes[n]).eps)
            self._rounding = eps.to(delta.device, delta.dtype)
        return self._rounding * (w.abs() + delta.abs())

    def _per_param(self, value_of) -> torch.Tensor:
        """(d,): ``value_of(name)`` on the coordinates of each parameter, on the device."""
        shapes = self.path.param_shapes
        parts = [torch.full((shapes[n].numel(),), value_of(n)) for n in self._names]
        return torch.cat(parts).to(self.vec.device)

    def passes_through(self, step: Step) -> bool:
        """True when the step carries the whole state unchanged and Δ_s does not use it."""
        return False

    def _mask(self, names: frozenset[str]) -> torch.Tensor | None:
        """(d,) bool: True on the coordinates of these parameters (None for no parameter)."""
        if not names:
            return None
        found = self._masks.get(names)
        if found is None:
            found = self._per_param(lambda n: n in names)
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[names] = found
        return found

    def _eta(self, step: Step) -> torch.Tensor:
        """η_s per coordinate, 0 where the step skipped the parameter (no gradient)."""
        eta = self.vec.vec(step.lr)
        skip = self._mask(step.skipped)
        return eta if skip is None else torch.where(skip, 0.0, eta)

    def memoryless(self, step: Step) -> bool:
        """True when step s carries no optimizer state (plain SGD).

        Then φ_s is needed only for the step's own batch.
        """
        return False

    def coefficients(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """σ (sign: −1 with maximize) and λ (coupled weight decay) as (d,) vectors."""
        sign = 1.0 - 2.0 * self.vec.hyper(step, "maximize", False)
        return sign, self.coupled_decay(step)

    def coupled_decay(self, step: Step) -> torch.Tensor:
        """λ of the weight decay that enters G (zero for AdamW's decoupled decay)."""
        return self.vec.hyper(step, "weight_decay")

    def begin(self, s: int, step: Step, phi: torch.Tensor, w: torch.Tensor):
        """Adjoint for step s: returns (v_s (n, d), non-example output term of step s (n,))."""
        raise NotImplementedError

    def recover(self, step: Step, delta: torch.Tensor, G: torch.Tensor, w: torch.Tensor):
        """The optimizer state after step s recovered from the recorded Δ_s, (d,).

        NaN where Δ_s does not show it (the learning rate is 0 there).
        """
        raise NotImplementedError

    def uses_state(self, step: Step) -> torch.Tensor | bool:
        """Where Δ_s depends on the optimizer state before the step ((d,) bool, or True)."""
        return True

    def recovery_uncertainty(self, step: Step, floor: torch.Tensor) -> torch.Tensor:
        """(d,): how far `recover` can be off when Δ_s is known to ``floor`` per coordinate."""
        raise NotImplementedError

    def carry_uncertainty(self, step: Step, unc: torch.Tensor) -> torch.Tensor:
        """(d,): the uncertainty `advance` passes on from a state before the step off by unc."""
        raise NotImplementedError

    def prediction_uncertainty(self, step: Step, unc: torch.Tensor) -> torch.Tensor:
        """(d,): how far `predict` can move with the state before the step off by ``unc``."""
        raise NotImplementedError

    def advance(self, step: Step, prev: torch.Tensor | None, G: torch.Tensor, w: torch.Tensor):
        """The optimizer state after step s from the state before it (None: fresh) and G_s."""
        raise NotImplementedError

    def predict(self, step, prev_state, G, w) -> torch.Tensor:
        """Δ̂_s from the state after step s−1 and the recomputed G_s."""
        raise NotImplementedError

    def finish_step(self, s: int, step: Step, delta: torch.Tensor, G: torch.Tensor, w):
        """Record the reconstruction error of steps whose check has become possible.

        Called for s = S−1, ..., 0. Step s+1's check needs the state after step s, which is
        recovered from Δ_s; where Δ_s does not show it (learning rate 0), step s waits too,
        and the state is carried forward from the first earlier step that shows it (at
        most ``_MAX_WAITING`` steps; beyond, the check covers the coordinates it knows).
        """
        floor = self._floor(delta, w)
        first = step.fresh_state or s == 0
        if not first and self.passes_through(step):  # checked now; the chain skips it
            self.errors[s] = _relative_error(delta, self.predict(step, None, G, w), floor)
            return
        state = self.recover(step, delta, G, w)
        # how far the recovered state can be off: Δ_s is only known to its rounding floor
        unc = self.recovery_uncertainty(step, floor)
        if first:
            prev = None if step.fresh_state else self._initial_state(step)
            self.errors[s] = _relative_error(delta, self.predict(step, prev, G, w), floor)
            advanced = self.advance(step, prev, G, w)  # from a known start
            state, unc = self._merge(state, unc, advanced, self._computed(advanced, G))
        elif len(self._waiting) < _MAX_WAITING and not (
            self._known_enough(state) and self._precise_enough(unc)
        ):
            self._waiting.append((s, step, delta, G, w, state, unc, floor))
            return
        while self._waiting:  # check the waiting steps, nearest first, carrying the state
            s1, step1, delta1, G1, w1, recovered, unc1, floor1 = self._waiting.pop()
            # (NaN where the state is unknown: the prediction is NaN there too if it uses it)
            allowance = floor1 + self.prediction_uncertainty(step1, unc).nan_to_num(nan=0.0)
            predicted = self.predict(step1, state, G1, w1)
            self.errors[s1] = _relative_error(delta1, predicted, allowance)
            advanced = self.advance(step1, state, G1, w1)
            carried = self.carry_uncertainty(step1, unc) + self._computed(advanced, G1)
            state, unc = self._merge(recovered, unc1, advanced, carried)
        if not first:
            self._waiting.append((s, step, delta, G, w, state, unc, floor))

    def _computed(self, advanced: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """What computing a state by `advance` adds to its uncertainty.

        The recomputed gradient and the arithmetic round in the computation dtype.
        """
        return 8.0 * self._eps * (advanced.abs() + G.abs())

    @staticmethod
    def _merge(recovered, unc_recovered, advanced, unc_advanced):
        """The state after a step, and its uncertainty.

        Recovered from the step's Δ (each step checked on its own), unless Δ does not show
        it (NaN) or shows it imprecisely (a tiny learning rate: uncertain beyond 1e-4 of its
        size) and advancing the state before the step is more precise.
        """
        imprecise = unc_recovered > 1e-4 * recovered.abs()
        worse = imprecise & (unc_advanced < unc_recovered) & ~advanced.isnan()
        use = recovered.isnan() | worse
        return torch.where(use, advanced, recovered), torch.where(use, unc_advanced, unc_recovered)

    def _precise_enough(self, unc: torch.Tensor) -> bool:
        """Is the state known well enough to check the nearest waiting step?

        A state recovered from a step with a tiny learning rate (a warm-up from 1e-8, the
        end of a cosine cycle before a restart) is uncertain beyond the next step's own
        rounding: then this step waits too, and its state is advanced from the one before.
        """
        if not self._waiting:
            return True
        _, step, _, _, _, _, _, floor = self._waiting[-1]
        induced = self.prediction_uncertainty(step, unc).nan_to_num(nan=0.0)
        return float(induced.norm()) <= 10.0 * float(floor.norm())

    def _known_enough(self, state: torch.Tensor) -> bool:
        """Is the state known wherever the waiting steps need it?

        A waiting step needs the state before it where its learning rate is not 0, and
        also where its own state is unknown but a later waiting step needs that (the state
        is then carried through it).
        """
        unknown = state.isnan()
        if not self._waiting or not bool(unknown.any()):
            return True
        need = torch.zeros_like(unknown)
        for _, step, _, _, _, recovered, _, _ in self._waiting:  # farthest first
            need = ((self._eta(step) != 0) & self.uses_state(step)) | (recovered.isnan() & need)
        return not bool((unknown & need).any())

    def _initial_state(self, step: Step) -> torch.Tensor | None:
        """The recorded state before step 0 ((d,), float), or None when there was none.

        A parameter without one (an SGD group without momentum, a layer that had no gradient
        yet) gets zeros: Adam starts its first moment there, and SGD without dampening its
        buffer, as from zeros.
        """
        found = step.initial_state.get(self.STATE_KEY, {})
        if not found:
            return None
        shapes = self.path.param_shapes
        flat = torch.cat(
            [
                found[n].reshape(-1) if n in found else torch.zeros(shapes[n].numel())
                for n in self._names
            ]
        )
        return flat.to(self.vec.device, self.vec.dtype)

    def initial_state_term(self, step: Step) -> torch.Tensor | None:
        """Output effect of the state recorded before step 0 (call after the sweep), (n,).

        The state b enters step 0 as ``carry_factor * b``; its effect on Σ_s φ_s · Δ_s is
        −(carry_factor ⊙ u_0) · b with u_0 the adjoint of the state after step 0.
        """
        if step.fresh_state or self._carry is None:
            return None
        prev = self._initial_state(step)
        if prev is None:
            return None
        return -((self._carry * self._carry_factor) @ prev)


class SGDRule(Rule):
    """SGD with momentum, dampening, nesterov, weight decay and maximize (PyTorch convention)."""

    _terms_of: tuple | None = None  # (step index, its terms): the last step asked for

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

    def begin(self, s, step, phi, w):
        """v_s = d_s u_s (+ η_s φ_s with nesterov); u_s = η_s c_s φ_s + μ_{s+1} u_{s+1}."""
        eta, mu, damp, nesterov, carry, moving = self._terms(step)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        pending = self._carry if not next_fresh else None
        if pending is None and not bool(moving.any()):  # plain SGD: no state to carry
            self._carry, self._carry_factor = None, carry
            return eta * phi, None
        # u_s: adjoint of the buffer b_s = μ_s b_{s−1} + d_s G_s, used by P_s = b_s or G_s + μ_s b_s
        direct = torch.where(nesterov.bool(), mu, torch.ones_like(mu))
        u = torch.where(moving, eta * direct * phi, 0.0)
        if pending is not None:
            u = u + self._carry_factor * pending
        self._carry, self._carry_factor = u, carry
        v = damp * u + nesterov * eta * phi
        return torch.where(moving, v, eta * phi), None

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
        buffer = self.advance(step, prev, G, w)
        update = torch.where(nesterov.bool(), G + mu * buffer, buffer)
        return torch.where(eta != 0, -eta * torch.where(moving, update, G), 0.0)


class AdamRule(Rule):
    """Adam and AdamW (amsgrad and maximize too), with the recorded second moments."""

    def __init__(self, path, vectors, decoupled: bool):
        super().__init__(path, vectors)
        self.decoupled = decoupled
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


def make_rule(path: TrainingPath, vectors: GroupVectors, names: list[str]) -> Rule:
    """The exact rule for the path's optimizer.

    Raises:
        UnsupportedError: The optimizer (or one of its options) has no exact rule.
    """
    optimizer = path.optimizer or {}
    kind = optimizer.get("kind")
    if kind not in ("sgd", "adam", "adamw"):
        raise UnsupportedError(
            f"optimizer {optimizer.get('class', kind)} has no exact decomposition rule "
            "(exact: SGD, Adam, AdamW): use mode='checkpoint'"
        )
    family = "sgd" if kind == "sgd" else "adam"
    for g, group in enumerate(optimizer["groups"]):
        unknown = {
            k
            for k, v in group["hyper"].items()
            if k not in SUPPORTED[family]
            and k not in SCHEDULER_KEYS
            and v not in (None, False, 0, 0.0)
        }
        if unknown:
            raise UnsupportedError(
                f"param group {g} uses {sorted(unknown)}, which the exact {kind} rule does not "
                "model: use mode='checkpoint'"
            )
    rule = SGDRule(path, vectors) if family == "sgd" else AdamRule(path, vectors, kind == "adamw")
    rule._names = names
    return rule
