"""Replay: each step's forward pass rerun as training ran it, and the gradient of each term.

A step's batch loss is L(w) = loss_fn(model(x_batch; w, ξ), y_batch), where ξ is the step's
randomness (dropout masks) and the model runs in train mode (BatchNorm uses the batch's
statistics). The recorder kept the random-number state each micro-batch started from
(`Step.rng_states`), so the forward pass can be rerun drawing the same masks. With
c = ∂L/∂O at the step's outputs O (the user's own loss, any reduction: token means with
``ignore_index``, class weights, label smoothing), example j's term of the gradient is

    g_j = ∇_w (c_j · O_j(w)),      Σ_j g_j = Jᵀ c = ∇_w L  (exactly: the step's gradient)

— for models whose rows do not interact, one vector-Jacobian product per example with its row
of c (per-example `vmap`, the recorded masks as inputs); for models whose rows interact
(train-mode BatchNorm), the same product through the whole batch, once per term (`vmap` over
the cotangents of one batched VJP). The engine then credits example j with its g_j, weighted
only by how micro-batches were accumulated (the loss's own reduction is inside g_j).

Dropout masks are captured while the batch is rerun: ``torch.nn.functional.dropout`` (and
``dropout1d/2d/3d``) is wrapped for the call, drawing its mask on a tensor of ones (the same
draws, in the same order, as training's call) and multiplying; the per-example and batched
products then multiply by the recorded masks instead of drawing. Other random operations in
the forward pass are not replayed: the step check reports what they change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp, vmap
from torch.utils import _pytree as pytree

from .batches import n_rows, one_row, take
from .functional import FunctionalModel
from .outputs import NotBatchFirst, Reduction

_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d")
_state = threading.local()  # the masks being recorded or replayed, in call order


@contextlib.contextmanager
def _masks(record: list | None = None, replay: list | None = None) -> Iterator[None]:
    """Wrap F.dropout*: record each call's mask, or multiply by the next recorded one."""
    originals = {name: getattr(F, name) for name in _DROPOUTS}

    def wrapped(name: str) -> Callable:
        original = originals[name]

        def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F's names
            if not training or p == 0 or input.numel() == 0:
                return input  # (no draw: as F.dropout)
            if replay is not None:
                return input * replay[_state.position.__next__()]
            mask = original(torch.ones_like(input), p, True, False)
            record.append(mask)
            return input * mask

        return dropout

    _state.position = iter(range(1 << 62))
    for name in _DROPOUTS:
        setattr(F, name, wrapped(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module, modules: bool | frozenset[str] = True) -> Iterator[None]:
    """The modules in train mode as training had them, running statistics left alone.

    Args:
        model: The model.
        modules: True (every module trains), or the names of those that do (`Step`'s
            ``train_modules``).

    In train mode BatchNorm normalizes by the batch's statistics whatever its running ones;
    not updating them keeps a replay from changing the buffers (and torch.func's transforms
    refuse the in-place update).
    """
    norm = torch.nn.modules.batchnorm._NormBase
    modes = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    for name, module in model.named_modules():
        module.training = modules is True or name in modules
        if module.training and isinstance(module, norm):
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, mode, tracked in modes:
            module.training = mode
            if tracked is not None:
                module.track_running_stats = tracked


@contextlib.contextmanager
def _rng(states: tuple[torch.Tensor, ...], devices: list[int]) -> Iterator[None]:
    """Run from a recorded random-number state, leaving the caller's generators as they were."""
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(states[0])
        for device, state in zip(devices, states[1:], strict=False):
            torch.cuda.set_rng_state(state, device)
        yield


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the rounding of a forward pass (per-row and batched kernels differ by it)."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    scale = a.abs() + b.abs() + a.abs().amax()
    return bool(((a - b).abs() <= 64 * eps * scale).all())


class Replay:
    """Per-term gradients of recorded steps, from their forward passes rerun in train mode.

    Args:
        fm: The functional model (its module is switched to train mode for a replay only).
        loss_fn: The training loss, applied to a micro-batch's outputs as training did.
        reduction: How a loss that returns one value per element is reduced to the batch
            loss (``loss_fn`` returning a scalar is used as it is).
        interacting: The rows of a batch interact in train mode (BatchNorm): each term's
            gradient then goes through the whole batch.
    """

    def __init__(
        self, fm: FunctionalModel, loss_fn: Callable, reduction: Reduction, interacting: bool
    ):
        self.fm = fm
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.interacting = interacting
        self.devices = [fm.device.index or 0] if fm.device.type == "cuda" else []
        self.modules: bool | frozenset[str] = True  # in train mode: set per step replayed

    # -- the batch, rerun ----------------------------------------------------------------

    def _params(self, w: torch.Tensor, buffers: dict[str, torch.Tensor]):
        """The arguments of functional_call: constants, buffers as the step had them, w."""
        fm = self.fm
        own = {n: b.clone() for n, b in fm._own_buffers.items()}  # (BatchNorm updates them)
        for name, value in buffers.items():
            if name in own:
                own[name] = value.to(device=own[name].device, dtype=own[name].dtype)
        return {**fm.constants, **own, **fm.unflatten(w)}

    def batch_loss(self, outputs: Any, labels: Any) -> torch.Tensor:
        """The micro-batch's loss as training computed it (a scalar)."""
        loss = self.loss_fn(outputs, labels)
        if loss.numel() == 1:
            return loss.reshape(())
        return loss.mean() if self.reduction is Reduction.MEAN else loss.sum()

    def forward(self, w, inputs, buffers, state=None, masks=None, train=True):
        """The micro-batch's outputs at w; with ``state``, recording the dropout masks drawn.

        Returns:
            ``(outputs, masks)``: the model's outputs and the masks (a list, call order).
        """
        record = [] if masks is None else None
        args = self._params(w, buffers)
        mode = _train_mode(self.fm.model, self.modules) if train else contextlib.nullcontext()
        rng = _rng(state, self.devices) if state is not None else contextlib.nullcontext()
        with torch.no_grad(), mode, rng, _masks(record=record, replay=masks):
            outputs = functional_call(self.fm.model, args, tuple(inputs))
        return outputs, (masks if masks is not None else record)

    def cotangents(self, outputs: Any, labels: Any) -> tuple[list[int], list[torch.Tensor]]:
        """The cotangent ∂L/∂O of each output tensor the loss reads: (leaf positions, tensors).

        Raises:
            NotBatchFirst: The loss reads an output without a row per example.
        """
        flat, spec = pytree.tree_flatten(outputs)
        where = [
            j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        with torch.enable_grad():
            probes = [flat[j].detach().requires_grad_() for j in where]
            tree = list(flat)
            for j, probe in zip(where, probes, strict=True):
                tree[j] = probe
            loss = self.batch_loss(pytree.tree_unflatten(tree, spec), labels)
            grads = torch.autograd.grad(loss, probes, allow_unused=True)
        n = n_rows(labels)
        read = [(j, g) for j, g in zip(where, grads, strict=True) if g is not None]
        for _, g in read:
            if g.dim() == 0 or g.shape[0] != n:
                raise NotBatchFirst(
                    f"the loss reads an output of shape {tuple(g.shape)} for {n} examples: a "
                    "replayed step needs outputs with the batch dimension first"
                )
        return [j for j, _ in read], [g for _, g in read]

    # -- per-term gradients --------------------------------------------------------------

    def terms(self, w, inputs, labels, buffers, state) -> torch.Tensor:
        """Each example's term of the micro-batch's gradient, (B, d_active); they sum to ∇L."""
        fm = self.fm
        fm.routes["loss_fn"] = "replayed batch + row VJP"
        outputs, masks = self.forward(w, inputs, buffers, state)
        where, cots = self.cotangents(outputs, labels)
        params = self._params(w, buffers)
        act = {n: params[n] for n in fm.active_names}
        rest = {n: v for n, v in params.items() if n not in act}
        model, modules = fm.model, self.modules

        def linear(outs, cs) -> torch.Tensor:  # c · O over the outputs the loss reads
            flat = pytree.tree_leaves(outs)
            return sum((flat[j] * c).sum() for j, c in zip(where, cs, strict=True))

        if not self.interacting:

            def term(pa, x, cs, ms):
                with _train_mode(model, modules), _masks(replay=[m.unsqueeze(0) for m in ms]):
                    out = functional_call(model, {**rest, **pa}, one_row(x))
                return linear(out, [c.unsqueeze(0) for c in cs])

            g = fm._map(grad(term), (None, 0, 0, 0))(act, tuple(inputs), cots, masks)
            return fm._flat_grads(g, 1)

        def batch(pa):
            with _train_mode(model, modules), _masks(replay=masks):
                out = functional_call(model, {**rest, **pa}, tuple(inputs))
            return [pytree.tree_leaves(out)[j] for j in where]

        _, pullback = vjp(batch, act)
        n = n_rows(labels)
        eye = torch.eye(n, dtype=fm.dtype, device=fm.device)
        rows = [eye.reshape(n, n, *[1] * (c.dim() - 1)) * c.unsqueeze(0) for c in cots]
        (g,) = vmap(pullback)(rows)
        return fm._flat_grads(g, 1)

    def gradient(self, w, inputs, labels, buffers, state) -> torch.Tensor:
        """∇_w L of the micro-batch (one backward pass), (d_active,)."""
        fm = self.fm
        _, masks = self.forward(w, inputs, buffers, state)
        params = self._params(w, buffers)
        act = {n: params[n] for n in fm.active_names}
        rest = {n: v for n, v in params.items() if n not in act}

        def loss(pa):
            with _train_mode(fm.model, self.modules), _masks(replay=masks):
                out = functional_call(fm.model, {**rest, **pa}, tuple(inputs))
            return self.batch_loss(out, labels)

        return fm._flat_grads(grad(loss)(act), 0)


def detect(
    fm: FunctionalModel,
    step,
    batch: tuple,
    loss_fn: Callable,
    reduction: Reduction,
    kappa: torch.Tensor,
) -> tuple[Replay | None, str]:
    """Whether a path's steps must be replayed, from its first micro-batch.

    Replayed when the model runs otherwise in train mode than in eval mode (dropout,
    BatchNorm) or when the batch loss is not the reduction-weighted sum of per-example losses
    (a token mean over the batch's real tokens, class weights); the rows interact when one
    example's train-mode output differs from its row of the batch's (BatchNorm).

    Args:
        fm: The functional model.
        step: The path's first step (its parameters, buffers and random-number states).
        batch: ``(inputs..., labels)`` of the step's first micro-batch.
        loss_fn: The training loss.
        reduction: The declared (or read) reduction of ``loss_fn``.
        kappa: The reduction's per-example weights of that micro-batch, (B,).

    Returns:
        ``(replay or None, why)``: why replay is needed ("" when it is not).
    """
    states, modules = step.rng_states, step.train_modules
    if states is None or modules is None:  # recorded before they were kept
        return None, ""
    *inputs, labels = batch
    replay = Replay(fm, loss_fn, reduction, interacting=False)
    replay.modules = modules
    w = fm.flatten(step.params)
    buffers = step.buffers
    try:
        train, masks = replay.forward(w, inputs, buffers, states[0])
        evaluated, _ = replay.forward(w, inputs, buffers, train=False)
        where, _ = replay.cotangents(train, labels)  # (the outputs the loss reads, per row)
    except NotBatchFirst:
        return None, ""
    why = []
    read = [pytree.tree_leaves(train)[j] for j in where]
    if not all(
        _close(a, pytree.tree_leaves(evaluated)[j]) for a, j in zip(read, where, strict=True)
    ):
        why.append("the model runs otherwise in train mode (dropout, BatchNorm)")
    with torch.no_grad():
        whole = replay.batch_loss(train, labels)
        each = torch.stack(
            [
                loss_fn(take(train, slice(j, j + 1)), take(labels, slice(j, j + 1))).sum()
                for j in range(n_rows(labels))
            ]
        )
        parts = kappa.to(each) * each
    scale = parts.abs().sum()
    if bool((whole - parts.sum()).abs() > 64 * torch.finfo(each.dtype).eps * scale):
        why.append("the batch loss is not a sum of per-example losses")
    if not why:
        return None, ""
    rows = []
    for j in range(n_rows(labels)):
        row, _ = replay.forward(
            w, take(tuple(inputs), slice(j, j + 1)), buffers, masks=[m[j : j + 1] for m in masks]
        )
        rows.append(row)
    interacting = not all(
        _close(torch.cat([pytree.tree_leaves(r)[j] for r in rows]), pytree.tree_leaves(train)[j])
        for j in where
    )
    replay.interacting = interacting
    return replay, "; ".join(why)
