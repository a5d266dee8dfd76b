"""Counterfactual scores for `PathKernelInfluence`: blocks of queries through the engine's sweep.

The engine (`pk_attrib.engine.counterfactual`) carries a block of queries' adjoints back
through every recorded step; here the explainer's queries are cut into blocks that fit
``memory_budget``, and the Captum contract (``influence``: test loss, top-k, aggregate;
``self_influence``) is built on the blocks' (block, n_train) scores.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from captum.influence._utils.common import KMostInfluentialResults
from torch.utils.data import DataLoader

from ..engine.batches import n_rows, take
from ..engine.counterfactual import counterfactual, refuse
from ..engine.curvature import Curvature
from ..engine.projection import ProjectorKind
from ..engine.rules import make_rule
from ..engine.scores import negative_loss
from ..exceptions import ArgumentError, UnsupportedError
from . import arguments, data
from .distributed import split
from .influence import captum_result

# A `PathKernelInfluence` (not imported: its module imports this one).
PathKernelInfluence = Any

# The default ``hessian=`` of `counterfactual` and ``influence(score="counterfactual")``: the
# exact Hessian, the true derivative of the run. On benchmarks/bench_lds.py (digits MLP, SGD,
# 640 steps, 100 retrained halves) its linear datamodeling score was 0.867, against 0.822 for
# the empirical Fisher (= dattri's DVEmb) and 0.816 for Gauss-Newton, at 1.7x exact mode's time.
DEFAULT_HESSIAN = Curvature.EXACT
# The default of ``self_influence(score="counterfactual")``: the empirical Fisher, which found
# flipped labels best there (AUC 0.9961 with SGD, 0.9949 with Adam; exact Hessian 0.9938 and
# 0.9927; TracInCP 0.9951 and 0.9934) and costs least for all training examples as queries.
SELF_HESSIAN = Curvature.FISHER
# The default score of ``self_influence()`` in exact mode; checkpoint mode and ``layers=``
# (which counterfactual scores refuse) keep "contribution" (TracIn in checkpoint mode). The
# exact contribution found flipped labels less well than TracInCP (AUC 0.9945 and 0.9909).
SELF_DEFAULT = "counterfactual"


def self_score(explainer: PathKernelInfluence, score: str | None) -> str:
    """The score `self_influence` computes: ``score``, or the default for the explainer's mode.

    Raises:
        ValueError: ``score`` names no self-influence score.
    """
    if score is None:
        if explainer.mode == "exact" and not explainer._fm.partial:
            return SELF_DEFAULT
        return "contribution"
    if score not in ("contribution", "counterfactual"):
        raise ArgumentError(f"score={score!r}: use 'contribution' or 'counterfactual'")
    return score


def check(explainer: PathKernelInfluence) -> None:
    """Refuse counterfactual scores on a path exact mode cannot explain.

    Raises:
        UnsupportedError: The explainer runs in checkpoint mode; the message says why.
    """
    if explainer.mode != "exact":
        refuse(explainer.mode, explainer.path.approximate_reasons)
    if explainer._engine.replay is not None:
        raise UnsupportedError(
            "counterfactual scores differentiate each step's batch loss as the examples "
            f"evaluate it on their own, but this path's steps are replayed "
            f"({explainer._engine.replay_why}): not supported yet; use the contributions "
            "(attribute, influence(score='contribution'))"
        )


def _block(explainer: PathKernelInfluence, n_train_columns: int) -> int:
    """Queries per block: their adjoints, the curvature's temporaries and their score rows."""
    fm = explainer._fm
    rule = make_rule(explainer.path, explainer._engine.vectors, fm.active_names)
    per_query = (10 + 2 * rule.counterfactual_state()) * fm.d + n_train_columns
    return max(1, explainer.memory_budget // (per_query * explainer.dtype.itemsize))


def rows(
    explainer: PathKernelInfluence,
    queries,
    target: torch.Tensor | None,
    output_fn,
    hessian: Curvature,
    own: torch.Tensor | None = None,
    project: bool = True,
    reduce=None,
) -> Iterator[torch.Tensor]:
    """The scores of the queries, block by block: (block, n_train) each, or (block,) with own.

    Args:
        explainer: The explainer (exact mode).
        queries: The queries' inputs, each (n, ...).
        target: Per-query targets (n,), or None.
        output_fn: The explained output.
        hessian: The curvature.
        own: Each query's own training index (n,), for self-influence.
        project: Use the explainer's projection, if it has one.
        reduce: Applied to each block's scores where they are computed (a top-k: ranks
            then exchange its result, not the scores).
    """
    check(explainer)
    projected = project and explainer._projector.kind is not ProjectorKind.IDENTITY
    features = explainer._call_features() if projected else None
    n = n_rows(queries)
    size = _block(explainer, 1 if own is not None else len(explainer.train_dataset))
    try:
        for a in range(0, n, size):
            part = slice(a, a + size)
            block = take(queries, part), None if target is None else take(target, part)
            mine = None if own is None else own[part]

            def work(rows: slice, block=block, mine=mine) -> torch.Tensor:  # (ranks: a share)
                found = counterfactual(
                    explainer._engine,
                    take(block[0], rows),
                    None if block[1] is None else take(block[1], rows),
                    output_fn,
                    hessian,
                    projector=explainer._projector if projected else None,
                    features=features,
                    own=None if mine is None else mine[rows],
                )
                return found if reduce is None else reduce(found)

            what = "computing counterfactual scores"
            yield split(explainer._engine, n_rows(block[0]), work, what, *block, mine)
    finally:
        if explainer._features is not None:
            explainer._features.flush()


def influence(
    explainer: PathKernelInfluence,
    inputs: Any,
    k: int | None,
    proponents: bool,
    aggregate: bool,
    show_progress: bool,
) -> torch.Tensor | KMostInfluentialResults:
    """`PathKernelInfluence.influence` with ``score="counterfactual"`` (same contract).

    The explained output is the negative test loss, so a score is the derivative of the
    test loss's decrease with respect to upweighting the training example.
    """
    with progress(explainer, show_progress):
        return _influence(explainer, inputs, k, proponents, aggregate)


@contextlib.contextmanager
def progress(explainer: PathKernelInfluence, show: bool) -> Iterator[None]:
    """Show (or not) the sweep's progress bar for the duration of one call."""
    previous, explainer._problem.show_progress = explainer._problem.show_progress, show
    try:
        yield
    finally:
        explainer._problem.show_progress = previous


def _influence(explainer, inputs, k, proponents, aggregate):
    check(explainer)
    batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
    output_fn = negative_loss(explainer.test_loss_fn)
    n_train = len(explainer.train_dataset)
    total = torch.zeros(n_train, dtype=explainer.dtype, device=explainer._fm.device)
    full, top = [], []
    for batch in batches:
        queries, labels = explainer._split_batch(batch, explainer.test_loss_fn)
        curvature = explainer.hessian or DEFAULT_HESSIAN
        reduce = None if aggregate or k is None else functools.partial(_top, k, proponents)
        for block in rows(explainer, queries, labels, output_fn, curvature, reduce=reduce):
            if aggregate:
                total += block.sum(0)
            elif k is None:
                full.append(block)
            else:
                top.append(block)
    return captum_result(total, full if k is None else top, k, proponents, aggregate)


def _top(k: int, largest: bool, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, values)`` of each row's k highest (lowest) scores, each (m, k)."""
    found = torch.topk(block, min(k, block.shape[1]), dim=1, largest=largest)
    return found.indices, found.values


def scores(explainer: PathKernelInfluence, inputs, target, output_fn, hessian) -> torch.Tensor:
    """`PathKernelInfluence.counterfactual`: (n_test, n_train) scores of the queries."""
    check(explainer)
    queries = arguments.queries(explainer._fm, inputs)
    target, output_fn = arguments.target_and_output(
        explainer._fm, explainer.path.final, queries, target, output_fn
    )
    curvature = Curvature.parse(hessian or explainer.hessian or DEFAULT_HESSIAN)
    return torch.cat(list(rows(explainer, queries, target, output_fn, curvature)))


def self_influence(explainer: PathKernelInfluence, inputs: Any) -> torch.Tensor:
    """Each example's counterfactual effect on its own loss's decrease, (m,).

    Exact dot products (no projection), as for the other self-influence scores.

    Args:
        explainer: The explainer (exact mode).
        inputs: None for every training example, or a batch (or DataLoader) of them.
    """
    check(explainer)
    indices = (
        torch.arange(len(explainer.train_dataset))
        if inputs is None
        else data.locate(explainer._example_index(), inputs)
    )
    unique, back = torch.unique(indices, return_inverse=True)
    *inputs, labels = explainer._engine._batch(unique)
    output_fn = negative_loss(explainer.loss_fn)
    curvature = explainer.hessian or SELF_HESSIAN
    found = rows(explainer, tuple(inputs), labels, output_fn, curvature, unique, project=False)
    return torch.cat(list(found))[back.to(explainer._fm.device)]
