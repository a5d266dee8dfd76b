"""Steps that cross a kink: per-query subdivision where a ReLU or a max-pooling switches.

Along a step w(t) = w_s + tΔ_s, the query gradient of a ReLU / max-pooling network is smooth
except at the few t where a unit switches (a ReLU input crosses 0, a pooling window's maximum
moves to another input). Between two switches an L-layer ReLU MLP's output is a polynomial of
degree ≤ L in t, so 2 Gauss–Legendre nodes per piece integrate its gradient exactly for
L ≤ 4; one Gauss–Legendre rule over the whole step converges slowly across a switch. Each
query has its own switches, so the queries whose check fails are handled one by one
(`Kinks.refine`), first all at once from one set of forward passes (`Kinks._at_once`):

1. forward passes only (no gradients) at t = 0, 1/4, 1/2, 3/4, 1 capture the switching
   quantities (`SwitchCapture`: the inputs of ``relu``, ``leaky_relu`` and ``abs``, and of
   ``max_pool{1,2,3}d`` with their argmax); a quantity whose side differs between two
   neighbouring points brackets a switch;
2. the switch is placed at the root of the quadratic through the quantity at the bracket's
   ends and a neighbour: exact for a first layer's input, linear in t. Where the quadratic is
   not a line to rounding, the root is only a first guess for the Illinois method (regula
   falsi) on forward passes, batched over every switch of every query;
3. each piece between switches gets 2 Gauss–Legendre nodes, and the query's step is checked
   against its exact output change as before.

A query that still fails is refined piece by piece: forward passes at the ends and the
middle of a piece give f there and its switches, located by the Illinois method; the piece
is split at them (at its middle if nothing switched: a kink not captured, or a piece too
curved for 2 nodes); each piece is checked like a step, f(b) − f(a) against its integral · Δ,
and those whose error exceeds their share of the tolerance are refined again, up to
``ROUNDS`` times (then the step is reported unconverged: a `QuadratureWarning`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad
from torch.overrides import TorchFunctionMode

from .batches import n_rows, one_row, take
from .functional import FunctionalModel

KINK_AT_ZERO = frozenset(  # kinked where their input crosses 0
    {
        F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
        F.leaky_relu, F.leaky_relu_, torch.abs, torch.Tensor.abs,
    }
)  # fmt: skip
MAX_POOL = {  # function -> (the same with argmax, number of pooled dimensions)
    F.max_pool1d: (F.max_pool1d_with_indices, 1),
    F.max_pool2d: (F.max_pool2d_with_indices, 2),
    F.max_pool3d: (F.max_pool3d_with_indices, 3),
    F.max_pool1d_with_indices: (F.max_pool1d_with_indices, 1),
    F.max_pool2d_with_indices: (F.max_pool2d_with_indices, 2),
    F.max_pool3d_with_indices: (F.max_pool3d_with_indices, 3),
}
NODES = 2  # Gauss–Legendre nodes per piece
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # where a step's switches are looked for first
ROUNDS = 16  # refinements of a step before its query is given up (QuadratureWarning)
MAX_PIECES = 256  # pieces of one query's step
ITERATIONS = 8  # Illinois iterations per switch (then the checks decide)


class SwitchCapture(TorchFunctionMode):
    """Records the switching quantities of one forward pass.

    ``values[k]``: the k-th ReLU's input, or the k-th max-pooling's input, flattened.
    ``argmax[k]``: for a max-pooling, the flat position in ``values[k]`` of each window's
    maximum; None for a ReLU (its side is ``values[k] > 0``).
    """

    def __init__(self):
        super().__init__()
        self.values: list[torch.Tensor] = []
        self.argmax: list[torch.Tensor | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KINK_AT_ZERO:
            x = args[0] if args else kwargs["input"]
            self.values.append(x.clone().reshape(-1))  # (before an in-place ReLU)
            self.argmax.append(None)
        elif func in MAX_POOL:
            x = args[0] if args else kwargs["input"]
            with_argmax, pooled = MAX_POOL[func]
            options = {k: v for k, v in kwargs.items() if k != "return_indices"}
            _, where = with_argmax(*args[:6], **options)
            planes = x.reshape(-1, x.shape[x.dim() - pooled :].numel())  # (planes, positions)
            offsets = torch.arange(planes.shape[0], device=x.device)[:, None] * planes.shape[1]
            self.values.append(planes.reshape(-1))
            self.argmax.append((where.reshape(planes.shape[0], -1) + offsets).reshape(-1))
        return func(*args, **kwargs)


class Kinks:
    """Integrates the steps of queries whose Gauss–Legendre check failed, piece by piece.

    Args:
        integrator: The `StepIntegrator` (its model, queries, targets and output function).
    """

    def __init__(self, integrator):
        self.integ = integrator
        self.kinds: list[bool] | None = None  # per captured quantity: a max-pooling?
        self.unconverged = 0  # queries given up (steps with one are in integ.unconverged)
        self.cuts: dict[int, list[float]] = {}  # the last step's split points, per query
        self.captured_bytes = 0  # what one forward pass captures (known after the first)

    @property
    def fm(self) -> FunctionalModel:
        """The integrator's model."""
        return self.integ.fm

    def _target(self):
        inputs, target = self.integ.inputs, self.integ.target
        if target is None:
            return torch.zeros(n_rows(inputs), dtype=torch.int64)
        return target

    def _chunks(self, p: int) -> list[slice]:
        """Points per vmapped call: their parameters, gradients and captured quantities."""
        fm = self.fm
        per_point = 6 * fm.d * fm.dtype.itemsize + 3 * self.captured_bytes
        size = max(1, fm.memory_budget // max(1, per_point))
        return [slice(a, a + size) for a in range(0, p, size)]

    def switches(self, w: torch.Tensor) -> bool:
        """Whether the model's forward pass at w has quantities to capture (a ReLU, ...)."""
        if n_rows(self.integ.inputs) == 0:
            return True  # (a rank of a sharded sweep with no queries: no say)
        ts = torch.zeros(1, dtype=self.fm.dtype, device=self.fm.device)
        self.probe(w, torch.zeros_like(w), ts, torch.zeros(1, dtype=torch.int64))
        return bool(self.kinds)

    def probe(self, w, delta, ts: torch.Tensor, rows: torch.Tensor):
        """Forward passes of queries ``rows`` (p,) at w + ts Δ (p,), one point each.

        Returns:
            ``(f, values, argmax)``: the explained outputs (p,), and per captured quantity
            k its values (p, E_k) and, for a max-pooling, its argmax (p, P_k) (else None).
        """
        fm, integ = self.fm, self.integ
        output_fn, has_target = integ.output_fn, integ.target is not None
        kinds: list[bool] = []

        def single(pa, pp, x, t):
            with SwitchCapture() as capture:
                out = fm._call({**pa, **pp}, one_row(x))
            value = output_fn(out, one_row(t) if has_target else None).reshape(())
            kinds[:] = [a is not None for a in capture.argmax]
            argmax = [a for a in capture.argmax if a is not None]
            return value, capture.values, argmax

        mapped = fm._map(single, (0, 0, 0, 0))
        target = self._target()
        parts = []
        with torch.no_grad():
            for part in self._chunks(len(ts)):
                ws = w + ts[part, None] * delta
                act, passive = fm._split(fm.unflatten(ws))
                index = rows[part]
                parts.append(mapped(act, passive, take(integ.inputs, index), take(target, index)))
        self.kinds = kinds
        if parts:
            first = parts[0]
            self.captured_bytes = sum(
                t[0].numel() * t.element_size() for t in (*first[1], *first[2])
            )
        f = torch.cat([p[0] for p in parts])
        values = [torch.cat([p[1][k] for p in parts]) for k in range(len(kinds))]
        pools = iter([torch.cat([p[2][j] for p in parts]) for j in range(sum(kinds))])
        argmax = [next(pools) if kind else None for kind in kinds]
        return f, values, argmax

    def gradients(self, w, delta, ts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """∇_w f(x_row; w + tΔ) of query ``rows[k]`` at ``ts[k]``, (p, d_active)."""
        fm, integ = self.fm, self.integ
        output_fn, has_target = integ.output_fn, integ.target is not None

        def single(pa, pp, x, t):
            out = fm._call({**pa, **pp}, one_row(x))
            return output_fn(out, one_row(t) if has_target else None).reshape(())

        mapped = fm._map(grad(single), (0, 0, 0, 0))
        target = self._target()
        parts = []
        for part in self._chunks(len(ts)):
            ws = w + ts[part, None] * delta
            act, passive = fm._split(fm.unflatten(ws))
            index = rows[part]
            g = mapped(act, passive, take(integ.inputs, index), take(target, index))
            parts.append(fm._flat_grads(g, 1))
        self.integ.evaluations += len(ts)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def refine(self, phi, ok, w, delta, change, tol, step: int, q: int):
        """φ_s (n, d_active) again for the queries whose first rule failed, and the node count.

        Args:
            phi: The first rule's φ_s, (n, d_active).
            ok: Which queries it integrated within ``tol``, (n,).
            w: w_s, (d,).
            delta: Δ_s, (d,).
            change: f(x; w_{s+1}) − f(x; w_s), (n,).
            tol: The per-query tolerance of the step, (n,).
            step: The step number (for the list of unconverged steps).
            q: The first rule's node count.
        """
        fm = self.fm
        d_delta = fm.active(delta)
        eps = torch.finfo(fm.dtype).eps
        x, omega = np.polynomial.legendre.leggauss(NODES)  # (on [-1, 1])
        x = torch.tensor((x + 1) / 2, dtype=fm.dtype, device=fm.device)
        omega = torch.tensor(omega / 2, dtype=fm.dtype, device=fm.device)
        phi = phi.clone()
        failing = [int(j) for j in (~ok).nonzero()[:, 0]]
        self.cuts = {}
        if not failing:  # (a rank of a sharded sweep whose queries all passed)
            return phi, q
        settled, nodes = self._at_once(w, delta, failing, phi, change, tol, x, omega, q)
        failing = [j for j in failing if j not in settled]
        # per query: its pieces [a, b, f(a), f(b), ∫_a^b ∇f dt, error], and those to refine
        pieces = {j: [[0.0, 1.0, None, None, phi[j], None]] for j in failing}
        todo = {j: [0] for j in failing}
        for _ in range(ROUNDS):
            work = [(j, i) for j in todo for i in todo[j]]
            if not work:
                break
            # 1. the ends and the middle of each piece: f and the switching quantities
            ends = [(pieces[j][i][0], pieces[j][i][1]) for j, i in work]
            ts = torch.tensor(
                [t for a, b in ends for t in (a, 0.5 * (a + b), b)], dtype=fm.dtype
            ).to(fm.device)
            rows = torch.tensor([j for j, _ in work for _ in range(3)])
            f, values, argmax = self.probe(w, delta, ts, rows)
            f3 = f.reshape(-1, 3).tolist()
            # 2. the switches bracketed by (a, middle) and (middle, b), 3. located
            lo = torch.arange(len(ts)).reshape(-1, 3)[:, :2].reshape(-1)
            bracket, kk, i1, i2, g_lo, g_hi = self._switches(values, argmax, lo, lo + 1)
            at = _point(bracket)
            roots, f_roots = self._locate(
                w, delta, ts[at], ts[at + 1], rows[at], kk, i1, i2, g_lo, g_hi
            )
            by_piece: dict[int, list[tuple[float, float]]] = {}
            for b_, t_, f_ in zip(bracket.tolist(), roots.tolist(), f_roots.tolist(), strict=True):
                by_piece.setdefault(b_ // 2, []).append((t_, f_))
            # 4. split: at the switches, else in the middle
            new: list[tuple[int, float, float, float, float]] = []  # (query, a, b, fa, fb)
            for k, (j, _) in enumerate(work):
                a, b = ends[k]
                fa, fm_, fb = f3[k]
                inside = sorted(
                    (t_, f_) for t_, f_ in by_piece.get(k, []) if a + 64 * eps < t_ < b - 64 * eps
                )
                cuts: list[tuple[float, float]] = []
                for t_, f_ in inside:
                    if not cuts or t_ - cuts[-1][0] > 64 * eps:
                        cuts.append((t_, f_))
                if not cuts:
                    cuts = [(0.5 * (a + b), fm_)]
                points = [(a, fa), *cuts, (b, fb)]
                for (ta, fa_), (tb, fb_) in zip(points[:-1], points[1:], strict=True):
                    new.append((j, ta, tb, fa_, fb_))
            # 5. Gauss–Legendre on the new pieces
            integrals = self._pieces(w, delta, [p[:3] for p in new], x, omega)
            fd = torch.tensor([p[4] - p[3] for p in new], dtype=fm.dtype).to(fm.device)
            errors = (integrals @ d_delta - fd).abs().tolist()
            replaced: dict[int, list] = {j: [] for j in todo}
            for k, (j, ta, tb, fa_, fb_) in enumerate(new):
                replaced[j].append([ta, tb, fa_, fb_, integrals[k], errors[k]])
            # 6. each query's step checked as a whole; its worst pieces refined again
            for j in list(todo):
                refined = set(todo[j])
                kept = [p for i, p in enumerate(pieces[j]) if i not in refined]
                pieces[j] = sorted(kept + replaced[j], key=lambda p: p[0])
                phi[j] = torch.stack([p[4] for p in pieces[j]]).sum(0)
                nodes = max(nodes, NODES * len(pieces[j]))
                err = float((phi[j] @ d_delta - change[j]).abs())
                noise = float(eps * fm.d_active**0.5 * (phi[j].abs() @ d_delta.abs()))
                if err <= max(float(tol[j]), 4 * noise):
                    del todo[j]
                    continue
                share = float(tol[j])
                worst = max(range(len(pieces[j])), key=lambda i: pieces[j][i][5])
                over = [i for i, p in enumerate(pieces[j]) if p[5] > share * (p[1] - p[0])]
                todo[j] = sorted(set(over) | {worst})
                if len(pieces[j]) + len(todo[j]) > MAX_PIECES:
                    break
            else:
                continue
            break
        self.cuts.update({j: [p[0] for p in pieces[j][1:]] for j in pieces})
        if todo:
            self.unconverged += len(todo)
            self.integ.unconverged.append(step)
        return phi, nodes

    def _at_once(self, w, delta, failing, phi, change, tol, x, omega, q):
        """The queries' steps split where their switches are, from one set of forward passes.

        ``GRID`` points of the step per query; each switch between two of them is placed at
        the root of the quadratic through its quantity at those two and a neighbour (exact for
        a first-layer ReLU's input, linear in t); 2 Gauss–Legendre nodes per piece. Updates
        ``phi`` (n, d_active) in place for the queries whose step then passes its check.

        Returns:
            ``(settled, nodes)``: those queries, and the most nodes one of them used.
        """
        fm = self.fm
        eps = torch.finfo(fm.dtype).eps
        m, g = len(failing), len(GRID)
        grid = torch.tensor(GRID, dtype=fm.dtype, device=fm.device)
        rows = torch.tensor(failing).repeat_interleave(g)
        f, values, argmax = self.probe(w, delta, grid.repeat(m), rows)
        lo = (torch.arange(m)[:, None] * g + torch.arange(g - 1)).reshape(-1)
        bracket, kk, i1, i2, g_lo, g_hi = self._switches(values, argmax, lo, lo + 1)
        query, at = bracket // (g - 1), bracket % (g - 1)  # between grid[at] and grid[at + 1]
        near = torch.where(at == 0, 2, at - 1)  # the third point of the quadratic
        third = [v[query * g + near] for v in values]
        g_near = _difference(third, kk, i1, i2) if len(kk) else g_lo
        roots, curved = _quadratic_root(grid[at], grid[at + 1], grid[near], g_lo, g_hi, g_near)
        if bool(curved.any()):  # (not a first layer's input) checked by forward passes
            c = curved.nonzero()[:, 0]
            who = torch.tensor(failing)[query[c]]
            args = (kk[c], i1[c], i2[c], g_lo[c], g_hi[c])
            roots[c] = self._locate(w, delta, grid[at[c]], grid[at[c] + 1], who, *args, roots[c])[0]
        cuts: dict[int, list[float]] = {}
        for k, t in zip(query.tolist(), roots.tolist(), strict=True):
            cuts.setdefault(k, []).append(t)
        pieces = []  # (query's position in failing, a, b)
        for k in cuts:
            points = [0.0]
            for t in sorted(cuts[k]):
                if t - points[-1] > 64 * eps and t < 1 - 64 * eps:
                    points.append(t)
            points.append(1.0)
            pieces += [(k, a, b) for a, b in zip(points[:-1], points[1:], strict=True)]
        if not pieces:
            return set(), q
        integrals = self._pieces(w, delta, [(failing[k], a, b) for k, a, b in pieces], x, omega)
        where = torch.tensor([k for k, _, _ in pieces], device=fm.device)
        candidate = torch.zeros(m, fm.d_active, dtype=fm.dtype, device=fm.device)
        candidate.index_add_(0, where, integrals)
        d_delta = fm.active(delta)
        index = torch.tensor(failing, device=fm.device)
        err = (candidate @ d_delta - change[index]).abs()
        noise = eps * fm.d_active**0.5 * (candidate.abs() @ d_delta.abs())
        passed = (err <= torch.maximum(tol[index], 4 * noise)) & torch.isin(
            torch.arange(m, device=fm.device), where
        )
        phi[index[passed]] = candidate[passed]
        ends: dict[int, list[float]] = {}
        for k, _, b in pieces:
            ends.setdefault(k, []).append(b)
        for k in passed.nonzero()[:, 0].tolist():
            self.cuts[failing[k]] = ends[k][:-1]
        counts = torch.bincount(where, minlength=m)
        nodes = max(q, NODES * int(counts[passed].max())) if bool(passed.any()) else q
        return {failing[k] for k in passed.nonzero()[:, 0].tolist()}, nodes

    def _pieces(self, w, delta, pieces, x, omega) -> torch.Tensor:
        """∫_a^b ∇f dt by Gauss–Legendre for each (query, a, b), (P, d_active)."""
        fm = self.fm
        a = torch.tensor([p[1] for p in pieces], dtype=fm.dtype).to(fm.device)
        h = torch.tensor([p[2] - p[1] for p in pieces], dtype=fm.dtype).to(fm.device)
        at = (a[:, None] + h[:, None] * x).reshape(-1)
        who = torch.tensor([p[0] for p in pieces]).repeat_interleave(len(x))
        g = self.gradients(w, delta, at, who).reshape(len(pieces), len(x), -1)
        return h[:, None] * torch.einsum("k,pkd->pd", omega, g)

    def _switches(self, values, argmax, lo: torch.Tensor, hi: torch.Tensor):
        """The quantities whose side differs between probe points ``lo`` and ``hi`` (B,).

        Returns:
            ``(bracket, k, i1, i2, g_lo, g_hi)``, one entry per switch: its bracket (index
            into lo/hi), quantity k, the positions whose difference ``v[i1] − v[i2]`` changes
            sign (i2 = −1: v[i1] itself, a ReLU input), and that difference at lo and hi.
        """
        found = []
        for k, (v, am) in enumerate(zip(values, argmax, strict=True)):
            va, vb = v[lo], v[hi]
            if am is None:
                bracket, e = ((va > 0) != (vb > 0)).nonzero(as_tuple=True)
                i1, i2 = e, torch.full_like(e, -1)
                g_lo, g_hi = va[bracket, e], vb[bracket, e]
            else:
                ia, ib = am[lo], am[hi]
                bracket, o = (ia != ib).nonzero(as_tuple=True)
                i1, i2 = ia[bracket, o], ib[bracket, o]
                g_lo = va[bracket, i1] - va[bracket, i2]
                g_hi = vb[bracket, i1] - vb[bracket, i2]
                # a tie at an end (a window of dead ReLUs, ...): no crossing between them
                real = (g_lo > 0) & (g_hi < 0)
                bracket, i1, i2, g_lo, g_hi = (t[real] for t in (bracket, i1, i2, g_lo, g_hi))
            found.append((bracket, torch.full_like(bracket, k), i1, i2, g_lo, g_hi))
        if not found:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, empty, empty, empty.to(self.fm.dtype), empty.to(self.fm.dtype)
        return tuple(torch.cat(parts) for parts in zip(*found, strict=True))

    def _locate(self, w, delta, lo, hi, who, kk, i1, i2, g_lo, g_hi, guess=None):
        """Where each switch happens: the Illinois method on its quantity, batched.

        Args:
            w: w_s, (d,).
            delta: Δ_s, (d,).
            lo: Where each switch's bracket starts, (m,).
            hi: Where it ends, (m,).
            who: Its query, (m,).
            kk: Its quantity's capture (see `_switches`), (m,).
            i1: The position of the quantity, (m,).
            i2: The position subtracted from it, or −1, (m,).
            g_lo: The quantity at lo, (m,).
            g_hi: The quantity at hi, on the other side of 0, (m,).
            guess: A first point to try in each bracket (m,), or None (the secant).

        Returns:
            ``(t, f)``: where each switches, and the explained output there (the last point
            evaluated), (m,) each.
        """
        eps = torch.finfo(self.fm.dtype).eps
        lo, hi, g_lo, g_hi = lo.clone(), hi.clone(), g_lo.clone(), g_hi.clone()
        scale = torch.maximum(g_lo.abs(), g_hi.abs())
        t_root = torch.full_like(lo, float("nan"))
        f_root = torch.full_like(lo, float("nan"))
        side = torch.zeros_like(kk)
        active = torch.ones_like(kk, dtype=torch.bool)
        for iteration in range(ITERATIONS):
            idx = active.nonzero()[:, 0]
            if not len(idx):
                break
            a, b, ga, gb = lo[idx], hi[idx], g_lo[idx], g_hi[idx]
            t = (a * gb - b * ga) / (gb - ga)
            if iteration == 0 and guess is not None:
                t = guess
            bad = ~torch.isfinite(t) | (t <= a) | (t >= b)
            t = torch.where(bad, 0.5 * (a + b), t)
            f, values, _ = self.probe(w, delta, t, who[idx])
            g = _difference(values, kk[idx], i1[idx], i2[idx])
            moved = torch.where(torch.isnan(t_root[idx]), 1.0, (t - t_root[idx]).abs())
            t_root[idx], f_root[idx] = t, f
            same = (g > 0) == (ga > 0)  # the switch is in (t, b)
            new_a, new_ga = torch.where(same, t, a), torch.where(same, g, ga)
            new_b, new_gb = torch.where(same, b, t), torch.where(same, gb, g)
            # Illinois: the end that stayed twice in a row counts half
            new_gb = torch.where(same & (side[idx] == 1), 0.5 * new_gb, new_gb)
            new_ga = torch.where(~same & (side[idx] == -1), 0.5 * new_ga, new_ga)
            lo[idx], hi[idx], g_lo[idx], g_hi[idx] = new_a, new_b, new_ga, new_gb
            side[idx] = torch.where(same, 1, -1)
            done = (g.abs() <= 16 * eps * scale[idx]) | (new_b - new_a <= 8 * eps)
            done |= moved <= 0.01 * eps**0.5  # (superlinear: t is then much closer)
            active[idx[done]] = False
        return t_root, f_root


def _point(bracket: torch.Tensor) -> torch.Tensor:
    """The probe point opening each bracket: brackets 2i, 2i + 1 open at 3i, 3i + 1."""
    return 3 * (bracket // 2) + bracket % 2


def _difference(values, kk, i1, i2) -> torch.Tensor:
    """``v_k[i1] − v_k[i2]`` (or ``v_k[i1]`` where i2 = −1) of each switch at its own point."""
    out = torch.zeros(len(kk), dtype=values[0].dtype, device=values[0].device)
    rows = torch.arange(len(kk), device=kk.device)
    for k, v in enumerate(values):
        mine = kk == k
        r = rows[mine]
        one = v[r, i1[mine]]
        two = torch.where(i2[mine] >= 0, v[r, i2[mine].clamp_min(0)], torch.zeros_like(one))
        out[mine] = one - two
    return out


def _quadratic_root(t_lo, t_hi, t_near, g_lo, g_hi, g_near):
    """The root in (t_lo, t_hi) of the quadratic through three points (g_lo, g_hi: opposite sides).

    Where the quadratic has none there (rounding), the secant of the bracket.

    Returns:
        ``(roots, curved)``: the roots, and whether the quadratic is not a line to rounding
        (then the root is a guess to check).
    """
    d1 = (g_hi - g_lo) / (t_hi - t_lo)
    d2 = (g_near - g_hi) / (t_near - t_hi)
    a = (d2 - d1) / (t_near - t_lo)
    b = d1 - a * (t_lo + t_hi)
    c = g_lo - (a * t_lo + b) * t_lo
    secant = (t_lo * g_hi - t_hi * g_lo) / (g_hi - g_lo)
    disc = (b * b - 4 * a * c).clamp_min(0).sqrt()
    half = -0.5 * (b + torch.where(b < 0, -disc, disc))
    roots = torch.stack([half / a, c / half, secant])
    inside = (roots > t_lo) & (roots < t_hi) & torch.isfinite(roots)
    inside[2] = True  # (the secant, last resort)
    first = inside.to(torch.int8).argmax(0)
    eps = torch.finfo(g_lo.dtype).eps
    spread = (t_near - t_lo).abs().maximum((t_near - t_hi).abs())
    curved = a.abs() * spread**2 > 1024 * eps * (g_lo.abs() + g_hi.abs() + g_near.abs())
    return roots.gather(0, first[None])[0], curved
