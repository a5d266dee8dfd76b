"""Benchmark: what does recording the weight path cost a training loop?

For two models, both trained with plain SGD (lr 0.1, every step recorded, ``every=1``):

* the "digits MLP" (64 -> 128 -> 10, ReLU) on scikit-learn's 1,797 real 8x8 digit images
  (standardised), batch 32;
* an MLP of about 1M parameters (512 -> 1024 -> 512 -> 10, ReLU) on seeded synthetic data
  made in code, batch 64;

it measures the wall time per training step of

1. the bare loop (no recorder, but iterating the same DataLoader),
   and "copy": the bare loop plus a copy of the parameters kept every step (an optimizer
   pre-step hook appending ``p.clone()``), the floor that any in-memory recording pays;
2. recording in memory (``PathRecorder(model, optimizer, store=None)``),
3. recording to disk (``store=<fresh folder>``); the timed region runs from creating the
   recorder to the end of ``close()``, which waits for the writer thread and writes the
   final parameters, so every shard and the final parameters are on the disk when the clock
   stops (the store fsyncs each before its manifest lists it, and the manifest and its
   folder after each write).

Each measurement (but with ``--quick``) runs in a fresh Python process, so that no mode
inherits the heap another left behind (gigabytes of snapshots change how fast glibc serves
the next loop's tensors); it does untimed warm-up steps and restarts from the same initial
weights with a fresh optimizer. The three modes are run in a rotating order in each repeat,
and the median over the repeats is reported together with the slowdown versus the bare
loop. The "other CPU" column is the share of the machine's CPUs that other processes used
during a measurement (from ``/proc/stat``); a measurement above 10% is retaken
(``--retries``), and a warning is printed if one stays above, because two OpenMP threads on
two shared cores slow down by large factors when a third process competes.

It also reports a fresh-memory floor: the time per step to copy the parameters into fresh
anonymous memory that is kept (no training), with the CPU time it takes and the kernel's
share of it. Every step of an in-memory recording needs that much fresh memory, so this is
what the page faults and the copy alone cost, whoever allocates the memory.

For disk mode it also reports the store's size per step next to the raw parameter bytes
per step, and compares the store's sustained throughput (store bytes / disk-mode wall
time) with the raw sequential write throughput of the same disk, measured in the same run
by writing the same number of bytes (pre-generated random chunks) to a file in the same
folder: with fsync, and with ``O_DIRECT`` + fsync where the file system takes it. The target
is judged against the faster of the two, the disk's best durable sequential rate (the store
makes every shard durable). Writing into the page cache without fsync, which measures the
machine's memory rather than its disk, is printed for reference.

Targets (1M-parameter model): memory-mode slowdown <= 1.3x; disk mode: slowdown <= 1.3x
or sustained throughput >= 70% of the disk's raw sequential write throughput. To see the
second branch where the disk is the bottleneck, run the benchmark on a slow disk, or
emulate one (Linux, root, cgroup v1 blkio; throttling applies to direct and synced I/O)::

    mkdir /sys/fs/cgroup/blkio/slowdisk
    echo "MAJ:MIN 209715200" > /sys/fs/cgroup/blkio/slowdisk/blkio.throttle.write_bps_device
    sh -c 'echo $$ > /sys/fs/cgroup/blkio/slowdisk/cgroup.procs
           exec python benchmarks/bench_recorder.py'

(MAJ:MIN of the disk from ``lsblk``; 209715200 bytes/s = 200 MiB/s.)

All of the above is the default run, ``--parts overhead``. Two more parts measure sparse
snapshots (``PathRecorder(..., every=k)``, issue 18):

* ``--parts sparse``: disk mode with a snapshot every k = 1, 10 and 100 steps against the
  bare loop, in the same run, for the 1M MLP (400 steps) and an MLP of about 25M parameters
  (2048 -> 4096 -> 4096 -> 10, ReLU, seeded synthetic data, batch 64, 200 steps), both
  trained with SGD momentum 0.9 (lr 0.01), which the replay supports, so that every store
  is exact (each every=k store is checked to be replayable). A fresh process per
  measurement, modes rotated per repeat, medians; the process's CPU time per step (all its
  threads, the writer's included) is printed next to the wall time, because it moves less
  than the wall time when other processes compete for the cores. The bare loop is also
  measured a second time as a mode of its own ("bare-again"): its slowdown is how far two
  identical loops differ by this measure on the machine at hand, and each slowdown comes
  with a 95% bootstrap interval over the repeats. Targets (both models): slowdown <= 1.10x
  at every=10 and <= 1.03x at every=100. Where bare-again's interval is wider than the
  margins (a shared VM: 5-15 % between identical runs of the 1M MLP), measure the 1M MLP
  with ``benchmarks/bench_sparse_paired.py``, which trains a bare twin beside the recorded
  loop, step by step, and cancels the machine's drift.
* ``--parts explain``: the float64 MLP 64 -> 256 -> 10 (Tanh) trained on 1,500 of
  scikit-learn's digits (pixels / 16) for 4 epochs of SGD momentum 0.9 (lr 0.05, batch 32:
  188 steps), recorded to disk with every=1, 10 and 50 in identically seeded runs (their
  final weights are compared). In a fresh process per measurement (rotated, medians),
  ``PathKernelInfluence(..., memory_budget=16 MiB).attribute`` of 10 held-out digits is
  timed, and its peak memory read above the RSS just before the call: VmHWM (reset by
  writing "5" to /proc/self/clear_refs; it counts the store's memory-mapped pages too) and
  RssAnon, sampled every 10 ms. Reported: the time of every=10 (and 50) against every=1
  (the replay's extra forward and backward passes; no target), the relative difference
  ||C_k - C_1||_F / ||C_1||_F of the contributions (target <= 1e-9, float64), and the
  every=50 peak against memory_budget + 10 copies of the model, and against every=1's
  peak + 10 copies of the model (targets). every=1 and every=50 are also run with glibc
  told to give blocks of 64 KiB and more back when they are freed
  (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``), so that their peaks count
  the memory live at once, not what the C heap keeps resident after freeing it; the
  memory targets are judged on these. Each measured call follows a warm-up call of another
  explainer on one query (what a process's first call loads once, torch.func's modules and
  thread pools, about 85 MiB here, is not the explanation's memory).

The load average is printed before and after each part.

Run from the repository root::

    python benchmarks/bench_recorder.py            # default run, about 2-3 minutes on 2 cores
    python benchmarks/bench_recorder.py --quick    # smoke run in one process, ~10 seconds
    python benchmarks/bench_recorder.py --steps 500 --repeats 5 --out-dir /some/disk --keep
    python benchmarks/bench_recorder.py --threads 1  # torch on one core, the writer on another
    python benchmarks/bench_recorder.py --parts sparse explain  # ~25 min on 2 busy cores
    python benchmarks/bench_recorder.py --parts sparse --models mlp1m-momentum  # one model
    python benchmarks/bench_recorder.py --parts all --quick     # smoke run of every part

The exit status is 0 when every target passes and 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    import pk_attrib as pk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pk_attrib as pk
from _memory import AnonSampler, proc_status, reset_peak  # (benchmarks/ is on sys.path)

from pk_attrib.record.diskio import _anonymous_map  # page-aligned memory, for the O_DIRECT raw rate

MODES = ("bare", "copy", "memory", "disk")
PARTS = ("overhead", "sparse", "explain")
TARGET_WORKLOAD = "mlp1m"
NOISY_LOAD = 0.1  # other processes' share of the CPUs above which timings are suspect
MAX_SLOWDOWN = 1.3
MIN_THROUGHPUT_FRACTION = 0.7
RAW_CHUNK_BYTES = 16 << 20
MiB = 1 << 20


# -- workloads ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model, its data and its measurement settings."""

    key: str
    name: str
    make_model: Callable[[], torch.nn.Module]
    make_dataset: Callable[[], TensorDataset]
    batch_size: int
    steps: int
    warmup: int
    lr: float = 0.1
    momentum: float = 0.0

    def optimizer(self, model: torch.nn.Module) -> torch.optim.SGD:
        """A fresh SGD optimizer over the model's parameters (the workload's lr, momentum)."""
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.make_model().parameters())

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.make_model().parameters())


def mlp(*widths: int) -> Callable[[], torch.nn.Module]:
    """A factory of seeded ReLU MLPs with the given layer widths."""

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i:
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Linear(d_in, d_out))
        return torch.nn.Sequential(*layers)

    return make


def digits_dataset() -> TensorDataset:
    """The 1,797 8x8 digit images of scikit-learn, standardised per pixel."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    std = x.std(dim=0)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return TensorDataset(x, torch.tensor(digits.target, dtype=torch.int64))


def synthetic_dataset(n: int = 8192, d_in: int = 512, n_classes: int = 10) -> TensorDataset:
    """Gaussian inputs labelled by a random linear teacher (seeded)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen)
    teacher = torch.randn(d_in, n_classes, generator=gen)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


THREADS_ENV = "PK_BENCH_RECORDER_THREADS"


def workloads(steps: int | None = None, quick: bool = False) -> dict[str, Workload]:
    """The benchmarked workloads by key; ``steps`` overrides the per-model default."""
    scale = 10 if quick else 1
    return {
        "digits": Workload(
            key="digits",
            name="digits MLP",
            make_model=mlp(64, 128, 10),
            make_dataset=digits_dataset,
            batch_size=32,
            steps=steps or 4000 // scale,
            warmup=100 // scale,
        ),
        "mlp1m": Workload(
            key="mlp1m",
            name="1M MLP",
            make_model=mlp(512, 1024, 512, 10),
            make_dataset=synthetic_dataset,
            batch_size=64,
            steps=steps or 400 // scale,
            warmup=30 // scale,
        ),
    }


def sparse_workloads(steps: int | None = None, quick: bool = False) -> dict[str, Workload]:
    """The workloads of the sparse-snapshot part (SGD with momentum, which replays exactly)."""
    scale = 10 if quick else 1
    return {
        "mlp1m-momentum": Workload(
            key="mlp1m-momentum",
            name="1M MLP, SGD momentum 0.9",
            make_model=mlp(512, 1024, 512, 10),
            make_dataset=synthetic_dataset,
            batch_size=64,
            steps=steps or 400 // scale,
            warmup=30 // scale,
            lr=0.01,
            momentum=0.9,
        ),
        "mlp25m": Workload(
            key="mlp25m",
            name="25M MLP, SGD momentum 0.9",
            make_model=mlp(2048, 4096, 4096, 10),
            make_dataset=lambda: synthetic_dataset(d_in=2048),
            batch_size=64,
            steps=steps or 200 // scale,
            warmup=2 if quick else 5,
            lr=0.01,
            momentum=0.9,
        ),
    }


def all_workloads() -> dict[str, Workload]:
    """Every workload by key (what a measurement process looks its key up in)."""
    return {**workloads(), **sparse_workloads()}


# -- one measurement (run in a fresh process) -----------------------------------------------------


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    watch: Callable[[DataLoader], Iterable] | None = None,
) -> None:
    """Run ``steps`` SGD steps, looping over the loader (through ``watch`` if given)."""
    loss_fn = torch.nn.functional.cross_entropy
    done = 0
    while done < steps:
        for x, y in loader if watch is None else watch(loader):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break


def prime_allocator() -> None:
    """Put glibc malloc in the steady state of a long-running training process.

    glibc raises its mmap threshold (and twice that, its heap trim threshold) to the size of
    the largest mmap-ed block freed so far. A fresh process that has freed nothing large
    returns the gradients' and activations' memory to the kernel after every step and pays
    page faults on the next one, so its bare loop runs up to ~1.7x slower on this kind of
    machine, which would flatter the recorder's relative cost. Freeing one 4 MiB block, as
    any real training script soon does, removes that artefact for every mode alike.
    """
    block = torch.empty(4 << 20, dtype=torch.uint8)
    del block


def system_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux ``/proc/stat``), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure_once(work: Workload, mode: str, store: Path | None) -> dict[str, float]:
    """Time ``work.steps`` steps in one mode, after untimed warm-up steps.

    Returns:
        ``seconds`` (whole timed region), ``close_seconds`` (the part spent in
        ``recorder.close()``, 0 for the bare loop), ``other_load`` (the share of the
        machine's CPU capacity that other processes used meanwhile, NaN where unknown) and
        ``cpu_seconds`` (this process's CPU time, all its threads, over the timed region).
    """
    prime_allocator()
    model = work.make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(
        work.make_dataset(),
        batch_size=work.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    train(model, work.optimizer(model), loader, work.warmup)
    model.load_state_dict(initial)
    optimizer = work.optimizer(model)
    gc.collect()

    busy, own = system_busy_seconds(), time.process_time()
    start = time.perf_counter()
    if mode in ("bare", AGAIN):
        train(model, optimizer, loader, work.steps)
        closing = end = time.perf_counter()
    elif mode == "copy":  # the floor of recording in memory: keep a copy of w_s every step
        kept: list[list[torch.Tensor]] = []
        params = list(model.parameters())
        hook = optimizer.register_step_pre_hook(
            lambda *_: kept.append([p.detach().clone() for p in params])
        )
        train(model, optimizer, loader, work.steps)
        hook.remove()
        closing = end = time.perf_counter()
    else:  # "memory", "disk", or "every=<k>": to disk with a snapshot every k steps
        every = int(mode.split("=")[1]) if mode.startswith("every=") else 1
        recorder = pk.PathRecorder(model, optimizer, store=store, every=every)
        train(model, optimizer, loader, work.steps, watch=recorder.watch)
        closing = time.perf_counter()
        recorder.close()
        end = time.perf_counter()
        if recorder.steps_recorded != work.steps:
            raise RuntimeError(f"recorded {recorder.steps_recorded} steps, not {work.steps}")
        if every > 1 and not recorder.path.manifest.get("replayable"):
            raise RuntimeError(f"the every={every} store is not replayable: not an exact path")
    busy_after, own_after = system_busy_seconds(), time.process_time()
    other_load = float("nan")
    if busy is not None and busy_after is not None:
        other = (busy_after - busy) - (own_after - own)
        other_load = max(0.0, other) / ((end - start) * (os.cpu_count() or 1))
    return {
        "seconds": end - start,
        "close_seconds": end - closing,
        "other_load": other_load,
        "cpu_seconds": own_after - own,
    }


def measure_in_child(work: Workload, mode: str, store: Path | None) -> dict[str, float]:
    """`measure_once` in a fresh Python process, so that no mode inherits another's heap."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        work.key,
        mode,
        str(work.steps),
        str(work.warmup),
        str(store or ""),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement {work.key}/{mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def child_main(key: str, mode: str, steps: str, warmup: str, store: str) -> int:
    if os.environ.get(THREADS_ENV):  # --threads, passed on by the parent
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    work = all_workloads()[key]
    work.steps, work.warmup = int(steps), int(warmup)
    print(json.dumps(measure_once(work, mode, Path(store) if store else None)))
    return 0


# -- all measurements of a workload -------------------------------------------------------------


@dataclass
class RunResult:
    """Timings (seconds per run) of one workload by mode, and the sizes of its stores."""

    modes: tuple[str, ...] = MODES
    seconds: dict[str, list[float]] = field(default_factory=dict)
    close_seconds: dict[str, list[float]] = field(default_factory=dict)
    other_load: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    store_bytes: dict[str, list[int]] = field(default_factory=dict)  # by the modes with a store
    retried: int = 0

    def __post_init__(self) -> None:
        tables = (self.seconds, self.close_seconds, self.other_load, self.cpu_seconds)
        for table in (*tables, self.store_bytes):
            for mode in self.modes:
                table.setdefault(mode, [])

    def median(self, mode: str) -> float:
        return statistics.median(self.seconds[mode])


def folder_bytes(folder: Path) -> int:
    """Total size of the files in a folder tree."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def writes_store(mode: str) -> bool:
    """Whether a mode records to a store on disk ("disk", "every=<k>")."""
    return mode == "disk" or mode.startswith("every=")


def measure(
    work: Workload,
    repeats: int,
    retries: int,
    out_dir: Path,
    keep: bool,
    isolate: bool = True,
    modes: tuple[str, ...] = MODES,
    progress: bool = False,
) -> RunResult:
    """All modes of one workload, ``repeats`` times each in a rotating order.

    A measurement during which other processes used more than ``NOISY_LOAD`` of the CPUs
    is taken again, up to ``retries`` times (the last attempt counts). With ``isolate``
    each measurement runs in a fresh process, otherwise in this one (faster to start).
    With ``progress`` a line is printed after each measurement.
    """
    result = RunResult(modes)
    for rep in range(repeats):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for mode in order:
            tag = mode.replace("=", "")
            store = out_dir / f"store-{work.key}-{tag}-{rep}" if writes_store(mode) else None
            for attempt in range(retries + 1):
                if store is not None and store.exists():
                    shutil.rmtree(store)
                run = measure_in_child if isolate else measure_once
                timing = run(work, mode, store)
                if not timing["other_load"] > NOISY_LOAD:  # NaN (unknown) counts as quiet
                    break
                result.retried += attempt < retries
            result.seconds[mode].append(timing["seconds"])
            result.close_seconds[mode].append(timing["close_seconds"])
            result.cpu_seconds[mode].append(timing.get("cpu_seconds", float("nan")))
            if progress:
                print(
                    f"  ({work.key} {mode}, repeat {rep + 1}: {timing['seconds']:.1f} s, "
                    f"{timing['seconds'] / work.steps * 1e3:.2f} ms/step, other CPU "
                    f"{timing['other_load']:.0%}, load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
            result.other_load[mode].append(timing["other_load"])
            if store is not None:
                result.store_bytes[mode].append(folder_bytes(store))
                if not keep:
                    shutil.rmtree(store)
    return result


# -- raw disk throughput ---------------------------------------------------------------------------


def raw_write_seconds(path: Path, total: int, chunks: list[bytes], fsync: bool) -> float:
    """Seconds to write ``total`` bytes sequentially to a new file, flushed (and fsynced)."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < total:
            chunk = chunks[i % len(chunks)]
            n = min(len(chunk), total - written)
            f.write(chunk if n == len(chunk) else memoryview(chunk)[:n])
            written += n
            i += 1
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def fresh_memory_floor(param_bytes: int, steps: int, repeats: int) -> dict[str, float]:
    """Per step: seconds to copy ``param_bytes`` into fresh anonymous memory that is kept.

    No training, nothing else: the page faults (the kernel zeroing and mapping fresh pages)
    and the copy that any in-memory recording of every step pays. Also the CPU seconds
    (user + system, all threads) per step, and the system share of them. Median of repeats.
    """
    import mmap

    source = torch.randn(param_bytes // 4)
    walls, cpus, systems = [], [], []
    for _ in range(repeats):
        kept = []
        before, start = os.times(), time.perf_counter()
        for _ in range(steps):
            memory = mmap.mmap(-1, param_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            target = torch.frombuffer(memory, dtype=torch.float32)
            target.copy_(source)
            kept.append((memory, target))
        wall, after = time.perf_counter() - start, os.times()
        walls.append(wall / steps)
        systems.append((after.system - before.system) / steps)
        cpus.append((after.user - before.user) / steps + systems[-1])
        del kept, target
        gc.collect()
    return {
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "system": statistics.median(systems),
    }


def raw_direct_seconds(path: Path, total: int, chunks: list[torch.Tensor]) -> float | None:
    """Seconds to write ``total`` bytes with ``O_DIRECT`` and fsync, None where refused.

    ``total`` is a multiple of 4096; the chunks are page-aligned uint8 tensors of whole pages.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return None
    start = time.perf_counter()
    try:
        written, i = 0, 0
        while written < total:
            chunk = chunks[i % len(chunks)].numpy()[: total - written]
            written += os.write(fd, chunk)
            i += 1
        os.fsync(fd)
    except OSError:  # a file system that refuses the alignment
        return None
    finally:
        os.close(fd)
        path.unlink()
    return time.perf_counter() - start


def raw_throughput(out_dir: Path, total: int, repeats: int) -> dict[str, float]:
    """Median raw sequential write throughput (bytes/s): without fsync (into the page
    cache), with fsync, and with ``O_DIRECT`` + fsync ("direct", absent where refused)."""
    chunks = [os.urandom(RAW_CHUNK_BYTES) for _ in range(4)]
    result = {}
    for fsync in (False, True):
        times = [
            raw_write_seconds(out_dir / "raw-write.bin", total, chunks, fsync)
            for _ in range(repeats)
        ]
        result["fsync" if fsync else "no fsync"] = total / statistics.median(times)
    aligned = [_anonymous_map(RAW_CHUNK_BYTES) for _ in range(2)]
    for i, chunk in enumerate(aligned):
        chunk.copy_(torch.frombuffer(bytearray(chunks[i]), dtype=torch.uint8))
    pages = total - total % 4096
    times = [raw_direct_seconds(out_dir / "raw-write.bin", pages, aligned) for _ in range(repeats)]
    if None not in times:
        result["direct"] = pages / statistics.median(times)
    return result


# -- report ---------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def report(
    work: Workload, result: RunResult, raw: dict[str, float], floor: dict[str, float]
) -> dict[str, bool]:
    """Print one workload's table; return its target checks (description -> passed)."""
    bare = result.median("bare")
    print(
        f"\n== {work.name}: {work.n_params:,} parameters ({fmt_bytes(work.param_bytes)}), "
        f"batch {work.batch_size}, {len(work.make_dataset()):,} examples, {work.steps} steps "
        f"(+{work.warmup} warm-up), {len(result.seconds['bare'])} repeats =="
    )
    print(
        f"{'mode':<8} {'median/step':>12} {'min/step':>10} {'max/step':>10} {'slowdown':>9} "
        f"{'in close()':>11} {'other CPU':>10}"
    )
    for mode in MODES:
        per_step = [t / work.steps * 1e3 for t in result.seconds[mode]]
        close = statistics.median(result.close_seconds[mode])
        print(
            f"{mode:<8} {statistics.median(per_step):>9.3f} ms {min(per_step):>7.3f} ms "
            f"{max(per_step):>7.3f} ms {result.median(mode) / bare:>8.2f}x "
            f"{close:>9.3f} s {max(result.other_load[mode]):>9.0%}"
        )
    print(
        f"memory mode / copy floor = {result.median('memory') / result.median('copy'):.2f}x "
        "(what recording adds beyond copying w_s into fresh memory every step)"
    )
    per_step_bare = bare / work.steps
    print(
        f"fresh-memory floor     {floor['wall'] * 1e3:>8.3f} ms/step   (copying "
        f"{fmt_bytes(work.param_bytes)} into fresh anonymous memory that is kept, no training; "
        f"CPU {floor['cpu'] * 1e3:.2f} ms, {floor['system'] / max(floor['cpu'], 1e-12):.0%} of "
        f"it in the kernel) = bare + floor {(per_step_bare + floor['wall']) / per_step_bare:.2f}x"
    )
    busiest = max(max(loads) for loads in result.other_load.values())
    if result.retried:
        print(f"({result.retried} measurement(s) retaken because other processes were busy)")
    if busiest > NOISY_LOAD:
        print(
            f"WARNING: other processes used up to {busiest:.0%} of the CPUs during a "
            "measurement; these timings are unreliable, rerun on a quiet machine"
        )

    store_bytes = statistics.median(result.store_bytes["disk"])
    disk = result.median("disk")
    sustained = store_bytes / disk
    disk_rate = max(raw["fsync"], raw.get("direct", 0.0))  # the disk's best durable rate
    fraction = sustained / disk_rate
    print(
        f"store bytes per step   {fmt_bytes(store_bytes / work.steps):>12}   "
        f"(store total {fmt_bytes(store_bytes)}, incl. manifest and final params)"
    )
    print(
        f"raw param bytes/step   {fmt_bytes(work.param_bytes):>12}   "
        f"(store overhead {store_bytes / work.steps / work.param_bytes - 1:+.2%})"
    )
    direct = f"{raw['direct'] / MiB:.1f} MiB/s" if "direct" in raw else "refused here"
    print(
        f"raw sequential write   {disk_rate / MiB:>8.1f} MiB/s   (the disk: same bytes, same "
        f"folder, {RAW_CHUNK_BYTES // MiB} MiB chunks, the faster of fsync "
        f"{raw['fsync'] / MiB:.1f} MiB/s and O_DIRECT + fsync {direct}); into the page cache "
        f"without fsync {raw['no fsync'] / MiB:.1f} MiB/s"
    )
    print(
        f"store sustained write  {sustained / MiB:>8.1f} MiB/s   (store bytes / disk-mode wall "
        f"time) = {fraction:.1%} of the disk's raw rate, {sustained / raw['no fsync']:.1%} of "
        "the page cache's (the store fsyncs each shard)"
    )
    if disk > bare:
        print(
            f"store marginal write   {store_bytes / (disk - bare) / MiB:>8.1f} MiB/s   "
            "(store bytes / (disk - bare) wall time)"
        )
    memory_ratio, disk_ratio = result.median("memory") / bare, disk / bare
    return {
        f"memory slowdown {memory_ratio:.2f}x <= {MAX_SLOWDOWN}x": memory_ratio <= MAX_SLOWDOWN,
        f"disk slowdown {disk_ratio:.2f}x <= {MAX_SLOWDOWN}x OR sustained {fraction:.1%} >= "
        f"{MIN_THROUGHPUT_FRACTION:.0%} of the disk's raw rate": (
            disk_ratio <= MAX_SLOWDOWN or fraction >= MIN_THROUGHPUT_FRACTION
        ),
    }


# -- sparse snapshots (every=k): recording ------------------------------------------------------

SPARSE_EVERY = (1, 10, 100)
SPARSE_TARGETS = {10: 1.10, 100: 1.03}  # the issue's: slowdown against the bare loop
# the bare loop measured a second time, as a mode of its own: its "slowdown" is the spread
# that this measure shows on this machine for two identical loops
AGAIN = "bare-again"
SPARSE_MODES = ("bare", AGAIN) + tuple(f"every={k}" for k in SPARSE_EVERY)
RESAMPLES = 2000  # bootstrap resamples of the repeats, for the ratios' 95% intervals


def bootstrap_interval(
    statistic: Callable[..., float], *samples: list[float]
) -> tuple[float, float]:
    """A 95% bootstrap interval of ``statistic(*samples)`` (percentile method).

    Each sample is resampled with replacement, independently (a fixed seed: the same
    measurements give the same interval).
    """
    rng = random.Random(0)
    values = sorted(
        statistic(*(rng.choices(sample, k=len(sample)) for sample in samples))
        for _ in range(RESAMPLES)
    )
    return values[int(0.025 * RESAMPLES)], values[int(0.975 * RESAMPLES) - 1]


def ratio_interval(runs: list[float], bare: list[float]) -> tuple[float, float]:
    """A 95% bootstrap interval of ``median(runs) / median(bare)`` (each mode's repeats
    resampled)."""
    return bootstrap_interval(lambda a, b: statistics.median(a) / statistics.median(b), runs, bare)


def report_sparse(work: Workload, result: RunResult) -> dict[str, bool]:
    """Print one workload's every=k table; return its target checks (description -> passed)."""
    bare = result.median("bare")
    print(
        f"\n== {work.name}: {work.n_params:,} parameters ({fmt_bytes(work.param_bytes)}), "
        f"batch {work.batch_size}, {len(work.make_dataset()):,} examples, {work.steps} steps "
        f"(+{work.warmup} warm-up), {len(result.seconds['bare'])} repeats, disk mode =="
    )
    print(
        f"{'mode':<10} {'median/step':>12} {'min/step':>10} {'max/step':>10} {'slowdown':>9} "
        f"{'95% interval':>15} {'in close()':>11} {'other CPU':>10} {'store':>11} "
        f"{'CPU/step':>10} {'CPU ratio':>10}"
    )
    bare_cpu = statistics.median(result.cpu_seconds["bare"])
    for mode in result.modes:
        per_step = [t / work.steps * 1e3 for t in result.seconds[mode]]
        close = statistics.median(result.close_seconds[mode])
        size = result.store_bytes[mode]
        cpu = statistics.median(result.cpu_seconds[mode])
        low, high = ratio_interval(result.seconds[mode], result.seconds["bare"])
        print(
            f"{mode:<10} {statistics.median(per_step):>9.3f} ms {min(per_step):>7.3f} ms "
            f"{max(per_step):>7.3f} ms {result.median(mode) / bare:>8.3f}x "
            f"{f'{low:.3f}-{high:.3f}x':>15} {close:>9.3f} s {max(result.other_load[mode]):>9.0%} "
            f"{fmt_bytes(statistics.median(size)) if size else '-':>11} "
            f"{cpu / work.steps * 1e3:>7.3f} ms {cpu / bare_cpu:>9.3f}x"
        )
    print(
        "(slowdown: median wall time against the bare loop's, the targets' measure; 95% "
        "interval: of that ratio, bootstrapped over the repeats; bare-again: the bare loop "
        "once more, what two identical loops differ by here; CPU/step, CPU ratio: this "
        "process's CPU time, all threads, the recorder's writer included: what the recording "
        "costs in work, less sensitive to other processes than wall time)"
    )
    busiest = max(max(loads) for loads in result.other_load.values())
    if result.retried:
        print(f"({result.retried} measurement(s) retaken because other processes were busy)")
    if busiest > NOISY_LOAD:
        print(
            f"WARNING: other processes used up to {busiest:.0%} of the CPUs during a "
            "measurement; these timings are unreliable, rerun on a quiet machine"
        )
    checks = {}
    for every, limit in SPARSE_TARGETS.items():
        ratio = result.median(f"every={every}") / bare
        low, high = ratio_interval(result.seconds[f"every={every}"], result.seconds["bare"])
        checks[
            f"every={every} slowdown {ratio:.3f}x <= {limit:.2f}x (95% interval "
            f"{low:.3f}-{high:.3f}x)"
        ] = ratio <= limit
    return checks


# -- sparse snapshots (every=k): explaining --------------------------------------------------------

EXPLAIN_EVERY = (1, 10, 50)
EXPLAIN_BUDGET = 16 * MiB  # memory_budget of the explainer
MODEL_COPIES = 10  # "a small multiple of the model": the peak's allowance beyond memory_budget
EXPLAIN_QUERIES = 10


def explain_data() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """1,500 of scikit-learn's digits (pixels / 16, float64) to train on, the next 10 to query."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    queries = (x[1500 : 1500 + EXPLAIN_QUERIES], y[1500 : 1500 + EXPLAIN_QUERIES])
    return TensorDataset(x[:1500], y[:1500]), queries


def explain_model(width: int) -> torch.nn.Module:
    """The seeded float64 MLP 64 -> width -> 10 (Tanh) of the explanation part."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    ).double()


def explain_record(store: Path, every: int, epochs: int, width: int) -> tuple[torch.nn.Module, int]:
    """Train the explanation part's MLP (SGD momentum 0.9, lr 0.05, batch 32), recording to
    ``store`` with a snapshot every ``every`` steps (the same seeds for every ``every``).

    Returns:
        The trained model and the number of steps recorded.
    """
    train_set, _ = explain_data()
    model = explain_model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(
        train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    with pk.PathRecorder(model, optimizer, store=store, every=every) as recorder:
        for _ in range(epochs):
            for x, y in recorder.watch(loader):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    return model, recorder.steps_recorded


def explain_child(spec: dict) -> dict:
    """Time ``attribute`` of the queries on one store and measure its peak memory.

    A warm-up call of another explainer on one query loads what a process's first call
    loads once; the measured explainer is made next; then VmHWM is reset to the current RSS
    (writing "5" to /proc/self/clear_refs) and a thread samples RssAnon (VmHWM also counts
    the store's memory-mapped, file-backed pages). Peaks are returned with the baselines
    just before.
    """
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    train_set, (qx, qy) = explain_data()
    model = explain_model(spec["width"])
    path = pk.TrainingPath.load(spec["store"])
    path.load_into(model)

    def make_explainer():
        return pk.PathKernelInfluence(
            model,
            train_set,
            path,
            torch.nn.CrossEntropyLoss(),
            memory_budget=spec["budget"],
            show_progress=False,
        )

    import warnings

    # a warm-up call on an explainer of its own (dropped before the measured one): what the
    # first call of a process loads once (torch.func's and the decompositions' modules, the
    # thread pools) is not the explanation's memory; nothing of the data is cached across
    # explainers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_explainer().attribute(qx[:1], target=qy[:1])
    explainer = make_explainer()
    gc.collect()
    before = proc_status()
    reset_peak()  # VmHWM := VmRSS now
    sampler = AnonSampler(interval=0.01)
    sampler.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        busy, own = system_busy_seconds(), time.process_time()
        start = time.perf_counter()
        dec = explainer.attribute(qx, target=qy)
        seconds = time.perf_counter() - start
        busy_after, own_after = system_busy_seconds(), time.process_time()
    peak_anon = sampler.stop()
    after = proc_status()
    other_load = float("nan")
    if busy is not None and busy_after is not None:
        other = (busy_after - busy) - (own_after - own)
        other_load = max(0.0, other) / (seconds * (os.cpu_count() or 1))
    if spec.get("save"):
        torch.save(dec.contributions, spec["save"])
    return {
        "seconds": seconds,
        "other_load": other_load,
        "peak": after["VmHWM"] - before["VmRSS"],
        "peak_anon": peak_anon - before["RssAnon"],
        "max_delta": float(dec.delta.abs().max()),
        "warnings": sorted({type(w.message).__name__ for w in caught}),
    }


# glibc malloc: blocks of 64 KiB and more get a map of their own, given back when freed, so that
# the resident peak counts the memory live at once rather than what the C heap keeps
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def explain_in_child(spec: dict, env: dict[str, str] | None = None) -> dict:
    """`explain_child` in a fresh Python process (``env``: extra environment variables)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--explain-child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"explanation {spec['store']} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def explain_part(out_dir: Path, repeats: int, quick: bool) -> dict[str, bool]:
    """Explanation time of every=10 (and 50) against every=1, agreement, peak memory."""
    epochs, width = (1, 64) if quick else (4, 256)
    model = explain_model(width)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stores = {k: out_dir / f"explain-every{k}" for k in EXPLAIN_EVERY}
    finals = {}
    for every, store in stores.items():
        if store.exists():
            shutil.rmtree(store)
        trained, steps = explain_record(store, every, epochs, width)
        finals[every] = trained.state_dict()
    same = max(
        float((finals[k][n] - finals[1][n]).abs().max()) for k in EXPLAIN_EVERY for n in finals[1]
    )
    print(
        f"\n== explanation: digits MLP 64-{width}-10 Tanh, float64, {n_params:,} parameters "
        f"({fmt_bytes(model_bytes)}), 1,500 training digits, batch 32, {epochs} epoch(s) = "
        f"{steps} steps, SGD momentum 0.9 lr 0.05; attribute() of {EXPLAIN_QUERIES} queries, "
        f"memory_budget {fmt_bytes(EXPLAIN_BUDGET)}; each in a fresh process, "
        f"{repeats} repeat(s) rotated =="
    )
    print(
        f"(the stores come from identically seeded runs: final weights equal to {same:.1e}; "
        "peaks are above the RSS just before attribute())"
    )
    runs: dict[int, list[dict]] = {k: [] for k in EXPLAIN_EVERY}
    live: dict[int, list[dict]] = {1: [], 50: []}  # the same with LIVE_MALLOC
    saved = {k: out_dir / f"contributions-every{k}.pt" for k in EXPLAIN_EVERY}
    configs = [(k, False) for k in EXPLAIN_EVERY] + [(1, True), (50, True)]
    for rep in range(repeats):
        for every, with_live in configs[rep % 5 :] + configs[: rep % 5]:
            spec = {"store": str(stores[every]), "width": width, "budget": EXPLAIN_BUDGET}
            if with_live:
                live[every].append(explain_in_child(spec, LIVE_MALLOC))
                continue
            if rep == 0:
                spec["save"] = str(saved[every])
            runs[every].append(explain_in_child(spec))
    contributions = {k: torch.load(f) for k, f in saved.items()}
    base = statistics.median(r["seconds"] for r in runs[1])

    def peak(every: int, key: str = "both", table: dict | None = None) -> float:
        """Median peak above the RSS before attribute(); "both": the larger of the two."""
        keys = ("peak", "peak_anon") if key == "both" else (key,)
        found = runs if table is None else table
        return max(statistics.median(r[k] for r in found[every]) for k in keys)

    print(
        f"{'every':<6} {'store':>10} {'attribute':>10} {'min':>8} {'max':>8} {'vs every=1':>11} "
        f"{'peak VmHWM':>11} {'peak anon':>10} {'+models':>8} {'other CPU':>10} "
        f"{'rel. diff':>10}  warnings"
    )
    for every in EXPLAIN_EVERY:
        times = [r["seconds"] for r in runs[every]]
        beyond = (peak(every) - peak(1)) / model_bytes
        diff = contributions[every] - contributions[1]
        rel = float(diff.norm() / contributions[1].norm())
        names = sorted({w for r in runs[every] for w in r["warnings"]}) or ["-"]
        print(
            f"{every:<6} {fmt_bytes(folder_bytes(stores[every])):>10} "
            f"{statistics.median(times):>8.2f} s {min(times):>6.2f} s {max(times):>6.2f} s "
            f"{statistics.median(times) / base:>10.2f}x {fmt_bytes(peak(every, 'peak')):>11} "
            f"{fmt_bytes(peak(every, 'peak_anon')):>10} {beyond:>+8.1f} "
            f"{max(r['other_load'] for r in runs[every]):>9.0%} {rel:>10.1e}  {', '.join(names)}"
        )
    print(
        "(attribute: median wall time; peak VmHWM / anon: median peak above the RSS just before "
        "attribute(), all resident pages / anonymous ones (sampled every 10 ms); +models: the "
        f"larger of the two beyond every=1's, in copies of the model ({fmt_bytes(model_bytes)}); "
        f"rel. diff: ||C_k - C_1||_F / ||C_1||_F of the {EXPLAIN_QUERIES} x 1,500 contributions)"
    )
    print(
        "the same with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (glibc gives "
        "blocks of 64 KiB and more back when freed: the peak counts live memory, not what "
        "the C heap keeps):"
    )
    for every in live:
        times = [r["seconds"] for r in live[every]]
        beyond = (peak(every, table=live) - peak(1, table=live)) / model_bytes
        print(
            f"{every:<6} {'':>10} {statistics.median(times):>8.2f} s {min(times):>6.2f} s "
            f"{max(times):>6.2f} s {statistics.median(times) / base:>10.2f}x "
            f"{fmt_bytes(peak(every, 'peak', live)):>11} "
            f"{fmt_bytes(peak(every, 'peak_anon', live)):>10} {beyond:>+8.1f}"
        )
    ratio = statistics.median(r["seconds"] for r in runs[10]) / base
    ratio50 = statistics.median(r["seconds"] for r in runs[50]) / base
    print(
        f"explanation time every=10 / every=1 = {ratio:.2f}x, every=50 / every=1 = "
        f"{ratio50:.2f}x (reported, no target)"
    )
    limit = EXPLAIN_BUDGET + MODEL_COPIES * model_bytes
    extra = MODEL_COPIES * model_bytes
    agree = max(
        float((contributions[k] - contributions[1]).norm() / contributions[1].norm())
        for k in EXPLAIN_EVERY
    )
    # judged on live memory (glibc giving freed blocks back): after the warm-up call, the
    # C heap's retained pages would hide what the measured call allocates
    p50, p1 = peak(50, table=live), peak(1, table=live)
    return {
        f"every=50 live peak {fmt_bytes(p50)} <= memory_budget + {MODEL_COPIES} models = "
        f"{fmt_bytes(limit)}": p50 <= limit,
        f"every=50 live peak beyond every=1's {fmt_bytes(p50 - p1)} <= {MODEL_COPIES} "
        f"models = {fmt_bytes(extra)}": p50 - p1 <= extra,
        f"every=10, 50 agree with every=1 to {agree:.1e} <= 1e-9 (float64)": agree <= 1e-9,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per measurement for every model of the recording parts "
        "(default: 4000 for the digits MLP, 400 for the 1M MLPs, 200 for the 25M MLP; a tenth "
        "with --quick)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=(*PARTS, "all"),
        default=["overhead"],
        help="what to measure: 'overhead' (the default run: every=1 in all modes), 'sparse' "
        "(disk mode at every=1, 10, 100 against the bare loop, 1M and 25M MLPs), 'explain' "
        "(attribute() time of every=1, 10, 50 stores, their agreement, the peak memory), "
        "'all'",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats of each measurement (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the stores and the raw-write file "
        "(default: a fresh temporary folder under /tmp, removed at the end)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="times to retake a measurement disturbed by other processes (default 1; 0 with "
        "--quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run, all in this process (about 10 s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores on disk")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for every mode (default: torch's, one per core); "
        "--threads 1 on 2 cores leaves the store's writer thread a core of its own",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(sparse_workloads()),
        default=None,
        help="the sparse part's models to measure (default: all)",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--explain-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.explain_child:
        print(json.dumps(explain_child(json.loads(args.explain_child))))
        return 0
    parts = PARTS if "all" in args.parts else tuple(p for p in PARTS if p in args.parts)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ[THREADS_ENV] = str(args.threads)  # for the measurement processes
    repeats = args.repeats or (1 if args.quick else 3)
    retries = args.retries if args.retries is not None else (0 if args.quick else 1)
    # a terminated run still removes its stores (and its measurement process) on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="pk_bench_", dir="/tmp"))
        remove_out_dir = not args.keep
    else:
        out_dir = args.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_out_dir = False

    print(
        f"pk_attrib recorder benchmark: torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, out dir {out_dir}"
    )
    print_load("start")
    started = time.perf_counter()
    checks: list[tuple[str, str, bool, bool]] = []  # (what, check, passed, a target)
    try:
        if "overhead" in parts:
            print(
                "\n# overhead: plain SGD lr 0.1, every=1; wall time per step; the recording modes "
                f"time PathRecorder(...) through close();\neach measurement runs in "
                f"{'this process (--quick)' if args.quick else 'a fresh process'}"
                ", modes rotated per repeat, after warm-up steps"
            )
            for work in workloads(args.steps, args.quick).values():
                result = measure(work, repeats, retries, out_dir, args.keep, not args.quick)
                store_bytes = int(statistics.median(result.store_bytes["disk"]))
                raw = raw_throughput(out_dir, store_bytes, repeats)
                floor = fresh_memory_floor(work.param_bytes, work.steps, repeats)
                target = work.key == TARGET_WORKLOAD
                checks += [
                    (work.name, check, ok, target)
                    for check, ok in report(work, result, raw, floor).items()
                ]
            print_load("after overhead")
        if "sparse" in parts:
            print(
                "\n# sparse: disk mode with a snapshot every k steps (PathRecorder(..., "
                "every=k)) against the bare loop, SGD momentum 0.9 (replayable: the stores are "
                "exact);\nwall time per step through close(), each measurement in "
                f"{'this process (--quick)' if args.quick else 'a fresh process'}, modes "
                "rotated per repeat, after warm-up steps"
            )
            for work in sparse_workloads(args.steps, args.quick).values():
                if args.models and work.key not in args.models:
                    continue
                result = measure(
                    work, repeats, retries, out_dir, args.keep, not args.quick, SPARSE_MODES, True
                )
                checks += [
                    (work.name, check, ok, True)
                    for check, ok in report_sparse(work, result).items()
                ]
                print_load(f"after {work.name}")
        if "explain" in parts:
            explained = explain_part(out_dir, repeats, args.quick)
            checks += [("explanation", check, ok, True) for check, ok in explained.items()]
            print_load("after explanation")
    finally:
        if remove_out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)

    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    print("targets (the overhead part's digits MLP is shown for information only):")
    if args.quick:
        print("  (--quick: a tenth of the steps, few repeats; a smoke run, not a verdict)")
    passed = True
    for what, check, ok, target in checks:
        passed &= ok or not target
        verdict = ("PASS" if ok else "FAIL") + ("" if target else " (info)")
        print(f"  {verdict:<11} {what}: {check}")
    return 0 if passed else 1


def print_load(when: str) -> None:
    """Print the load average (1, 5, 15 minutes) against the number of CPUs."""
    one, five, fifteen = os.getloadavg()
    print(
        f"load average ({when}): {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
