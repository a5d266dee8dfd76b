"""Benchmark: how fast are pk_attrib's checkpoint and exact modes on the digits MLP?

Workload: scikit-learn's 8x8 digits (pixels / 16, float32), the first 1,500 images as the
training set, an MLP 64 -> 32 -> 10 with **Tanh**, trained with plain SGD (lr 0.1, batch 32,
shuffled, 10 epochs = 470 steps) while `pk.PathRecorder` records every step in memory and a
``torch.save(state_dict)`` checkpoint is written at the end of each epoch. The queries are
100 held-out digits (indices 1500..1599); the explained quantity is the logit of each
query's label.

(a) Checkpoint mode against Captum's ``TracInCP`` on the same 10 checkpoint files.
    ``TracInCP.influence((test_x, test_y))`` is timed in Captum's two settings,

    * default: ``loss_fn=CrossEntropyLoss(reduction="none")`` and a per-example test loss
      (the explained logit, ``reduction = "none"``): one ``autograd.grad`` per example;
    * ``sample_wise_grads_per_batch=True``: ``loss_fn=CrossEntropyLoss(reduction="sum")``
      and the summed logit as test loss (``reduction = "sum"``, which must match), per-sample
      gradients from Captum's Linear-layer hooks;

    each for a few training ``batch_size`` values (the fastest counts); the checkpoint
    loader reads the file with ``torch.load`` and returns the learning rate (Captum calls it
    once per checkpoint and training batch, which is part of its cost). pk_attrib is timed on
    ``PathKernelInfluence(...).attribute(test_x, target=test_y)`` over
    ``TrainingPath.from_checkpoints`` of the same files (construction is reported apart).
    Agreement: max |pk + captum| / max |captum| <= 1e-5 for every Captum setting.
    Target: pk_attrib at least 2x faster than Captum's fastest setting.

(b) Exact mode (default adaptive quadrature) against the bare gradient work it cannot avoid:
    for each step s, one nested ``vmap(vmap(grad))`` call over the ``dec.diagnostics.nodes[s]``
    Gauss-Legendre nodes x the queries (as `FunctionalModel.output_grads` does it), and one
    ``vmap(grad)`` of the per-example loss over the step's batch at w_s. The bare loop is
    written here with ``torch.func`` (functional_call + vmap + grad); only those calls are
    timed (building node parameters and gathering batches is not). Target: exact-mode wall
    time / bare time <= 1.5.

(d) With ``--large``, part (b) again on a 167k-parameter MLP 64 -> 512 -> 256 -> 10 (Tanh),
    trained the same way, 10 queries (a few minutes). Its per-example gradients of a step
    (32 x 167k float32, 21 MB) pass 4 MiB, so exact mode holds them as each Linear layer's
    factors (``diagnostics.routes``: "layer factors from a batched pass"), and the queries'
    node gradients too. Target (issue 20): the same ratio <= 1.5.

(c) For information, ``self_influence()`` of every training example: exact mode on the
    recorded path, checkpoint mode on the 10 files, and Captum's
    ``TracInCP.self_influence()`` (sample-wise gradients) on the same files.

(e) An ``output_fn`` that vmap cannot batch: exact-mode ``attribute()`` of the first
    ``E_QUERIES`` = 10 queries explaining the margin "the label's logit minus the log-sum-exp
    of the other logits", written with ``one_hot`` and ``masked_fill`` as people write it
    (``torch.func.vmap`` of its gradient fails), against the same margin written with
    ``gather`` and ``scatter`` (vmappable), same queries, default adaptive quadrature. The
    first takes pk_attrib's row route (one batched forward, the output gradient by autograd,
    the model's vector-Jacobian product per query: ``dec.diagnostics.routes``), the second
    vmaps the whole query; for information, the gather margin forced onto the row route (what
    taking it always would cost), and the gather margin with the training loss written with
    ``one_hot`` (the same cross-entropy: its per-example gradients take the row route).
    Agreement: max |difference| / max |contribution| <= 1e-5 (the one_hot margin's).
    Target: one_hot time / gather time <= 1.3. For information, one call (no warm-up, not
    repeated) on the per-example loop pk_attrib fell back to before (a failed vmap made it
    evaluate the model one example at a time, with a ``VectorizationWarning``). ``--parts e``
    runs this part alone.

(f) Models vmap cannot batch as they are (``--parts f`` runs this part alone): a GRU classifier
    (Embedding 64x32 -> ``nn.GRU`` 32 -> Linear 4 on the last step) and a BERT-style encoder
    (``transformers.BertForSequenceClassification``, 2 layers, hidden 32, 2 heads, default
    SDPA attention) given token ids *and an attention mask* (sequences of 8..16 tokens, padded
    to 16), both float32, trained with plain SGD (lr 0.1, batch 32, shuffled, 2 epochs on 512
    made-up sequences = 32 steps; ``--quick``: 1 epoch) while `pk.PathRecorder` records in
    memory. Timed (median of ``--repeats`` rounds after a warm-up, both in each round): the
    training loop (with the recorder), and ``PathKernelInfluence(...).attribute`` of 10
    queries in exact mode, the explainer built inside the timed call (its per-example-gradient
    route is chosen and checked on the first call), by the route pk_attrib takes
    (``diagnostics.gradient_route``: vmap over a GRU stand-in / over eager attention with the
    mask always built); and, before, by the per-example loop (forced through the private
    ``_fm.route``; one timed call, it is slow). Agreement of the two: max |difference| / max
    |loop|. Target: attribute time / training time <= 10 for both models (the loop: 30-70x).

(g) ReLU MLP: adaptive vs ``quadrature=2`` (``--parts g`` runs this part alone). A float64
    MLP 64 -> 32 -> 10 with **ReLU** on the same 1,500 digits, SGD lr 0.1, batch 32, 14
    epochs (658 steps), the same 100 queries: ``attribute()`` with the default adaptive
    quadrature (which splits each query's step where its ReLUs switch) against fixed
    ``quadrature=2``, with the max relative delta of each and the QuadratureWarnings raised.
    Target: adaptive time / ``quadrature=2`` time <= 3, adaptive max relative delta <= 1e-8,
    no QuadratureWarning. For information, the same for a float64 ReLU/MaxPool CNN (conv
    1 -> 8, ReLU, max-pool 2, conv 8 -> 16, ReLU, max-pool 2, linear 64 -> 10; 160 steps of
    batch 32, same data and queries), one timed run each.

Every time is the median of ``--repeats`` rounds after one untimed warm-up round; each
round runs all contenders of a part once, in rotating order, so that changing background
load hits them alike. The load average is printed before and after: on a shared machine
with more runnable processes than cores, torch's intra-op threads spin against each other
and times can be off by 10x; compare with ``--threads 1`` then.

Run from the repository root::

    python benchmarks/bench_speed.py            # default run, a few minutes on 2 cores
    python benchmarks/bench_speed.py --quick    # smoke run (300 train, 2 epochs, 20 queries)
    python benchmarks/bench_speed.py --profile  # also cProfile one exact-mode attribute()
    python benchmarks/bench_speed.py --threads 1 --repeats 5
    python benchmarks/bench_speed.py --parts e  # only part (e)
    python benchmarks/bench_speed.py --parts f  # only part (f), a few minutes
    python benchmarks/bench_speed.py --parts g  # only part (g), a few minutes

The exit status is 0 when the targets of the parts run pass and 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from captum.influence import TracInCP
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk

LR = 0.1
BATCH = 32
HIDDEN = 32
N_HELD_OUT_START = 1500  # queries come from the digits after the first 1,500
SEED = 0
AGREEMENT_TOL = 1e-5
MIN_CHECKPOINT_SPEEDUP = 2.0
MAX_EXACT_OVERHEAD = 1.5
MAX_ROUTE_RATIO = 10.0  # (f): attribute time / training time
E_QUERIES = 10  # part (e): the "same 10 queries"
MAX_ROW_ROUTE_RATIO = 1.3
MAX_KINK_RATIO = 3.0  # (g): adaptive over quadrature=2 on the ReLU MLP
KINK_EPOCHS = 14  # (g): 658 steps
CNN_STEPS = 160


@dataclass
class Config:
    """Problem size and measurement settings."""

    n_train: int
    epochs: int
    n_queries: int
    repeats: int
    # Captum's default mode takes one autograd.grad per example: its batch size matters little
    captum_default_batch_sizes: tuple[int, ...]
    captum_sample_wise_batch_sizes: tuple[int, ...]


DEFAULT = Config(
    n_train=1500,
    epochs=10,
    n_queries=100,
    repeats=3,
    captum_default_batch_sizes=(64, 256),
    captum_sample_wise_batch_sizes=(64, 128, 256),
)
QUICK = Config(
    n_train=300,
    epochs=2,
    n_queries=20,
    repeats=2,
    captum_default_batch_sizes=(128,),
    captum_sample_wise_batch_sizes=(64, 128),
)


@dataclass
class Trained:
    """A trained model with its recorded path, checkpoint files and queries."""

    model: torch.nn.Module
    train_set: TensorDataset
    queries: torch.Tensor
    targets: torch.Tensor
    path: pk.TrainingPath
    checkpoints: list[str]
    learning_rates: list[float]


# -- timing ------------------------------------------------------------------------------------


Measurement = Callable[[], tuple[float, object]]  # runs once: (seconds, result)


def wall(fn: Callable[[], object]) -> Measurement:
    """A measurement of the wall time of ``fn()``."""

    def measure() -> tuple[float, object]:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    return measure


def interleaved_medians(
    cases: dict[str, Measurement], repeats: int
) -> dict[str, tuple[float, object]]:
    """Median seconds (and last result) of each case over ``repeats`` rounds after a warm-up.

    Each round runs every case once, starting one later each round, so that a change in
    background load hits all cases alike.
    """
    names = list(cases)
    results = {name: cases[name]()[1] for name in names}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, results[name] = cases[name]()
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), results[name]) for name in names}


# -- workload ----------------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 pixels / 16 and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def make_mlp() -> torch.nn.Module:
    """The 64 -> 32 -> 10 Tanh MLP."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )


def make_large_mlp() -> torch.nn.Module:
    """The 64 -> 512 -> 256 -> 10 Tanh MLP of ``--large`` (167,498 parameters)."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, 512),
        torch.nn.Tanh(),
        torch.nn.Linear(512, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )


def record_sgd(
    train_set: TensorDataset,
    make: Callable,
    epochs: int,
    max_steps: int | None = None,
    after_epoch: Callable[[torch.nn.Module, int], None] | None = None,
):
    """Train ``make()`` with SGD (lr 0.1, batch 32, shuffled), recording every step in memory.

    Returns the model (in eval mode) and the recorder's path; ``after_epoch(model, epoch)``
    runs at the end of each whole epoch.
    """
    torch.manual_seed(SEED)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(
        train_set, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    recorder = pk.PathRecorder(model, optimizer, store=None)
    steps = 0
    for epoch in range(epochs):
        for xb, yb in recorder.watch(loader):
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
        if after_epoch is not None:
            after_epoch(model, epoch)
    recorder.close()
    model.eval()
    return model, recorder.path


def train(cfg: Config, checkpoint_dir: Path, make: Callable = make_mlp) -> Trained:
    """Train with SGD, recording every step and saving a checkpoint after each epoch."""
    x, y = digits()
    train_set = TensorDataset(x[: cfg.n_train], y[: cfg.n_train])
    queries = x[N_HELD_OUT_START : N_HELD_OUT_START + cfg.n_queries]
    targets = y[N_HELD_OUT_START : N_HELD_OUT_START + cfg.n_queries]
    checkpoints = []

    def save(model, epoch):
        checkpoints.append(str(checkpoint_dir / f"epoch{epoch:02d}.pt"))
        torch.save(model.state_dict(), checkpoints[-1])

    model, path = record_sgd(train_set, make, cfg.epochs, after_epoch=save)
    return Trained(model, train_set, queries, targets, path, checkpoints, [LR] * len(checkpoints))


# -- (a) checkpoint mode against Captum's TracInCP ----------------------------------------------


class ExplainedLogit:
    """Captum test loss: the logit of the label, per example or summed over the batch."""

    def __init__(self, reduction: str):
        self.reduction = reduction

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.gather(1, targets[:, None])[:, 0]
        return logits.sum() if self.reduction == "sum" else logits


def make_tracin(run: Trained, sample_wise: bool, batch_size: int) -> TracInCP:
    """Captum's TracInCP over the checkpoint files, on its own copy of the model."""
    lr_of = dict(zip(run.checkpoints, run.learning_rates, strict=True))

    def load(net: torch.nn.Module, file: str) -> float:
        net.load_state_dict(torch.load(file, weights_only=True))
        return lr_of[file]

    reduction = "sum" if sample_wise else "none"
    return TracInCP(
        copy.deepcopy(run.model),
        run.train_set,
        checkpoints=run.checkpoints,
        checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction=reduction),
        batch_size=batch_size,
        test_loss_fn=ExplainedLogit(reduction),
        sample_wise_grads_per_batch=sample_wise,
    )


def bench_checkpoint_mode(run: Trained, cfg: Config) -> bool:
    """Part (a): time pk_attrib's checkpoint mode and Captum; check agreement and speed."""
    print("\n(a) checkpoint mode vs Captum TracInCP")
    print(f"    {len(run.checkpoints)} checkpoints, {cfg.n_train} train, {cfg.n_queries} queries")
    model = copy.deepcopy(run.model)
    model.load_state_dict(torch.load(run.checkpoints[-1], weights_only=True))
    start = time.perf_counter()
    path = pk.TrainingPath.from_checkpoints(run.checkpoints, run.learning_rates, model=model)
    explainer = pk.PathKernelInfluence(
        model, run.train_set, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    setup = time.perf_counter() - start
    assert explainer.mode == "checkpoint"
    pk_name = "pk_attrib checkpoint attribute()"
    cases = {pk_name: wall(lambda: explainer.attribute(run.queries, target=run.targets))}
    settings = [(False, size) for size in cfg.captum_default_batch_sizes]
    settings += [(True, size) for size in cfg.captum_sample_wise_batch_sizes]
    for sample_wise, batch_size in settings:
        tracin = make_tracin(run, sample_wise, batch_size)
        name = f"captum {'sample_wise' if sample_wise else 'default'} batch_size={batch_size}"
        cases[name] = wall(lambda t=tracin: t.influence((run.queries, run.targets)))
    timed = interleaved_medians(cases, cfg.repeats)
    for name, (seconds, _) in timed.items():
        print(f"    {name:<40s} {seconds * 1e3:9.1f} ms")
    print(f"    {'(pk_attrib from_checkpoints + __init__)':<40s} {setup * 1e3:9.1f} ms")

    pk_seconds, dec = timed.pop(pk_name)
    agree = True
    for name, (_, scores) in timed.items():
        scale = float(scores.abs().max())
        diff = float((dec.contributions + scores).abs().max())
        ok = diff <= AGREEMENT_TOL * scale
        agree &= ok
        print(
            f"    max |pk + {name}| = {diff:.3e} (max |score| {scale:.3e}, "
            f"relative {diff / scale:.2e}) {'ok' if ok else 'MISMATCH'}"
        )
    fastest = min(timed, key=lambda k: timed[k][0])
    speedup = timed[fastest][0] / pk_seconds
    fast = speedup >= MIN_CHECKPOINT_SPEEDUP
    print(f"    fastest Captum setting: {fastest} ({timed[fastest][0] * 1e3:.1f} ms)")
    print(
        f"    speedup of pk_attrib over it: {speedup:.2f}x (target >= {MIN_CHECKPOINT_SPEEDUP}x); "
        f"agreement within {AGREEMENT_TOL:g}: {'yes' if agree else 'no'}"
    )
    passed = agree and fast
    print(f"    (a) {'PASS' if passed else 'FAIL'}")
    return passed


# -- (b) exact mode against its bare gradient evaluations ---------------------------------------


def gauss_legendre(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of q-point Gauss-Legendre quadrature on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(q)
    return torch.tensor((x + 1.0) / 2.0), torch.tensor(w / 2.0)


@dataclass
class BareStep:
    """Inputs of one step's gradient calls, built before the clock starts."""

    node_params: dict[str, torch.Tensor]  # (q, *shape) per parameter: w_s + t_k Δ_s
    params: dict[str, torch.Tensor]  # w_s
    batch_x: torch.Tensor
    batch_y: torch.Tensor


def prepare_bare_steps(run: Trained, nodes: torch.Tensor) -> list[BareStep]:
    """Node parameters and batches for every step, with the node counts exact mode used."""
    path, (x, y) = run.path, run.train_set.tensors
    steps = []
    for s in range(len(path)):
        w, w_next = path.params(s), path.params(s + 1)
        t, _ = gauss_legendre(int(nodes[s]))
        at_nodes = {}
        for name, value in w.items():
            t_shaped = t.to(value.dtype).reshape(-1, *([1] * value.dim()))
            at_nodes[name] = value[None] + t_shaped * (w_next[name] - value)[None]
        indices = path.step(s).indices
        steps.append(BareStep(at_nodes, dict(w), x[indices], y[indices]))
    return steps


def bare_gradients(run: Trained, steps: list[BareStep]) -> tuple[float, None]:
    """Seconds spent in the torch.func gradient calls exact mode cannot avoid, all steps."""
    model = copy.deepcopy(run.model).eval()
    loss_fn = torch.nn.CrossEntropyLoss()

    def query_value(params, x, t):
        out = functional_call(model, params, (x.unsqueeze(0),))
        return out.gather(1, t.reshape(1, 1)).reshape(())

    def example_loss(params, x, label):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), label.unsqueeze(0))

    per_query = vmap(grad(query_value), in_dims=(None, 0, 0))
    query_grads = vmap(per_query, in_dims=(0, None, None))  # nodes x queries
    loss_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))  # batch members
    total = 0.0
    for step in steps:
        start = time.perf_counter()
        query_grads(step.node_params, run.queries, run.targets)
        loss_grads(step.params, step.batch_x, step.batch_y)
        total += time.perf_counter() - start
    return total, None


def profile_exact(explainer: pk.PathKernelInfluence, run: Trained, lines: int = 30) -> None:
    """Print the top of a cProfile of one exact-mode attribute() (cumulative time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    explainer.attribute(run.queries, target=run.targets)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    print(out.getvalue())


def bench_exact_mode(run: Trained, cfg: Config, profile: bool, part: str = "b") -> bool:
    """Part (b) (and (d)): exact-mode wall time over the bare gradient time."""
    if part == "b":
        print("\n(b) exact mode vs bare torch.func gradients")
    explainer = pk.PathKernelInfluence(
        run.model, run.train_set, run.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    assert explainer.mode == "exact"

    def attribute():
        return explainer.attribute(run.queries, target=run.targets)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pk.PkAttribWarning)
        dec = attribute()  # the node counts the bare loop needs
    for message in sorted({str(w.message) for w in caught}):
        print(f"    warning: {message}")
    diag = dec.diagnostics
    nodes = diag.nodes
    used = int(nodes.sum()) * cfg.n_queries
    counts = {int(q): int((nodes == q).sum()) for q in nodes.unique()}
    print(f"    steps {len(run.path)}, nodes per step {counts}, mean {nodes.float().mean():.2f}")
    print(
        f"    query gradients: {diag.query_gradients} evaluated, {used} in accepted rules "
        f"({diag.query_gradients - used} rejected); train gradients: {diag.train_gradients}"
    )
    print(f"    |delta| max {float(dec.delta.abs().max()):.2e}")
    steps = prepare_bare_steps(run, nodes)
    exact_name, bare_name = "pk_attrib exact attribute()", "bare gradient calls"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pk.PkAttribWarning)  # reported above
        timed = interleaved_medians(
            {exact_name: wall(attribute), bare_name: lambda: bare_gradients(run, steps)},
            cfg.repeats,
        )
    seconds, bare = timed[exact_name][0], timed[bare_name][0]
    print(f"    {exact_name:<40s} {seconds * 1e3:9.1f} ms")
    print(f"    {bare_name:<40s} {bare * 1e3:9.1f} ms")
    ratio = seconds / bare
    passed = ratio <= MAX_EXACT_OVERHEAD
    print(f"    routes {diag.routes}")
    print(f"    ratio {ratio:.2f} (target <= {MAX_EXACT_OVERHEAD})")
    print(f"    ({part}) {'PASS' if passed else 'FAIL'}")
    if profile:
        print("\n    cProfile of one exact-mode attribute():")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pk.PkAttribWarning)
            profile_exact(explainer, run)
    return passed


# -- (f) models vmap cannot batch as they are: GRU, BERT with an attention mask ------------------


ROUTE_VOCAB, ROUTE_LEN, ROUTE_WIDTH, ROUTE_TRAIN = 64, 16, 32, 512


class GRUClassifier(torch.nn.Module):
    """Embedding -> nn.GRU -> Linear on the last time step."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(ROUTE_VOCAB, ROUTE_WIDTH)
        self.gru = torch.nn.GRU(ROUTE_WIDTH, ROUTE_WIDTH, batch_first=True)
        self.head = torch.nn.Linear(ROUTE_WIDTH, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(ids))[0][:, -1])


class MaskedBert(torch.nn.Module):
    """A small BertForSequenceClassification taking (n, 2, L): token ids and padding mask."""

    def __init__(self):
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=ROUTE_VOCAB,
            hidden_size=ROUTE_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * ROUTE_WIDTH,
            max_position_embeddings=ROUTE_LEN,
            num_labels=4,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def route_data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n + 10 padded token sequences (ids, mask: (n + 10, L)) and 4-class labels."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, ROUTE_VOCAB, (n + 10, ROUTE_LEN), generator=g)
    lengths = torch.randint(ROUTE_LEN // 2, ROUTE_LEN + 1, (n + 10,), generator=g)
    mask = (torch.arange(ROUTE_LEN) < lengths[:, None]).long()
    ids = ids * mask
    labels = ((ids == 1).sum(1) + (ids == 2).sum(1)) % 4
    return ids, mask, labels


def bench_route(name: str, make: Callable, x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """One model of part (f): training time, attribute time by its route and by the loop."""
    n = ROUTE_TRAIN
    train_set = TensorDataset(x[:n], y[:n])
    queries, targets = x[n:], y[n:]
    loss_fn = torch.nn.CrossEntropyLoss()

    def fit() -> tuple[torch.nn.Module, pk.TrainingPath]:
        """The same training run each time (fixed seeds), recorded in memory."""
        torch.manual_seed(SEED)
        model = make()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(
            train_set, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
        )
        recorder = pk.PathRecorder(model, optimizer, store=None)
        for _ in range(1 if cfg is QUICK else 2):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
        recorder.close()
        return model.eval(), recorder.path

    model, path = fit()

    def attribute(loop: bool = False):
        explainer = pk.PathKernelInfluence(model, train_set, path, loss_fn, show_progress=False)
        if loop:  # before: the per-example loop, forced
            explainer._fm.route = "per-example loop"
        return explainer.attribute(queries, target=targets)

    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        # in the same rounds, so that changing background load hits both alike
        timed = interleaved_medians({"training": wall(fit), "route": wall(attribute)}, cfg.repeats)
    training, seconds, dec = timed["training"][0], *timed["route"]
    looped, before = wall(lambda: attribute(loop=True))()
    scale = float(before.contributions.abs().max())
    agreement = float((dec.contributions - before.contributions).abs().max()) / scale
    ratio, ratio_before = seconds / training, looped / training
    d = sum(p.numel() for p in model.parameters())
    print(f"    {name}: {d} parameters, {len(path)} steps, {len(queries)} queries")
    print(f"      training (recorded)                      {training * 1e3:9.1f} ms")
    print(f"      attribute, route {dec.diagnostics.gradient_route!r:<24s}{seconds * 1e3:9.1f} ms")
    print(f"      attribute, route 'per-example loop'      {looped * 1e3:9.1f} ms")
    print(
        f"      ratio to training: {ratio:.1f} (before: {ratio_before:.1f}); "
        f"route vs loop: max|diff|/max|loop| {agreement:.1e}"
    )
    return ratio <= MAX_ROUTE_RATIO


def bench_routes(cfg: Config) -> bool:
    """Part (f): models vmap cannot batch, attribute time over training time."""
    print(f"\n(f) models vmap cannot batch as they are: attribute / training <= {MAX_ROUTE_RATIO}")
    ids, mask, labels = route_data(ROUTE_TRAIN)
    passed = bench_route("GRU classifier", GRUClassifier, ids, labels, cfg)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("    BERT: skipped (transformers is not installed)")
    else:
        stacked = torch.stack([ids, mask], 1)
        passed = bench_route("BERT, attention mask", MaskedBert, stacked, labels, cfg) and passed
    print(f"    (f) {'PASS' if passed else 'FAIL'}")
    return passed


# -- main --------------------------------------------------------------------------------------


# -- (c) self-influence, side by side with Captum (information, no target) -------------------


def bench_self_influence(run: Trained, cfg: Config) -> None:
    """Part (c): self_influence() in exact and checkpoint mode, and Captum's on the files."""
    print("\n(c) self_influence() of every training example (information)")
    model = copy.deepcopy(run.model)
    model.load_state_dict(torch.load(run.checkpoints[-1], weights_only=True))
    loss_fn = torch.nn.CrossEntropyLoss()
    exact = pk.PathKernelInfluence(run.model, run.train_set, run.path, loss_fn, show_progress=False)
    path = pk.TrainingPath.from_checkpoints(run.checkpoints, run.learning_rates, model=model)
    tracin_pk = pk.PathKernelInfluence(model, run.train_set, path, loss_fn, show_progress=False)
    batch_size = max(cfg.captum_sample_wise_batch_sizes)
    tracin = make_tracin(run, True, batch_size)
    cases = {
        f"pk_attrib exact ({len(run.path)} steps)": wall(
            lambda: exact.self_influence(score="contribution")
        ),
        f"pk_attrib checkpoint ({len(run.checkpoints)} files)": wall(tracin_pk.self_influence),
        f"captum sample_wise batch_size={batch_size}": wall(tracin.self_influence),
    }
    timed = interleaved_medians(cases, cfg.repeats)
    for name, (seconds, _) in timed.items():
        print(f"    {name:<40s} {seconds * 1e3:9.1f} ms")
    (_, ours), (_, theirs) = list(timed.values())[1:]
    diff = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"    checkpoint mode vs Captum: max relative difference {diff:.1e}")


# -- (e) an output_fn that vmap cannot batch -----------------------------------------------------


def margin_one_hot(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The label's logit minus the log-sum-exp of the others, with one_hot and masked_fill."""
    hot = torch.nn.functional.one_hot(target, outputs.shape[-1]).bool()
    own = outputs.masked_fill(~hot, 0.0).sum(-1)
    return own - outputs.masked_fill(hot, float("-inf")).logsumexp(-1)


def margin_gather(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same margin with gather and scatter, which torch.func.vmap batches."""
    own = outputs.gather(1, target[:, None])[:, 0]
    return own - outputs.scatter(1, target[:, None], float("-inf")).logsumexp(-1)


def cross_entropy_one_hot(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy written with one_hot (vmap cannot batch its gradient)."""
    hot = torch.nn.functional.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
    return -(hot * outputs.log_softmax(-1)).sum(-1).mean()


def bench_output_fn_rows(run: Trained, cfg: Config) -> bool:
    """Part (e): the one_hot margin (row route) against the gather margin (vmap)."""
    print(f"\n(e) output_fn that vmap cannot batch, {E_QUERIES} queries")
    queries, targets = run.queries[:E_QUERIES], run.targets[:E_QUERIES]
    explainer = pk.PathKernelInfluence(
        run.model, run.train_set, run.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    names = {
        "one_hot": "one_hot + masked_fill margin",
        "gather": "gather margin (vmappable)",
        "forced": "gather margin, row route forced",
    }

    def forced(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return margin_gather(outputs, target)

    # (information: what the row route would cost where vmap works, i.e. if it were the rule)
    explainer._fm._route.set(forced, "batched forward + row VJP")
    fns = {"one_hot": margin_one_hot, "gather": margin_gather, "forced": forced}
    cases = {
        names[k]: wall(lambda fn=fn: explainer.attribute(queries, targets, output_fn=fn))
        for k, fn in fns.items()
    }
    # (information: the training side, the cross-entropy written with one_hot)
    names["loss"] = "gather margin, one_hot cross-entropy loss"
    one_hot_loss = pk.PathKernelInfluence(
        run.model, run.train_set, run.path, cross_entropy_one_hot, loss_reduction="mean",
        show_progress=False,
    )  # fmt: skip
    cases[names["loss"]] = wall(
        lambda: one_hot_loss.attribute(queries, targets, output_fn=margin_gather)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pk.PkAttribWarning)
        timed = interleaved_medians(cases, cfg.repeats)
    for message in sorted({str(w.message)[:120] for w in caught}):
        print(f"    warning: {message}")
    for name in names.values():
        seconds, dec = timed[name]
        print(f"    {name:<40s} {seconds * 1e3:9.1f} ms   routes {dec.diagnostics.routes}")
    rows, vmapped = timed[names["one_hot"]][1], timed[names["gather"]][1]
    scale = float(vmapped.contributions.abs().max())
    diff = float((rows.contributions - vmapped.contributions).abs().max()) / scale
    print(f"    max |one_hot - gather| / max |contribution| = {diff:.1e}")
    before = pk.PathKernelInfluence(
        run.model, run.train_set, run.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    before._fm.route = "per-example loop"  # what a failed vmap made pk_attrib do before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pk.PkAttribWarning)
        seconds, _ = wall(lambda: before.attribute(queries, targets, output_fn=margin_one_hot))()
    print(f"    {'(before: one example at a time, once)':<40s} {seconds * 1e3:9.1f} ms")
    loss_ratio = timed[names["loss"]][0] / timed[names["gather"]][0]
    loss_diff = float((timed[names["loss"]][1].contributions - vmapped.contributions).abs().max())
    print(
        f"    one_hot loss / CrossEntropyLoss {loss_ratio:.2f} (information), max |difference| "
        f"/ max |contribution| = {loss_diff / scale:.1e}"
    )
    ratio = timed[names["one_hot"]][0] / timed[names["gather"]][0]
    passed = ratio <= MAX_ROW_ROUTE_RATIO and diff <= AGREEMENT_TOL
    print(f"    ratio one_hot / gather {ratio:.2f} (target <= {MAX_ROW_ROUTE_RATIO})")
    print(f"    (e) {'PASS' if passed else 'FAIL'}")


# -- (g) kinks: a ReLU MLP and a ReLU/MaxPool CNN, adaptive vs quadrature=2 -------------------


def make_relu_mlp() -> torch.nn.Module:
    """The 64 -> 32 -> 10 ReLU MLP of part (g), float64."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
    ).double()


def make_relu_cnn() -> torch.nn.Module:
    """The ReLU/MaxPool CNN of part (g), float64 (8x8 digits, 1,706 parameters)."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).double()


def train_float64(cfg: Config, make: Callable, epochs: int, max_steps: int | None = None):
    """Train in float64 with SGD (lr 0.1, batch 32), recording every step in memory."""
    x, y = digits()
    x = x.double()
    train_set = TensorDataset(x[: cfg.n_train], y[: cfg.n_train])
    model, path = record_sgd(train_set, make, epochs, max_steps)
    queries = x[N_HELD_OUT_START : N_HELD_OUT_START + cfg.n_queries]
    targets = y[N_HELD_OUT_START : N_HELD_OUT_START + cfg.n_queries]
    return model, train_set, path, queries, targets


def kink_case(model, train_set, path, queries, targets, quadrature) -> Measurement:
    """One attribute() with this quadrature: (seconds, (decomposition, QuadratureWarnings))."""
    explainer = pk.PathKernelInfluence(
        model,
        train_set,
        path,
        torch.nn.CrossEntropyLoss(),
        quadrature=quadrature,
        show_progress=False,
    )

    def attribute():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pk.QuadratureWarning)
            dec = explainer.attribute(queries, target=targets)
        return dec, sum(w.category is pk.QuadratureWarning for w in caught)

    return wall(attribute)


def print_kink_result(name: str, seconds: float, result) -> None:
    """One line of part (g): time, max relative delta, warnings, nodes per step."""
    dec, warned = result
    nodes = dec.diagnostics.nodes.double()
    print(
        f"    {name:<28s} {seconds * 1e3:9.1f} ms  max relative delta "
        f"{float(dec.relative_delta.max()):.1e}  QuadratureWarnings {warned}  nodes per step "
        f"mean {float(nodes.mean()):.2f} max {int(nodes.max())}  query gradients "
        f"{dec.diagnostics.query_gradients}"
    )


def bench_kinks(cfg: Config) -> bool:
    """Part (g): adaptive vs quadrature=2 on a ReLU MLP (target) and a ReLU/MaxPool CNN."""
    print("\n(g) kinks: adaptive vs quadrature=2, float64 ReLU MLP 64-32-10")
    start = time.perf_counter()
    epochs = KINK_EPOCHS if cfg is DEFAULT else cfg.epochs
    run = train_float64(cfg, make_relu_mlp, epochs)
    print(f"    trained {len(run[2])} steps in {time.perf_counter() - start:.1f} s")
    timed = interleaved_medians(
        {
            "adaptive (default)": kink_case(*run, "adaptive"),
            "quadrature=2": kink_case(*run, 2),
        },
        cfg.repeats,
    )
    for name, (seconds, result) in timed.items():
        print_kink_result(name, seconds, result)
    (adaptive, (dec, warned)), (fixed, _) = timed.values()
    ratio = adaptive / fixed
    worst = float(dec.relative_delta.max())
    passed = ratio <= MAX_KINK_RATIO and worst <= 1e-8 and warned == 0
    print(
        f"    ratio {ratio:.2f} (target <= {MAX_KINK_RATIO}); adaptive max relative delta "
        f"{worst:.1e} (target <= 1e-8), {warned} QuadratureWarning(s) (target 0)"
    )
    print(f"    (g) {'PASS' if passed else 'FAIL'}")
    print("\n(g) for information: float64 ReLU/MaxPool CNN, one run each")
    start = time.perf_counter()
    cnn = train_float64(cfg, make_relu_cnn, 100, CNN_STEPS if cfg is DEFAULT else 20)
    print(f"    trained {len(cnn[2])} steps in {time.perf_counter() - start:.1f} s")
    for name, quadrature in (("adaptive (default)", "adaptive"), ("quadrature=2", 2)):
        print_kink_result(name, *kink_case(*cnn, quadrature)())
    return passed


def print_load(label: str) -> None:
    """Print the 1-minute load average against the core count."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = " (busy machine: times are unreliable)" if load > cores + 0.5 else ""
    print(f"{label}: {load:.2f} on {cores} cores{note}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and print PASS/FAIL; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile exact mode")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--large",
        action="store_true",
        help="also (d): part (b) on a 167k-parameter MLP 64-512-256-10, 10 queries (minutes)",
    )
    parser.add_argument(
        "--parts",
        default="abcefg",
        help="which parts to run, e.g. 'e' or 'ab' (default: abcefg; d comes with --large)",
    )
    args = parser.parse_args(argv)
    parts = set(args.parts) | ({"d"} if args.large else set())
    unknown = parts - set("abcdefg")
    if unknown:
        parser.error(f"--parts: unknown part(s) {''.join(sorted(unknown))}; valid: a, ..., g")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Captum's sample-wise path sets requires_grad on the inputs itself and says so each time
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    cfg = QUICK if args.quick else DEFAULT
    if args.repeats:
        cfg.repeats = args.repeats
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; pk_attrib "
        f"{getattr(pk, '__version__', '?')}; MLP 64-{HIDDEN}-10 Tanh, float32, SGD lr {LR}, "
        f"batch {BATCH}, {cfg.epochs} epochs on {cfg.n_train} digits, {cfg.n_queries} queries, "
        f"median of {cfg.repeats} after a warm-up"
    )
    print_load("load average at start")
    alone = {"f": bench_routes, "g": bench_kinks}  # (they train their own models)
    if parts and parts <= set(alone):
        passed = all([alone[p](cfg) for p in sorted(parts)])
        print_load("\nload average at end")
        print(f"\noverall: {'PASS' if passed else 'FAIL'}")
        return 0 if passed else 1
    with tempfile.TemporaryDirectory(prefix="pk_bench_speed_") as folder:
        start = time.perf_counter()
        run = train(cfg, Path(folder))
        print(f"trained {len(run.path)} steps in {time.perf_counter() - start:.1f} s")
        passed = []
        if "a" in parts:
            passed.append(bench_checkpoint_mode(run, cfg))
        if "b" in parts:
            passed.append(bench_exact_mode(run, cfg, args.profile))
        if "c" in parts:
            bench_self_influence(run, cfg)
        if "e" in parts:
            passed.append(bench_output_fn_rows(run, cfg))
        if "f" in parts:
            passed.append(bench_routes(cfg))
        if "d" in parts:
            large_cfg = replace(cfg, n_queries=10)
            print("\n(d) exact mode vs bare torch.func gradients, MLP 64-512-256-10, 10 queries")
            start = time.perf_counter()
            large = train(large_cfg, Path(folder), make_large_mlp)
            print(f"    trained {len(large.path)} steps in {time.perf_counter() - start:.1f} s")
            passed.append(bench_exact_mode(large, large_cfg, False, part="d"))
        if "g" in parts:
            passed.append(bench_kinks(cfg))
    print_load("\nload average at end")
    overall = all(passed)
    print(f"\noverall: {'PASS' if overall else 'FAIL'}")
    return 0 if overall else 1


if __name__ == "__main__":
    sys.exit(main())
