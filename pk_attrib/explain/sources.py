"""The path an explainer is given: a `TrainingPath`, a store folder, or TracInCP checkpoints.

A folder with a store's manifest is a store; anything else given as ``path`` or
``checkpoints`` is read the way Captum's ``TracInCP`` reads checkpoints (each file loaded into
the model by ``checkpoints_load_func``, which returns its learning rate) and becomes an
approximate path that checkpoint mode explains. `resolve_mode` says which mode a path
allows, and `check_final` that the model handed in is the one at the end of the path.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..engine.rules import RULES, unsupported
from ..exceptions import (
    ArgumentTypeError,
    CorruptStoreError,
    NoCheckpointsError,
    NotAStoreError,
    PkAttribWarning,
    StoreMismatchError,
    UnsupportedError,
)
from ..record.from_checkpoints import read_checkpoint_file
from ..record.path import TrainingPath
from ..record.store import MANIFEST, STORE_FILE
from ..record.wrappers import plain_name, unwrap
from ..record.writer import LOCK


def load_path(
    model: torch.nn.Module,
    path: TrainingPath | str | os.PathLike | list | None,
    checkpoints: str | os.PathLike | list | None,
    load_func: Callable[[torch.nn.Module, str], float] | None,
) -> tuple[TrainingPath, bool]:
    """The training path an explainer's ``path`` / ``checkpoints`` arguments name.

    Args:
        model: The model (checkpoints are loaded into a copy of it).
        path: A `TrainingPath`, a store folder, or (as TracInCP's) checkpoints.
        checkpoints: TracInCP's name for checkpoints (instead of ``path``).
        load_func: TracInCP's ``checkpoints_load_func`` (None: Captum's default).

    Returns:
        ``(path, from_tracincp)``: the path, and whether it was built from checkpoints.

    Raises:
        NotAStoreError: ``path`` is a folder that is neither a store nor checkpoints.
        NoCheckpointsError: The path or checkpoints name none (a missing or empty folder,
            an empty list), whichever argument named them.
        ArgumentTypeError: Neither a path nor checkpoints were given.
    """
    if isinstance(path, TrainingPath):
        return path, False
    if checkpoints is None and isinstance(path, (str, os.PathLike)):
        folder = Path(path)
        if (folder / MANIFEST).is_file():
            return TrainingPath.load(folder), False
        _refuse_unreadable_path(folder)
        try:  # a checkpoint file or a folder of them, as TracInCP reads them
            return path_from_tracincp(model, folder, load_func), True
        except Exception as err:
            raise NotAStoreError(
                f"{folder} is not a pk_attrib store (it has no {MANIFEST}), and reading it "
                f"as TracInCP checkpoints failed ({type(err).__name__}: {err}). Give the "
                "folder PathRecorder(store=...) wrote, a TrainingPath, or checkpoints that "
                "checkpoints_load_func can read"
            ) from err
    source = checkpoints if checkpoints is not None else path
    if source is None:
        raise ArgumentTypeError(
            "give the training path (a TrainingPath or a store folder), or TracInCP-style "
            "checkpoints="
        )
    return path_from_tracincp(model, source, load_func), True


def resolve_mode(path: TrainingPath, mode: str) -> str:
    """The mode an explainer runs in: ``mode``, or for ``"auto"`` what the path allows.

    A recorded path whose optimizer has no exact rule (an optimizer pk_attrib has no rule for,
    or an option its rule does not model) runs in checkpoint mode under ``"auto"``, with a
    `PkAttribWarning` that names the optimizer and says checkpoint mode is approximate.

    Raises:
        UnsupportedError: ``mode="exact"`` on a path exact mode cannot explain.
    """
    no_rule = unsupported(path) if path.optimizer else None
    exact_ok = not path.approximate and no_rule is None
    if mode == "auto":
        if no_rule is not None:
            warnings.warn(
                f"{no_rule}, so this path is explained in checkpoint mode (TracIn at the "
                "recorded snapshots), which is approximate: the contributions need not add up "
                "to the output's change (`delta` says by how much). For an exact "
                f"decomposition, train with an optimizer that has an exact rule "
                f"({', '.join(RULES)}) and its modelled options; pass mode='checkpoint' to "
                "choose checkpoint mode without this warning",
                PkAttribWarning,
                stacklevel=3,
            )
        return "exact" if exact_ok else "checkpoint"
    if mode == "exact" and not exact_ok:
        reasons = list(path.approximate_reasons)
        if no_rule is not None and (path.optimizer or {}).get("exact", False):
            reasons.append(no_rule)  # (the recorder noted an optimizer without a rule)
        raise UnsupportedError(
            f"exact mode needs a path recorded at every step with an optimizer that has an "
            f"exact rule ({', '.join(RULES)}), but this one is approximate "
            f"({'; '.join(reasons) or 'the optimizer has no rule'}): use mode='checkpoint'"
            + ("" if no_rule else ", or record with every=1")
        )
    return mode


def check_final(path: TrainingPath, model: torch.nn.Module) -> None:
    """Refuse a model whose parameters are not the path's final ones (warn when rounded).

    Raises:
        StoreMismatchError: A parameter differs from the path's final value.
    """
    params = dict(model.named_parameters())
    narrowed = set()
    for name, value in path.final.items():
        mine = params[name].detach().to("cpu", value.dtype)
        if not torch.allclose(mine, value, rtol=0, atol=0, equal_nan=True):
            raise StoreMismatchError(
                f"the model's parameter {name} differs from the path's final value, so the "
                "decomposition would explain another model than yours: pass the model at "
                "the end of the recorded run, or load it with path.load_into(model)"
            )
        own = params[name].dtype
        if own.is_floating_point and value.dtype.is_floating_point:
            wider = torch.finfo(value.dtype).eps > torch.finfo(own).eps
            # (a float32 run explained after model.double() holds the stored values)
            if wider and not torch.equal(params[name].detach().cpu(), value.to(own)):
                narrowed.add((str(value.dtype), str(own)))
    if narrowed:
        stored, own = sorted(narrowed)[0]
        warnings.warn(
            f"the path stores the parameters in {stored}, narrower than the model's "
            f"{own} (PathRecorder(dtype=...)): the decomposition explains the model with "
            f"its weights rounded to {stored}, so `prediction` is that model's output, "
            "which differs from yours by the rounding",
            PkAttribWarning,
            stacklevel=3,
        )


def checkpoint_files(checkpoints: Any) -> list[Any]:
    """Checkpoints as TracInCP reads them.

    A folder's files, or a list of file names, in natural order ("epoch-2" before
    "epoch-10"); one file; or any other objects as given (for a ``checkpoints_load_func``
    that reads them).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        folder = Path(checkpoints)
        if folder.is_dir():  # (sub-folders cannot be checkpoints)
            _refuse_store_files(folder)
            found = [f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f)]
            return sorted(found, key=_natural)
        return [str(folder)]
    if isinstance(checkpoints, Iterable):
        items = list(checkpoints)
        if items and all(isinstance(c, (str, os.PathLike)) for c in items):
            return sorted((str(c) for c in items), key=_natural)
        return items
    raise ArgumentTypeError(
        f"checkpoints must be a folder, a file or a list of files, got {checkpoints!r}"
    )


def _natural(name: str) -> list:
    """Sort key: digit runs compare as numbers ("ckpt-9" < "ckpt-10"), as Captum sorts."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def path_from_tracincp(model, checkpoints, load_func) -> TrainingPath:
    """Build a checkpoint path the way TracInCP reads checkpoints (load_func returns the lr)."""
    load_func = load_func or load_checkpoint
    if isinstance(checkpoints, (str, os.PathLike)) and not Path(checkpoints).exists():
        raise NoCheckpointsError(
            f"{checkpoints} does not exist: give a folder of checkpoint files, a file, or a list"
        )
    scratch = copy.deepcopy(model)
    states, lrs = [], []
    for file in checkpoint_files(checkpoints):
        lrs.append(float(load_func(scratch, file)))  # into the model as given, as TracInCP
        inner = unwrap(scratch)  # by the wrapper-free names; buffers too (BatchNorm)
        tensors = [*inner.named_parameters(), *inner.named_buffers()]
        states.append({n: t.detach().clone() for n, t in tensors})
    if not states:
        raise NoCheckpointsError(
            f"no checkpoints found in {checkpoints!r}: give a folder of checkpoint files, a "
            "file, or a non-empty list"
        )
    return TrainingPath.from_checkpoints(states, lrs, model=unwrap(model))


def load_checkpoint(model: torch.nn.Module, file: str | os.PathLike) -> float:
    """TracInCP's default ``checkpoints_load_func``, without running code from the file.

    Like Captum's default, it loads a state_dict (or a checkpoint holding one under
    ``state_dict`` / ``model_state_dict`` / ``model``; names with a ``module.`` prefix match
    the plain model) into the model and returns the checkpoint's ``learning_rate`` entry (1
    without one). Unlike it, the file is read with ``weights_only=True`` passed explicitly
    (or as safetensors), so a crafted file cannot execute code whatever the torch version or
    environment.

    Args:
        model: The model to load the checkpoint into (in place).
        file: The checkpoint file.

    Returns:
        The checkpoint's learning rate.
    """
    raw = read_checkpoint_file(file)
    if not isinstance(raw, Mapping):
        raise StoreMismatchError(
            f"checkpoint {file} holds a {type(raw).__name__}, not a state_dict: pass "
            "checkpoints_load_func= to read it"
        )
    lr = raw.get("learning_rate", 1.0)
    state = next(
        (
            raw[key]
            for key in ("state_dict", "model_state_dict", "model")
            if isinstance(raw.get(key), Mapping)
        ),
        {k: v for k, v in raw.items() if k != "learning_rate"},
    )
    target = unwrap(model)  # (torch.compile / DataParallel: by the plain names)
    known = target.state_dict()
    target.load_state_dict({plain_name(k, known): v for k, v in state.items()})
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _refuse_store_files(folder: Path) -> None:
    """Refuse to read a damaged store as checkpoints: reading it would mean loading its files."""
    found = sorted(f.name for f in folder.iterdir() if STORE_FILE.fullmatch(f.name))
    if found or (folder / LOCK).exists():
        raise CorruptStoreError(
            f"{folder} holds a pk_attrib store's files ({', '.join(found[:3]) or LOCK}) but no "
            f"{MANIFEST}: the store is damaged (its manifest was deleted or never written). It "
            "is not read as checkpoints; restore manifest.json from a backup, or re-record "
            "the run"
        )


def _refuse_unreadable_path(folder: Path) -> None:
    """Raise `NotAStoreError` for a path that is neither a store nor checkpoints."""
    hint = (
        "give the folder PathRecorder(store=...) wrote, a TrainingPath, or TracInCP "
        "checkpoints (a file, a folder of files, or checkpoints=[...])"
    )
    if not folder.exists():
        raise NoCheckpointsError(f"{folder} does not exist: {hint}")
    if folder.name == MANIFEST:
        raise NotAStoreError(f"{folder} is a store's manifest: give its folder, {folder.parent}")
    if folder.is_dir():
        _refuse_store_files(folder)
        stores = sorted(d.name for d in folder.iterdir() if (d / MANIFEST).is_file())
        if stores:
            raise NotAStoreError(
                f"{folder} is not a store but holds stores ({', '.join(stores[:5])}): give one"
            )
        if not any(f.is_file() for f in folder.iterdir()):
            raise NoCheckpointsError(
                f"{folder} holds neither a pk_attrib store (no {MANIFEST}) nor checkpoint "
                f"files: {hint}"
            )
