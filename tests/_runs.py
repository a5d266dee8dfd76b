"""A deterministic training run shared by tests that run it in another process."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

N = 40
TESTS = Path(__file__).parent


def child(code: str) -> subprocess.Popen:
    """Run ``code`` (dedented) in a Python process that imports from tests/, piped."""
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def slow_disk(seconds: float = 0.03) -> None:
    """Make every store's writer sleep before it writes a shard, in this process."""
    import pk_attrib.record.writer as writer

    write = writer.AsyncShardWriter._write_shard

    def slow(self, records):
        time.sleep(seconds)
        write(self, records)

    writer.AsyncShardWriter._write_shard = slow


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), x, y


def batch(step):
    return (step % 5) * 8 + torch.arange(8)


def run_steps(model, optimizer, x, y, recorder, start, stop, sleep=0.0):
    for s in range(start, stop):
        idx = batch(s)
        if recorder is not None:
            recorder.record_batch(idx)
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if sleep:
            time.sleep(sleep)


def replay(stop):
    """Parameters before each of the first `stop` steps, and after the last."""
    model, optimizer, x, y = make()
    snapshots = []
    for s in range(stop):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        run_steps(model, optimizer, x, y, None, s, s + 1)
    snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots
