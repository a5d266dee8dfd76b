"""What a store's manifest must hold, checked before anything reads it.

A manifest damaged or edited by hand (a key missing, a value of the wrong type, a NaN
learning rate, a shard entry that claims 10^10 steps or names a file outside the folder) is
refused here with a `CorruptStoreError` naming the key, instead of failing later with a raw
``KeyError`` or a ``MemoryError``, or explaining with NaN.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from ..exceptions import CorruptStoreError

# the tensor files a manifest may list: in the store folder itself, by these names only
_SHARD = re.compile(r"shard-\d{8}\.safetensors")
_FINAL = re.compile(r"final(-next)?\.safetensors")
_HASH = re.compile(r"[0-9a-f]{32,128}")
_HASH_KEYS = ("xxh3_128", "sha256")
_DTYPES = {"float64", "float32", "float16", "bfloat16"}


class _Bad(Exception):
    """One thing wrong with the manifest, said where."""


def _int(value: Any, where: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _Bad(f"{where} must be an int >= {low}, not {value!r}")
    return int(value)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _Bad(f"{where} must be a list, not {type(value).__name__}")
    return value


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be an object, not {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} must be a string, not {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{where} must be true or false, not {value!r}")
    return value


def _entry(value: Any, where: str, name: re.Pattern) -> dict:
    entry = _dict(value, where)
    file = _str(entry.get("file"), f"{where}.file")
    if not name.fullmatch(file):
        raise _Bad(f"{where}.file {file!r} is not a name this store writes")
    hashes = [k for k in _HASH_KEYS if k in entry]
    if not hashes:
        raise _Bad(f"{where} records no content hash ({' or '.join(_HASH_KEYS)})")
    for key in hashes:
        if not isinstance(entry[key], str) or not _HASH.fullmatch(entry[key]):
            raise _Bad(f"{where}.{key} is not a hex digest: {entry[key]!r}")
    if "bytes" in entry:
        _int(entry["bytes"], f"{where}.bytes")
    return entry


def _params(manifest: dict) -> list[str]:
    names = []
    for i, p in enumerate(_list(manifest.get("params"), "params")):
        p = _dict(p, f"params[{i}]")
        names.append(_str(p.get("name"), f"params[{i}].name"))
        for j, n in enumerate(_list(p.get("shape"), f"params[{i}].shape")):
            _int(n, f"params[{i}].shape[{j}]")
        if not isinstance(p.get("dtype"), str) or p["dtype"] not in _DTYPES:
            raise _Bad(
                f"params[{i}].dtype must be one of {sorted(_DTYPES)}, not {p.get('dtype')!r}"
            )
    if not names:
        raise _Bad("params lists no parameter")
    if len(set(names)) != len(names):
        raise _Bad("params lists a parameter name twice")
    return names


def _optimizer(manifest: dict, names: list[str]) -> int:
    """Check the optimizer entry; return its number of param groups (1 without one)."""
    optimizer = manifest.get("optimizer")
    if optimizer is None:
        return 1
    optimizer = _dict(optimizer, "optimizer")
    _str(optimizer.get("kind"), "optimizer.kind")
    _str(optimizer.get("class"), "optimizer.class")
    _bool(optimizer.get("exact"), "optimizer.exact")
    groups = _list(optimizer.get("groups"), "optimizer.groups")
    if not groups:
        raise _Bad("optimizer.groups lists no param group")
    known = set(names)
    for g, group in enumerate(groups):
        group = _dict(group, f"optimizer.groups[{g}]")
        for name in _list(group.get("params"), f"optimizer.groups[{g}].params"):
            if _str(name, f"optimizer.groups[{g}].params[]") not in known:
                raise _Bad(f"optimizer.groups[{g}].params names {name!r}, which params lacks")
        _dict(group.get("hyper"), f"optimizer.groups[{g}].hyper")
    return len(groups)


def _steps(manifest: dict, n_params: int, n_groups: int) -> int:
    steps = _list(manifest.get("steps"), "steps")
    for s, meta in enumerate(steps):
        where = f"steps[{s}]"
        meta = _dict(meta, where)
        lrs = _list(meta.get("lr"), f"{where}.lr")
        if len(lrs) != n_groups:
            raise _Bad(f"{where}.lr has {len(lrs)} learning rates for {n_groups} param group(s)")
        for lr in lrs:
            ok = isinstance(lr, numbers.Real) and not isinstance(lr, bool)
            if not ok or not math.isfinite(lr) or lr < 0:
                raise _Bad(f"{where}.lr holds {lr!r}: learning rates are finite numbers >= 0")
        if "hyper" in meta:
            hyper = _list(meta["hyper"], f"{where}.hyper")
            if len(hyper) != n_groups:
                raise _Bad(f"{where}.hyper has {len(hyper)} entries for {n_groups} group(s)")
            for h in hyper:
                _dict(h, f"{where}.hyper[]")
        for key in ("fresh_state",):
            if key in meta:
                _bool(meta[key], f"{where}.{key}")
        for key in ("skipped", "fresh"):
            for i in _list(meta.get(key, []), f"{where}.{key}"):
                if _int(i, f"{where}.{key}[]") >= n_params:
                    raise _Bad(f"{where}.{key} names parameter {i} of {n_params}")
        for key in _list(meta.get("initial_state", []), f"{where}.initial_state"):
            _str(key, f"{where}.initial_state[]")
        if "train" in meta and not isinstance(meta["train"], bool):
            for name in _list(meta["train"], f"{where}.train"):
                _str(name, f"{where}.train[]")
    return len(steps)


def _shards(manifest: dict, n_steps: int) -> None:
    first = 0
    for i, entry in enumerate(_list(manifest.get("shards"), "shards")):
        entry = _entry(entry, f"shards[{i}]", _SHARD)
        if _int(entry.get("first_step"), f"shards[{i}].first_step") != first:
            raise _Bad(f"shards[{i}] starts at step {entry['first_step']}, not at {first}")
        first += _int(entry.get("n_steps"), f"shards[{i}].n_steps", low=1)
        if first > n_steps:
            break
    if first != n_steps:
        raise _Bad(f"the shards hold {first} steps, but steps lists {n_steps}")


def validate(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest that does not hold what readers rely on.

    Args:
        manifest: The parsed manifest (format and version already checked).
        where: The manifest's file, for the message.

    Raises:
        CorruptStoreError: Naming the first key found wrong.
    """
    try:
        names = _params(manifest)
        n_groups = _optimizer(manifest, names)
        if manifest.get("dataset_size") is not None:
            _int(manifest["dataset_size"], "dataset_size")
        _int(manifest.get("every", 1), "every", low=1)
        _int(manifest.get("world_size", 1), "world_size", low=1)
        for key in ("approximate", "complete", "replayable"):
            if key in manifest:
                _bool(manifest[key], key)
        for reason in _list(manifest.get("approximate_reasons", []), "approximate_reasons"):
            _str(reason, "approximate_reasons[]")
        for name in _list(manifest.get("buffers", []), "buffers"):
            _str(name, "buffers[]")
        n_steps = _steps(manifest, len(names), n_groups)
        _shards(manifest, n_steps)
        if manifest.get("final") is not None:
            _entry(manifest["final"], "final", _FINAL)
    except _Bad as bad:
        raise CorruptStoreError(
            f"{where} is damaged or was edited by hand: {bad}. Restore it from a backup, or "
            "re-record the run"
        ) from None
