"""The on-disk store of a training path: a folder with a JSON manifest and safetensors shards.

Layout of a store folder::

    manifest.json                   format version, parameters, optimizer, per-step metadata,
                                    and the sha256 of every tensor file
    shard-00000000.safetensors      many consecutive steps each (keys "<step>/w/<name>", ...)
    final.safetensors               the parameters after the last step ("w/<name>")

The manifest is the single source of truth: a tensor file it does not list is ignored,
and it is only rewritten (temp file + rename) after the files it lists are complete.
So a process killed at any moment leaves a store that loads and holds a consistent
prefix of the run. No pickle is involved anywhere: loading a store never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .exceptions import (
    CorruptStoreError,
    FormatVersionError,
    NotAStoreError,
    StoreError,
)

FORMAT = "pk_attrib.training_path"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FINAL = "final.safetensors"


def library_version() -> str:
    """The installed pk_attrib version (``"unknown"`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pk-attrib")
    except PackageNotFoundError:
        return "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32" -> torch.float32``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown tensor dtype {name!r} in the manifest")
    return dtype


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_tensor_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Write a safetensors file atomically; return its manifest entry (file, sha256, bytes)."""
    data = safetensors.torch.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata=metadata
    )
    _write_atomic(path, data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    manifest["updated"] = time.time()
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a store's manifest.

    Raises:
        NotAStoreError: The folder is missing, or holds no pk_attrib manifest.
        FormatVersionError: The manifest's format version is not one this library reads.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise NotAStoreError(
            f"{root} is not a pk_attrib store: the folder does not exist. Record one with "
            "PathRecorder(model, optimizer, store=...)"
        )
    if not path.is_file():
        raise NotAStoreError(
            f"{root} is not a pk_attrib store: it has no {MANIFEST}. Point to the folder "
            "given as store= to PathRecorder"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NotAStoreError(
            f"{path} is not valid JSON ({err}); it was not written by pk_attrib"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NotAStoreError(
            f"{path} is not a pk_attrib manifest (no format={FORMAT!r}); this folder holds "
            "something else: choose an empty or new folder for the store"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{root} has store format version {version!r}, but this pk_attrib "
            f"({library_version()}) reads version {FORMAT_VERSION}: install the pk_attrib "
            f"version that wrote it ({manifest.get('library_version', 'unknown')})"
        )
    return manifest


class ShardReader:
    """Lazy, verified, memory-mapped access to the tensor files of a store."""

    def __init__(self, root: Path, verify: bool = True):
        self.root = root
        self.verify = verify
        self._handles: dict[str, tuple[Any, set[str]]] = {}

    def check(self, entry: dict[str, Any]) -> Path:
        """Check that a listed tensor file exists and matches its hash; return its path."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise CorruptStoreError(
                f"tensor file {entry['file']} listed in {self.root / MANIFEST} is missing; "
                "restore it from a backup, or re-record the run"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise CorruptStoreError(
                f"tensor file {path} does not match its recorded sha256 (expected "
                f"{entry['sha256'][:12]}…, found {digest[:12]}…): it was modified or damaged; "
                "restore it from a backup, or re-record the run"
            )
        return path

    def handle(self, entry: dict[str, Any]):
        """An open ``safe_open`` handle of a tensor file (verified on first use)."""
        name = entry["file"]
        if name not in self._handles:
            path = self.check(entry) if self.verify else self.root / name
            if not path.is_file():
                self.check(entry)
            handle = safetensors.safe_open(str(path), framework="pt", device="cpu")
            self._handles[name] = (handle, set(handle.keys()))
        return self._handles[name]

    def get(self, entry: dict[str, Any], key: str) -> torch.Tensor | None:
        """The tensor ``key`` of a file, or None when the file has no such tensor."""
        handle, keys = self.handle(entry)
        return handle.get_tensor(key) if key in keys else None

    def keys(self, entry: dict[str, Any]) -> set[str]:
        """The tensor names of a file."""
        return self.handle(entry)[1]


_STOP = object()


class _Flush:
    def __init__(self):
        self.done = threading.Event()


class AsyncShardWriter:
    """Background writer: step records in, safetensors shards and manifest updates out.

    `put` blocks when the queue is full (memory stays bounded, no step is dropped).
    A shard is written when it reaches ``shard_bytes``, or ``flush_interval`` seconds after
    its first step arrived, or on `flush`/`close`; the manifest is rewritten after each
    shard, so a killed process loses only the steps not yet written.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        queue_steps: int = 8,
        shard_bytes: int = 128 << 20,
        flush_interval: float = 1.0,
    ):
        self.root = root
        self.manifest = manifest
        self.shard_bytes = shard_bytes
        self.flush_interval = flush_interval
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_steps))
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
        """Queue one step record (blocks while the queue is full)."""
        self._raise_if_failed()
        self._queue.put(record)

    def flush(self) -> None:
        """Block until every queued step is written and listed in the manifest."""
        if not self._thread.is_alive():
            self._raise_if_failed()
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        buffer: list[dict[str, Any]] = []
        size = 0
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None and not isinstance(item, _Flush) and item is not _STOP:
                buffer.append(item)
                size += item["nbytes"]
                if deadline is None:
                    deadline = time.monotonic() + self.flush_interval
            due = item is None or item is _STOP or isinstance(item, _Flush)
            if buffer and (due or size >= self.shard_bytes):
                if self._error is None:
                    try:
                        self._write_shard(buffer)
                    except BaseException as err:  # surfaced to the training loop on next put
                        self._error = err
                buffer, size, deadline = [], 0, None
            if isinstance(item, _Flush):
                item.done.set()
            if item is _STOP:
                return

    def _write_shard(self, records: list[dict[str, Any]]) -> None:
        first = records[0]["step"]
        tensors = {}
        for record in records:
            tensors.update(record["tensors"])
        entry = write_tensor_file(
            self.root / f"shard-{first:08d}.safetensors",
            tensors,
            {"format": "pk_attrib.shard", "first_step": str(first), "n_steps": str(len(records))},
        )
        entry.update(first_step=first, n_steps=len(records))
        self.manifest["shards"].append(entry)
        self.manifest["steps"].extend(record["meta"] for record in records)
        write_manifest(self.root, self.manifest)
