"""Dot products of ``nn.Linear`` gradients without forming per-example gradients.

For a Linear layer with input a_t and output gradient δ_t at positions t, an example's
gradient is [∂W | ∂b] = Σ_t δ_t [a_t; 1]ᵀ, so the dot product of two examples' gradients is

    Σ_{t,t'} (δ_t · δ'_{t'}) (a_t · a'_{t'} + 1)

— (in + out) work per pair instead of in × out. The activations and output gradients come
from one forward pass with hooks and one backward pass of the summed per-example scalars
(examples do not interact in eval mode). Parameters outside Linear layers use ordinary
per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from .batches import n_rows
from .functional import FunctionalModel


def linear_layers(
    fm: FunctionalModel, names: Sequence[str] | None = None
) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """The model's Linear layers whose parameters are all differentiated, and the rest.

    Args:
        fm: The functional model.
        names: The parameters to consider, in flat-vector order (default: the active ones).

    Returns:
        ``([(module, weight name, bias name or None)], [the other names])``.
    """
    names = list(fm.active_names if names is None else names)
    active = set(names)
    layers = []
    for mod_name, module in fm.model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        weight, bias = prefix + "weight", prefix + "bias"
        if weight in active and (module.bias is None or bias in active):
            layers.append((mod_name, weight, bias if module.bias is not None else None))
    covered = {n for _, w, b in layers for n in (w, b) if n}
    return layers, [n for n in names if n not in covered]


def example_losses(fm: FunctionalModel, labels, loss_fn) -> Callable:
    """``outputs -> (B,)``: each example's training loss, for `capture`."""
    return lambda outputs: fm.per_example_losses(outputs, labels, loss_fn)


@dataclass
class LayerFactors:
    """Per-example factors: per layer (a (B, T, in), δ (B, T, out)), and other gradients."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rest: torch.Tensor | None  # (B, d_rest)


def capture(
    fm: FunctionalModel,
    w: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    scalars: Callable[[torch.Tensor], torch.Tensor],
    layers: list[tuple[str, str, str | None]],
    rest: list[str] = (),
    per_example_rest: Callable[[list[str]], torch.Tensor] | None = None,
    check: bool = False,
) -> LayerFactors | None:
    """Activations and output gradients of each Linear layer for ∂(Σ_i scalars_i)/∂outputs.

    One batched forward and backward pass (T: positions of a sequence, 1 for plain vectors;
    a layer called several times has the positions of all its calls), so example i's
    gradient of a layer is Σ_t δ_t a_tᵀ (bias: Σ_t δ_t). A layer whose output does not
    reach the scalars gets δ = 0.

    Args:
        fm: The functional model.
        w: Flat parameters, (d,).
        inputs: The batch's inputs, each (B, ...).
        scalars: ``outputs -> (B,)`` per-example quantity whose gradient is taken.
        layers: From `linear_layers`.
        rest: Active parameters outside those layers.
        per_example_rest: ``names -> (B, d_rest)`` per-example gradients of ``rest``.
        check: Return None unless every call ran on batch-first inputs ((B, ...) or
            flattened (B·T, ...)) and the captured terms add up to autograd's gradient of
            each weight and bias, for the batch and for its first example alone (a weight
            also used outside its module fails this, and so do positions grouped into the
            wrong examples, e.g. time-major (T, B, ...) inputs).

    Returns:
        The factors (a (B, T, in), δ (B, T, out)) per layer, with ``rest``'s gradients.
    """
    modules = dict(fm.model.named_modules())
    calls: dict[str, list[tuple[Any, torch.Tensor]]] = {m: [] for m, _, _ in layers}
    handles = []
    for mod_name, _, _ in layers:

        def hook(module, args, output, mod_name=mod_name):
            calls[mod_name].append((args[0] if args else None, output))

        handles.append(modules[mod_name].register_forward_hook(hook))
    owned = [n for _, weight, bias in layers for n in (weight, bias) if n]
    batch = n_rows(inputs)
    try:
        with torch.enable_grad():
            params = {n: p.detach() for n, p in fm.unflatten(w).items()}
            for n in owned:
                params[n].requires_grad_(True)
            outputs = functional_call(fm.model, {**fm.constants, **params}, tuple(inputs))
            values = scalars(outputs)
            batched = all(  # batch first: (B, ...) or flattened (B·T, ...)
                isinstance(a, torch.Tensor)
                and a.dim() >= 2
                and a.shape[0] == out.shape[0]
                and a.shape[0] % batch == 0
                for made in calls.values()
                for a, out in made
            )
            if not batched:
                if check:
                    return None
                raise ValueError("a Linear layer ran on inputs without the batch dimension first")
            outs = [out for m, _, _ in layers for _, out in calls[m]]
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
    for mod_name, _, _ in layers:  # every call of a layer adds its positions to T
        acts, deltas = [], []
        for a, out in calls[mod_name]:
            delta = torch.zeros_like(out) if grads[k] is None else grads[k]
            acts.append(a.detach().reshape(batch, -1, a.shape[-1]))
            deltas.append(delta.reshape(batch, -1, delta.shape[-1]))
            k += 1
        module = modules[mod_name]
        like = {"dtype": fm.dtype, "device": fm.device}
        factors[mod_name] = (
            torch.cat(acts, 1) if acts else torch.zeros(batch, 0, module.in_features, **like),
            torch.cat(deltas, 1) if deltas else torch.zeros(batch, 0, module.out_features, **like),
        )
    if check and owned and not (  # (no layer: nothing to check)
        _rebuilds(fm, layers, factors, dict(zip(owned, grads[k:], strict=True)))
        and _rebuilds(fm, layers, _first(factors), dict(zip(owned, first, strict=True)))
    ):
        return None
    rest_grads = per_example_rest(list(rest)) if rest and per_example_rest is not None else None
    return LayerFactors(factors, rest_grads)


def _first(factors: dict) -> dict:
    """The factors of the first example only."""
    return {m: (a[:1], d[:1]) for m, (a, d) in factors.items()}


def _rebuilds(fm, layers, factors, batch_grads) -> bool:
    """Do the captured terms add up to autograd's gradients (to √eps of their size)?"""
    tol = torch.finfo(fm.dtype).eps ** 0.5
    for mod_name, weight, bias in layers:
        act, delta = factors[mod_name]
        pairs = [(weight, "bto,bti->oi", act)] + ([(bias, "bto->o", None)] if bias else [])
        for name, spec, other in pairs:
            ops = (delta,) if other is None else (delta, other)
            mine = torch.einsum(spec, *ops)
            bound = torch.einsum(spec, *(x.abs() for x in ops))
            ref = batch_grads[name]
            ref = torch.zeros_like(mine) if ref is None else ref.reshape(mine.shape)
            if not bool(((mine - ref).abs() <= tol * bound + torch.finfo(fm.dtype).tiny).all()):
                return False
    return True


def dot_products(
    left: LayerFactors,
    right: LayerFactors,
    layers: list[tuple[str, str, str | None]],
    scale: Callable[[str], float],
    rest_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Σ_params scale(param) ∇_p(left_q) · ∇_p(right_i), (n_left, n_right).

    Args:
        left: Factors of the left examples (queries).
        right: Factors of the right examples (training).
        layers: From `linear_layers`.
        scale: A parameter name's weight (its learning rate).
        rest_scale: Per-coordinate weight of the other parameters, scalar or (d_rest,).
    """
    out = None
    for mod_name, weight, bias in layers:
        a_q, d_q = left.factors[mod_name]
        a_i, d_i = right.factors[mod_name]
        dd = torch.einsum("qto,bso->qbts", d_q, d_i)
        aa = torch.einsum("qti,bsi->qbts", a_q, a_i)
        term = scale(weight) * (dd * aa).sum((2, 3))
        if bias is not None:
            term = term + scale(bias) * dd.sum((2, 3))
        out = term if out is None else out + term
    if left.rest is not None:
        term = (left.rest * rest_scale) @ right.rest.T
        out = term if out is None else out + term
    return out


def squared_norms(
    factors: LayerFactors,
    layers: list[tuple[str, str, str | None]],
    scale: Callable[[str], float] | None = None,
    rest_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Σ_params scale(param) ‖∇_p(example)‖², (B,): the diagonal of `dot_products`.

    Args:
        factors: Factors of the examples.
        layers: From `linear_layers`.
        scale: A parameter name's weight (default 1).
        rest_scale: Per-coordinate weight of the other parameters, scalar or (d_rest,).
    """
    out = None
    for mod_name, weight, bias in layers:
        a, d = factors.factors[mod_name]
        dd = torch.einsum("bto,bso->bts", d, d)
        term = (dd * torch.einsum("bti,bsi->bts", a, a)).sum((1, 2))
        if scale is not None:
            term = scale(weight) * term
        if bias is not None:
            term = term + (1.0 if scale is None else scale(bias)) * dd.sum((1, 2))
        out = term if out is None else out + term
    if factors.rest is not None:
        term = (factors.rest * factors.rest * rest_scale).sum(1)
        out = term if out is None else out + term
    return out
