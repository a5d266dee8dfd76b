"""Random projection for the explainer: the projector, its feature cache, query chunks.

Exact mode projects the backward sweep's dot products (`Engine.exact` with a projector);
checkpoint mode projects TracIn's (`engine.tracin_projected`). Both keep the training side's
features in a `FeatureCache`: inside the store for a stored path, in the folder named by
``cache_features=`` for any path, else in memory up to ``memory_budget``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.utils.data import DataLoader

from ..decomposition import Decomposition
from ..engine import tracin_projected
from ..engine.batches import n_rows, take
from ..engine.factorized import make_projector
from ..engine.factors import verify_layers
from ..engine.features import FeatureCache
from ..engine.layers import find_layers
from ..engine.projection import ProjectorKind
from ..exceptions import ArgumentTypeError, UnsupportedError
from ..record.store import HASH
from .distributed import writes_cache

# A `PathKernelInfluence` (not imported: its module imports this one).
PathKernelInfluence = Any


def projector(explainer: PathKernelInfluence, kind, dim, seed):
    """The explainer's projector; its layers checked on two training examples first.

    A layer whose captured terms do not rebuild the training loss's gradient (a weight also
    used outside its modules, a position embedding called on ``arange(T)``) takes ordinary
    per-example gradients instead.
    """
    kind = ProjectorKind.parse(kind)
    plan = None
    fm, path = explainer._fm, explainer.path
    if dim is not None and kind in (
        ProjectorKind.GAUSSIAN,
        ProjectorKind.RADEMACHER,
        ProjectorKind.FACTORIZED,
    ):
        layers, rest = find_layers(fm)
        if len(explainer.train_dataset) < 2 or not len(path):  # (nothing to check them on)
            layers, rest = [], list(fm.active_names)
        elif layers:
            fm.use_buffers(path.step(0).buffers)
            try:
                batch = explainer._engine._batch(torch.arange(2))
                w0 = fm.flatten(path.step(0).params)
                layers, rest = verify_layers(fm, w0, batch, explainer.loss_fn, layers, rest)
            finally:
                fm.use_buffers(None)
        plan = (layers, rest)
    return make_projector(fm, kind, dim, seed, plan)


def feature_cache(explainer: PathKernelInfluence, cache_features, dtype) -> FeatureCache | None:
    """The explainer's feature cache (None with ``cache_features=False``).

    ``cache_features=True`` keeps features inside the store (a stored path) or in memory
    up to ``memory_budget``; a folder keeps them there, for any path (a subfolder per
    projection, loss and path).
    """
    if cache_features is False:
        return None
    if cache_features is True:
        root = getattr(explainer.path._backend, "root", None)
        folder = None if root is None else Path(root) / "features"
    elif isinstance(cache_features, (str, os.PathLike)):
        folder = Path(cache_features)
    else:
        raise ArgumentTypeError(
            f"cache_features must be True, False or a folder, got {cache_features!r}"
        )
    if folder is not None and not writes_cache(explainer._engine):
        folder = None  # (one rank writes a shared folder: the others keep theirs in memory)
    if folder is not None:
        folder = folder / _digest(explainer, own_store=cache_features is True)
    return FeatureCache(folder, dtype, memory_bytes=explainer.memory_budget)


def _digest(explainer: PathKernelInfluence, own_store: bool) -> str:
    """What the cached features depend on, hashed: one subfolder per combination."""
    key = {
        "projector": explainer._projector.config(),
        "loss": [type(explainer.loss_fn).__qualname__, str(explainer.reduction.value)],
        "dtype": str(explainer.dtype),
        "steps": len(explainer.path),
        "file_hash": HASH,  # (caches of earlier versions, hashed with sha256, stay apart)
    }
    if explainer.mode == "checkpoint":  # √η-scaled features in blocks of a fixed size
        key["checkpoint"] = tracin_projected.block_rows(explainer._projector)
    if not own_store:  # a folder of the user's: the path's weights tell paths apart
        key["path"] = _fingerprint(explainer.path)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return digest


def _fingerprint(path) -> str:
    """What tells paths apart, hashed.

    A store's manifest (its files' hashes), else every recorded parameter at every step and
    the learning rates.
    """
    h = xxhash.xxh3_128()
    manifest = getattr(path._backend, "manifest", None)
    if manifest is not None:
        h.update(json.dumps(manifest, sort_keys=True, default=str).encode())
        return h.hexdigest()
    for s in range(len(path)):
        step = path.step(s)
        h.update(repr(step.lr).encode())
        for name in path.param_names:
            h.update(step.params[name].detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def call_features(explainer: PathKernelInfluence) -> FeatureCache:
    """The feature cache a call uses (in memory: at most ``memory_budget`` bytes).

    The explainer's, or with ``cache_features=False`` one for this call only, in the
    computation dtype and on the computation device.
    """
    if explainer._features is not None:
        return explainer._features
    return FeatureCache(
        None, explainer.dtype, memory_bytes=explainer.memory_budget, device=explainer._fm.device
    )


def query_chunk(explainer: PathKernelInfluence) -> int:
    """Queries per chunk of a projected sweep, from ``memory_budget`` (at least 1)."""
    fm, path, itemsize = explainer._fm, explainer.path, explainer.dtype.itemsize
    d, k = fm.d_active, explainer._projector.dim
    if explainer.mode == "checkpoint":  # per query: its projected gradient per checkpoint
        steps = max(1, len(path))
        return max(
            1,
            explainer.memory_budget // (4 * (k * steps + len(explainer.train_dataset)) * itemsize),
        )
    steps = [path.step(s) for s in {0, len(path) - 1}] if len(path) else []
    batch = max((len(st.indices) for st in steps if st.indices is not None), default=0)
    # fixed: ~8 d for the model's vectors (w_s, w_s+1, Δ_s, the batch gradient, ...) and
    # a step's training features with their cast (2 B k); per query: φ, the adjoint, the
    # quadrature nodes' gradients and their temporaries (~8 d, as measured)
    reserve = (8 * d + 2 * batch * k) * itemsize
    per_query = 8 * d * itemsize
    return max(1, (explainer.memory_budget - reserve) // per_query)


def attribute(explainer: PathKernelInfluence, queries, target, output_fn) -> Decomposition:
    """A projected decomposition, queries in memory-bounded chunks (either mode)."""
    n = n_rows(queries)
    size = query_chunk(explainer)
    features = call_features(explainer)
    parts = []
    train = None
    if explainer.mode == "checkpoint":
        train = tracin_projected.CheckpointFeatures(
            explainer._engine, explainer._projector, features
        )
    else:  # the step check on its own first, so that its vectors and the sweep's never meet
        if explainer._step_errors is None:
            explainer._step_errors = explainer._engine.check_steps()
        explainer._engine._warn_reconstruction(explainer._step_errors, stacklevel=5)
    try:
        for a in range(0, n, size):
            chunk = take(queries, slice(a, a + size))
            tgt = None if target is None else target[a : a + size]
            if train is not None:
                parts.append(
                    tracin_projected.decompose(explainer._engine, train, chunk, tgt, output_fn)
                )
                continue
            part = explainer._engine.exact(
                chunk,
                tgt,
                output_fn,
                explainer.quadrature,
                False,
                projector=explainer._projector,
                features=features,
                reconstruct=False,  # (checked above: it does not depend on the queries)
            )
            errors = explainer._step_errors  # reported with every chunk
            diagnostics = dataclasses.replace(part.diagnostics, reconstruction_error=errors)
            parts.append(dataclasses.replace(part, diagnostics=diagnostics))
    finally:
        if explainer._features is not None:
            explainer._features.flush()
    return Decomposition.concat(parts)


def intermediate_quantities(explainer: PathKernelInfluence, inputs, aggregate: bool):
    """`PathKernelInfluence.compute_intermediate_quantities`."""
    if inputs is None:
        raise ArgumentTypeError("inputs is required: a batch (inputs..., labels) or a DataLoader")
    path = explainer.path
    if explainer.mode != "checkpoint" or (len(path) and path.step(0).parts):
        where = "in exact mode" if explainer.mode == "exact" else "on a recorded path (every > 1)"
        raise UnsupportedError(
            f"compute_intermediate_quantities is defined on a path of checkpoints; {where} a "
            "contribution pairs the training example's gradients at the steps whose batches "
            "drew it with the query's adjoint along each step, so queries and training "
            "examples have no common embedding. Use influence() for the scores, or explain "
            "TracInCP-style checkpoints (checkpoints=..., or TrainingPath.from_checkpoints)"
        )
    batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
    out = []
    for batch in batches:
        queries, labels = explainer._split_batch(batch, explainer.loss_fn)
        out.append(
            tracin_projected.intermediate_quantities(
                explainer._engine,
                explainer._projector,
                (*queries, labels),
                explainer.loss_fn,
                aggregate,
            )
        )
    if aggregate:
        return torch.stack(out).sum(0)
    return torch.cat(out)
