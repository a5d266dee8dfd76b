import pytest
import torch
from torch.utils.data import TensorDataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a shared machine a second intra-op thread only waits (a file of them
    took 12 s on one thread, and 100 s on two with other jobs running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
