"""`PathRecorder`: the training callback that records the weight path.

The recorder hooks the optimizer (`register_step_pre_hook` / `register_step_post_hook`),
so the training loop changes by one line::

    recorder = PathRecorder(model, optimizer, store="runs/exp")
    for x, y in recorder.watch(train_loader):
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    recorder.close()

`watch` yields the loader's batches unchanged and notes the dataset indices of each one by
wrapping the loader's (batch) sampler while the iterator is created; batches come back in
sampler order (``in_order=True``), so this holds with shuffling, workers, ``drop_last`` and
custom samplers. Every batch since the previous optimizer step belongs to the next step
(gradient accumulation). Loops without a DataLoader call `PathRecorder.record_batch`.
"""

from __future__ import annotations

import array
import atexit
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..exceptions import (
    MissingBatchIndicesError,
    PkAttribWarning,
    RecordingError,
    StoreMismatchError,
)
from .backends import MemoryBackend, new_manifest
from .buffers import BufferPool, SlabAllocator
from .capture import ForwardState, running_statistics
from .distributed import gather_step, rank_path, recording_group
from .finish import StepFinisher, index_tensor
from .guards import all_finite, batch_indices, check_parameters, learning_rates
from .optimizers import (
    INITIAL_STATE,
    STATE_AFTER_STEP,
    GroupHyper,
    approximate_reasons,
    describe_optimizer,
    optimizer_kind,
    state_tensors,
)
from .path import TrainingPath
from .resume import final_name, open_store
from .sampling import indexed_batches
from .wrappers import unwrap
from .writer import AsyncShardWriter, close_at_exit, stop_writer, unlock_store

# with every > 1, the size from which a shard is written (at most ``shard_bytes``): the
# snapshots' buffers are recycled within a few snapshots, and close() has little to write
SPARSE_SHARD_BYTES = 8 << 20


class PathRecorder:
    """Record the path the weights take during training.

    Args:
        model: The model being trained. Its parameters that the optimizer updates are
            recorded by name; frozen parameters are not.
        optimizer: The optimizer. Those with an exact rule (SGD, Adam, RMSprop, ...: see
            `OptimizerKind`) get exact decompositions; any other is recorded all the same.
        store: A folder to write the path to, or None to keep it in memory. An existing
            store is continued (resume) when the model's parameters equal its final or last
            recorded ones; otherwise it is refused (see ``truncate``).
        every: Keep the weights (and the optimizer's state) every ``every`` optimizer steps
            only; batch indices, learning rates and what replays need are kept for every
            step. With an exact optimizer the steps between snapshots are replayed when the
            path is explained (exact mode, at the cost of one more backward pass a step);
            other optimizers' paths are approximate.
        dtype: Storage dtype of the snapshots. None (default) keeps each parameter's own
            dtype, which the exact engine needs; ``torch.float32`` halves a float64 run.
        dataset_size: Length of the training dataset, for custom loops that call
            `record_batch` (`watch` reads it from the loader).
        shard_bytes: Size at which the writer starts a new shard file.
        flush_interval: Seconds after which the writer writes a partial shard, which bounds
            what a killed process can lose.
        max_queue_bytes: Memory the writer's queue may hold; training blocks (never drops a
            step) when the disk cannot keep up.
        truncate: Resuming from an older checkpoint: when the model's parameters equal an
            earlier recorded snapshot of the store, drop the steps after it and continue
            from there (without it, such a resume is refused, naming the step). Restore the
            optimizer's state saved with those weights too: the store does not keep momentum
            buffers or Adam's first moments.
        distributed: Under DDP, None (default) records every rank's batches when a process
            group of several ranks is initialised, rank 0 alone writing the store; False:
            this process's batches only (docs/guide/distributed.md).

    Example:
        >>> import torch, pk_attrib as pk
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
        >>> with pk.PathRecorder(model, opt) as recorder:
        ...     for x, y in recorder.watch(loader):
        ...         opt.zero_grad()
        ...         torch.nn.functional.mse_loss(model(x), y).backward()
        ...         opt.step()
        >>> len(recorder.path)
        2
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        store: str | os.PathLike | None = None,
        every: int = 1,
        dtype: torch.dtype | None = None,
        dataset_size: int | None = None,
        *,
        shard_bytes: int = 128 << 20,
        flush_interval: float = 1.0,
        max_queue_bytes: int = 1 << 30,
        truncate: bool = False,
        distributed: bool | None = None,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.model = unwrap(model)  # torch.compile / DDP: the wrapped module's names
        self._ranks = recording_group(model, distributed)  # None: this process alone
        self._keeps = self._ranks is None or self._ranks.rank == 0  # (DDP: rank 0 writes)
        self.optimizer = optimizer
        self.every = every
        self.dtype = dtype
        self._kind = optimizer_kind(optimizer)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = dict(self.model.named_parameters())
        names_by_id = {id(p): n for n, p in named.items()}
        description = describe_optimizer(optimizer, names_by_id)
        self._params = {n: p for n, p in named.items() if id(p) in in_optimizer and p.requires_grad}
        self._param_list = list(self._params.values())
        self._stateless: list[int] = []  # params without optimizer state before this step
        self._all_started = None  # the optimizer's state when it held every param's, if so
        # what the optimizer holds but this recording leaves out (frozen now), and its groups'
        # sizes: either changing mid-run would leave updated weights out of the path
        self._left_out = [
            p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad
        ]
        self._group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        self._dtypes = [p.dtype for p in self._params.values()]
        if not self._params:
            raise RecordingError(
                "the optimizer updates no trainable parameter of the model: nothing to record"
            )
        self._base_hyper = [g["hyper"] for g in description["groups"]]
        step_bytes = sum(p.numel() * (dtype or p.dtype).itemsize for p in self._params.values())
        # the micro-batches' indices noted since the last step (see batch_indices)
        self._pending: list[torch.Tensor | array.array] = []
        # what each micro-batch's forward pass starts from (random-number state, buffers)
        cuda = sorted({p.device.index or 0 for p in self._param_list if p.is_cuda})
        self._forward = ForwardState(
            dict(self.model.named_buffers()), cuda, running_statistics(self.model), self.model
        )
        self._finish = StepFinisher(cuda)  # (on the writer's thread, when there is one)
        self._last_batches: list[torch.Tensor] = []  # what the last optimizer step used
        self._pool: BufferPool | None = None  # recycled snapshot buffers (disk mode)
        self._slab: SlabAllocator | None = None  # packed kept snapshots (memory mode)
        self._pooled: list[torch.Tensor] = []  # the in-flight step's buffers from the pool
        self._inflight: tuple[int, dict, dict] | None = None
        self._closed = False
        self._session_first = True
        self.store = None if store is None else Path(store)
        self._lock = None  # the open lock file of the store, while recording into it
        self._raw = 0

        reasons, replayable = approximate_reasons(optimizer, description, every)
        # (the parameters give names, shapes and dtypes: no copy needed)
        fresh = new_manifest(self._params, description, dataset_size, every, dtype)
        fresh.update(approximate=bool(reasons), approximate_reasons=reasons)
        fresh["buffers"] = list(self._forward.buffers)
        if replayable:  # the steps between snapshots can be replayed
            fresh["replayable"] = True
        if self._ranks is not None:
            fresh["world_size"] = self._ranks.size

        if self.store is None or not self._keeps:
            self._manifest = fresh
            self._backend = MemoryBackend()
            self._writer = None
            # a slab per step's snapshot (at least 1 MiB): a kept tensor keeps one step alive
            self._slab = SlabAllocator(max(1 << 20, step_bytes + 64 * len(self._params)))
        else:
            self._manifest, self._lock, create = open_store(
                self.store, fresh, lambda: self._snapshot(copy=False), truncate
            )
            # a step records its hyperparameters when they differ from the store's first ones
            self._base_hyper = [g["hyper"] for g in self._manifest["optimizer"]["groups"]]
            self._raw = len(self._manifest["steps"])
            self._listed_final = self._manifest.get("final")  # (where the path ends now)
            # a store recorded without its buffers goes on without them
            self._forward.keep_only(self._manifest.get("buffers", []))
            queue_steps = max(2, min(256, max_queue_bytes // max(step_bytes, 1)))
            # snapshots in flight: the queue, the shard being gathered, the step being taken
            self._pool = BufferPool(max_bytes=(queue_steps + 2) * step_bytes + shard_bytes)
            self._writer = AsyncShardWriter(
                self.store,
                self._manifest,
                queue_steps=queue_steps,
                # every=k: a shard per few snapshots, whose buffers then come back soon
                shard_bytes=shard_bytes if every == 1 else min(shard_bytes, SPARSE_SHARD_BYTES),
                flush_interval=flush_interval,
                pool=self._pool,
                finish=self._finish,
                create=create,
                # (the first snapshot's buffers, readied on the writer's thread: as `_take`)
                first=[
                    torch.empty(p.shape, dtype=self.dtype or p.dtype, device="meta")
                    for p in self._param_list
                ],
            )
            # the lock lasts as long as the writer: an abandoned recorder collected by gc
            # still has queued steps to write, and stops its writer before letting go
            self._writer.lock, self._lock = self._lock, None
            self._abandoned = weakref.finalize(self, stop_writer, self._writer)
            atexit.register(close_at_exit, weakref.ref(self))
        # each step's hyperparameters (made anew only when they changed), against the first
        self._hyper = GroupHyper(self._base_hyper)
        self._dataset_size = self._manifest.get("dataset_size")
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # -- the training loop ----------------------------------------------------------------

    def watch(self, loader: DataLoader) -> Iterator[Any]:
        """Yield the loader's batches unchanged, noting the dataset indices of each.

        Args:
            loader: A `torch.utils.data.DataLoader` over a map-style dataset.

        Yields:
            Exactly the batches ``iter(loader)`` yields.

        Raises:
            TypeError: For anything but a DataLoader over a map-style dataset; call
                `record_batch` from such loops instead.
        """
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"watch() needs a torch DataLoader, got {type(loader).__name__}: for a custom "
                "loop call recorder.record_batch(indices) once per batch"
            )
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "watch() cannot know dataset indices of an IterableDataset: use a map-style "
                "dataset, or call recorder.record_batch(indices) once per batch"
            )
        if getattr(loader, "in_order", True) is False:
            raise RecordingError(
                "the DataLoader was built with in_order=False, so batches may arrive in "
                "another order than their indices: build it with in_order=True"
            )
        try:
            size = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            if self._dataset_size is None:
                raise TypeError(
                    "the loader's dataset has no len(): pass PathRecorder(..., dataset_size=N)"
                ) from None
        else:
            self._set_dataset_size(size)
        for indices, batch in indexed_batches(loader):
            self.record_batch(indices)
            yield batch

    def record_batch(self, indices: Any) -> None:
        """Note the dataset indices of one (micro-)batch; the next optimizer step uses them.

        Args:
            indices: Dataset indices, int (B,) tensor, array or list (or one int).

        Raises:
            IndexOutOfRangeError: An index lies outside ``[0, dataset_size)``.
        """
        if self._closed:
            raise RecordingError("this recorder is closed: create a new PathRecorder")
        self._hand_over((batch_indices(indices, self._dataset_size),))

    def _hand_over(self, batches: Sequence[torch.Tensor | array.array]) -> None:
        """Note micro-batches the loop is about to run, with the state their forward starts in."""
        if not self._pending:  # a step's first batch: the buffers its forward passes start from
            self._forward.step_begins()
        for idx in batches:
            self._pending.append(idx)
            self._forward.batch_begins()

    def repeat_batch(self) -> None:
        """Credit the next optimizer step with the batch(es) the previous step used.

        For loops that take several optimizer steps on one batch (K inner updates, SAM's
        two steps): call it before each extra step. The batches are added to any noted since.

        Raises:
            RecordingError: No optimizer step has been recorded yet.
        """
        if self._closed:
            raise RecordingError("this recorder is closed: create a new PathRecorder")
        if not self._last_batches:
            raise RecordingError("no optimizer step was recorded yet: there is no batch to repeat")
        self._hand_over(self._last_batches)

    def _set_dataset_size(self, size: int) -> None:
        if self._dataset_size is None:
            self._dataset_size = size
            self._manifest["dataset_size"] = size
        elif self._dataset_size != size:
            raise StoreMismatchError(
                f"this recording is over a dataset of {self._dataset_size} examples but the "
                f"loader's dataset has {size}: record one training set per store"
            )

    # -- optimizer hooks ------------------------------------------------------------------

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        pending = self._pending
        if self._ranks is not None:  # DDP: every rank's micro-batches, in rank order
            first = self._param_list if self._session_first else None
            mine = [index_tensor([b]) for b in pending]
            pending = gather_step(self._ranks, self._raw, mine, self._forward, first)
        if not pending:
            again = (
                "; a loop that takes another step on the same batch (several updates per "
                "batch, SAM) calls recorder.repeat_batch() before it"
                if self._last_batches
                else ""
            )
            raise MissingBatchIndicesError(
                f"optimizer step {self._raw} has no batch indices: iterate the loader through "
                "recorder.watch(loader), or call recorder.record_batch(indices) before "
                f"optimizer.step(){again}"
            )
        # (this hook and the others run between the training loop's own operations, where
        # each call costs several times what it costs in a tight loop: they do little)
        params, groups, r = self._param_list, optimizer.param_groups, self._raw
        check_parameters(optimizer, self, r)
        # the indices, batch sizes and random-number states become tensors later (finish.py)
        forward = self._forward
        later = (pending, forward.batch_states())
        tensors = forward.buffer_tensors(r) if forward.buffers else {}
        meta: dict[str, Any] = {"lr": learning_rates(groups, r)}
        mode = forward.mode()
        if mode is not None:  # which modules trained in train mode
            meta["train"] = mode
        hyper = self._hyper(groups)
        if self._hyper.differs:
            meta["hyper"] = hyper
        state = optimizer.state
        if state is self._all_started and len(state) == len(params) and all(state.values()):
            started = True  # (as at the last step: each parameter's state is still there)
        else:  # (parameters hash in Python: a lookup each is what the test above avoids)
            states = list(map(state.get, params))
            started = any(states)
            # which start their state at this step: decided after it (_post_step)
            self._stateless = [i for i, st in enumerate(states) if not st] if started else []
            full = started and not self._stateless and len(state) == len(params)
            self._all_started = state if full else None
        if not started:
            meta["fresh_state"] = True
        elif self._session_first:
            found = state_tensors(optimizer, self._params, INITIAL_STATE)
            for (key, name), value in found.items():
                tensors[f"{r}/init/{key}/{name}"] = _copy(value, None)
            meta["initial_state"] = sorted({key for key, _ in found})
        self._pooled = []
        if r % self.every == 0 and self._keeps:
            for name, p in self._params.items():
                tensors[f"{r}/w/{name}"] = self._take(p, self.dtype)
            if self.every > 1:  # the optimizer state a replay of the next steps starts from
                for (key, name), value in state_tensors(
                    optimizer, self._params, INITIAL_STATE
                ).items():  # (recycled, page-aligned buffers, as the weights')
                    tensors[f"{r}/state/{key}/{name}"] = (
                        _copy(value, None) if value.dim() == 0 else self._take(value, None)
                    )
        self._inflight = (r, tensors, meta, later)

    def discard_batches(self) -> None:
        """Forget the batches noted since the last optimizer step.

        Call it when the loop skips ``optimizer.step()`` for a batch it has drawn, e.g. when
        ``torch.amp.GradScaler`` found inf/NaN gradients (its scale then drops), so that the
        skipped batch is not credited to the next step.
        """
        self._pending = []
        self._forward.discard()

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._closed or self._inflight is None:
            return
        r, tensors, meta, later = self._inflight
        # (``_inflight`` stays set until the record is handed over: an interrupt before that,
        # say Ctrl-C while put() waits for a slow disk, leaves this step unrecorded, and close()
        # must then not store the weights after it as the end of the last recorded step)
        # optimizers skip a parameter without a gradient: no decay, no momentum, no state.
        # Read after the step: a closure (optimizer.step(closure)) makes the gradients inside it
        skipped = [i for i, p in enumerate(self._param_list) if p.grad is None]
        if skipped:
            meta["skipped"] = skipped
        if self._stateless:
            left, fresh = set(skipped), []
            for i in self._stateless:
                if i not in left and optimizer.state.get(self._param_list[i]):  # started here
                    fresh.append(i)
            self._stateless = []
            if fresh:
                meta["fresh"] = fresh
        kept_after = STATE_AFTER_STEP.get(self._kind, ()) if self.every == 1 else ()
        if kept_after and self._keeps:  # (every=k: a replay recomputes it)
            for (key, name), value in state_tensors(optimizer, self._params, kept_after).items():
                # (in their own dtype: squared gradients underflow in float16)
                tensors[f"{r}/{key}/{name}"] = (
                    _copy(value, None) if value.dim() == 0 else self._take(value, None)
                )
        self._last_batches, self._pending = self._pending, []
        self._forward.step_done()
        self._session_first = False
        nbytes = 8 * sum(map(len, later[0]))  # (the indices; the states are small)
        for t in tensors.values():
            nbytes += t.numel() * t.element_size()
        record = {
            "step": r,
            "tensors": tensors,
            "meta": meta,
            "nbytes": nbytes,
            "pooled": self._pooled,
            "later": later,
        }
        self._pooled = []
        if self._writer is not None:
            self._writer.put(record)
        elif self._keeps:  # (under DDP the other ranks keep nothing)
            self._backend.records.append(self._finish(record))
        self._raw += 1
        self._inflight = None

    def _snapshot(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The parameters now, in the recorded dtypes (a widened model's lose nothing).

        ``copy=False``: CPU parameters of those dtypes as they are (to write at once).
        """
        return {
            n: _copy(p, self.dtype or was) if copy else p.detach().to("cpu", self.dtype or was)
            for (n, p), was in zip(self._params.items(), self._dtypes, strict=True)
        }

    def _take(self, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """A CPU copy of ``tensor``, in a slab (memory mode) or a pool buffer (disk mode).

        Memory mode keeps its snapshots; disk mode gives a buffer back to the pool once
        its shard is written.
        """
        if self._pool is None:
            buffer = self._slab.take(tensor.shape, dtype or tensor.dtype)
        else:
            buffer = self._pool.take(tensor.shape, dtype or tensor.dtype)
            self._pooled.append(buffer)
        buffer.copy_(tensor.detach())
        return buffer

    # -- results and lifecycle --------------------------------------------------------------

    @property
    def path(self) -> TrainingPath:
        """The path recorded so far (a closed recorder's path ends at the final parameters)."""
        if not self._keeps:  # under DDP: rank 0's store, once close() waited for rank 0
            return rank_path(self._ranks, self.store, self._closed)
        if self._writer is None:
            return TrainingPath(self._manifest, self._backend)
        if not self._closed:
            self._writer.flush()
        return TrainingPath.load(self.store)

    @property
    def steps_recorded(self) -> int:
        """Number of optimizer steps recorded so far."""
        return self._raw

    def flush(self) -> None:
        """Block until every recorded step is on disk (no-op in memory)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Finish the recording: remove the hooks, write pending steps and the final parameters.

        If an optimizer step failed half-way (an exception inside ``optimizer.step()``, or a
        Ctrl-C while the step's record waited for a slow disk), the weights now are not the end
        of the last recorded step, so the path is left ending at its last full snapshot (and
        marked interrupted) rather than finalized with them.
        """
        if self._closed:
            return
        for handle in self._handles:
            handle.remove()
        self._closed = True
        if self._pending:
            warnings.warn(
                f"{len(self._pending)} batch(es) were loaded after the last optimizer step and "
                "belong to no step; they are not part of the path",
                PkAttribWarning,
                stacklevel=2,
            )
        finalize = self._keeps and self._inflight is None and self._final_is_known()
        # (written before this returns: the store needs no copy of the parameters)
        final = self._snapshot(copy=self._writer is None) if finalize else None
        buffers = self._forward.current_buffers()
        if self._writer is None:
            if finalize:
                self._backend.final = final
                self._backend.final_buffers = buffers
                self._manifest["complete"] = True
        else:
            try:
                if finalize:  # (under a name the writer does not remove: see close_with_final)
                    file = self.store / final_name(self._listed_final)
                    self._writer.close_with_final(file, final, buffers)
                else:
                    self._writer.close()
            finally:
                self._release()
        if self._ranks is not None:  # the others may read rank 0's store from now on
            self._ranks.barrier("closing the recording")
        if final is not None and not all_finite(final.values()):
            diverged = self.path.first_non_finite()  # (reads the path: only when it diverged)
            where = (
                "the initial weights already hold NaN or inf"
                if diverged == 0
                else f"its weights hold NaN or inf from step {diverged} of the path on "
                f"(optimizer step {diverged - 1} made them so)"
            )
            warnings.warn(
                f"the training run diverged: {where}. The path is kept as recorded; "
                "explanations reaching past that step raise NonFiniteError",
                PkAttribWarning,
                stacklevel=2,
            )

    def _final_is_known(self) -> bool:
        """Whether the parameters still hold the weights after the last recorded step.

        A dtype change that a step then refused (``model.half()``) rounded them; widening
        (``model.double()``) lost nothing, and the final parameters are stored in the
        recorded dtypes either way.
        """
        for (name, p), was in zip(self._params.items(), self._dtypes, strict=True):
            if p.dtype != was and torch.promote_types(was, p.dtype) != p.dtype:
                warnings.warn(
                    f"parameter {name} was converted from {was} to {p.dtype} after the last "
                    "recorded step, which rounded the weights that step reached: the path ends "
                    "at its last full snapshot instead of at those weights",
                    PkAttribWarning,
                    stacklevel=3,
                )
                return False
        return True

    def __enter__(self) -> PathRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
        """Let other recorders open the store."""
        if self._lock is not None:
            unlock_store(self._lock)
            self._lock = None
        if getattr(self, "_writer", None) is not None:
            self._abandoned.detach()
            self._writer.release_lock()


def _copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype, copy=True)
