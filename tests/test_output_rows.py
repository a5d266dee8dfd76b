"""An output_fn or a training loss that torch.func.vmap cannot batch: no per-example loop.

Such functions (a margin written with ``one_hot`` and ``masked_fill``, as people write it) are
called once on a batched forward's outputs; each example's gradient is the vector-Jacobian
product of its row (pk_attrib.engine.rows). Every number is compared with the float64
reference, which calls them on batches of one with ``backward()``.
"""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.exceptions import RowDependenceError
from pk_attrib.testing import per_example_gradients, reference_decomposition

F64 = torch.float64
ROWS, VMAP = "batched forward + row VJP", "vmap(grad)"
# agreement with the reference: both sides sum O(d) float64 products per step over a few
# dozen steps; 1e-10 of the largest contribution leaves room for that rounding (~1e-13)
TOL = 1e-10


@functools.lru_cache(maxsize=1)
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=F64) / 16.0, torch.tensor(data.target)


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10)
    ).to(F64)


class WithAux(torch.nn.Module):
    """Returns (logits, aux): output_fn reads the logits of a tuple."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        logits = self.net(x)
        return logits, {"hidden": x[:, :3] * 2.0}


def margin_one_hot(outputs, target):
    """The target's logit minus the log-sum-exp of the others, with one_hot and masked_fill."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    hot = F.one_hot(target, logits.shape[-1]).bool()
    own = logits.masked_fill(~hot, 0.0).sum(-1)
    return own - logits.masked_fill(hot, float("-inf")).logsumexp(-1)


def margin_gather(outputs, target):
    """The same margin with gather and scatter (vmap batches it)."""
    own = outputs.gather(1, target[:, None])[:, 0]
    return own - outputs.scatter(1, target[:, None], float("-inf")).logsumexp(-1)


def smoothed_loss(outputs, labels, eps=0.1):
    """Label-smoothed cross-entropy written with one_hot (mean over the batch)."""
    soft = F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype) * (1 - eps) + eps / 10
    return -(soft * outputs.log_softmax(-1)).sum(-1).mean()


def record(model, data, loss_fn, epochs=2, batch_size=10):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    with pk.PathRecorder(model, optimizer) as recorder:
        for _ in range(epochs):
            for x, y in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
    model.eval()
    return recorder.path


def trained(model=None, n=40, loss_fn=None, seed=0):
    torch.manual_seed(seed)
    model = model or mlp()
    x, y = digits()
    data = TensorDataset(x[:n], y[:n])
    path = record(model, data, loss_fn or torch.nn.CrossEntropyLoss())
    return model, data, path


def relative_error(found, expected):
    return float((found - expected).abs().max() / expected.abs().max())


def test_vmap_cannot_batch_these_functions():
    """(What the tests below rely on: otherwise they would not test the row route.)"""
    out, t = torch.randn(3, 10, dtype=F64), torch.tensor([1, 2, 3])
    for fn in (margin_one_hot, smoothed_loss):
        with pytest.raises(RuntimeError, match="vmap"):
            vmap(grad(lambda o, y, fn=fn: fn(o[None], y[None]).sum()))(out, t)


def test_one_hot_margin_output_fn_equals_the_reference_without_a_loop():
    model, data, path = trained()
    x, y = digits()
    queries, target = x[1500:1506], y[1500:1506]
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), quadrature=4, show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        dec = explainer.attribute(queries, target, output_fn=margin_one_hot)
    assert dec.diagnostics.routes == {"output_fn": ROWS, "loss_fn": VMAP}
    ref = reference_decomposition(
        model, data, path, torch.nn.CrossEntropyLoss(), queries, target, q=4,
        output_fn=margin_one_hot,
    )  # fmt: skip
    assert relative_error(dec.contributions, ref["contributions"]) <= TOL
    torch.testing.assert_close(dec.prediction, ref["prediction"], rtol=1e-12, atol=1e-13)
    # the loss side kept vmap: the output_fn's failure did not make the model loop
    assert not explainer._fm.looped


def test_the_margin_with_and_without_one_hot_gives_the_same_decomposition():
    model, data, path = trained(seed=1)
    x, y = digits()
    queries, target = x[1500:1505], y[1500:1505]
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        rows = explainer.attribute(queries, target, output_fn=margin_one_hot)
        vmapped = explainer.attribute(queries, target, output_fn=margin_gather)
    assert rows.diagnostics.routes["output_fn"] == ROWS
    assert vmapped.diagnostics.routes["output_fn"] == VMAP
    assert relative_error(rows.contributions, vmapped.contributions) <= TOL
    torch.testing.assert_close(rows.bias, vmapped.bias, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rows.prediction, vmapped.prediction, rtol=1e-12, atol=1e-13)


def test_a_loss_vmap_cannot_batch_equals_the_reference_and_its_kernel_the_vmapped_ones():
    loss_fn = smoothed_loss
    model, data, path = trained(loss_fn=loss_fn, seed=2)
    x, y = digits()
    queries, target = x[1500:1504], y[1500:1504]
    explainer = pk.PathKernelInfluence(
        model, data, path, loss_fn, loss_reduction="mean", quadrature=4, show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        dec = explainer.attribute(queries, target, kernel=True)
    assert dec.diagnostics.routes == {"output_fn": VMAP, "loss_fn": ROWS}
    ref = reference_decomposition(
        model, data, path, loss_fn, queries, target, q=4, loss_reduction="mean"
    )
    assert relative_error(dec.contributions, ref["contributions"]) <= TOL
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    # the same loss as PyTorch writes it (vmap batches it): the same kernel and weights
    same = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    vmapped = pk.PathKernelInfluence(
        model, data, path, same, quadrature=4, show_progress=False
    ).attribute(queries, target, kernel=True)
    assert vmapped.diagnostics.routes["loss_fn"] == VMAP
    assert relative_error(dec.kernel, vmapped.kernel) <= TOL
    assert relative_error(dec.contributions, vmapped.contributions) <= TOL
    # the Captum contract: the test loss (-loss as the explained output) and the training
    # losses both take the row route, and give the vmapped loss's scores
    reference = pk.PathKernelInfluence(model, data, path, same, show_progress=False)
    explainer = pk.PathKernelInfluence(
        model, data, path, loss_fn, loss_reduction="mean", show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        scores = explainer.influence((queries, target))
        self_scores = explainer.self_influence()
    assert explainer._fm.routes == {"output_fn": ROWS, "loss_fn": ROWS}
    assert relative_error(scores, reference.influence((queries, target))) <= TOL
    assert relative_error(self_scores, reference.self_influence()) <= TOL


def test_each_row_route_gives_the_backward_loop_per_example_gradients():
    model, data, path = trained(seed=3)
    names = path.param_names
    fm = FunctionalModel(model, names, path.param_shapes, F64)
    x, y = digits()
    w0, w1 = fm.flatten(path.params(0)), fm.flatten(path.params(len(path)))
    batch = (x[:6], y[:6])

    def margin_loss(out, t):  # a loss written with one_hot: vmap cannot batch it
        return -margin_one_hot(out, t)

    slow = per_example_gradients(model, names, w1, batch, margin_loss)
    assert relative_error(fm.loss_grads(w1, batch, margin_loss), slow) <= TOL
    ws = torch.stack([w0, w1]).repeat_interleave(3, 0)  # each example at its own point
    by_point = torch.cat(
        [per_example_gradients(model, names, w, (x[3 * k : 3 * k + 3], y[3 * k : 3 * k + 3]),
                               margin_loss) for k, w in enumerate((w0, w1))]
    )  # fmt: skip
    assert relative_error(fm.loss_grads_at(ws, batch, margin_loss), by_point) <= TOL
    by_step = fm.loss_grads_by_step(torch.stack([w0, w1]), batch, margin_loss)
    assert relative_error(by_step, by_point) <= TOL
    assert fm.routes["loss_fn"] == ROWS
    assert fm._vectorized.get(margin_loss) is True  # its rows' losses in one vmapped forward

    def odd_twice(out, t):  # .item(): vmap cannot even run its forward: called row by row
        return F.cross_entropy(out, t) * (2.0 if int(t[0].item()) % 2 else 1.0)

    slow = per_example_gradients(model, names, w1, batch, odd_twice)
    assert relative_error(fm.loss_grads(w1, batch, odd_twice), slow) <= TOL
    assert fm.routes["loss_fn"] == ROWS and fm._vectorized.get(odd_twice) is False
    # queries at two points: one output gradient per query and point
    points = torch.stack([w0, w1])
    grads, values = fm.output_grads(points, (x[1500:1505],), y[1500:1505], margin_one_hot)
    assert fm.routes["output_fn"] == ROWS and not fm.looped
    for k, w in enumerate((w0, w1)):
        expected = per_example_gradients(model, names, w, (x[1500:1505], y[1500:1505]),
                                         margin_one_hot)  # fmt: skip
        assert relative_error(grads[k], expected) <= TOL
        with torch.no_grad():
            fm_out = fm.outputs(w, (x[1500:1505],))
        torch.testing.assert_close(values[k], margin_one_hot(fm_out, y[1500:1505]))


def test_tuple_outputs_read_by_an_output_fn_vmap_cannot_batch():
    model, data, path = trained(
        model=WithAux().to(F64), loss_fn=lambda out, y: F.cross_entropy(out[0], y), seed=4
    )
    x, y = digits()
    queries, target = x[1500:1504], y[1500:1504]

    def loss_fn(out, labels):
        return F.cross_entropy(out[0], labels)

    explainer = pk.PathKernelInfluence(
        model, data, path, loss_fn, loss_reduction="mean", quadrature=4, show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        dec = explainer.attribute(queries, target, output_fn=margin_one_hot)
    assert dec.diagnostics.routes["output_fn"] == ROWS
    ref = reference_decomposition(
        model, data, path, loss_fn, queries, target, q=4, output_fn=margin_one_hot
    )
    assert relative_error(dec.contributions, ref["contributions"]) <= TOL


def test_an_output_fn_that_reads_other_queries_is_refused():
    model, data, path = trained(seed=5)
    x, y = digits()
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )

    def centred(outputs, target):  # the logit minus the batch's mean logit
        logit = outputs.gather(1, target[:, None])[:, 0]
        return logit - logit.mean()

    def centred_detached(outputs, target):  # the same, its gradient blind to the others
        logit = outputs.gather(1, target[:, None])[:, 0]
        return logit - logit.detach().mean()

    for fn in (centred, centred_detached):
        with pytest.raises(RowDependenceError, match=fn.__name__) as caught:
            explainer.attribute(x[1500:1504], y[1500:1504], output_fn=fn)
        assert isinstance(caught.value, ValueError)
        assert "other queries" in str(caught.value)
    # a single query has no other rows to read: nothing to refuse (its value is then 0)
    alone = explainer.attribute(x[1500:1501], y[1500:1501], output_fn=centred)
    assert float(alone.prediction.abs().max()) == 0.0


def test_batchnorm_statistics_along_the_path_with_one_hot_output_fn_and_loss():
    """Train-mode BatchNorm: replayed steps, and the running statistics' part of the query
    gradient (their own quadrature) takes the row route too. (Compared with the gather
    margin, which vmap batches, on the same explainer: test_replay.py compares that route
    with the float64 reference, whose BatchNorm part takes a minute here.)"""
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(48, 10),
    ).to(F64)
    model, data, path = trained(model=model, n=20, loss_fn=smoothed_loss, seed=6)
    x, y = digits()
    queries, target = x[1500:1503], y[1500:1503]
    explainer = pk.PathKernelInfluence(
        model, data, path, smoothed_loss, loss_reduction="mean", quadrature=4,
        show_progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.VectorizationWarning)
        dec = explainer.attribute(queries, target, output_fn=margin_one_hot)
    assert explainer._engine.replay is not None and "buffers" in dec.terms
    assert dec.diagnostics.routes == {"output_fn": ROWS, "loss_fn": "replayed batch + row VJP"}
    vmapped = explainer.attribute(queries, target, output_fn=margin_gather)
    assert vmapped.diagnostics.routes["output_fn"] == VMAP
    assert relative_error(dec.contributions, vmapped.contributions) <= TOL
    for name, term in dec.terms.items():  # the buffers' own share included
        torch.testing.assert_close(term, vmapped.terms[name], rtol=1e-10, atol=1e-13)


def test_outputs_without_a_row_per_query_fall_back_to_one_query_at_a_time():
    """Two output rows per example: the row route cannot cut them per query, so an output_fn
    vmap cannot batch is taken one query at a time, as before (and says so)."""

    class TwoRows(torch.nn.Module):  # (B, 64) -> (2B, 10)
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x.reshape(-1, 2, 32).repeat(1, 1, 2).reshape(-1, 64))

    def pairs_loss(out, labels):
        return F.cross_entropy(out.reshape(-1, 20), labels)

    def first_margin(out, target):
        return margin_one_hot(out.reshape(-1, 20)[:, :10], target)

    model, data, path = trained(model=TwoRows(), n=20, loss_fn=pairs_loss, seed=7)
    x, y = digits()
    queries, target = x[1500:1503], y[1500:1503]
    explainer = pk.PathKernelInfluence(
        model, data, path, pairs_loss, loss_reduction="mean", quadrature=4, show_progress=False
    )
    with pytest.warns(pk.VectorizationWarning):
        dec = explainer.attribute(queries, target, output_fn=first_margin)
    assert dec.diagnostics.routes["output_fn"] == "one example at a time"
    ref = reference_decomposition(
        model, data, path, pairs_loss, queries, target, q=4, output_fn=first_margin
    )
    assert relative_error(dec.contributions, ref["contributions"]) <= TOL
