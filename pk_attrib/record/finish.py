"""What a step's record becomes before it is stored: the tensors its hooks left for later.

The recorder's hooks run on the training thread, between the loop's own operations, where
each torch or numpy call costs several times what it costs in a tight loop (measured in a
1M-parameter MLP's loop: 42 us to turn a batch sampler's 64 indices into a checked tensor
through numpy, 11 us to compare two random-number states). So the hooks note what each step
needs in plain Python form (the indices as an ``array.array``, each micro-batch's
random-number state as it was read) and `StepFinisher` makes the record's tensors where the
records are gathered: on the store writer's thread, which takes a shard's records at once,
or as the record is kept, in memory.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import Any

import torch

from .store import _as_bytes


def index_tensor(batches: Sequence[torch.Tensor | array.array]) -> torch.Tensor:
    """The dataset indices of a step's micro-batches as one int64 (B,) tensor, in order.

    Args:
        batches: Each micro-batch's indices, an int64 (b_k,) tensor or an ``array.array``
            of type ``"q"`` (see `pk_attrib.record.guards.batch_indices`).
    """
    parts = [b if isinstance(b, torch.Tensor) else _from_array(b) for b in batches]
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _from_array(indices: array.array) -> torch.Tensor:
    if not len(indices):
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(indices, dtype=torch.int64)  # (keeps the array alive)


class StepFinisher:
    """Completes step records in order: indices, batch sizes and changed random states.

    A record's ``"later"`` entry, ``(batches, states)`` (each micro-batch's indices, and its
    ``(cpu, *cuda)`` random-number states), becomes the tensors ``"<raw>/idx"`` (int64
    (B,)), ``"<raw>/bs"`` (int64 (k,), the micro-batch sizes; one read-only tensor for the
    steps alike) and ``"<raw>/rng/<i>"`` (``"<raw>/rng_cuda<d>/<i>"``) for the micro-batches
    whose states differ from the last kept one (readers look back for the latest), so a
    model that draws no random numbers keeps one state per session. Records must be
    finished in the order of their steps, each once.

    Args:
        cuda: The CUDA device indices the states hold generators of, after the CPU's.
    """

    def __init__(self, cuda: Sequence[int] = ()):
        self.cuda = list(cuda)
        self._last_rng: tuple[bytes, ...] | None = None  # the last kept states' bytes
        self._sizes: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the tensors ``record["later"]`` stands for (in place); return the record."""
        later = record.pop("later", None)
        if later is None:
            return record
        batches, states = later
        r, tensors = record["step"], record["tensors"]
        tensors[f"{r}/idx"] = index_tensor(batches)
        key = tuple(len(b) for b in batches)
        sizes = self._sizes.get(key)
        if sizes is None:
            if len(self._sizes) >= 64:  # (batches of ever other sizes: keep a few)
                self._sizes.clear()
            sizes = self._sizes[key] = torch.tensor(key, dtype=torch.int64)
        tensors[f"{r}/bs"] = sizes
        for i, state in enumerate(states):
            as_bytes = tuple(_bytes(s) for s in state)
            if as_bytes == self._last_rng:
                continue
            tensors[f"{r}/rng/{i}"] = state[0]
            for device, cuda_state in zip(self.cuda, state[1:], strict=True):
                tensors[f"{r}/rng_cuda{device}/{i}"] = cuda_state
            self._last_rng = as_bytes
        return record


def _bytes(state: torch.Tensor) -> bytes:
    """A random-number state's bytes (a uint8 tensor, on whichever device holds it)."""
    if state.is_cpu and state.dtype == torch.uint8:  # (what torch.get_rng_state gives)
        return state.numpy().tobytes()
    return _as_bytes(state.detach().cpu()).tobytes()
