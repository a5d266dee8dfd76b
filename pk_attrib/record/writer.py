"""Writing a store while training runs: the background shard writer and the store's lock.

`AsyncShardWriter` takes each step's record from the training loop through a bounded queue
and writes shards and manifest updates on its own thread (see `pk_attrib.record.store` for
the format); `lock_store` keeps a second recorder out of a store being written.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import weakref

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..exceptions import StoreError
from .buffers import BufferPool
from .store import LOCK, write_final, write_manifest, write_tensor_file

_STOP = object()
_STOP_UNLISTED = object()  # stop, leaving the written shards for the caller to list
_WAKE = object()  # a small record is held (see AsyncShardWriter)
# a record without pooled buffers up to this size is held rather than queued
SMALL_RECORD_BYTES = 1 << 20


class _Flush:
    def __init__(self):
        self.done = threading.Event()


class AsyncShardWriter:
    """Background writer: step records in, safetensors shards and manifest updates out.

    `put` blocks while ``queue_steps`` records wait (memory stays bounded, no step is dropped).
    A shard is written when it reaches ``shard_bytes``, or ``flush_interval`` seconds after
    its first step arrived, or on `flush`/`close`. The manifest lists the written shards
    ``flush_interval`` seconds after the first of their steps arrived (or on `flush`/`close`),
    and at most that often, so a killed process loses only the steps of the last
    ``flush_interval``, and a long run does not rewrite its (growing) manifest for every
    shard. A record's ``"pooled"`` tensors go back to ``pool`` once its shard is written.

    A record without a snapshot (no ``"pooled"`` tensors: a step between snapshots with
    ``every > 1``) is small: it is held in a list the writer takes at its next wake-up
    rather than queued, so that such steps do not wake the writer thread one by one (each
    wake-up costs the training thread a hand-over of the GIL). The first one held wakes the
    writer, which then takes the list when its shard is due, so no step waits longer than
    ``flush_interval``; records are written in the order they were put.

    Args:
        root: The store folder.
        manifest: The store's manifest (the writer appends the steps it writes).
        queue_steps: Records with snapshots that may wait at once.
        shard_bytes: Size from which a shard is written.
        flush_interval: Seconds within which a step is written and listed.
        pool: Where the records' pooled buffers go back.
        finish: Called on each record, in order, before it is written (makes the tensors
            the training thread left for later: `pk_attrib.record.finish.StepFinisher`).
        create: Called first, on the writer's thread: writes a new store's first files.
        first: Tensors like the first snapshot's (shapes and dtypes; meta tensors do): the
            writer readies pool buffers for them next, so the first step need not fault
            fresh pages in.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        queue_steps: int = 8,
        shard_bytes: int = 128 << 20,
        flush_interval: float = 1.0,
        pool: BufferPool | None = None,
        finish: Callable[[dict[str, Any]], Any] | None = None,
        create: Callable[[], Any] | None = None,
        first: Iterable[torch.Tensor] = (),
    ):
        self.root = root
        self.manifest = manifest
        self.pool = pool
        self.finish = finish
        self._create = create
        self._first = first
        self._steps_json = [json.dumps(m, separators=(",", ":")) for m in manifest["steps"]]
        # written shards the manifest awaits: (entry, step metadata, holds a snapshot)
        self._unlisted: list[tuple[dict, list, bool]] = []
        self.lock = None  # the store's lock file (the recorder hands it over), held till done
        self.shard_bytes = shard_bytes
        self.flush_interval = flush_interval
        # records with snapshots wait in the queue, at most ``queue_steps`` of them (``_slots``)
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max(1, queue_steps))
        # small records held for the writer to take (see the class), under ``_lock``, which
        # also covers queueing a record (so that no held record is taken before an older
        # queued one); the writer was woken for them (``_armed``)
        self._held: list[dict[str, Any]] = []
        self._armed = False
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pk_attrib-writer", daemon=True)
        self._thread.start()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"writing the store {self.root} failed: {self._error!r}. The steps recorded "
                "before the failure are safe; free disk space or fix permissions and resume"
            ) from self._error

    def put(self, record: dict[str, Any]) -> None:
        """Queue one step record (blocks while ``queue_steps`` records wait to be written).

        A small record (see the class) is held instead, and wakes the writer only when it is
        the first held since the writer last took them. An interrupt while this blocks
        (Ctrl-C while the disk is slow) leaves this record out, and nothing else.
        """
        self._raise_if_failed()
        if not record.get("pooled") and record.get("nbytes", 0) <= SMALL_RECORD_BYTES:
            with self._lock:
                self._held.append(record)
                if not self._armed:
                    self._armed = True
                    self._queue.put_nowait(_WAKE)
            return
        self._slots.acquire()  # (memory stays bounded: training waits for the disk)
        with self._lock:  # the held records go ahead of this one, in one item
            held, self._held = self._held, []
            self._queue.put_nowait((held, record))

    def flush(self) -> None:
        """Block until every queued step is written and listed in the manifest.

        (Except steps after a listed final that wait for the next snapshot's shard, see
        `_write_shard`.)
        """
        if not self._thread.is_alive():
            self._raise_if_failed()
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()
        self._raise_if_failed()

    def release_lock(self) -> None:
        """Close the store's lock file, letting another recorder open the store."""
        if self.lock is not None:
            unlock_store(self.lock)
            self.lock = None

    def close(self, list_pending: bool = True, meanwhile: Callable[[], Any] | None = None) -> Any:
        """Write what is queued and stop the thread.

        Args:
            list_pending: List the written shards in the manifest (and write it); False
                leaves them to the caller (`list_pending`, `write_manifest`), which writes
                the manifest once, with the final parameters.
            meanwhile: Work for the calling thread while the writer finishes (the final
                parameters' file: the two writes wait on the disk together).

        Returns:
            What ``meanwhile`` returned (None without it).
        """
        result = None
        if self._thread.is_alive():
            self._queue.put(_STOP if list_pending else _STOP_UNLISTED)
            try:
                if meanwhile is not None:
                    result = meanwhile()
            finally:
                self._thread.join()
        elif meanwhile is not None:
            result = meanwhile()
        self._raise_if_failed()
        return result

    def close_with_final(
        self, file: Path, final: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> None:
        """`close`, and end the store at the final parameters: the recording is complete.

        They are written while the writer finishes, and listed in the manifest with the
        shards it wrote, in one write of it.

        Args:
            file: Their file: not the final the manifest listed when this session began
                (the only final the writer may remove, once the path continues beyond it),
                nor the one it lists now (a crash before the manifest lists the new file
                must leave the store as it was).
            final: The parameters by name.
            buffers: The model's buffers by name.
        """
        try:
            entry = self.close(
                list_pending=False,
                meanwhile=lambda: write_final(file, final, durable=True, buffers=buffers),
            )
        except BaseException:
            if self._error is None:  # (the final's write failed): the shards are listed still
                self._guarded(self._list)
            raise
        self.manifest["complete"] = True
        self._list_ending_at(entry)

    def _take_held(self, disarm: bool = False) -> list[dict[str, Any]]:
        """The held records, once every queued item (all older) was taken; else none yet.

        (None yet: the queued items wake the writer, which takes them later.)

        ``disarm``: with none held, the next small record wakes the writer again.
        """
        with self._lock:
            if not self._queue.empty():
                return []
            held, self._held = self._held, []
            if disarm and not held:
                self._armed = False
            return held

    def _run(self) -> None:
        if self._create is not None:
            self._guarded(self._create)
        if self.pool is not None:
            self._guarded(self.pool.reserve, self._first)
        self._first = ()
        buffer: list[dict[str, Any]] = []  # records not yet in a shard file
        size = 0
        deadline = None  # when the oldest record not yet listed is due
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            stop = item is _STOP or item is _STOP_UNLISTED
            due = item is None or stop or isinstance(item, _Flush)
            records, snapshot = [], ()
            if isinstance(item, tuple):  # (the records held before it, a record)
                records = [*item[0], item[1]]
                self._slots.release()
                snapshot = item[1].get("pooled", ())
            if due or item is _WAKE:
                records += self._take_held()  # (newer than every queued record taken)
            for record in records:
                buffer.append(record)
                size += record["nbytes"]
            if buffer and deadline is None:
                deadline = time.monotonic() + self.flush_interval
            if buffer and (due or size >= self.shard_bytes):
                self._guarded(self._write_shard, buffer)
                buffer, size = [], 0
            if snapshot and self.pool is not None:
                # buffers for the next snapshot, faulted in here (after a shard was written
                # and gave its buffers back: none to fault in, when they come back so soon)
                self._guarded(self.pool.reserve, snapshot)
            if due:  # (what waits for a later snapshot has no clock: see _list)
                if item is not _STOP_UNLISTED:
                    self._guarded(self._list)
                deadline = None
            if not buffer:  # what was held since starts the next shard
                buffer = self._take_held(disarm=True)
                size = sum(record["nbytes"] for record in buffer)
                if buffer and deadline is None:
                    deadline = time.monotonic() + self.flush_interval
            if isinstance(item, _Flush):
                item.done.set()
            if stop:
                return

    def _guarded(self, work: Callable, *args) -> None:
        """Run ``work`` unless an earlier write failed; a failure is raised on the next put."""
        if self._error is None:
            try:
                work(*args)
            except BaseException as err:  # surfaced to the training loop on next put
                self._error = err

    def _write_shard(self, records: list[dict[str, Any]]) -> None:
        first = records[0]["step"]
        tensors = {}
        for record in records:
            if self.finish is not None:
                self.finish(record)
            tensors.update(record["tensors"])
        entry = write_tensor_file(
            self.root / f"shard-{first:08d}.safetensors",
            tensors,
            {"format": "pk_attrib.shard", "first_step": str(first), "n_steps": str(len(records))},
            durable=True,
        )
        entry.update(first_step=first, n_steps=len(records))
        snapshot = any("/w/" in key for key in tensors)
        self._unlisted.append((entry, [record["meta"] for record in records], snapshot))
        if self.pool is not None:
            for record in records:
                self.pool.give(record.get("pooled", ()))

    def _list(self) -> None:
        """List the written shards in the manifest, and write it."""
        if not self._unlisted:
            return
        if self.manifest.get("final") is not None and not any(s for *_, s in self._unlisted):
            # a resumed store lists where its earlier session ended; steps listed after it
            # would end the path there, so they wait for the shard with the next snapshot
            # (with every=k; a crash meanwhile loses only them)
            return
        # that snapshot continues the path beyond the listed end: it is final no longer
        self._list_ending_at(None)

    def _list_ending_at(self, final: dict[str, Any] | None) -> None:
        """List the written shards and ``final`` (None: none) in the manifest, and write it.

        The final it listed before, a full copy of the weights listed no more, is removed.
        """
        ended, self.manifest["final"] = self.manifest.get("final"), final
        self.list_pending()
        self.write_manifest()
        if ended is not None:
            (self.root / ended["file"]).unlink(missing_ok=True)

    def list_pending(self) -> None:
        """Add the written but unlisted shards to the manifest (without writing it).

        Call only while the writer thread is idle or stopped (the recorder's `close`, which
        then lists the new final parameters).
        """
        for entry, metas, _ in self._unlisted:
            self.manifest["shards"].append(entry)
            self.manifest["steps"].extend(metas)
            self._steps_json.extend(json.dumps(m, separators=(",", ":")) for m in metas)
        self._unlisted = []

    def write_manifest(self) -> None:
        """Rewrite the manifest (call only while the writer thread is idle or stopped)."""
        write_manifest(self.root, self.manifest, self._steps_json)


def lock_store(root: Path):
    """Lock a store for this recorder (the open file holds the lock; None without fcntl).

    Raises:
        StoreError: Another recorder, in this process or another, is writing the store.
    """
    if fcntl is None:  # (Windows: no advisory locks; one writer is up to the user)
        return None
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:  # (never through a link planted under its name: it would create the link's target)
        fd = os.open(root / LOCK, flags, 0o666)
    except OSError as err:
        if (root / LOCK).is_symlink():
            raise StoreError(
                f"{root / LOCK} is a symbolic link: a store folder holds only the files "
                "pk_attrib writes; remove the link"
            ) from err
        raise
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(
            f"{root} is being recorded by another PathRecorder (in this process or another): "
            "close it first (recorder.close()); one you no longer hold lets go when it is "
            "garbage-collected or its process ends. Or record into another folder"
        ) from None
    _HELD.add(handle)
    return handle


def unlock_store(handle) -> None:
    """Release a lock `lock_store` took (close its file)."""
    _HELD.discard(handle)
    handle.close()


def stop_writer(writer: AsyncShardWriter) -> None:
    """For a recorder collected without close(): write its queued steps, then unlock."""
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - reported to nobody: the recorder is gone
        pass
    writer.release_lock()


def close_at_exit(ref: weakref.ref) -> None:
    """At interpreter exit: write the queued steps of a recorder that was not closed."""
    recorder = ref()
    if recorder is not None and not recorder._closed and recorder._writer is not None:
        try:
            recorder._writer.close()
        except Exception:  # noqa: BLE001 - nothing can be reported at interpreter exit
            pass


# lock files this process holds; a forked child (a DataLoader worker) closes its copies, or
# it would keep the store locked after the recorder lets go (flock belongs to the open file)
_HELD: set = set()


def _close_inherited_locks() -> None:
    for handle in list(_HELD):
        handle.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)
