"""Sharded attribution: `influence` of 200 queries on 2 ranks against 1 rank, same machine.

The digits MLP 64-128-10 (float64, 9,610 parameters) is trained for 2 epochs on 1,500
images (batch 32, SGD with momentum, 94 steps) and recorded into a store; then the same
script, launched by torchrun (``python -m torch.distributed.run --nproc_per_node=N``, gloo on
the CPU, one thread per rank), explains 200 test queries: ``influence((x, y))`` (the full
(200, 1500) scores) and ``influence((x, y), k=10)``, each timed best of 3 after one warm-up
call, with 1 rank and with 2 (the 2 ranks' time: the slower one's), wall time and the
process's CPU time of the same call. Each rank's scores are compared with the 1-rank ones.

    python benchmarks/bench_distributed.py           (about 2 minutes on 2 cores)
    python benchmarks/bench_distributed.py --quick   (a smoke run: 40 queries, 1 repeat)

On a machine shared with other jobs the times are noisy: compare the runs of one invocation.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk

N_TRAIN, BATCH, EPOCHS = 1500, 32, 2


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float64) / 16.0, torch.tensor(data.target)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
    ).double()


def record(store: Path, x, y) -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    data = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    order = torch.Generator().manual_seed(0)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=order)
    with pk.PathRecorder(net, opt, store=store) as recorder:
        for _ in range(EPOCHS):
            for xb, yb in recorder.watch(loader):
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()


def worker(store: str, queries: int, repeats: int, out: str) -> None:
    """One rank (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT; 1 rank: no group)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    x, y = digits()
    net = model()
    path = pk.TrainingPath.load(store)
    path.load_into(net)
    data = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    explainer = pk.PathKernelInfluence(
        net, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    batch = (x[1500 : 1500 + queries], y[1500 : 1500 + queries])
    explainer.influence(batch, k=10)  # warm-up (and the step check, run once)
    found = {}
    for name, call in (
        ("influence", lambda: explainer.influence(batch)),
        ("influence_k10", lambda: explainer.influence(batch, k=10)),
    ):
        times = []
        for _ in range(repeats):
            if world > 1:
                dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            result = call()
            times.append((time.perf_counter() - start, time.process_time() - cpu))
        if not isinstance(result, torch.Tensor):  # KMostInfluentialResults, as plain tensors
            result = (result.indices, result.influence_scores)
        found[name] = (min(times), result)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(found, f"{out}.rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def launch(store, ranks, threads, queries, repeats, folder) -> Path:
    out = folder / f"ranks{ranks}-threads{threads}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", __file__, "--worker", str(store), "--queries",
        str(queries), "--repeats", str(repeats), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.queries, args.repeats, args.out)
        return
    queries, repeats = (40, 1) if args.quick else (200, 3)
    folder = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    x, y = digits()
    record(folder / "store", x, y)
    print(
        f"digits MLP 64-128-10 float64, {N_TRAIN} training examples, "
        f"{len(pk.TrainingPath.load(folder / 'store'))} steps; {queries} queries; "
        f"{os.cpu_count()} CPU cores; best of {repeats}"
    )
    runs = {}
    for ranks, threads in ((1, 1), (2, 1)):
        out = launch(folder / "store", ranks, threads, queries, repeats, folder)
        runs[ranks, threads] = [torch.load(f"{out}.rank{r}.pt") for r in range(ranks)]
    base = runs[1, 1][0]
    rows = {}
    for (ranks, threads), found in runs.items():
        line = {}
        for name in ("influence", "influence_k10"):
            line[name] = max(f[name][0][0] for f in found)  # (the slowest rank)
            line[f"{name}_cpu"] = max(f[name][0][1] for f in found)
            want, difference = base[name][1], 0.0
            for f in found:
                got = f[name][1]
                if name == "influence_k10":
                    assert torch.equal(got[0], want[0]), "top-k indices differ"
                    got, want_values = got[1], want[1]
                else:
                    want_values = want
                scale = float(want_values.abs().max())
                difference = max(difference, float((got - want_values).abs().max()) / scale)
            line[f"{name}_difference"] = difference
        rows[f"{ranks} rank(s) x {threads} thread(s)"] = line
        full, top = base["influence"][0][0] / line["influence"], base["influence_k10"][0][0]
        top /= line["influence_k10"]
        print(
            f"{ranks} rank(s) x {threads} thread(s): influence {line['influence']:.2f} s "
            f"({full:.2f}x; CPU {line['influence_cpu']:.2f} s a rank), influence(k=10) "
            f"{line['influence_k10']:.2f} s ({top:.2f}x; CPU {line['influence_k10_cpu']:.2f} s)"
            f"; max relative difference from 1 rank: {line['influence_difference']:.1e}, "
            f"{line['influence_k10_difference']:.1e} (top-k indices identical)"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
