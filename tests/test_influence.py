"""The Captum contract: influence(), top-k, self_influence(), TracInCP migration, layers=."""

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.influence import TracInCP
from captum.influence._utils.common import KMostInfluentialResults
from test_engine import OPTIMIZERS, digits, digits_mlp, layernorm_gelu, record, train_set
from torch.utils.data import DataLoader

import pk_attrib as pk
from pk_attrib.engine.scores import negative_loss
from pk_attrib.explain.influence import block_size

F64 = torch.float64


@pytest.fixture(scope="module", params=["sgd_0.1", "momentum_nesterov"])
def run(request):
    torch.manual_seed(20)
    model = digits_mlp(hidden=8)
    data = train_set(n=40)
    path = record(model, OPTIMIZERS[request.param](model.parameters()), data, batch_size=10)
    return model, data, path


class WhereReLU(torch.nn.Module):
    """max(x, 0) written with torch.where: a kink the adaptive quadrature does not split at."""

    def forward(self, x):
        return torch.where(x > 0, x, torch.zeros_like(x))


def explainer(run, **kwargs):
    model, data, path = run
    return pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False, **kwargs
    )


def test_influence_is_the_contribution_to_the_loss_decrease(run):
    x, y = digits()
    batch = (x[1500:1504], y[1500:1504])
    ex = explainer(run)
    assert isinstance(ex, pk.PathKernelInfluence)
    from captum.influence import DataInfluence

    assert isinstance(ex, DataInfluence)
    scores = ex.influence(batch)
    dec = ex.attribute(batch[0], batch[1], output_fn=negative_loss(torch.nn.CrossEntropyLoss()))
    torch.testing.assert_close(scores, dec.contributions, rtol=1e-12, atol=1e-15)
    assert scores.shape == (4, 40)
    # completeness in loss units: the scores sum to the loss decrease along the path
    model, data, path = run
    initial = digits_mlp(hidden=8)
    path.load_into(initial, 0)
    with torch.no_grad():
        before = F.cross_entropy(initial(batch[0]), batch[1], reduction="none")
        after = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    decrease = before - after
    torch.testing.assert_close(
        scores.sum(1) + dec.terms["weight_decay"] + dec.terms["unexplained"] + dec.delta,
        decrease,
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("proponents", [True, False])
@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
def test_streamed_top_k_equals_a_full_sort(run, proponents, mode):
    x, y = digits()
    batch = (x[1500:1505], y[1500:1505])
    full = explainer(run, mode=mode).influence(batch)
    tiny = explainer(run, mode=mode, memory_budget=5 * 7 * 8 * 4)  # blocks of 7 examples
    assert block_size(tiny, 5) == 7
    result = tiny.influence(batch, k=4, proponents=proponents)
    assert isinstance(result, KMostInfluentialResults)
    order = torch.sort(full, dim=1, descending=proponents)
    # (blocks may take other adaptive node counts: equal to the quadrature tolerance)
    torch.testing.assert_close(result.influence_scores, order.values[:, :4], rtol=1e-8, atol=1e-12)
    assert torch.equal(result.indices, order.indices[:, :4])


def test_dataloader_and_dataset_forms_agree(run):
    model, data, path = run
    x, y = digits()
    by_dataset = explainer(run).influence((x[1500:1506], y[1500:1506]))
    by_loaders = pk.PathKernelInfluence(
        model,
        DataLoader(data, batch_size=16),
        path,
        torch.nn.CrossEntropyLoss(),
        show_progress=False,
    ).influence(
        DataLoader(torch.utils.data.TensorDataset(x[1500:1506], y[1500:1506]), batch_size=4)
    )
    # other query batches may take other adaptive node counts: equal to its tolerance
    torch.testing.assert_close(by_loaders, by_dataset, rtol=1e-7, atol=1e-11)


def test_a_training_loader_is_read_as_it_batches_or_refused_when_it_cannot_be(run):
    """Scores are indexed by dataset index: a loader must yield every example once, in
    order (Captum would silently score another set); its collate_fn is applied (once
    ignored: scores 35 % off)."""
    model, data, path = run
    x, y = digits()
    queries = (x[1500:1504], y[1500:1504])
    kw = dict(quadrature=3, show_progress=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(data)  # 40

    def make(loader):
        return pk.PathKernelInfluence(model, loader, path, loss_fn, **kw)

    sampled = torch.utils.data.SubsetRandomSampler(range(10))
    for loader, said in [
        (DataLoader(data, batch_size=8, sampler=sampled), "shuffling sampler"),
        (DataLoader(data, batch_size=8, sampler=list(range(10))), "yields 10 examples of 40"),
        (DataLoader(data, batch_size=8, sampler=[1, 0, *range(2, n)]), "position 0 holds 1"),
        (DataLoader(data, batch_size=16, drop_last=True), "leaves out its last 8 examples"),
        (DataLoader(_Stream(data)), "a DataLoader over an IterableDataset"),
        (_Stream(data), "train_dataset is an IterableDataset"),
        (
            DataLoader(data, sampler=torch.utils.data.SequentialSampler(range(20))),
            "20 examples of 40",
        ),
    ]:
        with pytest.raises(ValueError, match=said):
            make(loader)
    whole = make(data).influence(queries)
    kept = make(DataLoader(data, batch_size=8, drop_last=True))  # 40 = 5 x 8: nothing dropped
    assert torch.equal(kept.influence(queries), whole)
    # (the halved inputs below are not what the path was trained on: the step check says so)
    warnings.simplefilter("ignore", pk.ReconstructionWarning)

    # a collate_fn that halves the inputs: the same as a dataset of halved inputs
    def collate(items):
        return torch.stack([a for a, _ in items]) * 0.5, torch.stack([b for _, b in items])

    halved = torch.utils.data.TensorDataset(data.tensors[0] * 0.5, data.tensors[1])
    by_collate = make(DataLoader(data, batch_size=8, collate_fn=collate)).influence(queries)
    by_dataset = make(halved).influence(queries)
    assert torch.equal(by_collate, by_dataset)
    assert not torch.allclose(by_collate, whole)
    # without batching (batch_size=None) the loader applies collate_fn to each example
    each = make(DataLoader(data, batch_size=None, collate_fn=lambda item: (item[0] * 0.5, item[1])))
    assert torch.equal(each.influence(queries), by_dataset)
    with pytest.raises(TypeError, match="collate_fn returns a dict"):
        make(DataLoader(data, batch_size=8, collate_fn=lambda items: {"x": items}))


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def check_self_influence_is_the_diagonal_and_selects(ex, data, rtol, atol):
    """Self-influence equals the influence diagonal; given training examples get their
    entries (to rtol/atol); an example outside the training set is refused. Returns it."""
    self_scores = ex.self_influence(score="contribution")
    torch.testing.assert_close(
        self_scores, ex.influence(data.tensors).diagonal(), rtol=1e-9, atol=1e-13
    )
    picked = torch.tensor([7, 3, 30])
    chosen = ex.self_influence(
        (data.tensors[0][picked], data.tensors[1][picked]), score="contribution"
    )
    torch.testing.assert_close(chosen, self_scores[picked], rtol=rtol, atol=atol)
    x, y = digits()
    with pytest.raises(ValueError, match="not in train_dataset"):
        ex.self_influence((x[1500:1501], y[1500:1501]), score="contribution")
    return self_scores


def test_exact_self_influence_is_the_diagonal_and_given_inputs_select_entries(run):
    model, data, path = run
    ex = explainer(run)
    self_scores = check_self_influence_is_the_diagonal_and_selects(ex, data, 1e-9, 1e-13)
    small_blocks = explainer(run, memory_budget=40_000)
    torch.testing.assert_close(
        small_blocks.self_influence(score="contribution"), self_scores, rtol=1e-9, atol=1e-13
    )


def test_checkpoint_self_influence_on_a_recorded_path_selects_entries_too(run):
    """On a recorded path (batches known), checkpoint mode weighs each example by its own
    batches: given inputs must get the same scores as in the whole set's (they once got
    every step at weight 1, 50-200x more), and the scores are the influence diagonal."""
    model, data, path = run
    ex = explainer(run, mode="checkpoint")
    check_self_influence_is_the_diagonal_and_selects(ex, data, 1e-12, 1e-15)


def test_plain_sgd_self_influence_integrates_to_the_same_tolerance_as_attribute(monkeypatch):
    """In float32 a well-fitted example's loss is tiny, and its logits' rounding exceeded
    the tolerance the plain-SGD self-influence gave each step (16 eps |f|, without the
    logits' scale or the step's share of rtol): steps climbed to 64 nodes (7x the time on
    the digits MLP), and those that stopped there raised no QuadratureWarning."""
    from pk_attrib.engine import quadrature

    torch.manual_seed(22)
    model = digits_mlp(hidden=16).float()
    x, y = digits()
    data = torch.utils.data.TensorDataset(x[:100].float(), y[:100])
    path = record(model, torch.optim.SGD(model.parameters(), lr=0.5), data, epochs=20)
    used = []
    integrate = quadrature.StepIntegrator.integrate

    def counting(self, *args, **kwargs):
        phi, q = integrate(self, *args, **kwargs)
        used.append(q)
        return phi, q

    monkeypatch.setattr(quadrature.StepIntegrator, "integrate", counting)
    ex = explainer((model, data, path))
    scores = ex.self_influence(score="contribution")
    assert len(used) == len(path) and max(used) <= 8  # (64 before)
    diagonal = ex.influence(data.tensors).diagonal()
    torch.testing.assert_close(scores, diagonal, rtol=1e-3, atol=1e-5)
    # a kink the rule cannot resolve is reported, as attribute() reports it
    relu = torch.nn.Sequential(torch.nn.Linear(64, 16), WhereReLU(), torch.nn.Linear(16, 10))
    relu_data = train_set(n=40)
    relu_path = record(relu.double(), torch.optim.SGD(relu.parameters(), lr=2.0), relu_data)
    with pytest.warns(pk.QuadratureWarning, match="reported in the scores"):
        explainer((relu, relu_data, relu_path), rtol=1e-12).self_influence(score="contribution")


@pytest.mark.parametrize("opt", ["adam", "adam_l2_amsgrad"])
def test_exact_self_influence_under_adam_is_the_diagonal(opt):
    torch.manual_seed(20)
    model = digits_mlp(hidden=8)
    data = train_set(n=30)
    path = record(model, OPTIMIZERS[opt](model.parameters()), data, batch_size=10)
    ex = explainer((model, data, path))
    diagonal = ex.influence(data.tensors).diagonal()
    torch.testing.assert_close(
        ex.self_influence(score="contribution"), diagonal, rtol=1e-9, atol=1e-13
    )
    assert float(diagonal.min()) > 0  # each example's own steps lowered its loss


def test_self_influence_of_given_inputs_casts_dtypes_and_refuses_ambiguous_copies(run):
    model, data, path = run
    ex = explainer(run)
    self_scores = ex.self_influence(score="contribution")
    x, y = data.tensors
    picked = torch.tensor([4, 11])
    # float32 inputs and int32 labels of float64 / int64 training examples: the same examples
    narrow = ex.self_influence((x[picked].float(), y[picked].int()), score="contribution")
    torch.testing.assert_close(narrow, self_scores[picked], rtol=1e-9, atol=1e-13)
    # a float64 query one part in 1e12 off its training example: not that example
    off = x[4:5].clone()
    off[0, 10] += 1e-12
    with pytest.raises(ValueError, match="not in train_dataset"):
        ex.self_influence((off, y[4:5]), score="contribution")
    lossy = (x[4:5].float() + 1e-3, y[4:5])
    with pytest.raises(ValueError, match=r"tensor 0 is torch\.float32, train_dataset's"):
        ex.self_influence(lossy, score="contribution")
    with pytest.raises(ValueError, match=r"shape \(10,\), train_dataset's first \(64,\)"):
        ex.self_influence((x[4:5, :10], y[4:5]), score="contribution")

    # a training set holding an example twice: its copies' exact self-influences differ
    torch.manual_seed(22)
    twice = torch.utils.data.TensorDataset(torch.cat([x[:20], x[3:4]]), torch.cat([y[:20], y[3:4]]))
    net = digits_mlp(hidden=8)
    twice_path = record(net, torch.optim.SGD(net.parameters(), lr=0.1), twice, batch_size=7)
    dup = explainer((net, twice, twice_path))
    both = dup.self_influence(score="contribution")[[3, 20]]
    assert abs(float(both[0] - both[1])) > 1e-6 * float(both.abs().max())
    with pytest.raises(ValueError, match=r"occurs 2 times in train_dataset \(indices 3, 20\)"):
        dup.self_influence((x[3:4], y[3:4]), score="contribution")
    torch.testing.assert_close(
        dup.self_influence((x[5:6], y[5:6]), score="contribution"),
        dup.self_influence(score="contribution")[5:6],
        rtol=1e-9,
        atol=1e-13,
    )


class _Counting(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        return self.data[i]


def test_self_influence_of_given_inputs_reads_the_training_set_by_content_once(run):
    model, data, path = run
    counting = _Counting(data)
    ex = explainer((model, counting, path))
    x, y = data.tensors
    reads = []
    for _ in range(2):
        before = counting.reads
        scores = ex.self_influence((x[[3, 9]], y[[3, 9]]), score="contribution")
        reads.append(counting.reads - before)
    # the first call indexed every example (+ item 0), and ran the step check once (it reads
    # every step's batch)
    checked = sum(len(step.indices) for step in path)
    assert reads[0] - reads[1] == len(data) + 1 + checked
    torch.testing.assert_close(
        scores, ex.self_influence(score="contribution")[[3, 9]], rtol=1e-9, atol=1e-13
    )


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "y": y}


class _WithIndex(_Dicts):
    def __getitem__(self, i):
        x, y = self.data[i]
        return x, y, i


def test_training_sets_of_another_layout_are_refused_naming_the_convention(run):
    model, data, path = run
    for wrong, said in [
        (_Dicts(data), "item 0 is a dict"),
        (_WithIndex(data), "has 3 parts, so the model was called with 2 inputs"),
    ]:
        with pytest.raises(TypeError, match=r"\(inputs\.\.\., label\)") as info:
            explainer((model, wrong, path))
        assert said in str(info.value)


def test_models_that_need_the_batch_or_drop_its_dimension_are_refused_saying_so(run):
    """Examples are evaluated one at a time. A model ending in .squeeze() returned a 0-dim
    output for one example (raw IndexError / len() errors deep in the sweep); BatchNorm
    without running statistics failed on a batch of one, and the message blamed the
    dataset's layout."""
    model, data, path = run

    class Squeezed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)[:, :1].squeeze()

    squeezed = Squeezed()
    final = {f"net.{k}": v for k, v in path.final.items()}
    squeezed.load_state_dict(final)
    line = pk.TrainingPath.from_checkpoints([final, final], [0.1, 0.1])
    with pytest.raises(ValueError, match="returns a 0-dim output"):
        pk.PathKernelInfluence(squeezed, data, line, torch.nn.MSELoss(), show_progress=False)

    class TokensFlat(torch.nn.Module):  # (B, 2·32) -> (2B, 10): two rows per example
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(model)  # (trained below: the fixture's stays as it is)

        def forward(self, x):
            return self.net(x.reshape(-1, 2, 32).repeat(1, 1, 2).reshape(-1, 64))

    flat = TokensFlat()
    flat.load_state_dict({f"net.{k}": v for k, v in path.final.items()})
    line = pk.TrainingPath.from_checkpoints([flat.state_dict()] * 2, [0.1, 0.1])

    def pairs_loss(out, lab):
        return F.cross_entropy(out.reshape(-1, 20), lab)

    pk.PathKernelInfluence(  # not refused: its output for one example is (2, 10)
        flat, data, line, pairs_loss, loss_reduction="mean", show_progress=False
    )
    # recorded: attribute(output_fn=...) reads such outputs as they are; influence() reads
    # each example's loss from its rows, and says it cannot (it crashed deep inside)
    recorded = record(flat, torch.optim.SGD(flat.parameters(), lr=0.1), data, loss_fn=pairs_loss)
    ex = pk.PathKernelInfluence(
        flat, data, recorded, pairs_loss, loss_reduction="mean", show_progress=False
    )
    x, y = data.tensors
    dec = ex.attribute(
        x[:3], target=y[:3], output_fn=lambda out, t: out.reshape(-1, 20).gather(1, t[:, None])
    )
    assert float(dec.relative_delta.max()) < 1e-8
    with pytest.raises(ValueError, match=r"has shape \(6, 10\): return outputs with the batch"):
        ex.influence((x[:3], y[:3]))

    batch_stats = torch.nn.Sequential(
        torch.nn.BatchNorm1d(64, track_running_stats=False, dtype=F64), model
    )
    final = {f"1.{k}": v for k, v in path.final.items()}
    final.update({f"0.{k}": v.detach() for k, v in batch_stats[0].named_parameters()})
    line = pk.TrainingPath.from_checkpoints([final, final], [0.1, 0.1])
    with pytest.raises(TypeError, match="needs the rest of the batch") as info:
        explainer((batch_stats, data, line))
    assert "Expected more than 1 value per channel" in str(info.value)


class _Ragged(torch.utils.data.Dataset):
    """Items of several shapes, Python-float labels (collated to float64 in training)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], 0.1 * i


def test_locating_examples_matches_them_as_training_collated_them():
    from pk_attrib.explain.data import locate

    x = torch.randn(6, 3, dtype=F64)
    x[2, 1] = float("nan")  # NaN matches NaN
    data = torch.utils.data.TensorDataset(x, torch.arange(6))
    assert torch.equal(locate(data, (x[[2, 4]], torch.tensor([2, 4]))), torch.tensor([2, 4]))
    assert locate(data, (x[:0], torch.arange(0))).shape == (0,)
    # float32 training inputs: a float64 query finds its example when the cast is exact,
    # and is refused when float32 cannot hold it
    narrow = torch.utils.data.TensorDataset(x.float(), torch.arange(6))
    assert torch.equal(
        locate(narrow, (x[[1]].float().double(), torch.tensor([1]))), torch.tensor([1])
    )
    finer = x[[1]].float().double()
    finer[0, 0] += 1e-12
    with pytest.raises(ValueError, match=r"not in train_dataset \(tensor 0 is torch\.float64"):
        locate(narrow, (finer, torch.tensor([1])))
    # items of several shapes, with Python-float labels, queried through a DataLoader
    ragged = _Ragged([torch.randn(2 + i % 3) for i in range(6)])
    assert torch.equal(locate(ragged, DataLoader(ragged, batch_size=1)), torch.arange(6))


def _checkpoints(tmp_path, n=40):
    torch.manual_seed(21)
    model = digits_mlp(hidden=8)
    data = train_set(n=n)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    files = []
    for epoch in range(3):
        for xb, yb in DataLoader(data, batch_size=10, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        files.append(str(tmp_path / f"ckpt{epoch}.pt"))
        torch.save({"model_state_dict": model.state_dict(), "lr": 0.1 * (epoch + 1)}, files[-1])
    return model, data, files


def load_checkpoint(net, file):
    state = torch.load(file, weights_only=True)
    net.load_state_dict(state["model_state_dict"])
    return state["lr"]


def tracincp_workflow(cls, model, data, files, layers=None):
    """A script written for Captum's TracInCP; only the class changes."""
    x, y = digits()
    influencer = cls(
        model,
        data,
        checkpoints=files,
        checkpoints_load_func=load_checkpoint,
        layers=layers,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
        test_loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
    )
    scores = influencer.influence((x[1500:1503], y[1500:1503]))
    top = influencer.influence((x[1500:1503], y[1500:1503]), k=3, proponents=True)
    self_scores = influencer.self_influence(show_progress=False)
    return scores, top, self_scores


class _TiedHead(torch.nn.Module):
    """LayerNorm (not a Linear layer) and, with ``tie``, a Linear weight used twice."""

    def __init__(self, tie):
        super().__init__()
        self.tie = tie
        self.inner = torch.nn.Linear(64, 10)
        self.norm = torch.nn.LayerNorm(10)
        self.head = torch.nn.Linear(10, 10)

    def forward(self, x):
        h = self.norm(torch.tanh(self.inner(x)))
        if self.tie:  # the head's weight also outside its module
            h = h + torch.tanh(h @ self.head.weight.T)
        return self.head(h)


@pytest.mark.parametrize("tie", [False, True], ids=["layer_factors", "tied_weights"])
def test_checkpoint_self_influence_is_the_learning_rate_weighted_squared_gradient(tie):
    """Σ_k η_k ‖∇ℓ_i(w_k)‖² against per-example gradients by backward(), with Linear layers
    read from their factors (once: the whole (n, d) gradient matrix per checkpoint, 3.7-4.9x
    slower than TracInCP), and a tied weight, where factors do not rebuild the gradient."""
    from pk_attrib.testing import per_example_gradients

    torch.manual_seed(23)
    model = _TiedHead(tie).to(F64)
    data = train_set(n=25)
    states, rates = [], [0.3, 0.1]
    for _ in rates:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    path = pk.TrainingPath.from_checkpoints(states, rates)
    ex = explainer((model, data, path), mode="checkpoint")
    names = path.param_names
    expected = sum(
        lr * per_example_gradients(model, names, torch.cat([st[n].reshape(-1) for n in names]),
                                   data.tensors, torch.nn.CrossEntropyLoss()).pow(2).sum(1)
        for st, lr in zip(states, rates, strict=True)
    )  # fmt: skip
    torch.testing.assert_close(
        ex.self_influence(score="contribution"), expected, rtol=1e-10, atol=1e-14
    )

    def branching(out, lab):  # data-dependent control flow: vmap cannot trace it
        loss = F.cross_entropy(out, lab, reduction="sum")
        return loss if float(loss.detach()) > 0 else 0 * loss

    branchy = pk.PathKernelInfluence(
        model, data, path, branching, loss_reduction="sum", mode="checkpoint",
        show_progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pk.VectorizationWarning)  # (said once, and true)
        branchy_scores = branchy.self_influence(score="contribution")
    torch.testing.assert_close(branchy_scores, expected, rtol=1e-10, atol=1e-14)


def test_a_tracincp_script_runs_unchanged_against_pk_attrib(tmp_path):
    model, data, files = _checkpoints(tmp_path)
    captum = tracincp_workflow(TracInCP, model, data, files)
    ours = tracincp_workflow(pk.PathKernelInfluence, model, data, files)
    torch.testing.assert_close(ours[0], captum[0], rtol=1e-9, atol=1e-12)
    assert torch.equal(ours[1].indices, captum[1].indices)
    torch.testing.assert_close(
        ours[1].influence_scores, captum[1].influence_scores, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(ours[2], captum[2], rtol=1e-9, atol=1e-12)


def test_checkpoints_are_read_as_tracincp_reads_them(tmp_path):
    """In natural order from a folder or a list of names ("epoch-9" before "epoch-10": once
    alphabetical, so the path ended at the wrong checkpoint), and as objects handed to
    checkpoints_load_func (once converted to str)."""
    model, data, files = _checkpoints(tmp_path)
    folder = tmp_path / "named"
    folder.mkdir()
    for epoch, file in zip((9, 10, 11), files, strict=True):
        (folder / f"epoch-{epoch}.pt").write_bytes(Path(file).read_bytes())
    kw = dict(checkpoints_load_func=load_checkpoint, show_progress=False)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    for given in (str(folder), [str(folder / f"epoch-{e}.pt") for e in (11, 9, 10)]):
        ex = pk.PathKernelInfluence(model, data, checkpoints=given, loss_fn=loss_fn, **kw)
        assert ex.path.learning_rates[:, 0].tolist() == pytest.approx([0.1, 0.2, 0.3])
        final = dict(model.named_parameters())
        assert all(torch.equal(final[n], t) for n, t in ex.path.final.items())

    def load_object(net, state):
        net.load_state_dict(state["model_state_dict"])
        return state["lr"]

    states = [torch.load(f, weights_only=True) for f in files]
    by_objects = pk.PathKernelInfluence(
        model, data, checkpoints=states, checkpoints_load_func=load_object, loss_fn=loss_fn
    )
    by_files = pk.PathKernelInfluence(model, data, checkpoints=files, loss_fn=loss_fn, **kw)
    x, y = digits()
    queries = (x[1500:1503], y[1500:1503])
    assert torch.equal(by_objects.influence(queries), by_files.influence(queries))


def test_checkpoints_keep_their_batchnorm_statistics_like_tracincp(tmp_path):
    """TracInCP loads whole checkpoints, buffers included; gradients at checkpoint k once
    used the final model's BatchNorm statistics instead (44 % off at the first one)."""
    torch.manual_seed(22)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    ).double()
    data = train_set(n=40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    files = []
    for epoch in range(3):
        model.train()
        for xb, yb in DataLoader(data, batch_size=10, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        files.append(str(tmp_path / f"ckpt{epoch}.pt"))
        torch.save({"model_state_dict": model.state_dict(), "lr": 0.1}, files[-1])
    model.eval()
    first = torch.load(files[0], weights_only=True)["model_state_dict"]["1.running_mean"]
    assert not torch.allclose(first, model[1].running_mean, rtol=0.1)  # the statistics moved
    captum = tracincp_workflow(TracInCP, model, data, files)
    ours = tracincp_workflow(pk.PathKernelInfluence, model, data, files)
    torch.testing.assert_close(ours[0], captum[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[2], captum[2], rtol=1e-9, atol=1e-12)
    assert torch.equal(
        model[1].running_mean, torch.load(files[2])["model_state_dict"]["1.running_mean"]
    )  # the model passed is left as it was


def test_aggregate_influence_and_tracincps_other_arguments_match_captum(tmp_path, run):
    model, data, files = _checkpoints(tmp_path)
    x, y = digits()
    queries = (x[1500:1505], y[1500:1505])
    kw = dict(
        checkpoints=files,
        checkpoints_load_func=load_checkpoint,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
    )
    captum, ours = TracInCP(model, data, **kw), pk.PathKernelInfluence(model, data, **kw)
    summed = ours.influence(queries, aggregate=True)
    assert summed.shape == (1, len(data))
    torch.testing.assert_close(
        summed, captum.influence(queries, aggregate=True), rtol=1e-9, atol=1e-12
    )
    for proponents in (True, False):
        theirs = captum.influence(queries, k=4, proponents=proponents, aggregate=True)
        mine = ours.influence(queries, 4, proponents, False, True)  # positional, as Captum
        assert torch.equal(mine.indices, theirs.indices) and mine.indices.shape == (1, 4)
        torch.testing.assert_close(mine.influence_scores, theirs.influence_scores)
    torch.testing.assert_close(
        ours.self_influence(outer_loop_by_checkpoints=True), ours.self_influence(), rtol=0, atol=0
    )
    assert ours.checkpoints == captum.checkpoints == files
    assert ours.batch_size == 8 and ours.checkpoints_load_func is load_checkpoint
    # exact mode: the sum of the full matrix's rows, streamed over blocks of the training set
    exact = explainer(run, memory_budget=4_000)
    full = exact.influence(queries)
    torch.testing.assert_close(
        exact.influence(queries, aggregate=True), full.sum(0, keepdim=True), rtol=1e-12, atol=0
    )


def test_checkpoint_mode_leaves_out_parameters_a_step_skipped():
    """every=2 (checkpoint mode) with the first layer held (grad set to None): it never
    moves, so it takes no part (it was once credited: the sum 8x the output change)."""
    torch.manual_seed(23)
    model = digits_mlp(hidden=6)
    data = train_set(n=40)
    x, y = data.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer, every=2) as recorder:
        for s in range(8):
            idx = torch.arange(s * 5, s * 5 + 5)
            recorder.record_batch(idx)
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            model[0].weight.grad = model[0].bias.grad = None
            optimizer.step()
    assert recorder.path.step(0).skipped == {"0.weight", "0.bias"}
    q = digits()
    queries = (q[0][1500:1503], q[1][1500:1503])
    kw = dict(mode="checkpoint", show_progress=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    held = pk.PathKernelInfluence(model, data, recorder.path, loss_fn, **kw)
    trained = pk.PathKernelInfluence(model, data, recorder.path, loss_fn, layers=["2"], **kw)
    torch.testing.assert_close(
        held.influence(queries), trained.influence(queries), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        held.self_influence(score="contribution"),
        trained.self_influence(score="contribution"),
        rtol=1e-12,
        atol=0,
    )


def test_layers_restrict_the_gradients_like_tracincp(tmp_path):
    model, data, files = _checkpoints(tmp_path)
    captum = tracincp_workflow(TracInCP, model, data, files, layers=["2"])
    ours = tracincp_workflow(pk.PathKernelInfluence, model, data, files, layers=["2"])
    torch.testing.assert_close(ours[0], captum[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[2], captum[2], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="not modules"):
        tracincp_workflow(pk.PathKernelInfluence, model, data, files, layers=["nope"])
    with pytest.raises(TypeError, match="list of module names"):  # once: the whole model
        tracincp_workflow(pk.PathKernelInfluence, model, data, files, layers="2")
    # the model itself ("") holds every parameter: the same as no layers=
    whole = tracincp_workflow(pk.PathKernelInfluence, model, data, files, layers=[""])
    every = tracincp_workflow(pk.PathKernelInfluence, model, data, files)
    torch.testing.assert_close(whole[0], every[0], rtol=0, atol=0)


def test_layers_in_exact_mode_are_approximate_and_delta_says_by_how_much(run):
    x, y = digits()
    full = explainer(run).attribute(x[1500:1503], target=y[1500:1503])
    last = explainer(run, layers=["2"]).attribute(x[1500:1503], target=y[1500:1503])
    assert float(full.relative_delta.max()) < 1e-6
    assert float(last.relative_delta.min()) > 1e-3  # the first layer's share is in delta
    torch.testing.assert_close(
        last.bias + last.contributions.sum(1) + last.delta, last.prediction, rtol=0, atol=1e-12
    )


def test_top_k_over_a_million_training_examples_stays_in_a_fixed_memory_bound():
    """influence(k=...) never builds the (n_test, n_train) matrix (here 80 MB of float64)."""
    script = textwrap.dedent(
        """
        import sys, torch
        import pk_attrib as pk

        def status(field):  # kB, from the kernel's accounting of this process
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])

        torch.manual_seed(0)
        n = 1_000_000
        xs = torch.randn(n, 4, dtype=torch.float64)
        ys = torch.randint(0, 2, (n,))
        data = torch.utils.data.TensorDataset(xs, ys)
        model = torch.nn.Linear(4, 2).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = torch.nn.CrossEntropyLoss()
        with pk.PathRecorder(model, optimizer, dataset_size=n) as recorder:
            for s in range(20):
                idx = torch.randint(0, n, (64,))
                recorder.record_batch(idx)
                optimizer.zero_grad()
                loss_fn(model(xs[idx]), ys[idx]).backward()
                optimizer.step()
        explainer = pk.PathKernelInfluence(
            model, data, recorder.path, loss_fn, show_progress=False, memory_budget=4 << 20
        )
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current one
        before = status("VmRSS")
        queries = (xs[:10] + 0.1, ys[:10])
        if sys.argv[1] == "topk":
            top = explainer.influence(queries, k=5)
            assert top.indices.shape == (10, 5)
        else:
            full = explainer.influence(queries)
            assert full.shape == (10, n)
        print((status("VmHWM") - before) / 1024)
        """
    )
    growth = {}
    for kind in ("topk", "full"):
        out = subprocess.run(
            [sys.executable, "-c", script, kind], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr
        growth[kind] = float(out.stdout.split()[-1])  # MiB of peak RSS added by influence()
    assert growth["full"] > 60, growth  # the full matrix really is big ...
    assert growth["topk"] < 30, growth  # ... and streaming top-k stays far below it


def _loss_grad(model, w: dict, x, y) -> torch.Tensor:
    """∇_w ℓ(x, y) at parameters w, flattened in the model's parameter order, (d,)."""
    params = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x[None],)), y[None])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def test_cosine_scores_are_contributions_over_their_cauchy_schwarz_bound_in_checkpoint_mode(
    tmp_path,
):
    """TracIn's cosine by hand: Σ_k η_k q_k·g_k / sqrt(Σ_k η_k² ‖q_k‖² · Σ_k ‖g_k‖²)."""
    torch.manual_seed(22)
    model = layernorm_gelu(hidden=6)  # Linear layers (factor path) and LayerNorm (the rest)
    data = train_set(n=12)
    files, lrs = [], [0.3, 0.2, 0.1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        for xb, yb in DataLoader(data, batch_size=4):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        files.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    path = pk.TrainingPath.from_checkpoints(files, lrs)
    x, y = digits()
    queries = (x[1500:1503], y[1500:1503])
    ex = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), mode="checkpoint", show_progress=False
    )
    cosine = ex.influence(queries, score="cosine")
    q = [[_loss_grad(model, w, queries[0][i], queries[1][i]) for w in files] for i in range(3)]
    g = [[_loss_grad(model, w, *data[j]) for w in files] for j in range(12)]
    expected = torch.zeros(3, 12, dtype=F64)
    for i in range(3):
        for j in range(12):
            dot = sum(lr * (q[i][k] @ g[j][k]) for k, lr in enumerate(lrs))
            query = sum(lr**2 * (q[i][k] @ q[i][k]) for k, lr in enumerate(lrs))
            train = sum(g[j][k] @ g[j][k] for k in range(3))
            expected[i, j] = dot / (query * train).sqrt()
    torch.testing.assert_close(cosine, expected, rtol=1e-10, atol=1e-12)
    raw = ex.influence(queries)
    assert not torch.allclose(raw.argsort(1), cosine.argsort(1))  # a different ranking
    top = ex.influence(queries, k=5, score="cosine", proponents=False)
    order = torch.sort(cosine, dim=1)
    torch.testing.assert_close(top.influence_scores, order.values[:, :5])
    assert torch.equal(top.indices, order.indices[:, :5])


@pytest.mark.parametrize("quadrature", ["left", "adaptive"])
def test_cosine_in_exact_mode_finds_duplicates_and_matches_the_closed_form(quadrature):
    """Plain SGD with the left endpoint: c_ij = Σ_{s∋j} κ η ∇ℓ_i(w_s)·g_j(w_s), the bound's
    sides are Σ_{s∋j} κ η² ‖∇ℓ_i(w_s)‖² and Σ_{s∋j} κ ‖g_j(w_s)‖², and a training copy of a
    query has cosine 1 exactly (≈ 1 with the exact, adaptive quadrature)."""
    torch.manual_seed(23)
    model = digits_mlp(hidden=8)
    x, y = digits()
    copies = torch.arange(1500, 1504)
    data = torch.utils.data.TensorDataset(
        torch.cat([x[:36], x[copies]]), torch.cat([y[:36], y[copies]])
    )
    path = record(model, torch.optim.SGD(model.parameters(), lr=0.2), data, epochs=3)
    queries = (x[copies], y[copies])
    ex = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), quadrature=quadrature, show_progress=False
    )
    cosine = ex.influence(queries, score="cosine")
    duplicates = cosine[torch.arange(4), torch.arange(36, 40)]
    assert torch.equal(cosine.argmax(1), torch.arange(36, 40))
    if quadrature == "adaptive":
        assert duplicates.min() > 0.99  # the path average of the gradient, not w_s's
        return
    torch.testing.assert_close(duplicates, torch.ones(4, dtype=F64), rtol=1e-12, atol=0)
    dot, query, train = (
        torch.zeros(4, 40, dtype=F64),
        torch.zeros(4, 40, dtype=F64),
        torch.zeros(40, dtype=F64),
    )
    for s in range(len(path)):
        step = path.step(s)
        kappa = 1.0 / len(step.indices)
        qs = torch.stack(
            [_loss_grad(model, step.params, *pair) for pair in zip(*queries, strict=True)]
        )
        for j in step.indices.tolist():
            gj = _loss_grad(model, step.params, *data[j])
            dot[:, j] += kappa * 0.2 * (qs @ gj)
            query[:, j] += kappa * 0.04 * (qs * qs).sum(1)
            train[j] += kappa * (gj @ gj)
    torch.testing.assert_close(ex.influence(queries), dot, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(cosine, dot / (query * train).sqrt(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="score='angle'"):
        ex.influence(queries, score="angle")


def test_cosine_neither_underflows_nor_overflows_in_float32():
    from pk_attrib.engine.scores import cosine

    for energy in (1e-24, 1e20):  # the product of the two sides would be 0 or inf
        c = torch.tensor([[energy, -energy / 2]], dtype=torch.float32)
        sides = torch.full((1, 2), energy, dtype=torch.float32)
        got = cosine(c, sides, torch.full((2,), energy, dtype=torch.float32))
        torch.testing.assert_close(got, torch.tensor([[1.0, -0.5]]))
    zero = cosine(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1))
    assert zero.item() == 0.0  # an example no step used: no direction, score 0


def test_an_empty_query_batch_gives_empty_scores(run):
    x, y = digits()
    ex = explainer(run)
    assert explainer(run).influence((x[:0], y[:0])).shape == (0, 40)
    top = ex.influence((x[:0], y[:0]), k=3, score="cosine")
    assert top.indices.shape == (0, 3) and top.influence_scores.shape == (0, 3)


def test_a_model_with_two_inputs_is_explained_with_its_logit_target():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 6), torch.nn.Linear(32, 6)
            self.head = torch.nn.Linear(6, 10)

        def forward(self, x1, x2):
            return self.head(torch.tanh(self.a(x1) + self.b(x2)))

    torch.manual_seed(24)
    model = TwoInputs().to(F64)
    x, y = digits()
    data = torch.utils.data.TensorDataset(x[:30, :32], x[:30, 32:], y[:30])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer) as recorder:
        for x1, x2, labels in recorder.watch(DataLoader(data, batch_size=10)):
            optimizer.zero_grad()
            F.cross_entropy(model(x1, x2), labels).backward()
            optimizer.step()
    ex = pk.PathKernelInfluence(
        model, data, recorder.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    queries, target = (x[1500:1503, :32], x[1500:1503, 32:]), y[1500:1503]
    dec = ex.attribute(queries, target)  # was: TypeError, forward() missing x2
    with torch.no_grad():
        logits = model(*queries)[torch.arange(3), target]
    torch.testing.assert_close(dec.prediction, logits, rtol=1e-12, atol=1e-12)
    assert float(dec.relative_delta.max()) < 1e-6


def test_per_example_losses_are_each_row_alone_vectorized_or_not():
    """negative_loss: −loss_fn(row) per row, in one vmap call when that gives the same numbers."""
    from pk_attrib.engine.scores import negative_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (7,), generator=g)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    # a class-weighted mean over a batch of one is that row's unweighted loss
    expected = F.cross_entropy(logits, labels, reduction="none")
    got = negative_loss(torch.nn.CrossEntropyLoss(weight=weight))(logits, labels)
    torch.testing.assert_close(got, -expected, rtol=1e-15, atol=0)
    # a mean over a row's elements (multi-dimensional targets)
    targets = torch.randn(7, 4, generator=g, dtype=torch.float64)
    got = negative_loss(torch.nn.MSELoss())(logits, targets)
    torch.testing.assert_close(got, -((logits - targets) ** 2).mean(1), rtol=1e-15, atol=0)

    traced = []

    def plain(out, y):  # vectorized after the first call's check: one call per evaluation
        traced.append(len(out))
        return F.cross_entropy(out, y)

    fn = negative_loss(plain)
    torch.testing.assert_close(fn(logits, labels), -expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(fn(logits, labels), -expected, rtol=1e-15, atol=0)
    assert traced == [1] + [1] * 7 + [1]

    # a row whose loss is not finite cannot decide (and leaves the NaN check to the engine);
    # a huge row does not widen the tolerance of the others
    traced.clear()
    shifted = []

    def off_by_one_under_vmap(out, y):
        loss = F.cross_entropy(out, y, reduction="sum")
        shifted.append(1)
        return loss + (1.0 if len(shifted) == 9 else 0.0)  # the vmap call of the 2nd use

    fn = negative_loss(off_by_one_under_vmap)
    bad = logits.clone()
    bad[0] = float("nan")
    assert torch.isnan(fn(bad, labels)[0])  # 1 vmap + 7 row calls, still undecided
    big = logits.clone()
    big[0, 0] = 1e300
    calls_before = len(shifted)
    got = fn(big, labels)  # decides now: the vmap values of the other rows are off by 1
    assert len(shifted) == calls_before + 1 + 7
    ref = F.cross_entropy(big, labels, reduction="none")
    torch.testing.assert_close(got, -ref, rtol=1e-15, atol=0)

    def branching(out, y):  # vmap cannot trace a data-dependent branch: row by row
        loss = F.cross_entropy(out, y)
        return loss * 2 if loss.item() > 1.0 else loss

    row_losses = expected * torch.where(expected > 1.0, 2.0, 1.0)
    fn = negative_loss(branching)
    for _ in range(2):
        torch.testing.assert_close(fn(logits, labels), -row_losses, rtol=1e-15, atol=0)

    calls = []

    def counting(out, y):  # other numbers when called once for all rows: checked, row by row
        calls.append(len(out))
        return F.cross_entropy(out, y, reduction="sum") * len(calls)

    fn = negative_loss(counting)
    first = fn(logits, labels)  # vmap (1 call), then the 7 row calls of the check
    assert calls == [1] + [1] * 7
    torch.testing.assert_close(first, -expected * torch.arange(2, 9), rtol=1e-15, atol=0)
    calls.clear()
    fn(logits, labels)
    assert calls == [1] * 7  # row by row from then on


class _Halves(torch.utils.data.Dataset):
    """Digits as ((left half, right half), label) or ({"a": left, "b": right}, label)."""

    def __init__(self, data, as_dict):
        self.data, self.as_dict = data, as_dict

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        halves = (x[:32], x[32:])
        return (dict(zip("ab", halves, strict=True)) if self.as_dict else halves), y


class _NestedNet(torch.nn.Module):
    """The digits MLP over nested inputs, returning (logits, hidden) or a dict of them."""

    def __init__(self, net, as_dict):
        super().__init__()
        self.net, self.as_dict = net, as_dict

    def forward(self, halves):
        parts = [halves["a"], halves["b"]] if self.as_dict else list(halves)
        hidden = torch.tanh(self.net[0](torch.cat(parts, 1)))
        logits = self.net[2](hidden)
        return {"logits": logits, "hidden": hidden} if self.as_dict else (logits, hidden)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuples", "dicts"])
def test_nested_inputs_and_tuple_or_dict_outputs_give_the_flat_models_numbers(as_dict):
    """Items ((x1, x2), y) or ({"a": x1, "b": x2}, y) and a model returning (logits, hidden)
    (or a dict) follow Captum's convention, but were refused ("Could not infer dtype of
    dict"), and influence / self_influence / kernel / checkpoint mode crashed on tuple
    outputs. The same network on the flat digits gives the numbers to match."""
    torch.manual_seed(21)
    flat_model = digits_mlp(hidden=6)
    nested = _NestedNet(copy.deepcopy(flat_model), as_dict)
    flat_data = train_set(n=30)
    nested_data = _Halves(flat_data, as_dict)
    paths = []
    for model, data, logits in [
        (flat_model, flat_data, lambda out: out),
        (nested, nested_data, (lambda out: out["logits"]) if as_dict else (lambda out: out[0])),
    ]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        loader = DataLoader(data, batch_size=10)  # in order: the same batches for both
        with pk.PathRecorder(model, optimizer) as recorder:
            for _ in range(2):
                for x, y in recorder.watch(loader):
                    optimizer.zero_grad()
                    F.cross_entropy(logits(model(x)), y).backward()
                    optimizer.step()
        paths.append(recorder.path)
    unpack = (lambda out: out["logits"]) if as_dict else (lambda out: out[0])
    x, y = digits()
    queries, labels = x[1500:1503], y[1500:1503]
    halves = (queries[:, :32], queries[:, 32:])
    nested_queries = dict(zip("ab", halves, strict=True)) if as_dict else halves

    def nested_loss(out, lab):
        return F.cross_entropy(unpack(out), lab)

    def nested_logit(out, target):
        return unpack(out).gather(1, target[:, None])[:, 0]

    loss = torch.nn.CrossEntropyLoss()
    flat = pk.PathKernelInfluence(flat_model, flat_data, paths[0], loss, show_progress=False)
    other = pk.PathKernelInfluence(
        nested, nested_data, paths[1], nested_loss, loss_reduction="mean", show_progress=False
    )
    expected = flat.attribute(queries, target=labels, kernel=True)
    got = other.attribute((nested_queries,), target=labels, output_fn=nested_logit, kernel=True)
    torch.testing.assert_close(got.contributions, expected.contributions, rtol=1e-9, atol=1e-13)
    # the kernel has a column per output number: the 10 logits, then the 6 hidden units
    # (which the loss does not read: weight 0)
    assert got.kernel.shape == (3, 30, 16)
    torch.testing.assert_close(got.kernel[..., :10], expected.kernel, rtol=1e-9, atol=1e-13)
    assert float(got.weights[..., 10:].abs().max()) == 0.0
    assert got.diagnostics.max_reconstruction_error < 1e-10
    torch.testing.assert_close(
        other.influence((nested_queries, labels)),
        flat.influence((queries, labels)),
        rtol=1e-9,
        atol=1e-13,
    )
    every = flat.self_influence(score="contribution")
    torch.testing.assert_close(
        other.self_influence(score="contribution"), every, rtol=1e-9, atol=1e-13
    )
    some = [nested_data[i] for i in (4, 17)]
    given = torch.utils.data.default_collate(some)
    torch.testing.assert_close(
        other.self_influence(tuple(given), score="contribution"), every[[4, 17]]
    )
    if as_dict:  # the keys in another order find the same examples
        reordered = ({"b": given[0]["b"], "a": given[0]["a"]}, given[1])
        torch.testing.assert_close(
            other.self_influence(reordered, score="contribution"), every[[4, 17]]
        )
    # a training DataLoader with its own collate_fn over nested items (once: items were
    # read with t[0] on each part, a dict key or the first half)
    loader = DataLoader(nested_data, batch_size=7, collate_fn=torch.utils.data.default_collate)
    from_loader = pk.PathKernelInfluence(
        nested, loader, paths[1], nested_loss, loss_reduction="mean", show_progress=False
    )
    torch.testing.assert_close(
        from_loader.self_influence(score="contribution"), every, rtol=1e-9, atol=1e-13
    )
    # TracIn on the same path (checkpoint mode) agrees too
    flat_cp = pk.PathKernelInfluence(
        flat_model, flat_data, paths[0], loss, mode="checkpoint", show_progress=False
    )
    other_cp = pk.PathKernelInfluence(
        nested,
        nested_data,
        paths[1],
        nested_loss,
        loss_reduction="mean",
        mode="checkpoint",
        show_progress=False,
    )
    torch.testing.assert_close(
        other_cp.influence((nested_queries, labels)),
        flat_cp.influence((queries, labels)),
        rtol=1e-9,
        atol=1e-13,
    )
