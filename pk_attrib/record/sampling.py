"""Which dataset indices each batch of a DataLoader holds, found while it is iterated.

`indexed_batches` wraps the loader's (batch) sampler while its iterator is created and notes
what the sampler yields; batches come back in sampler order (``in_order=True``), so the
indices of each batch are known with shuffling, workers (persistent ones too),
``drop_last`` and custom (batch) samplers. `LoaderTap` does the same for loops that a
framework runs (HF's Trainer, Lightning): it wraps the sampler of every iterator later made
from the loader.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

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


class LoaderTap:
    """The dataset indices of the batches a loop that someone else runs takes from DataLoaders.

    For training loops a framework runs (HF's Trainer, Lightning), where `indexed_batches`
    has no loop to wrap: after `attach`, every iterator made from the loader (each epoch's,
    persistent workers' too) draws through a recording wrapper of its (batch) sampler, and
    `next_indices` hands out what the samplers drew, in order, one batch per call. Batches
    come in sampler order (``in_order=True``), so the n-th call gets the n-th batch the loop
    takes, with shuffling, workers and prefetching. A loop that leaves a pass over the loader
    unfinished (an epoch cut short) never takes what that pass drew last: it is dropped once
    the next pass starts drawing.

    Example:
        >>> loader = DataLoader(list(range(10)), batch_size=4, shuffle=True)
        >>> tap = LoaderTap()
        >>> tap.attach(loader)
        >>> batches = list(loader)  # the framework's loop
        >>> all(torch.equal(b, torch.as_tensor(tap.next_indices())) for b in batches)
        True
        >>> tap.detach()
    """

    def __init__(self) -> None:
        self._queue: collections.deque = collections.deque()  # (pass, indices) as drawn
        self._passes = 0  # passes over a sampler begun so far; the newest is the one taken
        self.loaders: list[DataLoader] = []

    def attach(self, loader: DataLoader) -> None:
        """Note the indices of every batch drawn from iterators made from ``loader`` from now on.

        Args:
            loader: A DataLoader over a map-style dataset, with ``in_order=True``.

        Raises:
            TypeError: Not a DataLoader, or one over an IterableDataset (no indices).
            RecordingError: The loader was built with ``in_order=False``.
        """
        if not isinstance(loader, DataLoader):
            raise TypeError(f"a LoaderTap needs a torch DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "the training DataLoader is over an IterableDataset, which has no dataset "
                "indices: use a map-style dataset (with __getitem__ and __len__)"
            )
        if getattr(loader, "in_order", True) is False:
            raise RecordingError(
                "the DataLoader was built with in_order=False, so batches may arrive in "
                "another order than their indices: build it with in_order=True"
            )
        if any(seen is loader for seen in self.loaders):
            return
        make = loader._get_iterator  # DataLoader.__iter__ calls self._get_iterator()
        tap = self

        def tapped_iterator():
            # as in indexed_batches: the iterator keeps the sampler it finds when it is made
            attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
            original = getattr(loader, attr)
            object.__setattr__(loader, attr, _TappedSampler(original, tap))
            try:
                return make()
            finally:
                object.__setattr__(loader, attr, original)

        object.__setattr__(loader, "_get_iterator", tapped_iterator)
        persistent = getattr(loader, "_iterator", None)  # persistent workers' iterator
        if persistent is not None:
            persistent._index_sampler = _TappedSampler(_inner(persistent._index_sampler), self)
        self.loaders.append(loader)

    def next_indices(self, hint: str = "") -> Any:
        """The dataset indices of the batch the loop takes next (what its sampler yielded).

        Args:
            hint: Appended to the error message: the likely causes in the caller's framework.

        Raises:
            RecordingError: No batch drawn from an attached loader is left to take.
        """
        while self._queue and self._queue[0][0] < self._passes:
            self._queue.popleft()  # drawn by a pass the loop left unfinished
        if not self._queue:
            raise RecordingError(
                "the training loop took a batch that no attached DataLoader drew: it iterates "
                "another loader, or one whose iterator does not draw from its sampler" + hint
            )
        return self._queue.popleft()[1]

    def detach(self) -> None:
        """Leave the loaders as they were; iterators made from now on are not tapped."""
        for loader in self.loaders:
            if loader.__dict__.get("_get_iterator") is not None:
                object.__delattr__(loader, "_get_iterator")
            persistent = getattr(loader, "_iterator", None)
            if persistent is not None:
                persistent._index_sampler = _inner(persistent._index_sampler)
        self.loaders = []
        self._queue.clear()

    def _begin_pass(self) -> int:
        self._passes += 1
        return self._passes


def _inner(sampler: Any) -> Any:
    return sampler.inner if isinstance(sampler, _RecordingSampler) else sampler


class _TappedSampler(_RecordingSampler):
    """A `LoaderTap`'s wrapper of a (batch) sampler: notes each pass's draws."""

    def __init__(self, inner: Iterable, tap: LoaderTap):
        super().__init__(inner, tap._queue)
        self.tap = tap

    def __iter__(self):
        number = self.tap._begin_pass()
        for item in self.inner:
            self.seen.append((number, _own_copy(item)))
            yield item
