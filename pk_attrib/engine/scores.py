"""Influence scores for the Captum contract: streaming top-k and self-influence.

Scores follow Captum's orientation and sign: (n_test, n_train), positive = proponent, i.e.
the training example's exact contribution to the *decrease* of the test loss. They are the
engine's contributions with f(x) = −loss(x) as the explained quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import n_rows, one_row
from .exact import Engine, rounding_floor, warn_unconverged
from .outputs import OutputFn, row_losses
from .quadrature import QuadratureRule, StepIntegrator
from .rules import make_rule
from .steps import _check_finite


def negative_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OutputFn:
    """``output_fn`` whose value per row is −loss(row): its decrease is the loss's increase.

    Each row's loss is ``loss_fn`` called on that row alone (a batch of one), whatever its
    reduction. Many rows are evaluated in one call vectorized by ``torch.func.vmap``; the first
    such call is checked against row-by-row calls, and a loss that vmap cannot trace or that
    gives other numbers under it is evaluated row by row from then on. (Row by row, the exact
    Adam self-influence of 1,500 digits took 16.8 s, 7 s of it in 700,000 separate loss calls;
    vectorized, 11.4 s.)
    """
    vectorized = torch.func.vmap(lambda o, t: loss_fn(one_row(o), one_row(t)).sum())
    trusted: bool | None = None  # whether the vectorized call gives the row-by-row numbers

    def explained(outputs: Any, labels: Any) -> torch.Tensor:
        nonlocal trusted
        if n_rows(labels) == 1:  # (per-example gradients call it on one row)
            return -loss_fn(outputs, labels).sum().reshape(1)
        if trusted is False:
            return -row_losses(outputs, labels, loss_fn)
        try:
            fast = vectorized(outputs, labels)
        except Exception:  # a loss vmap cannot trace (data-dependent branches, .item(), ...)
            trusted = False
            return -row_losses(outputs, labels, loss_fn)
        if trusted is None:
            slow = row_losses(outputs, labels, loss_fn)
            trusted = _same_rows(fast, slow)  # None: these rows cannot decide; ask again later
            if not trusted:
                return -slow
        return -fast

    return explained


def _same_rows(fast: torch.Tensor, slow: torch.Tensor) -> bool | None:
    """Whether vectorized row losses equal row-by-row ones, each to 8 eps of its own size.

    None when the rows cannot decide it: a non-finite loss (the caller's NaN check reports
    it), or values under an outer transform that cannot be read.
    """
    a, b = fast.detach(), slow.detach()
    if a.shape != b.shape:
        return False
    try:
        if not bool(torch.isfinite(b).all()):
            return None
        tol = 8 * torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
        return bool(((a - b).abs() <= tol * torch.maximum(b.abs(), torch.ones_like(b))).all())
    except RuntimeError:  # inside torch.func.vmap: data-dependent reads are refused
        return None


def cosine(
    contributions: torch.Tensor, query_energy: torch.Tensor, train_energy: torch.Tensor
) -> torch.Tensor:
    """Contributions divided by their Cauchy–Schwarz bound, in [−1, 1] (0 where a side is 0).

    Args:
        contributions: c_ij, (n, b).
        query_energy: Σ_s κ_j ‖u_s(x_i)‖² over the steps that used example j, (n, b).
        train_energy: Σ_s κ_j ‖g_j(w_s)‖², (b,).

    Returns:
        (n, b) cosine scores.
    """
    bound = query_energy.sqrt() * train_energy.sqrt()  # (no product to under/overflow)
    out = contributions / bound.clamp_min(torch.finfo(bound.dtype).tiny)
    return torch.where(bound > 0, out.clamp(-1.0, 1.0), torch.zeros_like(out))


class TopKAccumulator:
    """Running top-k over column blocks: memory O(n × (k + block))."""

    def __init__(self, k: int, largest: bool):
        self.k = k
        self.largest = largest
        self.values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, offset: int) -> None:
        """Merge a block of scores (n, b) whose first column is training index ``offset``."""
        idx = torch.arange(offset, offset + scores.shape[1], device=scores.device)
        idx = idx.expand(scores.shape[0], -1)
        if self.values is not None:
            scores = torch.cat([self.values, scores], 1)
            idx = torch.cat([self.indices, idx], 1)
        top = torch.topk(scores, min(self.k, scores.shape[1]), dim=1, largest=self.largest)
        self.values, self.indices = top.values, idx.gather(1, top.indices)


def stream_top_k(
    block_scores: Callable[[int, int], torch.Tensor],
    n_train: int,
    k: int,
    largest: bool,
    block: int,
    show_progress: bool = False,
    desc: str = "training blocks",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of an (n, n_train) score matrix computed block by block.

    Args:
        block_scores: ``(a, b) -> (n, b − a)`` scores of training examples a..b−1.
        n_train: Number of training examples.
        k: How many to keep per row.
        largest: Keep the largest (proponents) or the smallest (opponents).
        block: Columns per block.
        show_progress: Show a progress bar over blocks.
        desc: The progress bar's name.

    Returns:
        ``(indices, values)``, each (n, k), sorted.
    """
    acc = TopKAccumulator(k, largest)
    starts = range(0, n_train, block)
    for a in tqdm(starts, desc=desc, disable=not show_progress):
        acc.add(block_scores(a, min(a + block, n_train)), a)
    return acc.indices, acc.values


def exact_self_influence_plain_sgd(
    engine: Engine, indices: torch.Tensor, output_fn: OutputFn, quad: QuadratureRule
) -> torch.Tensor:
    """Exact self-influence when no step carries optimizer state (plain SGD).

    Then c_i(x_i) = −Σ_{s: i∈B_s} κ σ η_s φ_s(x_i) · g_i(w_s) needs φ_s only for the step's
    own batch members: the cost is a few gradients per batch member and step.

    Args:
        engine: The engine of the explainer.
        indices: Training indices whose self-influence is wanted (m,).
        output_fn: The explained quantity (−loss).
        quad: The quadrature rule.

    Returns:
        (m,) scores: each example's contribution to the decrease of its own loss.
    """
    fm, path, p = engine.fm, engine.p.path, engine.p
    rule = make_rule(path, engine.vectors, fm.active_names)
    position = torch.full((engine.n_train,), -1, dtype=torch.int64)
    position[indices] = torch.arange(len(indices))
    out = torch.zeros(len(indices), dtype=fm.dtype, device=fm.device)
    w_next = fm.flatten(path.final)
    # each step may leave rtol of an example's whole change, spread over the steps (as in
    # `Engine.exact`): f(x_i) at the two ends of the path, for the examples asked about
    w_first = fm.flatten(path.initial)
    share = torch.zeros(engine.n_train, dtype=fm.dtype, device=fm.device)
    for part in torch.split(indices, 4096):
        *inputs, labels = engine._batch(part)
        total = output_fn(fm.outputs(w_next, inputs), labels)
        total = total - output_fn(fm.outputs(w_first, inputs), labels)
        share[part.to(fm.device)] = quad.rtol * total.abs() / max(len(path), 1)
    # one rung, carried over steps (sharded: on every rank's share of the examples together)
    integrator = StepIntegrator(fm, quad, (), None, output_fn, engine.shard)
    for s in tqdm(range(len(path) - 1, -1, -1), desc="steps", disable=not p.show_progress):
        step = path.step(s)
        w = fm.flatten(step.params)
        delta, w_prev_next = w_next - w, w_next
        w_next = w
        rows = position[step.indices]
        keep = rows >= 0
        none = ~keep.any()  # (sharded: skipped when no rank has one of its examples here)
        if bool(none) if engine.shard is None else engine.shard.all(none):
            continue
        members = step.indices[keep]
        kappa = engine.kappa(step)[keep.to(fm.device)]
        *inputs, labels = engine._batch(members)
        inputs = tuple(inputs)
        f_s, m_s = engine._forward_and_scale(w, inputs, labels, output_fn)
        f_next, m_next = engine._forward_and_scale(w_prev_next, inputs, labels, output_fn)
        _check_finite(f_s, "training-example output", s, engine.p.path)
        integrator.retarget(inputs, labels)
        floor = rounding_floor(f_s, m_s, f_next, m_next)
        tol = torch.maximum(share[members.to(fm.device)], floor)
        phi, _ = integrator.integrate(w, delta, f_next - f_s, tol, s)
        v, _ = rule.begin(s, step, phi, fm.active(w))
        sign, _ = rule.coefficients(step)
        if engine.replay is not None:  # their terms of the step's own batch gradient
            grads = engine.replayed_terms(step, w, keep)
        else:
            grads = fm.loss_grads(w, (*inputs, labels), p.loss_fn)
        _check_finite(grads, "training gradient", s, engine.p.path)
        values = -(v * grads * sign).sum(1) * kappa.to(fm.dtype)
        out.index_add_(0, rows[keep].to(fm.device), values)
    warn_unconverged(integrator.unconverged, "the scores")
    return out


def exact_self_influence_blocks(
    engine: Engine,
    indices: torch.Tensor,
    output_fn: OutputFn,
    quad: QuadratureRule,
    block: int,
    show_progress: bool = False,
) -> torch.Tensor:
    """Exact self-influence for any exact optimizer, by sweeps over blocks of examples.

    Each block of (sorted) training examples is a set of queries whose contributions are
    restricted to the block's own index range; the diagonal is kept.

    Returns:
        (m,) scores in the order of ``indices``.
    """
    order = torch.argsort(indices)
    sorted_idx = indices[order]
    out = torch.zeros(len(indices), dtype=engine.fm.dtype, device=engine.fm.device)
    for a in tqdm(range(0, len(indices), block), desc="blocks", disable=not show_progress):
        part = sorted_idx[a : a + block]
        first, last = int(part[0]), int(part[-1]) + 1
        *inputs, labels = engine._batch(part)
        scores = engine.exact(
            tuple(inputs), labels, output_fn, quad, kernel=False, columns=(first, last)
        )
        diag = scores[torch.arange(len(part)), part - first]
        out[order[a : a + block].to(out.device)] = diag
    return out
