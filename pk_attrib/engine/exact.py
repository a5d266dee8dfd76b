"""The decomposition engine: a training path and queries in, a `Decomposition` out.

Exact mode (see docs/mathematics.md) walks the steps backwards. At step s it

1. integrates the query gradient along the step (φ_s, `quadrature`), checked against the
   exact output change f(x; w_{s+1}) − f(x; w_s);
2. turns φ_s into the adjoint v_s of the effective gradient G_s (`rules`);
3. computes the per-example loss gradients of the step's batch at w_s and adds
   −σ κ_j v_s · g_j to each example's contribution;
4. checks the step: Δ_s against Δ̂_s rebuilt from those gradients.

Checkpoint mode uses the left endpoint and plain gradients (TracIn):
c_i(x) ≈ −Σ_k η_k ∇f(x; w_k) · g_i(w_k).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..decomposition import Decomposition, Diagnostics
from ..exceptions import (
    QuadratureWarning,
    UnsupportedError,
)
from .batches import n_rows
from .buffers import MovingBuffers
from .example_grads import DenseGrads, LayerGrads, NodeFactors, StepGrads, per_parameter
from .features import FeatureCache
from .outputs import OutputFn, read_outputs
from .quadrature import LADDER, QuadratureRule, StepIntegrator
from .replay import Replay
from .rules import GroupVectors, make_rule
from .steps import Problem, TrainingSteps, _check_finite, _is_one, _is_zero

# the gradients one batched call may hold (the query and training gradients of a block of
# steps, a chunk of checkpoint-mode self-influence): a working set the allocator recycles
BLOCK_BYTES = 32 << 20


@dataclass
class _Sums:
    """What a sweep accumulates over the steps, for n queries and a block of b columns."""

    contributions: torch.Tensor  # (n, b)
    decay: torch.Tensor  # (n,) the weight-decay term of the bias
    explained_exact: torch.Tensor  # (n,) Σ_s −v_s·G_s, exact also when scores are projected
    norms: dict | None  # cosine energies, see `Engine.exact`


@dataclass
class _StepBatch:
    """Step s of a sweep: where it starts, its adjoint and the examples it credits."""

    s: int
    step: object  # the path's Step
    w_full: torch.Tensor  # (d,) w_s, every coordinate
    w: torch.Tensor  # (d_active,) the differentiated coordinates of w_s
    delta: torch.Tensor  # (d_active,) Δ_s on them
    v: torch.Tensor  # (n, d_active) the adjoint of the effective gradient
    sign: torch.Tensor  # σ: the effective gradient is σ Σ_j κ_j g_j + λ w
    lam: torch.Tensor  # λ (coupled weight decay), 0-dim or (d_active,)
    all_indices: torch.Tensor  # (B,) the batch's dataset indices
    all_kappa: torch.Tensor  # (B,) their weights κ_j
    keep: torch.Tensor | None  # (B,) bool: those in the block of columns (None: all)
    indices: torch.Tensor  # (m,) the kept ones, as block columns
    kappa: torch.Tensor  # (m,) their weights


class Engine(TrainingSteps):
    """Runs exact and checkpoint decompositions for a `Problem`."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.fm = problem.fm
        self.n_train = len(problem.train_dataset)
        self.vectors = GroupVectors(
            problem.path, self.fm.active_names, self.fm.dtype, self.fm.device
        )
        # steps where the adaptive quadrature ran out of nodes in sweeps over blocks of
        # columns (influence, self-influence): their callers warn once for all blocks
        self.unconverged: set[int] = set()
        # the steps' forward passes rerun as training ran them (see `prepare_replay`)
        self.replay: Replay | None = None
        self.replay_why = ""
        # a sweep whose work is split over ranks (pk_attrib.explain.distributed), while it runs
        self.shard = None
        # how each step's per-example gradients are held (dense, or by layer for large models)
        self.step_grads = StepGrads(self.fm, problem.loss_fn, self._batch, self.n_train)

    def _moving_buffers(self) -> MovingBuffers | None:
        """The buffers' part of each step, when the path's buffers move (BatchNorm)."""
        if not hasattr(self, "_moving"):
            path = self.p.path
            self._moving = None
            if len(path) and MovingBuffers.moving(self.fm, path):
                self._moving = MovingBuffers(self.fm, path, self.replay)
                self._moving._batch = self._batch
        return self._moving

    def _forward(self, w, inputs, target, output_fn) -> torch.Tensor:
        return self._forward_and_scale(w, inputs, target, output_fn)[0]

    def _forward_and_scale(self, w, inputs, target, output_fn):
        """The explained outputs f (n,) and the largest |model output| per query (n,).

        The second bounds the rounding of f: a loss or a log-probability computed from
        logits carries the logits' rounding (~eps·|logit|), however small f itself is.
        """
        outputs = self.fm.outputs(w, inputs)
        f = output_fn(outputs, target).reshape(-1)
        scale = torch.zeros_like(f)
        for t in read_outputs(outputs, target, output_fn):
            if t.dim() and t.shape[0] == len(f) and t.numel():
                largest = t.detach().abs().reshape(len(f), -1).amax(1).to(f.dtype)
                scale = torch.maximum(scale, largest)
        return f, scale

    # -- exact ----------------------------------------------------------------------------

    def exact(
        self,
        inputs,
        target,
        output_fn: OutputFn,
        quad: QuadratureRule,
        kernel: bool,
        columns: tuple[int, int] | None = None,
        projector=None,
        features: FeatureCache | None = None,
        reconstruct: bool = True,
        norms: dict | None = None,
    ):
        """Exact decomposition by the backward adjoint sweep.

        With ``columns=(a, b)`` only the contributions of training examples a..b−1 are
        computed and returned, as an (n, b − a) tensor (for streaming over the training set;
        no reconstruction check, no bias).

        With a ``projector``, contributions are −κ (P σv)·(P g) (unbiased); training-side
        features P g are kept in ``features`` (step -> (B, K)) for reuse across query chunks.
        Prediction, bias and Σ φ·Δ stay exact: the batch gradient is taken whole, so the
        projection noise shows in ``delta`` only.

        ``reconstruct=False`` skips the step check (Δ_s rebuilt from the example gradients,
        which does not depend on the queries): ``diagnostics.reconstruction_error`` is then
        NaN and no `ReconstructionWarning` is raised. For the query chunks after the first.

        ``norms`` (an empty dict, with ``columns``) receives the two sides' energies over the
        steps that used each example, for cosine scores: ``norms["query"]`` (n, b − a) =
        Σ_{s∋j} κ_j ‖σ v_s‖² and ``norms["train"]`` (b − a,) = Σ_{s∋j} κ_j ‖g_j(w_s)‖² (of
        the projected vectors with a ``projector``), so that |c_j| ≤ sqrt(query · train).
        """
        fm, path, p = self.fm, self.p.path, self.p
        if kernel and self.replay is not None:
            raise UnsupportedError(
                "the path kernel pairs the query with each training example's own gradient, "
                f"but this path's steps are replayed ({self.replay_why}): an example's share "
                "is its term of the batch's gradient, with no kernel of its own. Use the "
                "contributions (kernel=False)"
            )
        rule = make_rule(path, self.vectors, fm.active_names)
        fm.routes.clear()  # (diagnostics: the routes this sweep takes)
        n, S = n_rows(inputs), len(path)
        dtype, device = fm.dtype, fm.device
        first, last = columns if columns is not None else (0, self.n_train)
        contributions = torch.zeros(n, last - first, dtype=dtype, device=device)
        if norms is not None:
            if columns is None or kernel:
                raise ValueError("norms are computed for a block of columns, without the kernel")
            norms["query"] = torch.zeros_like(contributions)
            norms["train"] = torch.zeros(last - first, dtype=dtype, device=device)
        zeros = torch.zeros(n, dtype=dtype, device=device)
        sums = _Sums(contributions, zeros.clone(), zeros.clone(), norms)
        kern = weights_num = None
        w_next = fm.flatten(path.final)
        f_next, m_next = self._forward_and_scale(w_next, inputs, target, output_fn)
        prediction = f_next
        _check_finite(prediction, "output of the final model", S, self.p.path)
        moving = self._moving_buffers()
        if moving is not None:  # the initial model with its own buffers
            fm.use_buffers(moving.at(0))
        f_initial = self._forward(fm.flatten(path.initial), inputs, target, output_fn)
        share = quad.rtol * (prediction - f_initial).abs() / max(S, 1)
        buffers_term = zeros.clone()

        def step_done(s, step, w_full, f_s, m_s, tol, keep, kept_columns):
            """The buffers' part of step s (if they move), then the next step starts."""
            nonlocal w_next, f_next, m_next, phi_delta, buffers_term
            if moving is not None:
                parts, rest, moved, f_s, _ = moving.step(
                    s, step, w_full, inputs, target, output_fn, f_s, tol, keep
                )
                contributions.index_add_(1, kept_columns.to(device), parts)
                sums.explained_exact += parts.sum(1)
                phi_delta += moved
                buffers_term += rest
            w_next, f_next, m_next = w_full, f_s, m_s

        integrator = StepIntegrator(fm, quad, inputs, target, output_fn, self.shard)
        # plain SGD on the layer route reads φ through dot products only: it may stay factored
        integrator.factored = (
            columns is None and not kernel and projector is None and self.replay is None
            and moving is None
        )  # fmt: skip
        phi_delta = zeros.clone()
        nodes = torch.zeros(S, dtype=torch.int64)
        train_evals = 0
        flat: dict[int, torch.Tensor] = {}
        train_grads: dict[int, torch.Tensor] = {}
        size, climbs = 1, 0
        # steps integrated per batched call: their query gradients (2 nodes a step at first)
        # and training gradients stay within a working set the allocator recycles; larger
        # ones fault in fresh pages
        per_step = (n if self.shard is None else self.shard.rows) * fm.d * dtype.itemsize
        block = max(1, min(16, BLOCK_BYTES // (2 * per_step), fm.memory_budget // (12 * per_step)))
        if moving is not None:  # each step's query gradients at its own buffers
            block = 1
        example_bytes = fm.d_active * dtype.itemsize  # a training gradient
        # (their vmap call holds a few times the gradients it returns: within the budget)
        train_block = min(BLOCK_BYTES, fm.memory_budget // 4)
        for s in tqdm(range(S - 1, -1, -1), desc="steps", disable=not p.show_progress):
            step = path.step(s)
            if moving is not None:  # the weights' part of the step, at the buffers after it
                fm.use_buffers(moving.at(s + 1))
            by_layer = (
                not kernel
                and projector is None
                and self.replay is None
                and self.step_grads.by_layer(step)
            )
            if columns is None and s not in flat:  # integrate a block of steps in one call
                # shrink the block while steps keep needing more nodes (their share is wasted)
                size = max(1, size // 2) if integrator.climbs > climbs else min(block, 2 * size)
                climbs = integrator.climbs
                steps = list(range(max(0, s - size + 1), s + 1))
                batched = not kernel and projector is None and self.replay is None
                batched = batched and not by_layer  # (one batched pass per step instead)
                if batched:  # their training gradients, too
                    held = 0
                    for k in range(len(steps) - 1, -1, -1):
                        held += len(path.step(steps[k]).indices) * example_bytes
                        if held > train_block and k < len(steps) - 1:
                            steps = steps[k + 1 :]
                            break
                flat = {j: fm.flatten(path.step(j).params) for j in steps}
                flat[s + 1] = w_next
                integrator.prefetch([(flat[j], flat[j + 1] - flat[j]) for j in steps], steps)
                if batched:
                    train_grads = self._block_train_grads(path, steps, flat)
            w_full = flat.pop(s) if s in flat else fm.flatten(step.params)
            delta_full = w_next - w_full
            w, delta = fm.active(w_full), fm.active(delta_full)  # differentiated coordinates
            f_s, m_s = self._forward_and_scale(w_full, inputs, target, output_fn)
            _check_finite(f_s, "query output", s, self.p.path)
            change = f_next - f_s
            floor = rounding_floor(f_s, m_s, f_next, m_next)
            tol = torch.maximum(share, floor)
            indices = step.indices
            kappa = self.kappa(step)
            all_indices, all_kappa = indices, kappa
            keep = None
            if columns is not None:
                keep = (indices >= first) & (indices < last)
                indices, kappa = indices[keep] - first, kappa[keep.to(device)]
                # (sharded over columns: whether the step credits any rank's)
                credits = len(indices) > 0
                credits = credits if self.shard is None else self.shard.credits(step, credits)
                if not credits and rule.memoryless(step):
                    # nothing to attribute here and no state to carry: skip the query side
                    rule.begin(s, step, torch.zeros(n, fm.d_active, dtype=dtype, device=device), w)
                    step_done(s, step, w_full, f_s, m_s, tol, keep, indices)
                    continue
            phi = v = at = None  # (the last step's (n, d) go before this step's are made)
            phi, nodes[s] = integrator.integrate(w_full, delta_full, change, tol, s)
            along = phi @ delta  # (a NaN or inf anywhere in φ shows here: inf · 0 is NaN)
            _check_finite(along, "query gradient", s, self.p.path)
            phi_delta += along
            eta = None  # (set: v = η φ with φ kept as node factors)
            if isinstance(phi, NodeFactors):
                eta = rule.plain_scale(step) if by_layer else None
                phi = phi if eta is not None else phi.dense()
            if eta is None:
                v, extra = rule.begin(s, step, phi, w)
                if extra is not None:
                    sums.decay += extra
            sign, lam = rule.coefficients(step)
            if columns is not None and not len(indices):
                step_done(s, step, w_full, f_s, m_s, tol, keep, indices)
                continue
            if projector is not None:
                at = _StepBatch(
                    s, step, w_full, w, delta, v, sign, lam, all_indices, all_kappa, keep,
                    indices, kappa,
                )  # fmt: skip
                full = columns is None
                train_evals += self._projected_step(
                    at, sums, projector, features, rule, full, reconstruct
                )
                step_done(s, step, w_full, f_s, m_s, tol, keep, indices)
                continue
            held = self.step_grads.layer_grads(w_full, indices + first) if by_layer else None
            if held is not None:  # (factors of the layers, dense gradients of the rest)
                pass
            elif self.replay is not None:  # the terms of the step's own batch gradient
                held = DenseGrads(self.replayed_terms(step, w_full, keep))
            elif kernel:
                jac, dloss = fm.loss_jacobians(w_full, self._batch(indices + first), p.loss_fn)
                held = DenseGrads(torch.einsum("bc,bcd->bd", dloss, jac))
            elif s in train_grads:
                held = DenseGrads(train_grads.pop(s))
            else:
                held = DenseGrads(fm.loss_grads(w_full, self._batch(indices + first), p.loss_fn))
            _check_finite(held.finite_probe(), "training gradient", s, self.p.path)
            train_evals += len(indices)
            if eta is not None and isinstance(held, LayerGrads):  # both sides factored
                scale = per_parameter(eta * sign, held.offsets)
                scores = phi.dot_train(held.found, scale.__getitem__)
            else:
                if eta is not None:  # (a batch the layers could not take)
                    v, phi = eta * phi.dense(), phi.dense()
                    eta = None
                signed_v = v if _is_one(sign) else v * sign  # (σ on the (n, d) side)
                scores = held.dot(signed_v)
            _check_finite(scores, "training gradient dot product", s, self.p.path)
            contributions.index_add_(1, indices.to(device), -scores * kappa)
            if norms is not None:
                add_norms(norms, indices.to(device), kappa, (v * v).sum(1), held.squared_norms())
            if not _is_zero(lam):
                sums.decay -= v @ (lam * w) if eta is None else phi.dot(eta * lam * w)
            if kernel:
                k_step = torch.einsum("nd,bcd->nbc", v, jac * sign) * kappa[None, :, None]
                if kern is None:
                    shape = (n, self.n_train, k_step.shape[-1])
                    kern = torch.zeros(shape, dtype=dtype, device=device)
                    weights_num = torch.zeros_like(kern)
                kern.index_add_(1, indices.to(device), k_step)
                weights_num.index_add_(1, indices.to(device), -k_step * dloss[None])
            if columns is None and reconstruct:
                effective = held.weighted_sum(kappa)  # Σ_j κ_j σ g_j, for the step check
                effective = effective if _is_one(sign) else effective * sign
                rounding = None
                if self.replay is not None and self.replay.interacting:
                    # rows that interact (BatchNorm): checked with the batch's own gradient,
                    # as training had it, allowing what the two routes differ by (a bias the
                    # batch statistics cancel has a gradient of pure rounding, which Adam
                    # turns into a step of ±lr); rows that do not are checked like
                    # independent examples, with the sum of their terms
                    batch = sign * self.step_gradient(step, w_full)
                    rounding, effective = (effective - batch).abs(), batch
                rule.finish_step(s, step, delta, effective + lam * w, w, rounding)
            step_done(s, step, w_full, f_s, m_s, tol, keep, indices)
        _check_finite(contributions, "contributions", None, self.p.path)
        if moving is not None and columns is not None:
            fm.use_buffers(None)
        if columns is not None:  # (the caller warns once for all its blocks)
            self.unconverged.update(integrator.unconverged)
            return contributions
        errors = torch.tensor([rule.errors.get(s, math.nan) for s in range(S)], dtype=torch.float64)
        self._warn_reconstruction(errors)
        warn_unconverged(integrator.unconverged, "`delta`")
        explained = contributions.sum(1)
        # without projection the contributions are exact and add up to the explained part
        exact_total = explained if projector is None else sums.explained_exact
        decay = sums.decay
        # optimizer state from before the recording (a momentum buffer carried into step 0)
        carried = rule.initial_state_term(path.step(0)) if S else None
        state_term = torch.zeros_like(decay) if carried is None else carried
        unexplained = phi_delta - exact_total - decay - state_term - buffers_term
        terms = {
            "initial": f_next,
            "weight_decay": decay,
            "optimizer_state": state_term,
            "unexplained": unexplained,
        }
        if moving is not None:  # what moving buffers did that no example did
            terms["buffers"] = buffers_term
            fm.use_buffers(None)
        bias = f_next + decay + state_term + buffers_term + unexplained
        _check_finite(bias, "non-example terms of the bias", None, self.p.path)
        diagnostics = Diagnostics(
            "exact",
            quad.name,
            dtype,
            nodes,
            errors,
            integrator.evaluations,
            train_evals,
            fm.route or "vmap",
            dict(fm.routes),
        )
        k_out = w_out = None
        if kernel:
            k_out, w_out = _kernel_weights(kern, weights_num)
        return Decomposition(
            contributions,
            bias,
            prediction,
            prediction - bias - explained,
            terms,
            diagnostics,
            k_out,
            w_out,
        )

    def _projected_step(
        self,
        at: _StepBatch,
        sums: _Sums,
        projector,
        features: FeatureCache | None,
        rule,
        full: bool,
        reconstruct: bool,
    ) -> int:
        """One step of a projected sweep; returns the training gradients it evaluated.

        ``full``: the sweep covers every column, so the step's exact bookkeeping (the whole
        batch gradient, weight decay, the step check when ``reconstruct``) is done here too.
        """
        s, all_indices, kappa = at.s, at.all_indices, at.kappa
        fm, p = self.fm, self.p
        evals = 0
        if features is None:  # nothing to share: keep the step's tensors as they are
            features = FeatureCache(dtype=fm.dtype, device=fm.device)

        def fresh() -> torch.Tensor:  # the step's projected training gradients, (B, K)
            if self.replay is not None:  # (its terms, replayed, then projected)
                return projector.project(self.replayed_terms(at.step, at.w_full))
            return projector.training_features(at.w_full, self._batch(all_indices), p.loss_fn)

        if f"f{s}" in features and features.unverified:  # an earlier session's: check once
            features.verify(f"f{s}", fresh())
            evals = len(all_indices)
        if f"f{s}" not in features:  # once per step, whatever the number of query chunks
            feats = fresh()
            _check_finite(feats, "projected training gradient", s, self.p.path)
            evals = len(all_indices)
            feats = features.keep(f"f{s}", feats)
        else:
            feats = features[f"f{s}"]
        grad = None
        if full:  # the whole batch gradient, for the exact bookkeeping (one backward pass)
            if f"g{s}" in features:
                grad = features[f"g{s}"]
            else:
                grad = features.keep(f"g{s}", self.step_gradient(at.step, at.w_full))
        feats = feats.to(fm.device)  # as stored: every chunk sees the same numbers
        if at.keep is not None:
            feats = feats[at.keep.to(feats.device)]
        projected = projector.project(at.v if _is_one(at.sign) else at.v * at.sign)
        feats = feats.to(projected.dtype)
        scores = projected @ feats.T
        columns = at.indices.to(fm.device)
        sums.contributions.index_add_(1, columns, -scores * kappa)
        if sums.norms is not None:  # the bound of the projected inner product
            add_norms(sums.norms, columns, kappa, (projected**2).sum(1), (feats**2).sum(1))
        if full:  # (no (d,) temporaries for a sign of one and no weight decay)
            effective = grad.to(fm.device, fm.dtype)
            effective = effective if _is_one(at.sign) else effective * at.sign
            sums.explained_exact -= at.v @ effective
            if not _is_zero(at.lam):
                sums.decay -= at.v @ (at.lam * at.w)
                effective = effective + at.lam * at.w
            if reconstruct:  # the step check: the same for every query chunk
                rule.finish_step(s, at.step, at.delta, effective, at.w)
        return evals


def rounding_floor(f_s, m_s, f_next, m_next) -> torch.Tensor:
    """What rounding leaves of the exact change f(w_s+1) − f(w_s) a step is checked with, (n,).

    ``m_s``, ``m_next``: the largest |model output| the explained outputs f read (a loss or
    a log-probability carries its logits' rounding, however small f itself is).
    """
    return 16 * torch.finfo(f_s.dtype).eps * (f_s.abs() + f_next.abs() + m_s + m_next)


def warn_unconverged(steps, where: str, stacklevel: int = 4) -> None:
    """Raise a `QuadratureWarning` for steps the adaptive rule could not match.

    Args:
        steps: The step numbers (an iterable; may repeat).
        where: Where the remainder shows, for the message.
        stacklevel: As for `warnings.warn`.
    """
    if not steps:
        return
    steps = sorted(set(steps))
    warnings.warn(
        f"the adaptive quadrature reached its largest rule ({LADDER[-1]} nodes, or its "
        "finest split of a step at kinks) without matching the exact output change on "
        f"{len(steps)} step(s) (first: {steps[:5]}); the explained output is probably not "
        "smooth there in a way the quadrature does not split at (it splits where a ReLU, "
        "leaky ReLU, abs or max-pooling switches; not at a max, clamp, torch.where or a "
        f"discontinuity). The remainder is reported in {where}. Such steps cost up to "
        f"{LADDER[-1]} query gradients each: pass quadrature=q (say 4 or 8) to bound the cost, "
        "or use a smooth activation (GELU, SiLU) for an exact decomposition",
        QuadratureWarning,
        stacklevel=stacklevel,
    )


def add_norms(
    norms: dict,
    indices: torch.Tensor,
    kappa: torch.Tensor,
    query: torch.Tensor,
    train: torch.Tensor,
) -> None:
    """Accumulate one step's energies for cosine scores (see `Engine.exact`'s ``norms``).

    Args:
        norms: ``{"query": (n, b), "train": (b,)}``, accumulated in place.
        indices: Block columns of the step's examples, (m,).
        kappa: Their weights κ_j, (m,).
        query: Squared norms of the query-side vectors paired with the examples'
            gradients, (n,).
        train: Squared norms of the examples' gradients (or projected gradients), (m,).
    """
    norms["query"].index_add_(1, indices, query[:, None] * kappa)
    norms["train"].index_add_(0, indices, train * kappa)


def _kernel_weights(kern: torch.Tensor, num: torch.Tensor):
    """A = num / K where |K| is not negligible, else 0; squeeze C = 1."""
    big = kern.abs().amax() if kern.numel() else torch.tensor(0.0)
    ok = kern.abs() > 1e-12 * big
    weights = torch.where(ok, num / torch.where(ok, kern, torch.ones_like(kern)), 0.0)
    if kern.shape[-1] == 1:
        return kern[..., 0], weights[..., 0]
    return kern, weights
