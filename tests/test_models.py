"""Models shaped like real ones: a GPT-2 (Conv1D blocks, a tied head, a cache output) and a
GRU returning ``(logits, h_n)``, in every mode and with every projector."""

import pytest
import torch
from _gpt import GRUClassifier, TinyGPT2, lm_loss
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
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
