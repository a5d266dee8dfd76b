"""PathRecorder records w_s, learning rates, optimizer terms and batch indices exactly."""

import pytest
import torch
import torch.nn.functional as F
from conftest import indexed_dataset, small_mlp
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

import pk_attrib as pk


def make_optimizer(name, model):
    params = list(model.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if name == "sgd_momentum_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    if name == "two_groups":
        return torch.optim.SGD(
            [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
            lr=0.03,
            momentum=0.5,
        )
    raise ValueError(name)


def train(model, optimizer, loader, recorder, epochs=2, scheduler=None, accumulate=1):
    """Train, capturing what the recorder should have recorded, independently of it."""
    expected = {"params": [], "lr": [], "indices": [], "adam": []}
    current = []
    k = 0
    for _ in range(epochs):
        for x, y, idx in recorder.watch(loader):
            k += 1
            current.append(idx)
            F.cross_entropy(model(x), y).backward()
            if k % accumulate:
                continue
            expected["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
            expected["lr"].append([g["lr"] for g in optimizer.param_groups])
            expected["indices"].append(torch.cat(current))
            current = []
            optimizer.step()
            optimizer.zero_grad()
            if isinstance(optimizer, torch.optim.Adam):
                expected["adam"].append(
                    {
                        n: optimizer.state[p]["exp_avg_sq"].clone()
                        for n, p in model.named_parameters()
                    }
                )
            if scheduler is not None:
                scheduler.step()
    return expected


@pytest.mark.parametrize("store", [False, True], ids=["memory", "disk"])
@pytest.mark.parametrize(
    "opt", ["sgd", "sgd_momentum_nesterov", "adam", "adamw", "two_groups", "scheduler"]
)
def test_recorded_weights_bit_for_bit(opt, store, tmp_path):
    model = small_mlp()
    optimizer = make_optimizer("sgd" if opt == "scheduler" else opt, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5) if opt == "scheduler" else None
    loader = DataLoader(indexed_dataset(), batch_size=8, shuffle=True)
    recorder = pk.PathRecorder(model, optimizer, store=tmp_path / "s" if store else None)
    expected = train(model, optimizer, loader, recorder, scheduler=scheduler)
    recorder.close()
    path = pk.TrainingPath.load(tmp_path / "s") if store else recorder.path
    assert len(path) == len(expected["params"]) == 10
    assert path.complete and not path.approximate
    for s, params in enumerate(expected["params"]):
        step = path.step(s)
        assert step.params.keys() == params.keys()
        for name, value in params.items():
            assert torch.equal(step.params[name], value), (s, name)
        assert list(step.lr) == expected["lr"][s]
        assert torch.equal(step.indices, expected["indices"][s])
        if expected["adam"]:
            for name, value in expected["adam"][s].items():
                assert torch.equal(step.optimizer_state["exp_avg_sq"][name], value)
            assert float(step.optimizer_state["step"][name]) == s + 1
    for name, p in model.named_parameters():
        assert torch.equal(path.final[name], p.detach())
        assert torch.equal(path.step(len(path) - 1).next_params[name], p.detach())
    if opt == "scheduler":
        assert path.learning_rates[:, 0].tolist() == [0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125]
    kind = path.optimizer["kind"]
    assert kind == {"adam": "adam", "adamw": "adamw"}.get(opt, "sgd")
    if opt == "two_groups":
        assert [g["params"] for g in path.optimizer["groups"]] == [
            ["0.weight", "0.bias"],
            ["2.weight", "2.bias"],
        ]
        assert path.optimizer["groups"][1]["hyper"]["momentum"] == 0.5
    if opt == "adamw":
        assert path.step(2).optimizer_state.keys() == {"exp_avg_sq", "max_exp_avg_sq", "step"}
        assert path.optimizer["groups"][0]["hyper"]["amsgrad"] is True


@pytest.mark.parametrize(
    "loader_kwargs",
    [
        dict(batch_size=6, shuffle=True),
        dict(batch_size=6, shuffle=True, drop_last=True),
        dict(batch_size=6, shuffle=True, num_workers=2),
        dict(batch_size=6, shuffle=True, num_workers=2, persistent_workers=True),
        dict(batch_sampler=BatchSampler(SequentialSampler(range(40)), 9, drop_last=False)),
        dict(batch_size=None, shuffle=True),
        dict(batch_size=5, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 40, 30)),
    ],
    ids=["shuffle", "drop_last", "workers", "persistent", "batch_sampler", "unbatched", "weighted"],
)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_indices_match_the_loader(loader_kwargs, accumulate):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(indexed_dataset(), **loader_kwargs)
    with pk.PathRecorder(model, optimizer) as recorder:
        if loader_kwargs.get("batch_size", 1) is None:  # unbatched: one example per batch
            expected = []
            for k, (x, y, _) in enumerate(recorder.watch(loader)):
                F.cross_entropy(model(x[None]), y[None]).backward()
                if k % 2:
                    optimizer.step()
                    optimizer.zero_grad()
                    expected.append(None)
            recorded = [s.indices for s in recorder.path]
            assert all(len(r) == 2 for r in recorded)
            return
        expected = train(model, optimizer, loader, recorder, accumulate=accumulate)
    path = recorder.path
    assert len(path) == len(expected["indices"])
    for step, idx in zip(path, expected["indices"], strict=True):
        assert torch.equal(step.indices, idx)
        assert int(step.batch_sizes.sum()) == len(idx)
        assert len(step.batch_sizes) == accumulate


def record_and_backward(model, optimizer, data, recorder, idx):
    """One batch of a custom loop up to the optimizer step: note its indices, backward."""
    x, y, _ = data[torch.as_tensor(idx)]
    recorder.record_batch(idx)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_record_batch_in_a_custom_loop():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = indexed_dataset()
    with pk.PathRecorder(model, optimizer, dataset_size=len(data)) as recorder:
        for start in range(0, 40, 10):
            idx = torch.arange(start, start + 10)
            record_and_backward(model, optimizer, data, recorder, idx)
            optimizer.step()
    assert [s.indices.tolist() for s in recorder.path] == [
        list(range(a, a + 10)) for a in range(0, 40, 10)
    ]
    assert recorder.path.dataset_size == 40


@pytest.mark.parametrize("store", [False, True], ids=["memory", "disk"])
def test_recorded_indices_are_a_copy_of_the_callers_array(store, tmp_path):
    """A loop that reuses its index array (an epoch permutation shuffled in place) must not
    rewrite what was recorded."""
    np = pytest.importorskip("numpy")
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = indexed_dataset()
    rng = np.random.default_rng(0)
    perm = np.arange(40)
    seen = []
    recorder = pk.PathRecorder(model, optimizer, tmp_path / "s" if store else None)
    for _ in range(2):
        rng.shuffle(perm)  # in place, as many custom loops do
        for start in range(0, 40, 10):
            idx = perm[start : start + 10]  # a view of perm
            seen.append(idx.tolist())
            record_and_backward(model, optimizer, data, recorder, idx)
            optimizer.step()
    recorder.close()
    path = pk.TrainingPath.load(tmp_path / "s") if store else recorder.path
    assert [step.indices.tolist() for step in path] == seen


def test_a_skipped_step_can_discard_its_batch():
    """GradScaler skips optimizer.step() on inf/NaN gradients: discard_batches() keeps the
    skipped batch out of the next step."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = indexed_dataset()
    with pk.PathRecorder(model, optimizer, dataset_size=len(data)) as recorder:
        for start in range(0, 40, 10):
            idx = torch.arange(start, start + 10)
            record_and_backward(model, optimizer, data, recorder, idx)
            if start == 10:  # "inf found": no step for this batch
                recorder.discard_batches()
                continue
            optimizer.step()
    assert [s.indices.tolist() for s in recorder.path] == [
        list(range(a, a + 10)) for a in (0, 20, 30)
    ]


def test_several_steps_on_one_batch_repeat_it():
    """Two updates per batch under watch(): the second step once had no way to name its
    batch (MissingBatchIndicesError told the user to use watch, which they did)."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = indexed_dataset()
    x, y = data.tensors[0], data.tensors[1]
    with pk.PathRecorder(model, optimizer, dataset_size=len(data)) as recorder:
        with pytest.raises(pk.RecordingError, match="no optimizer step"):
            recorder.repeat_batch()
        for xb, yb, *_ in recorder.watch(torch.utils.data.DataLoader(data, batch_size=10)):
            for k in range(2):
                if k:
                    recorder.repeat_batch()
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:10]), y[:10]).backward()
        with pytest.raises(pk.MissingBatchIndicesError, match="repeat_batch"):
            optimizer.step()
    assert [s.indices.tolist() for s in recorder.path] == [
        list(range(a, a + 10)) for a in (0, 0, 10, 10, 20, 20, 30, 30)
    ]


@pytest.mark.parametrize("change", ["add_param_group", "unfreeze"])
def test_parameters_trained_after_the_recorder_started_are_refused(change):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    if change == "unfreeze":
        model[1].weight.requires_grad_(False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    recorder = pk.PathRecorder(model, optimizer, dataset_size=10)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def step():
        recorder.record_batch(torch.arange(10))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    if change == "unfreeze":
        model[1].weight.requires_grad_(True)
    else:
        optimizer.add_param_group({"params": model[1].parameters(), "lr": 0.05})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(pk.RecordingError, match="1.weight"):
        step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # refused before the update
    recorder.discard_batches()  # the refused step's batch
    recorder.close()
    assert len(recorder.path) == 1  # the step before the change, intact
    assert all(torch.equal(recorder.path.final[n], before[n]) for n in recorder.path.final)


def test_editing_what_a_path_returns_leaves_the_record_intact():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(indexed_dataset(), batch_size=8)
    with pk.PathRecorder(model, optimizer) as recorder:
        train(model, optimizer, loader, recorder, epochs=1)
    path = recorder.path
    kept = {n: t.clone() for n, t in path.params(0).items()}
    final = {n: t.clone() for n, t in path.final.items()}
    for values in (path.params(0), path.step(0).params, path.final):
        for t in values.values():
            t.zero_()
    assert all(torch.equal(path.params(0)[n], kept[n]) for n in kept)
    assert all(torch.equal(path.final[n], final[n]) for n in final)


def test_every_k_keeps_every_kth_snapshot_and_all_indices():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(indexed_dataset(), batch_size=4, shuffle=True)
    with pk.PathRecorder(model, optimizer, every=3) as recorder:
        expected = train(model, optimizer, loader, recorder, epochs=1)
    path = recorder.path
    assert not path.approximate and path.manifest["replayable"]  # (SGD: steps replayed)
    assert len(path) == 4  # 10 optimizer steps: snapshots at 0, 3, 6, 9
    for s, step in enumerate(path):
        raws = range(3 * s, min(3 * s + 3, 10))
        assert step.raw_steps == raws
        for name, value in expected["params"][3 * s].items():
            assert torch.equal(step.params[name], value)
        assert torch.equal(step.indices, torch.cat([expected["indices"][r] for r in raws]))
        assert step.lr_sum == pytest.approx((0.1 * len(raws),))


def test_frozen_parameters_are_not_recorded():
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(indexed_dataset(), batch_size=8)
    with pk.PathRecorder(model, optimizer) as recorder:
        train(model, optimizer, loader, recorder, epochs=1)
    assert recorder.path.param_names == ["0.bias", "2.weight", "2.bias"]


def test_other_optimizers_are_recorded_as_approximate(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    loader = DataLoader(indexed_dataset(), batch_size=8)
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s") as recorder:
        expected = train(model, optimizer, loader, recorder, epochs=1)
    path = pk.TrainingPath.load(tmp_path / "s")
    assert path.optimizer["kind"] == "other" and not path.optimizer["exact"]
    assert path.approximate and "Rprop" in path.approximate_reasons[0]
    assert torch.equal(path.params(3)["2.weight"], expected["params"][3]["2.weight"])


@pytest.mark.parametrize(
    ("make", "kind", "kept"),
    [
        (lambda p: torch.optim.RMSprop(p, centered=True), "rmsprop", {"square_avg", "grad_avg"}),
        (lambda p: torch.optim.Adagrad(p), "adagrad", {"sum", "step"}),
        (lambda p: torch.optim.Adamax(p), "adamax", {"exp_inf", "step"}),
        (lambda p: torch.optim.NAdam(p), "nadam", {"exp_avg_sq", "mu_product", "step"}),
        (lambda p: torch.optim.RAdam(p), "radam", {"exp_avg_sq", "step"}),
    ],
)
def test_optimizers_with_an_exact_rule_keep_what_it_divides_by(tmp_path, make, kind, kept):
    """What each step divides by (second moments, sums, infinity norms) and the step counts,
    read back after every step as the optimizer held them after it."""
    model = small_mlp()
    optimizer = make(model.parameters())
    loader = DataLoader(indexed_dataset(), batch_size=8)
    after = []
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s") as recorder:
        for x, y, _ in recorder.watch(loader):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            after.append({k: v.clone() for k, v in optimizer.state[model[2].weight].items()})
    path = pk.TrainingPath.load(tmp_path / "s")
    assert path.optimizer["kind"] == kind and path.optimizer["exact"] and not path.approximate
    for s, held in enumerate(after):
        state = path.step(s).optimizer_state
        assert set(state) == kept
        for key in kept:  # (scalars, step counts and NAdam's mu_product, in float64)
            assert torch.equal(state[key]["2.weight"], held[key].to(state[key]["2.weight"].dtype))
            assert state[key]["2.weight"].shape == held[key].shape


def test_float64_model_is_recorded_in_float64_and_dtype_can_be_chosen():
    model = small_mlp(dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = indexed_dataset()
    data.tensors = (data.tensors[0].double(),) + data.tensors[1:]
    loader = DataLoader(data, batch_size=8)
    with (
        pk.PathRecorder(model, optimizer) as exact,
        pk.PathRecorder(model, optimizer, dtype=torch.float32) as small,
    ):
        for x, y, idx in exact.watch(loader):
            small.record_batch(idx)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert exact.path.dtype == torch.float64 and small.path.dtype == torch.float32
    assert torch.equal(small.path.params(2)["0.weight"], exact.path.params(2)["0.weight"].float())


def test_from_checkpoints_reads_state_dicts_and_files(tmp_path):
    import safetensors.torch

    model = small_mlp()
    states = []
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * k)
        states.append({n: t.clone() for n, t in model.state_dict().items()})
    safetensors.torch.save_file(states[1], tmp_path / "c1.safetensors")
    torch.save({"model_state_dict": states[2]}, tmp_path / "c2.pt")
    path = pk.TrainingPath.from_checkpoints(
        [states[0], tmp_path / "c1.safetensors", tmp_path / "c2.pt"], [0.1, 0.2, 0.3], model=model
    )
    assert len(path) == 3 and path.approximate and path.source == "checkpoints"
    assert path.learning_rates[:, 0].tolist() == [0.1, 0.2, 0.3]
    for k in range(3):
        assert torch.equal(path.params(k)["0.weight"], states[k]["0.weight"])
    assert torch.equal(path.final["2.bias"], states[2]["2.bias"])
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        pk.TrainingPath.from_checkpoints(states, [0.1, 0.2])
    stored = path.save(tmp_path / "ckpt_store")
    assert len(stored) == 3 and stored.source == "checkpoints"
    assert torch.equal(stored.params(1)["2.weight"], states[1]["2.weight"])


def test_from_checkpoints_keeps_buffers_and_reads_a_wrapped_models_keys(tmp_path):
    """Checkpoints of a compiled model (keys "_orig_mod.*") with BatchNorm statistics, one
    without them: names come out plain, buffers per checkpoint (a missing one keeps the
    previous checkpoint's, as TracInCP's loading into one model does), and they survive
    save/load."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    compiled = torch.compile(model, backend="eager")
    states = []
    for k in range(3):
        with torch.no_grad():
            model[1].running_mean.fill_(float(k))
            model[0].weight.add_(1.0)
        states.append({n: t.clone() for n, t in compiled.state_dict().items()})
    del states[1]["_orig_mod.1.running_mean"]
    for given in (model, compiled):
        path = pk.TrainingPath.from_checkpoints(states, 0.1, model=given)
        assert path.param_names == ["0.weight", "0.bias", "1.weight", "1.bias"]
        means = [path.step(k).buffers["1.running_mean"][0].item() for k in range(3)]
        assert means == [0.0, 0.0, 2.0]
    stored = path.save(tmp_path / "store")
    assert stored.step(2).buffers["1.running_mean"][0].item() == 2.0
    assert set(stored.step(0).buffers) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


def test_memory_path_saves_to_a_store_that_loads_identically(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(indexed_dataset(), batch_size=8, shuffle=True)
    with pk.PathRecorder(model, optimizer) as recorder:
        train(model, optimizer, loader, recorder)
    saved = recorder.path.save(tmp_path / "s", shard_bytes=2000)
    assert len(saved.manifest["shards"]) > 1
    for s in range(len(saved)):
        a, b = saved.step(s), recorder.path.step(s)
        assert torch.equal(a.indices, b.indices) and a.lr == b.lr
        for n in saved.param_names:
            assert torch.equal(a.params[n], b.params[n])
            assert torch.equal(
                a.optimizer_state["exp_avg_sq"][n], b.optimizer_state["exp_avg_sq"][n]
            )
    assert all(torch.equal(saved.final[n], recorder.path.final[n]) for n in saved.param_names)
