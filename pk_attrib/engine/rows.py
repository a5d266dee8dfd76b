"""Row cotangents: per-example gradients when vmap cannot batch the output_fn or the loss.

A query's explained value is ``output_fn(outputs, target)[j]`` and a training example's loss
ℓ_i = ``loss_fn(outputs_i, label_i)``; by the chain rule at parameters w,

    ∇_w output_fn(f(x; w))[j] = J_j(w)ᵀ G_j,     G = ∂ Σ_k output_fn(O)[k] / ∂O  at O = f(x; w)

when row j of output_fn's value depends on row j of the outputs only (then G's row j is
∂ output_fn(O)[j] / ∂O_j). So each query's gradient is the per-example gradient of the scalar
⟨G_j, f(x_j; w)⟩ with G_j held fixed: the model is vmapped, ``output_fn`` never is; it is called
once, on the whole output tensor of one batched forward, and differentiated by ordinary
autograd. The same holds for a training loss, whose cotangent rows are taken row by row
(ℓ_i is the loss of a batch of one, whatever its reduction) without a model pass per example.

`check_row_independence` verifies, once per ``output_fn``, that its row j reads row j only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vmap
from torch.utils import _pytree as pytree

from ..exceptions import RowDependenceError
from .batches import n_rows, one_row, take

# the ways per-example gradients are computed, as `Diagnostics.routes` names them
VMAP = "vmap(grad)"
ROWS = "batched forward + row VJP"
LOOP = "one example at a time"


class NotRows(ValueError):
    """output_fn reads an output without a row per query: the row route cannot be taken."""


def _floating(flat: list) -> list[int]:
    return [j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _probes(outputs: Any) -> tuple[list, Any, list[int], list[torch.Tensor], Any]:
    """The outputs with their floating tensors replaced by leaves that require grad."""
    flat, spec = pytree.tree_flatten(outputs)
    where = _floating(flat)
    probes = [flat[j].detach().requires_grad_() for j in where]
    tree = list(flat)
    for j, probe in zip(where, probes, strict=True):
        tree[j] = probe
    return flat, spec, where, probes, pytree.tree_unflatten(tree, spec)


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def output_cotangents(
    output_fn: Callable, outputs: Any, target: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """Values and output cotangents of the queries at q points, from one call of output_fn.

    Args:
        output_fn: ``output_fn(outputs, target) -> (n,)``, row-independent
            (`check_row_independence`).
        outputs: The model's outputs for n queries at q points: every tensor (q, n, ...).
        target: (n,) or None.
        n: The number of queries.

    Returns:
        ``(values, where, cotangents)``: output_fn's values (q, n); the positions of the output
        leaves output_fn reads (in ``pytree.tree_flatten`` order); and for each, the cotangent
        ∂ output_fn(O)[j] / ∂O_j of every row, (q, n, ...).

    Raises:
        NotRows: A tensor output has no row per query.
    """
    q = next(t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)).shape[0]
    with torch.enable_grad():
        if isinstance(outputs, torch.Tensor):  # the q points' rows as one batch of q·n rows
            if outputs.dim() < 2 or outputs.shape[1] != n:
                raise NotRows("the outputs have no row per query")
            rows = outputs.detach().reshape(q * n, *outputs.shape[2:])
            probes = [rows.requires_grad_()] if rows.is_floating_point() else []
            where, shapes = [0] * len(probes), [outputs.shape]
            tiled = None if target is None else target.repeat(q, *[1] * (target.dim() - 1))
            values = output_fn(rows, tiled).reshape(q, n)
        else:  # a tuple or dict of outputs: one call per point
            flat, _, where, probes, tree = _probes(outputs)
            shapes = [flat[j].shape for j in where]
            values = torch.stack([output_fn(take(tree, k), target).reshape(n) for k in range(q)])
        grads = [None] * len(probes)
        if probes and values.requires_grad:
            grads = torch.autograd.grad(values.sum(), probes, allow_unused=True)
    read = [
        (j, g.reshape(shape))
        for j, g, shape in zip(where, grads, shapes, strict=False)
        if g is not None
    ]
    return values.detach(), [j for j, _ in read], [g for _, g in read]


def check_row_independence(
    output_fn: Callable, outputs: Any, target: torch.Tensor | None, m: int
) -> None:
    """Raise unless row j of output_fn's value depends on row j of the outputs only.

    Checked on a batch of m ≥ 2 queries' outputs: each row's value must not change when it
    is computed from that row alone (a batch of one), and its gradient must vanish on every
    other row.

    Args:
        output_fn: ``output_fn(outputs, target) -> (m,)``.
        outputs: The model's outputs for m queries (tensors (m, ...) where batch-first; the
            others, read as they are, are not checked).
        target: (m,) or None.
        m: The number of queries.

    Raises:
        RowDependenceError: A row's value depends on other rows (a batch mean, a softmax over
            the batch), or output_fn does not return one value per row.
    """
    name = _name(output_fn)
    with torch.enable_grad():
        flat, _, where, probes, tree = _probes(outputs)
        values = output_fn(tree, target)
        if not isinstance(values, torch.Tensor) or values.numel() != m:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise RowDependenceError(
                f"output_fn {name} must return one value per query, (n,); for {m} queries it "
                f"returned {got}"
            )
        values = values.reshape(m)
        for r in range(m if values.requires_grad else 0):
            grads = torch.autograd.grad(values[r], probes, retain_graph=True, allow_unused=True)
            for g in grads:
                if g is None or g.dim() == 0 or g.shape[0] != m:
                    continue
                others = torch.cat([g[:r], g[r + 1 :]])
                if bool((others != 0).any()):
                    raise RowDependenceError(_dependent(name, r, m))
    batch_first = all(flat[j].dim() and flat[j].shape[0] == m for j in where)
    if not batch_first:
        return
    with torch.no_grad():
        for r in range(m):
            alone = output_fn(take(outputs, slice(r, r + 1)), _row(target, r)).reshape(())
            # (the two evaluations differ by the rounding of output_fn's operations)
            scale = max(float(values[r].abs()), _largest(take(outputs, slice(r, r + 1))))
            tol = 64 * torch.finfo(values.dtype).eps * scale
            if not float((alone - values[r]).abs()) <= tol:
                raise RowDependenceError(_dependent(name, r, m))


def _row(target, r: int):
    return None if target is None else target[r : r + 1]


def _largest(outputs) -> float:
    flat = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return max((float(t.detach().abs().max()) for t in flat if t.is_floating_point() and t.numel()),
               default=0.0)  # fmt: skip


def _dependent(name: str, r: int, m: int) -> str:
    return (
        f"output_fn {name} computes the value of query {r} from the outputs of other queries "
        f"too (checked on {m} queries: its value or gradient changes with their rows); "
        "pk_attrib explains each query's own value, so output_fn must act row by row, e.g. "
        "subtract a fixed reference rather than the batch mean"
    )


def loss_cotangents(
    loss_fn: Callable, outputs: Any, labels: Any, lead: int = 1, vectorized: bool | None = None
) -> tuple[list, bool | None]:
    """∂ℓ_i/∂O_i of each example's loss from its own batch-of-one outputs (no model pass).

    ℓ_i is ``loss_fn`` summed on example i as a batch of one, whatever its reduction. The
    losses of all rows come from one call vectorized by ``torch.func.vmap`` (a forward pass,
    which vmap batches where it cannot batch the loss's gradient, as with ``one_hot``), and
    are differentiated by ordinary autograd; the first such call is checked against calls
    row by row, and a loss that vmap cannot trace or that gives other numbers under it is
    called row by row.

    Args:
        loss_fn: ``loss_fn(outputs, labels)``.
        outputs: Batch-of-one outputs of B examples, stacked along ``lead`` mapped leading
            dimensions: every tensor (*M, 1, ...) with prod(M) = B, examples in row-major order.
        labels: The B examples' labels, each tensor (B, ...).
        lead: The number of mapped leading dimensions (1, or 2 for steps x examples).
        vectorized: Whether the vectorized call is known to give the row-by-row numbers
            (None: not known yet).

    Returns:
        ``(cotangents, vectorized)``: one cotangent per leaf of ``outputs`` in
        ``pytree.tree_flatten`` order (None where the loss reads nothing), shaped as that
        leaf; and what is now known about the vectorized call.
    """
    b = n_rows(labels)
    with torch.enable_grad():
        flat, _, where, probes, tree = _probes(outputs)
        rows = pytree.tree_map(
            lambda t: t.reshape(b, *t.shape[lead:]) if isinstance(t, torch.Tensor) else t, tree
        )

        def by_rows() -> torch.Tensor:
            each = [loss_fn(take(rows, i), take(labels, slice(i, i + 1))).sum() for i in range(b)]
            return torch.stack(each) if each else torch.zeros(0)

        losses = None
        if vectorized is not False and b:
            try:
                losses = vmap(lambda o, y: loss_fn(o, one_row(y)).sum())(rows, labels)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                if not_vmaps_doing(err):
                    raise
                vectorized = False
            if losses is not None and vectorized is None:
                slow = by_rows()
                tol = 8 * torch.finfo(slow.dtype).eps * slow.detach().abs().clamp_min(1e-30)
                vectorized = bool(((losses.detach() - slow.detach()).abs() <= tol).all())
                losses = losses if vectorized else slow
        if losses is None:
            losses = by_rows()
        grads = [None] * len(where)
        if losses.requires_grad:
            grads = torch.autograd.grad(losses.sum(), probes, allow_unused=True)
    out: list = [None] * len(flat)
    for j, g in zip(where, grads, strict=True):
        out[j] = g
    return out, vectorized


def zero_if_unread(flat: list, where: list[int], cots: list) -> tuple[list[int], list]:
    """A zero cotangent on the first floating output when nothing is read (a constant)."""
    if where:
        return where, cots
    j = _floating(flat)[0]
    return [j], [torch.zeros_like(flat[j])]


def row_query_grads(fm, output_fn: Callable, act, passive, inputs, target) -> tuple[dict, Any]:
    """∇_w output_fn(f(x; w))[j] for n queries at q points, output_fn never vmapped.

    One batched forward per point (vmapped over the points only), one call of output_fn on
    all the outputs, and per-query gradients of ⟨G_j, f(x_j; w)⟩ (`output_cotangents`).

    Args:
        fm: The `FunctionalModel`.
        output_fn: The explained quantity, row-independent.
        act: The differentiated parameters, each (q, *shape).
        passive: The other parameters, each (q, *shape).
        inputs: The queries' inputs, each (n, ...).
        target: (n,) or None.

    Returns:
        ``(grads, values)``: name -> (q, n, *shape), and output_fn's values (q, n).

    Raises:
        NotRows: output_fn reads an output whose first dimension is not the queries'.
    """
    forward = fm._map(lambda pa, pp, x: fm._call({**pa, **pp}, x), (0, 0, None))
    with torch.no_grad():
        outputs = forward(act, passive, inputs)
    flat = pytree.tree_flatten(outputs)[0]
    n = n_rows(inputs)
    q = next(t for t in flat if isinstance(t, torch.Tensor)).shape[0]
    values, where, cots = output_cotangents(output_fn, outputs, target, n)
    if any(c.dim() < 2 or tuple(c.shape[:2]) != (q, n) for c in cots):
        raise NotRows("output_fn reads an output without a row per query")
    where, cots = zero_if_unread(flat, where, cots)

    def single(pa, pp, x, cs):
        out = pytree.tree_flatten(fm._call({**pa, **pp}, one_row(x)))[0]
        return sum((out[j] * c.unsqueeze(0)).sum() for j, c in zip(where, cs, strict=True))

    per_query = fm._map(grad(single), (None, None, 0, 0))
    return fm._map(per_query, (0, 0, None, 0))(act, passive, inputs, cots), values


def row_loss_grads(fm, loss_fn: Callable, levels: list, act, passive, inputs, labels) -> dict:
    """Per-example loss gradients with the loss never vmapped: rows of one mapped forward.

    The examples' batch-of-one outputs come from one (vmapped) forward, the loss is called on
    each row of them for its cotangent (`loss_cotangents`), and each example's gradient is that
    of ⟨G_i, f(x_i; w)⟩.

    Args:
        fm: The `FunctionalModel`.
        loss_fn: The training loss.
        levels: The ``in_dims`` of (active, passive, inputs, labels), innermost map first (as
            ``FunctionalModel`` maps ``grad`` of one example's loss).
        act: The differentiated parameters, as that map takes them.
        passive: The other parameters, likewise.
        inputs: The examples' inputs, likewise.
        labels: Their labels, likewise.

    Returns:
        name -> (*mapped dims, *shape), as the vmapped gradient of the loss returns it.
    """

    def nest(fn, dims_of):
        for dims in levels:
            fn = fm._map(fn, dims_of(dims))
        return fn

    forward = nest(lambda pa, pp, x: fm._call({**pa, **pp}, one_row(x)), lambda d: d[:3])
    with torch.no_grad():
        outputs = forward(act, passive, inputs)
    lead = len(levels)
    rows = pytree.tree_map(
        lambda t: t.reshape(-1, *t.shape[lead:]) if isinstance(t, torch.Tensor) else t, labels
    )
    flat = pytree.tree_flatten(outputs)[0]
    every, vectorized = loss_cotangents(loss_fn, outputs, rows, lead, fm._vectorized.get(loss_fn))
    fm._vectorized.set(loss_fn, vectorized)
    where = [j for j, c in enumerate(every) if c is not None]
    where, cots = zero_if_unread(flat, where, [every[j] for j in where])

    def single(pa, pp, x, cs):
        out = pytree.tree_flatten(fm._call({**pa, **pp}, one_row(x)))[0]
        return sum((out[j] * c).sum() for j, c in zip(where, cs, strict=True))

    return nest(grad(single), lambda d: d)(act, passive, inputs, cots)


class Memo:
    """A value per function, held weakly (a few strongly, for objects without weak refs)."""

    def __init__(self):
        self._weak: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, Any]] = {}

    def get(self, fn: Any) -> Any:
        """The value kept for ``fn`` (None if none)."""
        try:
            return self._weak.get(fn)
        except TypeError:
            return self._strong.get(id(fn), (None, None))[1]

    def set(self, fn: Any, value: Any) -> None:
        """Keep ``value`` for ``fn``."""
        try:
            self._weak[fn] = value
        except TypeError:
            if len(self._strong) >= 16:
                self._strong.pop(next(iter(self._strong)))
            self._strong[id(fn)] = (fn, value)


def not_vmaps_doing(err: BaseException) -> bool:
    """Whether a loop would not cure this vmap error.

    Random operations (vmap refuses them on purpose: a loop would give other numbers on
    every call) and failed allocations are the model's or the machine's, not vmap's.
    """
    text = str(err)
    return (
        isinstance(err, torch.OutOfMemoryError)
        or "random operation" in text
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def routed(fm, fn: Callable, kind: str, vmapped: Callable, rows: Callable, looped: Callable):
    """Call ``vmapped`` (vmap of the whole example), or ``rows`` where vmap cannot batch fn.

    The first call tries vmap; if it fails, the rows route (the model vmapped, ``fn`` not)
    is taken from then on. Where the model itself cannot be vmapped, ``looped`` (`_map`,
    one example at a time) is.
    """

    def call(*args):
        route = fm.route_of(fn)
        if route is None:
            # the model's own route first (vmap, stand-ins or the loop), so that a model vmap
            # cannot batch is not taken for a function it cannot
            fm.settle_route(args[2])
            try:
                out, route = vmapped(*args), VMAP
            except (RuntimeError, NotImplementedError, ValueError) as err:
                if not_vmaps_doing(err):
                    raise
                try:
                    out, route = rows(*args), ROWS
                except NotRows:
                    out, route = looped(*args), LOOP
                route = LOOP if fm.looped else route
            fm._route.set(fn, route)
        elif route == ROWS:
            out = rows(*args)
        else:
            out = looped(*args)
        fm.routes[kind] = route if not fm.looped else LOOP
        return out

    return call
