"""Replayed steps: dropout, BatchNorm in train mode and batch losses (a token mean over the
real tokens) explained exactly, each example credited with its term of the step's own batch
gradient (issue 17)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
from pk_attrib.testing import reference_decomposition

F64 = torch.float64


def _digits(n=48, offset=0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[offset : offset + n], dtype=F64) / 16.0
    return x, torch.tensor(data.target[offset : offset + n])


def dropout_mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(12, 10)
    ).to(F64)


class BatchNormCNN(torch.nn.Module):
    """Conv2d -> BatchNorm2d -> Tanh -> Dropout -> Linear, on 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(3 * 16, 10)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x.reshape(-1, 1, 8, 8))))
        h = F.avg_pool2d(h, 2)
        return self.head(self.drop(h.flatten(1)))


class CausalLM(torch.nn.Module):
    """A one-layer causal transformer with dropout in attention and in the MLP."""

    def __init__(self, vocab=11, d=8, p=0.1):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(6, d) * 0.1)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 2 * d),
            torch.nn.GELU(),
            torch.nn.Dropout(p),
            torch.nn.Linear(2 * d, d),
        )
        self.head = torch.nn.Linear(d, vocab)
        self.p = p

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = F.dropout(attn, self.p, self.training)
        h = h + self.proj(attn @ v)
        return self.head(h + self.mlp(self.norm2(h)))


def token_mean_loss(logits, labels):
    """Cross-entropy averaged over the batch's real tokens (padding labelled -100)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _record(model, optimizer, data, loss_fn, epochs=2, batch_size=8, accumulate=1, scheduler=None):
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    model.train()
    with pk.PathRecorder(model, optimizer) as recorder:
        k = 0
        for _ in range(epochs):
            for x, y in recorder.watch(loader):
                loss_fn(model(x), y).backward()
                k += 1
                if k % accumulate == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                    if scheduler is not None:
                        scheduler.step()
    model.eval()
    return recorder.path


def _check_exact(model, data, path, loss_fn, queries, target=None, output_fn=None, q=4, **kw):
    """Exact and equal to the float64 reference that reruns each batch one term at a time."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.ReconstructionWarning)
        explainer = pk.PathKernelInfluence(
            model, data, path, loss_fn, quadrature=q, show_progress=False, **kw
        )
        dec = explainer.attribute(queries, target=target, output_fn=output_fn)
    assert explainer._engine.replay is not None
    change = (dec.prediction - dec.terms["initial"]).abs()
    assert float(dec.diagnostics.max_reconstruction_error) < 1e-10
    assert bool((dec.terms["unexplained"].abs() <= 1e-8 * change).all())
    assert float(dec.relative_delta.max()) <= 1e-8
    ref = reference_decomposition(
        model, data, path, loss_fn, queries, target, q=q, output_fn=output_fn, replay=True,
        loss_reduction=kw.get("loss_reduction", "mean"),
    )  # fmt: skip
    scale = float(ref["contributions"].abs().max())
    torch.testing.assert_close(
        dec.contributions, ref["contributions"], rtol=1e-8, atol=1e-12 * scale
    )
    return explainer, dec


def test_dropout_is_replayed_exactly_with_momentum():
    """Dropout p=0.3 in training: 5-45 % of the change was 'unexplained'; now the masks are
    redrawn from each micro-batch's recorded state and the steps rebuild to rounding."""
    torch.manual_seed(0)
    model = dropout_mlp()
    x, y = _digits()
    data = TensorDataset(x, y)
    path = _record(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), data, F.cross_entropy
    )
    qx, qy = _digits(3, offset=1500)
    explainer, dec = _check_exact(model, data, path, torch.nn.CrossEntropyLoss(), qx, qy)
    assert "train mode" in explainer._engine.replay_why
    # the Captum methods replay too (their step check passes: no warning)
    scores = explainer.influence((qx, qy), score="contribution")
    assert scores.shape == (3, len(data)) and bool(torch.isfinite(scores).all())


def test_gradient_accumulation_of_replayed_micro_batches():
    torch.manual_seed(1)
    model = dropout_mlp()
    x, y = _digits(32)
    data = TensorDataset(x, y)
    path = _record(
        model, torch.optim.SGD(model.parameters(), lr=0.2), data, F.cross_entropy, accumulate=2
    )
    assert len(path.step(0).rng_states) == 2
    qx, qy = _digits(2, offset=1500)
    _check_exact(model, data, path, torch.nn.CrossEntropyLoss(), qx, qy)


def test_a_causal_transformer_with_dropout_padding_and_a_token_mean_loss():
    """AdamW with linear warm-up, dropout 0.1 in attention and MLP, sequences padded with
    -100 labels, the loss averaged over the batch's real tokens: no per-example reduction
    describes it (reconstruction error up to 24.5); the replay needs none."""
    torch.manual_seed(2)
    model = CausalLM().to(F64)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (24, 5), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    lengths = torch.randint(2, 6, (24,), generator=g)
    labels[torch.arange(5)[None, :] >= lengths[:, None]] = -100  # padding
    data = TensorDataset(tokens, labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    warm_up = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)
    path = _record(model, optimizer, data, token_mean_loss, batch_size=6, scheduler=warm_up)
    queries = torch.randint(0, 11, (2, 5), generator=g)

    def last_logit(out, target):  # the next-token logit of `target` at the last position
        return out[:, -1].gather(1, target[:, None])[:, 0]

    explainer, _ = _check_exact(
        model, data, path, token_mean_loss, queries, torch.tensor([3, 7]), last_logit,
        loss_reduction="mean",
    )  # fmt: skip
    assert "not a sum of per-example losses" in explainer._engine.replay_why


def test_batchnorm_in_train_mode_is_replayed_through_the_batch():
    """Train-mode BatchNorm couples a batch's rows: each term's gradient goes through the
    whole batch (reconstruction error 0.57 before)."""
    torch.manual_seed(4)
    model = BatchNormCNN().to(F64)
    x, y = _digits(32)
    data = TensorDataset(x, y)
    path = _record(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), data, F.cross_entropy
    )
    qx, qy = _digits(2, offset=1500)
    explainer, dec = _check_exact(model, data, path, torch.nn.CrossEntropyLoss(), qx, qy)
    assert explainer._engine.replay.interacting
    # the running statistics are part of the path: `initial` is the initial model, with the
    # statistics it started from (it was off by 0.38 with the final ones), and their change
    # is split among the examples (nothing is left to the non-example `buffers` term)
    initial = BatchNormCNN().to(F64)
    path.load_into(initial, 0)
    initial.load_state_dict({**initial.state_dict(), **path.buffers(0)})
    with torch.no_grad():
        expected = initial.eval()(qx)[torch.arange(2), qy]
    torch.testing.assert_close(dec.terms["initial"], expected, rtol=0, atol=1e-12)
    change = (dec.prediction - dec.terms["initial"]).abs()
    assert bool((dec.terms["buffers"].abs() <= 1e-8 * change).all())


@pytest.mark.parametrize("make", [dropout_mlp, BatchNormCNN], ids=["dropout", "batchnorm"])
def test_float32_replays_stay_at_the_rounding_floor_without_a_false_warning(make):
    torch.manual_seed(6)
    model = make().float()
    x, y = _digits(32)
    data = TensorDataset(x.float(), y)
    path = _record(model, torch.optim.Adam(model.parameters(), lr=0.01), data, F.cross_entropy)
    qx, qy = _digits(2, offset=1500)
    dec = pk.PathKernelInfluence(  # (any ReconstructionWarning fails: filterwarnings = error)
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    ).attribute(qx.float(), target=qy)
    assert float(dec.diagnostics.max_reconstruction_error) < 1e-3
    assert float(dec.relative_delta.max()) < 1e-3


def test_random_numbers_drawn_between_the_batch_and_its_forward_still_warn():
    """A loop that draws noise after the recorder saw the batch: the replay cannot know."""
    torch.manual_seed(7)
    model = dropout_mlp()
    x, y = _digits(32)
    data = TensorDataset(x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model.train()
    with pk.PathRecorder(model, optimizer) as recorder:
        for xb, yb in recorder.watch(loader):
            xb = xb + 0.05 * torch.randn_like(xb)  # augmentation after the handoff
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    qx, qy = _digits(2, offset=1500)
    explainer = pk.PathKernelInfluence(
        model, data, recorder.path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    with pytest.warns(pk.ReconstructionWarning):
        dec = explainer.attribute(qx, target=qy)
    assert float(dec.relative_delta.max()) <= 1e-6  # completeness still holds
    assert float(dec.terms["unexplained"].abs().max()) > 0


def test_a_replayed_path_refuses_the_kernel_and_counterfactual_scores_saying_why():
    torch.manual_seed(8)
    model = dropout_mlp()
    x, y = _digits(16)
    data = TensorDataset(x, y)
    path = _record(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, F.cross_entropy, epochs=1
    )
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    qx, qy = _digits(1, offset=1500)
    with pytest.raises(pk.UnsupportedError, match="replayed"):
        explainer.attribute(qx, target=qy, kernel=True)
    with pytest.raises(pk.UnsupportedError, match="replayed"):
        explainer.counterfactual(qx, target=qy)


def test_the_captum_methods_agree_with_attribute_on_a_batchnorm_path():
    """influence() sweeps blocks of training examples: each block replays its steps and
    follows the running statistics as attribute() does."""
    torch.manual_seed(9)
    model = BatchNormCNN().to(F64)
    x, y = _digits(24)
    data = TensorDataset(x, y)
    path = _record(model, torch.optim.SGD(model.parameters(), lr=0.1), data, F.cross_entropy)
    qx, qy = _digits(2, offset=1500)
    loss = torch.nn.CrossEntropyLoss()
    whole = pk.PathKernelInfluence(model, data, path, loss, quadrature=4, show_progress=False)
    tiny = pk.PathKernelInfluence(  # blocks of 5 training examples
        model, data, path, loss, quadrature=4, show_progress=False, memory_budget=2 * 5 * 4 * 8
    )

    def negative_loss(out, target):
        return -F.cross_entropy(out, target, reduction="none")

    expected = whole.attribute(qx, target=qy, output_fn=negative_loss).contributions
    scores = tiny.influence((qx, qy), score="contribution")
    torch.testing.assert_close(
        scores, expected, rtol=1e-7, atol=1e-10 * float(expected.abs().max())
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.RMSprop(p, lr=0.002, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=0.02),
        lambda p: torch.optim.NAdam(p, lr=0.005),
        lambda p: torch.optim.RAdam(p, lr=0.005),
    ],
    ids=["rmsprop", "adagrad", "nadam", "radam"],
)
def test_dropout_under_the_other_exact_optimizers(make):
    torch.manual_seed(10)
    model = dropout_mlp()
    x, y = _digits(32)
    data = TensorDataset(x, y)
    path = _record(model, make(model.parameters()), data, F.cross_entropy)
    qx, qy = _digits(2, offset=1500)
    _check_exact(model, data, path, torch.nn.CrossEntropyLoss(), qx, qy, q=8)
