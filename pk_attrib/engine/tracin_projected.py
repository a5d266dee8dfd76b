"""Checkpoint mode with random projection: TracIn's dot products between projected gradients.

c_i(x) ≈ −Σ_k κ_i (P(√η_k ⊙ ∇f(x; w_k))) · (P(√η_k ⊙ g_i(w_k))), an unbiased estimate of
checkpoint mode's −Σ_k κ_i η_k ∇f(x; w_k) · g_i(w_k) (η per parameter: its group's rate).
Both sides are scaled by √η, so each side is a function of its own examples alone: the
rows of `intermediate_quantities` (Captum's ``compute_intermediate_quantities``), whose dot
products are the influence scores.

The training side does not depend on the queries: its features are computed once per
checkpoint and kept in a `FeatureCache` (in the store, in a folder the user names, or in
memory up to a budget), in blocks of `block_rows` training examples; queries are projected
per checkpoint and dotted with each block as it is read. Nothing of size d is kept beyond
a chunk of per-example gradients (none at all for the layers of ``"factorized"``).
"""

from __future__ import annotations

import math

import torch

from .batches import n_rows
from .exact import Engine, add_norms
from .features import FeatureCache
from .projection import Projector, loss_rows, output_rows
from .steps import _check_finite, example_weights
from .tracin import _lr_of, _rates, checkpoint_decomposition

BLOCK_BYTES = 16 << 20  # cached training features are kept in blocks of at most this


def block_rows(projector: Projector) -> int:
    """Training examples per cached block of features (a fixed layout: part of the cache key)."""
    return max(1, BLOCK_BYTES // (4 * projector.dim))


def sqrt_rates(engine: Engine, lr) -> dict[str, float]:
    """√η per differentiated parameter for a step's learning rates (0 where it was skipped)."""
    return {name: math.sqrt(_lr_of(engine, lr, name)) for name in engine.fm.active_names}


class CheckpointFeatures:
    """The training side of projected checkpoint mode: P(√η ⊙ g_i(w_k)), cached.

    Keys in the cache: ``"fc<k>b<j>"`` for block j (rows j·R..) of the training set at
    checkpoint k (a path of checkpoints: every example at every checkpoint), and
    ``"fp<k>.<p>"`` for part p of a recorded step k (its batch members).

    Args:
        engine: The explainer's engine.
        projector: The projection.
        cache: Where features are kept (None: nothing kept across calls).
    """

    def __init__(self, engine: Engine, projector: Projector, cache: FeatureCache | None):
        self.engine = engine
        self.projector = projector
        fm = engine.fm
        self.cache = cache or FeatureCache(None, fm.dtype, memory_bytes=0, device=fm.device)
        self.rows = block_rows(projector)
        self.evaluations = 0  # training examples whose features were computed

    def _get(self, key: str, make) -> torch.Tensor:
        fresh = None
        if key in self.cache and self.cache.unverified:  # an earlier session's: check once
            fresh = make()
            self.cache.verify(key, fresh)  # (dropped, with a warning, if it differs)
        if key in self.cache:
            return self.cache[key].to(self.engine.fm.device)
        fresh = make() if fresh is None else fresh
        return self.cache.keep(key, fresh).to(self.engine.fm.device)

    def _compute(self, s: int, w: torch.Tensor, indices: torch.Tensor, lr) -> torch.Tensor:
        engine = self.engine
        batch = engine._batch(indices)
        rows = loss_rows(engine.fm, w, batch, engine.p.loss_fn)
        feats = self.projector.features(w, rows, sqrt_rates(engine, lr))
        _check_finite(feats, "projected training gradient", s, engine.p.path)
        self.evaluations += len(indices)
        return feats

    def block(self, s: int, w: torch.Tensor, j: int, lr) -> torch.Tensor:
        """Features of training rows j·R..(j+1)·R − 1 at checkpoint s, (≤ R, K)."""
        a, b = j * self.rows, min(self.engine.n_train, (j + 1) * self.rows)
        return self._get(f"fc{s}b{j}", lambda: self._compute(s, w, torch.arange(a, b), lr))

    def part(self, s: int, w: torch.Tensor, p: int, indices: torch.Tensor, lr) -> torch.Tensor:
        """Features of the members of part p of recorded step s, (m, K)."""
        return self._get(f"fp{s}.{p}", lambda: self._compute(s, w, indices, lr))


def decompose(
    engine: Engine,
    train: CheckpointFeatures,
    inputs,
    target,
    output_fn,
    columns: tuple[int, int] | None = None,
    queries: dict | None = None,
    norms: dict | None = None,
):
    """Projected checkpoint-mode decomposition, (n, n_train) (or a block of columns).

    Args:
        engine: The explainer's engine.
        train: The training side.
        inputs: Queries, each (n, ...).
        target: Per-query target, or None.
        output_fn: The explained output.
        columns: ``(a, b)``: only training examples a..b−1, returned as (n, b − a).
        queries: A dict kept by the caller across blocks of columns: the queries' projected
            gradients per checkpoint and learning rate.
        norms: An empty dict (with ``columns``) that receives ``"query"`` (n, b − a) and
            ``"train"`` (b − a,): the projected vectors' energies, as `tracin.decompose`.

    Returns:
        A `Decomposition`, or with ``columns`` the (n, b − a) contributions.
    """
    try:
        return _decompose(engine, train, inputs, target, output_fn, columns, queries, norms)
    finally:
        engine.fm.use_buffers(None)


def _decompose(engine, train, inputs, target, output_fn, columns, queries, norms):
    fm, path, p = engine.fm, engine.p.path, engine.p
    fm.routes.clear()  # (diagnostics: the routes this sweep takes)
    n, S = n_rows(inputs), len(path)
    first, last = columns if columns is not None else (0, engine.n_train)
    contributions = torch.zeros(n, last - first, dtype=fm.dtype, device=fm.device)
    if norms is not None:
        norms["query"] = torch.zeros_like(contributions)
        norms["train"] = torch.zeros(last - first, dtype=fm.dtype, device=fm.device)
    queries = {} if queries is None else queries
    query_evals = 0
    before = train.evaluations
    for s in range(S):
        step = path.step(s)
        fm.use_buffers(step.buffers)
        w = fm.flatten(step.params)

        def query_side(lr, s=s, w=w):
            nonlocal query_evals
            key = (s, tuple(float(x) for x in lr), tuple(sorted(getattr(lr, "skipped", ()))))
            if key not in queries:
                rows = output_rows(fm, w, inputs, target, output_fn)
                found = train.projector.features(w, rows, sqrt_rates(engine, lr))
                _check_finite(found, "projected query gradient", s, path)
                queries[key] = found
                query_evals += n
            return queries[key]

        if not step.parts:  # a checkpoint: every training example, κ = 1
            q = query_side(step.lr)
            for j in range(
                first // train.rows, (last - 1) // train.rows + 1 if last > first else 0
            ):
                a, b = j * train.rows, min(engine.n_train, (j + 1) * train.rows)
                lo, hi = max(a, first), min(b, last)
                feats = train.block(s, w, j, step.lr)[lo - a : hi - a].to(q.dtype)
                contributions[:, lo - first : hi - first] -= q @ feats.T
                if norms is not None:
                    norms["query"][:, lo - first : hi - first] += (q * q).sum(1, keepdim=True)
                    norms["train"][lo - first : hi - first] += (feats * feats).sum(1)
            continue
        for part, ((lr, indices, sizes), skipped) in enumerate(
            zip(step.parts, step.parts_skipped, strict=True)
        ):
            keep = (indices >= first) & (indices < last)
            if not bool(keep.any()):
                continue
            rates = _rates(lr, skipped)
            kappa = example_weights(sizes, p.reduction, p.accumulation).to(fm.dtype)[keep]
            q = query_side(rates)
            feats = train.part(s, w, part, indices, rates)[keep.to(fm.device)].to(q.dtype)
            idx = (indices[keep] - first).to(fm.device)
            kappa = kappa.to(fm.device)
            contributions.index_add_(1, idx, -(q @ feats.T) * kappa)
            if norms is not None:
                add_norms(norms, idx, kappa, (q * q).sum(1), (feats * feats).sum(1))
    _check_finite(contributions, "contributions", None, path)
    if columns is not None:
        return contributions
    train_evals = train.evaluations - before
    return checkpoint_decomposition(
        engine, inputs, target, output_fn, contributions, query_evals, train_evals
    )


def intermediate_quantities(
    engine: Engine, projector: Projector, batch, loss_fn, aggregate: bool = False
) -> torch.Tensor:
    """Each example's P(√η_k ⊙ ∇ℓ(w_k)), concatenated over the checkpoints k, (m, S·K).

    Dot products of two such rows are checkpoint mode's (projected) influence scores
    Σ_k η_k ∇ℓ(x; w_k) · ∇ℓ(x'; w_k) (Captum's ``compute_intermediate_quantities``, scaled
    by √η as in ``TracInCPFastRandProj``). For a path of checkpoints (every example at
    every checkpoint).

    Args:
        engine: The explainer's engine.
        projector: The projection (the identity: plain per-example gradients, S·d columns).
        batch: ``(inputs..., labels)`` of m examples.
        loss_fn: The loss whose gradients are taken.
        aggregate: Return the sum over the examples, (1, S·K).

    Returns:
        (m, S·K), or (1, S·K) with ``aggregate``.
    """
    fm, path = engine.fm, engine.p.path
    out = []
    try:
        for s in range(len(path)):
            step = path.step(s)
            fm.use_buffers(step.buffers)
            w = fm.flatten(step.params)
            found = projector.features(
                w, loss_rows(fm, w, batch, loss_fn), sqrt_rates(engine, step.lr)
            )
            _check_finite(found, "projected gradient", s, path)
            out.append(found.sum(0, keepdim=True) if aggregate else found)
    finally:
        fm.use_buffers(None)
    return torch.cat(out, 1)
