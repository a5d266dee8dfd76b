"""Checkpoint mode against Captum's TracInCP, and clear errors for bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.influence import TracInCP
from test_engine import OPTIMIZERS, digits, digits_mlp, record, train_set
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk

F64 = torch.float64


class ExplainedLogit:
    """The logit of the target class, per example (Captum reads `reduction`)."""

    reduction = "none"

    def __call__(self, outputs, targets):
        return outputs.gather(1, targets[:, None])[:, 0]


explained_logit = ExplainedLogit()


def test_checkpoint_mode_equals_captum_tracincp(tmp_path):
    torch.manual_seed(10)
    model = digits_mlp(hidden=12)
    data = train_set(n=50)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=10, shuffle=True)
    files, lrs = [], []
    for epoch in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        files.append(str(tmp_path / f"epoch{epoch}.pt"))
        lrs.append(0.1 / (epoch + 1))
        torch.save(model.state_dict(), files[-1])
    lr_of = dict(zip(files, lrs, strict=True))

    def load(net, path):
        net.load_state_dict(torch.load(path, weights_only=True))
        return lr_of[path]

    x, y = digits()
    queries, target = x[1500:1505], y[1500:1505]
    tracin = TracInCP(
        model,
        data,
        checkpoints=files,
        checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=10,
        test_loss_fn=explained_logit,
    )
    captum_scores = tracin.influence((queries, target))
    path = pk.TrainingPath.from_checkpoints(files, lrs, model=model)
    load(model, files[-1])
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    assert explainer.mode == "checkpoint"
    dec = explainer.attribute(queries, target=target)
    assert dec.diagnostics.mode == "checkpoint"
    torch.testing.assert_close(dec.contributions, -captum_scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        dec.bias + dec.contributions.sum(1) + dec.delta, dec.prediction, rtol=0, atol=1e-12
    )


class TimeMajor(torch.nn.Module):
    """A Linear layer run on (T, B, F) activations: its rows are not grouped by example."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(3, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):  # x: (B, T, 3)
        return self.out(torch.tanh(self.inp(x.transpose(0, 1))).mean(0))


def test_one_query_through_a_time_major_linear_layer_equals_captum(tmp_path):
    """With one query, the check that a layer's rows group into examples passed trivially,
    and the training side was then grouped wrongly (7% off, silently)."""
    torch.manual_seed(12)
    steps, n, batch = 8, 16, 4  # steps % batch == 0: a wrong grouping raises no error
    x, y = torch.randn(n, steps, 3, dtype=F64), torch.randint(0, 3, (n,))
    data = TensorDataset(x, y)
    model = TimeMajor().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    files = []
    for epoch in range(2):
        for a in range(0, n, batch):
            optimizer.zero_grad()
            F.cross_entropy(model(x[a : a + batch]), y[a : a + batch]).backward()
            optimizer.step()
        files.append(str(tmp_path / f"e{epoch}.pt"))
        torch.save(model.state_dict(), files[-1])

    def load(net, path):
        net.load_state_dict(torch.load(path, weights_only=True))
        return 0.2

    query = (torch.randn(1, steps, 3, dtype=F64), torch.tensor([2]))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    tracin = TracInCP(model, data, files, load, loss_fn=loss_fn, batch_size=batch)
    expected = tracin.influence(query)
    path = pk.TrainingPath.from_checkpoints(files, [0.2, 0.2], model=model)
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), batch_size=batch, show_progress=False
    )
    torch.testing.assert_close(explainer.influence(query), expected, rtol=1e-10, atol=1e-12)


def test_recorded_path_with_every_k_runs_in_checkpoint_mode_with_batch_membership():
    torch.manual_seed(11)
    model = digits_mlp(hidden=8)
    data = train_set(n=40)
    loader = DataLoader(data, batch_size=10, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer, every=2) as recorder:
        for _ in range(2):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    path = recorder.path
    x, y = digits()
    dec = pk.PathKernelInfluence(  # (an exact optimizer's path replays in exact mode)
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False, mode="checkpoint"
    ).attribute(x[1500:1502], target=y[1500:1502])
    # TracIn over the snapshots, each example weighted by lr/|B| per step it was in
    expected = torch.zeros(2, 40, dtype=F64)
    for step in path:
        net = digits_mlp(hidden=8)
        net.load_state_dict({**net.state_dict(), **step.params})
        grads_q = []
        for j in range(2):
            net.zero_grad()
            net(x[1500 + j : 1501 + j])[0, y[1500 + j]].backward()
            grads_q.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        for lr, idx, _sizes in step.parts:
            for i in idx.tolist():
                net.zero_grad()
                F.cross_entropy(net(data[i][0][None]), data[i][1][None]).backward()
                g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
                for j in range(2):
                    expected[j, i] -= lr[0] / 10 * (grads_q[j] @ g)
    torch.testing.assert_close(dec.contributions, expected, rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="module")
def recorded():
    torch.manual_seed(12)
    model = digits_mlp(hidden=8)
    data = train_set(n=40)
    path = record(model, OPTIMIZERS["sgd_0.1"](model.parameters()), data, batch_size=10)
    return model, data, path


def make(recorded, **kwargs):
    model, data, path = recorded
    kwargs.setdefault("loss_fn", torch.nn.CrossEntropyLoss())
    return pk.PathKernelInfluence(model, data, path, show_progress=False, **kwargs)


def test_a_path_that_is_neither_a_store_nor_checkpoints_is_refused_clearly(recorded, tmp_path):
    model, data, path = recorded
    path.save(tmp_path / "runs" / "exp")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a checkpoint")
    loss = torch.nn.CrossEntropyLoss()
    cases = {
        tmp_path / "runs" / "exq": "does not exist",
        tmp_path / "runs": r"holds stores \(exp\): give one",
        tmp_path / "runs" / "exp" / "manifest.json": "is a store's manifest: give its folder",
        tmp_path / "empty": "neither a pk_attrib store",
        tmp_path / "junk": "reading it as TracInCP checkpoints failed",
    }
    for where, message in cases.items():
        with pytest.raises(pk.NotAStoreError, match=message):
            pk.PathKernelInfluence(model, data, str(where), loss, show_progress=False)
    found = pk.PathKernelInfluence(
        model, data, str(tmp_path / "runs" / "exp"), loss, show_progress=False
    )
    assert found.mode == "exact" and len(found.path) == len(path)


def test_a_model_with_other_parameters_is_refused(recorded):
    _, data, path = recorded
    other = digits_mlp(hidden=9)
    with pytest.raises(pk.StoreMismatchError, match="shape"):
        pk.PathKernelInfluence(other, data, path, torch.nn.CrossEntropyLoss())
    renamed = torch.nn.Sequential(torch.nn.Sequential(*recorded[0]))
    with pytest.raises(pk.StoreMismatchError, match="no parameters named"):
        pk.PathKernelInfluence(renamed, data, path, torch.nn.CrossEntropyLoss())
    moved = digits_mlp(hidden=8)  # same shapes, other values: not the recorded model
    with pytest.raises(pk.StoreMismatchError, match="load_into"):
        pk.PathKernelInfluence(moved, data, path, torch.nn.CrossEntropyLoss())
    path.load_into(moved)
    pk.PathKernelInfluence(moved, data, path, torch.nn.CrossEntropyLoss(), show_progress=False)


def test_a_path_stored_narrower_than_the_model_says_what_is_explained():
    """PathRecorder(dtype=float32) on a float64 model: the decomposition explains the
    rounded weights; a warning says so (the check that the model matches passed silently)."""
    torch.manual_seed(13)
    model = digits_mlp(hidden=6)
    data = train_set(n=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer, dtype=torch.float32) as recorder:
        for a in range(0, 20, 10):
            recorder.record_batch(torch.arange(a, a + 10))
            optimizer.zero_grad()
            F.cross_entropy(
                model(data.tensors[0][a : a + 10]), data.tensors[1][a : a + 10]
            ).backward()
            optimizer.step()
    with pytest.warns(pk.PkAttribWarning, match="rounded to torch.float32"):
        pk.PathKernelInfluence(
            model, data, recorder.path, torch.nn.CrossEntropyLoss(), show_progress=False
        )
    # a float32 model explained after .double() holds the stored values exactly: no warning
    model.float()
    recorder.path.load_into(model)
    model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.PkAttribWarning)
        pk.PathKernelInfluence(
            model, data, recorder.path, torch.nn.CrossEntropyLoss(), show_progress=False
        )


def test_queries_without_a_batch_dimension_or_rows_and_tuple_outputs_are_named(recorded):
    x, y = digits()
    ex = make(recorded)
    with pytest.raises(ValueError, match="no queries"):
        ex.attribute(x[:0], target=0)
    with pytest.raises(ValueError, match=r"x.unsqueeze\(0\)"):
        ex.attribute(x[1500], target=0)  # one example without its batch dimension
    model, data, path = recorded

    class Pair(torch.nn.Module):  # returns (logits, hidden): which one is explained?
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs), inputs

    pair = Pair()
    renamed = {f"net.{k}": v for k, v in path.final.items()}
    pair.load_state_dict(renamed)
    pair_path = pk.TrainingPath.from_checkpoints([renamed, renamed], [0.1, 0.1])
    tuple_ex = pk.PathKernelInfluence(
        pair,
        data,
        pair_path,
        lambda out, lab: F.cross_entropy(out[0], lab),
        loss_reduction="mean",
        show_progress=False,
    )
    with pytest.raises(TypeError, match="returns a tuple, not a tensor: pass output_fn"):
        tuple_ex.attribute(x[1500:1502], target=0)


def test_a_training_set_of_another_length_is_refused(recorded):
    model, _, path = recorded
    with pytest.raises(pk.StoreMismatchError, match="40 examples"):
        pk.PathKernelInfluence(model, train_set(n=41), path, torch.nn.CrossEntropyLoss())


def test_bad_targets_are_refused(recorded):
    explainer = make(recorded)
    x, _ = digits()
    with pytest.raises(ValueError, match="out of range"):
        explainer.attribute(x[:2], target=10)
    with pytest.raises(ValueError, match="3 entries for 2 queries"):
        explainer.attribute(x[:2], target=[1, 2, 3])
    with pytest.raises(ValueError, match="must say which one"):
        explainer.attribute(x[:2])
    with pytest.raises(ValueError, match="integer"):
        explainer.attribute(x[:2], target=torch.tensor([0.5, 1.0]))


def test_non_finite_values_name_the_step(recorded):
    explainer = make(recorded)
    x, _ = digits()
    bad = x[:2].clone()
    bad[0, 3] = float("nan")
    with pytest.raises(pk.NonFiniteError, match="weights are finite, so the inputs"):
        explainer.attribute(bad, target=1)

    xs = torch.randn(20, 3, dtype=F64) * 1000
    data = TensorDataset(xs, torch.randn(20, 1, dtype=F64))
    model = torch.nn.Linear(3, 1).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    # the recorder says, when it closes, where the run diverged; the explainer names that step
    # (its backward sweep meets the first NaN near the end)
    with pytest.warns(pk.PkAttribWarning, match=r"diverged: its weights hold NaN or inf from"):
        with pk.PathRecorder(model, optimizer, dataset_size=20) as recorder:
            for s in range(80):
                idx = torch.arange(s % 4 * 5, s % 4 * 5 + 5)
                recorder.record_batch(idx)
                optimizer.zero_grad()
                F.mse_loss(model(xs[idx]), data.tensors[1][idx]).backward()
                optimizer.step()
    diverged = recorder.path.first_non_finite()
    assert 0 < diverged < 80
    params = recorder.path.params
    assert all(bool(torch.isfinite(t).all()) for t in params(diverged - 1).values())
    assert not all(bool(torch.isfinite(t).all()) for t in params(diverged).values())
    with pytest.raises(pk.NonFiniteError, match=f"not finite from step {diverged} on"):
        pk.PathKernelInfluence(
            model, data, recorder.path, torch.nn.MSELoss(), show_progress=False
        ).attribute(xs[:1])


def test_approximate_paths_refuse_exact_mode(recorded, tmp_path):
    model, data, path = recorded
    checkpoints = pk.TrainingPath.from_checkpoints([path.params(0), path.final], 0.1, model=model)
    with pytest.raises(pk.UnsupportedError, match="checkpoint"):
        pk.PathKernelInfluence(model, data, checkpoints, torch.nn.CrossEntropyLoss(), mode="exact")
    with pytest.raises(NotImplementedError):  # the built-in base class
        pk.PathKernelInfluence(model, data, checkpoints, torch.nn.CrossEntropyLoss(), mode="exact")
    rprop_model = digits_mlp(hidden=8)
    rprop = record(
        rprop_model, torch.optim.Rprop(rprop_model.parameters(), lr=1e-3), data, batch_size=10
    )
    with pytest.raises(pk.UnsupportedError, match="Rprop has no exact decomposition rule"):
        pk.PathKernelInfluence(rprop_model, data, rprop, torch.nn.CrossEntropyLoss(), mode="exact")
    x, y = digits()
    with pytest.warns(pk.PkAttribWarning, match="Rprop has no exact .* checkpoint mode"):
        explainer = pk.PathKernelInfluence(
            rprop_model, data, rprop, torch.nn.CrossEntropyLoss(), show_progress=False
        )
    dec = explainer.attribute(x[:2], target=y[:2])
    assert dec.diagnostics.mode == "checkpoint"
    with pytest.raises(ValueError, match="mode="):
        make(recorded, mode="fast")


def _short_run(optimizer_of, steps=3, closure=False):
    """(model, data, path) of a few recorded steps of the digits MLP."""
    torch.manual_seed(3)
    model = digits_mlp(hidden=6)
    data = train_set(n=30)
    x, y = data.tensors
    optimizer = optimizer_of(model)
    with pk.PathRecorder(model, optimizer) as recorder:
        for s in range(steps):
            idx = torch.arange(s * 10, (s + 1) * 10)
            recorder.record_batch(idx)

            def loss(idx=idx):
                optimizer.zero_grad()
                value = F.cross_entropy(model(x[idx]), y[idx])
                value.backward()
                return value

            if closure:  # (LBFGS evaluates the loss inside its step)
                optimizer.step(loss)
            else:
                loss()
                optimizer.step()
    return model, data, recorder.path


def _with_an_option_sgd_does_not_have(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["clip_norm"] = 1.0  # read by a customised loop or subclass
    return optimizer


@pytest.mark.parametrize(
    ("optimizer_of", "named", "closure"),
    [
        (lambda m: torch.optim.Rprop(m.parameters(), lr=0.01), "Rprop has no exact", False),
        (lambda m: torch.optim.LBFGS(m.parameters(), max_iter=2), "LBFGS has no exact", True),
        (_with_an_option_sgd_does_not_have, r"optimizer SGD uses \['clip_norm'\]", False),
    ],
    ids=["rprop", "lbfgs", "sgd_with_an_unmodelled_option"],
)
def test_an_optimizer_without_a_rule_warns_in_auto_mode_and_is_refused_in_exact(
    optimizer_of, named, closure
):
    """An optimizer without an exact rule was explained in checkpoint mode without a word
    (RMSprop's contributions covered 0.6-34 % of the output change, issue 17); an SGD option
    the rule does not model raised only when attributing. Now auto mode says so when the
    explainer is made, naming the optimizer; exact mode refuses it; checkpoint mode, asked
    for, runs quietly."""
    model, data, path = _short_run(optimizer_of, closure=closure)
    loss = torch.nn.CrossEntropyLoss()
    x, y = digits()
    with pytest.warns(pk.PkAttribWarning, match=named) as caught:
        explainer = pk.PathKernelInfluence(model, data, path, loss, show_progress=False)
    assert len(caught) == 1 and "checkpoint mode" in str(caught[0].message)
    assert "approximate" in str(caught[0].message) and caught[0].filename == __file__
    assert explainer.mode == "checkpoint"
    assert explainer.attribute(x[:2], target=y[:2]).diagnostics.mode == "checkpoint"
    with pytest.raises(pk.UnsupportedError, match=named):
        pk.PathKernelInfluence(model, data, path, loss, mode="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = pk.PathKernelInfluence(model, data, path, loss, mode="checkpoint")
    assert quiet.mode == "checkpoint"


def test_a_loss_whose_reduction_cannot_be_known_is_refused(recorded):
    with pytest.raises(pk.LossReductionError, match="loss_reduction='mean'"):
        make(recorded, loss_fn=F.cross_entropy)
    with pytest.raises(pk.LossReductionError, match="reduction='none'"):
        make(recorded, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    x, y = digits()
    by_function = make(recorded, loss_fn=F.cross_entropy, loss_reduction="mean")
    by_module = make(recorded)
    torch.testing.assert_close(
        by_function.attribute(x[:2], target=y[:2]).contributions,
        by_module.attribute(x[:2], target=y[:2]).contributions,
        rtol=0,
        atol=0,
    )


def test_training_data_as_a_dataloader(recorded):
    model, data, path = recorded
    x, y = digits()
    shuffled = DataLoader(data, batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffl"):
        pk.PathKernelInfluence(model, shuffled, path, torch.nn.CrossEntropyLoss())
    ordered = pk.PathKernelInfluence(
        model,
        DataLoader(data, batch_size=8),
        path,
        torch.nn.CrossEntropyLoss(),
        show_progress=False,
    )
    torch.testing.assert_close(
        ordered.attribute(x[:2], target=y[:2]).contributions,
        make(recorded).attribute(x[:2], target=y[:2]).contributions,
        rtol=0,
        atol=0,
    )


def test_top_k_returns_sorted_proponents_and_opponents(recorded):
    x, y = digits()
    dec = make(recorded).attribute(x[:3], target=y[:3])
    top = dec.top_k(4)
    order = dec.contributions.argsort(1, descending=True)
    assert torch.equal(top.proponents.indices, order[:, :4])
    assert torch.equal(top.opponents.indices, order.flip(1)[:, :4])
    assert (top.proponents.values[:, :-1] >= top.proponents.values[:, 1:]).all()
    assert (top.opponents.values <= 0).all()


def test_float32_loss_of_a_well_fitted_example_needs_no_extra_nodes():
    """Explaining a small loss computed from logits: the exact change f(w_s+1) − f(w_s)
    carries the logits' rounding, which no number of nodes removes. The adaptive rule must
    count it as rounding (stay at 2 nodes, no QuadratureWarning), not climb to 64 nodes."""
    import warnings

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:600], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:600])
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(
        data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    with pk.PathRecorder(model, optimizer) as recorder:
        for _ in range(20):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    best = losses.argsort()[:5]  # the best-fitted training examples

    def neg_loss(out, t):
        return -torch.nn.functional.cross_entropy(out, t, reduction="none")

    explainer = pk.PathKernelInfluence(model, data, recorder.path, loss_fn, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.QuadratureWarning)
        dec = explainer.attribute(x[best], target=y[best], output_fn=neg_loss)
    assert int(dec.diagnostics.nodes.max()) <= 4
    assert float(dec.relative_delta.abs().max()) < 1e-4
