"""Where step snapshots live: CPU memory that recording can fill without slowing training.

A recorder copies every trainable parameter once per optimizer step. Copying 4 MiB is
cheap; taking 4 MiB of fresh memory from the C heap every step is not. The kernel maps
each new page on first touch (a page fault per 4 KiB), and snapshots that stay alive
among the training loop's short-lived tensors fragment the heap, so the loop's own
gradients and activations land on fresh pages too. Two allocators avoid this:

* `BufferPool` recycles buffers (recording to disk: a snapshot's memory is free again
  once its shard is written);
* `SlabAllocator` hands out snapshots packed into anonymous memory maps of their own, one
  step's snapshot each (recording in memory: snapshots are kept), away from the heap the
  loop uses.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

import torch

from .diskio import _anonymous_map, page_aligned_empty

_ALIGN = 64  # bytes; a cache line, and a multiple of every dtype's size


class BufferPool:
    """Recycled CPU tensors for step snapshots: recording to disk reuses memory.

    Copying into fresh memory every step costs page faults that rival the copy itself.
    The recorder `take`s a buffer per tensor it copies; the writer `give`s the buffers
    back once their shard is on disk. Thread-safe (deque append/pop are atomic).

    Args:
        max_bytes: The most idle buffer memory kept for reuse; buffers given back beyond
            it are released.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._idle_bytes = 0
        self._free: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor of this shape and dtype (recycled when one is idle).

        Args:
            shape: The tensor's shape, any number of dimensions.
            dtype: Its dtype.
        """
        free = self._free.get((tuple(shape), dtype))
        if free:
            try:
                buffer = free.pop()
            except IndexError:  # taken by a race; allocate below
                pass
            else:
                with self._lock:
                    self._idle_bytes -= buffer.numel() * buffer.element_size()
                return buffer
        return page_aligned_empty(shape, dtype)  # O_DIRECT writes it straight from memory

    def reserve(self, like: Iterable[torch.Tensor]) -> None:
        """Have an idle buffer ready for each of these tensors, its pages touched.

        For the writer thread, as it takes a snapshot: the next snapshot's `take` (on the
        training thread) then finds buffers whose pages are mapped, instead of faulting
        fresh ones in until the first shards are written and their buffers come back. A
        no-op once buffers are recycled. Stays within ``max_bytes`` of idle buffers.

        Args:
            like: Tensors of the shapes and dtypes to have ready (one buffer each).
        """
        wanted = collections.Counter((tuple(t.shape), t.dtype) for t in like)
        for (shape, dtype), count in wanted.items():
            size = torch.Size(shape).numel() * dtype.itemsize
            for _ in range(count - len(self._free.get((shape, dtype), ()))):
                with self._lock:
                    if self._idle_bytes + size > self.max_bytes:
                        return
                    self._idle_bytes += size
                buffer = page_aligned_empty(torch.Size(shape), dtype)
                buffer.zero_()  # (its pages, faulted in here)
                self._free[(shape, dtype)].append(buffer)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        """Return buffers obtained from `take` (the caller no longer uses them).

        Args:
            tensors: The buffers, any shapes.
        """
        for t in tensors:
            size = t.numel() * t.element_size()
            with self._lock:
                if self._idle_bytes + size > self.max_bytes:
                    return
                self._idle_bytes += size
            self._free[(tuple(t.shape), t.dtype)].append(t)


class SlabAllocator:
    """CPU tensors carved out of large anonymous memory maps, for snapshots that are kept.

    Each slab is a private anonymous ``mmap`` of ``slab_bytes`` (or of one tensor, when a
    tensor is larger), separate from the C heap, so that kept snapshots neither fragment
    the heap the training loop allocates from nor make it return memory to the system.
    The tensors are views into a slab; a slab is unmapped once no tensor uses it, and
    saving, pickling or sharing one tensor handles its whole slab (as for any view), so
    the recorder sizes slabs to one step's snapshot. Not thread-safe: one recorder takes
    from it. Where anonymous memory maps are unavailable (Windows), tensors come from
    ``torch.empty``.

    Args:
        slab_bytes: The size of each slab in bytes.
    """

    def __init__(self, slab_bytes: int = 1 << 20):
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be positive, got {slab_bytes}")
        self.slab_bytes = slab_bytes
        self._slab: torch.Tensor | None = None  # uint8 (slab_bytes,)
        self._offset = 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor of this shape and dtype, 64-byte aligned.

        Args:
            shape: The tensor's shape, any number of dimensions.
            dtype: Its dtype.
        """
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self._slab is None or self._offset + nbytes > self._slab.numel():
            self._slab = _anonymous_map(max(self.slab_bytes, nbytes))
            self._offset = 0
        view = self._slab[self._offset : self._offset + nbytes]
        self._offset += -(-nbytes // _ALIGN) * _ALIGN
        return view.view(dtype).view(shape)
