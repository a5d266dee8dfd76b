"""Per-example gradients of layers as outer-product terms, and their dot products.

For a layer (`layers.Layer`) example i's gradient is G_i = Σ_t u_t v_tᵀ, so

    G_i · G_j = Σ_{t,s} (u_t · u'_s)(v_t · v'_s)

— (rows + cols) work per pair of positions instead of rows × cols, and no per-example
gradient is formed. `capture` reads u and v off one forward pass with hooks and one
backward pass of the summed per-example scalars (examples do not interact in eval mode).
Parameters outside the layers use ordinary per-example gradients.

An Embedding's u is the one-hot row of a token: it is kept as the token ids (B, T) (int64)
and its dot products are comparisons or gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .batches import n_rows
from .functional import FunctionalModel
from .layers import Layer
from .outputs import NotBatchFirst

# a pair (u, v): u (B, T, rows) floating, or (B, T) int64 token ids; v (B, T, cols)
Pair = tuple[torch.Tensor, torch.Tensor]
GRAM_ELEMENTS = 1 << 22  # positions' products formed at once by `dot_products` (32 MiB)


def example_losses(fm: FunctionalModel, labels, loss_fn) -> Callable:
    """``outputs -> (B,)``: each example's training loss, for `capture`."""
    return lambda outputs: fm.per_example_losses(outputs, labels, loss_fn)


@dataclass
class LayerFactors:
    """Per-example terms of each layer, and the other parameters' per-example gradients.

    Attributes:
        factors: Layer key -> pairs (u, v) (at most one of floating u and one of token ids;
            every call of every module using the weight, along T).
        rest: (B, d_rest) gradients of the other parameters, or None.
        failed: With ``check``: keys of the layers whose terms did not rebuild autograd's
            gradients (their factors are not to be used).
    """

    factors: dict[str, list[Pair]]
    rest: torch.Tensor | None
    failed: set[str] = field(default_factory=set)

    def rows(self) -> int:
        """The number of examples."""
        for pairs in self.factors.values():
            for _, v in pairs:
                return v.shape[0]
        return 0 if self.rest is None else self.rest.shape[0]


def capture(
    fm: FunctionalModel,
    w: torch.Tensor,
    inputs: Sequence[Any],
    scalars: Callable[[Any], torch.Tensor],
    layers: list[Layer],
    rest: Sequence[str] = (),
    per_example_rest: Callable[[list[str]], torch.Tensor] | None = None,
    check: bool = False,
) -> LayerFactors:
    """The layers' terms (u, v) per example for ∂(Σ_i scalars_i)/∂w, from one batched pass.

    Args:
        fm: The functional model.
        w: Flat parameters, (d,).
        inputs: The batch's inputs, each (B, ...).
        scalars: ``outputs -> (B,)`` per-example quantity whose gradient is taken.
        layers: From `layers.find_layers` (or `verify_layers`).
        rest: Active parameters outside those layers.
        per_example_rest: ``names -> (B, d_rest)`` per-example gradients of ``rest``.
        check: Also take autograd's gradients of the layers' parameters, for the batch and
            for its first example, and list in ``failed`` the layers whose terms do not add
            up to them (to √eps of their size), or whose calls do not run on batch-first
            inputs; otherwise such a call raises ValueError.

    Returns:
        The `LayerFactors`.
    """
    modules = dict(fm.model.named_modules())
    calls: dict[str, list[tuple[str, str, Any, torch.Tensor]]] = {x.key: [] for x in layers}
    handles = []
    for layer in layers:
        for mod_name, kind in layer.uses:

            def hook(module, args, output, key=layer.key, mod_name=mod_name, kind=kind):
                calls[key].append((mod_name, kind, args[0] if args else None, output))

            handles.append(modules[mod_name].register_forward_hook(hook))
    owned = [n for layer in layers for n in layer.names]
    batch = n_rows(inputs)
    first = None
    try:
        with torch.enable_grad():
            params = {n: p.detach() for n, p in fm.unflatten(w).items()}
            for n in owned:
                params[n].requires_grad_(True)
            outputs = functional_call(fm.model, {**fm.constants, **params}, tuple(inputs))
            values = scalars(outputs)
            failed = {
                key
                for key, made in calls.items()
                if not all(_batch_first(kind, a, out, batch) for _, kind, a, out in made)
            }
            if failed and not check:
                raise ValueError("a layer ran on inputs without the batch dimension first")
            outs = [out for key, made in calls.items() for _, _, _, out in made]
            wanted = outs + ([params[n] for n in owned] if check else [])
            grads = (
                torch.autograd.grad(values.sum(), wanted, allow_unused=True, retain_graph=check)
                if wanted
                else ()
            )
            if check and owned:  # one example's own gradient, to check the grouping too
                first = torch.autograd.grad(
                    values[0], [params[n] for n in owned], allow_unused=True
                )
    finally:
        for handle in handles:
            handle.remove()
    factors, k = {}, 0
    for layer in layers:
        dense, ids = [], []
        for mod_name, kind, a, out in calls[layer.key]:
            delta = torch.zeros_like(out) if grads[k] is None else grads[k]
            k += 1
            if layer.key in failed:
                continue
            u, v = _terms(kind, modules[mod_name], a, delta, batch)
            (ids if u.dtype == torch.int64 else dense).append((u.detach(), v.detach()))
        pairs = [
            (torch.cat([u for u, _ in p], 1), torch.cat([v for _, v in p], 1))
            for p in (dense, ids)
            if p
        ]
        if not pairs:  # never called: a zero gradient
            like = {"dtype": fm.dtype, "device": fm.device}
            pairs = [
                (
                    torch.zeros(batch, 0, layer.rows, **like),
                    torch.zeros(batch, 0, layer.cols, **like),
                )
            ]
        factors[layer.key] = pairs
    if check and owned:
        batch_grads = dict(zip(owned, grads[k:], strict=True))
        own = dict(zip(owned, first, strict=True))
        for layer in layers:
            if layer.key in failed:
                continue
            pairs = factors[layer.key]
            if not (
                _rebuilds(fm, layer, pairs, batch_grads)
                and _rebuilds(fm, layer, [(u[:1], v[:1]) for u, v in pairs], own)
            ):
                failed.add(layer.key)
    rest_grads = per_example_rest(list(rest)) if rest and per_example_rest is not None else None
    return LayerFactors(factors, rest_grads, failed)


def verify_layers(
    fm: FunctionalModel,
    w: torch.Tensor,
    batch: Sequence,
    loss_fn,
    layers: list[Layer],
    rest: list[str],
) -> tuple[list[Layer], list[str]]:
    """Keep the layers whose captured terms rebuild the training loss's gradients.

    Checked on a batch of at least two examples (one alone cannot show how a layer's rows
    group into examples): each kept layer's terms add up to autograd's gradient of the
    batch's summed loss and of its first example's loss. A layer that fails joins ``rest``
    (per-example gradients), in flat-vector order.

    Args:
        fm: The functional model.
        w: Flat parameters, (d,).
        batch: ``(inputs..., labels)`` of a few training examples.
        loss_fn: The training loss.
        layers: From `find_layers`.
        rest: The other parameters.

    Returns:
        ``(layers, rest)`` as `find_layers` returns them.
    """
    if not layers:
        return layers, rest
    *inputs, labels = batch
    try:
        found = capture(fm, w, inputs, example_losses(fm, labels, loss_fn), layers, check=True)
        failed = found.failed
    except NotBatchFirst:  # the loss reads outputs without a row per example
        failed = {layer.key for layer in layers}
    kept = [layer for layer in layers if layer.key not in failed]
    dropped = {n for layer in layers if layer.key in failed for n in layer.names}
    order = {n: i for i, n in enumerate(fm.names)}
    return kept, sorted([*rest, *dropped], key=order.__getitem__)


def _batch_first(kind: str, a: Any, out: torch.Tensor, batch: int) -> bool:
    """Whether a call ran on inputs with the examples first: (B, ...) or flattened (B·T, ...)."""
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return False
    if kind == "conv2d":
        return a.dim() == 4 and a.shape[0] == batch
    if kind == "embedding":
        return a.shape[0] % batch == 0 and out.shape[: a.dim()] == a.shape
    return a.dim() >= 2 and a.shape[0] == out.shape[0] and a.shape[0] % batch == 0


def _terms(kind: str, module, a: torch.Tensor, delta: torch.Tensor, batch: int) -> Pair:
    """(u, v) of one call, in the layer's matrix orientation."""
    if kind == "linear":
        return delta.reshape(batch, -1, delta.shape[-1]), a.reshape(batch, -1, a.shape[-1])
    if kind == "conv1d":
        return a.reshape(batch, -1, a.shape[-1]), delta.reshape(batch, -1, delta.shape[-1])
    if kind == "embedding":
        ids = a.reshape(batch, -1).to(torch.int64)
        v = delta.reshape(batch, ids.shape[1], -1)
        if module.padding_idx is not None:  # the padding row gets no gradient
            v = v * (ids != module.padding_idx).unsqueeze(-1).to(v.dtype)
        return ids, v
    # conv2d: output positions as T; the input patch at each (unfold's (C, kh, kw) order)
    padding_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(a, module._reversed_padding_repeated_twice, mode=padding_mode)
    patches = F.unfold(
        padded, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
    )
    return delta.reshape(batch, delta.shape[1], -1).transpose(1, 2), patches.transpose(1, 2)


def _rebuilds(fm, layer: Layer, pairs: list[Pair], grads: dict) -> bool:
    """Do the terms add up to autograd's gradients of the layer's parameters (to √eps)?"""
    tol = torch.finfo(fm.dtype).eps ** 0.5
    checks = [(layer.weight, weight_grad(layer, pairs, summed=True), None)]
    bound_pairs = [(u if u.dtype == torch.int64 else u.abs(), v.abs()) for u, v in pairs]
    checks[0] = (layer.weight, checks[0][1], weight_grad(layer, bound_pairs, summed=True))
    if layer.bias is not None:
        checks.append(
            (
                layer.bias,
                bias_grad(layer, pairs).sum(0),
                bias_grad(layer, bound_pairs).sum(0),
            )
        )
    for name, mine, bound in checks:
        ref = grads[name]
        ref = torch.zeros_like(mine) if ref is None else ref.reshape(mine.shape)
        if not bool(((mine - ref).abs() <= tol * bound + torch.finfo(fm.dtype).tiny).all()):
            return False
    return True


def _one_hot(ids: torch.Tensor, first: int, last: int, like: torch.Tensor) -> torch.Tensor:
    """(B, T, last − first): the one-hot rows of the ids within rows first..last−1."""
    if last <= first:
        return torch.zeros(*ids.shape, 0, dtype=like.dtype, device=like.device)
    inside = (ids >= first) & (ids < last)
    out = torch.zeros(*ids.shape, last - first, dtype=like.dtype, device=like.device)
    out.scatter_(-1, (ids - first).clamp(0, max(0, last - first - 1)).unsqueeze(-1), 1.0)
    return out * inside.unsqueeze(-1).to(like.dtype)


def weight_grad(
    layer: Layer, pairs: list[Pair], first: int = 0, last: int | None = None, summed=False
) -> torch.Tensor:
    """Rows first..last−1 of each example's weight gradient as a matrix, (B, rows, cols).

    ``summed``: the sum over the examples instead, (rows, cols).
    """
    last = layer.rows if last is None else last
    out = None
    for u, v in pairs:
        u = _one_hot(u, first, last, v) if u.dtype == torch.int64 else u[..., first:last]
        term = torch.einsum("btr,btc->rc" if summed else "btr,btc->brc", u, v)
        out = term if out is None else out + term
    return out


def bias_grad(layer: Layer, pairs: list[Pair]) -> torch.Tensor:
    """Each example's gradient of the layer's folded bias, (B, n_bias)."""
    side = 0 if layer.bias_side == "v" else 1  # a column: Σ_t u_t; a row: Σ_t v_t
    return sum(pair[side].sum(1) for pair in pairs)


def scaled(layer: Layer, pair: Pair, weight: float = 1.0, bias: float = 1.0) -> Pair:
    """(u, v) with the bias's constant appended, weight-part × ``weight``, bias × ``bias``.

    Then Σ_t u_t v_tᵀ is [weight · ∂W | bias · ∂b] as one matrix of `Layer.shape`.
    """
    u, v = pair
    if layer.bias_side == "v":
        return u, torch.cat([v * weight, torch.full_like(v[..., :1], bias)], -1)
    if layer.bias_side == "u":
        return torch.cat([u * weight, torch.full_like(u[..., :1], bias)], -1), v
    return u, (v * weight if weight != 1.0 else v)


def _gram(x: torch.Tensor, y: torch.Tensor, dtype) -> torch.Tensor:
    """(Q, B, T, S) products of positions: dot products, or one-hot ones for token ids."""
    xi, yi = x.dtype == torch.int64, y.dtype == torch.int64
    if xi and yi:
        return (x[:, None, :, None] == y[None, :, None, :]).to(dtype)
    if yi:  # dense x (Q, T, V) against ids y (B, S): x[q, t, y[b, s]]
        return x[:, :, y].permute(0, 2, 1, 3)
    if xi:
        return _gram(y, x, dtype).permute(1, 0, 3, 2)
    return torch.einsum("qtp,bsp->qbts", x, y)


def _layer_dot(left: list[Pair], right: list[Pair], dtype) -> torch.Tensor:
    """Σ over pairs of Σ_{t,s} (u_t·u'_s)(v_t·v'_s), (Q, B)."""
    out = None
    for ul, vl in left:
        for ur, vr in right:
            q, t, b, s = vl.shape[0], vl.shape[1], vr.shape[0], vr.shape[1]
            rows, cols = (ul.shape[-1] if ul.dtype != torch.int64 else None), vl.shape[-1]
            dense = rows is not None and ur.dtype != torch.int64
            if dense and q * b * t * s > (q * t + b * s + q * b) * rows * cols:
                # cheaper to form the gradients (long sequences, conv positions)
                g_l = torch.einsum("qtr,qtc->qrc", ul, vl).reshape(q, -1)
                g_r = torch.einsum("btr,btc->brc", ur, vr).reshape(b, -1)
                term = g_l @ g_r.T
            elif b == 0:
                term = vl.new_zeros(q, 0)
            else:  # (Q, B, T, S) products, B in slices of at most GRAM_ELEMENTS
                size = max(1, GRAM_ELEMENTS // max(1, q * t * s))
                term = torch.cat(
                    [
                        (
                            _gram(ul, ur[a : a + size], dtype)
                            * torch.einsum("qtc,bsc->qbts", vl, vr[a : a + size])
                        ).sum((2, 3))
                        for a in range(0, b, size)
                    ],
                    1,
                )
            out = term if out is None else out + term
    return out


def dot_products(
    left: LayerFactors,
    right: LayerFactors,
    layers: list[Layer],
    scale: Callable[[str], float],
    rest_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Σ_params scale(param) ∇_p(left_q) · ∇_p(right_i), (n_left, n_right).

    Args:
        left: Factors of the left examples (queries).
        right: Factors of the right examples (training).
        layers: The layers both were captured with.
        scale: A parameter name's weight (its learning rate).
        rest_scale: Per-coordinate weight of the other parameters, scalar or (d_rest,).
    """
    out = None
    for layer in layers:
        s_b = scale(layer.bias) if layer.bias is not None else 1.0
        mine = [scaled(layer, p, scale(layer.weight), s_b) for p in left.factors[layer.key]]
        theirs = [scaled(layer, p) for p in right.factors[layer.key]]
        dtype = theirs[0][1].dtype
        term = _layer_dot(mine, theirs, dtype)
        out = term if out is None else out + term
    if left.rest is not None:
        term = (left.rest * rest_scale) @ right.rest.T
        out = term if out is None else out + term
    return out


def squared_norms(
    factors: LayerFactors,
    layers: list[Layer],
    scale: Callable[[str], float] | None = None,
    rest_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Σ_params scale(param) ‖∇_p(example)‖², (B,): the diagonal of `dot_products`.

    Args:
        factors: Factors of the examples.
        layers: The layers they were captured with.
        scale: A parameter name's weight (default 1).
        rest_scale: Per-coordinate weight of the other parameters, scalar or (d_rest,).
    """
    scale = scale or (lambda name: 1.0)
    out = None
    for layer in layers:
        s_b = scale(layer.bias) if layer.bias is not None else 1.0
        pairs = factors.factors[layer.key]
        mine = [scaled(layer, p, scale(layer.weight), s_b) for p in pairs]
        term = _diagonal(mine, [scaled(layer, p) for p in pairs])
        out = term if out is None else out + term
    if factors.rest is not None:
        term = (factors.rest * factors.rest * rest_scale).sum(1)
        out = term if out is None else out + term
    return out


def _diagonal(left: list[Pair], right: list[Pair]) -> torch.Tensor:
    """Σ over pairs of each example's Σ_{t,s} (u_t·u'_s)(v_t·v'_s) with itself, (B,)."""
    out = None
    for ul, vl in left:
        for ur, vr in right:
            b, t, s = vl.shape[0], vl.shape[1], vr.shape[1]
            size = max(1, GRAM_ELEMENTS // max(1, t * s))  # (B, T, S) in slices
            term = (
                torch.cat(
                    [
                        _self_products(
                            ul[a : a + size], vl[a : a + size], ur[a : a + size], vr[a : a + size]
                        )
                        for a in range(0, b, size)
                    ]
                )
                if b
                else vl.new_zeros(0)
            )
            out = term if out is None else out + term
    return out


def _self_products(ul, vl, ur, vr) -> torch.Tensor:
    """Each example's Σ_{t,s} (u_t·u'_s)(v_t·v'_s), (B,)."""
    vv = torch.einsum("btc,bsc->bts", vl, vr)
    if ul.dtype == torch.int64 and ur.dtype == torch.int64:
        uu = (ul[:, :, None] == ur[:, None, :]).to(vv.dtype)
    elif ur.dtype == torch.int64:
        uu = torch.gather(ul, 2, ur[:, None, :].expand(-1, ul.shape[1], -1))
    elif ul.dtype == torch.int64:
        uu = torch.gather(ur, 2, ul[:, None, :].expand(-1, ur.shape[1], -1)).transpose(1, 2)
    else:
        uu = torch.einsum("btr,bsr->bts", ul, ur)
    return (uu * vv).sum((1, 2))
