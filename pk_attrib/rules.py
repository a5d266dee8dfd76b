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
reports ‖Δ_s − Δ̂_s‖ / ‖Δ_s‖ for every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .exceptions import UnsupportedError
from .path import Step, TrainingPath

SUPPORTED = {
    "sgd": {"momentum", "dampening", "nesterov", "weight_decay", "maximize"},
    "adam": {"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"},
}


class GroupVectors:
    """Turns per-param-group values into per-coordinate (d,) vectors."""

    def __init__(self, path: TrainingPath, names: list[str], dtype: torch.dtype, device):
        group_of = {}
        for g, group in enumerate((path.optimizer or {}).get("groups", [])):
            for name in group["params"]:
                group_of[name] = g
        shapes = path.param_shapes
        ids = [torch.full((shapes[n].numel(),), group_of.get(n, 0)) for n in names]
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


def _relative_error(delta: torch.Tensor, predicted: torch.Tensor) -> float:
    norm = float(delta.norm())
    diff = float((delta - predicted).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


class Rule:
    """Base class: the backward adjoint sweep and the one-step reconstruction check.

    Call `begin(s, step, phi, w)` for s = S−1, ..., 0, then `finish_step` with the
    recomputed effective gradient; read `errors` at the end.
    """

    def __init__(self, path: TrainingPath, vectors: GroupVectors):
        self.path = path
        self.vec = vectors
        self.errors: dict[int, float] = {}
        self._carry: torch.Tensor | None = None  # adjoint of the state after this step
        self._next_fresh = True
        self._pending: tuple | None = None  # step s+1, waiting for the state recovered at s

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
        """The optimizer state after step s recovered from the recorded Δ_s (or None)."""
        raise NotImplementedError

    def predict(self, step, prev_state, G, w) -> torch.Tensor:
        """Δ̂_s from the state after step s−1 and the recomputed G_s."""
        raise NotImplementedError

    def finish_step(self, s: int, step: Step, delta: torch.Tensor, G: torch.Tensor, w):
        """Record the reconstruction error of steps whose check has become possible."""
        state = self.recover(step, delta, G, w)
        if self._pending is not None:
            s1, step1, delta1, G1, w1 = self._pending
            self.errors[s1] = _relative_error(delta1, self.predict(step1, state, G1, w1))
        self._pending = None
        if step.fresh_state or s == 0:
            prev = None if step.fresh_state else self._initial_state(step)
            self.errors[s] = _relative_error(delta, self.predict(step, prev, G, w))
        else:
            self._pending = (s, step, delta, G, w)

    def _initial_state(self, step: Step):
        return None


class SGDRule(Rule):
    """SGD with momentum, dampening, nesterov, weight decay and maximize (PyTorch convention)."""

    def memoryless(self, step: Step) -> bool:
        """Plain SGD (no momentum in any group) keeps no state between steps."""
        return all(float(h.get("momentum", 0.0)) == 0.0 for h in step.hyper)

    def _terms(self, step: Step):
        mu = self.vec.hyper(step, "momentum")
        damp = 1.0 - self.vec.hyper(step, "dampening")
        nesterov = self.vec.hyper(step, "nesterov", False)
        if step.fresh_state:
            damp = torch.ones_like(damp)
        return mu, damp, nesterov

    def begin(self, s, step, phi, w):
        """v_s = d_s u_s (+ η_s φ_s with nesterov); u_s = η_s c_s φ_s + μ_{s+1} u_{s+1}."""
        eta = self.vec.vec(step.lr)
        mu, damp, nesterov = self._terms(step)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        if not bool((mu != 0).any()):
            self._carry = None
            self._mu = mu
            return eta * phi, None
        # u_s: adjoint of the buffer b_s = μ_s b_{s−1} + d_s G_s, used by P_s = b_s or G_s + μ_s b_s
        direct = torch.where(nesterov.bool(), mu, torch.ones_like(mu))
        u = eta * direct * phi
        if self._carry is not None and not next_fresh:
            u = u + self._mu * self._carry
        self._carry, self._mu = u, mu
        v = damp * u + nesterov * eta * phi
        return torch.where(mu != 0, v, eta * phi), None

    def recover(self, step, delta, G, w):
        """The momentum buffer b_s from Δ_s = −η_s P_s."""
        eta = self.vec.vec(step.lr)
        mu, _, nesterov = self._terms(step)
        p = torch.where(eta != 0, -delta / torch.where(eta != 0, eta, 1.0), 0.0)
        safe_mu = torch.where(mu != 0, mu, 1.0)
        buffer = torch.where(nesterov.bool(), (p - G) / safe_mu, p)
        return torch.where(mu != 0, buffer, 0.0)

    def predict(self, step, prev, G, w):
        """Δ̂_s = −η_s P̂_s with b̂_s = μ_s b_{s−1} + d_s G_s."""
        eta = self.vec.vec(step.lr)
        mu, damp, nesterov = self._terms(step)
        buffer = damp * G if prev is None else mu * prev + damp * G
        update = torch.where(nesterov.bool(), G + mu * buffer, buffer)
        return -eta * torch.where(mu != 0, update, G)


class AdamRule(Rule):
    """Adam and AdamW (amsgrad and maximize too), with the recorded second moments."""

    def __init__(self, path, vectors, decoupled: bool):
        super().__init__(path, vectors)
        self.decoupled = decoupled

    def coupled_decay(self, step):
        """Adam's L2 weight decay enters G; AdamW's decoupled decay does not."""
        lam = self.vec.hyper(step, "weight_decay")
        return torch.zeros_like(lam) if self.decoupled else lam

    def _denominator(self, step: Step, names: list[str]) -> torch.Tensor:
        """D_s = 1 / ((1 − β1^t)(sqrt(v_s / (1 − β2^t)) + ε)), elementwise (d,)."""
        state = step.optimizer_state
        amsgrad = self.vec.hyper(step, "amsgrad", False)
        key = (
            "max_exp_avg_sq" if bool(amsgrad.any()) and "max_exp_avg_sq" in state else "exp_avg_sq"
        )
        if key not in state or "step" not in state:
            raise UnsupportedError(
                f"step {step.index} has no recorded Adam state (exp_avg_sq, step): the exact "
                "Adam rule needs a path recorded by PathRecorder; use mode='checkpoint'"
            )
        dtype, device = self.vec.dtype, self.vec.device
        v = torch.cat([state[key][n].reshape(-1) for n in names]).to(device, dtype)
        t = torch.cat(
            [state["step"][n].reshape(1).expand(state[key][n].numel()) for n in names]
        ).to(device, dtype)
        beta1 = self.vec.vec([float(h["betas"][0]) for h in step.hyper])
        beta2 = self.vec.vec([float(h["betas"][1]) for h in step.hyper])
        eps = self.vec.hyper(step, "eps")
        return 1.0 / ((1.0 - beta1**t) * (torch.sqrt(v / (1.0 - beta2**t)) + eps)), beta1

    def begin(self, s, step, phi, w):
        """v_s = (1 − β1) u_s; u_s = η_s D_s φ_s + β1 u_{s+1}; AdamW decay as extra term."""
        eta = self.vec.vec(step.lr)
        D, beta1 = self._denominator(step, self._names)
        self._next_fresh, next_fresh = step.fresh_state, self._next_fresh
        if self._carry is not None and not next_fresh:  # in place: the carry is ours alone
            u = self._carry.mul_(self._beta1).addcmul_(phi, eta * D)
        else:
            u = (eta * D) * phi
        self._carry, self._beta1 = u, beta1
        extra = None
        if self.decoupled:
            lam = self.vec.hyper(step, "weight_decay")
            extra = -(phi @ (eta * lam * w))
        return (1.0 - beta1) * u, extra

    def recover(self, step, delta, G, w):
        """The first moment m_s from Δ_s = −η_s λ w_s − η_s D_s m_s."""
        eta = self.vec.vec(step.lr)
        D, _ = self._denominator(step, self._names)
        moved = delta + (eta * self.vec.hyper(step, "weight_decay") * w if self.decoupled else 0.0)
        scale = eta * D
        return torch.where(scale != 0, -moved / torch.where(scale != 0, scale, 1.0), 0.0)

    def predict(self, step, prev, G, w):
        """Δ̂_s from m̂_s = β1 m_{s−1} + (1 − β1) G_s."""
        eta = self.vec.vec(step.lr)
        D, beta1 = self._denominator(step, self._names)
        m = (1.0 - beta1) * G if prev is None else beta1 * prev + (1.0 - beta1) * G
        decay = eta * self.vec.hyper(step, "weight_decay") * w if self.decoupled else 0.0
        return -decay - eta * D * m


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
            if k not in SUPPORTED[family] and v not in (None, False, 0, 0.0)
        }
        if unknown:
            raise UnsupportedError(
                f"param group {g} uses {sorted(unknown)}, which the exact {kind} rule does not "
                "model: use mode='checkpoint'"
            )
    rule = SGDRule(path, vectors) if family == "sgd" else AdamRule(path, vectors, kind == "adamw")
    rule._names = names
    return rule
