"""Checkpoint mode with random projection, Captum's TracIn API, and its error types."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from captum.influence import TracInCP as CaptumTracInCP
from test_engine import digits, digits_mlp, train_set
from torch.utils.data import DataLoader

import pk_attrib as pk
from pk_attrib.engine.functional import FunctionalModel

F64 = torch.float64
KINDS = ["gaussian", "rademacher", "sparse", "factorized"]
LRS = [0.1, 0.05, 0.02]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits MLP trained 3 epochs, a checkpoint file (with its lr) after each."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(80)
    model = digits_mlp(hidden=8)
    data = train_set(n=30)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    files = []
    for epoch, lr in enumerate(LRS):
        for g in optimizer.param_groups:
            g["lr"] = lr
        for x, y in DataLoader(data, batch_size=10):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        files.append(str(folder / f"epoch-{epoch}.pt"))
        torch.save({"model": model.state_dict(), "lr": lr}, files[-1])
    model.eval()
    x, y = digits()
    return model, data, files, (x[1500:1502], y[1500:1502])


def load(net, file):
    state = torch.load(file, weights_only=True)
    net.load_state_dict(state["model"])
    return state["lr"]


LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def explainer(run, **kwargs):
    model, data, files, _ = run
    return pk.TracInCP(model, data, files, load, None, LOSS, show_progress=False, **kwargs)


def test_the_unprojected_scores_equal_captum_tracincp(run):
    """pk.TracInCP takes TracInCP's positional order (checkpoints_load_func fourth)."""
    model, data, files, queries = run
    captum = CaptumTracInCP(model, data, files, load, None, LOSS, 10).influence(queries)
    ours = explainer(run).influence(queries)
    assert ours.shape == (2, 30)
    torch.testing.assert_close(ours, captum, rtol=1e-6, atol=1e-6 * float(captum.abs().max()))


def gradients(run):
    """(a, b): √η_k ∇ℓ per checkpoint for the queries (2, S, d) and training set (30, S, d)."""
    model, data, files, queries = run
    names = [n for n, _ in model.named_parameters()]
    fm = FunctionalModel(model, names, {n: p.shape for n, p in model.named_parameters()}, F64)
    a, b = [], []
    for file, lr in zip(files, LRS, strict=True):
        w = fm.flatten(torch.load(file, weights_only=True)["model"])
        a.append(math.sqrt(lr) * fm.loss_grads(w, queries, LOSS))
        b.append(math.sqrt(lr) * fm.loss_grads(w, data.tensors, LOSS))
    return torch.stack(a, 1), torch.stack(b, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_projected_checkpoint_scores_are_unbiased(run, kind):
    """The mean over R seeds is within 4 standard errors of TracInCP's scores for every
    entry (a union bound over the 60 entries: a false alarm has probability < 0.004); the
    standard error is the seeds' own spread / √R."""
    exact = explainer(run).influence(run[3])
    R = 40
    scores = torch.stack(
        [
            explainer(run, projection_dim=64, projector=kind, projection_seed=r).influence(run[3])
            for r in range(R)
        ]
    )
    error = scores.mean(0) - exact
    standard_error = scores.std(0) / math.sqrt(R)
    assert bool((error.abs() <= 4 * standard_error).all())
    assert float(standard_error.max()) > 0  # (projected: the seeds differ)


def test_projected_checkpoint_error_falls_like_one_over_sqrt_k(run):
    """Gaussian P (K × d, entries N(0, 1/K)), the same P at every checkpoint: a score is
    tr(PᵀP A) with A = Σ_k b_k a_kᵀ, whose variance is (‖A‖_F² + tr(A²)) / K exactly. The
    mean squared error over R seeds, normalized by that, has mean 1 for every K; it is
    checked to 4 of its own standard errors, for K = 16 and 256 (a 16-fold variance)."""
    a, b = gradients(run)
    exact = explainer(run).influence(run[3])
    torch.testing.assert_close(exact, torch.einsum("qkd,ikd->qi", a, b), rtol=1e-10, atol=0)
    A = torch.einsum("ikd,qke->qide", b, a)  # (2, 30, d, d)
    frobenius = (A * A).sum((2, 3))
    trace_square = torch.einsum("qide,qied->qi", A, A)
    R = 32
    for k in (16, 256):
        variance = (frobenius + trace_square) / k
        ratios = torch.stack(
            [
                (
                    (explainer(run, projection_dim=k, projection_seed=r).influence(run[3]) - exact)
                    ** 2
                    / variance
                ).mean()
                for r in range(R)
            ]
        )  # E = 1 for each seed
        assert abs(float(ratios.mean()) - 1) <= 4 * float(ratios.std()) / math.sqrt(R)


@pytest.mark.parametrize("kind", [None, "gaussian", "factorized"])
def test_intermediate_quantities_dot_products_are_the_influence_scores(run, kind):
    model, data, files, queries = run
    dim = None if kind is None else 32
    ex = explainer(run, projection_dim=dim, projector=kind or "gaussian", cache_features=False)
    test = ex.compute_intermediate_quantities(queries)
    train = ex.compute_intermediate_quantities(DataLoader(data, batch_size=7))
    width = (ex._fm.d_active if kind is None else ex._projector.dim) * len(files)
    assert test.shape == (2, width) and train.shape == (30, width)
    scores = ex.influence(queries)
    torch.testing.assert_close(test @ train.T, scores, rtol=1e-10, atol=1e-12)
    total = ex.compute_intermediate_quantities(DataLoader(data, batch_size=7), aggregate=True)
    torch.testing.assert_close(total, train.sum(0, keepdim=True), rtol=1e-12, atol=1e-12)
    if kind is None:  # √η_k ∇ℓ(w_k), checkpoint after checkpoint
        a, _ = gradients(run)
        torch.testing.assert_close(test, a.reshape(2, -1), rtol=1e-10, atol=1e-14)


def test_intermediate_quantities_are_refused_where_no_embedding_exists():
    torch.manual_seed(81)
    model = digits_mlp(hidden=6)
    data = train_set(n=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pk.PathRecorder(model, optimizer) as recorder:
        for x, y in recorder.watch(DataLoader(data, batch_size=10)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    ex = pk.PathKernelInfluence(model, data, recorder.path, torch.nn.CrossEntropyLoss())
    with pytest.raises(pk.UnsupportedError, match="in exact mode"):
        ex.compute_intermediate_quantities(data.tensors)


def test_projected_top_k_streams_over_cached_blocks(run, tmp_path):
    """influence(k=) in blocks of the cache's rows equals the full scores' top k, and a
    folder named by cache_features= keeps the training features for the next explainer."""
    folder = tmp_path / "features"
    ex = explainer(run, projection_dim=32, projector="sparse", cache_features=folder)
    scores = ex.influence(run[3])
    top = ex.influence(run[3], k=5, proponents=False)
    order = torch.sort(scores, dim=1)
    torch.testing.assert_close(top.influence_scores, order.values[:, :5], rtol=0, atol=0)
    assert torch.equal(top.indices, order.indices[:, :5])
    assert list(folder.glob("*/index.json"))
    again = explainer(run, projection_dim=32, projector="sparse", cache_features=folder)
    dec = again.attribute(run[3][0], target=run[3][1])
    assert dec.diagnostics.train_gradients == 30  # one block, recomputed once to check it
    fresh = explainer(run, projection_dim=32, projector="sparse", cache_features=False)
    torch.testing.assert_close(
        fresh.attribute(run[3][0], target=run[3][1]).contributions,
        dec.contributions,
        rtol=1e-6,  # (features stored in float32)
        atol=1e-6 * float(dec.contributions.abs().max()),
    )


def test_tracincp_has_captums_signature():
    ours = list(inspect.signature(pk.TracInCP.__init__).parameters.values())
    theirs = list(inspect.signature(CaptumTracInCP.__init__).parameters.values())
    assert [(p.name, p.kind) for p in ours[: len(theirs)]] == [(p.name, p.kind) for p in theirs]
    assert issubclass(pk.TracInCP, pk.PathKernelInfluence)


def test_progress_bars_are_named_as_captums(run, capsys):
    ex = explainer(run)
    ex.influence(run[3], show_progress=True)
    ex.self_influence(show_progress=True)
    err = capsys.readouterr().err
    assert "Using TracInCP to compute influence for training batches" in err
    assert "Using TracInCP to compute self influence. Processing checkpoint" in err


def test_errors_a_tracincp_user_catches_are_caught(run, tmp_path):
    model, data, files, queries = run
    ex = explainer(run)
    with pytest.raises(AssertionError):  # TracInCP asserts inputs is not None
        ex.influence(None)
    with pytest.raises(ValueError):
        ex.influence(queries, k=0)
    with pytest.raises(AssertionError):
        pk.PathKernelInfluence(model, data, files, LOSS, layers="0")  # not a list
    # an empty folder: one type whichever argument names it, a ValueError as TracInCP's
    empty = tmp_path / "empty"
    empty.mkdir()
    for kwargs in ({"path": empty}, {"checkpoints": empty}, {"checkpoints": []}):
        with pytest.raises(pk.NoCheckpointsError) as caught:
            pk.PathKernelInfluence(model, data, loss_fn=LOSS, **kwargs)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, pk.NotAStoreError)
    for kwargs in ({"path": tmp_path / "missing"}, {"checkpoints": tmp_path / "missing"}):
        with pytest.raises(pk.NoCheckpointsError):
            pk.PathKernelInfluence(model, data, loss_fn=LOSS, **kwargs)
    with pytest.raises(ValueError):  # and Captum's own error type, too
        CaptumTracInCP(model, data, str(empty), load, loss_fn=LOSS)
    # TracInCP's positional order given to PathKernelInfluence: the message says so
    with pytest.raises(pk.ArgumentTypeError, match="pk_attrib.TracInCP"):
        pk.PathKernelInfluence(model, data, files, load)
