"""Opening a store folder for recording: a new store, or the continuation of one.

A store is continued (resumed) when the model's parameters equal its final ones, or its last
recorded snapshot (a run killed mid-way, restarted from its latest checkpoint); with
``truncate``, an earlier snapshot (the steps after it are dropped). Anything else is refused,
naming why, so that a resumed recording is always one continuous path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..exceptions import CorruptStoreError, NotAStoreError, StoreError, StoreMismatchError
from .backends import DiskBackend
from .optimizers import SCHEDULED_KEYS, SCHEDULER_KEYS
from .path import TrainingPath
from .store import (
    FINAL,
    LOCK,
    MANIFEST,
    STORE_FILE,
    make_durable,
    read_manifest,
    write_failed,
    write_final,
    write_manifest,
)
from .writer import lock_store, unlock_store

_NEXT_FINAL = "final-next.safetensors"


def open_store(
    root: Path,
    fresh: dict[str, Any],
    snapshot: Callable[[], dict[str, torch.Tensor]],
    truncate: bool,
) -> tuple[dict[str, Any], Any, Callable[[], None] | None]:
    """Lock a store folder for recording and return its manifest, ready to append to.

    Args:
        root: The store folder (created if it does not exist).
        fresh: The manifest of a new store for this model and optimizer.
        snapshot: The model's parameters now, in the recorded dtypes.
        truncate: Resume from an earlier snapshot the parameters equal, dropping the steps
            after it.

    Returns:
        ``(manifest, lock, create)``: the manifest the recording continues, the store's
        lock (held until `pk_attrib.record.writer.unlock_store`), and for a new store what
        writes its first files (the initial weights as its end, and the manifest), for the
        store's writer thread to call before its first shard (None for a continued store).

    Raises:
        NotAStoreError: The folder is a file, or holds something else than a store.
        StoreError: Another recorder is writing the store (`pk_attrib.StoreError`), or the
            folder cannot be written.
        CorruptStoreError: The store is damaged (it is not appended to).
        StoreMismatchError: The store belongs to another run, or the parameters are at no
            point of it that a recording can continue from.
    """
    if root.exists() and not root.is_dir():
        raise NotAStoreError(f"{root} is a file, not a folder: choose a folder for the store")
    if (  # (a store's own files may be another recorder's, creating it now: see below)
        not (root / MANIFEST).exists()
        and root.exists()
        and any(f.name != LOCK and not STORE_FILE.fullmatch(f.name) for f in root.iterdir())
    ):
        raise NotAStoreError(
            f"{root} is not empty and holds no pk_attrib store: choose a new or "
            "empty folder, so that nothing in it is overwritten"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = lock_store(root)
    except StoreError:
        raise
    except OSError as err:
        raise write_failed(root, err) from err
    try:
        manifest, create = _open_locked(root, fresh, snapshot, truncate)
        return manifest, lock, create
    except BaseException:
        unlock_store(lock)
        raise


def _open_locked(root: Path, fresh, snapshot, truncate: bool):
    """``(manifest, create)`` of `open_store` (see there)."""
    if not (root / MANIFEST).exists():
        shards = sorted(f.name for f in root.iterdir() if f.name.startswith("shard-"))
        if shards:  # recorded steps, but no manifest to list them
            raise CorruptStoreError(
                f"{root} holds recorded shards ({', '.join(shards[:3])}) but no {MANIFEST}: "
                "the store is damaged. Restore manifest.json from a backup, or record into "
                "a new folder"
            )
        for leftover in root.iterdir():  # a creation that died before its manifest
            if STORE_FILE.fullmatch(leftover.name):
                leftover.unlink()
        # the path ends at the initial weights until the first shard is on the disk, so
        # that a resume after a crash before it can tell whether steps were lost. Written
        # here, through the page cache (a killed process loses nothing written); the
        # writer thread flushes them to the disk, so training starts without waiting
        # (under the name a closing recorder does not write: see final_name)
        fresh["final"] = write_final(root / _NEXT_FINAL, snapshot(), durable=False)
        write_manifest(root, fresh, durable=False)
        return fresh, lambda: make_durable(root, [_NEXT_FINAL, MANIFEST])
    manifest = read_manifest(root)
    _check_same_run(manifest, fresh, root)
    path = TrainingPath(manifest, DiskBackend(root, manifest, writing=True))
    try:  # every listed file, whole: a damaged store is not appended to
        path.verify()
    except CorruptStoreError as err:
        raise CorruptStoreError(
            f"{root} is damaged, so this recording does not continue it ({err})"
        ) from err
    current = snapshot()
    resume_at, at_final = _resume_point(root, path, current, truncate)
    on_disk = manifest.get("final")  # what the manifest on the disk lists
    _truncate(manifest, resume_at)
    if not at_final:
        # the path must end where this session starts, until its first snapshot is on
        # the disk: a crash before that then loses nothing
        manifest["final"] = write_final(root / final_name(on_disk), current, durable=True)
    manifest["complete"] = False
    write_manifest(root, manifest)  # (as this version's: new shards carry its hash)
    listed = {e["file"] for e in manifest["shards"] + [manifest["final"]] if e} | {MANIFEST}
    for leftover in root.iterdir():  # what this library writes, unlisted: a crash's
        if leftover.name not in listed and STORE_FILE.fullmatch(leftover.name):
            leftover.unlink()
    return manifest, None


def _resume_point(
    root: Path, path: TrainingPath, current: dict[str, torch.Tensor], truncate: bool
) -> tuple[int, bool]:
    """The raw step to continue from, and whether ``current`` is the listed final."""
    manifest = path.manifest
    n_raw = len(manifest["steps"])
    if manifest.get("final") is not None and _equal(current, path.final):
        return n_raw, True
    every = manifest.get("every", 1)
    last = ((n_raw - 1) // every) * every if n_raw else 0
    if n_raw == 0 and manifest.get("final") is not None:  # (the initial weights)
        raise StoreMismatchError(
            f"{root} holds no optimizer step, and the model's parameters are not the "
            "initial ones it lists: the earlier session's steps were lost before they "
            "reached the disk (killed within its first flush_interval?). Start again from "
            "the initial weights, or record into a new folder"
        )
    if n_raw == 0 or _equal(current, path._raw_params(last)):
        return last, False
    earlier = _matching_snapshot(path, current, range(last - every, -1, -every))
    if earlier is not None and truncate:
        return earlier, False
    if earlier is not None:
        raise StoreMismatchError(
            f"{root} holds {n_raw} optimizer steps, and the model's parameters equal "
            f"its snapshot before step {earlier} (resuming from an older checkpoint?). To "
            f"continue from there, pass truncate=True: the {n_raw - earlier} steps after it "
            "are dropped from the store. Restore the optimizer's state saved with those "
            "weights too (momentum, Adam's moments): the store does not keep it"
        )
    raise StoreMismatchError(
        f"{root} holds {n_raw} optimizer steps, but the model's parameters equal "
        "none of its recorded snapshots, so a resumed recording would not be a continuous "
        "path: restore the model from a checkpoint of this run (and the optimizer from the "
        "same one: the store does not keep momentum or Adam's moments), or record into a "
        "new folder"
    )


def final_name(listed: dict[str, Any] | None) -> str:
    """A name for new final parameters that the manifest on the disk does not list.

    Replacing a listed file before the manifest names its new hash would leave a store
    that fails its check if the process died in between; the two names alternate.

    Args:
        listed: The manifest's ``final`` entry on the disk (None: none listed).
    """
    return _NEXT_FINAL if listed is not None and listed["file"] == FINAL else FINAL


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n].to(a[n].dtype)) for n in a)


def _check_same_run(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    if old["params"] != new["params"]:
        raise StoreMismatchError(
            f"{root} was recorded from a model with other parameters (names, shapes or "
            "dtypes differ): record this model into a new folder"
        )
    old_opt, new_opt = old.get("optimizer") or {}, new["optimizer"]
    old_groups, new_groups = old_opt.get("groups", []), new_opt["groups"]
    if old_opt.get("class") != new_opt["class"] or [g["params"] for g in old_groups] != [
        g["params"] for g in new_groups
    ]:
        raise StoreMismatchError(
            f"{root} was recorded with optimizer {old_opt.get('class')} over other param "
            f"groups than this {new_opt['class']}: resume with the same optimizer, or record "
            "into a new folder"
        )
    if old.get("world_size", 1) != new.get("world_size", 1):  # (DDP: how losses are averaged)
        raise StoreMismatchError(
            f"{root} was recorded on {old.get('world_size', 1)} rank(s), this run has "
            f"{new.get('world_size', 1)}: a path's steps average over one number of ranks, so "
            "resume on as many, or record into a new folder"
        )
    # schedulers' bookkeeping and the values they move (recorded per step) may differ
    ignored = SCHEDULER_KEYS | SCHEDULED_KEYS
    for g, (was, now) in enumerate(zip(old_groups, new_groups, strict=True)):
        keys = (set(was["hyper"]) | set(now["hyper"])) - ignored
        differ = sorted(k for k in keys if was["hyper"].get(k) != now["hyper"].get(k))
        if differ:
            shown = ", ".join(
                f"{k}: {was['hyper'].get(k)!r} recorded, {now['hyper'].get(k)!r} now"
                for k in differ
            )
            raise StoreMismatchError(
                f"{root} was recorded with other optimizer settings in param group {g} "
                f"({shown}): resume with the same settings, or record into a new folder"
            )
    if old.get("every", 1) != new["every"]:
        raise StoreMismatchError(
            f"{root} was recorded with every={old.get('every', 1)}, not every={new['every']}"
        )


def _matching_snapshot(path: TrainingPath, current: dict, raws: Iterable[int]) -> int | None:
    """The first raw step in ``raws`` whose recorded snapshot equals ``current``, or None.

    Each candidate is compared on one small parameter first, so only a match reads a whole
    snapshot.
    """
    first = min(current, key=lambda n: current[n].numel())
    for r in raws:
        probe = path._backend.tensor(r, f"w/{first}")
        if probe is not None and torch.equal(current[first], probe.to(current[first].dtype)):
            if _equal(current, path._raw_params(r)):
                return r
    return None


def _truncate(manifest: dict[str, Any], n_raw: int) -> None:
    """Keep the first ``n_raw`` steps; the final parameters stay listed only if all steps do.

    Kept, they hold the last step's end until the writer lists a shard with the next
    snapshot, so a crash right after reopening loses nothing.
    """
    if n_raw < len(manifest["steps"]):
        manifest["final"] = None
    manifest["steps"] = manifest["steps"][:n_raw]
    shards = []
    for entry in manifest["shards"]:
        if entry["first_step"] < n_raw:
            entry["n_steps"] = min(entry["n_steps"], n_raw - entry["first_step"])
            shards.append(entry)
    manifest["shards"] = shards
