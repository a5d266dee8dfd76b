"""The store survives other processes, SIGKILL and bad input, and says what is wrong."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import make, replay, run_steps

import pk_attrib as pk

TESTS = Path(__file__).parent


def child(code: str) -> subprocess.Popen:
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def assert_matches_replay(path, expected):
    for s in range(len(path)):
        for name, value in expected[s].items():
            assert torch.equal(path.params(s)[name], value), (s, name)
    for name, value in expected[len(path)].items():
        assert torch.equal(path.final[name], value)


def record(store, steps=10, **kwargs):
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, **kwargs) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, steps)
    return model


def test_store_written_by_another_process_is_read_here(tmp_path):
    proc = child(
        f"""
        import pk_attrib as pk
        from _runs import make, run_steps
        model, optimizer, x, y = make()
        with pk.PathRecorder(model, optimizer, store={str(tmp_path / "s")!r}, dataset_size=40) as r:
            run_steps(model, optimizer, x, y, r, 0, 12)
        """
    )
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    path = pk.TrainingPath.load(tmp_path / "s")
    assert len(path) == 12 and path.complete
    path.verify()
    assert_matches_replay(path, replay(12))
    assert [int(path.step(s).indices[0]) for s in range(6)] == [0, 8, 16, 24, 32, 0]


def test_store_written_here_is_read_by_another_process(tmp_path):
    record(tmp_path / "s", steps=7)
    expected = float(
        sum(t.double().sum() for t in pk.TrainingPath.load(tmp_path / "s").params(3).values())
    )
    proc = child(
        f"""
        import pk_attrib as pk
        path = pk.TrainingPath.load({str(tmp_path / "s")!r})
        print(len(path), repr(float(sum(t.double().sum() for t in path.params(3).values()))))
        """
    )
    out, _ = proc.communicate(timeout=120)
    assert out.split() == ["7", repr(expected)]


def test_sigkill_leaves_a_loadable_prefix_and_the_run_resumes(tmp_path):
    store = tmp_path / "s"
    proc = child(
        f"""
        import pk_attrib as pk
        from _runs import make, run_steps
        model, optimizer, x, y = make()
        r = pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40,
                            flush_interval=0.02)
        run_steps(model, optimizer, x, y, r, 0, 100000, sleep=0.01)
        """
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads((store / "manifest.json").read_text())["steps"]) >= 25:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    path = pk.TrainingPath.load(store)
    assert not path.complete
    n = len(path)
    assert n >= 24
    path.verify()
    total = 80
    assert n < total
    assert_matches_replay(path, replay(n))

    # resume: restore the last recorded weights, then continue the same run to `total` steps
    model, optimizer, x, y = make()
    path.load_into(model)
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        assert recorder.steps_recorded == n
        run_steps(model, optimizer, x, y, recorder, n, total)
    resumed = pk.TrainingPath.load(store)
    assert len(resumed) == total and resumed.complete
    resumed.verify()
    assert_matches_replay(resumed, replay(total))
    assert sorted(p.name for p in store.iterdir() if p.suffix == ".tmp") == []


def test_closed_store_continues_when_the_model_is_at_its_final_weights(tmp_path):
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 6)
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 6, 15)
    path = pk.TrainingPath.load(tmp_path / "s")
    assert len(path) == 15
    assert_matches_replay(path, replay(15))


def test_a_crash_right_after_reopening_a_closed_store_loses_nothing(tmp_path):
    store = tmp_path / "s"
    record(store, steps=6)
    proc = child(
        f"""
        import os
        import pk_attrib as pk
        from _runs import make, replay
        model, optimizer, _, _ = make()
        model.load_state_dict(replay(6)[6])
        recorder = pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40)
        os._exit(0)  # killed before its first step
        """
    )
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    path = pk.TrainingPath.load(store)
    assert len(path) == 6 and not path.complete  # every step, and the final parameters
    path.verify()
    assert_matches_replay(path, replay(6))
    # continuing: the next shard takes over from the old final parameters
    model, optimizer, x, y = make()
    model.load_state_dict(replay(6)[6])
    recorder = pk.PathRecorder(model, optimizer, store=store, dataset_size=40, shard_bytes=1)
    run_steps(model, optimizer, x, y, recorder, 6, 8)
    recorder.flush()
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["final"] is None and len(manifest["steps"]) == 8
    run_steps(model, optimizer, x, y, recorder, 8, 9)
    recorder.close()
    assert_matches_replay(pk.TrainingPath.load(store), replay(9))


def on_disk(store):
    """What a process killed now would leave: the store as its manifest lists it."""
    return pk.TrainingPath.load(store)


def test_a_resume_that_records_nothing_loses_nothing(tmp_path):
    """Reopening an interrupted store once dropped the step its path ended at: each resume
    that died before its first shard lost one more step."""
    store = tmp_path / "s"
    proc = child(
        f"""
        import os
        import pk_attrib as pk
        from _runs import make, run_steps
        model, optimizer, x, y = make()
        recorder = pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40,
                                   shard_bytes=1)
        run_steps(model, optimizer, x, y, recorder, 0, 6)
        recorder.flush()
        os._exit(0)  # killed: 6 raw steps listed, the path ends at the 6th snapshot
        """
    )
    proc.communicate(timeout=120)
    assert len(on_disk(store)) == 5
    for _attempt in range(2):
        proc = child(
            f"""
            import os
            import pk_attrib as pk
            from _runs import make
            model, optimizer, _, _ = make()
            pk.TrainingPath.load({str(store)!r}).load_into(model)
            recorder = pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40)
            os._exit(0)  # killed before its first step
            """
        )
        proc.communicate(timeout=120)
        assert proc.returncode == 0
        path = on_disk(store)
        assert len(path) == 5 and not path.complete
        assert_matches_replay(path, replay(5))


def test_one_recorder_at_a_time_writes_a_store(tmp_path):
    """A second recorder (here an unclosed one from an earlier notebook cell) is refused,
    and the store stays whole; once the first is closed the store reopens."""
    store = tmp_path / "s"
    model, optimizer, x, y = make()
    first = pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    run_steps(model, optimizer, x, y, first, 0, 3)
    with pytest.raises(pk.StoreError, match="another PathRecorder"):
        pk.PathRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), store=store)
    run_steps(model, optimizer, x, y, first, 3, 5)
    first.close()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as again:
        run_steps(model, optimizer, x, y, again, 5, 7)
    path = on_disk(store)
    path.verify()
    assert_matches_replay(path, replay(7))


def test_closing_never_replaces_the_final_parameters_the_manifest_lists(tmp_path):
    """A resumed closed store lists its old final until a snapshot comes; close() writes the
    new final under the other name, so a kill between the write and the manifest leaves the
    listed file intact; the old one is removed once unlisted."""
    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, every=2) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 5)
    names = []
    for stop in (6, 7):  # resumed off the snapshot grid (5), then on it (6)
        listed = json.loads((store / "manifest.json").read_text())["final"]["file"]
        with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, every=2) as rec:
            run_steps(model, optimizer, x, y, rec, stop - 1, stop)
        names.append(json.loads((store / "manifest.json").read_text())["final"]["file"])
        assert names[-1] != listed and not (store / listed).exists()
        on_disk(store).verify()
    assert names == ["final-next.safetensors", "final.safetensors"]
    path = on_disk(store)
    assert torch.equal(path.final["0.weight"], replay(7)[7]["0.weight"])


def test_a_recorder_collected_without_close_writes_its_steps_then_lets_go(tmp_path):
    import gc

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, store=store, dataset_size=40, flush_interval=60.0)
    run_steps(model, optimizer, x, y, recorder, 0, 3)  # queued, not written yet
    del recorder, optimizer  # (the optimizer's hooks held the recorder)
    gc.collect()
    assert len(on_disk(store)) == 2  # its writer finished: 3 raw steps, path to the third
    on_disk(store).load_into(model)  # back to the path's end, the third snapshot
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as again:
        run_steps(model, optimizer, x, y, again, 2, 5)  # (a fresh optimizer: plain SGD)
    assert_matches_replay(on_disk(store), replay(5))


def test_a_forked_child_does_not_keep_the_store_locked(tmp_path):
    import multiprocessing

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    run_steps(model, optimizer, x, y, recorder, 0, 2)
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(5,))
    worker.start()  # like a DataLoader worker, forked while the store is locked
    try:
        recorder.close()
        with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as again:
            run_steps(model, optimizer, x, y, again, 2, 3)
    finally:
        worker.terminate()
        worker.join()
    assert len(on_disk(store)) == 3


def test_a_parameter_that_changes_dtype_mid_run_is_refused():
    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, dataset_size=40)
    run_steps(model, optimizer, x, y, recorder, 0, 2)
    model.double()
    with pytest.raises(pk.RecordingError, match="changed its dtype from torch.float32"):
        run_steps(model, optimizer, x.double(), y, recorder, 2, 3)
    assert recorder.steps_recorded == 2


def test_resuming_a_closed_every_k_store_off_its_grid_keeps_its_end_until_a_snapshot(tmp_path):
    """every=2, closed after 5 steps: the 6th step has no snapshot, so the old end (w_5)
    must stay listed until the shard with the 7th step's snapshot is on the disk."""
    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, every=2) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 5)
    expected = replay(8)
    assert torch.equal(on_disk(store).final["0.weight"], expected[5]["0.weight"])
    recorder = pk.PathRecorder(
        model, optimizer, store=store, dataset_size=40, every=2, shard_bytes=1
    )
    run_steps(model, optimizer, x, y, recorder, 5, 6)
    recorder.flush()  # a crash now must keep w_5
    path = on_disk(store)
    assert len(path) == 3 and torch.equal(path.final["0.weight"], expected[5]["0.weight"])
    run_steps(model, optimizer, x, y, recorder, 6, 7)
    recorder.flush()  # the snapshot of step 6 is on the disk: the path reaches it
    path = on_disk(store)
    assert len(path) == 3 and torch.equal(path.params(2)["0.weight"], expected[4]["0.weight"])
    run_steps(model, optimizer, x, y, recorder, 7, 8)
    recorder.close()
    path = on_disk(store)
    assert len(path) == 4 and path.complete
    for s, raw in enumerate((0, 2, 4, 6)):
        assert torch.equal(path.params(s)["0.weight"], expected[raw]["0.weight"])
    assert torch.equal(path.final["0.weight"], expected[8]["0.weight"])
    path.verify()


def test_a_store_path_hands_out_copies(tmp_path):
    store = tmp_path / "s"
    record(store, steps=3)
    path = pk.TrainingPath.load(store)
    kept = path.params(1)["0.weight"].clone()
    path.params(1)["0.weight"].zero_()
    path.final["0.weight"].zero_()
    assert torch.equal(path.params(1)["0.weight"], kept)
    assert path.final["0.weight"].abs().sum() > 0


def test_reopening_keeps_files_the_store_did_not_write(tmp_path):
    store = tmp_path / "s"
    model = record(store, steps=3)
    mine = ["notes.tmp", "shard-notes.txt", "shard-00000000.safetensors.backup"]
    for name in mine:
        (store / name).write_text("the user's")
    (store / "shard-00000099.safetensors.tmp").write_bytes(b"a crash's leftover")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pk.PathRecorder(model, optimizer, store=store, dataset_size=40).close()
    assert all((store / name).read_text() == "the user's" for name in mine)
    assert not (store / "shard-00000099.safetensors.tmp").exists()


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_a_run_whose_scheduler_cycles_momentum_resumes_and_a_changed_setting_is_named(
    tmp_path, adam
):
    """OneCycleLR moves momentum (or Adam's beta1) and adds its keys to the param groups:
    a resume with the restored optimizer was refused as 'other settings'."""
    store = tmp_path / "s"
    model, _, x, y = make()

    def optimizer_and_schedule():
        opt = (
            torch.optim.Adam(model.parameters(), lr=0.01)
            if adam
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        )
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)

    optimizer, schedule = optimizer_and_schedule()
    recorder = pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    for s in range(4):
        run_steps(model, optimizer, x, y, recorder, s, s + 1)
        schedule.step()
    recorder.close()
    saved = (optimizer.state_dict(), schedule.state_dict())
    optimizer, schedule = optimizer_and_schedule()
    optimizer.load_state_dict(saved[0])
    schedule.load_state_dict(saved[1])
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        for s in range(4, 6):
            run_steps(model, optimizer, x, y, recorder, s, s + 1)
            schedule.step()
    path = pk.TrainingPath.load(store)
    assert len(path) == 6
    key = "betas" if adam else "momentum"
    moved = [step.hyper[0][key] for step in path]
    assert len({str(m) for m in moved}) == 6  # each step's own value, across the resume
    other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    if not adam:
        with pytest.raises(pk.StoreMismatchError, match="weight_decay: 0 recorded, 0.1 now"):
            pk.PathRecorder(model, other, store=store, dataset_size=40)


def test_float16_storage_keeps_adams_second_moments_in_their_own_dtype():
    model, _, x, y = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pk.PathRecorder(model, optimizer, dtype=torch.float16, dataset_size=40) as recorder:
        run_steps(model, optimizer, x * 1e-4, y, recorder, 0, 3)  # tiny gradients
    state = recorder.path.step(2).optimizer_state["exp_avg_sq"]["0.weight"]
    assert state.dtype == torch.float32
    assert torch.equal(state, optimizer.state[model[0].weight]["exp_avg_sq"])
    assert recorder.path.params(2)["0.weight"].dtype == torch.float16


def test_a_dataset_without_len_is_watched_when_its_size_is_given():
    class NoLen(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return torch.full((5,), float(i)), torch.tensor(i % 3)

    model, optimizer, _, _ = make()
    loader = torch.utils.data.DataLoader(NoLen(), batch_size=4, sampler=range(8))
    with pytest.raises(TypeError, match="dataset_size="):
        next(iter(pk.PathRecorder(model, optimizer).watch(loader)))
    model, optimizer, _, _ = make()
    with pk.PathRecorder(model, optimizer, dataset_size=8) as recorder:
        for x, y in recorder.watch(loader):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert [step.indices.tolist() for step in recorder.path] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_resume_refuses_a_model_or_optimizer_that_does_not_match(tmp_path):
    store = tmp_path / "s"
    model = record(store)
    before = (store / "manifest.json").read_bytes()
    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with pytest.raises(pk.StoreMismatchError, match="other parameters"):
        pk.PathRecorder(other, torch.optim.SGD(other.parameters(), lr=0.1), store=store)
    with pytest.raises(pk.StoreMismatchError, match="optimizer"):
        pk.PathRecorder(model, torch.optim.Adam(model.parameters()), store=store)
    fresh, optimizer, _, _ = make()  # initial weights: the snapshot before step 0
    with pytest.raises(pk.StoreMismatchError, match="before step 0.*truncate=True"):
        pk.PathRecorder(fresh, optimizer, store=store)
    with torch.no_grad():
        fresh[0].bias.add_(1e-3)  # weights of no recorded step
    with pytest.raises(pk.StoreMismatchError, match="none of its recorded snapshots"):
        pk.PathRecorder(fresh, optimizer, store=store, truncate=True)
    assert (store / "manifest.json").read_bytes() == before
    assert len(pk.TrainingPath.load(store)) == 10


def test_resuming_from_an_older_checkpoint_truncates_the_store_when_asked(tmp_path):
    """A crash after step 9, a restart from the checkpoint taken before step 4 (model and
    optimizer): truncate=True drops steps 4.. and the path continues exactly."""
    store = tmp_path / "s"
    model, optimizer, x, y = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 4)
        checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        run_steps(model, optimizer, x, y, recorder, 4, 9)
    model.load_state_dict(checkpoint[0])
    optimizer.load_state_dict(checkpoint[1])
    with pk.PathRecorder(model, optimizer, store=store, truncate=True) as recorder:
        run_steps(model, optimizer, x, y, recorder, 4, 7)
    path = pk.TrainingPath.load(store)
    path.verify()
    assert len(path) == 7
    model2, _, _, _ = make()  # the same run without the detour, to compare with
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    for s in range(7):
        assert all(torch.equal(path.params(s)[n], p) for n, p in model2.named_parameters())
        run_steps(model2, optimizer2, x, y, None, s, s + 1)
    assert all(torch.equal(path.final[n], p) for n, p in model2.named_parameters())


def test_step_without_indices_is_refused_before_the_weights_change(tmp_path):
    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40)
    run_steps(model, optimizer, x, y, recorder, 0, 3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(pk.MissingBatchIndicesError, match="record_batch"):
        optimizer.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    optimizer.zero_grad()
    run_steps(model, optimizer, x, y, recorder, 3, 5)
    recorder.close()
    path = pk.TrainingPath.load(tmp_path / "s")
    assert len(path) == 5
    assert_matches_replay(path, replay(5))


def test_indices_outside_the_dataset_are_refused():
    model, optimizer, _, _ = make()
    recorder = pk.PathRecorder(model, optimizer, dataset_size=40)
    with pytest.raises(pk.IndexOutOfRangeError, match="40 examples"):
        recorder.record_batch([3, 40])
    with pytest.raises(IndexError):  # the built-in base class works too
        recorder.record_batch([-1])
    with pytest.raises(TypeError, match="integers"):
        recorder.record_batch(torch.tensor([0.5]))
    # lists, a batch sampler's form: ints pass as they are; bools and floats are refused
    from pk_attrib.record.guards import batch_indices

    assert list(batch_indices([5, 3, 39], 40)) == [5, 3, 39]
    assert list(batch_indices((7,), None)) == [7]
    assert batch_indices([np.int64(4), np.int64(2)], 40).tolist() == [4, 2]
    with pytest.raises(TypeError, match="integers"):
        recorder.record_batch([True, False])
    with pytest.raises(TypeError):
        recorder.record_batch([1, 2.5])
    with pytest.raises(pk.IndexOutOfRangeError, match=str(2**63)):
        recorder.record_batch([0, 2**63])  # (beyond int64)
    with pytest.raises(pk.IndexOutOfRangeError, match=str(-(2**63) - 1)):
        recorder.record_batch([-(2**63) - 1, 3])
    with pytest.raises(TypeError, match="record_batch"):
        next(recorder.watch([(torch.zeros(1), torch.zeros(1))]))


def test_a_folder_that_holds_something_else_is_left_alone(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"not a store")
    model, optimizer, _, _ = make()
    with pytest.raises(pk.NotAStoreError, match="not empty"):
        pk.PathRecorder(model, optimizer, store=folder)
    with pytest.raises(pk.NotAStoreError, match="no manifest.json"):
        pk.TrainingPath.load(folder)
    assert [p.name for p in folder.iterdir()] == ["cat.jpg"]
    (folder / "manifest.json").write_text('{"some": "other tool"}')
    with pytest.raises(pk.NotAStoreError, match="something else"):
        pk.TrainingPath.load(folder)
    with pytest.raises(pk.NotAStoreError, match="does not exist"):
        pk.TrainingPath.load(tmp_path / "nowhere")


def test_unknown_format_version_is_refused(tmp_path):
    record(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pk.FormatVersionError, match="version 99"):
        pk.TrainingPath.load(tmp_path / "s")
    model, optimizer, _, _ = make()
    with pytest.raises(pk.FormatVersionError):
        pk.PathRecorder(model, optimizer, store=tmp_path / "s")


def test_a_damaged_or_missing_tensor_file_is_reported(tmp_path):
    record(tmp_path / "s", steps=6)
    shard = next((tmp_path / "s").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    path = pk.TrainingPath.load(tmp_path / "s")
    with pytest.raises(pk.CorruptStoreError, match="does not match its recorded xxh3_128"):
        path.params(2)
    with pytest.raises(pk.CorruptStoreError, match="xxh3_128"):
        path.verify()
    shard.unlink()
    with pytest.raises(pk.CorruptStoreError, match="missing"):
        pk.TrainingPath.load(tmp_path / "s").params(1)
    with pytest.raises(OSError):  # the built-in base class works too
        pk.TrainingPath.load(tmp_path / "s").verify()


def as_version_1(store):
    """Rewrite a store's manifest as pk_attrib 0.1 wrote it: format version 1, sha256 hashes."""
    import hashlib

    manifest = json.loads((store / "manifest.json").read_text())
    for entry in manifest["shards"] + [manifest["final"]] * bool(manifest["final"]):
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((store / entry["file"]).read_bytes()).hexdigest()
    manifest["format_version"] = 1
    manifest["library_version"] = "0.0.9"  # (a version that wrote sha256)
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_a_version_1_store_with_sha256_hashes_loads_checks_and_resumes(tmp_path):
    from pk_attrib.record.store import library_version

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, shard_bytes=1) as rec:
        run_steps(model, optimizer, x, y, rec, 0, 6)  # one shard per step
    as_version_1(store)
    path = pk.TrainingPath.load(store)
    path.verify()
    assert_matches_replay(path, replay(6))
    # saving it elsewhere writes this version's store
    copy = path.save(tmp_path / "copy")
    assert copy.manifest["format_version"] == 2 and "xxh3_128" in copy.manifest["shards"][0]
    copy.verify()
    assert_matches_replay(copy, replay(6))
    # resuming continues it: old shards keep their sha256, new ones get xxh3_128, version 2
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, shard_bytes=1) as rec:
        run_steps(model, optimizer, x, y, rec, 6, 9)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["library_version"] == library_version()
    assert sorted({"sha256" in e for e in manifest["shards"]}) == [False, True]
    path = pk.TrainingPath.load(store)
    path.verify()
    assert_matches_replay(path, replay(9))
    # a damaged old shard is still caught, by its sha256
    first = store / manifest["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x01
    first.write_bytes(bytes(data))
    with pytest.raises(pk.CorruptStoreError, match="recorded sha256 hash"):
        pk.TrainingPath.load(store).verify()


def test_an_entry_without_a_hash_is_reported(tmp_path):
    record(tmp_path / "s", steps=3)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["shards"][0]["xxh3_128"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pk.CorruptStoreError, match="records no content hash"):
        pk.TrainingPath.load(tmp_path / "s").verify()


def test_many_steps_make_few_files(tmp_path):
    record(tmp_path / "s", steps=400, shard_bytes=20_000)
    files = list((tmp_path / "s").iterdir())
    path = pk.TrainingPath.load(tmp_path / "s")
    assert len(path) == 400
    assert len(files) < 60  # ~1.5 KB per step, 20 KB shards
    assert_matches_replay(path, replay(400))


def test_each_shard_is_on_the_disk_before_the_manifest_lists_it(tmp_path, monkeypatch):
    """Shards are fsynced (then dropped from the page cache) before the manifest names them,
    so a power cut cannot leave a manifest pointing at a shard the disk never got."""
    import pk_attrib.record.writer as writer

    events = []
    real_fsync, real_manifest = os.fsync, writer.write_manifest

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def manifest(root, data, *args, **kwargs):
        final = [data["final"]["file"]] if data.get("final") else []
        events.append(("manifest", [shard["file"] for shard in data["shards"]] + final))
        return real_manifest(root, data, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(writer, "write_manifest", manifest)
    record(tmp_path / "s", steps=40, shard_bytes=20_000)
    synced, listed = set(), 0
    for kind, what in events:
        if kind == "fsync":
            synced.add(what.removesuffix(".tmp"))
        else:
            assert set(what) <= synced, (what, synced)
            listed = max(listed, len(what))
    assert listed >= 3  # several shards and the final parameters, each synced before listed
    # the manifest itself is flushed each time, and so is the folder (the renames)
    writes = sum(kind == "manifest" for kind, _ in events)
    assert sum(event == ("fsync", "manifest.json.tmp") for event in events) >= writes
    assert sum(event == ("fsync", "s") for event in events) >= 2 * writes
    assert_matches_replay(pk.TrainingPath.load(tmp_path / "s"), replay(40))


def test_streamed_tensor_files_read_back_with_safetensors(tmp_path):
    import safetensors.torch
    import xxhash

    from pk_attrib.record.store import write_tensor_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "idx": torch.arange(7),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "transposed": torch.randn(2, 3, generator=g).t(),
        "empty": torch.empty(0, 4),
    }
    entry = write_tensor_file(tmp_path / "t.safetensors", tensors, {"format": "test"})
    assert (
        entry["xxh3_128"] == xxhash.xxh3_128((tmp_path / "t.safetensors").read_bytes()).hexdigest()
    )
    assert entry["bytes"] == (tmp_path / "t.safetensors").stat().st_size
    loaded = safetensors.torch.load_file(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert not list(tmp_path.glob("*.tmp"))


def test_recycled_snapshot_buffers_keep_every_step_exact(tmp_path):
    """Disk mode copies w_s and Adam's state into recycled buffers: none may be overwritten
    before its shard is on disk, so the disk path equals the memory path bit for bit."""
    paths = []
    for store in (None, tmp_path / "s"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
        recorder = pk.PathRecorder(
            model, optimizer, store=store, dataset_size=40, shard_bytes=3_000, flush_interval=0.01
        )
        run_steps(model, optimizer, x, y, recorder, 0, 60)
        recorder.close()
        if store is not None:
            assert recorder._pool._idle_bytes > 0  # buffers came back to the pool for reuse
        paths.append(recorder.path)
    memory, disk = paths
    assert len(disk.manifest["shards"]) > 10  # many shards: buffers were recycled many times
    reader = disk._backend.reader
    for s in range(60):
        a, b = memory.step(s), disk.step(s)
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), (s, name)
            assert torch.equal(
                a.optimizer_state["exp_avg_sq"][name], b.optimizer_state["exp_avg_sq"][name]
            ), (s, name)
    assert len(reader._open) <= reader.max_open  # a long path keeps few shards open


def test_slab_snapshots_are_aligned_disjoint_and_survive_their_allocator():
    from pk_attrib.record.buffers import SlabAllocator

    slab = SlabAllocator(slab_bytes=1000)
    shapes = [(3, 5), (7,), (), (0, 4), (300,), (2, 2), (40, 10)]  # (40, 10) > one slab
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float64,
        torch.float32,
        torch.float32,
        torch.bfloat16,
        torch.float32,
    ]
    taken = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
        t = slab.take(torch.Size(shape), dtype)
        assert t.shape == torch.Size(shape) and t.dtype == dtype and t.is_contiguous()
        if t.numel():
            assert t.data_ptr() % 64 == 0
        t.fill_(i + 1)
        taken.append(t)
    del slab  # the tensors keep their slabs mapped
    for i, t in enumerate(taken):  # no write reached another tensor's memory
        assert torch.equal(t, torch.full_like(t, i + 1)), i


def test_a_path_recorded_in_memory_saves_and_loads_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    recorder = pk.PathRecorder(model, optimizer, dataset_size=40)
    run_steps(model, optimizer, x, y, recorder, 0, 30)
    recorder.close()
    recorder.path.save(tmp_path / "saved")
    loaded = pk.TrainingPath.load(tmp_path / "saved")
    for s in range(30):
        a, b = recorder.path.step(s), loaded.step(s)
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), (s, name)
            assert torch.equal(
                a.optimizer_state["exp_avg_sq"][name], b.optimizer_state["exp_avg_sq"][name]
            ), (s, name)


def test_views_of_one_storage_in_a_dtype_we_do_not_stream_are_written_whole(tmp_path):
    """Rare dtypes go through safetensors' own serializer: slab snapshots (views of one
    storage) come back byte for byte."""
    import safetensors.torch

    from pk_attrib.record.buffers import SlabAllocator
    from pk_attrib.record.store import write_tensor_file

    slab = SlabAllocator(slab_bytes=4096)
    a, b = slab.take(torch.Size([3, 4]), torch.float8_e4m3fn), slab.take((5,), torch.float8_e4m3fn)
    a.copy_(torch.linspace(-2, 2, 12).reshape(3, 4))
    b.copy_(torch.linspace(0, 1, 5))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one storage
    write_tensor_file(tmp_path / "f8.safetensors", {"a": a, "b": b}, {"format": "test"})
    loaded = safetensors.torch.load_file(tmp_path / "f8.safetensors")
    for key, value in {"a": a, "b": b}.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key].view(torch.uint8), value.view(torch.uint8)), key


def _direct_io_works(folder) -> bool:
    """Whether this file system takes O_DIRECT writes (ext4 and xfs do; tmpfs may not)."""
    import errno

    from pk_attrib.record.diskio import PAGE, _anonymous_map

    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(folder) / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as err:
        assert err.errno == errno.EINVAL
        return False
    try:
        os.write(fd, _anonymous_map(PAGE).numpy())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_durable_tensor_files_start_large_tensors_on_pages_and_read_back(tmp_path, monkeypatch):
    """A shard is laid out for O_DIRECT: data from a page of the file, large tensors each on
    a page (after zero fillers), and page-aligned buffers go to the disk without a copy."""
    import json

    import safetensors
    import xxhash

    from pk_attrib.record.diskio import PAGE, SequentialWriter, page_aligned_empty
    from pk_attrib.record.store import write_tensor_file

    direct = []
    real = SequentialWriter._write_direct
    monkeypatch.setattr(
        SequentialWriter, "_write_direct", lambda self, v: (direct.append(v.size), real(self, v))
    )
    g = torch.Generator().manual_seed(0)
    aligned = page_aligned_empty(torch.Size([300, 257]), torch.float32)  # 308,400 bytes
    aligned.copy_(torch.randn(300, 257, generator=g))
    assert aligned.data_ptr() % PAGE == 0
    tensors = {
        "0/idx": torch.arange(37),
        "0/w/bias": torch.randn(513, generator=g),  # leaves the next one off a page
        "0/w/aligned": aligned,
        "0/w/heap": torch.randn(70_001, generator=g),  # large, wherever the heap put it
        "0/w/transposed": torch.randn(400, 200, generator=g).t(),  # written as a copy
        "0/step": torch.tensor(3.0, dtype=torch.float64),
    }
    file = tmp_path / "shard.safetensors"
    entry = write_tensor_file(file, tensors, {"format": "test"}, durable=True)
    data = file.read_bytes()
    assert entry["bytes"] == len(data) and entry["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    start = 8 + int.from_bytes(data[:8], "little")
    assert start % PAGE == 0
    header = json.loads(data[8:start])
    for key in ("0/w/aligned", "0/w/heap", "0/w/transposed"):  # each >= 256 KiB
        assert (start + header[key]["data_offsets"][0]) % PAGE == 0, key
    fillers = [k for k in header if k.startswith("pad/")]
    assert 1 <= len(fillers) <= 3
    with safetensors.safe_open(str(file), framework="pt") as f:
        assert set(f.keys()) == set(tensors) | set(fillers)
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value), key
        for key in fillers:
            assert not f.get_tensor(key).any()
    if _direct_io_works(tmp_path):  # the page-aligned tensor went straight to the disk
        assert sum(direct) >= aligned.numel() * 4 - PAGE
    assert not list(tmp_path.glob("*.tmp"))


def test_direct_writes_fall_back_to_the_page_cache_when_refused(tmp_path, monkeypatch):
    """tmpfs refuses O_DIRECT at open, some file systems refuse an alignment at write:
    either way the file gets the same bytes."""
    import errno

    import numpy as np

    from pk_attrib.record import diskio
    from pk_attrib.record.diskio import PAGE, SequentialWriter, page_aligned_empty

    rng = np.random.default_rng(0)
    big = page_aligned_empty(torch.Size([3 * PAGE + 100]), torch.uint8)
    big.copy_(torch.from_numpy(rng.integers(0, 256, big.numel(), dtype=np.uint8)))
    chunks = [b"head", big.numpy(), rng.integers(0, 256, 5000, dtype=np.uint8)]
    chunks += [rng.integers(0, 256, 300_000, dtype=np.uint8) for _ in range(5)]  # > staging
    expected = b"".join(bytes(c) for c in chunks)

    def write_all(name, **kwargs):
        writer = SequentialWriter(tmp_path / name, **kwargs)
        for c in chunks:
            writer.write(c)
        writer.close(sync=True)
        assert (tmp_path / name).read_bytes() == expected
        assert writer.position == len(expected)
        return writer

    write_all("plain")
    write_all("through", direct=False)
    real_open, real_write = os.open, os.write
    refused = []

    def open_refusing_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(diskio.os, "open", open_refusing_direct)
    assert not write_all("no_direct_open").direct
    monkeypatch.setattr(diskio.os, "open", real_open)

    def write_refusing_once(fd, data):
        if not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(diskio.os, "write", write_refusing_once)
    if write_all("refused_write").direct is not False or not refused:
        pytest.fail("a refused write must leave the writer writing through the page cache")


def test_a_model_with_large_parameters_records_to_disk_bit_for_bit(tmp_path):
    """Parameters of 256 KiB and more are snapshot into page-aligned buffers and written
    without the page cache; the store holds exactly the weights of each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 260), torch.nn.Tanh(), torch.nn.Linear(260, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 300, generator=g), torch.randint(0, 3, (40,), generator=g)
    expected = []
    recorder = pk.PathRecorder(model, optimizer, store=tmp_path / "s", dataset_size=40)
    for s in range(12):
        expected.append({n: p.detach().clone() for n, p in model.named_parameters()})
        run_steps(model, optimizer, x, y, recorder, s, s + 1)
    recorder.close()
    path = pk.TrainingPath.load(tmp_path / "s")
    assert len(path) == 12
    for s in range(12):
        for name, value in expected[s].items():
            assert torch.equal(path.params(s)[name], value), (s, name)
    for name, p in model.named_parameters():
        assert torch.equal(path.final[name], p.detach())


def test_a_failed_shard_write_leaves_no_file_and_files_follow_the_umask(tmp_path, monkeypatch):
    """A full disk raises, leaving neither the shard nor its temporary file; shards get the
    permissions any file gets (0o666 less the umask), as the manifest next to them does."""
    import errno

    from pk_attrib.record import diskio
    from pk_attrib.record.store import write_tensor_file

    tensors = {"0/w/a": torch.randn(100_000), "0/idx": torch.arange(8)}
    old = os.umask(0o002)
    try:
        write_tensor_file(tmp_path / "ok.safetensors", tensors, {}, durable=True)
        write_tensor_file(tmp_path / "plain.safetensors", tensors, {})
    finally:
        os.umask(old)
    assert (tmp_path / "ok.safetensors").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "plain.safetensors").stat().st_mode & 0o777 == 0o664

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskio.os, "write", full)
    for durable in (True, False):
        with pytest.raises(OSError, match="No space"):
            write_tensor_file(tmp_path / "full.safetensors", tensors, {}, durable=durable)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors", "plain.safetensors"]


def test_a_store_whose_first_steps_never_reached_the_disk_refuses_a_later_checkpoint(tmp_path):
    """Killed before its first shard: the store lists no step but its initial weights, so a
    resume from a later checkpoint is refused (it would lose those steps without a word),
    and a resume from the initial weights records the whole run."""
    store = tmp_path / "s"
    proc = child(
        f"""
        import torch, pk_attrib as pk
        from _runs import make, run_steps
        model, optimizer, x, y = make()
        r = pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40,
                            flush_interval=3600)
        run_steps(model, optimizer, x, y, r, 0, 10)
        torch.save(model.state_dict(), {str(tmp_path / "ckpt.pt")!r})
        print("saved", flush=True)
        run_steps(model, optimizer, x, y, r, 10, 100000, sleep=0.01)
        """
    )
    assert proc.stdout.readline().strip() == "saved"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    path = pk.TrainingPath.load(store)
    assert len(path) == 0
    initial = replay(0)[0]
    for name, value in initial.items():
        assert torch.equal(path.final[name], value)

    model, optimizer, x, y = make()
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    with pytest.raises(pk.StoreMismatchError, match="lost before they reached the disk"):
        pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 12)
    assert_matches_replay(pk.TrainingPath.load(store), replay(12))


@pytest.mark.parametrize("store", [None, "disk"])
def test_closing_after_a_refused_dtype_change_never_stores_rounded_weights(tmp_path, store):
    """model.half() after step 4: the next step is refused, and close() must not list the
    rounded weights as the final ones (the path ends at its last snapshot); model.double()
    loses nothing, and the final parameters keep the recorded dtype."""
    for convert, steps in ((torch.nn.Module.half, 3), (torch.nn.Module.double, 4)):
        folder = None if store is None else tmp_path / convert.__name__
        model, optimizer, x, y = make()
        recorder = pk.PathRecorder(model, optimizer, store=folder, dataset_size=40)
        run_steps(model, optimizer, x, y, recorder, 0, 4)
        convert(model)
        with pytest.raises(pk.RecordingError, match="changed its dtype"):
            run_steps(model, optimizer, x.to(model[0].weight.dtype), y, recorder, 4, 5)
        recorder.discard_batches()  # the refused step's batch
        if convert is torch.nn.Module.half:
            with pytest.warns(pk.PkAttribWarning, match="rounded the weights"):
                recorder.close()
        else:
            recorder.close()
        path = recorder.path if folder is None else pk.TrainingPath.load(folder)
        assert len(path) == steps
        assert_matches_replay(path, replay(4)[: steps + 1])
        assert all(t.dtype == torch.float32 for t in path.final.values())


def test_indices_beyond_the_training_set_are_named_when_explaining(tmp_path):
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer) as recorder:  # no dataset_size: no bound
        for _ in range(3):
            recorder.record_batch(torch.tensor([0, 1, 45]))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:3]), y[:3]).backward()
            optimizer.step()
    data = torch.utils.data.TensorDataset(x, y)  # 40 examples
    with pytest.raises(pk.IndexOutOfRangeError, match="reach 45, but train_dataset has 40"):
        explainer = pk.PathKernelInfluence(model, data, recorder.path, torch.nn.CrossEntropyLoss())
        explainer.attribute(x[:2], target=y[:2])


def test_an_empty_list_of_indices_is_an_empty_batch():
    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, dataset_size=40)
    recorder.record_batch([])
    recorder.record_batch([3, 4])
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x[3:5]), y[3:5]).backward()
    optimizer.step()
    recorder.close()
    assert recorder.path.step(0).indices.tolist() == [3, 4]
