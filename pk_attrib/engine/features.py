"""Cache of training-side projected features, so many query batches share one pass.

Per step s the projected sweep needs P g_i(w_s) for the batch members (``"f<s>"``) and the
exact batch gradient (``"g<s>"``). They depend on the path and the projector only, not on
the queries, so they are computed once and kept in memory or in safetensors shards under
the store, with a JSON index and a content hash per file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..exceptions import PkAttribWarning
from ..record.store import ShardReader, write_atomic, write_tensor_file


class FeatureCache:
    """Training-side projected features P g_i(w_s) per step, reused across query batches.

    Written to ``folder`` (inside the store, when the path is stored) as safetensors shards
    with a JSON index, so later sessions reuse them too; without a folder, kept in memory up
    to ``memory_bytes`` (what does not fit is handed back by `keep` but not kept, and so is
    recomputed when needed again). Features are stored in ``dtype`` (float32, or float16 /
    bfloat16 to halve the space).

    Args:
        folder: Where to persist them (None: memory only).
        dtype: Storage dtype.
        shard_bytes: Size at which a shard is written.
        memory_bytes: Most bytes kept in memory without a folder (None: no limit).
        device: Where a cache without a folder keeps its tensors (a folder's pending ones
            wait on the CPU).
    """

    def __init__(
        self,
        folder=None,
        dtype: torch.dtype = torch.float32,
        shard_bytes: int = 64 << 20,
        memory_bytes: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.folder = None if folder is None else Path(folder)
        self.dtype = dtype
        self.shard_bytes = shard_bytes
        self.memory_bytes = memory_bytes
        self._memory_used = 0
        self._memory: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._index: dict[str, str] = {}
        self._files: dict[str, dict] = {}  # file name -> manifest entry (with its hash)
        # reads (and checks once) the cache's files: a damaged cache is an error, never a
        # wrong number
        self._reader = None if self.folder is None else ShardReader(self.folder)
        if self.folder is not None and (self.folder / "index.json").is_file():
            index = json.loads((self.folder / "index.json").read_text())
            self._index, self._files = index["steps"], index["files"]
        # features from an earlier session are checked once against fresh ones (`verify`)
        self.unverified = bool(self._index)
        self._writable = self.folder is not None  # False once writing there failed

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._pending or key in self._index

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        if key in self._pending:
            return self._pending[key]
        return self._reader.get(self._files[self._index[key]], key)

    def keep(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Store a step's tensor; return it as stored (the same numbers as a later read).

        Features (``"f<s>"``) take the storage dtype; exact batch gradients (``"g<s>"``)
        keep theirs. Without a folder, a tensor that would pass ``memory_bytes`` is returned
        but not kept, after kept batch gradients (one backward pass each to recompute) made
        room for features (per-example gradients to recompute).

        Args:
            key: ``"f<s>"`` (features, (B, K)) or ``"g<s>"`` (a batch gradient, (d,)).
            value: The tensor.

        Returns:
            The stored tensor: on ``device`` without a folder, else on the CPU.
        """
        feature = key.startswith("f")
        device = self.device if not self._writable else "cpu"
        stored = value.detach().to(device, self.dtype if feature else value.dtype)
        nbytes = stored.numel() * stored.element_size()
        if not self._writable:
            limit = self.memory_bytes
            if limit is not None and feature:  # features first: batch gradients are cheap
                for other in [k for k in self._memory if k.startswith("g")]:  # to recompute
                    if self._memory_used + nbytes <= limit:
                        break
                    dropped = self._memory.pop(other)
                    self._memory_used -= dropped.numel() * dropped.element_size()
            if limit is None or self._memory_used + nbytes <= limit:
                self._memory[key] = stored
                self._memory_used += nbytes
            return stored
        self._pending[key] = stored
        if sum(t.numel() * t.element_size() for t in self._pending.values()) >= self.shard_bytes:
            self.flush()
        return stored

    def flush(self) -> None:
        """Write pending features to a new shard and the index (atomically)."""
        if not self._writable or not self._pending:
            return
        name = f"features-{len(set(self._index.values())):06d}.safetensors"
        meta = {"format": "pk_attrib.features"}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entry = write_tensor_file(self.folder / name, dict(self._pending), meta)
            files = {**self._files, name: entry}
            index = {**self._index, **{k: name for k in self._pending}}
            listed = {"format": "pk_attrib.features", "steps": index, "files": files}
            write_atomic(self.folder / "index.json", json.dumps(listed).encode())
        except OSError as err:  # a read-only store, a full disk: compute without the cache
            self._writable = False
            warnings.warn(
                f"cannot write the feature cache in {self.folder} ({err.strerror or err}): "
                "training features are kept in memory up to memory_budget and recomputed "
                "beyond it; the results are the same",
                PkAttribWarning,
                stacklevel=3,
            )
            pending, self._pending = self._pending, {}
            for key, value in pending.items():
                self.keep(key, value)
            return
        self._reader.trust(name)
        self._files, self._index, self._pending = files, index, {}

    def verify(self, key: str, fresh: torch.Tensor) -> None:
        """Compare stored features with freshly computed ones; drop the cache if they differ.

        The cache is keyed by the projection, the loss's type and the dtype, not by the
        training data or the loss's settings (label smoothing, class weights): a store
        explained with other data or another loss would otherwise reuse stale features.

        Args:
            key: A stored features key (``"f<s>"``).
            fresh: The same features computed now, (B, K).
        """
        self.unverified = False
        stored = self[key].to(fresh.device, torch.float64)
        expected = fresh.detach().to(self.dtype).to(torch.float64)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        tol = 64 * max(torch.finfo(self.dtype).eps, torch.finfo(fresh.dtype).eps) * scale
        if stored.shape == expected.shape and bool(((stored - expected).abs() <= tol).all()):
            return
        warnings.warn(
            f"the training features cached in {self.folder} do not match this explainer's "
            "training set or loss (they were computed with other data or another loss): "
            "recomputing them",
            PkAttribWarning,
            stacklevel=2,
        )
        self._memory, self._pending, self._index, self._files = {}, {}, {}, {}
        self._reader, self._memory_used = ShardReader(self.folder), 0
