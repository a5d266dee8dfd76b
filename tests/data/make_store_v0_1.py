"""Writes tests/data/store_v0_1: a store recorded by pk_attrib 0.1.0 before the package
was grouped into record/ and engine/ (commit 51c59a1), kept so that tests can check that
stores written by earlier versions still load and explain.

Run from the repository root with that version installed: python tests/data/make_store_v0_1.py
"""

import shutil
from pathlib import Path

import torch

import pk_attrib as pk


def problem():
    """The model (initial weights), the training set and the queries the store was made of."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    queries = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(
        torch.float64
    )
    return model, torch.utils.data.TensorDataset(x, y), queries


def main():
    root = Path(__file__).parent / "store_v0_1"
    shutil.rmtree(root, ignore_errors=True)
    model, data, _ = problem()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    with pk.PathRecorder(model, optimizer, store=root) as recorder:
        for _ in range(2):
            for x, y in recorder.watch(loader):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    print(root, len(recorder.path), "steps")


if __name__ == "__main__":
    main()
