"""Benchmark: how useful are pk_attrib's influence scores, side by side with Captum's TracInCP?

Workload: scikit-learn's 8x8 digits (pixels / 16, float32), split by a seeded permutation
into ``--n-train`` training images (default 1,500) and the rest (297) as held-out test
images; an MLP 64 -> 32 -> 10 with Tanh, trained from one seeded initialisation with a
fixed, seeded list of per-epoch permutations (batch 32), either with plain SGD (lr 0.1) or
with Adam (lr 1e-3). `pk.PathRecorder` records every step in memory and the parameters are
kept at the end of every epoch as the checkpoints of checkpoint mode and of Captum.

Three contenders score every experiment on the very same runs:

* **pk exact**: ``PathKernelInfluence`` on the recorded path (exact mode): the exact
  contribution of each training example to the decrease of the loss along the path;
* **pk checkpoint**: ``PathKernelInfluence`` on ``TrainingPath.from_checkpoints`` of the
  epoch-end checkpoints with the learning rate as eta (TracIn);
* **TracInCP**: ``captum.influence.TracInCP`` on the same checkpoints, saved as files
  (``loss_fn=CrossEntropyLoss(reduction="none")``, ``sample_wise_grads_per_batch=False``;
  the loader reads the state dict and returns the learning rate).

Experiments:

1. **Mislabeled examples.** 10% of the training labels are flipped (seeded) to another
   class. Training examples are ranked by ``self_influence()`` (higher = more suspicious);
   reported: ROC AUC (``sklearn.metrics.roc_auc_score``) and the fraction of the flipped
   examples found in the top 10% and top 20% of the ranking, for SGD and for Adam. The
   exact self-influence of an Adam run sweeps the path with all training examples as
   queries: with ``--adam-exact-subset N`` only N examples (a seeded random subset) are
   scored in exact mode, and every other contender is then also scored on that subset (the
   target compares pk exact with TracInCP on the same examples). By default every example
   is scored. Two rows without a target are printed alongside: the exact self-influence
   divided by the example's total loss decrease (its share of its own loss change), and the
   example's final training loss (no attribution at all).
   Targets: pk exact AUC >= TracInCP AUC on both optimizers, and pk exact AUC >= 0.95.
   A variant without targets repeats the experiment with ``--variant-epochs`` (default 20)
   epochs, every example scored (``--variant-adam-subset N`` scores N in exact mode, as
   above).
2. **Proponents of duplicates.** ``--n-dup`` held-out test images are copied, with their
   labels, into the (clean) training set; after training with SGD, each test image's top
   proponent (the first of ``influence((x, y), k=5)``) should be its duplicate; the
   top-5 rate is reported too, by raw contribution and by ``score="cosine"`` (the
   contribution over its Cauchy-Schwarz bound; for TracInCP, which has no such option, its
   score over sqrt(self-influence), the same ranking on checkpoints).
   Target: pk exact with ``score="cosine"`` finds the duplicate in >= 95% of cases (raw
   contributions, of TracInCP too, favour examples with large gradients; see docs/guide/captum.md).
3. **Removal.** On a clean run (SGD, and again with Adam), for ``--n-removal`` (20) other
   test images, the model is retrained from the same initialisation with the same
   per-epoch permutations, the removed examples filtered out (so the remaining examples
   keep their order), without (a) the test image's top ``--k-removal`` (20) proponents by
   pk exact, (b) its top proponents by TracInCP, (c) as many random training examples;
   reported: the change of each test image's loss (retrained - original).
   Target, per optimizer: the mean increase for pk exact >= that for TracInCP, and
   >= 3x |random's mean|.

Defaults: 1,500 training images, 10 epochs (470 steps) for SGD and for Adam, 50 duplicated
test points, 20 removal test points with their top 20, the 20-epoch variant. ``--quick``:
300 training images, 20 epochs, 10 duplicates, 5 removal test points with their top 10, no
variant.

Run from the repository root::

    python benchmarks/bench_quality.py            # default run (about 1.5 min, one core)
    python benchmarks/bench_quality.py --quick    # smoke run (300 train, about 15 s)
    python benchmarks/bench_quality.py --variant-epochs 0       # skip the variant (1 min)
    python benchmarks/bench_quality.py --adam-exact-subset 500
    python benchmarks/bench_quality.py --experiments 1 --variant-epochs 0 --seed 3

Torch runs on one intra-op thread unless ``--threads`` says otherwise: the MLP is tiny, and
on a shared machine more threads only spin against other processes. Times are printed for
orientation; they are not the point of this benchmark (see bench_speed.py).

The exit status is 0 when every target passes and 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from captum.influence import TracInCP
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk

SEED = 0  # --seed


def seed(stream: int) -> int:
    """The seed of one random stream (0 split and init, 1 order, 2 flips, 3 subset, 4 removal).

    Streams of different runs never coincide (SEED + k would give run s's flips the stream of
    run s + 1's batch order); run 0 keeps the seeds 0, 1, 2, ... of earlier versions.
    """
    return 1000 * SEED + stream


BATCH = 32
HIDDEN = 32
N_CLASSES = 10
LEARNING_RATES = {"sgd": 0.1, "adam": 1e-3}
FLIP_FRACTION = 0.10
CAPTUM_BATCH = 256

MIN_AUC = 0.95
MIN_DUPLICATE_RATE = 0.95
MIN_RANDOM_RATIO = 3.0


@dataclass
class Config:
    """Problem sizes of one benchmark run."""

    n_train: int
    epochs: dict[str, int]  # per optimizer
    n_dup: int
    n_removal: int
    k_removal: int
    adam_exact_subset: int | None  # None: score every training example
    variant_epochs: int | None  # experiment 1 again with this many epochs (no target)
    variant_adam_subset: int | None  # adam_exact_subset of that variant
    removal_optimizers: tuple[str, ...] = ("sgd", "adam")


DEFAULT = Config(
    n_train=1500,
    epochs={"sgd": 10, "adam": 10},
    n_dup=50,
    n_removal=20,
    k_removal=20,
    adam_exact_subset=None,
    variant_epochs=20,
    variant_adam_subset=None,
)
QUICK = Config(
    n_train=300,
    epochs={"sgd": 20, "adam": 20},
    n_dup=10,
    n_removal=5,
    k_removal=10,
    adam_exact_subset=None,
    variant_epochs=None,
    variant_adam_subset=None,
)


# -- data and training ---------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits in a seeded random order: float32 pixels / 16 and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(seed(0)))
    x = torch.tensor(data.data, dtype=torch.float32)[order] / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)[order]


def flip_labels(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Flip ``fraction`` of the labels to another class (seeded); return labels and mask."""
    g = torch.Generator().manual_seed(seed)
    n_flip = int(round(fraction * len(y)))
    chosen = torch.randperm(len(y), generator=g)[:n_flip]
    shift = torch.randint(1, N_CLASSES, (n_flip,), generator=g)  # never 0: another class
    flipped = y.clone()
    flipped[chosen] = (y[chosen] + shift) % N_CLASSES
    mask = np.zeros(len(y), dtype=bool)
    mask[chosen.numpy()] = True
    return flipped, mask


def make_mlp() -> torch.nn.Module:
    """The 64 -> 32 -> 10 Tanh MLP with a seeded initialisation."""
    torch.manual_seed(seed(0))
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, N_CLASSES)
    )


def epoch_orders(n: int, epochs: int) -> list[torch.Tensor]:
    """The fixed, seeded permutation of the training set for every epoch."""
    g = torch.Generator().manual_seed(seed(1))
    return [torch.randperm(n, generator=g) for _ in range(epochs)]


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Plain SGD (no momentum) or Adam with the benchmark's learning rate."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LEARNING_RATES["sgd"])
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATES["adam"])


@dataclass
class Run:
    """A trained model, its training set, recorded path and epoch-end checkpoints."""

    kind: str
    model: torch.nn.Module
    train_set: TensorDataset
    orders: list[torch.Tensor]
    path: pk.TrainingPath | None = None
    checkpoints: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def learning_rates(self) -> list[float]:
        """eta of every checkpoint: the optimizer's learning rate."""
        return [LEARNING_RATES[self.kind]] * len(self.checkpoints)


def train(
    kind: str,
    train_set: TensorDataset,
    orders: list[torch.Tensor],
    exclude: torch.Tensor | None = None,
    record: bool = True,
) -> Run:
    """Train the MLP from its seeded init, one epoch per permutation in ``orders``.

    Batches are consecutive chunks of ``BATCH`` of each permutation, after the ``exclude``d
    training indices are filtered out (so a retraining without them sees the remaining
    examples in the same order). With ``record``, the path is recorded and the parameters
    are kept at the end of every epoch.
    """
    model = make_mlp()
    optimizer = make_optimizer(kind, model)
    loss_fn = torch.nn.CrossEntropyLoss()
    recorder = pk.PathRecorder(model, optimizer, store=None) if record else None
    run = Run(kind, model, train_set, orders)
    for order in orders:
        if exclude is not None and len(exclude):
            order = order[~torch.isin(order, exclude)]
        batches = [chunk.tolist() for chunk in order.split(BATCH)]
        loader = DataLoader(train_set, batch_sampler=batches)
        for xb, yb in recorder.watch(loader) if recorder else loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
        if record:
            run.checkpoints.append({n: p.detach().clone() for n, p in model.named_parameters()})
    if recorder is not None:
        recorder.close()
        run.path = recorder.path
    model.eval()
    return run


def per_example_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every example, (n,)."""
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


# -- the contenders ------------------------------------------------------------------------------


def pk_exact(run: Run) -> pk.PathKernelInfluence:
    """pk_attrib in exact mode on the recorded path."""
    explainer = pk.PathKernelInfluence(
        run.model, run.train_set, run.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    assert explainer.mode == "exact", explainer.mode
    return explainer


def pk_checkpoint(run: Run) -> pk.PathKernelInfluence:
    """pk_attrib in checkpoint mode (TracIn) on the epoch-end checkpoints."""
    path = pk.TrainingPath.from_checkpoints(run.checkpoints, run.learning_rates, model=run.model)
    explainer = pk.PathKernelInfluence(
        run.model, run.train_set, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    assert explainer.mode == "checkpoint", explainer.mode
    return explainer


def captum_tracin(run: Run, folder: Path) -> TracInCP:
    """Captum's TracInCP on the epoch-end checkpoints, saved as files in a new folder in ``folder``.

    A fresh folder per call, so that the checkpoints of a later run never overwrite those of
    a TracInCP still in use (it reads its files lazily).
    """
    own = Path(tempfile.mkdtemp(prefix=f"{run.kind}_", dir=folder))
    files = []
    for k, state in enumerate(run.checkpoints):
        files.append(str(own / f"epoch{k:02d}.pt"))
        torch.save(state, files[-1])
    lr_of = dict(zip(files, run.learning_rates, strict=True))

    def load(net: torch.nn.Module, file: str) -> float:
        net.load_state_dict(torch.load(file, weights_only=True))
        return lr_of[file]

    return TracInCP(
        copy.deepcopy(run.model),
        run.train_set,
        checkpoints=files,
        checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=CAPTUM_BATCH,
        sample_wise_grads_per_batch=False,
    )


def top_proponents(explainer, x: torch.Tensor, y: torch.Tensor, score: str) -> torch.Tensor:
    """Indices of the 5 top proponents of each test point, (n, 5).

    Captum's TracInCP has no cosine score; on its checkpoints every training example is
    weighed at every checkpoint, so ranking score_ij / sqrt(self_influence_j) is ranking
    the cosine (the test side's norm is the same for a whole row).
    """
    if score == "contribution" or isinstance(explainer, pk.PathKernelInfluence):
        options = {} if score == "contribution" else {"score": score}
        return explainer.influence((x, y), k=5, proponents=True, **options).indices
    scores = explainer.influence((x, y)).double()
    norms = explainer.self_influence().double().clamp_min(1e-300).sqrt()
    return (scores / norms).topk(5, dim=1).indices


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


# -- 1. mislabeled examples ----------------------------------------------------------------------


def detection_scores(score: np.ndarray, flipped: np.ndarray) -> tuple[float, float, float]:
    """ROC AUC, and the fraction of flipped examples in the top 10% and top 20% of ``score``."""
    ranking = np.argsort(-score, kind="stable")
    found = []
    for top in (0.10, 0.20):
        head = ranking[: int(round(top * len(score)))]
        found.append(flipped[head].sum() / max(1, flipped.sum()))
    return float(roc_auc_score(flipped, score)), found[0], found[1]


def mislabeled(cfg: Config, x: torch.Tensor, y: torch.Tensor, folder: Path) -> list[bool]:
    """Experiment 1: find flipped labels by self-influence, SGD and Adam."""
    print("\n1. mislabeled examples: rank training examples by self-influence")
    n = cfg.n_train
    noisy, flipped = flip_labels(y[:n], FLIP_FRACTION, seed(2))
    train_set = TensorDataset(x[:n], noisy)
    print(f"   {n} training examples, {int(flipped.sum())} labels flipped (seeded)")
    results = []
    for kind in ("sgd", "adam"):
        subset = cfg.adam_exact_subset if kind == "adam" else None
        pk_auc, tracin_auc, reference = detect_flips(
            kind, cfg.epochs[kind], subset, train_set, flipped, (x[n:], y[n:]), folder
        )
        beats = pk_auc >= tracin_auc
        high = pk_auc >= MIN_AUC
        print(
            f"   {verdict(beats)} 1/{kind}: pk exact AUC {pk_auc:.4f} >= {reference} AUC "
            f"{tracin_auc:.4f}"
        )
        print(f"   {verdict(high)} 1/{kind}: pk exact AUC {pk_auc:.4f} >= {MIN_AUC}")
        results += [beats, high]
    if cfg.variant_epochs:
        print(f"\n   variant (no target): the same with {cfg.variant_epochs} epochs")
        for kind in ("sgd", "adam"):
            subset = cfg.variant_adam_subset if kind == "adam" else None
            detect_flips(
                kind, cfg.variant_epochs, subset, train_set, flipped, (x[n:], y[n:]), folder
            )
    return results


def detect_flips(
    kind: str,
    epochs: int,
    exact_subset: int | None,
    train_set: TensorDataset,
    flipped: np.ndarray,
    held_out: tuple[torch.Tensor, torch.Tensor],
    folder: Path,
) -> tuple[float, float, str]:
    """Train on the noisy labels, print a table; return pk exact AUC, TracInCP AUC and its name.

    With ``exact_subset``, exact mode scores only that many examples (a seeded subset), and
    every full-length ranking is also scored on the same subset.
    """
    n = len(flipped)
    run, seconds = timed(lambda: train(kind, train_set, epoch_orders(n, epochs)))
    with torch.no_grad():
        accuracy = float((run.model(held_out[0]).argmax(1) == held_out[1]).float().mean())
    print(
        f"\n   {kind}: lr {LEARNING_RATES[kind]:g}, {epochs} epochs = {len(run.path)} steps, "
        f"trained+recorded in {seconds:.1f}s, held-out accuracy {accuracy:.3f}"
    )
    subset = np.arange(n)
    if exact_subset and exact_subset < n:
        g = np.random.default_rng(seed(3))
        subset = np.sort(g.choice(n, exact_subset, replace=False))
    rows = score_self_influence(run, subset, folder)
    print(f"   {'optimizer':<6} {'method':<34} {'n':>5} {'AUC':>7} {'top10%':>7} {'top20%':>7}")
    by_method = {}
    for method, (score, secs) in rows.items():
        on = subset if len(score) == len(subset) else np.arange(n)
        auc, top10, top20 = detection_scores(score, flipped[on])
        by_method[method] = auc
        print(
            f"   {kind:<6} {method:<34} {len(score):>5} {auc:7.4f} {top10:7.3f} "
            f"{top20:7.3f}   ({secs:.1f}s)"
        )
        if len(subset) < n and len(score) == n:  # the same contender on the subset
            auc, top10, top20 = detection_scores(score[subset], flipped[subset])
            by_method[method + " (subset)"] = auc
            print(
                f"   {kind:<6} {'  same, on the exact subset':<34} {len(subset):>5} "
                f"{auc:7.4f} {top10:7.3f} {top20:7.3f}"
            )
    gap = np.abs(rows["pk checkpoint self_influence()"][0] - rows["TracInCP"][0]).max()
    gap /= np.abs(rows["TracInCP"][0]).max()
    print(f"   (max rel. |pk checkpoint - TracInCP| = {gap:.1e}: the same quantity)")
    reference = "TracInCP (subset)" if len(subset) < n else "TracInCP"
    return by_method["pk exact self_influence()"], by_method[reference], reference


def score_self_influence(
    run: Run, subset: np.ndarray, folder: Path
) -> dict[str, tuple[np.ndarray, float]]:
    """Self-influence of every method on ``run``: name -> (scores, seconds)."""
    xs, ys = run.train_set.tensors
    exact = pk_exact(run)
    rows: dict[str, tuple[np.ndarray, float]] = {}
    if len(subset) == len(ys):
        score, secs = timed(lambda: exact.self_influence(score="contribution"))
    else:
        idx = torch.as_tensor(subset)
        score, secs = timed(lambda: exact.self_influence((xs[idx], ys[idx]), score="contribution"))
    score = score.double().numpy()
    rows["pk exact self_influence()"] = (score, secs)
    # Variant (not the headline): the share of the example's own loss decrease it caused.
    decrease = (
        (
            per_example_loss(make_mlp(), xs[subset], ys[subset])
            - per_example_loss(run.model, xs[subset], ys[subset])
        )
        .double()
        .numpy()
    )
    share = score / np.maximum(np.abs(decrease), 1e-3)
    rows["pk exact / |own loss decrease|"] = (share, 0.0)
    # Baseline: the final training loss of the example (no attribution at all).
    final_loss = per_example_loss(run.model, xs[subset], ys[subset]).double().numpy()
    rows["baseline: final training loss"] = (final_loss, 0.0)
    # Variant: the loss without the example's own exact contribution, l_i(w_T) + c_i(x_i)
    # (= l_i(w_0) - sum_{j != i} c_j(x_i) without weight decay): how much the rest disagrees.
    rows["pk exact: final loss + self-infl."] = (final_loss + score, 0.0)
    score, secs = timed(pk_checkpoint(run).self_influence)
    rows["pk checkpoint self_influence()"] = (score.double().numpy(), secs)
    tracin = captum_tracin(run, folder)
    score, secs = timed(tracin.self_influence)
    rows["TracInCP"] = (score.double().numpy(), secs)
    return rows


# -- 2. proponents of duplicated test points ----------------------------------------------------


def duplicates(cfg: Config, x: torch.Tensor, y: torch.Tensor, folder: Path) -> list[bool]:
    """Experiment 2: is a test point's duplicate in the training set its top proponent?"""
    print("\n2. proponents: is a test point's training-set duplicate its top proponent?")
    n = cfg.n_train
    test_x, test_y = x[n : n + cfg.n_dup], y[n : n + cfg.n_dup]
    train_set = TensorDataset(torch.cat([x[:n], test_x]), torch.cat([y[:n], test_y]))
    duplicate_of = torch.arange(n, n + cfg.n_dup)
    rows = torch.arange(cfg.n_dup)
    run = train("sgd", train_set, epoch_orders(len(train_set), cfg.epochs["sgd"]))
    print(
        f"   {n} clean training examples + {cfg.n_dup} copies of test points (indices "
        f"{n}..{n + cfg.n_dup - 1}); sgd, {cfg.epochs['sgd']} epochs; mean test loss of "
        f"the duplicated points {per_example_loss(run.model, test_x, test_y).mean():.4f}"
    )
    methods = {
        "pk exact": pk_exact(run),
        "pk checkpoint": pk_checkpoint(run),
        "TracInCP": captum_tracin(run, folder),
    }
    print(
        f"   {'method':<14} {'score':<13} {'top1=dup':>9} {'top5':>6} {'time':>7}   "
        "(max rel. |score(dup, test) - self_influence(dup)|)"
    )
    rates = {}
    for name, explainer in methods.items():
        for score in ("contribution", "cosine"):
            top, secs = timed(lambda e=explainer, sc=score: top_proponents(e, test_x, test_y, sc))
            rates[name, score] = (top[:, 0] == duplicate_of).float().mean().item()
            top5 = (top == duplicate_of[:, None]).any(1).float().mean().item()
            check = ""
            if score == "contribution":  # the duplicate's score is its own self-influence
                scores = explainer.influence((test_x, test_y)).double()
                self_scores = explainer.self_influence().double()
                gap = (scores[rows, duplicate_of] - self_scores[duplicate_of]).abs().max()
                check = f"({float(gap / self_scores[duplicate_of].abs().max()):.1e})"
            print(
                f"   {name:<14} {score:<13} {rates[name, score]:9.3f} {top5:6.3f} "
                f"{secs:6.1f}s   {check}"
            )
    ok = rates["pk exact", "cosine"] >= MIN_DUPLICATE_RATE
    print(
        f"   {verdict(ok)} 2: pk exact (score='cosine') top-1 duplicate rate "
        f"{rates['pk exact', 'cosine']:.3f} >= {MIN_DUPLICATE_RATE} (TracInCP, raw: "
        f"{rates['TracInCP', 'contribution']:.3f}; pk exact, raw: "
        f"{rates['pk exact', 'contribution']:.3f})"
    )
    return [ok]


# -- 3. removal and retraining --------------------------------------------------------------------


def removal(cfg: Config, x: torch.Tensor, y: torch.Tensor, folder: Path) -> list[bool]:
    """Experiment 3: retrain without a test point's top proponents; how much does its loss rise?"""
    print("\n3. removal: retrain without each test point's top proponents")
    n, k = cfg.n_train, cfg.k_removal
    train_set = TensorDataset(x[:n], y[:n])
    start = n + cfg.n_dup  # test points other than experiment 2's
    test = (x[start : start + cfg.n_removal], y[start : start + cfg.n_removal])
    print(
        f"   {n} clean training examples; {cfg.n_removal} test points; remove {k} training "
        "examples per test point and retrain (same init, same permutations)"
    )
    results = []
    for kind in cfg.removal_optimizers:
        changes = removal_changes(cfg, kind, train_set, test, folder)
        pk_mean, tr_mean = changes["pk exact"].mean(), changes["TracInCP"].mean()
        rnd_mean = changes["random"].mean()
        beats = pk_mean >= tr_mean
        far = pk_mean > 0 and pk_mean >= MIN_RANDOM_RATIO * abs(rnd_mean)
        print(
            f"   {verdict(beats)} 3/{kind}: pk exact mean change {pk_mean:.4f} >= TracInCP "
            f"{tr_mean:.4f}"
        )
        print(
            f"   {verdict(far)} 3/{kind}: pk exact mean change {pk_mean:.4f} >= "
            f"{MIN_RANDOM_RATIO:g} x |random {rnd_mean:.4f}|"
        )
        results += [beats, far]
    return results


def removal_changes(
    cfg: Config,
    kind: str,
    train_set: TensorDataset,
    test: tuple[torch.Tensor, torch.Tensor],
    folder: Path,
) -> dict[str, np.ndarray]:
    """Per test point: loss after retraining without the removed examples - original loss."""
    n, k = len(train_set), cfg.k_removal
    test_x, test_y = test
    orders = epoch_orders(n, cfg.epochs[kind])
    original, seconds = timed(lambda: train(kind, train_set, orders))
    base_loss = per_example_loss(original.model, test_x, test_y)
    print(
        f"\n   {kind}: lr {LEARNING_RATES[kind]:g}, {cfg.epochs[kind]} epochs ({seconds:.1f}s); "
        f"mean original test loss {base_loss.mean():.4f}"
    )
    removed: dict[str, torch.Tensor] = {}
    removed["pk exact"], secs_pk = timed(
        lambda: pk_exact(original).influence((test_x, test_y), k=k, proponents=True).indices
    )
    removed["TracInCP"], secs_tr = timed(
        lambda: captum_tracin(original, folder).influence((test_x, test_y), k=k).indices
    )
    g = torch.Generator().manual_seed(seed(4))
    removed["random"] = torch.stack([torch.randperm(n, generator=g)[:k] for _ in test_y])
    pairs = zip(removed["pk exact"], removed["TracInCP"], strict=True)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in pairs])
    print(
        f"   top-{k} proponents: pk exact {secs_pk:.1f}s, TracInCP {secs_tr:.1f}s; mean "
        f"overlap of the two sets {overlap:.3f}"
    )
    changes: dict[str, np.ndarray] = {}
    start_time = time.perf_counter()
    for name, sets in removed.items():
        delta = []
        for j, drop in enumerate(sets):
            retrained = train(kind, train_set, orders, exclude=drop, record=False)
            new = per_example_loss(retrained.model, test_x[j : j + 1], test_y[j : j + 1])
            delta.append(float(new - base_loss[j]))
        changes[name] = np.array(delta)
    print(f"   {3 * len(test_y)} retrainings in {time.perf_counter() - start_time:.1f}s")
    print(f"   {'removed':<10} {'mean dloss':>11} {'median':>9} {'# up':>6} {'max':>8}")
    for name, delta in changes.items():
        print(
            f"   {name:<10} {delta.mean():11.4f} {np.median(delta):9.4f} "
            f"{int((delta > 0).sum()):>3}/{len(delta):<2} {delta.max():8.4f}"
        )
    return changes


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Command line -> (arguments, configuration)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (small sizes)")
    parser.add_argument("--n-train", type=int, help="training examples")
    parser.add_argument("--epochs", type=int, help="epochs for both optimizers")
    parser.add_argument("--adam-epochs", type=int, help="epochs for the Adam run")
    parser.add_argument("--n-dup", type=int, help="duplicated test points (experiment 2)")
    parser.add_argument("--n-removal", type=int, help="test points of experiment 3")
    parser.add_argument("--k-removal", type=int, help="examples removed per test point")
    parser.add_argument(
        "--adam-exact-subset", type=int, help="score only this many examples exactly (Adam)"
    )
    parser.add_argument(
        "--variant-epochs", type=int, help="experiment 1 again with this many epochs (0: skip)"
    )
    parser.add_argument(
        "--variant-adam-subset", type=int, help="--adam-exact-subset of that variant (0: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny MLP)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the flips, the initialisation and the batch order (default 0)",
    )
    parser.add_argument(
        "--experiments",
        default="1,2,3",
        help="which experiments to run, comma-separated (default 1,2,3)",
    )
    args = parser.parse_args(argv)
    chosen = {e.strip() for e in args.experiments.split(",")}
    if not chosen or not chosen <= {"1", "2", "3"}:
        parser.error(f"--experiments {args.experiments!r}: give numbers from 1, 2, 3, e.g. 1,3")
    args.experiments = {int(e) for e in chosen}
    cfg = copy.deepcopy(QUICK if args.quick else DEFAULT)
    if args.n_train:
        cfg.n_train = args.n_train
    if args.epochs:
        cfg.epochs = {"sgd": args.epochs, "adam": args.epochs}
    if args.adam_epochs:
        cfg.epochs["adam"] = args.adam_epochs
    for name in ("n_dup", "n_removal", "k_removal", "variant_epochs"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("adam_exact_subset", "variant_adam_subset"):  # 0: score every example
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name) or None)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    """Run the three experiments; 0 when every target passes."""
    global SEED
    args, cfg = parse_args(argv)
    SEED = args.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    print("command: python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config: {cfg}")
    x, y = digits()
    if cfg.n_train + cfg.n_dup + cfg.n_removal > len(y):
        raise SystemExit("not enough held-out digits for --n-dup + --n-removal")
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        experiments = {1: mislabeled, 2: duplicates, 3: removal}
        for number in sorted(args.experiments):
            results += experiments[number](cfg, x, y, folder)
    print(f"\ntotal runtime {time.perf_counter() - start:.1f}s")
    print(f"{sum(results)}/{len(results)} targets pass: {verdict(all(results))}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
