"""Checkpoint mode (TracIn): the left endpoint on a few checkpoints, no optimizer rule.

c_i(x) ≈ −Σ_k η_k ∇f(x; w_k) · g_i(w_k), summed over every training example at each
checkpoint of a `TrainingPath.from_checkpoints` path, or over the batch members of each
interval of a path recorded with ``every > 1``. With the same checkpoints and learning rates
this is Captum's TracInCP with ``test_loss_fn`` = the explained output, up to sign.
"""

from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm

from ..decomposition import Decomposition, Diagnostics
from ..record.path import Step
from .batches import n_rows, take
from .exact import BLOCK_BYTES, Engine, add_norms
from .factors import capture, dot_products, example_losses, squared_norms, verify_layers
from .layers import find_layers
from .outputs import NotBatchFirst, OutputFn
from .steps import _check_finite, example_weights


def decompose(
    engine: Engine,
    inputs,
    target,
    output_fn: OutputFn,
    columns: tuple[int, int] | None = None,
    cache: dict | None = None,
    norms: dict | None = None,
):
    """TracIn-style decomposition: c_i ≈ −Σ_k η_k ∇f(x; w_k) · g_i(w_k), (n, n_train).

    With ``columns=(a, b)``, only training examples a..b−1, returned as (n, b − a);
    ``cache`` (a dict kept by the caller) then holds the query gradients between blocks.
    ``norms`` (an empty dict, with ``columns``) receives ``"query"`` (n, b − a) =
    Σ_k κ ‖η_k ∇f(x; w_k)‖² and ``"train"`` (b − a,) = Σ_k κ ‖g_i(w_k)‖², as in `Engine.exact`.
    Checkpoint k is evaluated with the buffers it holds (`Step.buffers`), if any.
    """
    try:
        return _decompose(engine, inputs, target, output_fn, columns, cache, norms)
    finally:
        engine.fm.use_buffers(None)


def _decompose(engine, inputs, target, output_fn, columns, cache, norms):
    fm, path, p = engine.fm, engine.p.path, engine.p
    fm.routes.clear()  # (diagnostics: the routes this sweep takes)
    n, S = n_rows(inputs), len(path)
    dtype, device = fm.dtype, fm.device
    first, last = columns if columns is not None else (0, engine.n_train)
    contributions = torch.zeros(n, last - first, dtype=dtype, device=device)
    if norms is not None:
        if columns is None:
            raise ValueError("norms are computed for a block of columns")
        norms["query"] = torch.zeros_like(contributions)
        norms["train"] = torch.zeros(last - first, dtype=dtype, device=device)
    cache = {} if cache is None else cache
    chunk = max(1, fm.chunk_size())
    query_evals = train_evals = 0
    layers, rest = cache.get("plan") or find_layers(fm)

    def query_terms(w: torch.Tensor, check: bool = False):
        """The queries' layer terms (and the other parameters' gradients) at w."""
        return capture(
            fm,
            w,
            inputs,
            lambda out: output_fn(out, target),
            layers,
            rest,
            lambda names: _query_grads(fm, w, inputs, target, output_fn, names),
            check=check,
        )

    if layers and S and "plan" not in cache:  # once: which layers' terms rebuild gradients
        fm.use_buffers(path.step(0).buffers)
        w0 = fm.flatten(path.step(0).params)
        if engine.n_train >= 2:  # (one example cannot show how rows group into examples)
            layers, rest = verify_layers(
                fm, w0, engine._batch(torch.arange(2)), p.loss_fn, layers, rest
            )
        try:  # and the queries' (outputs without a row per example cannot be read per layer)
            probe = query_terms(w0, check=True) if layers else None
        except NotBatchFirst:
            layers, rest, probe = [], list(fm.active_names), None
        if probe is not None and probe.failed:
            keep = [x for x in layers if x.key not in probe.failed]
            layers, rest = keep, [n for n in fm.active_names if n not in _covered(keep)]
            probe = None
        cache["plan"] = (layers, rest)
        if probe is not None:  # the first checkpoint's query terms, as the loop takes them
            cache[0] = probe
            query_evals += n
    for s in tqdm(range(S), desc="checkpoints", disable=not p.show_progress):
        step = path.step(s)
        fm.use_buffers(step.buffers)  # checkpoint k's BatchNorm statistics, as TracInCP
        w = fm.flatten(step.params)  # all recorded coordinates; gradients: the active ones
        if layers:  # Linear layers: per-layer dot products, no per-example gradients
            if s not in cache:
                cache[s] = query_terms(w)
                query_evals += n
            size = max(1, min(chunk, fm.memory_budget // max(1, 16 * n * dtype.itemsize)))
            for lr, indices, kappa in _parts(engine, step, first, last):
                rest_lr = _rest_scale(engine, lr, rest)
                if norms is not None:  # ‖η ∇f(x)‖² per query, η per parameter
                    query_norms = squared_norms(
                        cache[s],
                        layers,
                        lambda name, lr=lr: _lr_of(engine, lr, name) ** 2,
                        rest_lr * rest_lr if rest else 1.0,
                    )
                for a in range(0, len(indices), size):
                    idx = indices[a : a + size]
                    *x, labels = engine._batch(idx + first)
                    train = _training_factors(fm, w, x, labels, p.loss_fn, layers, rest)
                    train_evals += len(idx)
                    scores = dot_products(
                        cache[s],
                        train,
                        layers,
                        lambda name, lr=lr: _lr_of(engine, lr, name),
                        rest_lr,
                    )
                    _check_finite(scores, "gradient dot product", s, engine.p.path)
                    contributions.index_add_(1, idx.to(device), -scores * kappa[a : a + size])
                    if norms is not None:
                        add_norms(
                            norms,
                            idx.to(device),
                            kappa[a : a + size],
                            query_norms,
                            squared_norms(train, layers),
                        )
            continue
        if s not in cache:
            grads, _ = fm.output_grads(w[None], inputs, target, output_fn)
            _check_finite(grads, "query gradient", s, engine.p.path)
            cache[s] = grads[0]
            query_evals += n
        query = cache[s]
        for lr, indices, kappa in _parts(engine, step, first, last):
            scaled = query * _eta(engine, lr)
            for a in range(0, len(indices), chunk):
                idx = indices[a : a + chunk]
                g = fm.loss_grads(w, engine._batch(idx + first), p.loss_fn)
                _check_finite(g, "training gradient", s, engine.p.path)
                train_evals += len(idx)
                scores = scaled @ g.T
                contributions.index_add_(1, idx.to(device), -scores * kappa[a : a + chunk])
                if norms is not None:
                    add_norms(
                        norms,
                        idx.to(device),
                        kappa[a : a + chunk],
                        (scaled * scaled).sum(1),
                        (g * g).sum(1),
                    )
    if columns is not None:
        return contributions
    return checkpoint_decomposition(
        engine, inputs, target, output_fn, contributions, query_evals, train_evals
    )


def checkpoint_decomposition(
    engine: Engine, inputs, target, output_fn, contributions, query_evals, train_evals
) -> Decomposition:
    """A checkpoint-mode `Decomposition` from its contributions (n, n_train).

    The end points are evaluated with their checkpoints' buffers; what the contributions do
    not explain is ``delta`` (checkpoint mode models no optimizer state or decay).
    """
    fm, path = engine.fm, engine.p.path
    S = len(path)
    if S:  # the end points with their checkpoints' buffers
        fm.use_buffers(path.step(S - 1).buffers)
    prediction = engine._forward(fm.flatten(path.final), inputs, target, output_fn)
    if S:
        fm.use_buffers(path.step(0).buffers)
    initial = engine._forward(fm.flatten(path.initial), inputs, target, output_fn)
    diagnostics = Diagnostics(
        "checkpoint",
        "left",
        fm.dtype,
        torch.ones(S, dtype=torch.int64),
        torch.zeros(0),
        query_evals,
        train_evals,
        fm.route or "vmap",
        dict(fm.routes),
    )
    explained = contributions.sum(1)
    zero = torch.zeros_like(initial)
    terms = {
        "initial": initial,
        "weight_decay": zero,
        "optimizer_state": zero.clone(),
        "unexplained": zero.clone(),
    }
    return Decomposition(
        contributions, initial, prediction, prediction - initial - explained, terms, diagnostics
    )


def _query_grads(fm, w, inputs, target, output_fn, names) -> torch.Tensor:
    """Per-query gradients of the explained output w.r.t. ``names`` at w, (n, d_names)."""
    return fm.output_grads(w[None], inputs, target, output_fn, names=names)[0][0]


class _Rates(tuple):
    """Learning rates per param group of one optimizer step, with the parameters it skipped.

    A skipped parameter had no gradient: the step did not move it, so it takes no part in
    that step's terms.
    """

    skipped: frozenset = frozenset()


def _covered(layers) -> set[str]:
    """The parameters the layers cover."""
    return {n for layer in layers for n in layer.names}


def _training_factors(fm, w, x, labels, loss_fn, layers, rest):
    """The training examples' Linear-layer factors and other parameters' gradients at w."""
    return capture(
        fm,
        w,
        x,
        example_losses(fm, labels, loss_fn),
        layers,
        rest,
        lambda names: fm.loss_grads(w, (*x, labels), loss_fn, names=names),
    )


def _rates(lr, skipped: frozenset) -> _Rates:
    rates = _Rates(lr)
    rates.skipped = skipped
    return rates


def _eta(engine: Engine, lr) -> torch.Tensor:
    """η per active coordinate for a step's learning rates, 0 where it skipped a parameter."""
    eta = engine.vectors.vec(lr)
    skipped = getattr(lr, "skipped", None)
    if not skipped:
        return eta
    fm = engine.fm
    keep = torch.cat(
        [
            torch.full((size,), name not in skipped, device=fm.device)
            for name, size in zip(fm.names[: fm.n_active], fm.sizes[: fm.n_active], strict=True)
        ]
    )
    return eta * keep


def _lr_of(engine: Engine, lr, name: str) -> float:
    """The learning rate of parameter ``name``'s group (0 where the step skipped it)."""
    if name in getattr(lr, "skipped", ()):
        return 0.0
    groups = (engine.p.path.optimizer or {}).get("groups") or [{"params": [name]}]
    for g, group in enumerate(groups):
        if name in group["params"]:
            return float(lr[g])
    return float(lr[0])


def _rest_scale(engine: Engine, lr, rest: list[str]):
    """Learning rate per coordinate of the parameters outside Linear layers."""
    if not rest:
        return 1.0
    sizes = dict(zip(engine.fm.names, engine.fm.sizes, strict=True))
    return torch.cat(
        [
            torch.full(
                (sizes[n],), _lr_of(engine, lr, n), dtype=engine.fm.dtype, device=engine.fm.device
            )
            for n in rest
        ]
    )


def _parts(engine: Engine, step: Step, first: int = 0, last: int | None = None):
    """``(lr, indices − first, κ)`` of the examples in [first, last) a step weighs."""
    dtype, device = engine.fm.dtype, engine.fm.device
    last = engine.n_train if last is None else last
    if not step.parts:  # a checkpoint: every training example, weight η_k
        ones = torch.ones(last - first, dtype=dtype, device=device)
        return [(step.lr, torch.arange(last - first), ones)]
    out = []
    for (lr, indices, sizes), skipped in zip(step.parts, step.parts_skipped, strict=True):
        kappa = example_weights(sizes, engine.p.reduction, engine.p.accumulation)
        keep = (indices >= first) & (indices < last)
        rates = _rates(lr, skipped)
        out.append((rates, indices[keep] - first, kappa[keep].to(dtype=dtype, device=device)))
    return out


def self_influence(
    engine: Engine, indices: torch.Tensor | None, batch=None, desc: str = "checkpoints"
) -> torch.Tensor:
    """Checkpoint-mode self-influence Σ_k η_k κ ‖∇ℓ_i(w_k)‖² (η per coordinate).

    Args:
        engine: The explainer's engine.
        indices: Training indices (m,), or None when ``batch`` gives the examples.
        batch: ``(inputs..., labels)`` of m examples (weighted as in a checkpoint).
        desc: The name of the progress bar over checkpoints.

    Returns:
        (m,) self-influence scores.
    """
    try:
        return _self_influence(engine, indices, batch, desc)
    finally:
        engine.fm.use_buffers(None)


def _self_influence(engine: Engine, indices: torch.Tensor | None, batch, desc) -> torch.Tensor:
    fm, path, p = engine.fm, engine.p.path, engine.p
    m = len(indices) if indices is not None else n_rows(batch[-1])
    out = torch.zeros(m, dtype=fm.dtype, device=fm.device)
    if not m:
        return out

    def examples(r: torch.Tensor):
        if batch is not None:
            return fm.cast(take(tuple(batch), r))
        return engine._batch(indices[r])

    # Linear layers: ‖g‖² from each layer's activations and output gradients, no
    # per-example gradients formed (where those rebuild the gradients: checked once)
    layers, rest = find_layers(fm)
    if layers and len(path):
        fm.use_buffers(path.step(0).buffers)
        w0 = fm.flatten(path.step(0).params)
        if m >= 2:
            layers, rest = verify_layers(fm, w0, examples(torch.arange(2)), p.loss_fn, layers, rest)
        else:
            layers, rest = [], list(fm.active_names)
    # rows per call: their gradients (or a layer's factors) within a recycled working set
    width = fm.d_active if not layers else max(fm.d_active // 8, 1)
    chunk = max(1, min(fm.chunk_size(), BLOCK_BYTES // (3 * width * fm.dtype.itemsize)))
    for s in tqdm(range(len(path)), desc=desc, disable=not p.show_progress):
        step = path.step(s)
        fm.use_buffers(step.buffers)
        w = fm.flatten(step.params)
        if batch is not None or not step.parts:
            weights = [(step.lr, torch.arange(m), torch.ones(m, dtype=fm.dtype))]
        else:
            weights = []
            for (lr, idx, sizes), skipped in zip(step.parts, step.parts_skipped, strict=True):
                kappa = example_weights(sizes, p.reduction, p.accumulation).to(fm.dtype)
                # position of each wanted index in this part (an index may repeat)
                hits = (indices[:, None] == idx[None, :]).nonzero()
                weights.append((_rates(lr, skipped), hits[:, 0], kappa[hits[:, 1]]))
        for lr, rows, kappa in weights:
            eta = _eta(engine, lr)
            rest_lr = _rest_scale(engine, lr, rest)
            for a in range(0, len(rows), chunk):
                r = rows[a : a + chunk]
                *x, labels = examples(r)
                if layers:
                    factors = _training_factors(fm, w, x, labels, p.loss_fn, layers, rest)
                    scale = functools.partial(_lr_of, engine, lr)
                    values = squared_norms(factors, layers, scale, rest_lr)
                else:
                    g = fm.loss_grads(w, (*x, labels), p.loss_fn)
                    values = (g * g) @ eta if eta.dim() else (g * g).sum(1) * eta
                _check_finite(values, "training gradient", s, engine.p.path)
                out.index_add_(0, r.to(fm.device), values * kappa[a : a + chunk])
    return out
