"""The ``pk-attrib`` command line: ``demo`` and ``inspect``."""

from __future__ import annotations

import argparse
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
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def demo(out: Path, optimizer_name: str = "sgd", seed: int = 0, epochs: int = 5) -> int:
    """Train a small MLP on sklearn's digits while recording its path, then reload it."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    import pk_attrib as pk

    torch.manual_seed(seed)
    x, y = _digits(seed)
    train = TensorDataset(x[:1500], y[:1500])
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = out / "store"
    with pk.PathRecorder(model, optimizer, store=store) as recorder:
        for _ in tqdm(range(epochs), desc="training (recording)", unit="epoch"):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    path = pk.TrainingPath.load(store)
    path.verify()
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    print(f"recorded {path} into {store}")
    print(f"test accuracy of the recorded model: {accuracy:.3f}")
    return 0


def inspect(store: Path) -> int:
    """Summarise a store and check every tensor file against its hash."""
    import pk_attrib as pk

    try:
        path = pk.TrainingPath.load(store)
    except pk.PkAttribError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    optimizer = path.optimizer or {}
    lrs = path.learning_rates if len(path) else None
    size = sum(f.stat().st_size for f in Path(store).iterdir() if f.is_file())
    print(f"store:       {store}")
    print(f"steps:       {len(path)} ({'complete' if path.complete else 'interrupted'})")
    print(f"optimizer:   {optimizer.get('class', 'none (checkpoints)')}")
    if lrs is not None:
        print(f"lr range:    {lrs.min().item():.3g} .. {lrs.max().item():.3g}")
    n = sum(s.numel() for s in path.param_shapes.values())
    print(f"parameters:  {len(path.param_names)} tensors, {n:,} values, {path.dtype}")
    print(f"dataset:     {path.dataset_size} examples")
    print(f"on disk:     {size / 2**20:.1f} MiB")
    reasons = "; ".join(path.approximate_reasons)
    print(f"mode:        {'approximate: ' + reasons if path.approximate else 'exact'}")
    try:
        path.verify()
    except pk.PkAttribError as err:
        print(f"integrity:   FAILED: {err}", file=sys.stderr)
        return 1
    print("integrity:   every tensor file matches its sha256")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pk-attrib`` command."""
    parser = argparse.ArgumentParser(prog="pk-attrib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="record a small MLP trained on sklearn's digits")
    p_demo.add_argument(
        "--out", type=Path, default=None, help="output folder (default: a temp dir)"
    )
    p_demo.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--epochs", type=int, default=5)
    p_inspect = sub.add_parser("inspect", help="summarise a store and check its integrity")
    p_inspect.add_argument("store", type=Path)
    args = parser.parse_args(argv)
    if args.command == "demo":
        out = args.out or Path(tempfile.mkdtemp(prefix="pk_attrib_demo_"))
        out.mkdir(parents=True, exist_ok=True)
        return demo(out, args.optimizer, args.seed, args.epochs)
    return inspect(args.store)


if __name__ == "__main__":
    sys.exit(main())
