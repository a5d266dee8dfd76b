"""The query side of a step: φ_s(x) = ∫_0^1 ∇_w f(x; w_s + tΔ_s) dt, by quadrature.

φ_s · Δ_s must equal f(x; w_{s+1}) − f(x; w_s) (two forward passes), so each step's
quadrature can be checked; the adaptive rule adds Gauss–Legendre nodes until it does.
"""

from __future__ import annotations

import enum
import functools
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..exceptions import ArgumentError
from .batches import n_rows
from .example_grads import NodeFactors, QueryLayers
from .functional import FunctionalModel
from .kinks import Kinks

# Node counts the adaptive rule climbs through.
LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Quadrature(str, enum.Enum):
    """How φ_s is integrated along each step.

    - ``ADAPTIVE`` (default): Gauss–Legendre with as many nodes as each step needs for
      φ_s · Δ_s to match the exact output change within ``rtol``. Use it: it is exact and
      costs 2 nodes on smooth, small steps. On a model with ReLUs or max-pooling, a query
      whose step crosses a switch has its step split there instead, 2 nodes per piece.
    - ``GAUSS``: a fixed number q of Gauss–Legendre nodes (pass ``quadrature=q``); q = 2 is
      accurate for small learning rates and cheaper when the check is not wanted.
    - ``MIDPOINT``: one node at t = 1/2 (Gauss–Legendre q = 1).
    - ``LEFT``: the tangent kernel at w_s only (Domingos's discretisation, TracIn per step):
      leaves a large share of the output change unexplained; for comparison only.
    """

    ADAPTIVE = "adaptive"
    GAUSS = "gauss"
    MIDPOINT = "midpoint"
    LEFT = "left"


@functools.cache
def gauss_legendre(q: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of q-point Gauss–Legendre quadrature on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(q)
    return tuple((x + 1.0) / 2.0), tuple(w / 2.0)


@dataclass
class QuadratureRule:
    """A parsed ``quadrature=`` option with its tolerance.

    Attributes:
        kind: The `Quadrature` strategy.
        q: Node count for ``GAUSS``.
        rtol: Relative tolerance of the adaptive check, per step.
    """

    kind: Quadrature
    q: int = 2
    rtol: float = 1e-9

    @classmethod
    def parse(cls, quadrature: str | int | Quadrature, rtol: float | None, dtype: torch.dtype):
        """Parse ``"adaptive"``, ``"left"``, ``"midpoint"``, or an int q (Gauss–Legendre)."""
        default_rtol = 1e-9 if dtype == torch.float64 else 1e-5
        if rtol is not None and (
            isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < float(rtol) < 1
        ):
            raise ArgumentError(
                f"rtol={rtol!r}: the adaptive quadrature's per-step tolerance is a number "
                "between 0 and 1 (default 1e-9 in float64, 1e-5 in float32)"
            )
        rtol = default_rtol if rtol is None else float(rtol)
        if isinstance(quadrature, bool):
            raise ArgumentError("quadrature must be a strategy name or a number of nodes")
        if isinstance(quadrature, int):
            if quadrature < 1:
                raise ArgumentError(f"quadrature={quadrature}: the number of nodes must be >= 1")
            return cls(Quadrature.GAUSS, quadrature, rtol)
        try:
            kind = Quadrature(quadrature)
        except ValueError:
            valid = ", ".join(repr(k.value) for k in Quadrature if k is not Quadrature.GAUSS)
            raise ArgumentError(
                f"unknown quadrature {quadrature!r}: use one of {valid}, or an int number of "
                "Gauss-Legendre nodes"
            ) from None
        if kind is Quadrature.GAUSS:
            raise ArgumentError(
                "for Gauss-Legendre quadrature pass the number of nodes: quadrature=3"
            )
        return cls(kind, 2, rtol)

    @property
    def name(self) -> str:
        """A readable name for diagnostics."""
        if self.kind is Quadrature.GAUSS:
            return f"gauss-legendre-{self.q}"
        return self.kind.value


class StepIntegrator:
    """Computes φ_s for all queries, checking it against the exact output change."""

    def __init__(
        self, fm: FunctionalModel, rule: QuadratureRule, inputs, target, output_fn, shard=None
    ):
        self.fm = fm
        self.rule = rule
        self.inputs = inputs
        self.target = target
        self.output_fn = output_fn
        self.evaluations = 0
        self._rung = 0
        self._since_lowered = 0
        self.unconverged: list[int] = []  # steps where the adaptive rule ran out of nodes
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefetched: dict[int, tuple[torch.Tensor, int]] = {}
        self.climbs = 0  # steps whose first rule failed (their prefetched rule was wasted)
        # a sweep whose queries are split over ranks (pk_attrib.explain.distributed): they
        # take each decision together (shard.all), as one process holding every query would
        self.shard = shard
        self._kinks = None  # per-query subdivision at switches (ReLU, max-pooling), if any
        self._switching: bool | None = None
        # the node gradients by layer, for large models (`example_grads.QueryLayers`)
        self._layers = QueryLayers(fm, inputs, target, output_fn)
        # whether prefetched steps may keep φ as node factors (`NodeFactors`), which the
        # sweep then reads through dot products only (plain SGD on the layer route)
        self.factored = False

    def _all(self, flags: torch.Tensor) -> bool:
        """Whether every query's flag holds (on every rank, in a sharded sweep)."""
        return bool(flags.all()) if self.shard is None else self.shard.all(flags)

    def retarget(self, inputs, target) -> None:
        """Integrate for other queries from now on, starting from the rung reached so far.

        Args:
            inputs: The new queries' inputs, each (n', ...).
            target: Their targets, (n',), or None.
        """
        self.inputs, self.target = inputs, target
        self._layers.inputs, self._layers.target = inputs, target
        self._prefetched.clear()

    def _grads(self, points: torch.Tensor, weights: torch.Tensor, factored: bool = False):
        """Σ_k ω_gk ∇f(x; points[g·q + k]) per group and query, (g, n, d); (n, d) for (q,).

        ``factored``: groups may come as `NodeFactors` (a list) instead.
        """
        if self._layers.usable(points[0], n_rows(self.inputs)):
            two_d = weights if weights.dim() == 2 else weights[None]
            grads = self._layers.grads(points, two_d, factored)
            return grads if weights.dim() == 2 else grads[0]
        grads, _ = self.fm.output_grads(
            points, self.inputs, self.target, self.output_fn, weights=weights
        )
        return grads

    def first_rule(self) -> tuple[tuple[float, ...], tuple[float, ...], int]:
        """Nodes, weights and node count the next step is tried with first."""
        if self.rule.kind is Quadrature.LEFT:
            return (0.0,), (1.0,), 1
        if self.rule.kind is Quadrature.MIDPOINT:
            return (0.5,), (1.0,), 1
        q = self.rule.q if self.rule.kind is Quadrature.GAUSS else LADDER[self._rung]
        return (*gauss_legendre(q), q)

    def prefetch(self, segments: list[tuple[torch.Tensor, torch.Tensor]], steps: list[int]):
        """Integrate several steps at once with the first rule (one batched gradient call).

        ``integrate`` then starts from these and only redoes steps whose check fails. When
        the block's node gradients would not fit a quarter of ``memory_budget`` nothing is
        prefetched: ``integrate`` then takes the nodes in chunks that fit.
        """
        n, q = n_rows(self.inputs), len(self.first_rule()[0])
        fm = self.fm
        if 4 * len(segments) * q * n * fm.d_active * fm.dtype.itemsize > fm.memory_budget:
            return
        if self.rule.kind is Quadrature.ADAPTIVE:  # the occasional try one rung lower
            self._since_lowered += len(steps)
            if self._since_lowered >= 64 and self._rung > 0:
                self._rung -= 1
                self._since_lowered = 0
        nodes, weights, q = self.first_rule()
        t, om = self._rule_tensors(nodes, weights)
        points = torch.cat([w + t[:, None] * delta for w, delta in segments])
        grid = om.expand(len(segments), -1)
        phis = self._grads(points, grid, self.factored)
        self.evaluations += len(steps) * q * n_rows(self.inputs)
        for k, step in enumerate(steps):
            self._prefetched[step] = (phis[k], q)

    def _phi(self, w: torch.Tensor, delta: torch.Tensor, nodes, weights) -> torch.Tensor:
        n = n_rows(self.inputs)
        if n == 0:  # (a rank of a sharded sweep with none of the step's queries)
            return torch.zeros(0, self.fm.d_active, dtype=self.fm.dtype, device=self.fm.device)
        per_node = max(
            1, self.fm.memory_budget // max(1, 3 * n * self.fm.d_active * self.fm.dtype.itemsize)
        )
        phi = None
        for a in range(0, len(nodes), per_node):
            t, om = self._rule_tensors(nodes[a : a + per_node], weights[a : a + per_node])
            points = torch.addcmul(w[None], t[:, None], delta[None])  # (one allocation)
            part = self._grads(points, om)
            del points
            phi = part if phi is None else phi + part
        self.evaluations += len(nodes) * n
        return phi

    def _rule_tensors(self, nodes, weights) -> tuple[torch.Tensor, torch.Tensor]:
        key = (nodes, weights)
        if key not in self._tensors:
            fm = self.fm
            self._tensors[key] = (
                torch.tensor(nodes, dtype=fm.dtype, device=fm.device),
                torch.tensor(weights, dtype=fm.dtype, device=fm.device),
            )
        return self._tensors[key]

    def _switches(self, w: torch.Tensor) -> bool:
        """Whether the model switches (ReLU, max-pooling): then kinks are split per query.

        Decided once, from a forward pass at w (by every rank of a sharded sweep together).
        """
        if self._switching is None:
            self._kinks = Kinks(self)
            found = self._kinks.switches(w)
            self._switching = self._all(torch.tensor([found]))
        return self._switching

    def integrate(self, w, delta, exact_change, scale, step: int = -1) -> tuple[torch.Tensor, int]:
        """φ_s (n, d) and the node count used.

        Args:
            w: w_s, (d,) (all recorded coordinates).
            delta: Δ_s, (d,).
            exact_change: f(x; w_{s+1}) − f(x; w_s), (n,).
            scale: A per-query error floor in output units, (n,) (rounding noise and the
                share of the total change one step may leave).
            step: The step number, for diagnostics.
        """
        rule = self.rule
        ready = self._prefetched.pop(step, None)
        if ready is not None and rule.kind is not Quadrature.ADAPTIVE:
            return ready  # (unchecked rules: φ may stay as node factors)
        if rule.kind is Quadrature.LEFT:
            return self._phi(w, delta, (0.0,), (1.0,)), 1
        if rule.kind is Quadrature.MIDPOINT:
            return self._phi(w, delta, (0.5,), (1.0,)), 1
        if rule.kind is Quadrature.GAUSS:
            return self._phi(w, delta, *gauss_legendre(rule.q)), rule.q
        # adaptive: start from the rung the previous step needed; try one lower now and then
        if ready is None:
            self._since_lowered += 1
            if self._since_lowered >= 16 and self._rung > 0:
                self._rung -= 1
                self._since_lowered = 0
        elif LADDER[self._rung] != ready[1]:
            ready = None  # a step of the block moved the rung: its first rule is stale
        start = self._rung
        eps = torch.finfo(self.fm.dtype).eps
        d_delta = self.fm.active(delta)
        previous = None
        while True:
            q = LADDER[self._rung]
            if ready is not None:
                phi, ready = ready[0], None
            else:
                phi = self._phi(w, delta, *gauss_legendre(q))
            err = (phi @ d_delta - exact_change).abs()  # (NodeFactors: from the factors)
            tol = torch.maximum(rule.rtol * exact_change.abs(), scale)
            ok = err <= tol
            if self._all(ok):
                return phi, q
            phi = dense(phi)  # (what follows reads φ whole)
            if self._rung == start and self._switches(w):  # kinks: per query, by pieces
                return self._kinks.refine(phi, ok, w, delta, exact_change, tol, step, q)
            # rounding of φ·Δ itself (a dot product of d terms) bounds what nodes can achieve
            noise = eps * (self.fm.d_active**0.5) * (phi.abs() @ d_delta.abs())
            stalled = previous is not None and not self._all(~(err > 0.5 * previous))
            if stalled and self._all(err <= torch.maximum(tol, 4 * noise)):
                self._rung = start  # limited by rounding, not by the rule: do not stay up
                return phi, q
            if self._rung == len(LADDER) - 1:
                self.unconverged.append(step)
                self._rung = start
                return phi, q
            previous = err
            self._rung += 1
            self.climbs += 1


def dense(phi) -> torch.Tensor:
    """φ as flat vectors, (n, d): itself, or formed from `NodeFactors`."""
    return phi.dense() if isinstance(phi, NodeFactors) else phi
