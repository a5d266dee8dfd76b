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

import torch
from torch.func import functional_call

from .gradients import FunctionalModel


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
    rest: list[str],
    per_example_rest: Callable[[list[str]], torch.Tensor] | None,
) -> LayerFactors:
    """Activations and output gradients of each Linear layer for ∂(Σ_i scalars_i)/∂outputs.

    Args:
        fm: The functional model.
        w: Flat parameters, (d,).
        inputs: The batch's inputs, each (B, ...).
        scalars: ``outputs -> (B,)`` per-example quantity whose gradient is taken.
        layers: From `linear_layers`.
        rest: Active parameters outside those layers.
        per_example_rest: ``names -> (B, d_rest)`` per-example gradients of ``rest``.
    """
    modules = dict(fm.model.named_modules())
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for mod_name, _, _ in layers:

        def hook(module, args, output, mod_name=mod_name):
            captured[mod_name] = (args[0], output)

        handles.append(modules[mod_name].register_forward_hook(hook))
    try:
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True) for n, p in fm.unflatten(w).items()}
            outputs = functional_call(fm.model, {**fm.constants, **params}, tuple(inputs))
            total = scalars(outputs).sum()
            deltas = torch.autograd.grad(total, [captured[m][1] for m, _, _ in layers])
    finally:
        for handle in handles:
            handle.remove()
    batch = inputs[0].shape[0]
    factors = {}
    for (mod_name, _, _), delta in zip(layers, deltas, strict=True):
        act = captured[mod_name][0].detach()
        factors[mod_name] = (
            act.reshape(batch, -1, act.shape[-1]),
            delta.reshape(batch, -1, delta.shape[-1]),
        )
    grads = per_example_rest(rest) if rest and per_example_rest is not None else None
    return LayerFactors(factors, grads)


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
