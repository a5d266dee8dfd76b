"""Counterfactual scores: d f(x; w_S) / d ε_i through the whole recorded training run.

ε_i scales example i's loss term in every batch that drew it (ε_i = 1 is the run that
happened), so removing example i changes f by about −score. docs/mathematics.md
("Counterfactual scores") has the mathematics; in short, with the optimizer step written as a
function (w_s, state before, G_s) -> (w_s+1, state after) (`Rule.step_map`) and
G_s = σ Σ_j κ_j g_j(w_s) + λ w_s, the sweep walks the steps backwards carrying

    λ_w  (n, d): the adjoint of the weights, from ∇f(x; w_S) at the end of the path,
    λ_st (n, d) each: the adjoint of the optimizer state (momentum, Adam's m, v, v_max),

through each step's vector-Jacobian product (`Rule.step_vjp`, torch.func.vjp of the step
map, so Adam's second moment and its preconditioner enter through their dependence on G_s):

    (a_w, λ_st, a_G) = VJP of the step at (λ_w, λ_st)
    score[:, i] += κ_i (σ a_G) · g_i(w_s)          for each i in the step's batch
    λ_w = a_w + λ a_G + C (σ a_G)                  C: the batch loss's curvature (`curvature`)

Memory: O(n × d × (2 + state)) for n queries, plus the (n, n_train) scores; callers pass
blocks of queries. With a projector, the dot products become (P σ a_G) · (P g_i), while the
adjoints stay exact.

The first-order test switch (``first_order=True``) removes every second-order term: λ_w is
replaced at each step by the query gradient at its start, ∇f(x; w_s) (so neither the query's
nor the batch loss's Hessian, nor weight decay's, carries anything), and Adam's
preconditioner is held at its recorded value: what is left is the left-endpoint path kernel,
exact mode with ``quadrature="left"``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..exceptions import UnsupportedError
from .batches import n_rows
from .curvature import Curvature, product
from .exact import Engine
from .features import FeatureCache
from .outputs import OutputFn
from .rules import RULES, make_rule
from .steps import _check_finite, example_weights


def counterfactual(
    engine: Engine,
    inputs,
    target: torch.Tensor | None,
    output_fn: OutputFn,
    curvature: Curvature,
    *,
    projector=None,
    features: FeatureCache | None = None,
    own: torch.Tensor | None = None,
    first_order: bool = False,
) -> torch.Tensor:
    """Counterfactual scores of n queries against every training example.

    Args:
        engine: The engine (model, path, training set, loss).
        inputs: The queries' inputs, each (n, ...).
        target: Per-query target (n,), or None.
        output_fn: The explained output ``output_fn(outputs, target) -> (n,)``.
        curvature: How a step's gradient responds to the weights before it.
        projector: Project the training-side dot products (None: exact dot products).
        features: Cache of projected training features, shared with exact mode.
        own: With ``own`` (n,) training indices, only score[q, own[q]] is computed and
            returned, (n,): each query is a training example and its own effect is wanted.
        first_order: The test switch that removes all second-order terms (module docstring).

    Returns:
        (n, n_train) scores d f(x_q; w_S)/d ε_i, or (n,) with ``own``.

    Raises:
        UnsupportedError: Only some parameters are differentiated (``layers``), or the path's
            optimizer has no exact rule.
    """
    fm, path, p = engine.fm, engine.p.path, engine.p
    if fm.partial:
        raise UnsupportedError(
            "counterfactual scores differentiate the whole training run, so every trained "
            "parameter must be differentiated: drop layers="
        )
    rule = make_rule(path, engine.vectors, fm.active_names)
    n, S, dtype, device = n_rows(inputs), len(path), fm.dtype, fm.device
    if own is None:
        out = torch.zeros(n, engine.n_train, dtype=dtype, device=device)
    else:
        out = torch.zeros(n, dtype=dtype, device=device)
        position = torch.full((engine.n_train,), -1, dtype=torch.int64)
        position[own.cpu()] = torch.arange(n)
    w_next = fm.flatten(path.final)
    lam_w = _query_gradients(fm, w_next, inputs, target, output_fn, S, path)
    lam_state = tuple(torch.zeros_like(lam_w) for _ in range(rule.counterfactual_state()))
    step = path.step(S - 1) if S else None
    for s in tqdm(range(S - 1, -1, -1), desc="steps", disable=not p.show_progress):
        previous = path.step(s - 1) if s > 0 else None
        w = fm.flatten(step.params)
        delta = w_next - w
        indices = step.indices
        kappa = example_weights(step.batch_sizes, p.reduction, p.accumulation)
        kappa = kappa.to(dtype=dtype, device=device)
        batch = engine._batch(indices)
        sign, lam = rule.coefficients(step)
        if projector is None:
            grads = fm.loss_grads(w, batch, p.loss_fn)  # (B, d)
            _check_finite(grads, "training gradient", s, path)
            gradient = kappa @ grads
            feats = None
        else:
            grads = None
            feats, gradient = _projected(engine, projector, features, s, w, batch, kappa)
        G = sign * gradient + lam * w
        if first_order:
            lam_w = _query_gradients(fm, w, inputs, target, output_fn, s, path)
        point = (w, rule.state_point(step, previous, w, delta, G), G)
        a_w, lam_state, a_G = rule.step_vjp(step, point, lam_w, lam_state, first_order)
        if step.fresh_state:  # the state before this step was not the one after the last
            lam_state = tuple(torch.zeros_like(t) for t in lam_state)
        u = a_G * sign  # (n, d): the adjoint of the batch gradient Σ_j κ_j g_j
        _check_finite(u, "counterfactual adjoint", s, path)
        dots = None
        if own is None:
            dots = u @ grads.T if feats is None else projector.project(u) @ feats.T
            out.index_add_(1, indices.to(device), dots * kappa)
        else:
            rows = position[indices]
            keep = rows >= 0
            if bool(keep.any()):
                mine = u[rows[keep].to(device)]
                if feats is None:
                    values = (mine * grads[keep.to(device)]).sum(1)
                else:
                    values = (projector.project(mine) * feats[keep.to(feats.device)]).sum(1)
                out.index_add_(0, rows[keep].to(device), values * kappa[keep.to(device)])
        if not first_order and s > 0:
            exact_dots = dots if feats is None else None
            curved = product(curvature, fm, w, batch, p.loss_fn, kappa, u, grads, exact_dots)
            lam_w = a_w + lam * a_G + curved
        w_next, step = w, previous
    return out  # (the explainer runs the step check once, as for its other scores)


def _query_gradients(fm, w, inputs, target, output_fn, s, path) -> torch.Tensor:
    """∇_w f(x_q; w) of every query, (n, d)."""
    grads, values = fm.output_grads(w[None], inputs, target, output_fn)
    _check_finite(values, "query output", s, path)
    _check_finite(grads, "query gradient", s, path)
    return grads[0]


def _projected(engine: Engine, projector, features, s, w, batch, kappa):
    """The step's projected training features (B, k) and its batch gradient Σ κ_j g_j (d,).

    Kept in ``features`` under exact mode's keys (the same numbers), so either mode reuses
    what the other computed.
    """
    fm, loss_fn = engine.fm, engine.p.loss_fn
    if features is None:
        features = FeatureCache(dtype=fm.dtype, device=fm.device)
    if f"f{s}" in features and features.unverified:  # a cache from an earlier session
        features.verify(f"f{s}", projector.training_features(w, batch, loss_fn))
    if f"f{s}" in features:
        feats = features[f"f{s}"]
    else:
        feats = projector.training_features(w, batch, loss_fn)
        _check_finite(feats, "projected training gradient", s, engine.p.path)
        feats = features.keep(f"f{s}", feats)
    if f"g{s}" in features:
        gradient = features[f"g{s}"]
    else:
        gradient = features.keep(f"g{s}", fm.batch_grad(w, batch, loss_fn, kappa))
    feats = feats.to(fm.device)
    return feats.to(fm.dtype), gradient.to(fm.device, fm.dtype)


def refuse(mode: str, reasons: list[str]) -> None:
    """Raise the error for counterfactual scores on a path exact mode cannot explain.

    Raises:
        UnsupportedError: Always; the message names why the path is not exact.
    """
    why = "; ".join(reasons) or "its optimizer has no exact rule"
    raise UnsupportedError(
        "counterfactual scores differentiate every recorded optimizer step, but this "
        f"explainer runs in {mode} mode ({why}): record the run with PathRecorder(every=1) "
        f"and an optimizer that has an exact rule ({', '.join(RULES)})"
    )
