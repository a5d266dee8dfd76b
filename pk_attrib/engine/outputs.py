"""What is differentiated: the explained output of a query and the losses of training examples.

`select_output` is the default explained quantity (one logit, like Captum's ``target``); an
``output_fn(outputs, target) -> (n,)`` explains anything else. Per-example training losses are
read row by row from a batch's outputs, reduced as the training loop reduced them
(`Reduction`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..exceptions import ArgumentError
from .batches import n_rows, take

OutputFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class Reduction(str, enum.Enum):
    """How the training loss of a batch combines the per-example losses.

    ``MEAN`` (PyTorch's default) weights each example by 1/|B|; ``SUM`` by 1.
    """

    MEAN = "mean"
    SUM = "sum"


def select_output(outputs: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Default explained quantity: the logit ``target`` of each row, or a scalar output.

    Args:
        outputs: Model outputs, (n, C) or (n,) / (n, 1) for scalar models.
        target: Class index per row, int64 (n,), or None for scalar outputs.

    Returns:
        The explained output per row, (n,).
    """
    if target is None:
        if outputs.dim() == 1:
            return outputs
        return outputs.reshape(outputs.shape[0], -1)[:, 0]
    flat = outputs.reshape(outputs.shape[0], -1)
    return flat.gather(1, target.reshape(-1, 1).to(torch.int64))[:, 0]


def read_outputs(outputs, target, output_fn: OutputFn) -> list[torch.Tensor]:
    """The floating tensors of the model's outputs that the explained quantity reads.

    A plain tensor output is read; of a tuple or dict output, the tensors ``output_fn``
    depends on (an auxiliary output it ignores, however large or non-finite, is not).
    Works inside torch.func transforms too (a batch gradient's per-example losses).
    """
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    flat = pytree.tree_leaves(outputs)
    return [flat[j] for j in _read_positions(outputs, target, output_fn)]


def _read_positions(outputs, target, output_fn: OutputFn) -> list[int]:
    """Positions among ``tree_leaves(outputs)`` of the floating tensors ``output_fn`` reads."""
    flat, spec = pytree.tree_flatten(outputs)
    where = [j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not where:
        return []

    def value_of(*probes):
        tree = list(flat)
        for j, probe in zip(where, probes, strict=True):
            tree[j] = probe
        return output_fn(pytree.tree_unflatten(tree, spec), target)

    detached = [flat[j].detach() for j in where]
    try:
        with torch.enable_grad():
            probes = [t.requires_grad_() for t in detached]
    except RuntimeError:  # inside a torch.func transform (a batch gradient): probe with vjp
        grads = _probe_with_vjp(value_of, detached)
    else:
        with torch.enable_grad():
            value = value_of(*probes)
            if not value.requires_grad:
                return []
            grads = torch.autograd.grad(value.sum(), probes, allow_unused=True)
    try:
        return [j for j, g in zip(where, grads, strict=True) if g is not None and bool(g.any())]
    except RuntimeError:  # under torch.func.vmap values cannot be read: count them all
        return where


def _probe_with_vjp(value_of, detached: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradient of Σ value_of(*detached) for each probe, by ``torch.func.vjp``.

    Works inside torch.func transforms, where ``requires_grad_`` is refused; a probe the
    value does not read gets zeros.
    """
    value, pull = torch.func.vjp(lambda *probes: value_of(*probes).sum(), *detached)
    return pull(torch.ones_like(value))


class NotBatchFirst(ValueError):
    """The outputs a loss reads have no row per example (time-major or flattened)."""


def check_rows(outputs: Any, labels: Any, loss_fn: Callable) -> None:
    """Raise unless the outputs the loss reads have a row per example (batch first).

    Per-example losses are read row by row from a batch's outputs; a time-major (T, B, ...)
    or token-flattened (B·T, ...) output would give each example another's rows.
    """
    n = n_rows(labels)
    for t in read_outputs(outputs, labels, loss_fn):
        if t.dim() == 0 or t.shape[0] != n:
            raise NotBatchFirst(
                "influence() and self_influence() read each example's loss from its row of "
                f"the model's outputs, but for {n} examples the output the loss reads has shape "
                f"{tuple(t.shape)}: return outputs with the batch dimension first, (B, ...), or "
                "explain with attribute(output_fn=...), which takes the outputs as they are"
            )


def row_losses(outputs: Any, labels: Any, loss_fn: Callable) -> torch.Tensor:
    """ℓ_i of each row (rows counted by the labels), (B,).

    Only the outputs the loss reads are split into rows: a tuple or dict output may hold
    members that are not batch-first (a GRU's h_n (layers, B, H), a transformer's cache)
    as long as the loss ignores them. The rows are evaluated in one ``torch.func.vmap``
    call where the loss allows it, else one loss call per row.

    Raises:
        NotBatchFirst: The outputs the loss reads have no row per example.
    """
    check_rows(outputs, labels, loss_fn)
    n = n_rows(labels)
    flat, spec = pytree.tree_flatten(outputs)
    whole = []  # members the loss does not read and that have no row per example
    if not isinstance(outputs, torch.Tensor):
        read = set(_read_positions(outputs, labels, loss_fn))
        whole = [
            j
            for j, t in enumerate(flat)
            if isinstance(t, torch.Tensor) and j not in read and (t.dim() == 0 or t.shape[0] != n)
        ]
    if whole and n:
        dims = pytree.tree_unflatten(
            [
                None if j in whole or not isinstance(t, torch.Tensor) else 0
                for j, t in enumerate(flat)
            ],
            spec,
        )
        one = torch.func.vmap(
            lambda out, label: loss_fn(_one_row_of(out, dims), label[None]).sum(),
            in_dims=(dims, 0),
        )
        try:
            return one(outputs, labels)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # a loss vmap cannot trace: row by row
    each = [
        loss_fn(_rows(outputs, slice(i, i + 1), whole), take(labels, slice(i, i + 1))).sum()
        for i in range(n)
    ]
    return torch.stack(each) if each else torch.zeros(0)


def _one_row_of(tree: Any, dims: Any) -> Any:
    """Inside vmap: a batch of one of the mapped members; the others as they are."""
    flat, spec = pytree.tree_flatten(tree)
    mapped = pytree.tree_leaves(dims, is_leaf=lambda x: x is None)
    return pytree.tree_unflatten(
        [t.unsqueeze(0) if d == 0 else t for t, d in zip(flat, mapped, strict=True)], spec
    )


def _rows(tree: Any, rows: slice, whole: list[int]) -> Any:
    """Rows of every tensor of the tree but those at positions ``whole`` (kept as they are)."""
    flat, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(
        [
            t[rows] if isinstance(t, torch.Tensor) and j not in whole else t
            for j, t in enumerate(flat)
        ],
        spec,
    )


def check_batch_dimension(outputs: Any, what: str) -> None:
    """Raise if the model's output for a batch of one example lost its batch dimension.

    pk_attrib evaluates examples one at a time, as batches of one (``x.unsqueeze(0)``): a
    model that ends in ``.squeeze()`` returns a 0-dim tensor there, which no loss or
    explained output can be read from per example. (Tuple and dict outputs are the loss's
    and ``output_fn``'s to read.)

    Args:
        outputs: The model's outputs for one example.
        what: Which example, for the message ("training example 0", "the first query").
    """
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        raise ArgumentError(
            f"on {what}, given as a batch of one (x.unsqueeze(0)), the model returns a 0-dim "
            "output: pk_attrib evaluates examples one at a time, so the model must keep the "
            "batch dimension (e.g. .squeeze(-1) rather than .squeeze())"
        )


def prepare_target(target: Any, n: int, n_outputs: int | None) -> torch.Tensor | None:
    """Validate a Captum-style target into an int64 (n,) tensor (or None for scalar outputs).

    Raises:
        ValueError: The target has the wrong shape or lies outside the model's outputs.
    """
    if target is None:
        if n_outputs not in (None, 1):
            raise ArgumentError(
                f"the model has {n_outputs} outputs, so target= must say which one to explain "
                "(an int, or one index per query), or pass output_fn="
            )
        return None
    t = torch.as_tensor(target)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ArgumentError(f"target must hold integer output indices, got dtype {t.dtype}")
    t = t.to(torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ArgumentError(
            f"target has {t.numel()} entries for {n} queries: give one int, or one per query"
        )
    if n_outputs is not None and n and (int(t.min()) < 0 or int(t.max()) >= n_outputs):
        raise ArgumentError(
            f"target {int(t.max()) if int(t.max()) >= n_outputs else int(t.min())} is out of "
            f"range for a model with {n_outputs} outputs (valid: 0..{n_outputs - 1})"
        )
    return t
