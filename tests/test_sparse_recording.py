"""Recording every k steps (issue 18): the steps between snapshots are handed to the store's
writer without waking it one by one, and still reach the disk in order, within the flush
interval, and through a Ctrl-C."""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from _runs import batch, child, make, replay, run_steps

import pk_attrib as pk
import pk_attrib.record.writer as writer


def _assert_is_the_run(path, n_raw):
    """Every raw step's batch, every snapshot and the final weights are the run's own."""
    backend = path._backend
    assert backend.n_raw() == n_raw
    expected = replay(n_raw)
    for r in range(n_raw):
        idx, sizes = path._batch(r)
        assert torch.equal(idx, batch(r)) and sizes.tolist() == [8], r
        if r % path.every == 0:
            for name, value in path._raw_params(r).items():
                assert torch.equal(value, expected[r][name]), (r, name)
    if path.complete:
        for name, value in path.final.items():
            assert torch.equal(value, expected[n_raw][name]), name


def _listed_steps(store: Path) -> int:
    """Steps the manifest lists (none before the writer thread wrote the store's first)."""
    manifest = store / "manifest.json"
    return len(json.loads(manifest.read_text())["steps"]) if manifest.exists() else 0


def _queued(monkeypatch) -> list:
    """What the recorder puts in its writer's queue from now on (a list that grows)."""
    items, put_nowait = [], writer.queue.Queue.put_nowait

    def counted(self, item):
        items.append(item)
        put_nowait(self, item)

    monkeypatch.setattr(writer.queue.Queue, "put_nowait", counted)
    return items


def test_steps_between_snapshots_wake_the_writer_once_per_shard(tmp_path, monkeypatch):
    """200 steps with a snapshot every 50 and one shard's clock (60 s): the writer's queue
    carries the 4 snapshots (each with the steps held before it), one wake-up for the first
    step held, and the stop; the store holds every step, in order."""
    items = _queued(monkeypatch)
    model, optimizer, x, y = make()
    store = tmp_path / "s"
    with pk.PathRecorder(
        model, optimizer, store=store, every=50, dataset_size=40, flush_interval=60.0
    ) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 200)
    snapshots = [item for item in items if isinstance(item, tuple)]
    assert [record["step"] for _, record in snapshots] == [0, 50, 100, 150]
    assert all(len(held) <= 49 for held, _ in snapshots)  # (the wake-up took the first)
    assert sum(item is writer._WAKE for item in items) == 1
    assert len(items) == len(snapshots) + 1  # (the stop goes through put())
    path = pk.TrainingPath.load(store)
    assert path.complete and path.manifest["replayable"]
    _assert_is_the_run(path, 200)


def test_every_step_does_wake_the_writer_with_its_snapshot(tmp_path, monkeypatch):
    """every=1: each record holds a snapshot, and goes to the queue as before."""
    items = _queued(monkeypatch)
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 12)
    assert [record["step"] for _, record in items] == list(range(12))
    assert all(held == [] for held, _ in items)
    _assert_is_the_run(pk.TrainingPath.load(tmp_path / "s"), 12)


def test_held_steps_reach_the_disk_within_the_flush_interval_while_training_pauses(tmp_path):
    """No later step comes to hand them over: the writer takes the held steps at its own
    deadline (0.2 s here), for the first pause and again after it wrote them."""
    model, optimizer, x, y = make()
    store = tmp_path / "s"

    def listed_within(n, seconds=30.0):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if _listed_steps(store) == n:
                return True
            time.sleep(0.02)
        return False

    with pk.PathRecorder(
        model, optimizer, store=store, every=10, dataset_size=40, flush_interval=0.2
    ) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 3)  # a snapshot, then two held
        assert listed_within(3)
        run_steps(model, optimizer, x, y, recorder, 3, 5)  # held only
        assert listed_within(5)
    _assert_is_the_run(pk.TrainingPath.load(store), 5)


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.1])
def test_ctrl_c_with_held_steps_and_a_slow_disk_keeps_the_store_the_runs(tmp_path, delay):
    """A real SIGINT while steps between snapshots are held and the snapshots wait for a
    slow disk: every step handed over before the interrupt is in the store, in order, and
    the final weights are the run's, or the store ends at its last snapshot."""
    store = tmp_path / "s"
    proc = child(
        f"""
        import pk_attrib as pk
        from _runs import make, run_steps, slow_disk

        slow_disk(0.03)
        model, optimizer, x, y = make()
        try:
            with pk.PathRecorder(model, optimizer, store={str(store)!r}, every=3,
                                 dataset_size=40, shard_bytes=1, max_queue_bytes=1) as recorder:
                print("recording", flush=True)
                run_steps(model, optimizer, x, y, recorder, 0, 100000)
        except KeyboardInterrupt:
            print("interrupted", recorder.steps_recorded, flush=True)
        """
    )
    assert proc.stdout.readline().strip() == "recording"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out.startswith("interrupted"), (out, err)
    recorded = int(out.split()[1])
    path = pk.TrainingPath.load(store)
    path.verify()
    _assert_is_the_run(path, recorded)
    assert len(path) >= 1


def test_the_pool_reserves_the_next_snapshots_buffers_within_its_budget():
    """The writer reserves, as it takes a snapshot, one idle buffer per tensor of it (two
    of one shape: two buffers); the next takes get exactly those; nothing is reserved where
    idle buffers wait already, or beyond the pool's budget of idle bytes."""
    from pk_attrib.record.buffers import BufferPool

    weight, momentum, bias = torch.ones(512, 256), torch.ones(512, 256), torch.ones(256)
    pool = BufferPool(max_bytes=2 * weight.numel() * 4 + bias.numel() * 4)
    pool.reserve([weight, momentum, bias])
    ready = {t.data_ptr() for deque in pool._free.values() for t in deque}
    assert len(ready) == 3 and pool._idle_bytes == pool.max_bytes
    pool.reserve([weight, momentum, bias])  # (ready already)
    assert pool._idle_bytes == pool.max_bytes
    taken = [pool.take(t.shape, t.dtype) for t in (weight, momentum, bias)]
    assert {t.data_ptr() for t in taken} == ready and pool._idle_bytes == 0
    assert all(bool((t == 0).all()) for t in taken)  # (touched: zeroed by the writer)
    small = BufferPool(max_bytes=weight.numel() * 4)
    small.reserve([weight, momentum])  # room for one
    assert (
        small._idle_bytes == weight.numel() * 4
        and len(small._free[((512, 256), torch.float32)]) == 1
    )


def test_the_writer_readies_the_first_snapshots_buffers_and_the_first_step_takes_them(
    tmp_path, monkeypatch
):
    """A new disk recorder's writer readies one idle buffer per parameter, in the recorded
    dtype, before any step (the first step then faults no fresh pages in); step 0's
    snapshot is copied into exactly those buffers, and the store holds its weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    recorder = pk.PathRecorder(
        model, optimizer, store=tmp_path / "s", dataset_size=40, every=2, dtype=torch.float64
    )
    recorder.flush()  # (the writer's first work is done before the flush marker)
    pool = recorder._pool
    ready = {
        key: [t.data_ptr() for t in deque] for key, deque in pool._free.items() if deque
    }
    assert sorted(ready) == sorted((tuple(p.shape), torch.float64) for p in model.parameters())
    assert all(len(ptrs) == 1 for ptrs in ready.values())
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    queued = _queued(monkeypatch)
    recorder.record_batch(batch(0))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x[batch(0)]), y[batch(0)]).backward()
    optimizer.step()
    (_, record), *_ = queued  # (step 0 holds a snapshot: it is queued)
    taken = {(tuple(t.shape), t.dtype): t.data_ptr() for t in record["pooled"]}
    recorder.close()
    assert taken == {key: ptrs[0] for key, ptrs in ready.items()}
    weights = recorder.path.params(0)
    assert weights.keys() == initial.keys()
    assert all(torch.equal(weights[n], initial[n]) for n in initial)


def test_steps_sharing_their_sizes_tensor_store_a_buffer_safetensors_serializes(tmp_path):
    """Steps of the same batch sizes share one sizes tensor; a shard holding a dtype the
    store does not stream itself (a complex buffer the model updates) goes through
    safetensors, which refuses tensors sharing memory unless they are copied."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 3)
            self.register_buffer("phase", torch.ones(2, dtype=torch.complex64))

        def forward(self, x):
            self.phase.mul_(1j)
            return self.lin(x)

    torch.manual_seed(0)
    model = Counting()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40) as recorder:
        for s in range(4):
            recorder.record_batch(batch(s))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch(s)]), y[batch(s)]).backward()
            optimizer.step()
    path = pk.TrainingPath.load(tmp_path / "s")
    assert [path._batch(r)[1].tolist() for r in range(4)] == [[8]] * 4
    assert torch.equal(path.buffers(4)["phase"], model.phase)


def test_a_final_write_that_fails_in_close_still_lists_every_written_step(tmp_path, monkeypatch):
    """close() writes the final weights while the writer finishes, and lists both in one
    manifest write; when the final's write fails (a full disk), the steps are listed all
    the same: the store ends at its last snapshot, marked incomplete, none lost."""
    import errno

    model, optimizer, x, y = make()
    store = tmp_path / "s"
    recorder = pk.PathRecorder(
        model, optimizer, store=store, every=5, dataset_size=40, flush_interval=60.0
    )
    run_steps(model, optimizer, x, y, recorder, 0, 12)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_final", disk_full)
    with pytest.raises(OSError, match="No space left"):
        recorder.close()
    path = pk.TrainingPath.load(store)
    assert not path.complete
    _assert_is_the_run(path, 12)
