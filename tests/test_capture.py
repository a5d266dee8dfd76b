"""What a recording keeps so that each step's forward pass can be rerun: the random-number
state of every micro-batch and the model's buffers (issue 17, the recording side)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk


def _bn_dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 3),
    ).double()


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    )


@pytest.mark.parametrize("store", [False, True], ids=["memory", "disk"])
def test_each_micro_batch_forward_reruns_from_its_recorded_state(tmp_path, store):
    """Restoring a micro-batch's recorded state and rerunning its forward in train mode draws
    the dropout masks training drew: the outputs are the same to the bit."""
    model = _bn_dropout_model()
    data = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    outputs, buffers_before = [], []
    where = tmp_path / "s" if store else None
    with pk.PathRecorder(model, optimizer, store=where) as recorder:
        for k, (x, y) in enumerate(recorder.watch(loader)):
            if k % 2 == 0:  # two micro-batches a step
                buffers_before.append({n: b.clone() for n, b in model.named_buffers()})
            model.train()
            out = model(x)
            outputs.append(out.detach().clone())
            torch.nn.functional.cross_entropy(out, y).backward()
            if k % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
    path = recorder.path
    assert len(path) == 3 and path.manifest["buffers"] == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]
    replica = _bn_dropout_model().train()
    micro = 0
    for s in range(len(path)):
        step = path.step(s)
        assert len(step.rng_states) == 2
        # the buffers kept are those before the step's first forward
        for name, value in buffers_before[s].items():
            assert torch.equal(step.buffers[name], value), (s, name)
        for (state,), _, part in zip(
            step.rng_states,
            step.batch_sizes,
            step.indices.split(step.batch_sizes.tolist()),
            strict=True,
        ):
            path.load_into(replica, s)
            for name, value in step.buffers.items():  # (as training had them)
                dict(replica.named_buffers())[name].copy_(value)
            torch.set_rng_state(state)
            again = replica(data.tensors[0][part])
            assert torch.equal(again, outputs[micro]), (s, micro)
            micro += 1
    final = path.buffers(len(path))
    for name, value in model.named_buffers():
        assert torch.equal(final[name], value)


def test_a_model_without_random_operations_keeps_one_state_per_epoch_not_per_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    data = _data(40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    with pk.PathRecorder(model, optimizer, store=tmp_path / "s") as recorder:
        for _ in range(2):
            for x, y in recorder.watch(loader):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    path = recorder.path
    kept = sum(1 for keys in path._keys().values() for k in keys if k.startswith("rng/"))
    assert kept <= 2 and len(path) == 20  # the shuffling sampler draws once an epoch
    states = [path.step(s).rng_states[0][0] for s in range(len(path))]
    assert all(torch.equal(a, states[0]) for a in states[:10])
    assert path.buffers(0) == {} and path.manifest["buffers"] == []


def test_a_buffer_is_kept_again_only_when_it_changed():
    model = _bn_dropout_model()
    data = _data(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data.tensors
    with pk.PathRecorder(model, optimizer) as recorder:
        for s in range(4):
            recorder.record_batch(torch.arange(s * 4, s * 4 + 4))
            model.train(s % 2 == 0)  # the running statistics move at steps 0 and 2 only
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(
                model(x[s * 4 : s * 4 + 4]), y[s * 4 : s * 4 + 4]
            ).backward()
            optimizer.step()
    kept = {
        r: sorted(k for k in keys if k.startswith("buf/"))
        for r, keys in recorder.path._keys().items()
    }
    assert len(kept[0]) == 3 and len(kept[1]) == 3 and kept[2] == [] and len(kept[3]) == 3
    path = recorder.path
    assert torch.equal(path.buffers(2)["1.running_mean"], path.buffers(1)["1.running_mean"])


def test_each_step_records_which_modules_ran_in_train_mode():
    """All in train mode: True; all in eval mode: the empty set; a mix (BatchNorm frozen in
    eval mode while the rest trains): exactly the names of the modules in train mode."""
    model = _bn_dropout_model()
    data = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = pk.PathRecorder(model, optimizer, dataset_size=len(data))
    x, y = data.tensors
    modes = (lambda: model.train(), lambda: model.eval(), lambda: model[1].eval())
    for s, set_mode in enumerate(modes):
        model.train()
        set_mode()
        idx = list(range(4 * s, 4 * s + 4))
        recorder.record_batch(idx)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    recorder.close()
    recorded = [recorder.path.step(s).train_modules for s in range(3)]
    assert recorded[0] is True
    assert recorded[1] == frozenset()
    assert recorded[2] == frozenset({"", "0", "2", "3", "4"})  # ("": the Sequential itself)
