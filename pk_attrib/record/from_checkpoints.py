"""Approximate paths from a few saved checkpoints (for users who did not record).

Checkpoint k holds w_k and a learning rate η_k; checkpoint mode explains such a path
TracIn-style: c_i(x) ≈ −Σ_k η_k ∇f(x; w_k) · ∇ℓ_i(w_k).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..exceptions import StoreMismatchError
from .backends import MemoryBackend, new_manifest
from .wrappers import plain_name, unwrap


def checkpoint_records(
    checkpoints: Sequence[Mapping[str, torch.Tensor] | str | os.PathLike],
    learning_rates: float | Sequence[float],
    model: torch.nn.Module | None = None,
) -> tuple[dict, MemoryBackend]:
    """The manifest and in-memory tensors of a path of checkpoints.

    See `TrainingPath.from_checkpoints`, which wraps them.
    """
    states = [_load_checkpoint(c) for c in checkpoints]
    if not states:
        raise ValueError("from_checkpoints needs at least one checkpoint")
    if isinstance(learning_rates, (int, float)):
        lrs = [float(learning_rates)] * len(states)
    else:
        lrs = [float(v) for v in learning_rates]
    if len(lrs) != len(states):
        raise ValueError(
            f"got {len(states)} checkpoints but {len(lrs)} learning rates: give one "
            "learning rate per checkpoint, or a single number"
        )
    if model is not None:
        model = unwrap(model)  # torch.compile / DDP: the plain names, as recordings use
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        wanted = set(names) | {n for n, _ in model.named_buffers()}
        states = [{plain_name(k, wanted): v for k, v in state.items()} for state in states]
    else:
        names = [n for n, t in states[0].items() if t.is_floating_point()]
    for k, state in enumerate(states):
        missing = [n for n in names if n not in state]
        if missing:
            raise StoreMismatchError(
                f"checkpoint {k} lacks parameters {missing[:5]}: all checkpoints must "
                "come from the same model"
            )
    # buffers (BatchNorm statistics, ...) the checkpoints hold: gradients at checkpoint k are
    # taken with its own, as TracInCP does by loading each checkpoint into the model (one
    # that lacks a buffer keeps the previous checkpoint's, or else the model's own)
    buffers = [] if model is None else [n for n, _ in model.named_buffers()]
    buffers = [n for n in buffers if any(n in state for state in states)]
    backend, latest = MemoryBackend(), {}
    for k, (state, lr) in enumerate(zip(states, lrs, strict=True)):
        tensors = {f"{k}/w/{n}": state[n].detach().cpu().clone() for n in names}
        latest.update({n: state[n] for n in buffers if n in state})
        tensors.update({f"{k}/buf/{n}": t.detach().cpu().clone() for n, t in latest.items()})
        backend.records.append({"tensors": tensors, "meta": {"lr": [lr]}})
    backend.final = {n: states[-1][n].detach().cpu().clone() for n in names}
    manifest = new_manifest(
        {n: states[0][n] for n in names}, optimizer=None, dataset_size=None, every=1
    )
    manifest.update(
        buffers=buffers,
        source="checkpoints",
        approximate=True,
        approximate_reasons=["built from checkpoints: only checkpoint mode applies"],
        complete=True,
    )
    return manifest, backend


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """What a checkpoint file holds, read without running code from it.

    ``.safetensors`` files are read as such; any other file with ``torch.load(...,
    weights_only=True)``, passed explicitly so that no environment variable
    (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) or torch version turns it into an unpickler
    that can execute code.

    Raises:
        FileNotFoundError: There is no such file.
        StoreMismatchError: The file holds something a weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StoreMismatchError(
            f"checkpoint {path} holds objects other than tensors and plain containers, which "
            "pk_attrib does not unpickle (it could run code): save the model's state_dict "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err


def _load_checkpoint(checkpoint: Mapping[str, torch.Tensor] | str | os.PathLike) -> dict:
    state = (
        dict(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint_file(checkpoint)
    )
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = dict(state[key])
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise StoreMismatchError(
            f"checkpoint entries {bad} are not tensors: pass a model state_dict "
            "(or a file holding one)"
        )
    return state
