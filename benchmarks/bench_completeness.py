"""Benchmark: how complete is the decomposition, per quadrature rule, and what does it cost?

pk_attrib writes a prediction as f(x; w_S) = b(x) + sum_i c_i(x) + delta(x). In exact mode
delta is the quadrature error of the query-side integrals phi_s = int_0^1 grad f(x; w_s + t
Delta_s) dt; in checkpoint mode (TracIn) it is the approximation error. This script reports
the **relative completeness residual** ``dec.relative_delta`` = |delta| / |f(x; w_S) - f(x; w_0)|
(max and median over the queries) and the **gradient evaluations** spent
(``diagnostics.query_gradients + diagnostics.train_gradients``, and the query side alone;
rejected adaptive nodes included) for

* quadrature rules: ``left`` (the tangent kernel at w_s: Domingos's discretisation and TracIn
  per step), ``midpoint``, Gauss-Legendre with q = 2 and q = 3 nodes, and ``adaptive``
  (Gauss-Legendre with as many nodes as each step needs to match the exact output change;
  per-step rtol 1e-9 in float64, 1e-5 in float32, the library defaults);
* training runs: SGD lr 0.1, SGD lr 0.5, SGD momentum 0.9 lr 0.05, Adam lr 1e-3, on an MLP
  64 -> 32 -> Tanh -> 10; the three SGD runs also on 64 -> 32 -> LayerNorm -> GELU -> 10;
* dtypes float32 and float64: the model (built once in float32 from seed 0, then cast, so both
  dtypes start from the same weights), the data, the training and the explanation all run in
  that dtype;
* separately, checkpoint mode (``TrainingPath.from_checkpoints``) with K = 5, 10, 30
  snapshots of the SGD lr 0.1 Tanh run, in both dtypes.

Setup: scikit-learn's ``load_digits`` (1,797 real 8x8 images, pixels / 16); the first 1,500
are the training set, and the queries are 50 images spread evenly over the last 297
(``--queries``), each explained at its true label's logit (``target=y``). Batch 32 with a
seeded shuffle (the same batch order for every run), 3 epochs (141 steps), cross-entropy
loss. Each run is recorded once (``PathRecorder(..., store=None)``, every step) and its path
is reused by every rule; the wall time of each cell covers building ``PathKernelInfluence``
and ``attribute``. Warnings raised by pk_attrib (or anything else) while training or
explaining are counted per cell and printed in full after the table.

Checkpoint weights. TracIn's checkpoint sum c_i ~ -sum_k eta_k grad f(x; w_k) . g_i(w_k) runs
over **all** N training examples at every checkpoint, whereas the recorded run moved each
example with weight lr/|B| once per epoch, i.e. lr/|B| * (|B|/N) = lr/N per optimizer step on
average. So a checkpoint standing for m_k optimizer steps (E_k = m_k |B| / N epochs) gets
eta_k = lr * m_k / N = lr * E_k / |B|, and sum_k eta_k = lr * S / N, the total weight every
example carried along the run. The K checkpoints are w_{s_k}, s_k = round(k S / (K - 1)),
k = 0..K-1: they include w_0 (so ``relative_delta`` compares against the same change
f(w_S) - f(w_0) as exact mode) and w_S (the explained model); each stands for half of each
adjacent interval, m_k = (s_{k+1} - s_{k-1}) / 2 (one-sided at the ends), which makes the sum
the trapezoid rule for the gradient-flow integral. Checked numerically on this run (float64,
K = 5, 10, 30): equal weights lr S / (K N) and left-Riemann weights (eta = 0 on the final
checkpoint) give max and median residuals within a factor 1.7 of the trapezoid ones (whose
median is the smallest or close to it), so the placement matters little; the scale is what
matters: Captum's habit of eta_k = lr is off by a factor N / m_k (residuals of 1e2-1e3;
shown as one extra row for K = 10). A last row uses every recorded snapshot (K = S + 1):
what remains there is mostly the difference between the full-batch gradients TracIn uses
and the mini-batch gradients of the run (SGD noise), which more checkpoints cannot remove.

Run from the repository root::

    python benchmarks/bench_completeness.py            # default run, 1.5-2.5 min on 2 busy cores
    python benchmarks/bench_completeness.py --quick    # smoke run, under ~30 s
    python benchmarks/bench_completeness.py --epochs 5 --queries 100 --no-layernorm

Torch runs on one intra-op thread (``--threads``): the model has 2,410 parameters, and on a
busy 2-core machine two threads made each cell up to 100x slower. Wall times are single
measurements on a possibly shared machine, so read them as rough costs; the gradient
evaluation counts are the machine-independent measure. float32 residuals near 1e-7-1e-6 are
rounding noise and can change with the thread count (summation order).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk

TARGET = 1e-6  # the completeness residual the summary checks for
BATCH_SIZE = 32
N_HELD_OUT = 297  # load_digits has 1,797 images; the last 297 hold the queries
QUADRATURES: tuple[tuple[str, str | int], ...] = (
    ("left", "left"),
    ("midpoint", "midpoint"),
    ("GL q=2", 2),
    ("GL q=3", 3),
    ("adaptive", "adaptive"),
)
DTYPES = (torch.float32, torch.float64)
CHECKPOINT_COUNTS = (5, 10, 30)
CHECKPOINT_RUN = "SGD lr 0.1"
CHECKPOINT_ARCH = "Tanh"


# -- runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One optimizer setting."""

    name: str
    make_optimizer: Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer]
    lr: float
    sgd: bool  # also trained on the LayerNorm+GELU network


RUNS = (
    RunSpec("SGD lr 0.1", lambda p: torch.optim.SGD(p, lr=0.1), 0.1, True),
    RunSpec("SGD lr 0.5", lambda p: torch.optim.SGD(p, lr=0.5), 0.5, True),
    RunSpec("SGD mom 0.9 lr 0.05", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 0.05, True),
    RunSpec("Adam lr 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3), 1e-3, False),
)
ARCHS = {  # short name (in the table) -> layers
    "Tanh": "64 -> 32 -> Tanh -> 10",
    "LN+GELU": "64 -> 32 -> LayerNorm -> GELU -> 10",
}


def make_model(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded MLP of the given architecture, built in float32 and cast to ``dtype``."""
    torch.manual_seed(0)
    if arch == "Tanh":
        layers = [torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)]
    elif arch == "LN+GELU":
        layers = [
            torch.nn.Linear(64, 32),
            torch.nn.LayerNorm(32),
            torch.nn.GELU(),
            torch.nn.Linear(32, 10),
        ]
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return torch.nn.Sequential(*layers).to(dtype)


@dataclass
class Data:
    """Training set and queries in one dtype."""

    train: TensorDataset
    query_x: torch.Tensor
    query_y: torch.Tensor


def load_data(n_train: int, n_queries: int, dtype: torch.dtype) -> Data:
    """Digits / 16: the first ``n_train`` for training, queries spread over the last 297."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=dtype)
    y = torch.tensor(digits.target, dtype=torch.int64)
    held_x, held_y = x[-N_HELD_OUT:], y[-N_HELD_OUT:]
    pick = torch.linspace(0, N_HELD_OUT - 1, min(n_queries, N_HELD_OUT)).round().long()
    return Data(TensorDataset(x[:n_train], y[:n_train]), held_x[pick], held_y[pick])


@dataclass
class Recorded:
    """A trained model and its recorded path."""

    model: torch.nn.Module
    path: pk.TrainingPath
    seconds: float
    warnings: list[str]


def record_run(spec: RunSpec, arch: str, data: Data, dtype: torch.dtype, epochs: int) -> Recorded:
    """Train from seed 0 for ``epochs`` epochs with a seeded shuffle, recording every step."""
    model = make_model(arch, dtype)
    optimizer = spec.make_optimizer(list(model.parameters()))
    loader = DataLoader(
        data.train,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder = pk.PathRecorder(model, optimizer, store=None)
        for _ in range(epochs):
            for x, y in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        recorder.close()
    model.eval()
    return Recorded(model, recorder.path, time.perf_counter() - start, describe(caught))


# -- one cell -------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One decomposition: residuals, cost and time."""

    run: str
    dtype: torch.dtype
    rule: str
    max_rel: float
    median_rel: float
    query_gradients: int
    train_gradients: int
    mean_nodes: float
    max_nodes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def gradients(self) -> int:
        return self.query_gradients + self.train_gradients

    @property
    def meets_target(self) -> bool:
        return self.max_rel <= TARGET


def describe(caught: list[warnings.WarningMessage]) -> list[str]:
    """``Category: message`` for each caught warning."""
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def explain(
    label: str,
    rule: str,
    recorded: Recorded,
    data: Data,
    dtype: torch.dtype,
    path: pk.TrainingPath | None = None,
    quadrature: str | int = "adaptive",
) -> Cell:
    """Decompose the queries with one rule (or one checkpoint path) and measure it."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer = pk.PathKernelInfluence(
            recorded.model,
            data.train,
            path or recorded.path,
            torch.nn.CrossEntropyLoss(),
            quadrature=quadrature,
            dtype=dtype,
            show_progress=False,
        )
        dec = explainer.attribute(data.query_x, target=data.query_y)
    seconds = time.perf_counter() - start
    rel = dec.relative_delta.double()
    diag = dec.diagnostics
    nodes = diag.nodes.double()
    return Cell(
        run=label,
        dtype=dtype,
        rule=rule,
        max_rel=float(rel.max()),
        median_rel=float(rel.median()),
        query_gradients=int(diag.query_gradients),
        train_gradients=int(diag.train_gradients),
        mean_nodes=float(nodes.mean()),
        max_nodes=int(nodes.max()),
        seconds=seconds,
        warnings=describe(caught),
    )


# -- checkpoint mode -------------------------------------------------------------------------------


def checkpoint_steps(n_steps: int, k: int) -> list[int]:
    """K evenly spaced snapshot indices from 0 to ``n_steps`` inclusive."""
    if k < 2:
        raise ValueError("checkpoint mode here needs K >= 2 (w_0 and w_S)")
    return sorted({round(i * n_steps / (k - 1)) for i in range(k)})


def trapezoid_etas(steps: list[int], lr: float, n_train: int) -> list[float]:
    """eta_k = lr * m_k / N, m_k = half of each interval next to checkpoint k (docstring)."""
    etas = []
    for i, s in enumerate(steps):
        left = s - steps[i - 1] if i > 0 else 0
        right = steps[i + 1] - s if i + 1 < len(steps) else 0
        etas.append(lr * (left + right) / 2 / n_train)
    return etas


def checkpoint_path(
    recorded: Recorded, steps: list[int], etas: list[float] | float
) -> pk.TrainingPath:
    """A checkpoint-mode path from snapshots of the recorded one."""
    states = [recorded.path.params(s) for s in steps]
    return pk.TrainingPath.from_checkpoints(states, etas, model=recorded.model)


def checkpoint_cells(recorded: Recorded, data: Data, dtype: torch.dtype, lr: float) -> list[Cell]:
    """K = 5, 10, 30 (trapezoid weights), K = 10 with eta = lr, and every snapshot."""
    n_steps, n_train = len(recorded.path), len(data.train)
    label = f"{CHECKPOINT_RUN} / {CHECKPOINT_ARCH}"
    variants: dict[str, tuple[list[int], list[float] | float]] = {}
    for k in (*CHECKPOINT_COUNTS, n_steps + 1):
        steps = checkpoint_steps(n_steps, k)  # fewer than k on a short path
        name = f"K={len(steps)}" + (" (all)" if len(steps) == n_steps + 1 else "")
        variants.setdefault(name, (steps, trapezoid_etas(steps, lr, n_train)))
        if k == 10:
            variants[f"K={len(steps)}, eta=lr"] = (steps, lr)
    cells = []
    for rule, (steps, etas) in variants.items():
        path = checkpoint_path(recorded, steps, etas)
        cells.append(explain(label, rule, recorded, data, dtype, path=path))
    return cells


# -- report ---------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Table:
    """Prints rows as they come, and keeps the warnings for footnotes."""

    HEADER = (
        f"{'run':<30} {'dtype':<7} {'rule':<16} {'max rel':>9} {'median rel':>10} "
        f"{'nodes/step':>12} {'grad evals':>10} {'query grads':>11} {'wall s':>7}  warn"
    )

    def __init__(self) -> None:
        self.notes: dict[str, int] = {}  # message -> footnote number

    def header(self, title: str) -> None:
        print(f"\n{title}")
        print(self.HEADER)
        print("-" * len(self.HEADER))

    def marks(self, caught: list[str]) -> str:
        """Footnote references, e.g. ``[1] [2]x3``, or ``-``."""
        marks = []
        for message, count in Counter(caught).items():
            number = self.notes.setdefault(message, len(self.notes) + 1)
            marks.append(f"[{number}]" + (f"x{count}" if count > 1 else ""))
        return " ".join(marks) or "-"

    def training(self, run: str, dtype: torch.dtype, recorded: Recorded) -> None:
        print(
            f"{run:<30} {dtype_name(dtype):<7} (training: {len(recorded.path)} steps recorded "
            f"in {recorded.seconds:.2f} s)  {self.marks(recorded.warnings)}"
        )

    def row(self, cell: Cell) -> None:
        nodes = f"{cell.mean_nodes:.2f} ({cell.max_nodes})"
        print(
            f"{cell.run:<30} {dtype_name(cell.dtype):<7} {cell.rule:<16} "
            f"{cell.max_rel:>9.2e} {cell.median_rel:>10.2e} {nodes:>12} "
            f"{cell.gradients:>10,} {cell.query_gradients:>11,} {cell.seconds:>7.2f}  "
            f"{self.marks(cell.warnings)}",
            flush=True,
        )

    def footnotes(self) -> None:
        if not self.notes:
            print("\nwarnings: none")
            return
        print("\nwarnings:")
        for message, number in self.notes.items():
            print(f"[{number}] {message}")


def rule_summary(cells: list[Cell], rule: str, dtype: torch.dtype) -> str:
    """One clause: on which runs ``rule`` meets the target in ``dtype``."""
    mine = [c for c in cells if c.rule == rule and c.dtype == dtype]
    ok = [c.run for c in mine if c.meets_target]
    failed = [c.run for c in mine if not c.meets_target]
    worst = max(c.max_rel for c in mine)
    if not failed:
        where = f"all {len(mine)} runs"
    elif not ok:
        where = "no run"
    elif len(ok) <= len(failed):
        where = f"{len(ok)} of {len(mine)} runs ({', '.join(ok)})"
    else:
        where = f"{len(ok)} of {len(mine)} runs (all but {', '.join(failed)})"
    nodes = statistics.mean(c.mean_nodes for c in mine)
    return f"{rule} on {where} (worst max {worst:.0e}, {nodes:.1f} nodes/step)"


def summary(exact: list[Cell], checkpoint: list[Cell]) -> str:
    """The closing paragraph, written from the results."""
    parts = [
        f"Summary. A rule meets the target when max |delta| / |f(w_S) - f(w_0)| <= {TARGET:g} "
        "over the queries of a run."
    ]
    for dtype in DTYPES:
        rules = "; ".join(rule_summary(exact, rule, dtype) for rule, _ in QUADRATURES)
        parts.append(f"In {dtype_name(dtype)} it is met by {rules}.")
    parts.append(
        "The adaptive rule works to the library's default per-step tolerance, rtol 1e-9 in "
        "float64 and 1e-5 in float32, so in float32 its residual is expected near 1e-6-1e-5 "
        "rather than below 1e-6."
    )
    comparison = cost_comparison(exact, checkpoint)
    if comparison:
        parts.append(comparison)
    if checkpoint:
        best = min(checkpoint, key=lambda c: c.max_rel)
        ok = [c for c in checkpoint if c.meets_target]
        parts.append(
            f"Checkpoint mode (TracIn, trapezoid weights) meets it in {len(ok)} of "
            f"{len(checkpoint)} settings; its smallest max residual is {best.max_rel:.1e} "
            f"(median {best.median_rel:.1e}), with {best.rule} in {dtype_name(best.dtype)}."
        )
    return "\n".join(wrap(" ".join(parts)))


def cost_comparison(exact: list[Cell], checkpoint: list[Cell]) -> str | None:
    """Cheapest exact rule meeting the target vs TracIn, on the checkpoint run in float64."""
    run = f"{CHECKPOINT_RUN} / {CHECKPOINT_ARCH}"
    ok = [c for c in exact if c.run == run and c.dtype == torch.float64 and c.meets_target]
    tracin = [c for c in checkpoint if c.dtype == torch.float64]
    if not ok or not tracin:
        return None
    best = min(ok, key=lambda c: c.gradients)
    costs = ", ".join(f"{c.gradients:,} ({c.rule}, max {c.max_rel:.1e})" for c in tracin)
    return (
        f"On the {run} run in float64 the cheapest exact rule that meets it, {best.rule}, "
        f"spends {best.gradients:,} gradient evaluations (max {best.max_rel:.1e}); checkpoint "
        f"mode spends {costs}: exact mode needs each training gradient once per epoch, "
        "checkpoint mode all N at every checkpoint."
    )


def wrap(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width=width)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under ~30 s")
    parser.add_argument(
        "--n-train", type=int, default=None, help="training examples (default 1500; 300 quick)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 3; 1 quick)")
    parser.add_argument(
        "--queries", type=int, default=None, help="queries from the last 297 (default 50; 10 quick)"
    )
    parser.add_argument(
        "--no-layernorm", action="store_true", help="skip the LayerNorm+GELU network"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the model is tiny, and on a shared machine "
        "2 threads made some cells 100x slower)",
    )
    args = parser.parse_args(argv)
    args.n_train = args.n_train or (300 if args.quick else 1500)
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.queries = args.queries or (10 if args.quick else 50)
    if not 0 < args.n_train <= 1797 - N_HELD_OUT:
        parser.error(f"--n-train must be in 1..{1797 - N_HELD_OUT}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    import captum

    import pk_attrib.explain.explainer  # noqa: F401 - pk_attrib loads it lazily; keep it out of cell 1

    print("pk_attrib completeness benchmark")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, captum "
        f"{captum.__version__}, pk_attrib {pk.__version__}, "
        f"{torch.get_num_threads()} intra-op threads"
    )
    steps_per_epoch = -(-args.n_train // BATCH_SIZE)
    print(
        f"data: load_digits / 16, {args.n_train} training images, {args.queries} queries from "
        f"the last {N_HELD_OUT} (target = true label); batch {BATCH_SIZE}, {args.epochs} "
        f"epoch(s) = {steps_per_epoch * args.epochs} steps, every step recorded"
    )
    print(
        "columns: max/median rel = max/median over queries of |delta| / |f(w_S) - f(w_0)|; "
        "nodes/step = mean (max)\nquadrature nodes per step; grad evals = query_gradients + "
        "train_gradients; wall s = PathKernelInfluence(...) + attribute()"
    )

    table = Table()
    exact: list[Cell] = []
    checkpoint_runs: list[tuple[Recorded, Data, torch.dtype, float]] = []
    archs = ["Tanh"] if args.no_layernorm else list(ARCHS)
    for arch in archs:
        table.header(f"== exact mode, MLP {ARCHS[arch]} ({arch}) ==")
        for spec in RUNS:
            if arch != "Tanh" and not spec.sgd:
                continue
            label = f"{spec.name} / {arch}"
            for dtype in DTYPES:
                data = load_data(args.n_train, args.queries, dtype)
                recorded = record_run(spec, arch, data, dtype, args.epochs)
                table.training(label, dtype, recorded)
                for rule, quadrature in QUADRATURES:
                    cell = explain(label, rule, recorded, data, dtype, quadrature=quadrature)
                    exact.append(cell)
                    table.row(cell)
                if arch == CHECKPOINT_ARCH and spec.name == CHECKPOINT_RUN:
                    checkpoint_runs.append((recorded, data, dtype, spec.lr))

    table.header(
        f"== checkpoint mode (TracIn) on the {CHECKPOINT_RUN} / {CHECKPOINT_ARCH} runs: K evenly "
        "spaced snapshots incl. w_0 and w_S, eta_k = lr * m_k / N =="
    )
    checkpoint: list[Cell] = []
    for recorded, data, dtype, lr in checkpoint_runs:
        for cell in checkpoint_cells(recorded, data, dtype, lr):
            checkpoint.append(cell)
            table.row(cell)

    table.footnotes()
    print()
    print(summary(exact, [c for c in checkpoint if "eta=lr" not in c.rule]))
    print(f"\ntotal wall time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
