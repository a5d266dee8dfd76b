"""Benchmark: do counterfactual scores predict retraining? Linear datamodeling score (LDS).

Setup (the defaults): scikit-learn's 8x8 digits (pixels / 16, float32) in a seeded random
order; the first ``--n-train`` (1,000) images train, the next ``--n-test`` (200) are the test
points. An MLP 64 -> 32 -> 10 with Tanh, trained from one seeded initialisation with plain
SGD (lr 0.1, batch 32, mean cross-entropy) for ``--epochs`` (20) epochs over a fixed, seeded
permutation per epoch: 32 steps an epoch, 640 steps. `pk.PathRecorder` records every step;
the parameters at the end of every epoch are the checkpoints of checkpoint mode, TracInCP
and TRAK.

LDS (TRAK's metric, Park et al. 2023): ``--models`` (100) random halves S_m of the training
set are drawn (seeded) and the model is retrained on each from the same initialisation with
the same per-epoch permutations restricted to S_m (16 steps an epoch). For each test point x
the explained output is the margin f(x) = z_y - logsumexp_{k != y} z_k of the retrained
model; a method's scores tau(x)_i predict f_m(x) ~ sum_{i in S_m} tau(x)_i, and the LDS is
the Spearman correlation over the models between prediction and truth, averaged over the test
points. Every method explains the margin on the very same run (DVEmb explains the test loss,
whose gradient at the final model is the margin's times -sigmoid(-margin): the same ranking).

Methods:

* **counterfactual (hessian=...)**: ``PathKernelInfluence.counterfactual`` with each curvature;
* **exact contributions**: ``attribute(...).contributions`` (exact mode, adaptive quadrature);
* **checkpoint mode**: pk_attrib on ``TrainingPath.from_checkpoints`` of the epoch-end
  checkpoints (TracIn, the learning rate as eta);
* **Captum TracInCP**: ``captum.influence.TracInCP`` on the same checkpoints, the margin as
  ``test_loss_fn`` (negated: TracIn scores the test loss's decrease);
* **TRAK**: the ``traker`` package, ``BasicProjector`` (CPU, Rademacher), the epoch-end
  checkpoints as its models, ``--trak-dims`` projection dimensions (32, 64, 128, 256, 512:
  TRAK inverts the k x k matrix of projected training gradients, which grows ill-conditioned
  as k nears the training set's size; on this run k = 32 scored best);
* **dattri DVEmb**: ``dattri.algorithm.dvemb.DVEmbAttributor`` fed the recorded trajectory
  (each step's batch at its recorded weights, its learning rate), no projection.

Variants (rows marked "variant") look for what beats DVEmb with what the recorded path holds
beyond it; see ``VARIANTS``.

Also **mislabel detection**: ``--flip`` (15%) of the training labels are flipped (seeded),
the model is trained with SGD (lr 0.1) and with Adam (lr 1e-3), and training examples are
ranked by self-influence: ROC AUC of ``self_influence()`` (its default), of each ``score=``,
and of Captum TracInCP's self-influence on the epoch-end checkpoints.

Run from the repository root (needs the ``bench`` extra: ``pip install -e .[bench]``)::

    python benchmarks/bench_lds.py            # the default run (4-7 min, one thread)
    python benchmarks/bench_lds.py --quick    # 300 train, 100 test, 50 models, 10 epochs
    python benchmarks/bench_lds.py --skip trak,dvemb --no-mislabel

Torch runs on one intra-op thread unless ``--threads`` says otherwise. Nothing here is
asserted by the tests; the exit status is 0 when the targets pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk

from pk_attrib.engine import curvature as curvature_module

BATCH, HIDDEN, CLASSES = 32, 32, 10
LR = {"sgd": 0.1, "adam": 1e-3}


@dataclass
class Config:
    """Problem sizes."""

    n_train: int = 1000
    n_test: int = 200
    epochs: int = 20
    models: int = 100
    flip: float = 0.15
    trak_dims: tuple[int, ...] = (32, 64, 128, 256, 512)
    seed: int = 0
    skip: frozenset[str] = frozenset()
    mislabel: bool = True


def seeded(stream: int, cfg: Config) -> torch.Generator:
    """The generator of one random stream (0 data, 1 order, 2 subsets, 3 flips)."""
    return torch.Generator().manual_seed(1000 * cfg.seed + stream)


def digits(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits in a seeded order: float32 pixels / 16, int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = torch.randperm(len(data.target), generator=seeded(0, cfg))
    x = torch.tensor(data.data, dtype=torch.float32)[order] / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)[order]


def make_mlp(cfg: Config) -> torch.nn.Module:
    """The 64 -> 32 -> 10 Tanh MLP, seeded."""
    torch.manual_seed(1000 * cfg.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    )


def margin(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_y − logsumexp_{k≠y} z_k per row, (n,) (TRAK's output for classification)."""
    mine = torch.arange(outputs.shape[1], device=outputs.device) == target.reshape(-1, 1)
    correct = (outputs * mine).sum(1)
    others = torch.where(mine, -torch.inf, outputs).logsumexp(1)
    return correct - others


@dataclass
class Run:
    """A trained model, its data, recorded path and epoch-end checkpoints."""

    kind: str
    model: torch.nn.Module
    train_set: TensorDataset
    path: pk.TrainingPath | None = None
    checkpoints: list[dict[str, torch.Tensor]] = field(default_factory=list)


def train(kind, cfg, x, y, orders, keep=None, record=True) -> Run:
    """Train from the seeded init over ``orders`` (restricted to ``keep``), batches of 32."""
    model = make_mlp(cfg)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=LR["sgd"])
        if kind == "sgd"
        else torch.optim.Adam(model.parameters(), lr=LR["adam"])
    )
    train_set = TensorDataset(x, y)
    run = Run(kind, model, train_set)
    recorder = pk.PathRecorder(model, optimizer, store=None) if record else None
    for order in orders:
        if keep is not None:
            order = order[keep[order]]
        for idx in order.split(BATCH):
            if recorder is not None:
                recorder.record_batch(idx)
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        if record:
            run.checkpoints.append({n: p.detach().clone() for n, p in model.named_parameters()})
    if recorder is not None:
        recorder.close()
        run.path = recorder.path
    model.eval()
    return run


def explainer(run: Run, **options) -> pk.PathKernelInfluence:
    """pk_attrib on the recorded path."""
    return pk.PathKernelInfluence(
        run.model, run.train_set, run.path, torch.nn.CrossEntropyLoss(), show_progress=False,
        **options,
    )  # fmt: skip


def timed(fn):
    """(fn(), seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- contenders ---------------------------------------------------------------------------------


def captum_tracin(run: Run, folder: Path, test_loss_fn=None):
    """Captum TracInCP on the epoch-end checkpoints (files in a fresh folder)."""
    from captum.influence import TracInCP

    own = Path(tempfile.mkdtemp(prefix="tracin_", dir=folder))
    files = []
    for k, state in enumerate(run.checkpoints):
        files.append(str(own / f"epoch{k:02d}.pt"))
        torch.save(state, files[-1])

    def load(net, file):
        net.load_state_dict(torch.load(file, weights_only=True))
        return LR[run.kind]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a plain test_loss_fn: reduction assumed "none")
        return TracInCP(
            copy.deepcopy(run.model),
            run.train_set,
            checkpoints=files,
            checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            test_loss_fn=test_loss_fn,
            batch_size=256,
            sample_wise_grads_per_batch=False,
        )


def trak_scores(run: Run, test: tuple, dim: int, folder: Path) -> np.ndarray:
    """TRAK (traker, CPU BasicProjector) on the epoch-end checkpoints: (n_test, n_train)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = copy.deepcopy(run.model)
    d = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(
        grad_dim=d,
        proj_dim=dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        dtype=torch.float32,
    )
    xs, ys = run.train_set.tensors
    with contextlib.redirect_stderr(io.StringIO()):
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(ys),
            save_dir=tempfile.mkdtemp(prefix=f"trak{dim}_", dir=folder),
            device="cpu",
            projector=projector,
            proj_dim=dim,
            use_half_precision=False,
            logging_level=logging.ERROR,
        )
        for model_id, state in enumerate(run.checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            for a in range(0, len(ys), 256):
                idx = np.arange(a, min(a + 256, len(ys)))
                traker.featurize(batch=(xs[idx], ys[idx]), inds=idx)
        traker.finalize_features()
        for model_id, state in enumerate(run.checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="lds", checkpoint=state, model_id=model_id, num_targets=len(test[1])
            )
            traker.score(batch=test, num_samples=len(test[1]))
        scores = traker.finalize_scores(exp_name="lds")
    return np.asarray(scores, dtype=np.float64).T


def dvemb_scores(run: Run, test: tuple, steps_per_epoch: int) -> np.ndarray:
    """dattri's DVEmbAttributor fed the recorded trajectory: (n_test, n_train)."""
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(run.model)

    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = DVEmbAttributor(task=task, proj_dim=None)
    xs, ys = run.train_set.tensors
    with contextlib.redirect_stderr(io.StringIO()):
        for s, step in enumerate(run.path):
            run.path.load_into(model, s)
            idx = step.indices
            attributor.cache_gradients(s // steps_per_epoch, (xs[idx], ys[idx]), idx, step.lr[0])
        run.path.load_into(model)
        attributor.cache()
        scores = attributor.attribute(DataLoader(TensorDataset(*test), batch_size=len(test[1])))
    return scores.T.double().numpy()


# Variants that look for what beats DVEmb, each a curvature product swapped into the engine
# (`pk_attrib.engine.counterfactual.product`); a third uses exact mode's quadrature.
def _mixed(curvature, fm, w, batch, loss_fn, kappa, vectors, grads=None, dots=None):
    """Half the exact Hessian, half the empirical Fisher."""
    exact = ORIGINAL_PRODUCT(
        curvature_module.Curvature.EXACT, fm, w, batch, loss_fn, kappa, vectors
    )
    fisher = ORIGINAL_PRODUCT(
        curvature_module.Curvature.FISHER, fm, w, batch, loss_fn, kappa, vectors, grads, dots
    )
    return 0.5 * (exact + fisher)


def _times(kind, factor):
    """One curvature, scaled."""

    def scaled(curvature, *args, **kwargs):
        return factor * ORIGINAL_PRODUCT(curvature_module.Curvature(kind), *args, **kwargs)

    return scaled


ORIGINAL_PRODUCT = curvature_module.product
VARIANTS = {
    # the halves' runs take half the steps an epoch: an example's effect passes through half
    # as many later steps, each contracting it by (I - eta H)
    "variant: exact Hessian x 1/2": _times("exact", 0.5),
    "variant: Fisher x 1/2": _times("fisher", 0.5),
    "variant: 1/2 exact + 1/2 Fisher": _mixed,
}


@contextlib.contextmanager
def patched_product(fn):
    """Swap the engine's curvature product for a variant."""
    import pk_attrib.engine.counterfactual as engine

    engine.product = fn
    try:
        yield
    finally:
        engine.product = ORIGINAL_PRODUCT


# -- LDS ----------------------------------------------------------------------------------------


def lds(scores: np.ndarray, masks: np.ndarray, truth: np.ndarray) -> float:
    """Mean over test points of Spearman(prediction over models, retrained margin).

    Args:
        scores: (n_test, n_train).
        masks: (M, n_train) bool, the subsets.
        truth: (M, n_test) retrained margins.
    """
    predicted = masks.astype(np.float64) @ scores.T  # (M, n_test)
    values = [spearmanr(predicted[:, j], truth[:, j]).statistic for j in range(truth.shape[1])]
    return float(np.nanmean(values))


def lds_experiment(cfg: Config, folder: Path) -> list[bool]:
    """Train, retrain on halves, score every method; print the table."""
    x, y = digits(cfg)
    n = cfg.n_train
    xs, ys = x[:n], y[:n]
    test = (x[n : n + cfg.n_test], y[n : n + cfg.n_test])
    g = seeded(1, cfg)
    orders = [torch.randperm(n, generator=g) for _ in range(cfg.epochs)]
    run, secs = timed(lambda: train("sgd", cfg, xs, ys, orders))
    steps = len(run.path)
    with torch.no_grad():
        accuracy = float((run.model(test[0]).argmax(1) == test[1]).float().mean())
    print(
        f"\nLDS: digits MLP 64-{HIDDEN}-10 Tanh, SGD lr {LR['sgd']}, batch {BATCH}, {n} train, "
        f"{cfg.n_test} test, {cfg.epochs} epochs = {steps} steps ({secs:.1f}s), test accuracy "
        f"{accuracy:.3f}"
    )
    g = seeded(2, cfg)
    masks = np.stack([(torch.randperm(n, generator=g) < n // 2).numpy() for _ in range(cfg.models)])
    start = time.perf_counter()
    truth = np.zeros((cfg.models, cfg.n_test))
    for m, mask in enumerate(masks):
        retrained = train("sgd", cfg, xs, ys, orders, torch.as_tensor(mask), record=False)
        with torch.no_grad():
            truth[m] = margin(retrained.model(test[0]), test[1]).double().numpy()
    print(
        f"{cfg.models} models retrained on random halves (same order restricted to the half) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    rows: dict[str, tuple[np.ndarray, float]] = {}
    ex = explainer(run)
    dec, t_exact = timed(lambda: ex.attribute(test[0], target=test[1], output_fn=margin))
    for hessian in ("fisher", "exact", "gauss-newton"):
        found, secs = timed(
            lambda h=hessian: ex.counterfactual(
                test[0], target=test[1], output_fn=margin, hessian=h
            )
        )
        rows[f"counterfactual, hessian={hessian}"] = (found, secs)
    rows["exact contributions"] = (dec.contributions, t_exact)
    for name, fn in VARIANTS.items():
        with patched_product(fn):
            rows[name] = timed(
                lambda: ex.counterfactual(
                    test[0], target=test[1], output_fn=margin, hessian="fisher"
                )
            )
    # the quadrature along each step: exact contributions in place of the left endpoint
    left, secs = timed(lambda: first_order(ex, test))
    exact_cf, secs_cf = rows["counterfactual, hessian=exact"]
    rows["variant: exact contributions + (exact - left endpoint)"] = (
        dec.contributions + exact_cf - left,
        t_exact + secs_cf + secs,
    )
    checkpoint_path = pk.TrainingPath.from_checkpoints(run.checkpoints, LR["sgd"], model=run.model)
    checkpoint = pk.PathKernelInfluence(
        run.model, run.train_set, checkpoint_path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    rows["checkpoint mode (pk, TracIn)"] = timed(
        lambda: checkpoint.attribute(test[0], target=test[1], output_fn=margin).contributions
    )
    if "tracin" not in cfg.skip:
        tracin = captum_tracin(run, folder, lambda out, t: -margin(out, t))
        rows["Captum TracInCP"] = timed(lambda: tracin.influence(test))
    if "trak" not in cfg.skip:
        for dim in cfg.trak_dims:
            rows[f"TRAK (traker, k={dim})"] = timed(lambda d=dim: trak_scores(run, test, d, folder))
    if "dvemb" not in cfg.skip:
        rows["dattri DVEmb"] = timed(lambda: dvemb_scores(run, test, (n + BATCH - 1) // BATCH))
    print(f"\n{'method':<56} {'LDS':>7} {'seconds':>9} {'x exact mode':>13}")
    results = {}
    for name, (scores, secs) in rows.items():
        scores = scores.double().numpy() if isinstance(scores, torch.Tensor) else scores
        results[name] = lds(scores, masks, truth)
        print(f"{name:<56} {results[name]:7.3f} {secs:9.1f} {secs / t_exact:13.2f}")
    default = f"counterfactual, hessian={pk_default_hessian()}"
    ok = []
    references = {"DVEmb": "dattri DVEmb", "TracInCP": "Captum TracInCP"}
    print()
    if references["DVEmb"] in results:
        ok.append(results[default] >= results[references["DVEmb"]])
        print(
            f"{verdict(ok[-1])} default {default!r} >= DVEmb ({results[references['DVEmb']]:.3f})"
        )
    others = [k for k in results if k.startswith("TRAK")] + [references["TracInCP"]]
    for name in others:
        if name in results:
            ok.append(results[default] >= results[name] + 0.05)
            print(f"{verdict(ok[-1])} default >= {name} + 0.05 ({results[name]:.3f})")
    ratio = rows[default][1] / t_exact
    ok.append(ratio <= 3.0)
    print(f"{verdict(ok[-1])} default's time {ratio:.2f}x exact mode's (<= 3)")
    if "dattri DVEmb" in rows:
        ours = rows["counterfactual, hessian=fisher"][0].double().numpy()
        gap = rescaled_gap(ours, rows["dattri DVEmb"][0])
        print(
            f"   (hessian=fisher vs DVEmb, each test point's row rescaled (DVEmb explains the "
            f"test loss): max difference {gap:.1e} of the largest score)"
        )
    return ok


def first_order(ex: pk.PathKernelInfluence, test: tuple) -> torch.Tensor:
    """The counterfactual sweep without second-order terms: the left-endpoint path kernel."""
    from pk_attrib.engine.counterfactual import counterfactual

    curvature = curvature_module.Curvature.EXACT
    return counterfactual(ex._engine, (test[0],), test[1], margin, curvature, first_order=True)


def rescaled_gap(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - c_q theirs| / max |ours|, c_q fitted per test point (least squares)."""
    c = (ours * theirs).sum(1, keepdims=True) / (theirs * theirs).sum(1, keepdims=True)
    return float(np.abs(ours - c * theirs).max() / np.abs(ours).max())


def pk_default_hessian() -> str:
    """The explainer's default ``hessian=``."""
    from pk_attrib.explain.counterfactual import DEFAULT_HESSIAN

    return DEFAULT_HESSIAN.value


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


# -- mislabel detection -------------------------------------------------------------------------


def mislabel_experiment(cfg: Config, folder: Path) -> list[bool]:
    """Self-influence AUC with flipped labels, SGD and Adam."""
    x, y = digits(cfg)
    n = cfg.n_train
    g = seeded(3, cfg)
    n_flip = int(round(cfg.flip * n))
    chosen = torch.randperm(n, generator=g)[:n_flip]
    noisy = y[:n].clone()
    noisy[chosen] = (noisy[chosen] + torch.randint(1, CLASSES, (n_flip,), generator=g)) % CLASSES
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen.numpy()] = True
    g = seeded(1, cfg)
    orders = [torch.randperm(n, generator=g) for _ in range(cfg.epochs)]
    print(f"\nmislabel detection: {n} train, {n_flip} labels flipped, {cfg.epochs} epochs")
    print(f"{'optimizer':<9} {'self-influence':<44} {'AUC':>7} {'seconds':>9}")
    ok = []
    for kind in ("sgd", "adam"):
        run = train(kind, cfg, x[:n], noisy, orders)
        ex = explainer(run)
        rows = {"self_influence() (default)": timed(ex.self_influence)}
        rows['score="contribution"'] = timed(lambda ex=ex: ex.self_influence(score="contribution"))
        for hessian in ("fisher", "exact", "gauss-newton"):
            other = explainer(run, hessian=hessian)
            rows[f'score="counterfactual", hessian={hessian}'] = timed(
                lambda e=other: e.self_influence(score="counterfactual")
            )
        if "tracin" not in cfg.skip:
            rows["Captum TracInCP"] = timed(captum_tracin(run, folder).self_influence)
        aucs = {}
        for name, (score, secs) in rows.items():
            aucs[name] = roc_auc_score(flipped, score.double().numpy())
            print(f"{kind:<9} {name:<44} {aucs[name]:7.4f} {secs:9.1f}")
        if "Captum TracInCP" in aucs:
            ok.append(aucs["self_influence() (default)"] >= aucs["Captum TracInCP"])
            print(f"{verdict(ok[-1])} {kind}: the default self-influence >= TracInCP's")
    return ok


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", type=int, default=100, help="retrained half-subset models")
    parser.add_argument("--flip", type=float, default=0.15, help="mislabeled fraction")
    parser.add_argument(
        "--trak-dims", default="32,64,128,256,512", help="TRAK projection dimensions"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated: tracin, trak, dvemb")
    parser.add_argument("--no-mislabel", action="store_true", help="skip mislabel detection")
    parser.add_argument("--quick", action="store_true", help="300 train, 100 test, 50 models")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    cfg = Config(
        n_train=300 if args.quick else args.n_train,
        n_test=100 if args.quick else args.n_test,
        epochs=10 if args.quick else args.epochs,
        models=50 if args.quick else args.models,
        flip=args.flip,
        trak_dims=tuple(int(d) for d in args.trak_dims.split(",") if d),
        seed=args.seed,
        skip=frozenset(s for s in args.skip.split(",") if s),
        mislabel=not args.no_mislabel,
    )
    if args.quick:
        cfg.trak_dims = tuple(d for d in cfg.trak_dims if d < cfg.n_train) or (128,)
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ok = lds_experiment(cfg, Path(tmp))
        if cfg.mislabel:
            ok += mislabel_experiment(cfg, Path(tmp))
    print(f"\ntotal {time.perf_counter() - start:.0f}s; {sum(ok)}/{len(ok)} targets pass")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
