"""Sharded attribution: a `PathKernelInfluence` on every rank of a torch.distributed group.

Launched like a training run (``torchrun --nproc_per_node=N script.py``), every rank builds
the same explainer and makes the same calls; each computes a share of every sweep, and every
rank returns the whole result, the one a single process returns (to rounding).

How a sweep is split (`ShardedEngine`). Per step, the query side costs about q query
gradients per query (the quadrature's nodes, q >= 2) and the training side one per-example
gradient per batch member, B of them. Split by queries, a rank's share costs n q / R + B;
split by training examples, n q + B / R. So:

- **By queries** when 2 n >= B (and every rank gets one): each rank sweeps its rows of the
  queries through every step; the training side (each step's per-example gradients, the step
  check) is computed on every rank. The adaptive quadrature decides a step's node count from
  every query at once, so the ranks take each such decision together (`Shard.all`, one small
  collective per decision): each rank gets the nodes one process holding all the queries
  would use, and so its numbers. This serves `attribute`, `influence` (with ``k``, each rank
  streams its rows through every block of columns, so only the (n, k) results cross ranks
  and there is nothing to merge: `split_stream`; without, each block is split by rows), and
  the contribution ``self_influence`` (its queries are the training examples).
- **By training examples** when a sweep covers a block of columns (``influence``, cosine
  scores, the contribution self-influence blocks) for fewer queries than that: each rank runs
  the whole query side and the gradients and contributions of its share of the block's
  columns; a step is skipped only when it credits none of the whole block, as one process
  skips it.
- **Counterfactual scores** (``counterfactual``, ``influence(score="counterfactual")``, the
  default ``self_influence``): by queries, whose adjoints never meet.
- **Not split**: fewer queries than ranks (each rank computes everything), checkpoint mode
  (TracIn's dot products), and the step check (query-independent, one pass per explainer).

Every rank's share ends with a status round in which a rank that raised tells the others, who
then raise a `DistributedError` instead of waiting; a rank that dies is found at the next
collective (gloo and nccl see the connection close; one that hangs, at the process group's
``timeout``). The arguments are compared first (a fingerprint per call): ranks that pass
different queries are told so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from ..decomposition import Decomposition
from ..engine.batches import leaves, n_rows, take
from ..engine.exact import Engine
from ..engine.steps import Problem
from ..exceptions import DistributedError
from ..record.distributed import Ranks, process_group
from ..record.path import TrainingPath

T = TypeVar("T")


def make_engine(problem: Problem, distributed: bool | None) -> Engine:
    """The explainer's engine: a `ShardedEngine` when it works with other ranks.

    Args:
        problem: The explainer's problem.
        distributed: None: shard when a process group of several ranks is initialised;
            True: it must be; False: work alone.
    """
    ranks = process_group(distributed, "PathKernelInfluence")
    return Engine(problem) if ranks is None else ShardedEngine(problem, ranks)


def writes_cache(engine: Engine) -> bool:
    """Whether this process may write the store's feature cache (rank 0 alone does)."""
    return not isinstance(engine, ShardedEngine) or engine.ranks.rank == 0


def world_accumulation(path: TrainingPath, accumulation: str | int) -> str | int:
    """The explainer's ``accumulation`` for the steps of a path recorded on R ranks.

    DDP averages the ranks' gradients, so each rank's micro-batch loss enters its step
    divided by R on top of what each rank's loop did: "sum" becomes the divisor R, an int n
    becomes n R, and "mean" (over the step's micro-batches, R times each rank's) stays.

    Args:
        path: The path (``path.manifest["world_size"]``: R, 1 when absent).
        accumulation: What each rank's loop did, as the explainer takes it.
    """
    world = int(path.manifest.get("world_size", 1))
    if world == 1 or accumulation == "mean":
        return accumulation
    return world if accumulation == "sum" else int(accumulation) * world


@dataclass
class Shard:
    """A sweep whose work is split over the ranks, while it runs (`Engine.shard`).

    Attributes:
        ranks: The process group.
        rows: Every rank's queries together (what sizes the sweep's blocks of steps).
        columns: The caller's block of training examples ``(a, b)`` (None: all).
        what: What the ranks are computing, for errors.
    """

    ranks: Ranks
    rows: int
    columns: tuple[int, int] | None
    what: str

    def all(self, flags: torch.Tensor) -> bool:
        """Whether every rank's queries' flags hold (one status round)."""
        return self.ranks.status(self.what, bool(flags.all()))

    def credits(self, step, here: bool) -> bool:
        """Whether the step's batch holds an example of the caller's whole block.

        Args:
            step: The step.
            here: Whether it holds one of this rank's columns (the answer when the sweep's
                columns are the caller's, the same on every rank).
        """
        if self.columns is None:
            return here
        a, b = self.columns
        return bool(((step.indices >= a) & (step.indices < b)).any())


def _share(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of n items (sizes differ by one at most)."""
    return rank * n // size, (rank + 1) * n // size


def fingerprint(*trees: Any) -> list[float]:
    """Four numbers per argument that tell calls apart (tensors, their sizes and sums)."""
    out = []
    for tree in trees:
        found = leaves(tree)
        values = [t.detach().to(torch.float64) for t in found]
        out += [
            float(len(found)),
            float(sum(v.numel() for v in values)),
            float(sum(v.sum() for v in values)),
            float(sum(v.square().sum() for v in values)),
        ]
    return out


class ShardedEngine(Engine):
    """An `Engine` whose sweeps each rank of a process group computes a share of.

    Args:
        problem: The explainer's problem.
        ranks: The process group.
    """

    def __init__(self, problem: Problem, ranks: Ranks):
        super().__init__(problem)
        self.ranks = ranks
        # what sizes the sweeps' blocks and chunks must be the same on every rank
        fm = problem.fm
        settings = [fm.memory_budget, fm.d, fm.d_active, fm.dtype.itemsize, self.n_train]
        ranks.same([*settings, len(problem.path)], "the explainer's settings (memory_budget, ...)")

    def split(self, n: int, work: Callable[[slice], T], what: str, check: list[float]) -> T:
        """``work(rows)`` on this rank's share of n queries; the whole result on every rank.

        Args:
            n: The number of queries (rows of the result).
            work: Computes the result of a slice of them: a tensor (m, ...) or a
                `Decomposition`.
            what: What is computed, for errors.
            check: A fingerprint of the arguments, compared across ranks first.

        Returns:
            ``work``'s results of every rank, concatenated along the queries.
        """
        if self.shard is not None or n < self.ranks.size:  # (nested, or too few to split)
            return work(slice(0, n))
        lo, hi = _share(n, self.ranks.size, self.ranks.rank)
        part = self._run(Shard(self.ranks, n, None, what), lambda: work(slice(lo, hi)), check)
        sizes = [_share(n, self.ranks.size, r) for r in range(self.ranks.size)]
        return self._gather(part, [b - a for a, b in sizes], 0, what)

    def plan(self, n: int, columns: tuple[int, int] | None, projected: bool) -> str | None:
        """How a sweep of n queries over ``columns`` is split: "queries", "columns" or None.

        By queries when every rank gets one and the query side is the larger (2 n >= B, the
        first step's batch), or when only queries can be split (no columns: the bias needs
        the whole training side; a projection keeps each step's features whole); by columns
        when a block of at least R columns is asked for; else not at all.
        """
        if self.shard is not None:  # (inside a split sweep: its share is this rank's)
            return None
        size = self.ranks.size
        batch = len(self.p.path.step(0).indices) if len(self.p.path) else 0
        if n >= size and (2 * n >= batch or columns is None or projected):
            return "queries"
        if columns is not None and columns[1] - columns[0] >= size and not projected:
            return "columns"
        return None

    def exact(
        self,
        inputs,
        target,
        output_fn,
        quad,
        kernel,
        columns=None,
        projector=None,
        features=None,
        reconstruct=True,
        norms=None,
    ):
        """`Engine.exact`, its work split by queries or by columns (the module docstring)."""
        sweep = super().exact
        n, size, rank = n_rows(inputs), self.ranks.size, self.ranks.rank
        how = self.plan(n, columns, projector is not None)
        if how is None:
            return sweep(
                inputs, target, output_fn, quad, kernel, columns, projector, features,
                reconstruct, norms,
            )  # fmt: skip
        what = "computing a sharded exact sweep"
        shard = Shard(self.ranks, n, columns, what)
        check = fingerprint(inputs, target, torch.tensor(columns or (0, 0)))
        mine = {} if norms is not None else None
        if how == "queries":
            lo, hi = _share(n, size, rank)
            rows = slice(lo, hi)

            def work():
                part = None if target is None else take(target, rows)
                return sweep(
                    take(inputs, rows), part, output_fn, quad, kernel, columns, projector,
                    features, reconstruct, mine,
                )  # fmt: skip

            out = self._run(shard, work, check)
            counts = [b - a for a, b in (_share(n, size, r) for r in range(size))]
            if mine is not None:
                norms["query"] = self._gather(mine["query"], counts, 0, what)
                norms["train"] = mine["train"]  # (the same on every rank)
            return self._gather(out, counts, 0, what)
        a, b = columns
        width = b - a
        lo, hi = _share(width, size, rank)

        def work():
            return sweep(
                inputs, target, output_fn, quad, kernel, (a + lo, a + hi), projector, features,
                reconstruct, mine,
            )  # fmt: skip

        out = self._run(shard, work, check)
        counts = [b - a for a, b in (_share(width, size, r) for r in range(size))]
        if mine is not None:
            norms["query"] = self._gather(mine["query"], counts, 1, what)
            norms["train"] = self._gather(mine["train"], counts, 0, what)
        return self._gather(out, counts, 1, what)

    def _run(self, shard: Shard, work: Callable[[], T], check: list[float]) -> T:
        """Run this rank's share of a sweep; tell the others if it raised, hear if they did."""
        self.ranks.same(check, f"the arguments of {shard.what}")
        self.shard = shard
        try:
            out = work()
        except DistributedError:
            raise
        except BaseException:
            self.ranks.status(shard.what, failed=True)  # (then this rank's own error)
            raise
        finally:
            self.shard = None
        self.ranks.status(shard.what)
        return out

    def _gather(self, part: Any, counts: list[int], dim: int, what: str) -> Any:
        """Every rank's ``part`` concatenated along ``dim`` (their sizes there: ``counts``)."""
        if part is None:
            return None
        if isinstance(part, (tuple, list)):  # (top-k indices and values)
            return type(part)(self._gather(p, counts, dim, what) for p in part)
        if isinstance(part, Decomposition):
            return self._gather_decomposition(part, counts, what)
        moved = part.movedim(dim, 0)
        every = self.ranks.gather_rows(moved, what, counts)
        return torch.cat(every).movedim(0, dim)

    def _gather_decomposition(self, part: Decomposition, counts: list[int], what: str):
        """A decomposition of every rank's queries (rank order), as one process makes it."""

        def rows(t):
            return self._gather(t, counts, 0, what)

        spent = torch.tensor([part.diagnostics.query_gradients], dtype=torch.int64)
        spent = self.ranks.gather_rows(spent, what, [1] * self.ranks.size)
        # (the training side and the step check ran whole on every rank)
        nodes = part.diagnostics.nodes
        # (a step split at kinks: each rank's queries took their own nodes; report the most)
        every = self.ranks.gather_rows(nodes[None], what, [1] * self.ranks.size)
        nodes = torch.cat(every).amax(0) if len(nodes) else nodes
        diagnostics = replace(
            part.diagnostics, query_gradients=int(sum(int(s) for s in spent)), nodes=nodes
        )
        return Decomposition(
            rows(part.contributions),
            rows(part.bias),
            rows(part.prediction),
            rows(part.delta),
            {k: rows(v) for k, v in part.terms.items()},
            diagnostics,
            rows(part._kernel),
            rows(part._weights),
        )


def split(engine: Engine, n: int, work: Callable[[slice], T], what: str, *args: Any) -> T:
    """``work(rows)`` split by queries over the ranks of a `ShardedEngine` (else all rows).

    Args:
        engine: The explainer's engine.
        n: The number of queries.
        work: Computes the result of a slice of the queries (a tensor (m, ...)).
        what: What is computed, for errors.
        *args: The arguments ``work`` slices, compared across ranks first.

    Returns:
        ``work``'s result for all n queries.
    """
    if not isinstance(engine, ShardedEngine):
        return work(slice(0, n))
    return engine.split(n, work, what, fingerprint(*args))


def split_stream(
    engine: Engine, n: int, n_train: int, work: Callable[[slice], T], what: str, *args: Any
) -> T:
    """`split` for work streamed over blocks of columns (a top-k), when its plan is by queries.

    Each rank then streams its own rows through every block, and only the (m, k) results
    cross ranks; otherwise ``work`` runs on all rows, its sweeps split as they plan (by
    columns). Not for projected scores, whose query chunks would differ between ranks.
    """
    if isinstance(engine, ShardedEngine) and engine.plan(n, (0, n_train), False) == "queries":
        return split(engine, n, work, what, *args)
    return work(slice(0, n))
