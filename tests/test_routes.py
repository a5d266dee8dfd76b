"""Per-example-gradient routes (`FunctionalModel.route`, ``diagnostics.gradient_route``).

Models vmap cannot batch as they are (fused recurrent kernels; HuggingFace attention that
skips an all-ones padding mask after a data-dependent check) are batched through stand-ins
that compute the same function; each route's contributions equal the float64 reference.
"""

import warnings

import pytest
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import TensorDataset

import pk_attrib as pk
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.engine.standins import RecurrentStandIn, standin_for
from pk_attrib.testing import reference_decomposition

F64 = torch.float64
# contributions against the float64 reference, relative to the largest: both are float64
# sums of a few thousand products (eps 2.2e-16), far below this
TOL = 1e-10


class Recurrent(torch.nn.Module):
    """Embedding -> recurrent layer -> Linear on the last step's output."""

    def __init__(self, cell, vocabulary=7, width=4, classes=3, **options):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, width)
        self.rnn = cell(width, width, batch_first=True, **options)
        self.head = torch.nn.Linear(width * (2 if options.get("bidirectional") else 1), classes)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


def _record(model, data, steps=3, batch=4, lr=0.3):
    *inputs, labels = data.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    with pk.PathRecorder(model, optimizer) as recorder:
        for s in range(steps):
            idx = torch.arange(s * batch, (s + 1) * batch) % len(data)
            recorder.record_batch(idx)
            optimizer.zero_grad()
            out = model(*(x[idx] for x in inputs))
            F.cross_entropy(getattr(out, "logits", out), labels[idx]).backward()
            optimizer.step()
    model.eval()
    return recorder.path


def _explain(model, data, path, loss_fn, queries, target, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        explainer = pk.PathKernelInfluence(
            model, data, path, loss_fn, quadrature=3, show_progress=False
        )
        dec = explainer.attribute(queries, target=target, **kwargs)
    ref = reference_decomposition(model, data, path, loss_fn, queries, target, q=3, **kwargs)
    scale = ref["contributions"].abs().amax()
    assert float((dec.contributions - ref["contributions"]).abs().max() / scale) <= TOL
    assert float((dec.prediction - ref["prediction"]).abs().max()) <= TOL * scale
    return dec


@pytest.mark.parametrize(
    ("cell", "options", "route"),
    [
        (torch.nn.GRU, {}, "vmap (GRU stand-in)"),
        (torch.nn.LSTM, {"num_layers": 2}, "vmap (LSTM stand-in)"),
        (torch.nn.GRU, {"bidirectional": True}, "vmap (GRU stand-in)"),
    ],
)
def test_recurrent_models_are_batched_by_a_stand_in_and_explained_exactly(cell, options, route):
    torch.manual_seed(3)
    tokens = torch.randint(0, 7, (12, 5))
    data = TensorDataset(tokens, tokens[:, 0] % 3)
    model = Recurrent(cell, **options).to(F64)
    path = _record(model, data)
    queries, target = torch.randint(0, 7, (2, 5)), torch.tensor([0, 2])
    dec = _explain(model, data, path, torch.nn.CrossEntropyLoss(), queries, target)
    assert dec.diagnostics.gradient_route == route
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    assert pk.Decomposition.concat([dec, dec]).diagnostics.gradient_route == route
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        checkpoint = pk.PathKernelInfluence(
            model, data, path, torch.nn.CrossEntropyLoss(), mode="checkpoint", show_progress=False
        ).attribute(queries, target=target)
    assert checkpoint.diagnostics.gradient_route == route


def test_a_model_no_stand_in_fits_is_looped_and_the_route_says_so():
    """An LSTM with ``proj_size`` has no stand-in: one example at a time, still exact."""
    torch.manual_seed(4)
    tokens = torch.randint(0, 7, (8, 4))
    data = TensorDataset(tokens, tokens[:, 0] % 3)
    model = Recurrent(torch.nn.LSTM, width=4, proj_size=2).to(F64)
    model.head = torch.nn.Linear(2, 3).to(F64)
    path = _record(model, data, steps=2)
    queries, target = torch.randint(0, 7, (2, 4)), torch.tensor([1, 0])
    with pytest.warns(pk.VectorizationWarning, match="one example at a time"):
        dec = pk.PathKernelInfluence(
            model, data, path, torch.nn.CrossEntropyLoss(), quadrature=3, show_progress=False
        ).attribute(queries, target=target)
    ref = reference_decomposition(
        model, data, path, torch.nn.CrossEntropyLoss(), queries, target, q=3
    )
    scale = ref["contributions"].abs().amax()
    assert float((dec.contributions - ref["contributions"]).abs().max() / scale) <= TOL
    assert dec.diagnostics.gradient_route == "per-example loop"


def test_a_model_vmap_batches_keeps_the_plain_route():
    torch.manual_seed(5)
    x = torch.randn(8, 3, dtype=F64)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(F64)
    path = _record(model, data, steps=2)
    dec = _explain(model, data, path, torch.nn.CrossEntropyLoss(), x[:2], torch.tensor([0, 1]))
    assert dec.diagnostics.gradient_route == "vmap"


@pytest.mark.parametrize("cell", [torch.nn.GRU, torch.nn.LSTM, torch.nn.RNN])
def test_the_stand_in_computes_what_the_module_computes(cell):
    """Outputs and final states, batch-first or not, batched or not, with a given state."""
    torch.manual_seed(6)
    for batch_first in (True, False):
        module = cell(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first).to(F64)
        standin = standin_for(module)
        assert isinstance(standin, RecurrentStandIn)
        assert dict(standin.named_parameters()).keys() == dict(module.named_parameters()).keys()
        x = torch.randn(4, 6, 3, dtype=F64)
        h = torch.randn(4, 4 if batch_first else 6, 5, dtype=F64)
        state = (h, torch.randn_like(h)) if cell is torch.nn.LSTM else h
        for args in ((x,), (x[0],), (x, state)):
            got = torch.utils._pytree.tree_leaves(standin(*args))
            want = torch.utils._pytree.tree_leaves(module(*args))
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                # a few hundred float64 operations per value, |values| <= 1
                torch.testing.assert_close(g, w, rtol=0, atol=1e-13)


def test_a_stand_in_that_computes_another_function_is_not_used(monkeypatch):
    """The check on the first call compares the stand-in's gradients with the model's."""
    from pk_attrib.engine import standins

    monkeypatch.setattr(standins.RecurrentStandIn, "_cell", _wrong_cell)
    torch.manual_seed(7)
    model = Recurrent(torch.nn.GRU).to(F64)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    fm = FunctionalModel(model, names, shapes, F64)
    w = fm.flatten({n: p.detach() for n, p in model.named_parameters()})
    tokens = torch.randint(0, 7, (4, 5))
    with pytest.warns(pk.VectorizationWarning, match="stand-ins \\(GRU stand-in\\) differ"):
        g = fm.loss_grads(w, (tokens, tokens[:, 0] % 3), torch.nn.CrossEntropyLoss())
    assert fm.route == "per-example loop"
    want = torch.stack(
        [
            torch.cat([t.reshape(-1) for t in _grads(model, tokens[i : i + 1], tokens[i, :1] % 3)])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)


def _wrong_cell(self, gi, gh, h, c):
    return torch.tanh(gi[..., : self.hidden_size] + gh[..., : self.hidden_size]), None


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


class MaskedBert(torch.nn.Module):
    """A HF BERT classifier taking (n, 2, L): token ids and the padding mask, stacked (the
    reference takes one input tensor)."""

    def __init__(self, attention):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=20,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation=attention,
        )
        torch.manual_seed(0)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, x):
        return self.bert(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_bert_with_a_padding_mask_is_batched_and_explained_exactly(attention):
    model = MaskedBert(attention).to(F64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (8, 6), generator=g)
    mask = torch.ones(8, 6, dtype=torch.int64)
    mask[::2, 4:] = 0  # padding in every other example, none in the rest
    x = torch.stack([ids * mask, mask], 1)
    data = TensorDataset(x, torch.randint(0, 3, (8,), generator=g))
    path = _record(model, data, steps=2, lr=0.1)
    queries, target = x[[0, 3]], torch.tensor([0, 2])
    dec = _explain(model, data, path, torch.nn.CrossEntropyLoss(), queries, target)
    assert dec.diagnostics.gradient_route == "vmap (eager attention)"
    assert model.bert.config._attn_implementation == attention  # the model is untouched
