"""Which dataset indices each batch of a DataLoader holds, found while it is iterated.

`indexed_batches` wraps the loader's (batch) sampler while its iterator is created and notes
what the sampler yields; batches come back in sampler order (``in_order=True``), so the
indices of each batch are known with shuffling, workers (persistent ones too),
``drop_last`` and custom (batch) samplers.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..exceptions import RecordingError


def indexed_batches(loader: DataLoader) -> Iterator[tuple[Any, Any]]:
    """Yield ``(indices, batch)`` for each batch ``iter(loader)`` yields, the batch unchanged.

    Args:
        loader: A DataLoader over a map-style dataset.

    Yields:
        What the loader's (batch) sampler yielded for the batch (an int, a list, an array or
        a tensor of dataset indices), and the batch.

    Raises:
        RecordingError: The loader yielded a batch its sampler did not draw.
    """
    seen: collections.deque = collections.deque()
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    original = getattr(loader, attr)
    persistent = getattr(loader, "_iterator", None)  # persistent workers' iterator
    if persistent is not None:
        inner = persistent._index_sampler
        inner = inner.inner if isinstance(inner, _RecordingSampler) else inner
        persistent._index_sampler = _RecordingSampler(inner, seen)
    object.__setattr__(loader, attr, _RecordingSampler(original, seen))
    try:
        iterator = iter(loader)
    finally:
        object.__setattr__(loader, attr, original)
    for batch in iterator:
        if not seen:
            raise RecordingError(
                "the DataLoader yielded a batch whose indices were not seen: its iterator "
                "does not draw from its sampler in the usual way; call "
                "recorder.record_batch(indices) yourself"
            )
        yield seen.popleft(), batch


def _own_copy(item: Any) -> Any:
    """A copy of what a sampler yielded (an int, a list, an array or a tensor of indices)."""
    if isinstance(item, torch.Tensor):
        return item.clone()
    return item.copy() if hasattr(item, "copy") else item


class _RecordingSampler:
    """Wraps a (batch) sampler: yields what it yields and appends it to a queue."""

    def __init__(self, inner: Iterable, seen: collections.deque):
        self.inner = inner
        self.seen = seen

    def __iter__(self):
        for item in self.inner:
            # a copy: a batch sampler may refill the same list, and with workers the loader
            # draws batches ahead of the steps they belong to
            self.seen.append(_own_copy(item))
            yield item

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]
