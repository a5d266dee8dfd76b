import pytest
import torch
from torch.utils.data import TensorDataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def indexed_dataset(n=40, d=5, classes=3, seed=0):
    """(x, y, index) triples: the index rides along so tests can check recorded indices."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, d, generator=g),
        torch.randint(0, classes, (n,), generator=g),
        torch.arange(n),
    )


def small_mlp(d=5, h=7, classes=3, dtype=torch.float32):
    return torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, classes)
    ).to(dtype)
