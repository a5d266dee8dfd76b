"""The base of every optimizer rule: the backward adjoint sweep and the one-step check.

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
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vjp, vmap

from ...exceptions import UnsupportedError
from ...record.path import Step, TrainingPath
from .recorded import RecordedState

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
    diff = float((delta - predicted).abs_().sub_(floor).clamp_min_(0.0).norm())  # (one (d,))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


@dataclass(frozen=True)
class Hyper:
    """What a rule reads from a hyperparameter: a number, a flag or a pair of betas."""

    kind: str  # "number", "flag" or "betas"
    required: bool = False

    @property
    def description(self) -> str:
        """What a valid value is, for messages."""
        return {
            "number": "a finite number",
            "flag": "true or false",
            "betas": "two numbers in [0, 1)",
        }[self.kind]

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is such a value."""

        def number(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if self.kind == "flag":
            return isinstance(value, bool) or value in (0, 1)
        if self.kind == "betas":
            return (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and all(number(b) and 0 <= b < 1 for b in value)
            )
        return number(value)


class Rule(RecordedState):
    """Base class: the backward adjoint sweep and the one-step reconstruction check.

    Call `begin(s, step, phi, w)` for s = S−1, ..., 0, then `finish_step` with the
    recomputed effective gradient; read `errors` at the end.
    """

    STATE_KEY = ""  # the optimizer state this rule carries between steps (its state_dict key)

    # the optimizer kinds (`OptimizerKind` values) this rule explains, and the options it
    # models: a param group setting any other option to a non-default value is refused
    KINDS: tuple[str, ...] = ()
    OPTIONS: frozenset[str] = frozenset()
    # the hyperparameters the rule reads, and what each must hold
    HYPER: dict[str, Hyper] = {}

    def __init__(self, path: TrainingPath, vectors: GroupVectors, names: list[str], kind: str):
        self.path = path
        self.vec = vectors
        self._names = names  # the differentiated parameters, in flat-vector order
        self.kind = kind
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
            if len({dtypes[n] for n in self._names}) == 1:  # one dtype: a 0-dim factor
                eps = torch.tensor(2.0 * torch.finfo(dtypes[self._names[0]]).eps)
            else:
                eps = self._per_param(lambda n: 2.0 * torch.finfo(dtypes[n]).eps)
            self._rounding = eps.to(delta.device, delta.dtype)
        return w.abs().add_(delta.abs()).mul_(self._rounding)  # (in place: one more (d,))

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

    def plain_scale(self, step: Step) -> torch.Tensor | None:
        """η_s (d,) when the adjoint of step s is v_s = η_s φ_s with no other term.

        Then the step is begun as `begin` would (its state kept), and the sweep may keep
        φ_s as factors; None (nothing changed) otherwise, and `begin` is called.
        """
        return None

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

    def finish_step(
        self, s: int, step: Step, delta: torch.Tensor, G: torch.Tensor, w, rounding=None
    ):
        """Record the reconstruction error of steps whose check has become possible.

        Called for s = S−1, ..., 0. Step s+1's check needs the state after step s, which is
        recovered from Δ_s; where Δ_s does not show it (learning rate 0), step s waits too,
        and the state is carried forward from the first earlier step that shows it (at
        most ``_MAX_WAITING`` steps; beyond, the check covers the coordinates it knows).

        ``rounding`` ((d,), optional): how far G_s is known, per coordinate (two routes to it
        disagree by that much). What it moves Δ̂_s by, twice over, is not counted: a
        coordinate whose gradient is rounding (a bias BatchNorm cancels) steps by ±η under
        Adam, in the direction the rounding chose.
        """
        floor = self._floor(delta, w)
        if rounding is not None:  # (the rules are affine in G: the effect needs no state)
            moved = self.predict(step, None, G + 2.0 * rounding, w) - self.predict(step, None, G, w)
            floor = floor + moved.abs()
        if self._stateless():  # nothing to recover or carry: each step is checked alone
            self.errors[s] = _relative_error(delta, self.predict(step, None, G, w), floor)
            return
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

    def _stateless(self) -> bool:
        """Whether no step of the path carries optimizer state (plain SGD)."""
        if getattr(self, "_no_state", None) is None:
            self._no_state = all(self.memoryless(step) for step in self.path)
        return self._no_state

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

    # -- counterfactual scores: the step as a differentiable function ----------------------

    def counterfactual_state(self) -> int:
        """How many (d,) tensors of optimizer state the step map carries (0: none)."""
        raise UnsupportedError(
            f"the {self.kind} rule has no step map for counterfactual scores: use "
            "attribute() (exact contributions)"
        )

    def step_map(self, step: Step, w, state: tuple, G, frozen: bool = False):
        """The optimizer's update as a function: (w_s, state before, G_s) -> (w_s+1, state).

        Args:
            step: The step (its learning rates and hyperparameters).
            w: w_s, (d,).
            state: The optimizer state before the step, a tuple of `counterfactual_state`
                (d,) tensors.
            G: The effective gradient G_s = σ Σ_j κ_j g_j + λ w_s, (d,).
            frozen: Hold any preconditioner at its recorded value (no dependence on G;
                the first-order test switch).

        Returns:
            ``(w_next, state_after)``.
        """
        raise NotImplementedError

    def state_point(self, step: Step, previous: Step | None, w, delta, G) -> tuple:
        """The optimizer state before the step, where `step_map` is linearized.

        Args:
            step: Step s.
            previous: Step s − 1 (None for s = 0).
            w: w_s, (d,).
            delta: The recorded Δ_s, (d,).
            G: The recomputed effective gradient G_s, (d,).

        Returns:
            A tuple of `counterfactual_state` (d,) tensors.
        """
        raise NotImplementedError

    def _flat_state(self, found: dict[str, torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """(d,): the named tensors, ``fill`` for a parameter that has none."""
        shapes = self.path.param_shapes
        parts = [
            found[n].reshape(-1) if n in found else torch.full((shapes[n].numel(),), fill)
            for n in self._names
        ]
        return torch.cat(parts).to(self.vec.device, self.vec.dtype)

    @staticmethod
    def _state_before(step: Step, previous: Step | None) -> dict[str, dict[str, torch.Tensor]]:
        """The recorded optimizer state before the step, by key and parameter name.

        What the recorder kept after the step before, or before the recording began (for
        step 0); nothing for a fresh state.
        """
        if step.fresh_state:
            return {}
        return previous.optimizer_state if previous is not None else step.initial_state

    def step_vjp(self, step: Step, point: tuple, cot_w, cot_state: tuple, frozen: bool = False):
        """Vector-Jacobian product of `step_map` at ``point`` for n adjoints at once.

        Args:
            step: The step.
            point: ``(w_s, state before, G_s)`` from `state_point`.
            cot_w: Adjoints of w_s+1, (n, d).
            cot_state: Adjoints of the state after the step, a tuple of (n, d).
            frozen: As in `step_map`.

        Returns:
            ``(adjoint of w_s, adjoints of the state before, adjoint of G_s)``, each (n, d)
            (the state's a tuple).
        """
        w, state, G = point
        _, pull = vjp(lambda w_, st, g: self.step_map(step, w_, st, g, frozen), w, state, G)
        return vmap(pull)((cot_w, cot_state))
