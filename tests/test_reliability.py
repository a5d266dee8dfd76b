"""What interruptions, damaged or crafted files, full disks and concurrent access do to a store,
and that the Captum-style methods check what `attribute` checks (issue 24)."""

import signal
import time

import pytest
import torch
from _runs import child, replay

import pk_attrib as pk


class WhereReLU(torch.nn.Module):
    """max(x, 0) written with torch.where: a kink the adaptive quadrature does not split at."""

    def forward(self, x):
        return torch.where(x > 0, x, torch.zeros_like(x))


def assert_is_the_run(path):
    """Every snapshot of the path, the final one included, is the run's own at that step."""
    expected = replay(len(path))
    for s in range(len(path) + 1):
        for name, value in expected[s].items():
            assert torch.equal(path.params(s)[name], value), (s, name)


# -- 1. Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, 0.45, 0.6, 0.8, 1.1])
def test_ctrl_c_while_a_step_waits_for_a_slow_disk_never_stores_wrong_final_weights(
    tmp_path, delay
):
    """A real SIGINT to a process whose writer is slow: the interrupt lands while the step
    hook waits for room in the writer's queue, and the step's record is dropped. The store
    must then end at its last recorded step (it once stored the weights after the dropped
    step as final, and said it was complete)."""
    store = tmp_path / "s"
    proc = child(
        f"""
        import pk_attrib as pk
        from _runs import make, run_steps, slow_disk

        slow_disk(0.03)
        model, optimizer, x, y = make()
        try:
            with pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40,
                                 shard_bytes=1, max_queue_bytes=1) as recorder:
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
    path = pk.TrainingPath.load(store)
    path.verify()
    assert len(path) >= 1
    assert_is_the_run(path)  # the final weights included
    if path.complete:  # closed between steps: the weights then were the last step's end
        assert len(path) == int(out.split()[1])


# -- 2. the Captum-style methods run the step check -------------------------------------------


@pytest.fixture(scope="module")
def digits_run():
    from test_engine import digits, digits_mlp, record, train_set

    torch.manual_seed(3)
    model = digits_mlp(hidden=6)
    data = train_set(n=40)
    path = record(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), data)
    x, y = digits()
    return model, data, path, (x[1500:1503], y[1500:1503])


def _explainer(model, data, path, **kwargs):
    kwargs.setdefault("loss_fn", torch.nn.CrossEntropyLoss())
    kwargs.setdefault("quadrature", 3)
    return pk.PathKernelInfluence(model, data, path, show_progress=False, **kwargs)


def test_the_step_check_of_the_captum_methods_is_the_one_attribute_runs(digits_run):
    model, data, path, (x, y) = digits_run
    explainer = _explainer(model, data, path)
    dec = explainer.attribute(x, target=y)
    errors = explainer._engine.check_steps()
    torch.testing.assert_close(errors, dec.diagnostics.reconstruction_error, rtol=0, atol=1e-12)
    assert float(errors.max()) < 1e-10


@pytest.mark.parametrize(
    "mistake", ["another order", "changed labels", "sum for a mean loss"], ids=str
)
@pytest.mark.parametrize("method", ["influence", "influence_k", "self_influence"])
def test_the_captum_methods_warn_when_the_training_set_does_not_rebuild_the_steps(
    digits_run, mistake, method
):
    """They once returned scores wrong by up to 15.6 in silence (attribute() warned)."""
    model, data, path, (x, y) = digits_run
    xs, ys = data.tensors
    kwargs = {}
    if mistake == "another order":
        data = torch.utils.data.TensorDataset(xs.flip(0), ys.flip(0))
    elif mistake == "changed labels":
        data = torch.utils.data.TensorDataset(xs, (ys + 1) % 10)
    else:
        kwargs["loss_fn"] = torch.nn.CrossEntropyLoss(reduction="sum")
    explainer = _explainer(model, data, path, **kwargs)
    call = {
        "influence": lambda: explainer.influence((x, y)),
        "influence_k": lambda: explainer.influence((x, y), k=3),
        "self_influence": lambda: explainer.self_influence(),
    }[method]
    with pytest.warns(pk.ReconstructionWarning, match="not rebuilt by the example gradients"):
        call()
    call()  # (checked once per explainer: no second warning, which would fail here)


def test_the_captum_methods_warn_once_where_the_quadrature_ran_out_of_nodes():
    """A model kinked where the quadrature does not split (a ReLU written with torch.where):
    attribute() warned, influence() said nothing."""
    from test_engine import digits, record, train_set

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), WhereReLU(), torch.nn.Linear(8, 10)).to(
        torch.float64
    )
    data = train_set(n=20)
    path = record(model, torch.optim.SGD(model.parameters(), lr=0.5), data, epochs=1, batch_size=10)
    x, y = digits()
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    with pytest.warns(pk.QuadratureWarning, match="largest rule") as caught:
        explainer.influence((x[1500:1502], y[1500:1502]), k=2)
    assert len([w for w in caught if w.category is pk.QuadratureWarning]) == 1


# -- 3. loading never executes code -----------------------------------------------------------


class _Planted:
    """Unpickled, it creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _recorded_store(root, steps=4):
    from _runs import make, run_steps

    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=root, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, steps)
    return model, torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("forced", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY"])
def test_a_store_without_its_manifest_is_refused_not_unpickled_as_checkpoints(
    tmp_path, monkeypatch, forced
):
    if forced:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    store = tmp_path / "s"
    model, data = _recorded_store(store)
    (store / "manifest.json").unlink()
    marker = tmp_path / "ran"
    torch.save({"w": _Planted(marker)}, store / "planted.pt")
    loss = torch.nn.CrossEntropyLoss()
    for given in ({"path": store}, {"checkpoints": store}, {"checkpoints": [store / "planted.pt"]}):
        refused = (pk.CorruptStoreError, pk.StoreMismatchError)
        with pytest.raises(refused, match="manifest|unpickle"):
            pk.PathKernelInfluence(model, data, loss_fn=loss, show_progress=False, **given)
    assert not marker.exists()


def test_checkpoints_read_by_default_are_loaded_weights_only(tmp_path, monkeypatch):
    """TracInCP's default loader calls torch.load(path), which unpickles anything on torch < 2.6
    or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; pk_attrib's reads tensors only."""
    from _runs import make

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model, _, x, y = make()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "epoch-1.pt")
    torch.save({"learning_rate": 0.5, **model.state_dict()}, folder / "epoch-2.pt")
    data = torch.utils.data.TensorDataset(x, y)
    loss = torch.nn.CrossEntropyLoss()
    explainer = pk.PathKernelInfluence(model, data, folder, loss, show_progress=False)
    assert explainer.path.learning_rates[:, 0].tolist() == [1.0, 0.5]
    marker = tmp_path / "ran"
    torch.save({"w": _Planted(marker)}, folder / "epoch-3.pt")
    with pytest.raises(pk.NotAStoreError, match="does not unpickle"):
        pk.PathKernelInfluence(model, data, folder, loss, show_progress=False)
    assert not marker.exists()


# -- 4. writes never follow links planted in the store ----------------------------------------


def test_resuming_a_store_never_writes_through_links_planted_under_its_file_names(tmp_path):
    from _runs import make, run_steps

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 3)
    path = pk.TrainingPath.load(store)
    path.load_into(model, 2)  # resume from an earlier snapshot: new final weights get written
    outside = {}
    for name in ("manifest.json.tmp", "final.safetensors.tmp", "final-next.safetensors.tmp"):
        target = tmp_path / f"outside-{name}"
        target.write_text("precious")
        (store / name).symlink_to(target)
        outside[name] = target
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, truncate=True) as rec:
        run_steps(model, optimizer, x, y, rec, 2, 5)
    for target in outside.values():
        assert target.read_text() == "precious"
    assert not any(p.is_symlink() for p in store.iterdir())
    assert len(pk.TrainingPath.load(store)) == 5


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_not_created(tmp_path):
    from _runs import make

    store = tmp_path / "s"
    store.mkdir()
    target = tmp_path / "elsewhere" / "created"
    target.parent.mkdir()
    (store / ".lock").symlink_to(target)
    model, optimizer, _, _ = make()
    with pytest.raises(pk.StoreError, match="symbolic link"):
        pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    assert not target.exists()


# -- 5. damaged and crafted files: a pk_attrib error naming the cause, never a traceback ------


def _adam_store(root):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.02, "weight_decay": 0.1},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    with pk.PathRecorder(model, optimizer, store=root, dataset_size=12) as recorder:
        for s in range(3):
            idx = torch.arange(s * 4, s * 4 + 4)
            recorder.record_batch(idx)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model, torch.utils.data.TensorDataset(x, y)


def _json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _json_paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for key, inner in list(enumerate(value))[:3]:  # (a few entries of each list)
            yield from _json_paths(inner, (*prefix, key))


def _mutations(manifest):
    import copy
    import math

    wrong = [None, "x", [], {}, -1, 10**10, math.nan, -math.inf, True, 1e308]
    for where in _json_paths(manifest):
        if not where:
            continue
        *parents, last = where
        for value in ["<removed>", *wrong]:
            changed = copy.deepcopy(manifest)
            node = changed
            for key in parents:
                node = node[key]
            if value == "<removed>":
                if not isinstance(node, dict):
                    continue
                del node[last]
            else:
                node[last] = value
            yield "/".join(map(str, where)), value, changed


def _inspect(store, capsys) -> tuple[int, str]:
    from pk_attrib.cli import main

    code = main(["inspect", str(store)])
    out, err = capsys.readouterr()
    return code, out + err


def test_every_damaged_manifest_is_refused_by_inspect_with_a_reason_or_explains(tmp_path, capsys):
    """Every key removed, every value replaced by a wrong type, NaN, inf, negative or huge:
    `pk-attrib inspect` exits 1 with a pk_attrib error (no traceback: any other exception fails
    this test), or exits 0, and then the store explains (or refuses with a pk_attrib error)."""
    import json

    store = tmp_path / "s"
    model, data = _adam_store(store)
    original = (store / "manifest.json").read_text()
    manifest = json.loads(original)
    assert _inspect(store, capsys)[0] == 0
    refused = accepted = 0
    loss = torch.nn.CrossEntropyLoss()
    for where, value, changed in _mutations(manifest):
        (store / "manifest.json").write_text(json.dumps(changed))
        code, said = _inspect(store, capsys)
        assert "Traceback" not in said, (where, value, said)
        if code == 1:
            refused += 1
            assert said.strip(), (where, value)
            continue
        accepted += 1
        try:  # inspect said fine: it must explain, or refuse saying why
            path = pk.TrainingPath.load(store)
            path.load_into(model)
            explainer = pk.PathKernelInfluence(model, data, path, loss, show_progress=False)
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                dec = explainer.attribute(data.tensors[0][:2], target=data.tensors[1][:2])
            assert bool(torch.isfinite(dec.contributions).all()), (where, value)
        except pk.PkAttribError:
            pass
    (store / "manifest.json").write_text(original)
    assert refused > 300 and accepted > 10, (refused, accepted)


def _crafted(raw: bytes, how: str) -> bytes:
    import json

    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    keys = [k for k in header if k != "__metadata__"]
    first, second = header[keys[0]], header[keys[1]]
    if how == "huge header length":
        return (1 << 62).to_bytes(8, "little") + raw[8:]
    if how == "header past the end":
        return (len(raw)).to_bytes(8, "little") + raw[8:]
    if how == "header not JSON":
        return raw[:8] + b"!" + raw[9:]
    if how == "truncated":
        return raw[: len(raw) - 7]
    if how == "offsets past the end":
        first["data_offsets"] = [len(data) - 4, len(data) + 4]
    elif how == "overlapping":
        second["data_offsets"] = first["data_offsets"]
        second["dtype"], second["shape"] = first["dtype"], first["shape"]
    elif how == "unknown dtype":
        first["dtype"] = "F128"
    elif how == "shape against offsets":
        first["shape"] = [10**6]
    elif how == "negative offsets":
        first["data_offsets"] = [-8, first["data_offsets"][1]]
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


@pytest.mark.parametrize(
    "how",
    [
        "huge header length",
        "header past the end",
        "header not JSON",
        "truncated",
        "offsets past the end",
        "overlapping",
        "unknown dtype",
        "shape against offsets",
        "negative offsets",
    ],
)
def test_a_crafted_safetensors_header_with_a_matching_hash_is_refused(tmp_path, capsys, how):
    """A file whose hash was updated with it (so the hash check passes): inspect said every file
    matched, and the explainer raised a raw SafetensorError (or allocated 2^62 bytes)."""
    import json

    import xxhash

    store = tmp_path / "s"
    model, data = _adam_store(store)
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["shards"][0]
    crafted = _crafted((store / entry["file"]).read_bytes(), how)
    (store / entry["file"]).write_bytes(crafted)
    entry.update(xxh3_128=xxhash.xxh3_128(crafted).hexdigest(), bytes=len(crafted))
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, said = _inspect(store, capsys)
    assert code == 1 and "integrity:   FAILED" in said and "is damaged" in said, said
    path = pk.TrainingPath.load(store)
    with pytest.raises(pk.CorruptStoreError, match="is damaged"):
        pk.PathKernelInfluence(
            model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
        ).attribute(data.tensors[0][:1], target=0)


def test_bad_arguments_are_refused_naming_them(digits_run):
    model, data, path, (x, y) = digits_run
    explainer = _explainer(model, data, path)
    for k in (-1, 0, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k must be a positive int"):
            explainer.influence((x, y), k=k)
    with pytest.raises(ValueError, match=r"test loss fails on the given labels \[12"):
        explainer.influence((x, torch.tensor([12, 1, 2])))  # 10 classes
    for budget in (0, -5, 1.5, None):
        with pytest.raises(ValueError, match="memory_budget"):
            _explainer(model, data, path, memory_budget=budget)
    for rtol in (-1, float("nan"), 0, 2.0, "x"):
        with pytest.raises(ValueError, match="rtol"):
            _explainer(model, data, path, rtol=rtol, quadrature="adaptive")
    with pytest.raises(ValueError, match="batch_size"):
        _explainer(model, data, path, batch_size=0)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1])
def test_a_step_with_a_nan_or_negative_learning_rate_is_refused_when_recorded(lr):
    from _runs import make, run_steps

    model, optimizer, x, y = make()
    recorder = pk.PathRecorder(model, optimizer, dataset_size=40)
    run_steps(model, optimizer, x, y, recorder, 0, 2)
    optimizer.param_groups[0]["lr"] = lr
    with pytest.raises(pk.RecordingError, match="learning rate"):
        run_steps(model, optimizer, x, y, recorder, 2, 3)
    with pytest.warns(pk.PkAttribWarning, match="belong to no step"):
        recorder.close()  # (the refused step's batch)
    assert len(recorder.path) == 2


@pytest.mark.parametrize("damage", ["flipped byte", "deleted"])
def test_a_damaged_store_is_not_resumed(tmp_path, damage):
    """A flipped or deleted middle shard was accepted and appended to."""
    from _runs import make, run_steps

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40, shard_bytes=1) as rec:
        run_steps(model, optimizer, x, y, rec, 0, 5)
    middle = store / "shard-00000002.safetensors"
    if damage == "deleted":
        middle.unlink()
    else:
        raw = bytearray(middle.read_bytes())
        raw[-3] ^= 0x40
        middle.write_bytes(bytes(raw))
    before = (store / "manifest.json").read_text()
    with pytest.raises(pk.CorruptStoreError, match="damaged, so this recording does not continue"):
        pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    assert (store / "manifest.json").read_text() == before


# -- 6. disk and file-system faults --------------------------------------------------------


def _disk_full(monkeypatch):
    """Every tensor file write and every manifest flush fails as on a full disk."""
    import errno

    from pk_attrib.record import diskio, store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskio.SequentialWriter, "write", full)
    monkeypatch.setattr(store, "settle", full)


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_is_a_store_error_at_start_at_close_and_on_resume(tmp_path, monkeypatch):
    from _runs import make, run_steps

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with monkeypatch.context() as patch:  # at start: the initial weights cannot be written
        _disk_full(patch)
        with pytest.raises(pk.StoreError, match="disk is full"):
            pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    assert _leftovers(store) == []
    recorder = pk.PathRecorder(model, optimizer, store=store, dataset_size=40)  # (unlocked)
    run_steps(model, optimizer, x, y, recorder, 0, 4)
    recorder.flush()
    with monkeypatch.context() as patch:  # at close: the final weights cannot be written
        _disk_full(patch)
        with pytest.raises(pk.StoreError, match="disk is full"):
            recorder.close()
    assert _leftovers(store) == []
    path = pk.TrainingPath.load(store)
    assert not path.complete and len(path) == 3  # it ends at its last snapshot, w_3
    assert_is_the_run(path)
    path.load_into(model)  # resume from the last snapshot
    with monkeypatch.context() as patch:  # on resume: its weights cannot be listed as the end
        _disk_full(patch)
        with pytest.raises(pk.StoreError, match="disk is full"):
            pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    assert _leftovers(store) == []
    assert_is_the_run(pk.TrainingPath.load(store))


def test_a_read_only_store_is_explained_with_projection_without_its_feature_cache(
    tmp_path, monkeypatch
):
    """The feature cache could not be written: a raw OSError (Errno 30) came out."""
    import errno

    from pk_attrib.engine import features

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    store = tmp_path / "s"
    model, data = _recorded_store(store)
    monkeypatch.setattr(features, "write_tensor_file", read_only)
    kwargs = dict(projection_dim=16, projector="sparse", show_progress=False)
    loss = torch.nn.CrossEntropyLoss()
    explainer = pk.PathKernelInfluence(model, data, store, loss, **kwargs)
    with pytest.warns(pk.PkAttribWarning, match="cannot write the feature cache"):
        dec = explainer.attribute(data.tensors[0][:2], target=0)
    monkeypatch.undo()  # the same numbers as with a cache
    again = pk.PathKernelInfluence(model, data, store, loss, **kwargs)
    expected = again.attribute(data.tensors[0][:2], target=0)
    torch.testing.assert_close(dec.contributions, expected.contributions, rtol=0, atol=0)
    assert (store / "features").is_dir()


def test_a_shard_truncated_while_it_is_read_is_an_error_not_sigbus(tmp_path):
    """Memory-mapped shards killed the reading process with SIGBUS when truncated."""
    store = tmp_path / "s"
    _recorded_store(store, steps=6)
    proc = child(
        f"""
        import os
        import pk_attrib as pk
        path = pk.TrainingPath.load({str(store)!r})
        path.params(1)  # the shard is open now
        shard = {str(store / "shard-00000000.safetensors")!r}
        os.truncate(shard, os.path.getsize(shard) // 2)
        try:
            [path.params(s) for s in range(len(path) + 1)]
        except pk.CorruptStoreError as err:
            print("refused:", err)
        """
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (proc.returncode, err)  # (-7 is SIGBUS)
    assert out.startswith("refused:") and "truncated" in out, out


# -- 7. concurrency -------------------------------------------------------------------------


def test_a_reader_whose_store_a_recorder_resumes_is_told_so_not_that_it_is_corrupt(tmp_path):
    """A path loaded before a recorder resumed its store: the final weights it lists are
    replaced. It read 'final.safetensors is missing; restore it from a backup'."""
    from _runs import make, run_steps

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 3)
    before = pk.TrainingPath.load(store)  # lists final.safetensors; nothing read yet
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 3, 5)
        recorder.flush()  # the resumed run's first shard: the listed final is gone
        with pytest.raises(pk.StoreChangedError, match="changed while it was being read"):
            _ = before.final
    again = pk.TrainingPath.load(store)
    assert len(again) == 5 and again.complete
    assert_is_the_run(again)


@pytest.mark.parametrize("window", ["file_hash", "check_header"])
def test_a_file_a_writer_replaces_during_its_check_is_a_changed_store(
    tmp_path, monkeypatch, window
):
    """The race the inspect test hit once in a full run: the listed final weights pass
    is_file(), then a resuming recorder removes them before they are hashed (file_hash) or
    opened (after check_header). It raised a bare FileNotFoundError: 'integrity: FAILED'."""
    import json

    import pk_attrib.record.store as store_module

    store = tmp_path / "s"
    _recorded_store(store)
    path = pk.TrainingPath.load(store)
    original = getattr(store_module, window)

    def vanish(file, *args):
        if file.name == "final.safetensors" and file.exists():
            if window == "check_header":
                original(file, *args)
            file.unlink()  # the writer's replacement: a newer manifest
            manifest = json.loads((store / "manifest.json").read_text())
            manifest["updated"] = manifest["updated"] + 1
            (store / "manifest.json").write_text(json.dumps(manifest))
            return None if window == "check_header" else original(file, *args)
        return original(file, *args)

    monkeypatch.setattr(store_module, window, vanish)
    with pytest.raises(pk.StoreChangedError, match="changed while it was being read"):
        _ = path.final


def test_a_store_damaged_with_nobody_writing_it_is_still_corrupt(tmp_path):
    store = tmp_path / "s"
    _recorded_store(store)
    path = pk.TrainingPath.load(store)
    (store / "final.safetensors").unlink()
    with pytest.raises(pk.CorruptStoreError, match="missing; restore it"):
        _ = path.final


def test_inspect_during_recording_never_reports_a_healthy_store_damaged(tmp_path, capsys):
    """Inspect while a recorder writes shards and replaces the listed final weights: it
    once said "integrity: FAILED" (1 run in 1,220)."""
    import threading

    from _runs import make, run_steps

    store = tmp_path / "s"
    model, optimizer, x, y = make()
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40) as recorder:
        run_steps(model, optimizer, x, y, recorder, 0, 2)
    done = threading.Event()

    def record():
        try:
            for _ in range(6):  # each resume lists new final weights, each shard drops them
                with pk.PathRecorder(
                    model, optimizer, store=store, dataset_size=40, flush_interval=0.001
                ) as rec:
                    start = rec.steps_recorded
                    run_steps(model, optimizer, x, y, rec, start, start + 5, sleep=0.002)
        finally:
            done.set()

    thread = threading.Thread(target=record)
    thread.start()
    results = []
    while not done.is_set():
        results.append(_inspect(store, capsys))
    thread.join()
    assert results and all(code == 0 for code, _ in results), [s for c, s in results if c]


def test_a_recorder_racing_another_to_create_a_store_is_told_it_is_being_recorded(tmp_path):
    """The other recorder holds the lock and has written its first files, not yet the
    manifest: the loser got a misleading NotAStoreError ('holds no pk_attrib store')."""
    import fcntl

    from _runs import make

    store = tmp_path / "s"
    store.mkdir()
    (store / "final.safetensors.tmp").write_bytes(b"partial")  # the winner, mid-creation
    with open(store / ".lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        model, optimizer, _, _ = make()
        with pytest.raises(pk.StoreError, match="being recorded by another PathRecorder"):
            pk.PathRecorder(model, optimizer, store=store, dataset_size=40)
    # once the winner is gone (it died before its manifest), the folder is a store to create
    with pk.PathRecorder(model, optimizer, store=store, dataset_size=40):
        pass
    assert not (store / "final.safetensors.tmp").exists()
    assert len(pk.TrainingPath.load(store)) == 0
