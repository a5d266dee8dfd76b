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
    """
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    flat, spec = pytree.tree_flatten(outputs)
    where = [j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not where:
        return []
    with torch.enable_grad():
        probes = [flat[j].detach().requires_grad_() for j in where]
        tree = list(flat)
        for j, probe in zip(where, probes, strict=True):
            tree[j] = probe
        value = output_fn(pytree.tree_unflatten(tree, spec), target)
        if not value.requires_grad:
            return []
        grads = torch.autograd.grad(value.sum(), probes, allow_unused=True)
    return [flat[j] for j, g in zip(where, grads, strict=True) if g is not None and bool(g.any())]


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
    """ℓ_i of each row, one loss call per row (rows counted by the labels), (B,).

    Raises:
        NotBatchFirst: The outputs the loss reads have no row per example.
    """
    check_rows(outputs, labels, loss_fn)
    each = [
        loss_fn(take(outputs, slice(i, i + 1)), take(labels, slice(i, i + 1))).sum()
        for i in range(n_rows(labels))
    ]
    return torch.stack(each) if each else torch.zeros(0)


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
        raise ValueError(
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
            raise ValueError(
                f"the model has {n_outputs} outputs, so target= must say which one to explain "
                "(an int, or one index per query), or pass output_fn="
            )
        return None
    t = torch.as_tensor(target)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"target must hold integer output indices, got dtype {t.dtype}")
    t = t.to(torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(
            f"target has {t.numel()} entries for {n} queries: give one int, or one per query"
        )
    if n_outputs is not None and n and (int(t.min()) < 0 or int(t.max()) >= n_outputs):
        raise ValueError(
            f"target {int(t.max()) if int(t.max()) >= n_outputs else int(t.min())} is out of "
            f"range for a model with {n_outputs} outputs (valid: 0..{n_outputs - 1})"
        )
    return t
