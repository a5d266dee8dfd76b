"""The exact rules of RMSprop, Adagrad, Adamax, NAdam and RAdam: completeness, agreement with
the float64 reference, float32, schedulers and the step check (issue 17).

SGD and Adam are covered by test_engine.py; counterfactual scores of every optimizer by
test_counterfactual.py.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import pk_attrib as pk
from pk_attrib.engine.steps import WARN_RECONSTRUCTION
from pk_attrib.testing import reference_decomposition

F64 = torch.float64
N, BATCH, STEPS = 30, 10, 9  # RAdam (β2 = 0.999) rectifies from step count 6 on

OPTIMIZERS = {
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True),
    "rmsprop_centered_momentum_wd_maximize": lambda p: torch.optim.RMSprop(
        p, lr=0.005, momentum=0.5, centered=True, weight_decay=0.05, maximize=True
    ),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "adagrad_lr_decay_wd_accumulator": lambda p: torch.optim.Adagrad(
        p, lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.1
    ),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.02),
    "adamax_wd_maximize": lambda p: torch.optim.Adamax(
        p, lr=0.02, weight_decay=0.05, maximize=True
    ),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.02),
    "nadam_l2": lambda p: torch.optim.NAdam(p, lr=0.02, weight_decay=0.05, momentum_decay=0.01),
    "nadam_decoupled": lambda p: torch.optim.NAdam(
        p, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.02),
    "radam_l2_maximize": lambda p: torch.optim.RAdam(p, lr=0.02, weight_decay=0.05, maximize=True),
    "radam_decoupled": lambda p: torch.optim.RAdam(
        p, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=1)
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=F64) / 16.0, torch.tensor(data.target)


def digits_mlp(dtype=F64):
    return torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10)).to(
        dtype
    )


def run(make, dtype=F64, steps=STEPS, scheduler=None, fault_at=None, seed=1):
    """Train the digits MLP on consecutive batches, recorded: (model, data, path).

    ``scheduler``: made from the optimizer, stepped after each step. ``fault_at``: the step
    whose gradient is halved before the optimizer uses it (what the loss does not say).
    """
    torch.manual_seed(seed)
    model = digits_mlp(dtype)
    x, y = digits()
    data = TensorDataset(x[:N].to(dtype), y[:N])
    optimizer = make(model.parameters())
    schedule = None if scheduler is None else scheduler(optimizer)
    with pk.PathRecorder(model, optimizer) as recorder:
        for s in range(steps):
            idx = torch.arange(s * BATCH, (s + 1) * BATCH) % N
            recorder.record_batch(idx)
            optimizer.zero_grad()
            F.cross_entropy(model(data.tensors[0][idx]), y[idx]).backward()
            if s == fault_at:
                for p in model.parameters():
                    p.grad.mul_(0.5)
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return model.eval(), data, recorder.path


def explain(model, data, path, queries=slice(1500, 1503), **options):
    x, y = digits()
    explainer = pk.PathKernelInfluence(
        model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False, **options
    )
    q = x[queries].to(next(model.parameters()).dtype)
    return explainer.attribute(q, target=y[queries])


def against_the_reference(model, data, path, q=4):
    """The engine's contributions and terms equal the float64 reference's (fixed q nodes)."""
    x, y = digits()
    dec = explain(model, data, path, quadrature=q)
    ref = reference_decomposition(
        model, data, path, torch.nn.CrossEntropyLoss(), x[1500:1503], y[1500:1503], q=q
    )
    scale = ref["contributions"].abs().amax(1, keepdim=True)
    assert float(((dec.contributions - ref["contributions"]).abs() / scale).max()) <= 1e-8
    # (the reference's own bookkeeping: its terms add up to the exact Σ_s φ_s · Δ_s)
    explained = ref["contributions"].sum(1) + ref["weight_decay"] + ref["optimizer_state"]
    torch.testing.assert_close(explained, ref["change"], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(
        dec.terms["weight_decay"], ref["weight_decay"], rtol=1e-8, atol=1e-14
    )
    torch.testing.assert_close(
        dec.terms["optimizer_state"], ref["optimizer_state"], rtol=1e-8, atol=1e-14
    )
    torch.testing.assert_close(dec.prediction, ref["prediction"], rtol=1e-12, atol=1e-14)
    return dec, ref


def rectified(path) -> list[bool]:
    """Per step, whether RAdam rectified it (ρ_t > 5 at its step count t), from the formula."""
    beta2 = path.optimizer["groups"][0]["hyper"]["betas"][1]
    rho_inf = 2 / (1 - beta2) - 1
    out = []
    for s in range(len(path)):
        t = float(next(iter(path.step(s).optimizer_state["step"].values())))
        out.append(rho_inf - 2 * t * beta2**t / (1 - beta2**t) > 5)
    return out


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_exact_and_equal_to_the_float64_reference(opt):
    """Completeness to 1e-8 of the output change with the default quadrature, every step
    rebuilt to rounding (no ReconstructionWarning: warnings are errors), nothing unexplained,
    and the contributions of the float64 reference (its own forward route: a buffer per
    example) to 1e-8 of the largest."""
    model, data, path = run(OPTIMIZERS[opt])
    assert path.optimizer["kind"] == opt.split("_")[0] and path.optimizer["exact"]
    dec = explain(model, data, path, queries=slice(1500, 1506))
    assert dec.diagnostics.mode == "exact"
    assert float(dec.relative_delta.max()) <= 1e-8
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    change = (dec.prediction - dec.terms["initial"]).abs()
    assert bool((dec.terms["unexplained"].abs() <= 1e-8 * change).all())
    total = dec.bias + dec.contributions.sum(1) + dec.delta
    torch.testing.assert_close(total, dec.prediction, rtol=0, atol=1e-13)
    _, ref = against_the_reference(model, data, path)
    if "wd" in opt or "l2" in opt or "decoupled" in opt:
        assert float(ref["weight_decay"].abs().min()) > 1e-4  # the decay term is checked
    if opt.startswith("radam"):  # the run crosses the rectification threshold
        assert rectified(path) == [False] * 5 + [True] * (STEPS - 5)


@pytest.mark.parametrize(
    ("opt", "scheduler"),
    [
        (  # lr and momentum both change every step
            "rmsprop_momentum",
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=STEPS),
        ),
        ("adagrad", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
        ("adamax", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)),
        ("nadam_decoupled", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: e / 3)),
        ("radam", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)),
    ],
    ids=["rmsprop_onecycle", "adagrad_step", "adamax_exponential", "nadam_warm_up", "radam_cos"],
)
def test_a_scheduler_changing_the_learning_rate(opt, scheduler):
    """Learning rates (and RMSprop's momentum, under OneCycleLR) recorded per step; NAdam's
    warm-up starts at lr 0, where Δ_0 does not show the first moment (the check carries it)."""
    model, data, path = run(OPTIMIZERS[opt], scheduler=scheduler)
    lrs = path.learning_rates[:, 0]
    assert len(set(lrs.tolist())) > 2
    if opt == "rmsprop_momentum":
        momenta = {path.step(s).hyper[0]["momentum"] for s in range(STEPS)}
        assert len(momenta) > 2
    if opt == "nadam_decoupled":
        assert float(lrs[0]) == 0.0
    dec, _ = against_the_reference(model, data, path)
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    assert not dec.diagnostics.reconstruction_error.isnan().any()  # every step was checked


def _two_groups(optimizer, first: dict, second: dict):
    """The optimizer over the MLP's two layers, with ``first`` and ``second`` per layer."""

    def make(params):
        params = list(params)
        return optimizer([{"params": params[:2], **first}, {"params": params[2:], **second}])

    return make


@pytest.mark.parametrize(
    "make",
    [
        _two_groups(
            torch.optim.RMSprop, dict(lr=0.01, centered=True), dict(lr=0.005, momentum=0.9)
        ),
        _two_groups(
            torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.1), dict(lr=0.05, weight_decay=0.1)
        ),
        _two_groups(torch.optim.Adamax, dict(lr=0.02, betas=(0.8, 0.99)), dict(lr=0.01)),
        _two_groups(
            torch.optim.NAdam,
            dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
            dict(lr=0.01, weight_decay=0.05, momentum_decay=0.01),
        ),
        _two_groups(
            torch.optim.RAdam,
            dict(lr=0.02, betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True),
            dict(lr=0.01, weight_decay=0.05),
        ),
    ],
    ids=["rmsprop", "adagrad", "adamax", "nadam", "radam"],
)
def test_two_param_groups_with_different_settings(make):
    """Every setting is read per param group: RMSprop centered in one group and with momentum
    in the other, NAdam's and RAdam's decay decoupled in one group and coupled in the other,
    RAdam's β2 = 0.9 in one group (rectified from t = 6 as well) and 0.999 in the other."""
    model, data, path = run(make)
    assert len(path.optimizer["groups"]) == 2
    dec, _ = against_the_reference(model, data, path)
    assert dec.diagnostics.max_reconstruction_error < 1e-10


def _float32_allowance(model, path, queries, target, rtol) -> torch.Tensor:
    """What the adaptive quadrature lets |delta| reach, (n,): each step's φ_s · Δ_s within
    rtol · |f(w_S) − f(w_0)| / S of the exact output change, or of the rounding of the outputs
    that change is measured with (16 eps (|f_s| + |f_s+1| + their largest logits)), whichever
    is larger; plus the rounding of the contributions' sum."""
    net = copy.deepcopy(model)
    f, m = [], []
    for s in range(len(path) + 1):
        path.load_into(net, s)
        with torch.no_grad():
            logits = net(queries)
        f.append(logits[torch.arange(len(target)), target].abs())
        m.append(logits.abs().amax(1))
    eps = torch.finfo(torch.float32).eps
    share = rtol * (f[-1] - f[0]).abs() / len(path)
    allowed = sum(
        torch.maximum(share, 16 * eps * (f[s] + f[s + 1] + m[s] + m[s + 1]))
        for s in range(len(path))
    )
    return allowed + N * eps * (f[0] + f[-1])


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_float32_stays_at_the_rounding_floor_without_a_false_warning(opt):
    """The same runs in float32: no ReconstructionWarning or QuadratureWarning (warnings are
    errors here), and |delta| within what the float32 quadrature's tolerance and the outputs'
    rounding allow (`_float32_allowance`)."""
    model, data, path = run(OPTIMIZERS[opt], dtype=torch.float32)
    x, y = digits()
    queries, target = x[1500:1506].float(), y[1500:1506]
    dec = explain(model, data, path, queries=slice(1500, 1506))
    assert dec.diagnostics.mode == "exact" and dec.prediction.dtype == torch.float32
    assert float(dec.diagnostics.max_reconstruction_error) < WARN_RECONSTRUCTION[torch.float32]
    allowed = _float32_allowance(model, path, queries, target, rtol=1e-5)
    assert bool((dec.delta.abs() <= allowed).all()), (dec.delta, allowed)


@pytest.mark.parametrize(
    "opt",
    [
        "rmsprop",
        "rmsprop_momentum",
        "rmsprop_centered_momentum_wd_maximize",
        "adagrad_lr_decay_wd_accumulator",
        "adamax",
        "nadam_decoupled",
        "radam",
    ],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_a_halved_gradient_at_one_step_is_caught(opt, dtype):
    """The optimizer used half the gradient the loss gives at step 6 (RAdam: a rectified step):
    that step fails the check, and the warning names it. Its recorded state holds the halved
    gradient, so the checks of the other steps stand on their own, except NAdam's next one:
    NAdam's Δ_s holds G_s beside m_s, so the first moment read back from Δ_6 (with the
    gradient the loss gives) is off by the fault too, and step 7 shows it as well."""
    model, data, path = run(OPTIMIZERS[opt], dtype=dtype, fault_at=6)
    with pytest.warns(pk.ReconstructionWarning, match=r"\(step 6;"):
        dec = explain(model, data, path)
    errors = dec.diagnostics.reconstruction_error
    clean = 1e-10 if dtype == F64 else WARN_RECONSTRUCTION[torch.float32]
    assert float(errors[6]) > 0.05
    after = 8 if opt.startswith("nadam") else 7
    assert float(errors[:6].max()) < clean and float(errors[after:].max()) < clean
    assert float(dec.terms["unexplained"].abs().max()) > 1e-6  # where the fault's effect goes


def test_the_recorders_cache_of_group_hyper_sees_every_change():
    """`GroupHyper` (the hooks' cache of `group_hyper`): the same dicts while nothing moves
    (a new learning rate aside), new ones when a value is replaced, and every step anew for
    a tensor value, which may change in place; ``differs`` compares with the run's first."""
    from pk_attrib.record.optimizers import GroupHyper, group_hyper

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cache = GroupHyper([group_hyper(g) for g in opt.param_groups])
    first = cache(opt.param_groups)
    assert first == [group_hyper(g) for g in opt.param_groups] and not cache.differs
    opt.param_groups[0]["lr"] = 0.05  # (a scheduler's step)
    assert cache(opt.param_groups) is first
    opt.param_groups[0]["momentum"] = 0.8
    moved = cache(opt.param_groups)
    assert moved[0]["momentum"] == 0.8 and cache.differs
    opt.param_groups[0]["momentum"] = torch.tensor(0.5, dtype=torch.float64)
    assert cache(opt.param_groups)[0]["momentum"] == 0.5
    opt.param_groups[0]["momentum"].fill_(0.25)  # (in place: the same object)
    assert cache(opt.param_groups)[0]["momentum"] == 0.25
    opt.param_groups[0]["momentum"] = 0.9
    assert cache(opt.param_groups)[0]["momentum"] == 0.9 and not cache.differs
