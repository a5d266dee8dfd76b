"""The layer route of exact mode: per-example gradients of Linear, Conv1D, Embedding and
Conv2d layers held as their factors (`engine.example_grads.LayerGrads`), never formed, give
the dense route's numbers: dot products, weighted sums and norms against torch.func's
per-example gradients, and whole decompositions against the float64 reference."""

import copy
from types import SimpleNamespace

import pytest
import torch
from _gpt import TinyGPT2, lm_loss
from test_models import SmallResNet, train
from torch.utils.data import TensorDataset

import pk_attrib as pk
import pk_attrib.engine.example_grads as example_grads
from pk_attrib.engine.example_grads import DenseGrads, StepGrads
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.testing import reference_decomposition

F64 = torch.float64
EPS = torch.finfo(F64).eps


def functional(model):
    named = dict(model.named_parameters())
    return FunctionalModel(model, list(named), {n: p.shape for n, p in named.items()}, F64)


def gpt_case():
    torch.manual_seed(80)
    model = TinyGPT2().to(F64).eval()
    ids = torch.randint(0, 50, (6, 8))
    return model, TensorDataset(ids, ids), lm_loss()


def resnet_case():
    torch.manual_seed(81)
    model = SmallResNet().to(F64).eval()
    x, y = torch.randn(6, 2, 8, 8, dtype=F64), torch.randint(0, 3, (6,))
    return model, TensorDataset(x, y), torch.nn.CrossEntropyLoss()


def mlp_case():
    torch.manual_seed(82)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=False)
    ).to(F64)
    x, y = torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    return model, TensorDataset(x, y), torch.nn.CrossEntropyLoss()


@pytest.mark.parametrize("case", [gpt_case, resnet_case, mlp_case])
def test_layer_factors_give_the_per_example_gradients_products(case, monkeypatch):
    """Against the dense (m, d) gradients of torch.func: both sum the same products in
    another order, so they differ by at most d·eps of the sum of the products' sizes."""
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 0)
    monkeypatch.setattr(example_grads, "WHOLE_MODELS_ONLY", False)
    model, data, loss_fn = case()
    fm = functional(model)
    w = fm.flatten(dict(model.named_parameters())).detach()
    batch_of = lambda idx: fm.cast(data[idx])  # noqa: E731
    chooser = StepGrads(fm, loss_fn, batch_of, len(data))
    step = SimpleNamespace(params=dict(model.named_parameters()), indices=torch.arange(4))
    assert chooser.by_layer(step)
    indices = torch.tensor([5, 0, 3, 2])
    held = chooser.layer_grads(w, indices)
    dense = DenseGrads(fm.loss_grads(w, batch_of(indices), loss_fn))
    g = dense.grads
    v = torch.randn(3, fm.d_active, dtype=F64)
    kappa = torch.rand(4, dtype=F64)
    d = fm.d_active
    # the products' sizes: the same factors at their absolute values. A gradient that sums
    # to zero over positions (GPT's key bias: softmax ignores a shift of all logits) is
    # rounding residue of its terms' size, which |g| would not bound
    sizes = _at_their_sizes(held)
    bound = d * EPS * sizes.dot(v.abs())
    assert ((held.dot(v) - dense.dot(v)).abs() <= bound + 1e-300).all()
    # (each coordinate sums m·T products: d ≫ m + T)
    bound = d * EPS * sizes.weighted_sum(kappa)
    assert ((held.weighted_sum(kappa) - dense.weighted_sum(kappa)).abs() <= bound).all()
    bound = d * EPS * (g * g).sum(1)
    assert ((held.squared_norms() - dense.squared_norms()).abs() <= bound).all()
    assert bool(torch.isfinite(held.finite_probe()))
    # the probe sees a non-finite factor
    pairs = next(iter(held.found.factors.values()))
    pairs[0][1][0, 0, 0] = float("nan")
    assert not bool(torch.isfinite(held.finite_probe()))


def _at_their_sizes(held: example_grads.LayerGrads) -> example_grads.LayerGrads:
    """The per-example gradients of ``held`` with every factor (and every other parameter's
    gradient) at its absolute value: what they sum, each product taken at its size."""
    found = copy.copy(held.found)
    found.factors = {
        key: [(u if u.dtype == torch.int64 else u.abs(), w.abs()) for u, w in pairs]
        for key, pairs in held.found.factors.items()
    }
    found.rest = None if held.found.rest is None else held.found.rest.abs()
    return example_grads.LayerGrads(found, held.layers, held.rest, held.offsets, held.d_active)


@pytest.mark.parametrize("case", [gpt_case, resnet_case, mlp_case])
def test_the_layer_route_is_taken_where_it_forms_no_per_example_gradient(case, monkeypatch):
    """By default only models made of layers called once per example take it (a GPT's
    LayerNorms and positions, a ResNet's BatchNorm and convolution positions would need
    per-example gradients after all)."""
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 0)
    model, data, loss_fn = case()
    fm = functional(model)
    chooser = StepGrads(fm, loss_fn, lambda idx: fm.cast(data[idx]), len(data))
    step = SimpleNamespace(params=dict(model.named_parameters()), indices=torch.arange(4))
    assert chooser.by_layer(step) == (case is mlp_case)


def count_calls(monkeypatch, cls, name) -> list:
    """Record the calls of ``cls.name`` (a list that grows by one per call)."""
    calls, original = [], getattr(cls, name)

    def spy(self, *args, **kwargs):
        calls.append(None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return calls


def _run(model, data, loss_fn, optimizer, steps=6, batch=3):
    recorder = pk.PathRecorder(model, optimizer)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    torch.manual_seed(0)
    done = 0
    while done < steps:
        for x, y in recorder.watch(loader):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    recorder.close()
    model.eval()
    return recorder.path


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("case", [resnet_case, mlp_case])
def test_exact_mode_by_layers_equals_the_reference(case, momentum, monkeypatch):
    """SGD with weight decay, with momentum (the adjoint carries state) and without (the
    MLP's φ then stays as its nodes' factors: the contributions and the weight decay's
    term are products of factors): the contributions equal the float64 reference's to
    1e-10 of the largest, the diagnostics name the route, and influence() (blocks of
    columns, cosine scores) gives the dense route's numbers."""
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 0)
    monkeypatch.setattr(example_grads, "WHOLE_MODELS_ONLY", False)
    model, data, loss_fn = case()  # (BatchNorm in eval mode: nothing replayed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=0.01)
    path = _run(model, data, loss_fn, optimizer)
    x = data.tensors[0][:2]
    target = torch.tensor([0, 1])
    ex = pk.PathKernelInfluence(model, data, path, loss_fn, quadrature=4, show_progress=False)
    factored = count_calls(monkeypatch, example_grads.NodeFactors, "dot_train")
    dec = ex.attribute(x, target=target)
    assert bool(factored) == (momentum == 0 and case is mlp_case)  # (no other parameters)
    assert dec.diagnostics.routes["loss_fn"].startswith(example_grads.LAYERS)
    assert dec.diagnostics.routes["output_fn"].startswith(example_grads.LAYERS)
    ref = reference_decomposition(model, data, path, loss_fn, x, target, q=4)
    scale = ref["contributions"].abs().max()
    assert (dec.contributions - ref["contributions"]).abs().max() <= 1e-10 * scale
    decay = ref["weight_decay"].abs().max()
    assert (dec.terms["weight_decay"] - ref["weight_decay"]).abs().max() <= 1e-10 * decay
    assert (dec.prediction - ref["prediction"]).abs().max() <= 1e-12 * scale.clamp(min=1)
    assert float(dec.diagnostics.reconstruction_error.nan_to_num().max()) <= 1e-12
    scores = ex.influence((x, target))  # (blocks of columns; the test loss explained)
    cosine = ex.influence((x, target), score="cosine")
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 1 << 60)  # dense, as before
    dense = pk.PathKernelInfluence(model, data, path, loss_fn, quadrature=4, show_progress=False)
    assert (
        not dense.attribute(x, target=target)
        .diagnostics.routes["loss_fn"]
        .startswith(example_grads.LAYERS)
    )
    expected = dense.influence((x, target))
    assert (scores - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert (dense.influence((x, target), score="cosine") - cosine).abs().max() <= 1e-10


def test_a_model_with_large_gradients_takes_the_layer_route_by_default(monkeypatch):
    """32 examples × 19k float64 parameters = 4.9 MiB a step: past the 4 MiB threshold.
    Plain SGD with the default adaptive quadrature: φ stays factored through the check."""
    torch.manual_seed(83)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    ).to(F64)
    x, y = torch.randn(64, 64, dtype=F64), torch.randint(0, 10, (64,))
    data = TensorDataset(x, y)
    loss_fn = torch.nn.CrossEntropyLoss()
    path = train(model, data, loss_fn, steps=2, batch=32)
    ex = pk.PathKernelInfluence(model, data, path, loss_fn, show_progress=False)
    factored = count_calls(monkeypatch, example_grads.NodeFactors, "dot_train")
    checked = count_calls(monkeypatch, example_grads.NodeFactors, "dot")
    dec = ex.attribute(x[:32], target=y[:32])  # (the queries' gradients: 4.9 MiB a node)
    layers = example_grads.LAYERS
    assert dec.diagnostics.routes == {"loss_fn": layers, "output_fn": layers}
    assert len(factored) == 2 and len(checked) == 4  # (φ·Δ: the quadrature check and the sweep)
    ref = reference_decomposition(model, data, path, loss_fn, x[:32], y[:32], q=2)
    scale = ref["contributions"].abs().max()
    assert (dec.contributions - ref["contributions"]).abs().max() <= 1e-10 * scale


class TimeMajor(torch.nn.Module):
    """A Linear called on (T, B, F): its rows do not group into examples (no layer)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # (T, B, 4)
        return self.head(h.mean(0))


def first_logit(out, t):
    return out[0][:, -1, 0]


@pytest.mark.parametrize("which", ["gpt", "time-major"])
def test_queries_and_training_by_layers_equal_the_reference(which, monkeypatch):
    """GPT-2's shapes (Conv1D, a tied embedding and head read as token ids and as a
    Linear, LayerNorms and a position embedding by per-example gradients) and a Linear
    called time-major (checked and left to per-example gradients on both sides)."""
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 0)
    monkeypatch.setattr(example_grads, "WHOLE_MODELS_ONLY", False)  # (slower here, exact)
    torch.manual_seed(84)
    if which == "gpt":
        model, data, loss_fn = gpt_case()
        output_fn, target = first_logit, None
    else:
        model = TimeMajor().to(F64)
        x, y = torch.randn(6, 2, 3, dtype=F64), torch.randint(0, 3, (6,))
        data, loss_fn, output_fn = TensorDataset(x, y), torch.nn.CrossEntropyLoss(), None
        target = y[:2]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    path = _run(model, data, loss_fn, optimizer, steps=4, batch=2)
    queries = data.tensors[0][:2]
    ex = pk.PathKernelInfluence(model, data, path, loss_fn, quadrature=3, show_progress=False)
    dec = ex.attribute(queries, target=target, output_fn=output_fn)
    routes = dec.diagnostics.routes
    assert routes["output_fn"].startswith(example_grads.LAYERS + "; other parameters")
    assert routes["loss_fn"].startswith(example_grads.LAYERS + "; other parameters")
    if which == "time-major":
        assert ex._engine.step_grads.plan[1][:2] == ["inner.weight", "inner.bias"]
    kwargs = {} if output_fn is None else {"output_fn": output_fn}
    ref = reference_decomposition(model, data, path, loss_fn, queries, target, q=3, **kwargs)
    scale = ref["contributions"].abs().max()
    assert (dec.contributions - ref["contributions"]).abs().max() <= 1e-10 * scale


def test_factored_phi_with_param_groups_of_their_own_rates_decay_and_sign(monkeypatch):
    """Plain SGD with two parameter groups (their own learning rates and weight decay; the
    second one maximizing, σ = −1): each parameter's η σ and λ reach the factored products;
    the contributions and the weight decay's term equal the float64 reference's."""
    monkeypatch.setattr(example_grads, "LAYER_ROUTE_BYTES", 0)
    model, data, loss_fn = mlp_case()
    first, second = model[0], model[2]
    optimizer = torch.optim.SGD(
        [
            {"params": first.parameters(), "lr": 0.05, "weight_decay": 0.02},
            {"params": second.parameters(), "lr": 0.02, "weight_decay": 0.0, "maximize": True},
        ]
    )
    path = _run(model, data, loss_fn, optimizer)
    x, target = data.tensors[0][:3], torch.tensor([0, 1, 2])
    ex = pk.PathKernelInfluence(model, data, path, loss_fn, quadrature=3, show_progress=False)
    factored = count_calls(monkeypatch, example_grads.NodeFactors, "dot_train")
    dec = ex.attribute(x, target=target)
    assert len(factored) == len(path)
    ref = reference_decomposition(model, data, path, loss_fn, x, target, q=3)
    scale = ref["contributions"].abs().max()
    assert (dec.contributions - ref["contributions"]).abs().max() <= 1e-10 * scale
    decay = ref["weight_decay"].abs().max()
    assert (
        decay > 0 and (dec.terms["weight_decay"] - ref["weight_decay"]).abs().max() <= 1e-10 * decay
    )
