"""Writing a store's shards without the page cache (``O_DIRECT``), where the system allows.

A recorder writes gigabytes that nobody reads until much later. Written the ordinary way,
every byte is first copied into the page cache by the kernel, on the CPU the training loop
needs, and the cache grows by fresh memory until the pages are flushed and dropped. With
``O_DIRECT`` the disk reads the bytes straight from the snapshot buffers, which must then
start at a page boundary of memory and of the file and span whole pages: the store lays
large tensors out at page-aligned file offsets (see `write_tensor_file`), its buffers
are page-aligned (`page_aligned_empty`), and `SequentialWriter` passes aligned runs
straight to the disk and gathers the rest (headers, small tensors) in an aligned staging
buffer. Where ``O_DIRECT`` is unavailable or refused (tmpfs, Windows, macOS, a file system
that rejects the alignment), it writes through the page cache instead: the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import torch

PAGE = 4096  # alignment of file offsets, lengths and memory for O_DIRECT (any block size)
_STAGING = 1 << 20  # bytes gathered before a write, for what cannot go straight
_MAP_MIN = 256 << 10  # buffers from this size on are their own page-aligned map
# how file systems refuse O_DIRECT (Linux: EINVAL; some FUSE and network ones: not supported)
_REFUSED = {errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), errno.ENOTSUP}


def _anonymous_map(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` over a fresh private anonymous memory map (zeroed pages).

    The map starts at a page boundary. Where anonymous maps are unavailable (Windows), the
    tensor comes from ``torch.empty``.
    """
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8)  # the tensor keeps the map alive


def page_aligned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor; from 256 KiB on its data starts at a page boundary.

    Args:
        shape: The tensor's shape, any number of dimensions.
        dtype: Its dtype.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < _MAP_MIN:
        return torch.empty(shape, dtype=dtype)
    return _anonymous_map(nbytes).view(dtype).view(shape)


def settle(fd: int) -> None:
    """Flush a written file to the disk and drop its pages from the page cache.

    Once the file is on the disk its cached pages are clean, and dropping them lets the next
    shard reuse the same memory instead of growing the page cache by a shard each time
    (files written with ``O_DIRECT`` have none). Fresh memory is what makes writing through
    the cache expensive: on the 2-core VM of the benchmarks, writing 1.5 GiB in 4 MiB blocks
    took 9-10 ms of kernel CPU per block into a growing page cache, against 1.1 ms per block
    with this after every 128 MiB. Flushing also makes a shard survive a power cut before
    the manifest lists it.
    """
    os.fsync(fd)
    if hasattr(os, "posix_fadvise"):  # (not on Windows or macOS: the pages stay cached)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _address(data: np.ndarray) -> int:
    return data.__array_interface__["data"][0]


def create_new(path: os.PathLike | str, flags: int = os.O_WRONLY) -> int:
    """Create the file ``path`` anew and open it: a file descriptor, mode 0o666 less the umask.

    Whatever was at ``path`` (a leftover temporary file, or a symbolic link planted under
    its name to a file elsewhere) is removed first, never followed: the file is created with
    ``O_EXCL | O_NOFOLLOW``, so an entry put back in between makes the open fail instead.

    Args:
        path: The file to create.
        flags: Further ``os.open`` flags (``O_WRONLY``, ``O_DIRECT``, ...).
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | nofollow, 0o666)


class SequentialWriter:
    """Write a new file front to back, with ``O_DIRECT`` where the system allows it.

    Runs of whole pages that start at a page boundary in memory, where the file is at a
    page boundary too, go straight to the disk; every other byte is gathered in a
    page-aligned staging buffer and written a megabyte at a time. The file's last partial
    page, or any write the system refuses, is written through the page cache (the flag is
    dropped for the rest of the file). `close` syncs the file to the disk when asked.

    Args:
        path: The file to create (truncated when it exists).
        direct: Try ``O_DIRECT``; False writes through the page cache from the start.
    """

    def __init__(self, path: os.PathLike | str, direct: bool = True):
        flags = os.O_WRONLY | getattr(os, "O_BINARY", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:
                self.fd = create_new(path, flags | os.O_DIRECT)
            except OSError as err:  # tmpfs, FUSE and others may refuse the flag at open
                if err.errno not in _REFUSED:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = create_new(path, flags)
        self.position = 0  # bytes handed to the file system so far
        self._staging = _anonymous_map(_STAGING).numpy() if self.direct else None
        self._filled = 0

    def write(self, data) -> None:
        """Append a buffer (bytes, or a C-contiguous array or tensor view of any dtype)."""
        view = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        view = view.reshape(-1).view(np.uint8)
        while view.size:
            if not self.direct:
                self._write_through(view)
                return
            if self._filled % PAGE == 0 and view.size >= PAGE and _address(view) % PAGE == 0:
                if self._filled:  # whole pages gathered before: they go first
                    self._flush_staging()
                n = view.size - view.size % PAGE
                self._write_direct(view[:n])
                view = view[n:]
                continue
            n = min(_STAGING - self._filled, view.size)
            self._staging[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == _STAGING:
                self._flush_staging()

    def close(self, sync: bool = False) -> None:
        """Write what is gathered, optionally flush the file to the disk, and close it.

        Args:
            sync: Flush the file to the disk, then drop its cached pages (`settle`).
        """
        try:
            if self._filled:
                self._flush_staging()
            if sync:
                settle(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """Close the file (if still open) without writing what is gathered (after a failure)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _flush_staging(self) -> None:
        staged = self._staging[: self._filled]
        self._filled = 0
        if staged.size % PAGE == 0:
            self._write_direct(staged)
        else:  # the file's last partial page
            self._drop_direct()
            self._write_through(staged)

    def _write_direct(self, view: np.ndarray) -> None:
        while view.size:
            try:
                n = os.write(self.fd, view)
            except OSError as err:  # a file system that refuses this alignment
                if err.errno not in _REFUSED:
                    raise
                self._drop_direct()
                self._write_through(view)
                return
            self.position += n
            view = view[n:]
            if view.size and (n % PAGE or _address(view) % PAGE):  # a short write
                self._drop_direct()
                self._write_through(view)
                return

    def _write_through(self, view: np.ndarray) -> None:
        while view.size:
            n = os.write(self.fd, view)
            self.position += n
            view = view[n:]

    def _drop_direct(self) -> None:
        """Continue through the page cache (what is staged stays to be written)."""
        if not self.direct:
            return
        import fcntl  # POSIX only, as O_DIRECT is

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
