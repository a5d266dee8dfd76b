"""Reading a store's safetensors files: a checked header, then plain reads, never a memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. `TensorFile` checks the header against
the file before any tensor is read (its length, every range inside the file, no two
overlapping, each the size its dtype and shape say), so a crafted or damaged header is a
`CorruptStoreError`, not a raw ``SafetensorError`` or an allocation of 2^62 bytes. Tensors are
read with ``pread`` into fresh memory: a file truncated while it is being read gives a short
read, reported as such, where a memory map would kill the process with SIGBUS.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..exceptions import CorruptStoreError

# safetensors' dtype codes of the torch dtypes a store holds
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# what a reader accepts: those, and the rarer dtypes safetensors itself writes for the rest
_DTYPE_OF = {code: dtype for dtype, code in DTYPE_CODES.items()}
for _code, _name in [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("C64", "complex64"),
]:
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPE_OF[_code] = getattr(torch, _name)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class TensorFile:
    """One safetensors file, open for reading, with its header checked.

    Args:
        path: The file. A symbolic link is refused: a store holds only its own files.

    Raises:
        CorruptStoreError: The file is a link, or its header does not describe its content.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(path, os.O_RDONLY | nofollow | getattr(os, "O_BINARY", 0))
        except OSError as err:
            if path.is_symlink():
                raise CorruptStoreError(
                    f"{path} is a symbolic link: a store folder holds only the files pk_attrib "
                    "writes; replace the link with the file"
                ) from err
            raise
        try:
            self.size = os.fstat(self.fd).st_size
            self.tensors, self.data_start = self._header()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"tensor file {self.path} is damaged: {what}; restore it from a backup, or "
            "re-record the run"
        )

    def _read(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise self._corrupt(
                f"it ends at byte {self.size} but its header needs {offset + n} (was it "
                "truncated, or shortened while being read?)"
            )
        return data

    def _header(self) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
        if self.size < 8:
            raise self._corrupt(f"it holds {self.size} bytes, less than a header")
        n = int.from_bytes(self._read(8, 0), "little")
        if n > min(self.size - 8, _MAX_HEADER):
            raise self._corrupt(f"its header claims {n} bytes, more than the file holds")
        try:
            header = json.loads(self._read(n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        data_bytes = self.size - 8 - n
        tensors, ranges = {}, []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _DTYPE_OF[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, stop = (int(v) for v in info["data_offsets"])
                bad = any(d < 0 for d in shape) or not 0 <= start <= stop <= data_bytes
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"its header's entry {key!r} is malformed") from None
            if bad:
                raise self._corrupt(f"tensor {key!r} lies outside the file's data")
            if stop - start != math.prod(shape) * dtype.itemsize:
                raise self._corrupt(f"tensor {key!r} does not take the bytes its shape says")
            tensors[key] = (dtype, shape, start, stop)
            ranges.append((start, stop))
        ranges.sort()
        for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
            if start < stop:
                raise self._corrupt("two of its tensors overlap")
        return tensors, 8 + n

    def keys(self) -> set[str]:
        """The names of the file's tensors."""
        return set(self.tensors)

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, read into fresh memory (changing it changes no other read)."""
        dtype, shape, start, stop = self.tensors[key]
        out = torch.empty(stop - start, dtype=torch.uint8)
        if stop > start and hasattr(os, "preadv"):  # straight into the tensor's memory
            got = os.preadv(self.fd, [memoryview(out.numpy())], self.data_start + start)
            if got != stop - start:
                self._read(stop - start, self.data_start + start)  # (raises, naming the cause)
        elif stop > start:
            out.numpy()[:] = memoryview(self._read(stop - start, self.data_start + start))
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def check_header(path: Path) -> dict[str, Any]:
    """Open a tensor file only to check its header; return ``{name: (dtype, shape)}``."""
    file = TensorFile(path)
    try:
        return {k: (v[0], v[1]) for k, v in file.tensors.items()}
    finally:
        file.close()
