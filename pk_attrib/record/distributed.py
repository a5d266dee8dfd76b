"""Runs on several processes (torch.distributed): what the recorder and the explainer share.

`Ranks` is this process's place in the default process group and the few collectives
pk_attrib runs on it: gathering tensors whose first dimension differs between ranks, a status
round in which a rank that failed tells the others, a barrier. Every collective turns a lost
rank (a crash closes its connections; one that hangs is caught by the process group's
``timeout``) into a `DistributedError` that says so, instead of a raw backend error.
Collectives run on the CPU with gloo and on this rank's CUDA device with nccl.

`gather_step` is what a `PathRecorder` on every rank of a DistributedDataParallel run does
before each optimizer step: the step's batch is the union of the ranks' micro-batches, so
each rank's indices and random-number states are gathered, in rank order, and rank 0 records
them as micro-batches of the step (``docs/guide/distributed.md`` derives why the explanation
of such a path is exact).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..exceptions import DistributedError, MissingBatchIndicesError, PkAttribWarning, RecordingError

T = TypeVar("T")


def process_group(distributed: bool | None, who: str) -> Ranks | None:
    """The ranks to work with, or None to work in this process alone.

    Args:
        distributed: None: the default process group when one of several ranks is
            initialised; True: it must be; False: never.
        who: What asks (``"PathRecorder"``, ``"PathKernelInfluence"``), for the message.

    Raises:
        ValueError: ``distributed=True`` without an initialised process group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed={distributed!r}: use None, True or False")
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError(
            f"{who}(distributed=True) needs an initialised process group: call "
            "torch.distributed.init_process_group() first (torchrun sets its environment)"
        )
    if distributed is False or not ready or dist.get_world_size() == 1:
        return None
    return Ranks()


class Ranks:
    """This process's rank in the default process group, and pk_attrib's collectives on it.

    Attributes:
        rank: This process's rank.
        size: The number of ranks.
        device: Where collectives' tensors go: this rank's CUDA device with nccl, else the CPU.
    """

    def __init__(self):
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        backend = str(dist.get_backend())
        cuda = "nccl" in backend and "gloo" not in backend  # ("cpu:gloo,cuda:nccl": the CPU)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"

    def _run(self, what: str, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except DistributedError:
            raise
        except RuntimeError as err:  # (torch.distributed.DistBackendError is one)
            raise DistributedError(
                f"rank {self.rank} of {self.size} lost the other ranks while {what}: a rank "
                "died (see its log: out of memory, killed, an error) or stopped calling in. "
                "The wait is bounded by the process group's timeout "
                f"(init_process_group(timeout=...)). Backend error: {err}"
            ) from err

    def gather_rows(
        self, tensor: torch.Tensor, what: str, rows: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order; their first dimensions may differ.

        Args:
            tensor: This rank's tensor, (m_r, ...); the other dimensions and the dtype are the
                same on every rank.
            what: What is being gathered, for errors.
            rows: Every rank's m_r, when every rank knows them (saves a round).

        Returns:
            R tensors on ``tensor``'s device, (m_r, ...) each.
        """
        home, dtype = tensor.device, tensor.dtype
        mine = tensor.detach().to(self.device, torch.uint8 if dtype == torch.bool else dtype)
        if rows is None:
            count = torch.tensor([mine.shape[0]], dtype=torch.int64, device=self.device)
            counts = [torch.empty_like(count) for _ in range(self.size)]
            self._run(what, lambda: dist.all_gather(counts, count))
            rows = [int(c) for c in counts]
        padded = torch.zeros((max(rows), *mine.shape[1:]), dtype=mine.dtype, device=self.device)
        padded[: mine.shape[0]] = mine
        out = [torch.empty_like(padded) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(out, padded.contiguous()))
        return [o[:m].to(home, dtype) for o, m in zip(out, rows, strict=True)]

    def status(self, what: str, flag: bool = True, failed: bool = False) -> bool:
        """A round in which each rank says whether it failed; raise if another one did.

        A rank whose work raised calls it with ``failed=True`` (then re-raises its own
        error); the others raise a `DistributedError` at their next round. While ranks
        compute apart, rounds are their only collectives, so each rank's next collective is
        one. A round also carries a flag, for decisions every rank must take alike.

        Args:
            what: What the ranks are doing, for errors.
            flag: This rank's flag.
            failed: This rank's work raised.

        Returns:
            Whether ``flag`` holds on every rank.

        Raises:
            DistributedError: Another rank failed, or a rank was lost.
        """
        value = torch.tensor([0 if failed else 1 + int(flag)], device=self.device)
        values = [torch.empty_like(value) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(values, value))
        found = [int(v) for v in values]
        others = [r for r, v in enumerate(found) if v == 0 and r != self.rank]
        if others and not failed:
            raise DistributedError(
                f"rank(s) {others} raised an error while {what} (their own traceback says "
                f"which); rank {self.rank} stops too"
            )
        return all(v == 2 for v in found)

    def same(self, values: Sequence[float], what: str) -> None:
        """Raise unless every rank holds the same numbers (fingerprints of arguments).

        Raises:
            DistributedError: They differ, naming the ranks.
        """
        mine = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        mine = torch.nan_to_num(mine, nan=0.5, posinf=1.5, neginf=-1.5)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(every, mine))
        differ = [r for r, v in enumerate(every) if not torch.equal(v, every[0])]
        if differ:
            raise DistributedError(
                f"ranks 0 and {differ} differ in {what}: every rank must make the same calls "
                "with the same arguments (or pass distributed=False to work alone)"
            )

    def barrier(self, what: str) -> None:
        """Wait until every rank is here."""
        self._run(what, lambda: dist.barrier())


def recording_group(model: torch.nn.Module, distributed: bool | None) -> Ranks | None:
    """The ranks a `PathRecorder` records with (None: this process alone).

    Args:
        model: The model as the loop trains it (a DDP wrapper, or the module itself).
        distributed: The recorder's ``distributed`` (see `process_group`).

    Raises:
        RecordingError: The model's parameters are split over the ranks (FSDP), which the
            recorder does not gather: a DTensor parameter (FSDP2's ``fully_shard``, tensor
            parallelism) or FSDP1's FullyShardedDataParallel.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (torch < 2.4)
        DTensor = ()  # noqa: N806
    sharded = any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )
    if sharded:
        raise RecordingError(
            "this model's parameters are sharded over the ranks (FSDP's fully_shard or "
            "FullyShardedDataParallel, or DTensor parameters): PathRecorder records whole "
            "parameters and does not gather shards. Record a DistributedDataParallel run, "
            "or one process"
        )
    return process_group(distributed, "PathRecorder")


def rank_path(ranks: Ranks, store: Any, closed: bool) -> Any:
    """`PathRecorder.path` on a rank other than 0: rank 0's store, read after close().

    Raises:
        RecordingError: Before close() (rank 0 may still be writing), or in memory (the
            path is rank 0's alone).
    """
    from .path import TrainingPath

    if store is not None and closed:  # (close() waited for rank 0 to finish the store)
        return TrainingPath.load(store)
    raise RecordingError(
        f"rank {ranks.rank} keeps no path: under DistributedDataParallel rank 0 alone records "
        + (
            f"into {store}; read recorder.path here after recorder.close(), which waits for "
            "rank 0 to finish it (or TrainingPath.load it after a barrier)"
            if store is not None
            else "and this recording is in memory: read recorder.path on rank 0, or record "
            "into a store (a folder every rank can read) to read it here after close()"
        )
    )


def gather_step(
    ranks: Ranks,
    raw: int,
    batches: list[torch.Tensor],
    forward: Any,
    params: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Every rank's micro-batches of an optimizer step, in rank order, with their RNG states.

    Called by every rank's recorder before the step (DDP steps on every rank together).

    Args:
        ranks: The process group.
        raw: The step's number, for messages.
        batches: This rank's micro-batches' dataset indices, int64 (b_k,) each.
        forward: The recorder's `pk_attrib.record.capture.ForwardState`: its micro-batches'
            random-number states (``(cpu, *cuda)`` uint8 tensors each) are replaced by every
            rank's, in the same order (rank r's CUDA states take the place of rank 0's
            devices, in order), so that a replay draws each rank's dropout masks.
        params: This rank's parameters at the session's first step, to check that the ranks
            hold the same (None: not now).

    Returns:
        All ranks' micro-batches: rank 0's, then rank 1's, ...

    Raises:
        MissingBatchIndicesError: A rank noted no batch for the step (on every rank).
        DistributedError: The ranks' parameters differ (the model is not wrapped in DDP).
    """
    what = f"gathering the batches of optimizer step {raw}"
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    all_sizes = ranks.gather_rows(sizes, what)
    empty = [r for r, s in enumerate(all_sizes) if not len(s)]
    if empty:
        raise MissingBatchIndicesError(
            f"optimizer step {raw} has no batch indices on rank(s) {empty}: iterate the "
            "loader through recorder.watch(loader) on every rank, or call "
            "recorder.record_batch(indices) there before optimizer.step()"
        )
    flat = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
    indices = ranks.gather_rows(flat, what, [int(s.sum()) for s in all_sizes])
    states = forward.batch_states()
    lengths = [len(t) for t in states[0]]
    packed = torch.stack([torch.cat(s) for s in states])  # (k, L) uint8
    packed = ranks.gather_rows(packed, what, [len(s) for s in all_sizes])
    out_batches, out_states = [], []
    for size, idx, rows in zip(all_sizes, indices, packed, strict=True):
        out_batches += list(torch.split(idx, size.tolist()))
        out_states += [tuple(torch.split(row, lengths)) for row in rows]
    if params is not None:
        with torch.no_grad():
            check = [float(p.detach().double().sum()) for p in params]
            check += [float(p.detach().double().square().sum()) for p in params]
        try:
            ranks.same(check, "their parameters")
        except DistributedError:
            raise DistributedError(
                "the ranks' parameters differ at the first recorded step: every rank must "
                "train the same weights (wrap the model in DistributedDataParallel); a run "
                "whose ranks train apart is recorded by one PathRecorder(distributed=False) "
                "per rank, each into its own store"
            ) from None
        if forward.compared and forward.mode():
            _warn_running_statistics()
    forward.use_states(out_states)
    return out_batches


def _warn_running_statistics() -> None:
    """Warn that train-mode BatchNorm's running statistics are rank 0's alone under DDP."""
    warnings.warn(
        "recording a distributed run whose model updates normalization statistics in "
        "train mode (BatchNorm): DDP keeps rank 0's running statistics (it broadcasts "
        "them), so the path's buffers change by rank 0's micro-batches only, while the "
        "explanation splits their change over every rank's. The weights' part stays "
        "exact; the buffers' part is approximate (SyncBatchNorm is not replayed at all)",
        PkAttribWarning,
        stacklevel=5,
    )
