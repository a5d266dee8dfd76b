"""A 2-rank DistributedDataParallel run of the digits MLP, recorded and explained on every rank.

`worker` runs in each process that tests/test_distributed.py starts (torch.multiprocessing,
spawn): it trains and records, explains with the sharded explainer, then makes a rank fail
and a rank die mid-attribution. `reference_run` is the same training in one process, on the
same global batches.
"""

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import pk_attrib as pk

F64 = torch.float64
WORLD = 2
N_TRAIN = 401  # odd: DistributedSampler pads one index (drawn twice in one step)
BATCH = 20  # per rank; an epoch has 10 batches of 20 and one of 1 on each rank
TIMEOUT = 30  # seconds: the process group's timeout, bounds any wait for a lost rank


_DIGITS = []  # the workers get them from the test (sklearn takes seconds to import)


def digits():
    if not _DIGITS:
        from sklearn.datasets import load_digits

        data = load_digits()
        _DIGITS.append((torch.tensor(data.data, dtype=F64) / 16.0, torch.tensor(data.target)))
    return _DIGITS[0]


def train_set():
    x, y = digits()
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN])


def queries(n, start=1500):
    x, y = digits()
    return x[start : start + n], y[start : start + n]


def mlp(dropout=0.0):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 32), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 10)).to(F64)


def relu_path():
    """A ReLU MLP trained in one process (no process group yet): kinked steps, split per query."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    ).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = train_set()
    order = torch.Generator().manual_seed(0)
    loader = DataLoader(data, batch_size=50, shuffle=True, generator=order)
    with pk.PathRecorder(model, opt) as recorder:
        for x, y in recorder.watch(loader):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), recorder.path


def relu_attribute(model, path):
    """attribute() of 20 queries on the ReLU path: contributions, delta and node counts."""
    explainer = pk.PathKernelInfluence(
        model, train_set(), path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    q, y = queries(20)
    dec = explainer.attribute(q, target=y)
    return dec.contributions, dec.delta, dec.diagnostics.nodes, dec.diagnostics.query_gradients


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def rank_batches(epoch, rank):
    """The dataset indices of rank ``rank``'s batches in an epoch, as its loader draws them."""
    sampler = DistributedSampler(train_set(), num_replicas=WORLD, rank=rank, seed=0)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    return list(torch.split(order, BATCH))


def groups(epoch):
    """Micro-batches per optimizer step: 1 in epoch 0, 2 (no_sync accumulation) in epoch 1."""
    n = len(rank_batches(epoch, 0))
    size = 1 if epoch == 0 else 2
    return [list(range(a, min(n, a + size))) for a in range(0, n, size)]


def reference_run(store):
    """The same training in one process: each step's loss is the mean over the ranks of each
    rank's mean over its micro-batches of the micro-batch means, as DDP's averaged gradient."""
    x, y = train_set().tensors
    model = mlp()
    opt = optimizer(model)
    with pk.PathRecorder(model, opt, store=store, dataset_size=N_TRAIN) as recorder:
        for epoch in range(2):
            batches = [rank_batches(epoch, r) for r in range(WORLD)]
            for group in groups(epoch):
                opt.zero_grad()
                for r in range(WORLD):
                    for k in group:
                        idx = batches[r][k]
                        recorder.record_batch(idx)
                        loss = F.cross_entropy(model(x[idx]), y[idx])
                        (loss / (WORLD * len(group))).backward()
                opt.step()
    return model


def ddp_train(rank, store, dropout=0.0, epochs=2):
    """Train the MLP with DDP and a DistributedSampler, recorded by every rank into ``store``."""
    ds = train_set()
    model = mlp(dropout)
    torch.manual_seed(100 + rank)  # each rank its own dropout masks
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = optimizer(ddp)
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, seed=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    with pk.PathRecorder(ddp, opt, store=store) as recorder:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            steps = groups(epoch)
            size = {k: len(g) for g in steps for k in g}  # micro-batch -> its step's count
            last = {g[-1] for g in steps}
            opt.zero_grad()
            for i, (xb, yb) in enumerate(recorder.watch(loader)):
                step_now = i in last
                with _null() if step_now else ddp.no_sync():  # (accumulate without syncing)
                    loss = F.cross_entropy(ddp(xb), yb)
                    (loss / size[i]).backward()
                if step_now:
                    opt.step()
                    opt.zero_grad()
    return model, recorder


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def explain_all(explainer):
    """What the tests compare between the sharded explainer and one process."""
    q20, y20 = queries(20)
    q40, y40 = queries(40)
    q4, y4 = queries(4, start=1600)
    out = {}
    dec = explainer.attribute(q20, target=y20)
    out["attribute"] = (dec.contributions, dec.bias, dec.prediction, dec.delta)
    out["attribute_nodes"] = dec.diagnostics.nodes
    out["attribute_evals"] = dec.diagnostics.query_gradients
    top = explainer.influence((q40, y40), k=10)
    out["top40"] = (top.indices, top.influence_scores)
    top = explainer.influence((q4, y4), k=10)  # fewer queries than a batch: by columns
    out["top4"] = (top.indices, top.influence_scores)
    out["cosine4"] = explainer.influence((q4, y4), score="cosine")
    out["self"] = explainer.self_influence()
    out["self_contribution"] = explainer.self_influence(score="contribution")
    out["counterfactual"] = explainer.counterfactual(q4, target=y4)
    top = explainer.influence((q20, y20), k=10, score="counterfactual")
    out["top_counterfactual"] = (top.indices, top.influence_scores)
    return out


def worker(rank, port, folder, data):
    _DIGITS.append(data)
    torch.set_num_threads(1)
    relu = relu_path()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    report = {}
    try:
        model, recorder = ddp_train(rank, os.path.join(folder, "ddp"))
        report["steps"] = recorder.steps_recorded
        ddp_train(rank, os.path.join(folder, "dropout"), dropout=0.2, epochs=1)
        report["refused"] = _refusals(rank)
        path = recorder.path  # (rank 1: rank 0's store, read after close())
        loss = torch.nn.CrossEntropyLoss()
        explainer = pk.PathKernelInfluence(
            model, train_set(), path, loss, accumulation="mean", show_progress=False
        )
        report["engine"] = type(explainer._engine).__name__
        report.update(explain_all(explainer))
        report["relu"] = relu_attribute(*relu)
        report["failure"] = _inject_failure(explainer, rank)
        torch.save(report, os.path.join(folder, f"rank{rank}.pt"))
        _inject_death(explainer, rank, folder)
    except BaseException:
        report["error"] = traceback.format_exc()
        torch.save(report, os.path.join(folder, f"rank{rank}.pt"))
        raise


def _refusals(rank):
    """What the recorder says to FSDP2, and to ``path`` on rank 1 of an in-memory recording."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    try:
        pk.PathRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    except pk.RecordingError as err:
        out["fsdp"] = str(err)
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = optimizer(model)
    x, y = train_set().tensors
    with pk.PathRecorder(model, opt) as recorder:  # in memory
        recorder.record_batch([rank, 2 + rank])
        F.cross_entropy(model(x[[rank, 2 + rank]]), y[[rank, 2 + rank]]).backward()
        opt.step()
    try:
        out["memory"] = recorder.path.step(0).indices
    except pk.RecordingError as err:
        out["memory"] = str(err)
    return out


def _patched_integrate(explainer, after, action):
    """Make this rank's quadrature call ``action`` at its ``after``-th step."""
    from pk_attrib.engine import quadrature

    original = quadrature.StepIntegrator.integrate
    calls = [0]

    def integrate(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            action()
        return original(self, *args, **kwargs)

    quadrature.StepIntegrator.integrate = integrate
    return original


def _inject_failure(explainer, rank):
    """Rank 1 raises in the middle of a sharded attribute; what each rank then sees."""
    from pk_attrib.engine import quadrature

    def fail():
        raise RuntimeError("injected failure on rank 1")

    original = _patched_integrate(explainer, 5, fail) if rank == 1 else None
    q, y = queries(40)
    try:
        explainer.attribute(q, target=y)
    except Exception as err:  # noqa: BLE001
        return type(err).__name__, str(err)
    finally:
        if original is not None:
            quadrature.StepIntegrator.integrate = original
    return None


def _inject_death(explainer, rank, folder):
    """Rank 1 dies in the middle of a sharded influence; rank 0 reports how it ended."""
    if rank == 1:
        _patched_integrate(explainer, 5, lambda: os._exit(17))
    q, y = queries(40)
    start = time.monotonic()
    try:
        explainer.influence((q, y), k=10)
        outcome = None
    except Exception as err:  # noqa: BLE001
        outcome = (type(err).__name__, str(err))
    torch.save(
        {"outcome": outcome, "seconds": time.monotonic() - start},
        os.path.join(folder, f"death{rank}.pt"),
    )
    # This rank's process group has lost its peer: torch's gloo backend may then abort in its
    # destructor at interpreter exit (SIGABRT, exit code -6, seen once in a CI run), after
    # everything above is saved. What the test checks is the outcome saved above and that this
    # rank got here; leave without the interpreter's teardown of the broken group.
    os._exit(0)
