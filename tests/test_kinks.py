"""Kinked models (ReLU, max-pooling): the default quadrature splits each query's step at its
switches, and matches the float64 reference split at the switch points computed in closed
form, to rounding."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import pk_attrib as pk
from pk_attrib.engine.functional import FunctionalModel
from pk_attrib.engine.outputs import select_output
from pk_attrib.engine.quadrature import QuadratureRule, StepIntegrator
from pk_attrib.testing import reference_decomposition

F64 = torch.float64
EPS = torch.finfo(F64).eps


def relu_mlp(hidden=16):
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).to(F64)


def relu_maxpool_cnn():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).to(F64)


# -- an independent reference: the switch points in closed form --------------------------------


def switch_points(model, path, x):
    """``breaks`` for `reference_decomposition`, in closed form: the first layer's outputs
    z(t) = z_0 + t z_d are linear in t along a step (a linear or convolutional layer is linear
    in its weights), so a ReLU switches at t = −z_0/z_d, and a 2x2 max-pooling window of
    ReLU outputs where two of its lines cross at the window's maximum. Extra points would do
    no harm (a smooth piece split in two is integrated as exactly)."""
    names, shapes = path.param_names, path.param_shapes
    first = model[0] if isinstance(model[0], torch.nn.Linear) else model[1]
    weight, bias = names[:2]

    def layer(flat, j):
        parts = torch.split(flat, [shapes[n].numel() for n in names])
        p = {n: t.reshape(shapes[n]) for n, t in zip(names, parts, strict=True)}
        if isinstance(first, torch.nn.Linear):
            return F.linear(x[j : j + 1], p[weight], p[bias])
        return F.conv2d(x[j : j + 1].reshape(1, 1, 8, 8), p[weight], p[bias], padding=1)

    def breaks(w, delta, j):
        z0, zd = layer(w, j), layer(delta, j)  # (the layer is linear in its parameters)
        roots = -z0 / zd
        points = roots[(roots > 0) & (roots < 1)].tolist()
        if isinstance(first, torch.nn.Conv2d):  # windows of 2x2 ReLU outputs: (windows, 4)
            c = z0.shape[1]

            def windows(z):
                return z.reshape(c, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)

            a, b = windows(z0), windows(zd)
            for i in range(4):
                for k in range(i + 1, 4):
                    tau = (a[:, k] - a[:, i]) / (b[:, i] - b[:, k])
                    h = (a + tau[:, None] * b).clamp_min(0)  # the window at the crossing
                    top = h.amax(1)
                    at_top = (h[:, i] > 0) & (h[:, i] >= top - 1e-12 * top.abs().clamp_min(1))
                    hit = (tau > 0) & (tau < 1) & at_top
                    points += tau[hit].tolist()
        return points

    return breaks


def record(model, optimizer, n=200, epochs=10, batch_size=20, seed=0):
    from test_engine import digits

    x, y = digits()
    data = torch.utils.data.TensorDataset(x[:n], y[:n])
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    with pk.PathRecorder(model, optimizer) as recorder:
        for _ in range(epochs):
            for xb, yb in recorder.watch(loader):
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
    model.eval()
    return data, recorder.path


CASES = {  # (model, optimizer, examples, epochs, batch size, queries)
    "mlp_sgd": (relu_mlp, lambda p: torch.optim.SGD(p, lr=0.5), 200, 3, 20, 3),
    "mlp_adam": (relu_mlp, lambda p: torch.optim.Adam(p, lr=0.01), 200, 3, 20, 3),
    "cnn_sgd": (relu_maxpool_cnn, lambda p: torch.optim.SGD(p, lr=0.2), 100, 3, 20, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kinked_models_are_exact_with_the_default_quadrature(case):
    """Max relative delta <= 1e-8 without a QuadratureWarning; contributions equal the
    reference split at the switch points computed in closed form.

    Tolerance: both sides sum, over S <= 50 steps, products of d ~ 1,000 terms (rounding
    <= S sqrt(d) eps ~ 4e-13 of the largest contribution), and place each split point at the
    root of a linear function (to rounding: its error on φ_s is of the same order unless a
    slope is ~1e-3 of its terms); 1e-10 of the largest contribution bounds both (measured:
    6e-16).
    """
    make, optimizer, n, epochs, batch, n_queries = CASES[case]
    torch.manual_seed(0)
    model = make()
    data, path = record(model, optimizer(model.parameters()), n, epochs, batch)
    from test_engine import digits

    x, y = digits()
    queries, target = x[1500 : 1500 + n_queries], y[1500 : 1500 + n_queries]
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.QuadratureWarning)
        dec = explainer.attribute(queries, target=target)
    assert float(dec.relative_delta.max()) <= 1e-8
    nodes = dec.diagnostics.nodes
    assert int(nodes.max()) > 2, "no step was split: the case does not test kinks"
    ref = reference_decomposition(
        model,
        data,
        path,
        torch.nn.CrossEntropyLoss(),
        queries,
        target,
        q=2,
        breaks=switch_points(model, path, queries),
    )
    scale = ref["contributions"].abs().amax(1, keepdim=True)
    assert float(((dec.contributions - ref["contributions"]).abs() / scale).max()) <= 1e-10
    torch.testing.assert_close(dec.prediction, ref["prediction"], rtol=1e-12, atol=1e-14)


def test_a_kink_at_a_known_point_is_found_and_integrated_in_closed_form():
    """f(x; w) = a relu(u x + c) + b along w_0 + tΔ: the input crosses 0 at t = 0.3 for x = 1
    and at t = 5/6 for x = 0.6; φ = ∫_0^1 ∇f dt has a closed form."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 1))
    model = model.to(F64)
    names = [n for n, _ in model.named_parameters()]  # u, c, a, b
    shapes = {n: p.shape for n, p in model.named_parameters()}
    fm = FunctionalModel(model, names, shapes, F64)
    u0, c0, a0, b0 = 0.5, -0.8, 1.5, 0.1
    du, dc, da, db = 1.0, 0.0, 0.4, 0.05
    w = torch.tensor([u0, c0, a0, b0], dtype=F64)
    delta = torch.tensor([du, dc, da, db], dtype=F64)
    x = torch.tensor([[1.0], [0.6]], dtype=F64)
    rule = QuadratureRule.parse("adaptive", None, F64)
    integrator = StepIntegrator(fm, rule, (x,), None, select_output)
    f0 = select_output(fm.outputs(w, (x,)), None)
    f1 = select_output(fm.outputs(w + delta, (x,)), None)
    phi, nodes = integrator.integrate(w, delta, f1 - f0, torch.zeros(2, dtype=F64))

    expected = []
    for xj in (1.0, 0.6):
        z0, dz = u0 * xj + c0, du * xj + dc
        tau = -z0 / dz  # where the ReLU's input crosses 0
        A = a0 * (1 - tau) + da * (1 - tau**2) / 2  # ∫_τ^1 a(t) dt
        Z = z0 * (1 - tau) + dz * (1 - tau**2) / 2  # ∫_τ^1 z(t) dt
        expected.append([xj * A, A, Z, 1.0])
    expected = torch.tensor(expected, dtype=F64)
    # a few roundings of each node's gradient (values of order 1) and of the split point
    torch.testing.assert_close(phi, expected, rtol=0, atol=64 * EPS)
    cuts = integrator._kinks.cuts
    assert cuts[0] == pytest.approx([0.3], abs=64 * EPS)
    assert cuts[1] == pytest.approx([5 / 6], abs=64 * EPS)
    assert nodes == 4  # two pieces of 2 Gauss–Legendre nodes
    assert integrator.unconverged == []


def test_a_deeper_relu_mlp_is_exact_with_the_default_quadrature():
    """Two hidden layers: the second layer's inputs are piecewise quadratic in t, so its
    switches are located by forward passes (Illinois) where the quadratic guess fails."""
    from test_engine import digits

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 10),
    ).to(F64)
    data, path = record(model, torch.optim.SGD(model.parameters(), lr=0.5), 100, 4, 20)
    x, y = digits()
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.QuadratureWarning)
        dec = explainer.attribute(x[1500:1510], target=y[1500:1510])
    assert float(dec.relative_delta.max()) <= 1e-8
    assert int(dec.diagnostics.nodes.max()) > 2
