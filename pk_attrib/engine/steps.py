"""The training side of a sweep: each step's examples, their gradients, and the step check.

A step credits its batch's examples through their gradients at w_s: each example's own loss
gradient, evaluated independently in eval mode (`FunctionalModel.loss_grads`, weighted by the
loss's reduction κ), or, for a replayed path (dropout, BatchNorm, a batch loss: see
`pk_attrib.engine.replay`), its term of the step's own batch gradient. The step check
rebuilds each recorded step from that gradient (`TrainingSteps.check_steps`); what it does not
rebuild is reported (`ReconstructionWarning`), never dropped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..exceptions import IndexOutOfRangeError, NonFiniteError, ReconstructionWarning
from ..record.path import TrainingPath
from .batches import gather_examples
from .functional import FunctionalModel
from .outputs import NotBatchFirst, Reduction
from .replay import detect
from .rules import make_rule

WARN_RECONSTRUCTION = {torch.float64: 1e-4, torch.float32: 1e-3}


@dataclass
class Problem:
    """Everything a decomposition needs besides the queries."""

    fm: FunctionalModel
    path: TrainingPath
    train_dataset: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reduction: Reduction
    accumulation: str | int
    show_progress: bool


def _check_finite(tensor: torch.Tensor, what: str, step: int | None, path: TrainingPath) -> None:
    """Raise `NonFiniteError` if ``tensor`` holds NaN or inf, naming where the run diverged.

    The sweep walks backwards, so the first non-finite value it meets is near the end of a
    diverged run: the path is then read forwards for the first step whose weights are not
    finite (only in this case).
    """
    if bool(torch.isfinite(tensor.sum())):  # one pass; NaN and inf propagate
        return
    diverged = path.first_non_finite()
    if diverged is None:
        cause = (
            "the path's weights are finite, so the inputs or labels hold NaN/inf, or a "
            "computation overflowed (the model on these inputs, or a huge recorded learning "
            "rate or optimizer setting): check the data and the recorded run"
        )
    else:
        cause = (
            f"the training run diverged: its weights are not finite from step {diverged} on "
            f"(after optimizer step {diverged - 1}); explain a path that stays finite (record "
            "a run that does not diverge, or explain up to the step before)"
        )
    where = "" if step is None else f" at step {step}"
    raise NonFiniteError(f"non-finite {what}{where}: {cause}")


def example_weights(batch_sizes: torch.Tensor, reduction: Reduction, accumulation: str | int):
    """κ_j for each index of a step: the weight of ℓ_j in the gradient the optimizer used.

    ``accumulation``: "sum", "mean" (over the step's micro-batches) or an int divisor.
    """
    sizes = batch_sizes.to(torch.float64)
    per = 1.0 / sizes if reduction is Reduction.MEAN else torch.ones_like(sizes)
    if accumulation == "mean":
        per = per / len(sizes)
    elif not isinstance(accumulation, str):
        per = per / accumulation
    return torch.repeat_interleave(per, batch_sizes)


class TrainingSteps:
    """What an engine knows of the training side of each step (a mixin of `Engine`).

    Needs ``self.p`` (the `Problem`), ``self.fm``, ``self.n_train``, ``self.vectors``,
    ``self.replay`` and ``self.replay_why``.
    """

    def prepare_replay(self) -> None:
        """Decide, from the first micro-batch, whether training steps are replayed.

        They are when the path holds each micro-batch's random-number state and the model
        runs otherwise in train mode (dropout, BatchNorm) or the loss is not a sum of
        per-example losses (`replay.detect`); each example's share is then its term of the
        step's own batch gradient. Otherwise examples are evaluated independently, in eval
        mode, as before.
        """
        path = self.p.path
        if not len(path) or path.step(0).indices is None:
            return
        step = path.step(0)
        first = step.indices[: int(step.batch_sizes[0])]
        kappa = example_weights(step.batch_sizes[:1], self.p.reduction, "sum")
        self.replay, self.replay_why = detect(
            self.fm, step, self._batch(first), self.p.loss_fn, self.p.reduction, kappa
        )

    def kappa(self, step) -> torch.Tensor:
        """κ_j of each index of the step (a replayed step's terms carry the loss's reduction)."""
        reduction = Reduction.SUM if self.replay is not None else self.p.reduction
        kappa = example_weights(step.batch_sizes, reduction, self.p.accumulation)
        return kappa.to(dtype=self.fm.dtype, device=self.fm.device)

    def replayed_terms(self, step, w_full: torch.Tensor, keep=None) -> torch.Tensor:
        """Each example's term of the replayed step's gradient, (B, d_active) (or kept rows).

        Args:
            step: The step (its micro-batches, random-number states and buffers).
            w_full: Its parameters, (d,).
            keep: (B,) bool: the rows wanted (None: all). Micro-batches without a kept row
                are not rerun.
        """
        sizes = step.batch_sizes.tolist()
        parts = torch.split(step.indices, sizes)
        kept = torch.split(keep, sizes) if keep is not None else [None] * len(parts)
        states, buffers = step.rng_states, step.buffers
        self.replay.modules = step.train_modules
        out = []
        for indices, wanted, state in zip(parts, kept, states, strict=True):
            if wanted is not None and not bool(wanted.any()):
                continue
            *inputs, labels = self._batch(indices)
            terms = self.replay.terms(w_full, inputs, labels, buffers, state)
            out.append(terms if wanted is None else terms[wanted.to(terms.device)])
        if not out:
            return torch.zeros(0, self.fm.d_active, dtype=self.fm.dtype, device=self.fm.device)
        return out[0] if len(out) == 1 else torch.cat(out)

    def step_gradient(self, step, w_full: torch.Tensor) -> torch.Tensor:
        """Σ_j κ_j g_j(w_s): the gradient the step's examples gave the optimizer, (d_active,)."""
        fm, p = self.fm, self.p
        kappa = self.kappa(step)
        if self.replay is not None:  # one backward pass per micro-batch, as training did
            self.replay.modules = step.train_modules
            sizes = step.batch_sizes.tolist()
            total = torch.zeros(fm.d_active, dtype=fm.dtype, device=fm.device)
            for indices, weights, state in zip(
                torch.split(step.indices, sizes), torch.split(kappa, sizes), step.rng_states,
                strict=True,
            ):  # fmt: skip
                *inputs, labels = self._batch(indices)
                scale = weights[0] if len(weights) else 0.0  # (one weight a micro-batch)
                total += scale * self.replay.gradient(w_full, inputs, labels, step.buffers, state)
            return total
        batch = self._batch(step.indices)
        try:
            return fm.batch_grad(w_full, batch, p.loss_fn, kappa)
        except NotBatchFirst:  # outputs without a row per example: one at a time
            return kappa @ fm.loss_grads(w_full, batch, p.loss_fn)

    def _batch(self, indices: torch.Tensor):
        if indices.numel() and int(indices.max()) >= self.n_train:
            raise IndexOutOfRangeError(
                f"the path's batch indices reach {int(indices.max())}, but train_dataset has "
                f"{self.n_train} examples: the recording noted indices into another dataset "
                "(record_batch without dataset_size= checks no bound); pass the dataset the "
                "recorder watched, in the same order"
            )
        return self.fm.cast(gather_examples(self.p.train_dataset, indices))

    def check_steps(self) -> torch.Tensor:
        """The step check alone: each recorded step against the one its batch rebuilds.

        What `exact` computes along the way, for callers whose sweeps cover a block of
        training examples at a time and so never hold a whole batch's gradient (the Captum
        methods): one batched backward pass per step gives Σ_j κ_j g_j(w_s), from which the
        optimizer's rule rebuilds Δ̂_s. It does not depend on any query.

        Returns:
            The step reconstruction error of each step, float64 (S,) (NaN where the check has
            nothing to compare).
        """
        fm, path, p = self.fm, self.p.path, self.p
        rule = make_rule(path, self.vectors, fm.active_names)
        S = len(path)
        w_next = fm.flatten(path.final) if S else None
        for s in tqdm(range(S - 1, -1, -1), desc="step check", disable=not p.show_progress):
            step = path.step(s)
            w_full = fm.flatten(step.params)
            grad = self.step_gradient(step, w_full)
            _check_finite(grad, "training gradient", s, self.p.path)
            sign, lam = rule.coefficients(step)
            w = fm.active(w_full)
            # (no (d,) temporaries for a sign of one and no weight decay)
            G = grad if _is_one(sign) else sign * grad
            G = G if _is_zero(lam) else G + lam * w
            del grad
            rule.finish_step(s, step, fm.active(w_next - w_full), G, w)
            w_next = w_full
        return torch.tensor([rule.errors.get(s, math.nan) for s in range(S)], dtype=torch.float64)

    def _block_train_grads(self, path, steps, flat) -> dict[int, torch.Tensor]:
        """Per-example gradients of the batches of several steps, in one vmap call."""
        parts = [path.step(j).indices for j in steps]
        indices = torch.cat(parts)
        batch = self._batch(indices)
        if len({len(idx) for idx in parts}) == 1:  # batches of one size: steps as a dimension
            ws = torch.stack([flat[j] for j in steps])
            grads = self.fm.loss_grads_by_step(ws, batch, self.p.loss_fn)
        else:
            ws = torch.cat([flat[j].expand(len(i), -1) for j, i in zip(steps, parts, strict=True)])
            grads = self.fm.loss_grads_at(ws, batch, self.p.loss_fn)
        return dict(zip(steps, torch.split(grads, [len(idx) for idx in parts]), strict=True))

    def _warn_reconstruction(self, errors: torch.Tensor, stacklevel: int = 4) -> None:
        """Raise a `ReconstructionWarning` when a step's error passes the dtype's threshold."""
        limit = WARN_RECONSTRUCTION.get(self.fm.dtype, 1e-3)
        finite = errors[~errors.isnan()]
        if finite.numel() and float(finite.max()) > limit:
            worst = int(torch.argmax(torch.nan_to_num(errors, nan=-1.0)))
            warnings.warn(
                f"the recorded steps are not rebuilt by the example gradients: step "
                f"reconstruction error up to {float(finite.max()):.2e} (step {worst}; "
                f"threshold {limit:g} for {self.fm.dtype}). Usual causes: dropout or data "
                "augmentation in training, BatchNorm in train mode, gradient clipping, a loss "
                "reduction or accumulation other than the one given, per-example loss weights "
                "(class weights, ignore_index), parameters trained by another optimizer than "
                "the recorded one, a parameter frozen (requires_grad=False) while its .grad "
                "stayed a zero tensor (zero_grad(set_to_none=False)), a model that changes its "
                "weights in forward (Embedding(max_norm=...)), a model whose output for an "
                "example depends on the rest of its batch, or wrong indices. What the example "
                "gradients do not rebuild is the "
                "'unexplained' term of the bias (and `delta` holds what the output change "
                "along the path does not match)",
                ReconstructionWarning,
                stacklevel=stacklevel,
            )


def _is_one(x: torch.Tensor | float) -> bool:
    """Whether ``x`` is the scalar 1 (a step's sign without ``maximize``)."""
    return (not isinstance(x, torch.Tensor) or x.dim() == 0) and float(x) == 1.0


def _is_zero(x: torch.Tensor | float) -> bool:
    """Whether ``x`` is the scalar 0 (no coupled weight decay)."""
    return (not isinstance(x, torch.Tensor) or x.dim() == 0) and float(x) == 0.0
