"""`influence` and `self_influence` for contribution and cosine scores (the Captum contract).

Scores are computed a block of training examples at a time (memory O(n_test × block)): the
exact sweep restricted to the block's columns, or checkpoint mode's dot products, with the
queries in chunks when gradients are projected. Top-k and sums over the test examples are
built block by block.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.influence._utils.common import KMostInfluentialResults
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..engine import scores, tracin, tracin_projected
from ..engine.batches import n_rows, take
from ..engine.projection import ProjectorKind
from . import data
from .distributed import split, split_stream

# A `PathKernelInfluence` (not imported: its module imports this one).
PathKernelInfluence = Any


def block_size(explainer: PathKernelInfluence, n: int) -> int:
    """Training examples per block so that one (n, block) block fits the budget."""
    return max(1, explainer.memory_budget // max(1, 4 * n * explainer.dtype.itemsize))


def scores_block(
    explainer: PathKernelInfluence, queries, labels, output_fn, cache, score: str = "contribution"
):
    """``(a, b) -> (n, b − a)`` scores of training examples a..b−1 for these queries."""
    projected = explainer._projector.kind is not ProjectorKind.IDENTITY
    n = n_rows(queries)
    size = explainer._query_chunk() if projected else max(1, n)
    features = explainer._call_features()  # shared by blocks
    train = None
    if projected and explainer.mode == "checkpoint":
        train = tracin_projected.CheckpointFeatures(
            explainer._engine, explainer._projector, features
        )

    def chunk(a: int, b: int, rows: slice) -> torch.Tensor:
        norms = {} if score == "cosine" else None
        if train is not None:  # each query chunk keeps its projected gradients across blocks
            kept = cache.setdefault(("queries", rows.start), {})
            values = tracin_projected.decompose(
                explainer._engine,
                train,
                take(queries, rows),
                take(labels, rows),
                output_fn,
                (a, b),
                kept,
                norms,
            )
        elif explainer.mode == "exact":
            values = explainer._engine.exact(
                take(queries, rows),
                take(labels, rows),
                output_fn,
                explainer.quadrature,
                False,
                columns=(a, b),
                projector=explainer._projector if projected else None,
                features=features,
                norms=norms,
            )
        else:
            values = tracin.decompose(
                explainer._engine, queries, labels, output_fn, (a, b), cache, norms
            )
        if norms is None:
            return values
        return scores.cosine(values, norms["query"], norms["train"])

    def block(a: int, b: int) -> torch.Tensor:
        if n == 0:
            return torch.zeros(0, b - a, dtype=explainer.dtype, device=explainer._fm.device)
        return torch.cat([chunk(a, b, slice(r, r + size)) for r in range(0, n, size)])

    return block


def train_block(explainer: PathKernelInfluence, n: int, cosine: bool) -> int:
    """Training examples per block of scores for n queries.

    One (n, block) block fits the budget; with projected checkpoints a block is a multiple
    of the cached blocks of training features, so none is computed twice.
    """
    size = block_size(explainer, n * (2 if cosine else 1))
    if explainer._projector.kind is not ProjectorKind.IDENTITY and explainer.mode == "checkpoint":
        rows = tracin_projected.block_rows(explainer._projector)
        size = max(rows, size // rows * rows)
    return size


def influence(
    explainer: PathKernelInfluence,
    inputs: Any,
    k: int | None,
    proponents: bool,
    aggregate: bool,
    score: str,
    show_progress: bool,
) -> torch.Tensor | KMostInfluentialResults:
    """`PathKernelInfluence.influence` for ``score="contribution"`` or ``"cosine"``."""
    batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
    output_fn = scores.negative_loss(explainer.test_loss_fn)
    n_train = len(explainer.train_dataset)
    previous, explainer._problem.show_progress = explainer._problem.show_progress, show_progress
    total = torch.zeros(n_train, dtype=explainer.dtype, device=explainer._fm.device)
    # the bar over training examples is named as Captum's TracInCP names it
    desc = f"Using {type(explainer).get_name()} to compute influence for training batches"
    try:
        results = []
        for batch in batches:
            queries, labels = explainer._split_batch(batch, explainer.test_loss_fn)
            block = scores_block(explainer, queries, labels, output_fn, {}, score)
            size = train_block(explainer, n_rows(queries), score == "cosine")
            if k is not None and not aggregate:
                if explainer._projector.kind is not ProjectorKind.IDENTITY:
                    results.append(
                        scores.stream_top_k(
                            block, n_train, int(k), proponents, size, show_progress, desc
                        )
                    )
                    continue

                def top(rows: slice, q=queries, y=labels, size=size):  # (ranks: their rows)
                    mine = scores_block(
                        explainer, take(q, rows), take(y, rows), output_fn, {}, score
                    )
                    return scores.stream_top_k(
                        mine, n_train, int(k), proponents, size, show_progress, desc
                    )

                n, what = n_rows(queries), "computing the top-k"
                results.append(
                    split_stream(explainer._engine, n, n_train, top, what, queries, labels)
                )
                continue
            if k is None and not aggregate and explainer.mode == "exact":
                size = max(1, n_train)  # (a block of columns costs a whole sweep there)
            starts = tqdm(range(0, n_train, size), desc=desc, disable=not show_progress)
            found = [(a, block(a, min(n_train, a + size))) for a in starts]
            if aggregate:  # summed over the queries, block by block
                for a, values in found:
                    total[a : a + values.shape[1]] += values.sum(0)
            else:
                results.append(torch.cat([values for _, values in found], 1))
    finally:
        explainer._problem.show_progress = previous
        if explainer._features is not None:
            explainer._features.flush()
    return captum_result(total, results, k, proponents, aggregate)


def captum_result(
    total: torch.Tensor, results: list, k: int | None, proponents: bool, aggregate: bool
) -> torch.Tensor | KMostInfluentialResults:
    """What Captum's ``influence`` returns, from scores gathered batch by batch.

    Args:
        total: (n_train,) the scores summed over every query (used with ``aggregate``).
        results: Per batch of queries, its (m, n_train) scores (``k`` None) or its
            ``(indices, values)``, each (m, k).
        k: Top-k, or None for every score.
        proponents: The k highest (else lowest).
        aggregate: Return the one row of ``total`` (its top-k with ``k``).

    Returns:
        (n, n_train) or (1, n_train) scores, or `KMostInfluentialResults` of (n or 1, k).
    """
    if aggregate:
        if k is None:
            return total[None]
        top = torch.topk(total, min(int(k), total.shape[0]), largest=proponents)
        return KMostInfluentialResults(top.indices[None], top.values[None])
    if k is None:
        return torch.cat(results)
    indices = torch.cat([r[0] for r in results])
    values = torch.cat([r[1] for r in results])
    return KMostInfluentialResults(indices, values)


def self_influence(
    explainer: PathKernelInfluence, inputs: Any, show_progress: bool
) -> torch.Tensor:
    """`PathKernelInfluence.self_influence` for ``score="contribution"``, (n_train,) or (m,)."""
    engine = explainer._engine
    desc = f"Using {type(explainer).get_name()} to compute self influence. Processing checkpoint"
    # checkpoints weigh every example at every checkpoint, so any example has a score;
    # a recorded path (every=k, another optimizer) weighs each example by its batches
    by_batches = len(explainer.path) > 0 and bool(explainer.path.step(0).parts)
    if inputs is not None and explainer.mode == "checkpoint" and not by_batches:
        batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
        out = []
        for batch in batches:
            queries, labels = explainer._split_batch(batch, explainer.loss_fn)
            out.append(tracin.self_influence(engine, None, (*queries, labels), desc))
        return torch.cat(out)
    indices = (
        torch.arange(len(explainer.train_dataset))
        if inputs is None
        else data.locate(explainer._example_index(), inputs)
    )
    if explainer.mode == "checkpoint":
        return tracin.self_influence(engine, indices, desc=desc)
    output_fn = scores.negative_loss(explainer.loss_fn)
    path = explainer.path
    rule_free = (
        explainer._fm.partial is False
        and path.optimizer["kind"] == "sgd"
        and all(float(h.get("momentum", 0.0)) == 0.0 for step in path for h in step.hyper)
    )
    if rule_free:  # (ranks: a share of the examples each)
        return split(
            engine,
            len(indices),
            lambda rows: scores.exact_self_influence_plain_sgd(
                engine, indices[rows], output_fn, explainer.quadrature
            ),
            "computing self-influence",
            indices,
        )
    size = max(1, int((explainer.memory_budget / (8 * explainer.dtype.itemsize)) ** 0.5))
    size = min(
        size,
        max(1, explainer.memory_budget // (4 * explainer._fm.d_active * explainer.dtype.itemsize)),
    )
    return scores.exact_self_influence_blocks(
        engine, indices, output_fn, explainer.quadrature, size, show_progress
    )
