"""The on-disk store of a training path: a folder with a JSON manifest and safetensors shards.

Layout of a store folder::

    manifest.json                   format version, parameters, optimizer, per-step metadata,
                                    and a content hash of every tensor file
    shard-00000000.safetensors      many consecutive steps each (keys "<step>/w/<name>", ...)
    final.safetensors               the parameters after the last step ("w/<name>")

The manifest is the single source of truth: a tensor file it does not list is ignored,
and it is only rewritten (temp file + rename) after the files it lists are complete.
So a process killed at any moment leaves a store that loads and holds a consistent
prefix of the run. No pickle is involved anywhere: loading a store never executes code.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import os
import re
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import xxhash

from ..exceptions import (
    CorruptStoreError,
    FormatVersionError,
    NotAStoreError,
    StoreChangedError,
    StoreError,
)
from . import schema
from .diskio import PAGE, SequentialWriter, create_new, settle
from .tensorfile import DTYPE_CODES, TensorFile, check_header

FORMAT = "pk_attrib.training_path"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stores hash their files with sha256 only
MANIFEST = "manifest.json"
FINAL = "final.safetensors"
LOCK = ".lock"  # held (flock) by the recorder writing a store, released by close or exit
# the files a store's writer makes (and their temporary names while being written)
STORE_FILE = re.compile(
    r"(shard-\d{8}\.safetensors|final(-next)?\.safetensors|manifest\.json)(\.tmp)?"
)


@functools.cache
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


# The content hash of new tensor files, and every hash a manifest entry may carry. XXH3-128
# reads 4 MiB in 0.05 ms against sha256's 2.3 ms on the 2-core VM of the benchmarks, which
# matters because the writer thread hashes every recorded byte while training runs on the same
# cores. The hash guards against damaged, truncated or swapped files; it is not a signature
# (whoever can change a file can change the manifest too, and loading never runs code anyway).
HASH = "xxh3_128"
_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_hash(path: Path, algorithm: str = HASH) -> str:
    """Hex digest of a file's content by "xxh3_128" or "sha256", read in 8 MiB blocks."""
    digest = _HASHES[algorithm]()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def entry_hash(entry: dict[str, Any]) -> tuple[str, str]:
    """The (algorithm, hex digest) recorded in a manifest entry of a tensor file."""
    for algorithm in _HASHES:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise CorruptStoreError(
        f"the manifest entry of tensor file {entry.get('file')!r} records no content hash "
        f"(one of {', '.join(_HASHES)}); the manifest was edited or damaged: restore it from a "
        "backup, or re-record the run"
    )


def write_failed(path: Path, err: OSError) -> StoreError:
    """The `StoreError` for a failed write of ``path``: what happened, and what to do."""
    if isinstance(err, StoreError):
        return err
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "the disk is full: free space, then resume (the store keeps what it listed)"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the folder cannot be written: record into a writable folder"
    else:
        hint = "an I/O error: check the disk (the store keeps what its manifest listed)"
    return StoreError(f"writing {path} failed ({err.strerror or err}): {hint}")


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it.

    Raises:
        StoreError: The write failed (a full disk, no permission); no file is left behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with os.fdopen(create_new(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0)), "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                settle(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, an I/O error: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_failed(path, err) from err
        raise


_FILLER = "pad"  # names of the filler tensors before page-aligned ones: never a step's key
_PAGE_ALIGNED_FROM = 256 << 10  # durable files give tensors from this size a page of their own
_ZEROS = bytes(PAGE)


def _as_bytes(tensor: torch.Tensor):
    """A zero-copy uint8 view of a CPU tensor's data (a buffer for ``write`` and hashing)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


_SMALL = 64 << 10  # tensors below this size are gathered before they are written
_NUMPY = {torch.float64, torch.float32, torch.int64, torch.int32, torch.uint8, torch.bool}


def _small_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes as a memoryview, quickly for the usual dtypes (no torch call)."""
    if not tensor.numel():
        return memoryview(b"")
    if tensor.dim() and tensor.dtype in _NUMPY and tensor.is_contiguous():
        return memoryview(tensor.numpy()).cast("B")
    return memoryview(_as_bytes(tensor))


def write_tensor_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], durable: bool = False
) -> dict[str, Any]:
    """Write a safetensors file atomically; return its manifest entry (file, hash, bytes).

    The file is streamed: the header, then each tensor's bytes straight from its memory,
    hashed on the way (no serialized copy of the whole file is built). Tensors are laid
    out by decreasing item size, so every tensor starts at an offset aligned to its dtype,
    as ``safetensors.torch.save`` does. The file appears under its name only when complete.
    A durable file is written with ``O_DIRECT`` where the system allows
    (`diskio.SequentialWriter`): its header is padded so that the data starts at a page
    of the file, and each tensor of 256 KiB or more starts at a page too, after a zero
    filler tensor named ``pad/<i>`` (the format allows no holes; readers look tensors up
    by name, so the fillers are invisible to them).

    Args:
        path: Destination file.
        tensors: Name -> CPU tensor of any shape.
        metadata: String metadata stored in the safetensors header.
        durable: Also flush the file to the disk (fsync) before it takes its name, and then
            drop its pages from the page cache: a recorder's shards are written once and
            read much later, and fresh page-cache memory for gigabytes of them costs more
            CPU than the write itself (see `diskio.settle`).
    """
    tensors = {
        k: v if v.is_cpu and not v.requires_grad else v.detach().cpu() for k, v in tensors.items()
    }
    if any(t.dtype not in DTYPE_CODES for t in tensors.values()):  # rare: let
        data = safetensors.torch.save(  # safetensors serialize what we do not stream
            # (copies: it refuses tensors that share memory, as steps share their sizes)
            {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
            metadata=metadata,
        )
        write_atomic(path, data, durable)
        return {"file": path.name, HASH: _HASHES[HASH](data).hexdigest(), "bytes": len(data)}
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: keeps order
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[Any] = []  # the data section, in file order: tensors and zero fillers
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        if durable and size >= _PAGE_ALIGNED_FROM and offset % PAGE:
            # large tensors start at a page of the file, to go to the disk straight from
            # their memory (O_DIRECT); the format has no holes, so a named filler goes first
            gap = -offset % PAGE
            header[f"{_FILLER}/{len(chunks)}"] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [offset, offset + gap],
            }
            chunks.append(_ZEROS[:gap])
            offset += gap
        header[key] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        chunks.append(t)  # its bytes are taken when written: a copy, if not contiguous
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    # pad (with spaces, as the format allows) to 8 bytes, or so that the data section starts
    # at a page of the file
    head += b" " * (-(8 + len(head)) % PAGE if durable else -len(head) % 8)
    digest = _HASHES[HASH]()
    tmp = path.with_name(path.name + ".tmp")
    try:
        writer = SequentialWriter(tmp, direct=durable)
    except OSError as err:
        raise write_failed(path, err) from err
    small = bytearray()  # consecutive small tensors, written (and hashed) at once

    def write(data) -> None:
        digest.update(data)  # the hash and write release the GIL for large buffers
        writer.write(data)

    try:
        for chunk in (len(head).to_bytes(8, "little") + head, *chunks):
            if isinstance(chunk, torch.Tensor) and chunk.numel() * chunk.element_size() < _SMALL:
                small += _small_bytes(chunk)  # (a shard holds hundreds: each write costs)
                continue
            if small:
                write(small)
                small = bytearray()
            data = _as_bytes(chunk) if isinstance(chunk, torch.Tensor) else chunk
            write(data)
            del data  # a non-contiguous tensor's copy goes before the next is made
        if small:
            write(small)
        writer.close(sync=durable)
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, an I/O error: no partial file stays behind
        writer.abandon()
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_failed(path, err) from err
        raise
    return {"file": path.name, HASH: digest.hexdigest(), "bytes": 8 + len(head) + offset}


def write_final(
    path: Path,
    params: dict[str, torch.Tensor],
    durable: bool = False,
    buffers: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write a store's final parameters (and buffers) to ``path``; return the entry.

    Args:
        path: The file.
        params: Parameter name -> tensor (``"w/<name>"`` in the file).
        durable: As for `write_tensor_file`.
        buffers: Buffer name -> tensor (``"buf/<name>"``), the model's at the end.
    """
    tensors = {f"w/{n}": t for n, t in params.items()}
    tensors.update({f"buf/{n}": t for n, t in (buffers or {}).items()})
    return write_tensor_file(path, tensors, {"format": "pk_attrib.final"}, durable)


def _manifest_text(manifest: dict[str, Any], steps_json: list[str] | None = None) -> str:
    """The manifest as JSON text: one line per key, one line per step entry."""
    steps = manifest.get("steps", [])
    if steps_json is None or len(steps_json) != len(steps):
        steps_json = [json.dumps(step, separators=(",", ":")) for step in steps]
    lines = []
    for key, value in manifest.items():
        if key == "steps":
            body = ",\n  ".join(steps_json)
            lines.append(f'"steps": [\n  {body}\n ]' if steps_json else '"steps": []')
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def write_manifest(
    root: Path,
    manifest: dict[str, Any],
    steps_json: list[str] | None = None,
    durable: bool = True,
) -> None:
    """Write ``manifest.json`` atomically (temp file + rename).

    Args:
        root: The store folder.
        manifest: The manifest; its ``updated`` time is set, and its format and library
            versions become this library's: whatever it held, the tensor files it lists now
            may carry this version's content hash (a resumed or saved version-1 store).
        steps_json: Optional cache of the JSON text of ``manifest["steps"]``, one string
            per step, that the caller extends as steps are added (saves re-serializing a
            long run's steps for every shard); ignored when its length does not match.
        durable: Flush it (and the folder's renames) to the disk before returning; False
            leaves that to a later `make_durable` (the file is whole either way: written
            to a temporary file, then renamed).
    """
    manifest.update(
        format_version=FORMAT_VERSION, library_version=library_version(), updated=time.time()
    )
    # durable in order: the files it lists are renamed into place (folder synced), then the
    # manifest itself is flushed, then its own rename is synced
    if durable:
        _sync_folder(root)
    text = _manifest_text(manifest, steps_json).encode()
    write_atomic(root / MANIFEST, text, durable=durable)
    if durable:
        _sync_folder(root)


def make_durable(root: Path, names: list[str]) -> None:
    """Flush files of a store written without ``durable`` to the disk, then its folder.

    In order (a file before the manifest that lists it), then the folder's entries (their
    renames); their pages are dropped from the page cache.

    Args:
        root: The store folder.
        names: The files, those that others list first (a file before the manifest).
    """
    for name in names:
        fd = os.open(root / name, os.O_RDONLY)
        try:
            settle(fd)
        finally:
            os.close(fd)
    _sync_folder(root)


def _sync_folder(root: Path) -> None:
    """Flush a folder's entries (renames) to the disk, where the system allows it."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:  # (Windows cannot open a folder)
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a store's manifest.

    Raises:
        NotAStoreError: The folder is missing, or holds no pk_attrib manifest.
        FormatVersionError: The manifest's format version is not one this library reads.
        CorruptStoreError: The manifest lacks a key readers rely on, or holds a wrong value.
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
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{root} has store format version {version!r}, but this pk_attrib "
            f"({library_version()}) reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
            f"install the pk_attrib version that wrote it "
            f"({manifest.get('library_version', 'unknown')})"
        )
    schema.validate(manifest, str(path))
    return manifest


class ShardReader:
    """Lazy, verified access to the tensor files of a store.

    Each file is hashed once, on first use, and its header checked against its size
    (`tensorfile.TensorFile`); tensors are then read with plain reads. At most ``max_open``
    files stay open (least recently used first out), so reading a long path does not keep
    every shard open.
    """

    def __init__(
        self, root: Path, verify: bool = True, max_open: int = 2, stamp: float | None = None
    ):
        self.root = root
        self.verify = verify
        self.max_open = max(1, max_open)
        # the ``updated`` time of the manifest the caller read: a file that fails while the
        # manifest on the disk is newer (or a recorder holds the store) was changed by a
        # writer, which is no damage
        self.stamp = stamp
        self._open: collections.OrderedDict[str, TensorFile] = collections.OrderedDict()
        self._keys: dict[str, set[str]] = {}
        self._checked: set[str] = set()

    def check(self, entry: dict[str, Any]) -> Path:
        """Check that a listed tensor file exists, matches its hash and its header its size.

        Returns:
            The file's path.

        Raises:
            CorruptStoreError: The file is missing, a link, or does not match.
            StoreChangedError: It does not, because a recorder changed the store meanwhile.
        """
        try:
            return self._check(entry)
        except CorruptStoreError as err:
            raise self._changed(err) from err
        except FileNotFoundError as err:  # (removed between the listing and the read)
            raise self._changed(self._missing(entry["file"])) from err

    def _missing(self, name: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"tensor file {name} listed in {self.root / MANIFEST} is missing; restore it from "
            "a backup, or re-record the run"
        )

    def _changed(self, err: CorruptStoreError) -> StoreError:
        """``err``, or a `StoreChangedError` when a writer changed the store while read."""
        if self.stamp is None:
            return err
        try:
            now = json.loads((self.root / MANIFEST).read_text()).get("updated")
        except (OSError, ValueError, AttributeError):
            now = None
        if now == self.stamp and not lock_held(self.root):
            return err
        return StoreChangedError(
            f"{self.root} changed while it was being read: a PathRecorder is writing it "
            f"({err}). Load it again (TrainingPath.load), or wait until the recording is closed"
        )

    def _check(self, entry: dict[str, Any]) -> Path:
        path = self.root / entry["file"]
        if path.is_symlink():
            raise CorruptStoreError(
                f"tensor file {entry['file']} listed in {self.root / MANIFEST} is a symbolic "
                "link; restore it from a backup, or re-record the run"
            )
        if not path.is_file():
            raise self._missing(entry["file"])
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise CorruptStoreError(
                f"tensor file {path} holds {size} bytes, but the manifest lists {entry['bytes']}: "
                "it was truncated, extended or replaced; restore it from a backup, or re-record "
                "the run"
            )
        algorithm, expected = entry_hash(entry)
        digest = file_hash(path, algorithm)
        if digest != expected:
            raise CorruptStoreError(
                f"tensor file {path} does not match its recorded {algorithm} hash (expected "
                f"{expected[:12]}…, found {digest[:12]}…): it was modified or damaged; "
                "restore it from a backup, or re-record the run"
            )
        check_header(path)  # a crafted header can match a crafted hash
        return path

    def trust(self, name: str) -> None:
        """Skip the check of a file this process has just written (its hash is its own)."""
        self._checked.add(name)

    def handle(self, entry: dict[str, Any]) -> TensorFile:
        """The open `TensorFile` of a listed file (verified on first use)."""
        name = entry["file"]
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        path = self.root / name
        if name not in self._checked:
            if self.verify or not path.is_file():
                self.check(entry)
            self._checked.add(name)
        try:
            file = TensorFile(path)
        except FileNotFoundError as err:  # (a writer replaced it after the check)
            raise self._changed(self._missing(name)) from err
        self._open[name] = file
        self._keys.setdefault(name, file.keys())
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return file

    def get(self, entry: dict[str, Any], key: str) -> torch.Tensor | None:
        """The tensor ``key`` of a file (a fresh copy), or None when the file has no such tensor."""
        if key not in self.keys(entry):
            return None
        try:
            return self.handle(entry).get(key)
        except CorruptStoreError as err:  # (a file shortened while being read)
            raise self._changed(err) from err

    def keys(self, entry: dict[str, Any]) -> set[str]:
        """The tensor names of a file."""
        name = entry["file"]
        if name not in self._keys:
            try:
                self.handle(entry)
            except CorruptStoreError as err:
                raise self._changed(err) from err
        return self._keys[name]


def lock_held(root: Path) -> bool:
    """Whether a recorder holds the store's lock now (it is being written)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # (no lock file: nobody ever recorded into it)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing also releases a shared lock taken)
    return False
