"""Models shaped like real ones: a GPT-2 (Conv1D blocks, a tied head, a cache output) and a
GRU returning ``(logits, h_n)``, in every mode and with every projector."""

import pytest
import torch
from _gpt import GRUClassifier, TinyGPT2, lm_loss
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
from pk_attrib.engine.factorized import make_projector
from pk_attrib.engine.factors import verify_layers
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.engine.layers import find_layers
from pk_attrib.engine.outputs import NotBatchFirst, row_losses
from pk_attrib.testing import reference_decomposition

F64 = torch.float64
KINDS = ["gaussian", "rademacher", "sparse", "factorized"]


def train(model, data, loss_fn, steps=3, batch=8, lr=0.1, record=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = pk.PathRecorder(model, optimizer) if record else None
    loader = DataLoader(data, batch_size=batch)
    batches = recorder.watch(loader) if record else loader
    done = 0
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        done += 1
        if done == steps:
            break
    if record:
        recorder.close()
    model.eval()
    return None if recorder is None else recorder.path


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(70)
    model = TinyGPT2().to(F64)
    ids = torch.randint(0, 50, (24, 8))
    data = TensorDataset(ids, ids)
    path = train(model, data, lm_loss())
    return model, data, path


def test_row_losses_read_only_the_members_the_loss_reads():
    """A cache or h_n that is not batch-first is passed whole; a loss that reads one is
    refused (each example would get another's rows)."""
    torch.manual_seed(71)
    model = GRUClassifier().to(F64)
    x, y = torch.randn(5, 4, 4, dtype=F64), torch.randint(0, 3, (5,))
    ce = torch.nn.CrossEntropyLoss()

    def loss(out, t):
        return ce(out[0], t)

    expected = torch.stack([loss(model(x[i : i + 1]), y[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(row_losses(model(x), y, loss), expected, rtol=1e-14, atol=0)
    with pytest.raises(NotBatchFirst, match=r"\(1, 5, 4\)"):
        row_losses(model(x), y, lambda out, t: ce(out[0], t) + out[1].sum())

    def inside_grad(scale):  # (requires_grad_() is refused inside torch.func transforms)
        return row_losses(model(x * scale), y, loss).sum()

    got = torch.func.grad(inside_grad)(torch.ones((), dtype=F64))
    eps = 1e-6
    numeric = (inside_grad(1 + eps) - inside_grad(1 - eps)) / (2 * eps)
    torch.testing.assert_close(got, numeric.detach(), rtol=1e-6, atol=0)


def test_a_model_whose_output_holds_a_cache_is_explained_in_exact_mode(gpt):
    """Was: RuntimeError "requires_grad_() inside of a function being transformed by a
    functorch transform" from the step check's batch gradient."""
    model, data, path = gpt
    ex = pk.PathKernelInfluence(model, data, path, lm_loss(), show_progress=False, quadrature=3)
    queries = data.tensors[0][:2]
    scores = ex.influence((queries, queries))
    assert ex._step_errors.max() < 1e-10  # the steps are rebuilt
    loss = lm_loss("sum")
    ref = reference_decomposition(
        model, data, path, lm_loss(), queries, queries, q=3, output_fn=lambda o, t: -loss(o, t)
    )
    torch.testing.assert_close(scores, ref["contributions"], rtol=1e-8, atol=1e-12)


def test_factorized_with_a_tied_head_as_the_only_linear_layer(gpt):
    """Was: UnboundLocalError "cannot access local variable 'first'" (no Linear layer whose
    parameters are all differentiated: the head's weight is the embedding's)."""
    model, data, path = gpt
    ex = pk.PathKernelInfluence(
        model,
        data,
        path,
        lm_loss(),
        show_progress=False,
        quadrature=3,
        projection_dim=64,
        projector="factorized",
    )
    queries = data.tensors[0][:2]
    assert torch.isfinite(ex.influence((queries, queries))).all()


def gpt_fm(model, path):
    return FunctionalModel(model, path.param_names, path.param_shapes, F64)


def test_gpt_layers_are_conv1d_embedding_and_the_tied_head(gpt):
    """The tied head and the token embedding are one layer (their terms add up); the
    position embedding, called on arange(T) for the whole batch, takes per-example
    gradients, and so do the LayerNorms."""
    model, data, path = gpt
    fm = gpt_fm(model, path)
    w = fm.flatten(path.step(0).params)
    layers, rest = verify_layers(fm, w, data[:2], lm_loss(), *find_layers(fm))
    kinds = {x.key: [kind for _, kind in x.uses] for x in layers}
    assert kinds["wte"] == ["embedding", "linear"] and kinds["h.1.c_attn"] == ["conv1d"]
    assert len(layers) == 9 and rest[0] == "wpe.weight"
    assert all(".ln_" in n or n.startswith("ln_f") for n in rest[1:])
    batch = data[:5]
    grads = fm.loss_grads(w, batch, lm_loss())
    for kind in KINDS:  # the captured terms give the projected per-example gradients
        proj = make_projector(fm, kind, 64, seed=3, plan=(layers, rest))
        scale = {n: 0.5 + 0.01 * i for i, n in enumerate(fm.active_names)}
        torch.testing.assert_close(
            proj.training_features(w, batch, lm_loss(), scale),
            proj.project(grads, scale),
            rtol=1e-10,
            atol=1e-12,
        )


def test_factorized_forms_no_per_example_gradient_of_a_layer(gpt, monkeypatch):
    model, data, path = gpt
    asked = []
    original = FunctionalModel.loss_grads

    def spy(self, w, batch, loss_fn, names=None):
        asked.append(None if names is None else list(names))
        return original(self, w, batch, loss_fn, names)

    monkeypatch.setattr(FunctionalModel, "loss_grads", spy)
    ex = pk.PathKernelInfluence(
        model, data, path, lm_loss(), mode="checkpoint", projection_dim=64,
        projector="factorized", show_progress=False,
    )  # fmt: skip
    ex.influence((data.tensors[0][:2], data.tensors[1][:2]))
    assert asked and all(names == ex._projector.rest for names in asked)


@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
@pytest.mark.parametrize("kind", KINDS)
def test_gpt_runs_every_projector_in_both_modes(gpt, mode, kind):
    """Checkpoint mode: the scores are the projected gradients' dot products, computed here
    from torch.func per-example gradients. Exact mode: the prediction and the bias stay
    exact (only the contributions are projected)."""
    model, data, path = gpt
    queries = (data.tensors[0][:2], data.tensors[1][:2])
    kwargs = dict(mode=mode, show_progress=False, quadrature=3, cache_features=False)
    ex = pk.PathKernelInfluence(
        model, data, path, lm_loss(), projection_dim=64, projector=kind, **kwargs
    )
    scores = ex.influence(queries)
    assert scores.shape == (2, 24) and bool(torch.isfinite(scores).all())
    if mode == "checkpoint":
        fm, expected = ex._fm, torch.zeros(2, 24, dtype=F64)
        for s in range(len(path)):
            step = path.step(s)
            w = fm.flatten(step.params)
            part = torch.zeros(2, 24, dtype=F64)
            scale = {n: (0.1 / len(step.indices)) ** 0.5 for n in fm.active_names}
            q = ex._projector.project(fm.loss_grads(w, queries, lm_loss()), scale)
            g = ex._projector.project(fm.loss_grads(w, data[step.indices], lm_loss()), scale)
            part[:, step.indices] = q @ g.T
            expected += part
        torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
        return

    def first_logit(out, t):
        return out[0][:, -1, 0]

    exact = pk.PathKernelInfluence(model, data, path, lm_loss(), **kwargs)
    dec = ex.attribute(queries[0], output_fn=first_logit)
    ref = exact.attribute(queries[0], output_fn=first_logit)
    torch.testing.assert_close(dec.prediction, ref.prediction, rtol=0, atol=0)
    torch.testing.assert_close(dec.bias, ref.bias, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dec.contributions, ref.contributions)  # projected


@pytest.mark.parametrize("kind", KINDS)
def test_a_gru_returning_its_state_is_projected_in_both_modes(kind):
    torch.manual_seed(72)
    model = GRUClassifier().to(F64)
    x, y = torch.randn(16, 5, 4, dtype=F64), torch.randint(0, 3, (16,))
    data = TensorDataset(x, y)
    ce = torch.nn.CrossEntropyLoss()

    def loss(out, t):
        return ce(out[0], t)

    loss.reduction = "mean"
    path = train(model, data, loss, steps=2, batch=8)
    for mode in ("exact", "checkpoint"):
        ex = pk.PathKernelInfluence(
            model, data, path, loss, mode=mode, projection_dim=16, projector=kind,
            show_progress=False, quadrature=3,
        )  # fmt: skip
        scores = ex.influence((x[:2], y[:2]))  # (nn.GRU batched by its stand-in: no warning)
        assert scores.shape == (2, 16) and bool(torch.isfinite(scores).all())


class SmallResNet(torch.nn.Module):
    """ResNet's shapes: convolutions (padding, stride, reflect padding, no bias), a
    BatchNorm in eval mode, a residual connection, pooling and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.down = torch.nn.Conv2d(4, 6, 2, stride=2, dilation=1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.stem(x)))
        h = torch.tanh(h + self.conv(h))
        return self.head(torch.tanh(self.down(h)).mean((2, 3)))


def test_convolutions_are_layers_of_unfolded_patches():
    """Conv2d's per-example gradient Σ_positions δ ⊗ patch: the checkpoint-mode dot products
    and every projector's features equal those of torch.func's per-example gradients."""
    from pk_attrib.engine.factors import capture, dot_products, example_losses

    torch.manual_seed(73)
    model = SmallResNet().to(F64).eval()
    names = [n for n, _ in model.named_parameters()]
    fm = FunctionalModel(model, names, {n: p.shape for n, p in model.named_parameters()}, F64)
    w = fm.flatten(dict(model.named_parameters())).detach()
    x, y = torch.randn(5, 2, 8, 8, dtype=F64), torch.randint(0, 3, (5,))
    ce = torch.nn.CrossEntropyLoss()
    layers, rest = verify_layers(fm, w, (x, y), ce, *find_layers(fm))
    assert [x.key for x in layers] == ["stem", "conv", "down", "head"]
    assert rest == ["norm.weight", "norm.bias"]
    grads = fm.loss_grads(w, (x, y), ce)
    found = capture(
        fm, w, (x,), example_losses(fm, y, ce), layers, rest,
        lambda names: fm.loss_grads(w, (x, y), ce, names),
    )  # fmt: skip
    lr = {n: 0.1 + 0.01 * i for i, n in enumerate(fm.names)}
    size = dict(zip(fm.names, fm.sizes, strict=True))
    eta = torch.cat([torch.full((size[n],), lr[n], dtype=F64) for n in fm.names])
    rest_eta = torch.cat([torch.full((size[n],), lr[n], dtype=F64) for n in rest])
    torch.testing.assert_close(
        dot_products(found, found, layers, lr.__getitem__, rest_eta),
        (grads * eta) @ grads.T,
        rtol=1e-10,
        atol=1e-13,
    )
    for kind in KINDS:
        proj = make_projector(fm, kind, 32, seed=4, plan=(layers, rest))
        torch.testing.assert_close(
            proj.training_features(w, (x, y), ce), proj.project(grads), rtol=1e-10, atol=1e-12
        )
