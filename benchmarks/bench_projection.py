"""Benchmark: memory-bounded random projection of gradients (``projection_dim=``).

With ``projection_dim=k`` `PathKernelInfluence` replaces each dot product v_s · g_i(w_s) of
the exact backward sweep by (P v_s) · (P g_i(w_s)) for a random P (E[PᵀP] = I). P is never
stored; queries go through the sweep in chunks sized by ``memory_budget``; the training
features P g_i(w_s) are computed once per step and cached in the store. This script checks
the three promises of that design.

1. Peak memory. For MLPs 128 -> h -> h -> 10 (Tanh) of about 1M, 5M and 25M parameters
   (h = 960, 2176, 4928), a synthetic, seeded training set of 10,000 examples (128-dim
   Gaussian inputs, labels from a random linear teacher) is trained for one epoch of plain
   SGD (batch 500, lr 0.05: 20 steps), recorded by `pk.PathRecorder` to a store under /tmp.
   Then, in a fresh subprocess per configuration, 100 queries are attributed with
   ``projection_dim=4096``, ``quadrature=2`` and ``memory_budget=B`` (B = 256 MiB), with every
   projector ("gaussian", "rademacher", "sparse", "factorized": 4096 features per layer,
   12,282 in all), in exact mode (the store) and in checkpoint mode (two checkpoints of the
   run, steps 10 and 20, TracInCP's setting). Memory is read from /proc/self/status: VmRSS
   just before ``attribute()`` is the baseline; writing "5" to /proc/self/clear_refs resets
   VmHWM, which is read after ``attribute()``; a thread also samples RssAnon every 20 ms,
   because VmHWM counts the store's memory-mapped (file-backed, reclaimable) pages too.
   Target: the peak stays below twice the budget plus a few copies of the model, not like
   d x k (25M x 4096 floats would be 410 GB):

       peak - baseline <= 2 B + 6 x 4d + 4 x (4 x 500 x k_total) bytes

   (2 B: the working memory queries and training features are sized by, and the feature
   cache in memory; 6 copies of the model: the sweep's w_s, w_s+1, Δ_s, φ_s, the adjoint
   and a gradient's temporaries; 500 the step's batch, k_total the features per example),
   for VmHWM and for sampled RssAnon alike.

   Scaled down: on 2 shared CPU cores the dense projectors cost O(d k) per example (1e11
   flops for the 25M model), and the query side of exact mode 20-70 s per query for the
   25M model (one query per chunk), so the default run attributes all 100 queries for the
   1M model with "factorized" in both modes only; the other configurations stop after 2
   query chunks or 120 s, whichever comes first, and report the peak reached by then (a
   thread prints it every 5 s). In exact mode the first chunk computes and caches the
   training features of all 20 steps, the second reads them back like every later one, so
   2 chunks show the steady state; a run stopped earlier shows the training side's peak
   (marked "timeout"). ``--full`` runs every configuration to the end (days).

1b. From two checkpoints, to the end: the 25M model's checkpoints (steps 10 and 20), 100
   queries against all 10,000 training examples, ``projection_dim=4096``,
   ``projector="factorized"``, B = 256 MiB, in checkpoint mode (``pk.TracInCP``): the whole
   ``attribute()`` and then ``influence(k=10)``. Target: peak - baseline <= B + 6 x 4d +
   4 x (4 x 500 x k_total) (the model's copies, the in-memory feature cache up to B, and
   O(batch x k) for a block of training features and the queries' features).

2. Accuracy vs k in {64, 256, 1024, 4096} on scikit-learn's digits (pixels / 16, 1,000 training
   images, MLP 64 -> 32 -> 10 Tanh, SGD lr 0.1, batch 32, 3 epochs recorded in memory; 100
   held-out queries). For "gaussian", "sparse" and "factorized" (up to k features per Linear
   layer there; a side no wider than its share is left unprojected, so at k = 4096, where each
   layer has at most k weights, it is exact): relative error ||C_proj - C_exact||_F /
   ||C_exact||_F of the contributions to each query's label logit, and the mean over queries of
   the Spearman correlation between the projected and the exact contributions. Then the test
   loss: Captum's ``TracInCPFastRandProj`` (last layer only, TracIn over the 3 end-of-epoch
   checkpoints, ``projection_dim=k``; ``None`` gives it unprojected) and pk_attrib's projected
   sweep of the negative test loss (``output_fn``), each ranked against exact mode's
   ``influence((x, y))``. Targets at k = 4096: relative error <= 0.25 and mean Spearman >= 0.95
   for gaussian and sparse (variance ~ 1/k); <= 0.5 and >= 0.8 for factorized, whose estimate is
   a product of two independent ones of dimension sqrt(k) (variance ~ 2/sqrt(k)), judged at the
   largest k that still projects (1024); and the error shrinks at least half as fast as theory
   says: err(64) / err(4096) >= 0.5 x 64^(1/2) = 4 (gaussian, sparse), err(64) / err(1024) >=
   0.5 x 16^(1/4) = 1 (factorized).

   Then (c) checkpoint mode against Captum on the same run, with TracInCP's inputs: the 3
   end-of-epoch checkpoints, the test loss's influence. Reference: Captum ``TracInCP``
   (every layer, not projected), which ``pk.TracInCP`` without projection equals (printed:
   the largest difference). Each of pk's projectors at every k and Captum's
   ``TracInCPFastRandProj`` (last layer only, ``projection_dim=k``) is ranked against it:
   mean Spearman, relative error, seconds. Target: at k = 4096, gaussian and sparse reach a
   mean Spearman >= 0.95 with the reference, and they beat TracInCPFastRandProj at every k.

3. Throughput: projected per-example gradients per second of
   ``make_projector(fm, kind, k).training_features(w, batch, loss_fn)`` for each kind on the
   1M MLP, batch 256, k = 1024 and 4096, next to the plain way: per-example gradients from
   ``torch.func`` (vmap(grad)) and ``grads @ P.T`` with P stored (P's generation not timed;
   at k = 4096 P would take 17 GB, so that row is skipped). ``memory_budget=4 GiB`` so that
   the batch is one gradient chunk (at the default 1 GiB the dense projectors regenerate P
   once per chunk). Scaled down: the dense kinds ("gaussian", "rademacher") at k = 4096 are
   estimated from k = 1024 (both their generation and their matmul are linear in k) unless
   ``--full``. A GPU column gives the same on CUDA, or "n/a (no GPU)". Target: factorized
   at k = 1024 is >= 10x faster than the stored-P baseline.

Times are single measurements on a possibly shared machine (the load average is printed);
medians of 3 where a measurement takes under 10 s.

Run from the repository root::

    python benchmarks/bench_projection.py            # default: 7 min on 2 idle cores, 16 shared
    python benchmarks/bench_projection.py --quick    # smoke run, < 2 min
    python benchmarks/bench_projection.py --parts 2  # one part only
    python benchmarks/bench_projection.py --full     # no scaling down (hours)

The exit status is 0 when every target passes and 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk

from _memory import AnonSampler, proc_status, reset_peak  # (benchmarks/ is on sys.path)

from pk_attrib.engine.factorized import make_projector
from pk_attrib.engine.functional import FunctionalModel

SEED = 0
MIB = 1 << 20
GIB = 1 << 30
IN_FEATURES = 128
N_CLASSES = 10
FEATURE_COPIES = 4  # allowance: this many copies of a batch's (B, k_total) features
MODEL_COPIES = 6  # allowance: this many copies of the model (4d bytes each)
# glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, and keeps
# what is freed below it in its heap: the resident memory then counts freed blocks of the
# dense projectors' and the sweep's mid-size temporaries too (a 100K model with B = 64 MiB:
# 152 MiB above the baseline instead of 55). Children run with the threshold fixed at 1 MiB
# (MALLOC_MMAP_THRESHOLD_) so that the peak measures the memory pk_attrib holds;
# --malloc-default runs them with glibc's default.
CHILD_MALLOC_THRESHOLD = 1 << 20
BUDGET_COPIES = 2  # allowance: this many memory_budgets (working memory, in-memory cache)
KINDS = ("gaussian", "rademacher", "sparse", "factorized")
MODES = ("exact", "checkpoint")
DIGITS_LR = 0.1
DIGITS_BATCH = 32
DIGITS_HIDDEN = 32
DIGITS_QUERY_START = 1500  # queries are held-out digits from this index on
# part 2 targets at the largest k: (max rel. error, min mean Spearman, error rate exponent r).
# A dense or sparse JL estimate of a dot product has variance ~ 1/k, so its error falls like
# k^-1/2; the factorized one multiplies two independent estimates of dimension sqrt(k) each
# (k_out = k_in = sqrt(k)), so its variance is ~ 2/sqrt(k) and its error falls like k^-1/4.
# Target: err(smallest k) / err(largest k) >= half of (ratio of the ks)^r.
ACCURACY_TARGETS = {
    "gaussian": (0.25, 0.95, 0.5),
    "sparse": (0.25, 0.95, 0.5),
    "factorized": (0.5, 0.8, 0.25),
}
MIN_FACTORIZED_SPEEDUP = 10.0


@dataclass
class Config:
    """Problem sizes of the three parts."""

    # part 1
    widths: dict[str, int]
    n_train: int
    batch: int
    n_queries: int
    k_memory: int
    memory_budget: int
    full_runs: tuple[tuple[str, str, str], ...]  # (model, mode, projector) run to the end
    max_chunks: int
    child_timeout: float  # seconds per capped configuration
    checkpoints_model: str  # part 1b
    # part 2
    digits_train: int
    digits_epochs: int
    digits_queries: int
    ks: tuple[int, ...]
    # part 3
    throughput_width: int
    throughput_batch: int
    throughput_ks: tuple[int, ...]
    throughput_budget: int = 4 * GIB
    stored_p_limit: int = 8 * GIB  # the stored-P baseline is skipped when P is larger
    kinds: tuple[str, ...] = ("gaussian", "rademacher", "sparse", "factorized")
    full: bool = False


DEFAULT = Config(
    widths={"1M": 960, "5M": 2176, "25M": 4928},
    n_train=10_000,
    batch=500,
    n_queries=100,
    k_memory=4096,
    memory_budget=256 * MIB,
    full_runs=(("1M", "exact", "factorized"), ("1M", "checkpoint", "factorized")),
    max_chunks=2,
    child_timeout=120,
    checkpoints_model="25M",
    digits_train=1000,
    digits_epochs=3,
    digits_queries=100,
    ks=(64, 256, 1024, 4096),
    throughput_width=960,
    throughput_batch=256,
    throughput_ks=(1024, 4096),
)
QUICK = Config(
    widths={"100K": 256},
    n_train=2000,
    batch=500,
    n_queries=20,
    k_memory=1024,
    memory_budget=64 * MIB,
    full_runs=(("100K", "exact", "factorized"), ("100K", "checkpoint", "sparse")),
    max_chunks=2,
    child_timeout=30,
    checkpoints_model="100K",
    digits_train=300,
    digits_epochs=1,
    digits_queries=20,
    ks=(64, 1024),
    throughput_width=256,
    throughput_batch=64,
    throughput_ks=(256,),
)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


# -- part 1: peak memory, one subprocess per configuration --------------------------------------


def mlp(width: int, in_features: int = IN_FEATURES, out: int = N_CLASSES) -> torch.nn.Module:
    """in -> width -> width -> out, Tanh: width² + (in + out + 2) width + out parameters."""
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, out),
    )


def n_params(width: int) -> int:
    return width * width + (IN_FEATURES + N_CLASSES + 2) * width + N_CLASSES


def synthetic(n_train: int, n_queries: int) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    """Seeded Gaussian inputs labelled by a random linear teacher: (train set, queries, labels)."""
    gen = torch.Generator().manual_seed(SEED)
    teacher = torch.randn(IN_FEATURES, N_CLASSES, generator=gen)
    x = torch.randn(n_train + n_queries, IN_FEATURES, generator=gen)
    y = (x @ teacher).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), x[n_train:], y[n_train:]


class StopAfterChunks(Exception):
    """Raised from the chunk wrapper to end a capped run after ``max_chunks`` chunks."""


class Probe:
    """Observes one ``attribute()`` call: chunk times, memory, progress lines.

    `projected.attribute` runs the queries in chunks, each through ``Engine.exact`` (exact
    mode) or ``tracin_projected.decompose`` (checkpoint mode). The probe wraps that private
    call to time the chunks, to stop after ``max_chunks`` chunks, and to print a
    ``PROGRESS`` line after each and every 5 s, so that a parent that times the child out
    still learns the peak so far. ``features`` times the projector's calls (the training
    side, and in checkpoint mode the queries' features too).
    """

    def __init__(self, ex, n_queries: int, max_chunks: int | None):
        from pk_attrib.explain import projected

        self.n_queries = n_queries
        self.max_chunks = max_chunks
        self.features: list[float] = []  # seconds per call of the projector's features
        self.chunks: list[tuple[int, float]] = []  # (queries, seconds)
        self.chunk_size: int | None = None
        self.sampler = AnonSampler(tick=self.report)
        self.start = time.perf_counter()
        checkpoint = ex.mode == "checkpoint"
        run_chunk = projected.tracin_projected.decompose if checkpoint else ex._engine.exact
        features = ex._projector.features

        def timed_chunk(*args, **kwargs):
            inputs = args[2] if checkpoint else args[0]
            n = inputs[0].shape[0]
            self.chunk_size = self.chunk_size or n
            start = time.perf_counter()
            out = run_chunk(*args, **kwargs)
            self.chunks.append((n, time.perf_counter() - start))
            self.report()
            done = sum(q for q, _ in self.chunks)
            if max_chunks is not None and len(self.chunks) >= max_chunks and done < n_queries:
                raise StopAfterChunks
            return out

        def timed_features(*args, **kwargs):
            start = time.perf_counter()
            out = features(*args, **kwargs)
            self.features.append(time.perf_counter() - start)
            return out

        if checkpoint:
            self._restore = (projected.tracin_projected, "decompose", run_chunk)
            projected.tracin_projected.decompose = timed_chunk
        else:
            ex._engine.exact = timed_chunk
            self._restore = None
        ex._projector.features = timed_features

    def begin(self) -> None:
        reset_peak()
        self.sampler.start()
        self.start = time.perf_counter()

    def snapshot(self) -> dict:
        status = proc_status()
        return {
            "seconds": time.perf_counter() - self.start,
            "features": self.features,
            "chunks": self.chunks,
            "chunk_size": self.chunk_size,
            "peak": status["VmHWM"],
            "peak_anon": max(self.sampler.peak, status["RssAnon"]),
            "after": status,
        }

    def report(self) -> None:
        print("PROGRESS " + json.dumps(self.snapshot()), flush=True)

    def end(self) -> dict:
        self.sampler.stop()
        if self._restore is not None:
            setattr(*self._restore)
        return self.snapshot()


def checkpoint_path(store: str) -> pk.TrainingPath:
    """The run's checkpoints half-way and at the end (TracInCP's input), in memory."""
    path = pk.TrainingPath.load(store)
    states = [path.params(len(path) // 2), path.params(len(path))]
    return pk.TrainingPath.from_checkpoints(states, [0.05] * len(states))


def child_record(spec: dict) -> dict:
    """Train one epoch of SGD, recording the path to ``spec["store"]``."""
    train_set, _, _ = synthetic(spec["n_train"], 0)
    torch.manual_seed(SEED)
    model = mlp(spec["width"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(
        train_set,
        batch_size=spec["batch"],
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    start = time.perf_counter()
    recorder = pk.PathRecorder(model, optimizer, store=spec["store"])
    losses = []
    for x, y in recorder.watch(loader):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    recorder.close()
    size = sum(f.stat().st_size for f in Path(spec["store"]).rglob("*") if f.is_file())
    return {
        "seconds": time.perf_counter() - start,
        "steps": len(losses),
        "loss": [losses[0], losses[-1]],
        "store_bytes": size,
    }


def child_measure(spec: dict) -> dict:
    """Attribute the queries with one projector; peak memory and time of ``attribute()``."""
    train_set, queries, targets = synthetic(spec["n_train"], spec["n_queries"])
    model = mlp(spec["width"])
    stored = pk.TrainingPath.load(spec["store"])
    stored.load_into(model)
    model.eval()
    path = stored if spec["mode"] == "exact" else checkpoint_path(spec["store"])
    ex = pk.PathKernelInfluence(
        model,
        train_set,
        path,
        torch.nn.CrossEntropyLoss(),
        show_progress=False,
        projection_dim=spec["k"],
        projector=spec["projector"],
        projection_seed=SEED,
        memory_budget=spec["memory_budget"],
        quadrature=2,
        mode=spec["mode"],
    )
    probe = Probe(ex, spec["n_queries"], spec["max_chunks"])
    gc.collect()
    start = {
        "d": sum(p.numel() for p in model.parameters()),
        "k_total": ex._projector.dim,  # features per example
        "steps": len(path),
        "base": proc_status(),
    }
    print("START " + json.dumps(start), flush=True)
    probe.begin()
    status = "complete"
    try:
        dec = ex.attribute(queries, target=targets)
    except StopAfterChunks:
        status = "capped"
    result = {**start, **probe.end(), "status": status}
    if status == "complete":
        result["finite"] = bool(torch.isfinite(dec.contributions).all())
    return result


def child_checkpoints(spec: dict) -> dict:
    """Part 1b: 100 queries from two checkpoints to the end, then influence(k=10)."""
    train_set, queries, targets = synthetic(spec["n_train"], spec["n_queries"])
    model = mlp(spec["width"])
    pk.TrainingPath.load(spec["store"]).load_into(model)
    model.eval()
    ex = pk.TracInCP(
        model,
        train_set,
        checkpoint_path(spec["store"]),
        None,
        None,
        torch.nn.CrossEntropyLoss(reduction="none"),
        show_progress=False,
        projection_dim=spec["k"],
        projector="factorized",
        projection_seed=SEED,
        memory_budget=spec["memory_budget"],
    )
    gc.collect()
    base = proc_status()
    sampler = AnonSampler()
    reset_peak()
    sampler.start()
    start = time.perf_counter()
    dec = ex.attribute(queries, target=targets)
    attribute_s = time.perf_counter() - start
    top = ex.influence((queries, targets), k=10)
    total_s = time.perf_counter() - start
    peak_anon = sampler.stop()
    after = proc_status()
    return {
        "d": sum(p.numel() for p in model.parameters()),
        "k_total": ex._projector.dim,
        "base": base,
        "peak": after["VmHWM"],
        "peak_anon": peak_anon,
        "attribute_s": attribute_s,
        "influence_s": total_s - attribute_s,
        "train_gradients": dec.diagnostics.train_gradients,
        "finite": bool(torch.isfinite(dec.contributions).all())
        and bool(torch.isfinite(top.influence_scores).all()),
        "shape": list(dec.contributions.shape),
    }


def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Run ``--child spec`` in a fresh interpreter; its RESULT, or on timeout its progress."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if CHILD_MALLOC_THRESHOLD:  # a fixed threshold: freed blocks go back to the system
        env["MALLOC_MMAP_THRESHOLD_"] = str(CHILD_MALLOC_THRESHOLD)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = exc.stdout or "", exc.stderr or "", "timeout"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    lines: dict[str, dict] = {}
    for line in out.splitlines():
        kind, _, payload = line.partition(" ")
        if kind in ("START", "PROGRESS", "RESULT"):
            lines[kind] = json.loads(payload)
    if "RESULT" in lines:
        return lines["RESULT"]
    if code == "timeout" and "START" in lines:
        progress = lines.get("PROGRESS")
        if progress is None:  # nothing finished: the peak is unknown
            progress = {"seconds": timeout, "features": [], "chunks": [], "chunk_size": None}
            progress.update(peak=None, peak_anon=None, after=None)
        return {**lines["START"], **progress, "status": "timeout", "timeout": timeout}
    raise RuntimeError(f"child {spec['task']} failed (exit {code}):\n{err[-3000:]}")


@dataclass
class MemoryRow:
    """One measured configuration of part 1."""

    model: str
    mode: str
    projector: str
    result: dict
    limit: int

    @property
    def d(self) -> int:
        return self.result["d"]

    @property
    def measured(self) -> bool:
        return self.result["peak"] is not None

    @property
    def grow(self) -> int:
        return self.result["peak"] - self.result["base"]["VmRSS"]

    @property
    def grow_anon(self) -> int:
        return self.result["peak_anon"] - self.result["base"]["RssAnon"]

    def n_chunks(self, n_queries: int) -> int | None:
        size = self.result["chunk_size"]
        return None if size is None else math.ceil(n_queries / size)

    def features_seconds(self) -> float | None:
        """Training features of all steps (extrapolated from the steps done)."""
        done = self.result["features"]
        return statistics.mean(done) * self.result["steps"] if done else None

    def chunk_query_seconds(self) -> float | None:
        """Query side of one full chunk: chunk 2, else chunk 1 minus the features."""
        chunks = self.result["chunks"]
        if len(chunks) > 1:
            return chunks[1][1]
        if chunks:
            return chunks[0][1] - sum(self.result["features"])
        return None

    def estimate(self, n_queries: int) -> tuple[float | None, str]:
        """(seconds for all queries, mark): '' measured, '*' estimated, '>' lower bound."""
        if self.result["status"] == "complete":
            return self.result["seconds"], ""
        if self.mode == "checkpoint":  # one chunk: the time so far
            return self.result["seconds"], ">"
        features, query = self.features_seconds(), self.chunk_query_seconds()
        chunks = self.n_chunks(n_queries)
        if features is not None and query is not None and chunks is not None:
            return features + chunks * query, "*"
        return (features if features is not None else self.result["seconds"]), ">"


def describe(row: MemoryRow, steps: int) -> str:
    """The second line of a row: where the time went and the resident memory at the end."""
    r = row.result
    chunks = ", ".join(f"{q} q: {s:.1f}s" for q, s in r["chunks"]) or "none finished"
    parts = [f"chunks [{chunks}]"]
    if r["features"]:
        parts.append(
            f"projector.features {len(r['features'])} calls, "
            f"{statistics.mean(r['features']):.2f}s each"
        )
    query = row.chunk_query_seconds() if row.mode == "exact" else None
    if query is not None:
        parts.append(f"query side {query / steps:.2f}s per step and chunk")
    if r["after"] is not None:
        parts.append(
            f"at the end RssAnon {r['after']['RssAnon'] / MIB:.0f} MiB, RssFile "
            f"{r['after']['RssFile'] / MIB:.0f} MiB"
        )
    parts.append(f"a stored d x k_total P: {4 * row.d * r['k_total'] / GIB:.0f} GiB")
    if r["status"] == "timeout":
        parts.append(f"TIMED OUT after {r['timeout']:.0f}s (peaks so far)")
    return "; ".join(parts)


def limit_of(cfg: Config, d: int, k_total: int, budgets: int = BUDGET_COPIES) -> int:
    """budgets x memory_budget + MODEL_COPIES x 4d + FEATURE_COPIES x (4 x batch x k_total)."""
    return (
        budgets * cfg.memory_budget
        + MODEL_COPIES * 4 * d
        + FEATURE_COPIES * 4 * cfg.batch * k_total
    )


def memory_part(cfg: Config, root: Path) -> list[bool]:
    print(f"\n1. peak memory of attribute(): fresh subprocess per configuration ({load()})")
    print(
        f"   {cfg.n_train} synthetic training examples, one epoch of SGD (batch {cfg.batch}, "
        f"{cfg.n_train // cfg.batch} steps) recorded to a store under {root}; exact mode "
        f"explains the store, checkpoint mode its checkpoints half-way and at the end; "
        f"{cfg.n_queries} queries, k = {cfg.k_memory}, quadrature=2, "
        f"memory_budget B = {cfg.memory_budget / MIB:g} MiB; each run stops after "
        f"{cfg.max_chunks} query chunks or {cfg.child_timeout:.0f}s unless marked full; "
        + (
            f"children run with MALLOC_MMAP_THRESHOLD_={CHILD_MALLOC_THRESHOLD} (freed "
            "memory returned to the system: the peak is what pk_attrib holds)"
            if CHILD_MALLOC_THRESHOLD
            else "children run with glibc's default malloc settings"
        )
    )
    print(
        f"   limit = {BUDGET_COPIES} B + {MODEL_COPIES} x 4d + {FEATURE_COPIES} x 4 x "
        f"{cfg.batch} x k_total; peak = VmHWM (all resident pages, store mmaps included), "
        "anon = sampled RssAnon; /4d: the rise in copies of the model"
    )
    rows: list[MemoryRow] = []
    header = (
        f"   {'model':>5} {'d':>11} {'mode':>10} {'projector':>10} {'k_tot':>6} "
        f"{'q/chunk':>7} {'chunks':>7} {'base MiB':>9} {'peak-base':>10} {'/4d':>6} "
        f"{'anon-base':>10} {'/4d':>6} {'limit MiB':>10} {'time s':>8} {'all q s':>9}"
    )
    for model, width in cfg.widths.items():
        store = root / f"store-{model}"
        rec = run_child(
            {
                "task": "record",
                "width": width,
                "n_train": cfg.n_train,
                "batch": cfg.batch,
                "store": str(store),
            }
        )
        print(
            f"\n   {model}: d = {n_params(width):,}; recorded {rec['steps']} steps in "
            f"{rec['seconds']:.1f}s (loss {rec['loss'][0]:.3f} -> {rec['loss'][1]:.3f}), "
            f"store {rec['store_bytes'] / MIB:.0f} MiB"
        )
        print(header)
        for mode in MODES:
            for kind in KINDS:
                full = cfg.full or (model, mode, kind) in cfg.full_runs
                spec = {
                    "task": "measure",
                    "width": width,
                    "n_train": cfg.n_train,
                    "n_queries": cfg.n_queries,
                    "store": str(store),
                    "k": cfg.k_memory,
                    "projector": kind,
                    "mode": mode,
                    "memory_budget": cfg.memory_budget,
                    "max_chunks": None if full else cfg.max_chunks,
                }
                result = run_child(spec, timeout=None if full else cfg.child_timeout)
                d = result["d"]
                row = MemoryRow(model, mode, kind, result, limit_of(cfg, d, result["k_total"]))
                rows.append(row)
                n_chunks = row.n_chunks(cfg.n_queries)
                done = f"{len(result['chunks'])}/{n_chunks or '?'}"
                est, mark = row.estimate(cfg.n_queries)
                if row.measured:
                    memory = (
                        f"{row.grow / MIB:>10.0f} {row.grow / (4 * d):>6.1f} "
                        f"{row.grow_anon / MIB:>10.0f} {row.grow_anon / (4 * d):>6.1f}"
                    )
                else:
                    memory = f"{'?':>10} {'?':>6} {'?':>10} {'?':>6}"
                print(
                    f"   {model:>5} {d:>11,} {mode:>10} {kind:>10} {result['k_total']:>6} "
                    f"{result['chunk_size'] or '?':>7} {done:>7} "
                    f"{result['base']['VmRSS'] / MIB:>9.0f} {memory} "
                    f"{row.limit / MIB:>10.0f} {result['seconds']:>8.1f} {mark:>1}{est:>7.0f}"
                )
                print(f"   {'':>5} {describe(row, result['steps'])}")
                if result["status"] == "complete" and not result["finite"]:
                    print("          contributions are not finite!")
        if model != cfg.checkpoints_model:
            shutil.rmtree(store, ignore_errors=True)
    print(
        f"   'all q s': time for all {cfg.n_queries} queries: measured, '*' estimated as "
        "features + n_chunks x query side of a chunk, '>' a lower bound"
    )
    measured = [r for r in rows if r.measured]
    total_ok = all(r.grow <= r.limit for r in measured)
    anon_ok = all(r.grow_anon <= r.limit for r in measured)
    finite_ok = all(r.result.get("finite", True) for r in rows)
    if not measured:
        print("   FAIL 1a, 1b: no configuration reported a peak before its timeout")
        return [False, False, finite_ok]
    unmeasured = f" ({len(rows) - len(measured)} run(s) without a measurement)"
    suffix = unmeasured if len(measured) < len(rows) else ""
    worst = max(measured, key=lambda r: r.grow / r.limit)
    print(
        f"   {verdict(total_ok)} 1a: VmHWM - baseline <= limit for every configuration "
        f"(worst: {worst.model}/{worst.mode}/{worst.projector} {worst.grow / MIB:.0f} of "
        f"{worst.limit / MIB:.0f} MiB){suffix}"
    )
    worst = max(measured, key=lambda r: r.grow_anon / r.limit)
    print(
        f"   {verdict(anon_ok)} 1b: sampled RssAnon - baseline <= limit for every "
        f"configuration (worst: {worst.model}/{worst.mode}/{worst.projector} "
        f"{worst.grow_anon / MIB:.0f} of {worst.limit / MIB:.0f} MiB){suffix}"
    )
    print(f"   {verdict(finite_ok)} 1c: completed runs give finite (n_test, n_train) contributions")
    return [total_ok, anon_ok, finite_ok, *checkpoints_part(cfg, root)]


def checkpoints_part(cfg: Config, root: Path) -> list[bool]:
    """Part 1b: the largest model from two checkpoints, every query, to the end."""
    model = cfg.checkpoints_model
    store = root / f"store-{model}"
    print(
        f"\n1b. {model} from two checkpoints (half-way and at the end), {cfg.n_queries} "
        f"queries against {cfg.n_train} training examples, pk.TracInCP, factorized, "
        f"k = {cfg.k_memory}, B = {cfg.memory_budget / MIB:g} MiB, to the end ({load()})"
    )
    spec = {
        "task": "checkpoints",
        "width": cfg.widths[model],
        "n_train": cfg.n_train,
        "n_queries": cfg.n_queries,
        "store": str(store),
        "k": cfg.k_memory,
        "memory_budget": cfg.memory_budget,
    }
    try:
        r = run_child(spec)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    d = r["d"]
    limit = limit_of(cfg, d, r["k_total"], budgets=1)
    grow = r["peak"] - r["base"]["VmRSS"]
    grow_anon = r["peak_anon"] - r["base"]["RssAnon"]
    print(
        f"   d = {d:,}, k_total = {r['k_total']}: attribute {r['attribute_s']:.1f}s "
        f"(contributions {tuple(r['shape'])}, {r['train_gradients']} training examples' "
        f"features), then influence(k=10) {r['influence_s']:.1f}s; peak - baseline "
        f"{grow / MIB:.0f} MiB ({grow / (4 * d):.1f} x 4d), RssAnon {grow_anon / MIB:.0f} "
        f"MiB ({grow_anon / (4 * d):.1f} x 4d); limit B + {MODEL_COPIES} x 4d + "
        f"{FEATURE_COPIES} x 4 x {cfg.batch} x k_total = {limit / MIB:.0f} MiB"
    )
    ok = max(grow, grow_anon) <= limit and r["finite"]
    print(
        f"   {verdict(ok)} 1d: from two checkpoints the peak stays below {limit / MIB:.0f} MiB "
        "and the scores are finite"
    )
    return [ok]


# -- part 2: accuracy vs k on digits -------------------------------------------------------------


@dataclass
class DigitsRun:
    """The recorded digits run, its checkpoint files and the queries."""

    model: torch.nn.Module
    train_set: TensorDataset
    path: pk.TrainingPath
    checkpoints: list[str]
    queries: torch.Tensor
    targets: torch.Tensor


def train_digits(cfg: Config, folder: Path) -> DigitsRun:
    """SGD on the first ``digits_train`` digits, recorded in memory, checkpoint per epoch."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_set = TensorDataset(x[: cfg.digits_train], y[: cfg.digits_train])
    end = DIGITS_QUERY_START + cfg.digits_queries
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, DIGITS_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(DIGITS_HIDDEN, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=DIGITS_LR)
    loader = DataLoader(
        train_set,
        batch_size=DIGITS_BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    recorder = pk.PathRecorder(model, optimizer)
    checkpoints = []
    for epoch in range(cfg.digits_epochs):
        for xb, yb in recorder.watch(loader):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        file = folder / f"epoch-{epoch}.pt"
        torch.save({"model": model.state_dict(), "lr": DIGITS_LR}, file)
        checkpoints.append(str(file))
    recorder.close()
    model.eval()
    return DigitsRun(
        model,
        train_set,
        recorder.path,
        checkpoints,
        x[DIGITS_QUERY_START:end],
        y[DIGITS_QUERY_START:end],
    )


def negative_loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-CE per row: the quantity whose increase `influence` scores."""
    return -F.cross_entropy(outputs, target, reduction="none")


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation between a[i] and b[i]."""
    from scipy.stats import spearmanr

    values = [
        spearmanr(x, y).statistic
        for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True)
    ]
    return float(np.mean(values))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


class BruteForceNeighbors:
    """Exact largest-dot-product search for Captum (its default needs the annoy package)."""

    def setup(self, data: torch.Tensor) -> None:
        self.data = data

    def get_nearest_neighbors(self, query: torch.Tensor, k: int):
        scores = query @ self.data.T
        values, indices = scores.topk(k, dim=1)
        return indices, values


def captum_fast_rand_proj(run: DigitsRun, k: int | None) -> torch.Tensor:
    """Captum's TracInCPFastRandProj test-loss influence scores at projection_dim=k."""
    from captum.influence import TracInCPFastRandProj
    from captum.influence._utils.nearest_neighbors import NearestNeighbors

    class Neighbors(BruteForceNeighbors, NearestNeighbors):
        pass

    def load(net: torch.nn.Module, file: str) -> float:
        state = torch.load(file, weights_only=True)
        net.load_state_dict(state["model"])
        return state["lr"]

    net = copy.deepcopy(run.model)  # Captum loads the checkpoints into the model it is given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = TracInCPFastRandProj(
            net,
            final_fc_layer=net[2],
            train_dataset=run.train_set,
            checkpoints=run.checkpoints,
            checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
            batch_size=256,
            projection_dim=k,
            nearest_neighbors=Neighbors(),
            seed=SEED,
        )
        return tracin.influence((run.queries, run.targets), k=None)


def accuracy_part(cfg: Config, root: Path) -> list[bool]:
    print(f"\n2. accuracy vs k on digits: projected vs exact mode ({load()})")
    run = train_digits(cfg, root)
    d = sum(p.numel() for p in run.model.parameters())
    print(
        f"   {cfg.digits_train} training digits, MLP 64-32-10 Tanh (d = {d}), SGD lr {DIGITS_LR} "
        f"batch {DIGITS_BATCH}, {cfg.digits_epochs} epochs = {len(run.path)} steps; "
        f"{len(run.queries)} held-out queries"
    )

    def explainer(**kwargs) -> pk.PathKernelInfluence:
        with warnings.catch_warnings():  # k = 4096 > d = 2,410 on purpose: it warns so
            warnings.simplefilter("ignore", pk.PkAttribWarning)
            return pk.PathKernelInfluence(
                run.model,
                run.train_set,
                run.path,
                torch.nn.CrossEntropyLoss(),
                show_progress=False,
                **kwargs,
            )

    start = time.perf_counter()
    exact = explainer()
    c_exact = exact.attribute(run.queries, target=run.targets).contributions
    i_exact = exact.influence((run.queries, run.targets))
    print(f"   exact mode: attribute + influence in {time.perf_counter() - start:.1f}s")
    check = exact.attribute(run.queries, target=run.targets, output_fn=negative_loss)
    gap = relative_error(check.contributions, i_exact)
    print(f"   (exact attribute(output_fn=-loss) vs influence(): relative gap {gap:.1e})")

    print("\n   (a) contributions to the label logit: projected vs exact")
    print(
        f"   {'projector':>10} {'k':>6} {'k_total':>8} {'rel. error':>11} {'Spearman':>9} "
        f"{'time s':>7}"
    )
    errors: dict[tuple[str, int], float] = {}
    spearman: dict[tuple[str, int], float] = {}
    for kind in ("gaussian", "sparse", "factorized"):
        for k in cfg.ks:
            start = time.perf_counter()
            ex = explainer(projection_dim=k, projector=kind, projection_seed=SEED)
            c = ex.attribute(run.queries, target=run.targets).contributions
            seconds = time.perf_counter() - start
            errors[kind, k] = relative_error(c, c_exact)
            spearman[kind, k] = mean_spearman(c, c_exact)
            print(
                f"   {kind:>10} {k:>6} {ex._projector.dim:>8} {errors[kind, k]:>11.4f} "
                f"{spearman[kind, k]:>9.4f} {seconds:>7.1f}"
            )

    print("\n   (b) test-loss influence: mean Spearman vs exact mode's influence()")
    print(f"   {'method':>44} {'k':>6} {'Spearman':>9} {'rel. error':>11} {'time s':>7}")
    for k in (*cfg.ks, None):
        start = time.perf_counter()
        scores = captum_fast_rand_proj(run, k)
        seconds = time.perf_counter() - start
        print(
            f"   {'Captum TracInCPFastRandProj (last layer)':>44} {str(k):>6} "
            f"{mean_spearman(scores, i_exact):>9.4f} {'-':>11} {seconds:>7.1f}"
        )
    loss_k = cfg.ks[-1]
    for kind in ("gaussian", "sparse", "factorized"):
        start = time.perf_counter()
        ex = explainer(projection_dim=loss_k, projector=kind, projection_seed=SEED)
        c = ex.attribute(run.queries, target=run.targets, output_fn=negative_loss).contributions
        seconds = time.perf_counter() - start
        print(
            f"   {'pk_attrib ' + kind + ', output_fn=-loss':>44} {loss_k:>6} "
            f"{mean_spearman(c, i_exact):>9.4f} {relative_error(c, i_exact):>11.4f} "
            f"{seconds:>7.1f}"
        )

    results = checkpoint_accuracy(cfg, run)
    small = cfg.ks[0]
    for kind, (max_error, min_spearman, rate) in ACCURACY_TARGETS.items():
        # judged at the largest k that still projects: factorized leaves a layer with at
        # most k weights unprojected, so on this small MLP its largest k is exact
        projecting = [k for k in cfg.ks if errors[kind, k] > 1e-5]  # (float32 rounding)
        big = max(projecting) if projecting else cfg.ks[-1]
        if big != cfg.ks[-1]:
            print(
                f"   (2/{kind}: exact for k >= {min(k for k in cfg.ks if k > big)}, where "
                f"every layer fits its share of the features; judged at k = {big})"
            )
        ok = errors[kind, big] <= max_error and spearman[kind, big] >= min_spearman
        print(
            f"   {verdict(ok)} 2/{kind}: at k = {big} rel. error {errors[kind, big]:.4f} <= "
            f"{max_error} and mean Spearman {spearman[kind, big]:.4f} >= {min_spearman}"
        )
        drop = errors[kind, small] / errors[kind, big]
        min_drop = 0.5 * (big / small) ** rate
        shrinks = drop >= min_drop
        print(
            f"   {verdict(shrinks)} 2/{kind}: error shrinks like k^-{rate}: err({small}) / "
            f"err({big}) = {drop:.2f} >= {min_drop:.2f} (half of ({big}/{small})^{rate})"
        )
        results += [ok, shrinks]
    return results


def load_digits_checkpoint(net: torch.nn.Module, file: str) -> float:
    state = torch.load(file, weights_only=True)
    net.load_state_dict(state["model"])
    return state["lr"]


def captum_tracincp(run: DigitsRun) -> torch.Tensor:
    """Captum's TracInCP (every layer, not projected): the reference of part 2 (c)."""
    from captum.influence import TracInCP

    net = copy.deepcopy(run.model)
    tracin = TracInCP(
        net,
        run.train_set,
        run.checkpoints,
        load_digits_checkpoint,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=256,
    )
    return tracin.influence((run.queries, run.targets))


def checkpoint_accuracy(cfg: Config, run: DigitsRun) -> list[bool]:
    """Part 2 (c): checkpoint mode with projection against Captum, on TracInCP's inputs."""
    print(
        f"\n   (c) checkpoint mode on the {len(run.checkpoints)} end-of-epoch checkpoints, "
        "test-loss influence ranked against Captum TracInCP (every layer, not projected)"
    )
    start = time.perf_counter()
    reference = captum_tracincp(run)
    reference_s = time.perf_counter() - start

    def ours(k: int | None, kind: str = "gaussian") -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with warnings.catch_warnings():  # (k >= d warns: it only adds noise)
            warnings.simplefilter("ignore", pk.PkAttribWarning)
            ex = pk.TracInCP(
                run.model,
                run.train_set,
                run.checkpoints,
                load_digits_checkpoint,
                None,
                torch.nn.CrossEntropyLoss(reduction="none"),
                show_progress=False,
                projection_dim=k,
                projector=kind,
                projection_seed=SEED,
            )
            scores = ex.influence((run.queries, run.targets))
        return scores, time.perf_counter() - start

    plain, plain_s = ours(None)
    gap = float((plain - reference).abs().max() / reference.abs().max())
    print(
        f"   Captum TracInCP {reference_s:.1f}s; pk.TracInCP without projection {plain_s:.1f}s, "
        f"largest difference {gap:.1e} of the largest score"
    )
    print(f"   {'method':>44} {'k':>6} {'Spearman':>9} {'rel. error':>11} {'time s':>7}")
    spearman: dict[tuple[str, int], float] = {}
    for k in cfg.ks:
        start = time.perf_counter()
        captum = captum_fast_rand_proj(run, k)
        seconds = time.perf_counter() - start
        spearman["captum", k] = mean_spearman(captum, reference)
        print(
            f"   {'Captum TracInCPFastRandProj (last layer)':>44} {k:>6} "
            f"{spearman['captum', k]:>9.4f} {relative_error(captum, reference):>11.4f} "
            f"{seconds:>7.1f}"
        )
        for kind in ("gaussian", "sparse", "factorized"):
            scores, seconds = ours(k, kind)
            spearman[kind, k] = mean_spearman(scores, reference)
            print(
                f"   {'pk.TracInCP ' + kind:>44} {k:>6} {spearman[kind, k]:>9.4f} "
                f"{relative_error(scores, reference):>11.4f} {seconds:>7.1f}"
            )
    k = cfg.ks[-1]
    results = []
    for kind in ("gaussian", "sparse"):
        ok = spearman[kind, k] >= 0.95 and all(
            spearman[kind, j] > spearman["captum", j] for j in cfg.ks
        )
        print(
            f"   {verdict(ok)} 2c/{kind}: mean Spearman with TracInCP {spearman[kind, k]:.4f} "
            f">= 0.95 at k = {k}, above TracInCPFastRandProj's at every k"
        )
        results.append(ok)
    results.append(gap <= 1e-4)
    print(f"   {verdict(gap <= 1e-4)} 2c: without projection pk.TracInCP equals Captum's (float32)")
    return results


# -- part 3: throughput ----------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn()``; a single run when the first takes over 10 s."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = [once()]
    while times[0] < 10 and len(times) < repeats:
        times.append(once())
    return statistics.median(times)


class ThroughputBench:
    """Projected per-example gradients per second on one device."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        torch.manual_seed(SEED)
        self.model = mlp(cfg.throughput_width).to(device)
        gen = torch.Generator().manual_seed(SEED + 1)
        self.x = torch.randn(cfg.throughput_batch, IN_FEATURES, generator=gen).to(device)
        self.y = torch.randint(0, N_CLASSES, (cfg.throughput_batch,), generator=gen).to(device)
        named = dict(self.model.named_parameters())
        self.fm = FunctionalModel(
            self.model,
            list(named),
            {n: p.shape for n, p in named.items()},
            torch.float32,
            device,
            cfg.throughput_budget,
        )
        self.w = self.fm.flatten({n: p.detach() for n, p in named.items()})
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def projector(self, kind: str, k: int) -> tuple[float, int]:
        """(seconds, k_total) of training_features on the batch."""
        proj = make_projector(self.fm, kind, k, SEED)
        batch = (self.x, self.y)
        seconds = timed(lambda: proj.training_features(self.w, batch, self.loss_fn), self.device)
        return seconds, proj.dim

    def per_example_grads(self) -> torch.Tensor:
        params = {n: p.detach() for n, p in self.model.named_parameters()}

        def loss_one(p, x, y):
            return F.cross_entropy(functional_call(self.model, p, (x[None],)), y[None])

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, self.x, self.y)
        return torch.cat([g.reshape(self.x.shape[0], -1) for g in grads.values()], 1)

    def grads_only(self) -> float:
        return timed(self.per_example_grads, self.device)

    def stored_p(self, k: int) -> float | None:
        """Seconds of per-example grads + ``grads @ P.T`` with P (k, d) stored; None if too big."""
        d = self.fm.d
        if 4 * k * d > self.cfg.stored_p_limit:
            return None
        gen = torch.Generator(device=self.device).manual_seed(SEED)
        p = torch.randn(k, d, generator=gen, device=self.device) / math.sqrt(k)
        return timed(lambda: self.per_example_grads() @ p.T, self.device)


def throughput_part(cfg: Config) -> list[bool]:
    print(f"\n3. throughput: projected per-example gradients per second ({load()})")
    d = n_params(cfg.throughput_width)
    print(
        f"   MLP 128-{cfg.throughput_width}-{cfg.throughput_width}-10 (d = {d:,}), batch "
        f"{cfg.throughput_batch}, memory_budget {cfg.throughput_budget / GIB:g} GiB, float32"
    )
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    benches = {dev.type: ThroughputBench(cfg, dev) for dev in devices}
    batch = cfg.throughput_batch
    print(
        f"   {'method':>30} {'k':>6} {'k_total':>8} {'CPU s':>9} {'CPU ex/s':>10} {'GPU ex/s':>16}"
    )

    def gpu_column(fn: Callable[[ThroughputBench], float | None]) -> str:
        if "cuda" not in benches:
            return "n/a (no GPU)"
        seconds = fn(benches["cuda"])
        return "skipped" if seconds is None else f"{batch / seconds:.1f}"

    def row(method, k, k_total, seconds, gpu, note=""):
        cpu = "skipped" if seconds is None else f"{seconds:.2f}"
        rate = "-" if seconds is None else f"{batch / seconds:.1f}"
        print(f"   {method:>30} {str(k):>6} {str(k_total):>8} {cpu:>9} {rate:>10} {gpu:>16}{note}")

    cpu = benches["cpu"]
    grads_s = cpu.grads_only()
    row("per-example grads only", "-", d, grads_s, gpu_column(lambda b: b.grads_only()))
    cpu_times: dict[tuple[str, int], float] = {}
    estimated = []
    for k in cfg.throughput_ks:
        seconds = cpu.stored_p(k)
        note = "" if seconds is not None else f"  (P would take {4 * k * d / 1e9:.1f} GB)"
        row(
            "baseline: grads @ P.T, stored P",
            k,
            k,
            seconds,
            gpu_column(lambda b, k=k: b.stored_p(k)),
            note,
        )
        if seconds is not None:
            cpu_times["baseline", k] = seconds
        for kind in cfg.kinds:
            dense = kind in ("gaussian", "rademacher")
            smaller = [j for j in cfg.throughput_ks if j < k]
            if dense and smaller and not cfg.full:
                j = smaller[-1]  # linear in k beyond the gradients themselves
                seconds = grads_s + (cpu_times[kind, j] - grads_s) * k / j
                k_total = k
                note = f"  (est. from k = {j}: linear in k)"
                estimated.append(kind)
            else:
                seconds, k_total = cpu.projector(kind, k)
                note = ""
            cpu_times[kind, k] = seconds
            row(
                f"pk_attrib {kind}",
                k,
                k_total,
                seconds,
                gpu_column(lambda b, kind=kind, k=k: b.projector(kind, k)[0]),
                note,
            )
    k = cfg.throughput_ks[0]
    if ("baseline", k) not in cpu_times:
        print(f"   FAIL 3: no stored-P baseline at k = {k}")
        return [False]
    speedup = cpu_times["baseline", k] / cpu_times["factorized", k]
    ok = speedup >= MIN_FACTORIZED_SPEEDUP
    print(
        f"   {verdict(ok)} 3: factorized at k = {k} is {speedup:.1f}x the stored-P baseline's "
        f"throughput (>= {MIN_FACTORIZED_SPEEDUP:g}x)"
    )
    return [ok]


# -- driver -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 min)")
    parser.add_argument("--full", action="store_true", help="no scaling down (hours)")
    parser.add_argument("--parts", default="1,2,3", help="comma-separated parts to run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--tmp", default=None, help="folder for stores (default: /tmp)")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="children keep glibc's dynamic mmap threshold (see CHILD_MALLOC_THRESHOLD)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    if args.full:  # every run to the end
        cfg = dataclasses.replace(cfg, full=True)
    return args, cfg


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    warnings.simplefilter("ignore")
    tasks = {"record": child_record, "measure": child_measure, "checkpoints": child_checkpoints}
    print("RESULT " + json.dumps(tasks[spec["task"]](spec)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children too
    if args.child is not None:
        return child_main(args.child)
    global CHILD_MALLOC_THRESHOLD
    if args.malloc_default:
        CHILD_MALLOC_THRESHOLD = 0
    import captum
    import scipy

    start = time.perf_counter()
    shown = sys.argv[1:] if argv is None else argv
    print("command: python " + " ".join([sys.argv[0], *shown]))
    print(
        f"pk_attrib {pk.__version__}, torch {torch.__version__}, captum {captum.__version__}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, Python {sys.version.split()[0]}"
    )
    print(
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {load()}; GPU: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    print(f"mode: {'quick' if args.quick else 'default'}{' (full)' if cfg.full else ''}")
    parts = {int(p) for p in args.parts.split(",")}
    root = Path(tempfile.mkdtemp(prefix="bench_projection-", dir=args.tmp or "/tmp"))
    results: list[bool] = []
    try:
        if 1 in parts:
            results += memory_part(cfg, root)
        if 2 in parts:
            results += accuracy_part(cfg, root)
        if 3 in parts:
            results += throughput_part(cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{load()} at the end")
    print(f"total runtime {time.perf_counter() - start:.1f}s")
    print(f"{sum(results)}/{len(results)} targets pass: {verdict(all(results))}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
