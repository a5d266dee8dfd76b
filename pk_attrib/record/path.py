"""`TrainingPath`: read access to a recorded (or checkpoint-built) weight path.

A path has ``len(path) = S`` steps. ``path.params(s)`` is w_s for s = 0..S, where w_S is the
final model; ``path.step(s)`` bundles what step s needs: w_s, w_{s+1}, Δ_s, the dataset
indices of its batch, the learning rates and the optimizer terms (`pk_attrib.record.step`).
Tensors are read lazily from the store's safetensors files (or from memory for an in-memory
recording).

Recorded paths with ``every=k`` keep one snapshot every k optimizer steps; their step s spans
k optimizer steps (indices concatenated, learning rates summed in ``lr_sum``) and the path
is marked approximate, as are paths built from a few checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..exceptions import CorruptStoreError, NonFiniteError, StoreError, StoreMismatchError
from .backends import DiskBackend, MemoryBackend, names, new_manifest, raw_keys
from .from_checkpoints import checkpoint_records
from .step import Step
from .store import (
    FINAL,
    dtype_from_name,
    read_manifest,
    write_final,
    write_manifest,
    write_tensor_file,
)
from .wrappers import module_for

__all__ = ["DiskBackend", "MemoryBackend", "Step", "TrainingPath", "new_manifest"]


class TrainingPath:
    """A recorded weight path: the parameters before every optimizer step, and the final ones.

    Get one from ``PathRecorder(...).path``, `TrainingPath.load`, or
    `TrainingPath.from_checkpoints`.
    """

    def __init__(self, manifest: dict[str, Any], backend: MemoryBackend | DiskBackend):
        self.manifest = manifest
        self._backend = backend

    # -- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> TrainingPath:
        """Open a store folder written by `PathRecorder` or `TrainingPath.save`.

        Args:
            directory: The store folder.
            verify: Check each tensor file against its content hash on first access.

        Raises:
            NotAStoreError, FormatVersionError, CorruptStoreError: See `pk_attrib.exceptions`.
        """
        root = Path(directory)
        manifest = read_manifest(root)
        return cls(manifest, DiskBackend(root, manifest, verify=verify))

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[Mapping[str, torch.Tensor] | str | os.PathLike],
        learning_rates: float | Sequence[float],
        model: torch.nn.Module | None = None,
    ) -> TrainingPath:
        """Build an approximate path from a few saved checkpoints (checkpoint mode).

        Args:
            checkpoints: K state dicts, or files holding one (``.safetensors``, or a torch
                file read with ``weights_only=True``; ``{"state_dict": ...}`` and
                ``{"model_state_dict": ...}`` wrappers are unwrapped).
            learning_rates: η_k, one per checkpoint, or one for all.
            model: When given, keep only the model's trainable parameters, and the
                model's buffers (BatchNorm statistics) each checkpoint holds: checkpoint
                mode then evaluates checkpoint k with its own buffers, as TracInCP does.

        Returns:
            A path with ``len(path) == K`` whose step k holds checkpoint k and η_k; it is
            marked approximate.
        """
        return cls(*checkpoint_records(checkpoints, learning_rates, model))

    # -- description --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._intervals())

    @property
    def param_names(self) -> list[str]:
        """Names of the recorded (trainable) parameters, in model order."""
        return names(self.manifest)

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        """Shape of each recorded parameter."""
        return {p["name"]: torch.Size(p["shape"]) for p in self.manifest["params"]}

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        """Storage dtype of each recorded parameter."""
        return {p["name"]: dtype_from_name(p["dtype"]) for p in self.manifest["params"]}

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the parameters (the widest one when they differ)."""
        dtypes = list(self.param_dtypes.values())
        return max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)

    @property
    def dataset_size(self) -> int | None:
        """Length of the training dataset the indices refer to (None when unknown)."""
        return self.manifest.get("dataset_size")

    @property
    def optimizer(self) -> dict[str, Any] | None:
        """The optimizer description: kind, class, exact, param groups and hyperparameters."""
        return self.manifest.get("optimizer")

    @property
    def every(self) -> int:
        """Snapshot interval in optimizer steps (1: every step was recorded)."""
        return int(self.manifest.get("every", 1))

    @property
    def source(self) -> str:
        """``"recorder"`` or ``"checkpoints"``."""
        return self.manifest.get("source", "recorder")

    @property
    def approximate(self) -> bool:
        """True when only approximate (checkpoint) modes can explain this path."""
        return bool(self.manifest.get("approximate", False))

    @property
    def approximate_reasons(self) -> list[str]:
        """Why the path is approximate (empty for an exact path)."""
        return list(self.manifest.get("approximate_reasons", []))

    @property
    def complete(self) -> bool:
        """False for a run that was interrupted: the path then ends at its last full snapshot."""
        return bool(self.manifest.get("complete", False))

    @property
    def learning_rates(self) -> torch.Tensor:
        """Learning rate of each param group at each step, float64 (len(path), n_groups)."""
        return torch.tensor([self.step(s).lr for s in range(len(self))], dtype=torch.float64)

    def __repr__(self) -> str:
        kind = (self.optimizer or {}).get("kind", "none")
        flag = "approximate" if self.approximate else "exact"
        n = sum(s.numel() for s in self.param_shapes.values())
        return f"TrainingPath(steps={len(self)}, params={n}, optimizer={kind}, {flag})"

    # -- access ---------------------------------------------------------------------------

    def _intervals(self) -> list[range]:
        """The optimizer steps each path step spans; snapshots sit at multiples of ``every``."""
        n_raw = self._backend.n_raw()
        has_final = self._backend.has_final()
        key = (n_raw, has_final)
        if getattr(self, "_interval_key", None) != key:
            bounds = list(range(0, n_raw, self.every)) + ([n_raw] if has_final else [])
            pairs = zip(bounds[:-1], bounds[1:], strict=True)
            self._interval_list = [range(a, b) for a, b in pairs]
            self._interval_key = key
        return self._interval_list

    def step(self, s: int) -> Step:
        """Step s (0 <= s < len(path)); negative indices count from the end."""
        intervals = self._intervals()
        if s < 0:
            s += len(intervals)
        if not 0 <= s < len(intervals):
            raise IndexError(f"step {s} out of range for a path of {len(intervals)} steps")
        return Step(self, s, intervals[s])

    def __iter__(self) -> Iterator[Step]:
        return (self.step(s) for s in range(len(self)))

    def params(self, s: int) -> dict[str, torch.Tensor]:
        """w_s by parameter name, for 0 <= s <= len(path) (s = len(path): the final model)."""
        intervals = self._intervals()
        if s < 0:
            s += len(intervals) + 1
        if s == len(intervals):
            return self.final
        if not 0 <= s < len(intervals):
            raise IndexError(f"parameters {s} out of range 0..{len(intervals)}")
        return self._raw_params(intervals[s][0])

    def _raw_params(self, raw: int) -> dict[str, torch.Tensor]:
        shapes, dtypes = self.param_shapes, self.param_dtypes
        return {
            n: self._checked(
                self._backend.tensor(raw, f"w/{n}"), raw, f"w/{n}", shapes[n], dtypes[n]
            )
            for n in self.param_names
        }

    def _checked(self, tensor, raw: int | str, key: str, shape, dtype=None) -> torch.Tensor:
        """``tensor`` (``key`` of raw step ``raw``, or ``"final"``) if its shape and dtype fit."""
        if tensor is None or tensor.shape != shape or (dtype is not None and tensor.dtype != dtype):
            got = "nothing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise CorruptStoreError(
                f"{'the final parameters' if raw == 'final' else f'optimizer step {raw}'} of the "
                f"path hold {got} as {key}, where "
                f"{tuple(shape)} {dtype or ''} belongs: the store was damaged or its files "
                "swapped; restore it from a backup, or re-record the run"
            )
        return tensor

    def _batch(self, raw: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Raw step ``raw``'s dataset indices and micro-batch sizes, checked (None, None: none)."""
        idx, sizes = self._backend.tensor(raw, "idx"), self._backend.tensor(raw, "bs")
        if idx is None and sizes is None:
            return None, None
        size = self.dataset_size
        ok = (
            idx is not None
            and sizes is not None
            and idx.dtype == sizes.dtype == torch.int64
            and idx.dim() == sizes.dim() == 1
            and bool((sizes >= 0).all())
            and int(sizes.sum()) == len(idx)
            and (not len(idx) or int(idx.min()) >= 0)
            and (size is None or not len(idx) or int(idx.max()) < size)
        )
        if not ok:
            raise CorruptStoreError(
                f"optimizer step {raw} of the path holds batch indices that do not fit its "
                f"batch sizes or the training set ({size} examples): the store was damaged; "
                "restore it from a backup, or re-record the run"
            )
        return idx, sizes

    @property
    def initial(self) -> dict[str, torch.Tensor]:
        """w_0, the parameters before the first step."""
        return self.params(0)

    @property
    def final(self) -> dict[str, torch.Tensor]:
        """w_S, the parameters after the last step (the model being explained)."""
        final = self._backend.final_params()
        if final is not None:
            shapes, dtypes = self.param_shapes, self.param_dtypes
            return {n: self._checked(t, "final", n, shapes[n], dtypes[n]) for n, t in final.items()}
        if self._backend.n_raw() == 0:
            raise StoreError("the path holds no recorded step yet")
        intervals = self._intervals()
        return self._raw_params(intervals[-1].stop if intervals else 0)

    def check(self) -> None:
        """Read every step as the engine will, checking what `verify` cannot see.

        Each step's batch indices (in range, matching the batch sizes), snapshot (shape,
        dtype), optimizer state and buffers are read, and the weights must be finite.

        Raises:
            CorruptStoreError: A step holds something the engine cannot use.
            NonFiniteError: The run diverged: weights hold NaN or inf (the step is named).
        """
        for s in range(len(self)):  # (each read checks what it reads)
            step = self.step(s)
            _ = (step.indices, step.batch_sizes, step.optimizer_state, step.initial_state)
            _ = step.buffers
        diverged = self.first_non_finite()
        if diverged is not None:
            raise NonFiniteError(
                f"the training run diverged: the weights before step {diverged} of the path hold "
                f"NaN or inf (optimizer step {diverged - 1} made them so); steps before it can "
                "be explained, later ones cannot"
                if diverged
                else "the initial weights hold NaN or inf: nothing on this path can be explained"
            )

    def _keys(self) -> dict[int, set[str]]:
        """Tensor keys of every raw step (read once: shard headers or records)."""
        n = self._backend.n_raw()
        if getattr(self, "_key_index", None) is None or len(self._key_index) != n:
            self._key_index = self._backend.keys_by_step()
        return self._key_index

    def _rng_state(self, raw: int, i: int) -> tuple[torch.Tensor, ...] | None:
        """The random-number state micro-batch i of raw step ``raw`` started from, or None.

        The latest kept at or before it (a recording keeps a state only when it moved).
        """
        keys = self._keys()
        for r in range(raw, -1, -1):
            kept = [int(k.split("/")[1]) for k in keys[r] if k.startswith("rng/")]
            before = [j for j in kept if r < raw or j <= i]
            if before:
                j = max(before)
                cuda = {k.split("/")[0] for k in keys[r] if k.startswith("rng_cuda")}
                devices = sorted((d.removeprefix("rng_cuda") for d in cuda), key=int)
                states = [self._backend.tensor(r, f"rng/{j}")]
                states += [self._backend.tensor(r, f"rng_cuda{d}/{j}") for d in devices]
                return tuple(states)
        return None

    def buffers(self, s: int) -> dict[str, torch.Tensor]:
        """The model's buffers at w_s (s = len(path): at the end), by name; {} without any.

        Each buffer's value is the latest the path kept at or before w_s (a recording keeps
        a buffer again only when it changed).
        """
        names = self.manifest.get("buffers", [])
        if not names:
            return {}
        intervals = self._intervals()
        if s < 0:
            s += len(intervals) + 1
        out = {}
        if s == len(intervals):
            for name in names:
                found = self._backend.final_buffer(name) if self._backend.has_final() else None
                if found is not None:
                    out[name] = found
            if len(out) == len(names):
                return out
        raw = intervals[s][0] if s < len(intervals) else (intervals[-1].stop if intervals else 0)
        keys = self._keys()
        for name in names:
            if name in out:
                continue
            for r in range(min(raw, self._backend.n_raw() - 1), -1, -1):
                if f"buf/{name}" in keys[r]:
                    out[name] = self._backend.tensor(r, f"buf/{name}")
                    break
        return out

    def first_non_finite(self) -> int | None:
        """The first s whose weights w_s hold NaN or inf (len(path): the final ones), or None.

        Where a diverged run went wrong: step s − 1 made the weights non-finite. Reads the
        whole path.
        """
        for s in range(len(self) + 1):
            if not all(bool(torch.isfinite(t).all()) for t in self.params(s).values()):
                return s
        return None

    def load_into(self, model: torch.nn.Module, s: int | None = None) -> None:
        """Copy w_s (default: the final parameters) into the model's parameters, by name."""
        values = self.final if s is None else self.params(s)
        params = dict(module_for(model, values).named_parameters())
        missing = [n for n in values if n not in params]
        if missing:
            raise StoreMismatchError(
                f"the model has no parameters named {missing[:5]}: pass the model the path "
                "was recorded from"
            )
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)

    def verify(self) -> None:
        """Check every tensor file of a stored path against its content hash.

        Raises:
            CorruptStoreError: A file is missing or does not match its hash.
        """
        if isinstance(self._backend, DiskBackend):
            for entry in self.manifest["shards"] + [self.manifest.get("final")]:
                if entry is not None:
                    self._backend.reader.check(entry)

    def save(self, directory: str | os.PathLike, shard_bytes: int = 128 << 20) -> TrainingPath:
        """Write this path as a store folder (new or empty) and return the stored path."""
        root = Path(directory)
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} is not empty: save a path into a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {k: v for k, v in self.manifest.items() if k not in ("steps", "shards", "final")}
        manifest.update(steps=[], shards=[], final=None)
        backend = self._backend
        batch: list[int] = []
        size = 0

        def write(raws: list[int]) -> None:
            tensors = {}
            for r in raws:
                for key in raw_keys(backend, r):
                    tensors[f"{r}/{key}"] = backend.tensor(r, key)
            entry = write_tensor_file(
                root / f"shard-{raws[0]:08d}.safetensors", tensors, {"format": "pk_attrib.shard"}
            )
            entry.update(first_step=raws[0], n_steps=len(raws))
            manifest["shards"].append(entry)
            manifest["steps"].extend(backend.meta(r) for r in raws)

        for r in range(backend.n_raw()):
            batch.append(r)
            if backend.has(r, "w/" + self.param_names[0]):
                size += sum(s.numel() * 4 for s in self.param_shapes.values())
            if size >= shard_bytes:
                write(batch)
                batch, size = [], 0
        if batch:
            write(batch)
        final = self._backend.final_params()
        if final is not None:
            manifest["final"] = write_final(root / FINAL, final)
        write_manifest(root, manifest)
        return TrainingPath.load(root)
