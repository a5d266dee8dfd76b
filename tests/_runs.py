"""A deterministic training run shared by tests that run it in another process."""

import time

import torch
import torch.nn.functional as F

N = 40


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
