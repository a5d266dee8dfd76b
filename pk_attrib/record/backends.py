"""Where a path's tensors live: in memory (a recording without a store) or in a store folder.

Both backends answer the same questions about *raw* optimizer steps r (before ``every``
grouping): the tensor ``"<r>/<key>"``, the step's metadata, and the final parameters.
`TrainingPath` builds its steps on top of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..exceptions import StoreError
from .store import FORMAT, FORMAT_VERSION, ShardReader, dtype_name, library_version


class MemoryBackend:
    """Raw steps kept in memory: ``records[r] = {"tensors": {...}, "meta": {...}}``."""

    def __init__(self):
        self.records: list[dict[str, Any]] = []
        self.final: dict[str, torch.Tensor] | None = None
        self.final_buffers: dict[str, torch.Tensor] = {}

    def n_raw(self) -> int:
        """Number of raw optimizer steps held."""
        return len(self.records)

    def tensor(self, raw: int, key: str) -> torch.Tensor | None:
        """A copy of tensor ``key`` of raw step ``raw`` (None when absent).

        A copy, as from a store: editing what a path returns never changes the record.
        """
        value = self.records[raw]["tensors"].get(f"{raw}/{key}")
        return None if value is None else value.clone()

    def meta(self, raw: int) -> dict[str, Any]:
        """Metadata of raw step ``raw`` (learning rates, flags)."""
        return self.records[raw]["meta"]

    def has(self, raw: int, key: str) -> bool:
        """Whether raw step ``raw`` holds tensor ``key``."""
        return f"{raw}/{key}" in self.records[raw]["tensors"]

    def final_params(self) -> dict[str, torch.Tensor] | None:
        """A copy of the final parameters, or None for an interrupted run."""
        return None if self.final is None else {n: t.clone() for n, t in self.final.items()}

    def has_final(self) -> bool:
        """Whether the final parameters were recorded."""
        return self.final is not None

    def keys_by_step(self) -> dict[int, set[str]]:
        """The tensor keys (without the step prefix) of every raw step."""
        return {
            r: {k.split("/", 1)[1] for k in record["tensors"]}
            for r, record in enumerate(self.records)
        }

    def final_buffer(self, name: str) -> torch.Tensor | None:
        """A copy of buffer ``name`` at the end of the run (None: not recorded)."""
        found = self.final_buffers.get(name) if self.final is not None else None
        return None if found is None else found.clone()


class DiskBackend:
    """Raw steps read from a store folder through its manifest."""

    def __init__(
        self, root: Path, manifest: dict[str, Any], verify: bool = True, writing: bool = False
    ):
        self.root = root
        self.manifest = manifest
        # a reader tells a file a recorder changed from a damaged one; the recorder itself
        # (``writing``: it holds the store) reads it as it is
        stamp = None if writing else manifest.get("updated")
        self.reader = ShardReader(root, verify=verify, stamp=stamp)
        self._shard_of: list[dict[str, Any]] = []
        for entry in manifest["shards"]:
            self._shard_of.extend([entry] * entry["n_steps"])
        if len(self._shard_of) != len(manifest["steps"]):
            raise StoreError(
                f"{root / 'manifest.json'} lists {len(manifest['steps'])} steps but its shards "
                f"hold {len(self._shard_of)}: the manifest was edited by hand; re-record the run"
            )

    def n_raw(self) -> int:
        """Number of raw optimizer steps held."""
        return len(self._shard_of)

    def tensor(self, raw: int, key: str) -> torch.Tensor | None:
        """Tensor ``key`` of raw step ``raw`` (None when absent), read into fresh memory."""
        return self.reader.get(self._shard_of[raw], f"{raw}/{key}")

    def has(self, raw: int, key: str) -> bool:
        """Whether raw step ``raw`` holds tensor ``key``."""
        return f"{raw}/{key}" in self.reader.keys(self._shard_of[raw])

    def meta(self, raw: int) -> dict[str, Any]:
        """Metadata of raw step ``raw`` (learning rates, flags)."""
        return self.manifest["steps"][raw]

    def has_final(self) -> bool:
        """Whether the final parameters were recorded."""
        return self.manifest.get("final") is not None

    def keys_by_step(self) -> dict[int, set[str]]:
        """The tensor keys (without the step prefix) of every raw step, shard by shard."""
        found: dict[int, set[str]] = {r: set() for r in range(self.n_raw())}
        for entry in self.manifest["shards"]:
            for key in self.reader.keys(entry):
                raw, _, rest = key.partition("/")
                if raw.isdigit() and int(raw) in found:
                    found[int(raw)].add(rest)
        return found

    def final_buffer(self, name: str) -> torch.Tensor | None:
        """Buffer ``name`` at the end of the run (None: not recorded)."""
        entry = self.manifest.get("final")
        return None if entry is None else self.reader.get(entry, f"buf/{name}")

    def final_params(self) -> dict[str, torch.Tensor] | None:
        """The final parameters, or None for an interrupted run."""
        entry = self.manifest.get("final")
        if entry is None:
            return None
        return {name: self.reader.get(entry, f"w/{name}") for name in names(self.manifest)}


def names(manifest: dict[str, Any]) -> list[str]:
    """Recorded parameter names, in model order."""
    return [p["name"] for p in manifest["params"]]


def raw_keys(backend: MemoryBackend | DiskBackend, raw: int) -> list[str]:
    """The tensor keys (without the step prefix) of raw step ``raw``."""
    if isinstance(backend, MemoryBackend):
        prefix = f"{raw}/"
        return [k[len(prefix) :] for k in backend.records[raw]["tensors"]]
    entry = backend._shard_of[raw]
    prefix = f"{raw}/"
    return [k[len(prefix) :] for k in backend.reader.keys(entry) if k.startswith(prefix)]


def new_manifest(
    params: Mapping[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    dataset_size: int | None,
    every: int,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """A fresh manifest for the given parameters (values only give names, shapes, dtypes)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "source": "recorder",
        "params": [
            {"name": n, "shape": list(t.shape), "dtype": dtype_name(dtype or t.dtype)}
            for n, t in params.items()
        ],
        "optimizer": optimizer,
        "dataset_size": dataset_size,
        "every": every,
        "approximate": False,
        "approximate_reasons": [],
        "steps": [],
        "shards": [],
        "final": None,
        "complete": False,
    }
