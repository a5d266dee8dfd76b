"""The pk-attrib command line: `pk-attrib demo` and `pk-attrib inspect STORE`."""

from __future__ import annotations

import argparse
import stat
import sys
import tempfile
from pathlib import Path


def _digits(seed: int):
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the demo uses scikit-learn's digits: pip install 'pk-attrib[dev]' or scikit-learn"
        ) from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def demo(
    out: Path,
    optimizer_name: str = "sgd",
    seed: int = 0,
    epochs: int = 5,
    n_queries: int = 4,
    projection_dim: int | None = None,
) -> int:
    """Record a digits MLP, decompose a few test predictions, print and plot them."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    import pk_attrib as pk

    torch.manual_seed(seed)
    x, y = _digits(seed)
    train = TensorDataset(x[:1500], y[:1500])
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    store = out / "store"
    with pk.PathRecorder(model, optimizer, store=store) as recorder:
        for _ in tqdm(range(epochs), desc="training (recording the path)", unit="epoch"):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
    model.eval()
    path = pk.TrainingPath.load(store)
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).double().mean().item()
    print(f"recorded {path} into {store}")
    print(f"test accuracy: {accuracy:.3f}\n")

    queries = x[1500 : 1500 + n_queries]
    predicted = model(queries).argmax(1).detach()
    explainer = pk.PathKernelInfluence(model, train, path, loss_fn, projection_dim=projection_dim)
    dec = explainer.attribute(queries, target=predicted)
    if projection_dim is not None:
        print(
            f"contributions estimated with a {projection_dim}-dimensional random projection: "
            "prediction and bias stay exact, delta shows the projection noise\n"
        )
    top = dec.top_k(3)
    labels = y[:1500]
    for q in range(n_queries):
        print(
            f"query {q} (true label {int(y[1500 + q])}): logit of class {int(predicted[q])}\n"
            f"  prediction {float(dec.prediction[q]):+.6f} = bias {float(dec.bias[q]):+.6f}"
            f" + Σ contributions {float(dec.contributions[q].sum()):+.6f}"
            f"   (relative delta {float(dec.relative_delta[q]):.1e})"
        )
        for name, ranked in (("proponents", top.proponents), ("opponents ", top.opponents)):
            items = ", ".join(
                f"#{int(i)} (label {int(labels[i])}) {float(v):+.4f}"
                for i, v in zip(ranked.indices[q], ranked.values[q], strict=True)
            )
            print(f"  top {name}: {items}")
    picture = out / "demo.png"
    _plot(x, labels, y[1500:], dec, predicted, n_queries, picture)
    print(f"\nwrote {picture}: each query digit beside its top proponents and opponents")
    return 0


def _plot(x, labels, query_labels, dec, dec_targets, n_queries: int, picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import viz

    fig = plt.figure(figsize=(9, 3.9 * n_queries), layout="constrained")
    for q, sub in enumerate(fig.subfigures(n_queries, 1, squeeze=False)[:, 0]):
        viz.influential_images(
            x[1500 + q].reshape(8, 8),
            x[:1500].reshape(-1, 8, 8),
            dec,
            query=q,
            k=4,
            train_labels=labels.tolist(),
            title=(
                f"query {q}: true label {int(query_labels[q])}, predicted"
                f" {int(dec_targets[q])}; explaining the logit of class {int(dec_targets[q])}"
            ),
            fig=sub,
            query_label=int(query_labels[q]),
        )
    fig.savefig(picture, dpi=110)
    plt.close(fig)


def inspect(store: Path, attempts: int = 5) -> int:
    """Summarise a store and check all the explainer relies on: 0 when it can be explained.

    A store a recorder is writing may change while it is read (its final weights are
    replaced when a session resumes or ends): the check then starts again, from the
    manifest as it is then, up to ``attempts`` times.
    """
    import time

    import pk_attrib as pk

    for attempt in range(attempts):
        try:
            return _inspect(store)
        except pk.StoreChangedError as err:
            if attempt == attempts - 1:
                print(f"error: {err}", file=sys.stderr)
                return 1
            time.sleep(0.1)
    return 1


def _folder_bytes(folder: Path) -> int:
    """The size of the files in a folder, read while a recorder may rename some."""
    total = 0
    for f in folder.iterdir():
        try:
            info = f.stat()
        except FileNotFoundError:  # (a temporary file, renamed since the listing)
            continue
        total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _inspect(store: Path) -> int:
    import pk_attrib as pk

    try:
        path = pk.TrainingPath.load(store)
        optimizer = path.optimizer or {}
        lrs = path.learning_rates if len(path) else None
        size = _folder_bytes(Path(store))
    except pk.StoreChangedError:
        raise
    except (pk.PkAttribError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    raw = path._backend.n_raw()
    lines = [
        f"store:       {store}",
        f"steps:       {raw} ({'complete' if path.complete else 'interrupted'})",
        f"optimizer:   {optimizer.get('class', 'none (checkpoints)')}",
    ]
    if path.every > 1:
        held = "weights and optimizer state" if path.manifest.get("replayable") else "weights"
        lines.append(
            f"snapshots:   every {path.every} steps ({len(path)} snapshots: {held}; every step: "
            "its batch, learning rates and random-number state)"
        )
    if lrs is not None:
        lines.append(f"lr range:    {lrs.min().item():.3g} .. {lrs.max().item():.3g}")
    n = sum(s.numel() for s in path.param_shapes.values())
    lines += [
        f"parameters:  {len(path.param_names)} tensors, {n:,} values, {path.dtype}",
        f"dataset:     {path.dataset_size} examples",
        f"on disk:     {size / 2**20:.1f} MiB",
    ]
    reasons = "; ".join(path.approximate_reasons)
    lines.append(f"mode:        {'approximate: ' + reasons if path.approximate else 'exact'}")
    for what, check, fine in [
        ("integrity", path.verify, "every tensor file matches its content hash and its header"),
        ("contents", lambda: _contents(path), "every step's batch, weights and optimizer state "
         "read back, finite"),
    ]:  # fmt: skip
        try:
            check()
        except pk.StoreChangedError:
            raise
        except (pk.PkAttribError, OSError) as err:
            print("\n".join(lines))
            print(f"{what + ':':<12} FAILED: {err}", file=sys.stderr)
            return 1
        lines.append(f"{what + ':':<12} {fine}")
    print("\n".join(lines))  # (printed once the store was read whole: no torn summary)
    return 0


def _contents(path) -> None:
    """What the engine reads of each step, and the exact rule's settings."""
    path.check()
    if not path.approximate and (path.optimizer or {}).get("exact"):
        from .engine.rules import rule_for

        rule_for(path)


DESCRIPTION = """\
Explain a trained PyTorch model's predictions in terms of its training examples:
f(x) = b(x) + the sum of one contribution c_i(x) per training example, exact for
SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam and RAdam, from a recording of the
training run."""

EPILOG = """\
examples:
  pk-attrib demo                      record, explain and draw, in a temporary folder
  pk-attrib demo --out demo_run       the same, into ./demo_run
  pk-attrib inspect demo_run/store    summarise a store and check its files

Run 'pk-attrib COMMAND --help' for a command's options. The documentation is in the
repository's docs/ folder (pip install -e ".[docs]" && mkdocs serve)."""

DEMO = """\
Train a small MLP (64-32-10, Tanh) on scikit-learn's 8x8 digits while recording every
optimizer step into DIR/store, decompose a few test predictions (the logit of the
predicted class) into one contribution per training example, print each decomposition
with its top proponents and opponents, and draw DIR/demo.png: each query digit beside
the training digits that pushed its logit up (blue) and down (orange). Needs
scikit-learn and matplotlib (pip install -e ".[dev]"); under a minute on 2 cores."""

INSPECT = """\
Print a store's number of steps, optimizer, learning-rate range, parameters, dataset
size, size on disk and mode (exact or approximate), then check all the explainer
relies on: the manifest, every tensor file against its size, content hash and header,
and every step's batch, weights (finite) and optimizer state read back. Exits with
status 0 when the store can be explained, 1 otherwise, saying why. A store being
recorded is read again when a recorder changes it meanwhile."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the pk-attrib command.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when ``inspect`` finds the store unreadable or
        damaged.
    """
    parser = argparse.ArgumentParser(
        prog="pk-attrib",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo",
        help="record an MLP on scikit-learn's digits and explain a few predictions",
        description=DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_demo.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the store and demo.png (default: a new temporary folder)",
    )
    p_demo.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default="sgd",
        help="sgd (lr 0.1, momentum 0.9) or adam (lr 3e-3) (default: sgd)",
    )
    p_demo.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the data order and the model (default: 0)",
    )
    p_demo.add_argument(
        "--epochs", type=int, default=5, metavar="N", help="training epochs (default: 5)"
    )
    p_demo.add_argument(
        "--queries",
        type=int,
        default=4,
        metavar="N",
        help="test predictions to explain (default: 4)",
    )
    p_demo.add_argument(
        "--projection-dim",
        type=int,
        default=None,
        metavar="K",
        help="estimate the contributions with a K-dimensional random projection (default: exact)",
    )
    p_inspect = sub.add_parser(
        "inspect",
        help="summarise a store and check every file against its hash",
        description=INSPECT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_inspect.add_argument("store", type=Path, metavar="STORE", help="a store folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        out = args.out or Path(tempfile.mkdtemp(prefix="pk_attrib_demo_"))
        out.mkdir(parents=True, exist_ok=True)
        return demo(out, args.optimizer, args.seed, args.epochs, args.queries, args.projection_dim)
    return inspect(args.store)


if __name__ == "__main__":
    sys.exit(main())
