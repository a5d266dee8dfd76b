"""Batches: what the engine reads from a training set, and helpers on nested batches.

Inputs, labels and model outputs may be tensors or (nested) tuples, lists and dicts of them (a
model taking a dict, one returning (logits, aux)): the first dimension of every tensor indexes
the examples. `gather_examples` collates a training set's items into such a batch, as the
training loop's DataLoader did (`CollatedDataset` keeps a loader's own ``collate_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, TensorDataset, default_collate

from ..exceptions import ArgumentError, ArgumentTypeError

# Inputs, labels and model outputs may be tensors or (nested) tuples, lists and dicts of
# them (a model taking a dict, one returning (logits, aux)): the first dimension of every
# tensor indexes the examples.


def leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of a tensor or a nested tuple / list / dict of them, in a fixed order."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def take(tree: Any, index: slice | int | torch.Tensor) -> Any:
    """``t[index]`` for every tensor of the tree (its examples ``index``), same structure."""
    return pytree.tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, tree)


def one_row(tree: Any) -> Any:
    """One example as a batch of one: ``t.unsqueeze(0)`` for every tensor of the tree."""
    return pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, tree)


def n_rows(tree: Any) -> int:
    """The number of examples of a batch: its first tensor's first dimension."""
    found = leaves(tree)
    if not found or found[0].dim() == 0:
        raise ArgumentError("a batch needs a tensor whose first dimension indexes the examples")
    return found[0].shape[0]


class CollatedDataset(Dataset):
    """A map-style dataset whose batches are made by a DataLoader's own ``collate_fn``.

    What a training set given as a DataLoader becomes: examples are gathered by index and
    collated as the loader collates them. An item is one example as a row of such a batch.

    Args:
        dataset: The loader's dataset.
        collate_fn: The loader's ``collate_fn``.
        per_example: The loader does not batch (``batch_size=None``): it applies
            ``collate_fn`` to each example, and batches are stacked from those.
    """

    def __init__(self, dataset: Dataset, collate_fn, per_example: bool = False):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.per_example = per_example

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        batch = gather_examples(self, torch.tensor([int(i)]))
        # row 0 of each part: of every tensor in it, or the first of a list of other things
        return tuple(take(part, 0) if leaves(part) else part[0] for part in batch)


def gather_examples(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Collate ``dataset[i]`` for the given indices into a batch tuple (inputs..., label).

    A `CollatedDataset` collates with its loader's ``collate_fn``, others with PyTorch's
    ``default_collate``.
    """
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    if isinstance(dataset, CollatedDataset):
        items = [dataset.dataset[int(i)] for i in indices]
        if dataset.per_example:
            batch = default_collate([dataset.collate_fn(item) for item in items])
        else:
            batch = dataset.collate_fn(items)
        if not isinstance(batch, (tuple, list)):
            raise ArgumentTypeError(
                f"train_dataset's collate_fn returns a {type(batch).__name__}, but batches must "
                "be (inputs..., label), as in Captum's TracInCP: model(*batch[:-1]) gives the "
                "outputs; wrap the collate_fn so that it returns a tuple"
            )
    else:
        batch = default_collate([dataset[int(i)] for i in indices])
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def map_by_loop(fn: Callable, in_dims: tuple[int | None, ...], args: tuple) -> Any:
    """What ``vmap(fn, in_dims)(*args)`` returns, by calling fn on each slice (dims 0/None).

    Arguments and results may be tensors, or tuples, lists and dicts of them.
    """
    mapped = [a for a, dim in zip(args, in_dims, strict=True) if dim is not None]
    n = n_rows(mapped[0])
    results = [
        fn(*(a if dim is None else take(a, i) for a, dim in zip(args, in_dims, strict=True)))
        for i in range(n)
    ]
    return _stack(results)


def _stack(results: list) -> Any:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(results)
    if isinstance(first, dict):
        return {k: _stack([r[k] for r in results]) for k in first}
    return type(first)(_stack([r[j] for r in results]) for j in range(len(first)))
