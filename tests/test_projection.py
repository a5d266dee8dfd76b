"""Random projection: unbiased, deterministic, factorized = Kronecker, identity = exact."""

import warnings

import pytest
import torch
from test_engine import OPTIMIZERS, digits, digits_mlp, record, train_set

import pk_attrib as pk
from pk_attrib.engine.factorized import FactorizedProjector, make_projector
from pk_attrib.engine.factors import capture
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.engine.layers import find_layers
from pk_attrib.explain.influence import block_size

F64 = torch.float64


def functional(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    fm = FunctionalModel(model, names, shapes, F64)
    return fm, fm.flatten(dict(model.named_parameters())).detach()


def random_batch_gradients(model, n, width):
    """(fm, w, batch, loss_fn, per-example gradients) of n random examples, 3 classes."""
    fm, w = functional(model)
    batch = (torch.randn(n, width, dtype=F64), torch.randint(0, 3, (n,)))
    loss_fn = torch.nn.CrossEntropyLoss()
    return fm, w, batch, loss_fn, fm.loss_grads(w, batch, loss_fn)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse", "factorized"])
def test_projected_dot_products_are_unbiased_and_shrink_like_one_over_sqrt_k(kind):
    torch.manual_seed(40)
    model = digits_mlp(hidden=12)
    fm, _ = functional(model)
    u, g = torch.randn(2, fm.d, dtype=F64)
    exact = float(u @ g)
    errors = {}
    for k in (16, 256):
        estimates = torch.tensor(
            [
                float(
                    (make_projector(fm, kind, k, seed).project(torch.stack([u, g])).prod(0)).sum()
                )
                for seed in range(60)
            ]
        )
        scale = float(u.norm() * g.norm())
        # unbiased: the mean over seeds is within 4 standard errors of the exact value
        assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / 60**0.5 + 1e-9
        errors[k] = float(((estimates - exact) ** 2).mean().sqrt()) / scale
    ratio = errors[16] / errors[256]  # 1/sqrt(k) predicts 4
    assert 2.0 < ratio < 8.0, errors


def test_projection_is_deterministic_for_a_seed_and_differs_across_seeds():
    torch.manual_seed(41)
    model = digits_mlp(hidden=8)
    fm, _ = functional(model)
    x = torch.randn(3, fm.d, dtype=F64)
    for kind in ("gaussian", "rademacher", "sparse", "factorized"):
        a = make_projector(fm, kind, 32, seed=7).project(x)
        b = make_projector(fm, kind, 32, seed=7).project(x)
        c = make_projector(fm, kind, 32, seed=8).project(x)
        assert torch.equal(a, b) and not torch.allclose(a, c)


class SequenceModel(torch.nn.Module):
    """Linear layers applied to every position of a sequence, then pooled."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7)  # no factorized rule: dense fallback
        self.head = torch.nn.Linear(7, 3, bias=False)

    def forward(self, x):  # x: (B, T, 5)
        return self.head(torch.tanh(self.norm(self.inner(x)))).mean(1)


def test_factorized_linear_projection_equals_the_kronecker_projection_of_the_gradient():
    torch.manual_seed(42)
    model = SequenceModel().to(F64)
    fm, w = functional(model)
    proj = make_projector(fm, "factorized", 16, seed=3)
    assert isinstance(proj, FactorizedProjector)
    assert [x.key for x in proj.layers] == ["inner", "head"] and proj.rest == [
        "norm.weight",
        "norm.bias",
    ]
    x, y = torch.randn(6, 4, 5, dtype=F64), torch.randint(0, 3, (6,))
    loss_fn = torch.nn.CrossEntropyLoss()
    from_hooks = proj.training_features(w, (x, y), loss_fn)
    grads = fm.loss_grads(w, (x, y), loss_fn)  # materialized per-example gradients
    torch.testing.assert_close(from_hooks, proj.project(grads), rtol=1e-10, atol=1e-12)
    # and project() is the Kronecker matrix applied to the flattened [dW | db]
    p_out, p_in = proj.factors("inner", 7, 6)
    offsets = proj.offsets
    a, n = offsets["inner.weight"]
    b, nb = offsets["inner.bias"]
    flat = torch.cat(
        [grads[:, a : a + n].reshape(6, 7, 5), grads[:, b : b + nb].reshape(6, 7, 1)], 2
    )
    kron = torch.kron(p_out, p_in) @ flat.reshape(6, -1).T
    torch.testing.assert_close(
        from_hooks[:, : proj.k_out * proj.k_in], kron.T, rtol=1e-10, atol=1e-12
    )


def test_factorized_keeps_a_narrow_side_exact_and_gives_the_other_side_its_features():
    """A side no wider than its share is not projected (that factor is exact); a layer
    with at most k weights is not projected at all, so its feature dot products are exact."""
    torch.manual_seed(44)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3)
    ).to(F64)
    fm, w, (x, y), loss_fn, grads = random_batch_gradients(model, 9, 40)
    proj = make_projector(fm, "factorized", 64, seed=5)
    # layer 0: 30 x 41 > 64, neither side <= 8: 8 x 8; layer 2: 3 outputs (<= 8): 3 x 21
    assert proj.sides == {"0": (8, 8), "2": (3, 21)} and proj.dim == 64 + 63
    features = proj.training_features(w, (x, y), loss_fn)
    torch.testing.assert_close(features, proj.project(grads), rtol=1e-10, atol=1e-12)
    p_out, p_in = proj.factors("2", 3, 31)
    assert p_out is None and p_in.shape == (21, 31)
    # the last layer's block is exactly its gradient [dW | db] times P_in^T
    a, n = proj.offsets["2.weight"]
    b, nb = proj.offsets["2.bias"]
    block = torch.cat([grads[:, a : a + n].reshape(9, 3, 30), grads[:, b : b + nb, None]], 2)
    torch.testing.assert_close(
        features[:, 64:], (block @ p_in.T).reshape(9, -1), rtol=1e-10, atol=1e-12
    )
    # k at least every layer's weights: no projection, dot products of gradients exactly
    whole = make_projector(fm, "factorized", 30 * 41, seed=5)
    assert whole.sides == {"0": (30, 41), "2": (3, 31)}
    exact = whole.training_features(w, (x, y), loss_fn)
    torch.testing.assert_close(exact @ exact.T, grads @ grads.T, rtol=1e-10, atol=1e-12)


def test_factorized_leaves_other_parameters_that_fit_unprojected():
    """Parameters outside Linear layers (a LayerNorm's) are projected densely only when they
    have more coordinates than k: they were always, so at k = 4096 a 1,242-parameter model
    read 3e-4 off the exact contributions, and no more exact at k = 65536."""
    torch.manual_seed(45)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).to(F64)
    fm, w, (x, y), loss_fn, grads = random_batch_gradients(model, 7, 6)
    whole = make_projector(fm, "factorized", 64, seed=2)
    assert whole.rest == ["1.weight", "1.bias"] and whole.dense is None
    assert whole.dim == fm.d_active  # 35 + 18 + 10: nothing projected
    exact = whole.training_features(w, (x, y), loss_fn)
    torch.testing.assert_close(exact @ exact.T, grads @ grads.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole.project(grads), exact, rtol=1e-10, atol=1e-12)
    small = make_projector(fm, "factorized", 9, seed=2)  # 10 LayerNorm coordinates > 9
    assert small.dense is not None
    torch.testing.assert_close(
        small.training_features(w, (x, y), loss_fn), small.project(grads), rtol=1e-10, atol=1e-12
    )


class Reused(torch.nn.Module):
    """A Linear layer used in a way its captured terms must handle, or be refused for."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.inner = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):  # x: (B, T, 5)
        b, t, _ = x.shape
        if self.how == "flattened":  # batch and positions flattened: (B·T, 5)
            h = torch.tanh(self.inner(x.reshape(b * t, 5))).reshape(b, t, 5)
        elif self.how == "time major":  # (T, B, 5): positions grouped into wrong examples
            h = torch.tanh(self.inner(x.transpose(0, 1))).transpose(0, 1)
        else:
            h = torch.tanh(self.inner(x))
            if self.how == "called twice":
                h = torch.tanh(self.inner(h))
            else:  # "weight used elsewhere" too
                h = torch.tanh(torch.nn.functional.linear(h, self.inner.weight))
        return self.head(h).reshape(b, -1, 3).mean(1)


REBUILT = ("sequence", "called twice", "flattened")  # captured terms give exact gradients
USES = ["sequence", "called twice", "flattened", "weight used elsewhere", "time major"]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("model", USES)
def test_dense_training_features_equal_the_projected_per_example_gradients(kind, model):
    torch.manual_seed(44)
    net = (SequenceModel() if model == "sequence" else Reused(model)).to(F64)
    names = [n for n, _ in net.named_parameters()]
    shapes = {n: p.shape for n, p in net.named_parameters()}
    # a tiny budget: several forward passes, several groups of rows, rows of a block in parts
    fm = FunctionalModel(net, names, shapes, F64, memory_budget=4000)
    w = fm.flatten(dict(net.named_parameters())).detach()
    proj = make_projector(fm, kind, 16, seed=5)
    proj.chunk = 3  # blocks of P that start and end inside rows of a weight
    loss_fn = torch.nn.CrossEntropyLoss()
    layers, _ = find_layers(fm)
    y = torch.randint(0, 3, (7,))
    for x in (torch.randn(7, t, 5, dtype=F64) for t in (4, 1, 7)):  # T = B: time major fails
        losses = lambda out: fm.per_example_losses(out, y, loss_fn)  # noqa: E731
        rebuilt = not capture(fm, w, (x,), losses, layers, check=True).failed
        # otherwise torch.func per-example gradients (a time-major layer runs on batch-first
        # looking inputs when T = B, and only the first example's own gradient tells)
        assert rebuilt == (model in REBUILT)
        features = proj.training_features(w, (x, y), loss_fn)
        expected = proj.project(fm.loss_grads(w, (x, y), loss_fn))
        torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(features, proj.training_features(w, (x, y), loss_fn))


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(43)
    model = digits_mlp(hidden=8)
    data = train_set(n=40)
    path = record(model, OPTIMIZERS["momentum_nesterov"](model.parameters()), data, batch_size=10)
    return model, data, path


def make(run, **kwargs):
    model, data, path = run
    return pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False, quadrature=3, **kwargs
    )


def test_identity_projection_equals_the_exact_engine(run):
    x, y = digits()
    exact = make(run).attribute(x[1500:1503], target=y[1500:1503])
    identity = make(run, projection_dim=5, projector="identity").attribute(
        x[1500:1503], target=y[1500:1503]
    )
    assert torch.equal(identity.contributions, exact.contributions)


def test_projected_contributions_average_to_the_exact_ones_and_the_rest_stays_exact(run):
    x, y = digits()
    exact = make(run).attribute(x[1500:1503], target=y[1500:1503])
    runs = [
        make(run, projection_dim=64, projection_seed=seed).attribute(
            x[1500:1503], target=y[1500:1503]
        )
        for seed in range(12)
    ]
    single = float((runs[0].contributions - exact.contributions).norm())
    mean = torch.stack([r.contributions for r in runs]).mean(0)
    assert float((mean - exact.contributions).norm()) < 0.6 * single  # ~1/sqrt(12) of it
    for r in runs[:2]:  # prediction, bias and the exact total are not projected
        torch.testing.assert_close(r.bias, exact.bias, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r.prediction, exact.prediction, rtol=0, atol=0)
        noise = r.contributions.sum(1) - exact.contributions.sum(1)
        torch.testing.assert_close(r.delta, exact.delta - noise, rtol=1e-8, atol=1e-12)


def test_query_chunks_and_cached_features_give_the_same_numbers(run, tmp_path):
    model, data, path = run
    stored = path.save(tmp_path / "store")
    x, y = digits()
    kwargs = dict(projection_dim=32, projector="sparse", projection_seed=1)
    first = pk.PathKernelInfluence(
        model, data, stored, torch.nn.CrossEntropyLoss(), show_progress=False, **kwargs
    ).attribute(x[1500:1504], target=y[1500:1504])
    assert first.diagnostics.train_gradients > 0
    assert list((tmp_path / "store" / "features").glob("*/index.json"))
    tiny = pk.PathKernelInfluence(  # a new explainer (another session): features from the store
        model,
        data,
        stored,
        torch.nn.CrossEntropyLoss(),
        show_progress=False,
        memory_budget=20_000,
        **kwargs,  # one query per chunk
    )
    again = tiny.attribute(x[1500:1504], target=y[1500:1504])
    # no features recomputed, but one step's, once, to check that the cache fits
    assert again.diagnostics.train_gradients == len(path.step(len(path) - 1).indices)
    torch.testing.assert_close(again.contributions, first.contributions, rtol=1e-6, atol=1e-9)
    # another loss (label smoothing: the same cache key) finds the cache stale, warns and
    # recomputes: the numbers of an explainer without a cache
    smooth = torch.nn.CrossEntropyLoss(label_smoothing=0.2)  # (not the training loss: the
    with pytest.warns(pk.ReconstructionWarning):  # step check says so, rightly)
        uncached = pk.PathKernelInfluence(
            model, data, stored, smooth, show_progress=False, cache_features=False, **kwargs
        ).attribute(x[1500:1504], target=y[1500:1504])
    with (
        pytest.warns(pk.ReconstructionWarning),
        pytest.warns(pk.PkAttribWarning, match="features cached"),
    ):
        stale = pk.PathKernelInfluence(
            model, data, stored, smooth, show_progress=False, **kwargs
        ).attribute(x[1500:1504], target=y[1500:1504])
    assert not torch.allclose(uncached.contributions, first.contributions, rtol=1e-2)
    torch.testing.assert_close(stale.contributions, uncached.contributions, rtol=1e-6, atol=1e-9)
    shard = next((tmp_path / "store" / "features").glob("*/features-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4] + b"oops")
    with pytest.raises(pk.CorruptStoreError):
        pk.PathKernelInfluence(
            model, data, stored, torch.nn.CrossEntropyLoss(), show_progress=False, **kwargs
        ).attribute(x[1500:1501], target=y[1500:1501])
    half = pk.PathKernelInfluence(
        model,
        data,
        path,
        torch.nn.CrossEntropyLoss(),
        show_progress=False,
        feature_dtype=torch.float16,
        **kwargs,
    ).attribute(x[1500:1504], target=y[1500:1504])
    scale = float(first.contributions.abs().max())
    assert float((half.contributions - first.contributions).abs().max()) < 1e-2 * scale


def test_query_chunks_check_the_steps_once_and_report_it_with_every_chunk(run):
    model, data, path = run
    x, y = digits()
    wrong = torch.nn.CrossEntropyLoss(reduction="sum")  # recorded with "mean": steps not rebuilt

    def explain(**kwargs):
        explainer = pk.PathKernelInfluence(
            model, data, path, wrong, show_progress=False, quadrature=3, projection_dim=16, **kwargs
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dec = explainer.attribute(x[1500:1504], target=y[1500:1504])
        return dec, [w for w in caught if issubclass(w.category, pk.ReconstructionWarning)]

    whole, warned = explain()
    chunked, warned_chunked = explain(memory_budget=20_000)  # one query per chunk
    assert len(warned) == len(warned_chunked) == 1
    errors = whole.diagnostics.reconstruction_error
    assert float(errors.min()) > 1e-2
    torch.testing.assert_close(chunked.diagnostics.reconstruction_error, errors, rtol=0, atol=0)
    torch.testing.assert_close(chunked.contributions, whole.contributions, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(chunked.bias, whole.bias, rtol=1e-10, atol=1e-12)


def test_bad_projection_options_are_refused(run):
    with pytest.raises(ValueError, match="'gaussian'"):
        make(run, projection_dim=8, projector="fourier")
    with pytest.raises(ValueError, match="positive"):
        make(run, projection_dim=0)
    x, y = digits()
    with pytest.raises(pk.UnsupportedError, match="kernel"):
        make(run, projection_dim=8).attribute(x[:1], target=y[:1], kernel=True)


def test_a_projection_to_at_least_d_dimensions_warns_that_it_only_adds_noise(run):
    model = run[0]
    d = sum(p.numel() for p in model.parameters())  # digits_mlp(hidden=8): 610
    for kind in ("gaussian", "rademacher", "sparse"):
        with pytest.warns(pk.PkAttribWarning, match=f"projection_dim={d} is at least the {d} "):
            make(run, projection_dim=d, projector=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(run, projection_dim=d - 1)  # projects: fewer numbers than the gradients
        make(run, projection_dim=d, projector="factorized")  # leaves what fits unprojected


def test_an_in_memory_feature_cache_keeps_within_the_memory_budget(run):
    """Without a store, cached training features take at most ``memory_budget`` bytes; what
    does not fit is recomputed when needed, to the same numbers. Features come first: batch
    gradients (one backward pass to recompute) make room for them."""
    x, y = digits()
    queries = (x[1500:1504], y[1500:1504])
    roomy = make(run, projection_dim=32)
    first = roomy.attribute(*queries)
    assert roomy.attribute(*queries).diagnostics.train_gradients == 0  # all kept
    memory = roomy._features._memory
    features = sum(t.numel() * t.element_size() for k, t in memory.items() if k[0] == "f")
    assert features < sum(t.numel() * t.element_size() for t in memory.values())  # + gradients
    exact_fit = make(run, projection_dim=32, memory_budget=features)
    exact_fit.attribute(*queries)
    assert {k for k in exact_fit._features._memory} == {k for k in memory if k[0] == "f"}
    assert exact_fit.attribute(*queries).diagnostics.train_gradients == 0
    tight = make(run, projection_dim=32, memory_budget=features // 2)
    assert tight._query_chunk() < 4  # (several chunks share the cache)
    once = tight.attribute(*queries)
    assert 0 < tight._features._memory_used <= features // 2
    again = tight.attribute(*queries)  # what did not fit is computed again
    assert again.diagnostics.train_gradients > 0
    torch.testing.assert_close(once.contributions, first.contributions, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(again.contributions, first.contributions, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(again.delta, first.delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "factorized"])
def test_influence_uses_the_projection_in_memory_bounded_chunks_and_blocks(run, kind):
    """influence() scores are the projected sweep's contributions to −loss, whether the
    queries come in one chunk or one by one and the training set in one block or in 7s."""
    from pk_attrib.engine.scores import negative_loss

    x, y = digits()
    queries = (x[1500:1505], y[1500:1505])
    ex = make(run, projection_dim=64, projector=kind, cache_features=False)
    scores = ex.influence(queries)
    loss = negative_loss(torch.nn.CrossEntropyLoss())
    projected = ex.attribute(*queries, output_fn=loss).contributions
    torch.testing.assert_close(scores, projected, rtol=1e-12, atol=1e-15)
    exact = make(run).influence(queries)
    assert not torch.allclose(scores, exact, rtol=1e-3)  # projected, not the exact scores
    tiny = make(
        run, projection_dim=64, projector=kind, memory_budget=5 * 7 * 8 * 4, cache_features=False
    )  # (a feature cache would keep float32 features)
    assert block_size(tiny, 5) == 7 and tiny._query_chunk() == 1
    top = tiny.influence(queries, k=4)
    order = torch.sort(scores, dim=1, descending=True)
    torch.testing.assert_close(top.influence_scores, order.values[:, :4], rtol=1e-10, atol=1e-14)
    assert torch.equal(top.indices, order.indices[:, :4])
    # the bounds' sides accumulate across query chunks and training blocks alike
    cosine = ex.influence(queries, score="cosine")
    torch.testing.assert_close(
        tiny.influence(queries, score="cosine"), cosine, rtol=1e-10, atol=1e-14
    )
    assert float(cosine.abs().max()) > 0.1  # not all zero


@pytest.mark.parametrize("model", USES[1:])
def test_linear_layers_used_in_unusual_ways_give_exact_numbers_or_an_error(model):
    """The per-layer shortcuts (checkpoint mode's dot products, factorized features) take a
    layer's gradient from its captured calls: every call counts, flattened (B·T, in) inputs
    are regrouped, and a weight also used outside its module or a time-major input is
    caught (checkpoint mode: the general path; factorized: an error)."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(45)
    net = Reused(model).to(F64)
    names = [n for n, _ in net.named_parameters()]
    fm = FunctionalModel(net, names, {n: p.shape for n, p in net.named_parameters()}, F64)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(6)
    t = 7 if model == "time major" else 3  # T = B = 7 for the queries: looks batch-first
    x, y = torch.randn(7, t, 5, dtype=F64, generator=g), torch.randint(0, 3, (7,), generator=g)
    data = TensorDataset(torch.randn(12, t, 5, dtype=F64, generator=g), torch.randint(0, 3, (12,)))
    optimizer, states = torch.optim.SGD(net.parameters(), lr=0.1), []
    for _ in range(2):
        for i in range(0, 12, 4):
            optimizer.zero_grad()
            loss_fn(net(data.tensors[0][i : i + 4]), data.tensors[1][i : i + 4]).backward()
            optimizer.step()
        states.append({n: t.detach().clone() for n, t in net.state_dict().items()})
    path = pk.TrainingPath.from_checkpoints(states, [0.1, 0.2])
    ex = pk.PathKernelInfluence(net, data, path, loss_fn, mode="checkpoint", show_progress=False)
    expected = torch.zeros(7, 12, dtype=F64)
    for state, lr in zip(states, [0.1, 0.2], strict=True):
        w = fm.flatten({n: state[n] for n in names})
        expected += (
            lr * fm.loss_grads(w, (x, y), loss_fn) @ fm.loss_grads(w, data.tensors, loss_fn).T
        )
    torch.testing.assert_close(ex.influence((x, y)), expected, rtol=1e-10, atol=1e-14)

    proj = make_projector(fm, "factorized", 16, seed=5)
    w = fm.flatten(dict(net.named_parameters())).detach()
    if model not in REBUILT:
        if model == "time major":  # one example alone has nothing to group: no verdict yet
            proj.training_features(w, (x[:1], y[:1]), loss_fn)
        with pytest.raises(pk.UnsupportedError, match="do not add up"):
            proj.training_features(w, (x, y), loss_fn)
        return
    features = proj.training_features(w, (x, y), loss_fn)
    expected = proj.project(fm.loss_grads(w, (x, y), loss_fn))
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-13)


def test_feature_caches_of_another_hash_algorithm_are_kept_apart(run, tmp_path, monkeypatch):
    """A cache an earlier version wrote (sha256 entries) is neither read nor overwritten."""
    import pk_attrib.explain.projected as explainer

    model, data, path = run
    stored = path.save(tmp_path / "store")
    x, y = digits()
    kwargs = dict(projection_dim=32, projector="sparse", projection_seed=1, show_progress=False)
    loss = torch.nn.CrossEntropyLoss()
    first = pk.PathKernelInfluence(model, data, stored, loss, **kwargs).attribute(
        x[1500:1502], target=y[1500:1502]
    )
    monkeypatch.setattr(explainer, "HASH", "sha256")  # as if written by another version
    other = pk.PathKernelInfluence(model, data, stored, loss, **kwargs).attribute(
        x[1500:1502], target=y[1500:1502]
    )
    assert other.diagnostics.train_gradients == first.diagnostics.train_gradients  # recomputed
    assert len(list((tmp_path / "store" / "features").glob("*/index.json"))) == 2
