"""A brute-force float64 reference for the exact decomposition, and for per-example gradients.

Obviously correct and slow: every gradient is a separate ``backward()`` call, steps are walked
**forwards**, and each training example keeps its own optimizer buffer (momentum or Adam's
first moment), so the contribution of example i at step s is read off the update directly:

    c_i(x) = Σ_s φ_s(x) · Δ_s^(i),   Δ_s^(i) = the part of Δ_s that example i's gradients made.

That is an independent route to the same numbers as the engine's backward adjoint
recursion; the tests compare the two. Use it only on small models and datasets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset

from .engine.batches import gather_examples, n_rows, take
from .engine.outputs import select_output
from .engine.quadrature import gauss_legendre
from .record.path import TrainingPath


class _Reference:
    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model = copy.deepcopy(model).double().eval()
        params = dict(self.model.named_parameters())
        self.params = [params[n] for n in names]
        for p in self.params:  # the path trained them, whatever the model's flags are now
            p.requires_grad_(True)

    def set(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def grad(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        fn().backward()
        return torch.cat(
            [
                (p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params
            ]
        )


def per_example_gradients(
    model: torch.nn.Module,
    names: list[str],
    w: torch.Tensor,
    batch: tuple,
    loss_fn: Callable,
) -> torch.Tensor:
    """g_i(w) by one ``backward()`` per example, float64 (B, d).

    ``batch`` is ``(inputs..., labels)``; an input may be a tuple / list / dict of tensors.
    """
    ref = _Reference(model, names)
    ref.set(w.double())
    *inputs, labels = batch
    inputs = pytree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        tuple(inputs),
    )
    rows = []
    for i in range(n_rows(labels)):
        x, y = take(inputs, slice(i, i + 1)), take(labels, slice(i, i + 1))
        rows.append(ref.grad(lambda x=x, y=y: loss_fn(ref.model(*x), y).sum()))
    if not rows:
        return torch.zeros(0, sum(p.numel() for p in ref.params), dtype=torch.float64)
    return torch.stack(rows)


def replayed_term_gradients(
    model: torch.nn.Module,
    names: list[str],
    path: TrainingPath,
    s: int,
    train_dataset: Dataset,
    loss_fn: Callable,
    loss_reduction: str = "mean",
) -> torch.Tensor:
    """Each example's term of step s's gradient, by rerunning its batches, float64 (B, d).

    The brute-force route to what a replayed step credits each example with: for each
    micro-batch, the random-number state it started from is restored, the model (the real
    module, in the train modes the recording noted, with the buffers the step started from)
    runs the batch, the batch loss L = loss_fn(outputs, labels) is formed as training formed
    it, and example j's term is ∇_w (c_j · O_j) with c = ∂L/∂O: one backward pass through the
    whole batch per example. Rows follow ``path.step(s).indices``.

    Args:
        model: The model (copied).
        names: The path's parameter names.
        path: A path recorded with random-number states (`Step.rng_states`).
        s: The step.
        train_dataset: Items ``(inputs..., label)``.
        loss_fn: The training loss.
        loss_reduction: How a loss returning one value per element reduces to the batch's.
    """
    step = path.step(s)
    ref = _Reference(model, names)
    ref.set(torch.cat([path.params(s)[n].reshape(-1).double() for n in names]))
    buffers = dict(ref.model.named_buffers())
    modes = step.train_modules
    rows = []
    sizes = step.batch_sizes.tolist()
    for indices, state in zip(torch.split(step.indices, sizes), step.rng_states, strict=True):
        for name, value in step.buffers.items():  # the buffers the step started from
            if name in buffers:
                buffers[name].copy_(value)
        *inputs, labels = gather_examples(train_dataset, indices)
        inputs = pytree.tree_map(
            lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
            tuple(inputs),
        )
        for name, module in ref.model.named_modules():
            module.train(False)
            module.training = modes is True or name in modes
        with torch.random.fork_rng():
            torch.set_rng_state(state[0])
            out = ref.model(*inputs)
        ref.model.eval()
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        loss = loss_fn(out, labels)
        loss = (
            loss.reshape(())
            if loss.numel() == 1
            else (loss.mean() if loss_reduction == "mean" else loss.sum())
        )
        cots = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        for j in range(n_rows(labels)):
            picked = [
                torch.zeros_like(t) if c is None else _row(c, j)
                for t, c in zip(leaves, cots, strict=True)
            ]
            grads = torch.autograd.grad(
                leaves, ref.params, picked, retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(ref.params, grads, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def _buffers_move(path: TrainingPath) -> bool:
    first, last = path.buffers(0), path.buffers(len(path))
    return any(
        k in last and v.is_floating_point() and not torch.equal(v, last[k])
        for k, v in first.items()
    )


def _set_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            if name in own:
                own[name].copy_(value)


def _initial(ref, path, flat, values, moving) -> torch.Tensor:
    """f(x; w_0) with the buffers the run started from (when they move)."""
    if moving:
        _set_buffers(ref.model, path.buffers(0))
    found = values(flat[0])
    if moving:
        _set_buffers(ref.model, path.buffers(len(path)))
    return found


def _buffer_shares(ref, model, names, path, s, train_dataset, f, n, q, w):
    """The buffers' part of step s, by brute force: (shares (n, B), whole change (n,)).

    The step's batches are rerun with the real module (train mode as recorded, from the
    recorded random-number state) and each BatchNorm layer's input is caught; example j's
    share of the running statistics' change follows their definitions (its part of the
    batch mean; of the unbiased variance). Its share of the output change is the integral
    of the directional derivative of f along the buffers' segment in the direction of that
    share: Gauss–Legendre over the segment, Richardson-extrapolated central differences
    for the derivative (no gradient with respect to a buffer is taken).
    """
    step = path.step(s)
    start, end = path.buffers(s), path.buffers(s + 1)
    norms = {
        name: m
        for name, m in ref.model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
    }
    keys = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], end[k])]
    ref.set(w)
    # each example's share, by rerunning each micro-batch
    rows = []
    running = {k: start[k].double().clone() for k in keys}
    modes = step.train_modules
    sizes = step.batch_sizes.tolist()
    for indices, state in zip(torch.split(step.indices, sizes), step.rng_states, strict=True):
        caught = {}
        hooks = [m.register_forward_pre_hook(_catch(caught, name)) for name, m in norms.items()]
        *inputs, labels = gather_examples(train_dataset, indices)
        inputs = [t.double() if t.is_floating_point() else t for t in inputs]
        for name, module in ref.model.named_modules():
            module.training = modes is True or name in modes
        saved = {k: v.clone() for k, v in ref.model.named_buffers()}
        with torch.no_grad(), torch.random.fork_rng():
            torch.set_rng_state(state[0])
            ref.model(*inputs)
        for h in hooks:
            h.remove()
        ref.model.eval()
        _set_buffers(ref.model, saved)
        b = len(indices)
        share = torch.zeros(b, 0, dtype=torch.float64)
        parts = []
        for k in keys:
            layer, kind = k.rsplit(".", 1)
            a = caught[layer].double()  # (B, C, ...)
            a = a.transpose(0, 1).reshape(a.shape[1], b, -1)
            module = norms[layer]
            m = float(module.momentum)
            mean_b = a.mean((1, 2))
            if kind == "running_mean":
                part = torch.stack([(m / b) * (a[:, j].mean(1) - running[k]) for j in range(b)])
                running[k] = running[k] + part.sum(0)
            else:
                count = a.shape[1] * a.shape[2]
                part = torch.stack(
                    [
                        m * ((a[:, j] - mean_b[:, None]) ** 2).sum(1) / (count - 1)
                        - (m / b) * running[k]
                        for j in range(b)
                    ]
                )
                running[k] = running[k] + part.sum(0)
            parts.append(part.reshape(b, -1))
        share = torch.cat(parts, 1) if parts else share
        rows.append(share)
    shares = torch.cat(rows)  # (B, d_b) over keys in order
    delta = torch.cat([(end[k].double() - start[k].double()).reshape(-1) for k in keys])
    nodes, weights = gauss_legendre(max(q, 8))

    def at(point: torch.Tensor) -> torch.Tensor:  # f of every query with these buffers
        offset, values = 0, {}
        for k in keys:
            size = start[k].numel()
            values[k] = point[offset : offset + size].reshape(start[k].shape)
            offset += size
        _set_buffers(ref.model, values)
        with torch.no_grad():
            return torch.stack([f(j) for j in range(n)])

    base = torch.cat([start[k].double().reshape(-1) for k in keys])

    def derivative(point, direction):
        def central(h):
            return (at(point + h * direction) - at(point - h * direction)) / (2 * h)

        h = 1e-4
        return (4 * central(h / 2) - central(h)) / 3

    out = torch.zeros(n, len(shares), dtype=torch.float64)
    moved = torch.zeros(n, dtype=torch.float64)
    for t, om in zip(nodes, weights, strict=True):
        point = base + t * delta
        for j in range(len(shares)):
            out[:, j] += om * derivative(point, shares[j])
    moved = at(base + delta) - at(base)
    _set_buffers(ref.model, end)  # (the weights' part of the step reads them)
    return out, moved


def _catch(caught: dict, name: str) -> Callable:
    """A forward pre-hook that keeps a module's first input under ``name``."""
    return lambda module, args: caught.setdefault(name, args[0])


def _row(c: torch.Tensor, j: int) -> torch.Tensor:
    """``c`` with every row but j zeroed."""
    out = torch.zeros_like(c)
    out[j] = c[j]
    return out


def _group_of(path: TrainingPath) -> dict[str, int]:
    """Parameter name -> index of its param group."""
    return {n: g for g, grp in enumerate(path.optimizer["groups"]) for n in grp["params"]}


def _mask(path: TrainingPath, names) -> torch.Tensor:
    """(d,) bool: True on the coordinates of the named parameters."""
    parts = [torch.full((path.param_shapes[n].numel(),), n in names) for n in path.param_names]
    return torch.cat(parts)


def _per_coordinate(path: TrainingPath, values: list[float]) -> torch.Tensor:
    out = []
    group_of = _group_of(path)
    for name in path.param_names:
        size = path.param_shapes[name].numel()
        out.append(torch.full((size,), float(values[group_of[name]]), dtype=torch.float64))
    return torch.cat(out).double()


def _divisors(path: TrainingPath, step, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What an adaptive optimizer's step multiplies its moment and gradient by, float64 (d,).

    From PyTorch's update formulas and the state recorded after the step: Adam's bias
    corrections and second moment, Adamax's infinity norm, NAdam's momentum schedule, RAdam's
    rectification, RMSprop's (centered) average, Adagrad's sum and learning-rate decay.
    """
    names = path.param_names
    state = step.optimizer_state

    def recorded(key_of, fill: float = 1.0) -> torch.Tensor:
        parts = []
        for nm in names:
            found = state.get(key_of(nm), {}).get(nm)
            size = path.param_shapes[nm].numel()
            parts.append(
                torch.full((size,), fill, dtype=torch.float64)
                if found is None
                else found.double().reshape(-1).expand(size)
            )
        return torch.cat(parts)

    def per(key: str, default: float = 0.0) -> torch.Tensor:
        return _per_coordinate(path, [float(h.get(key, default)) for h in step.hyper])

    zero = torch.zeros(sum(path.param_shapes[nm].numel() for nm in names), dtype=torch.float64)
    eps = per("eps")
    if kind == "adagrad":
        t = recorded(lambda _: "step")
        rate = 1.0 / (1.0 + (t - 1.0) * per("lr_decay"))
        return rate / (recorded(lambda _: "sum").sqrt() + eps), zero
    if kind == "rmsprop":
        mean = recorded(lambda _: "grad_avg", fill=0.0) * per("centered")
        return 1.0 / ((recorded(lambda _: "square_avg") - mean**2).sqrt() + eps), zero
    t = recorded(lambda _: "step")
    beta1 = _per_coordinate(path, [h["betas"][0] for h in step.hyper])
    beta2 = _per_coordinate(path, [h["betas"][1] for h in step.hyper])
    if kind == "adamax":
        return 1.0 / ((1.0 - beta1**t) * recorded(lambda _: "exp_inf")), zero
    v = recorded(lambda _: "exp_avg_sq")
    if kind == "nadam":
        psi = per("momentum_decay")
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * psi))
        product = recorded(lambda _: "mu_product", fill=0.0)
        denominator = (v / (1.0 - beta2**t)).sqrt() + eps
        return (
            mu_next / (1.0 - product * mu_next) / denominator,
            (1.0 - mu) / (1.0 - product) / denominator,
        )
    if kind == "radam":
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
        rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)).abs()
        adaptive = (rect * (1.0 - beta2**t)).sqrt() / (v.sqrt() + eps)
        return torch.where(rho > 5.0, adaptive, 1.0) / (1.0 - beta1**t), zero
    amsgrad = {nm: bool(step.hyper[g].get("amsgrad", False)) for nm, g in _group_of(path).items()}
    v = recorded(lambda nm: "max_exp_avg_sq" if amsgrad[nm] else "exp_avg_sq")
    return 1.0 / ((1 - beta1**t) * (torch.sqrt(v / (1 - beta2**t)) + eps)), zero


def reference_decomposition(
    model: torch.nn.Module,
    train_dataset: Dataset,
    path: TrainingPath,
    loss_fn: Callable,
    inputs: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    q: int = 4,
    loss_reduction: str = "mean",
    output_fn: Callable | None = None,
    replay: bool = False,
    breaks: Callable[[torch.Tensor, torch.Tensor, int], Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """The exact decomposition, computed the slow, obvious way in float64.

    Supports the exact optimizers (SGD with all options; Adam, AdamW with amsgrad per param
    group; RMSprop with momentum, centered; Adagrad; Adamax; NAdam; RAdam), fixed q-node
    Gauss–Legendre quadrature, and one optimizer-state start at step 0, fresh or from the
    optimizer state recorded before it (a momentum buffer, a first moment), whose output effect
    is returned on its own. A parameter a step skipped (no gradient: ``Step.skipped``) is left
    alone there, as PyTorch's optimizers do, and an SGD momentum buffer that starts late starts
    at the gradient, without dampening.

    Args:
        model: The model (copied; its parameters are set from the path).
        train_dataset: Items ``(inputs..., label)``.
        path: An exact recorded path.
        loss_fn: The training loss.
        inputs: Queries, (n, ...).
        target: Output index per query, (n,), or None.
        q: Gauss–Legendre nodes per step.
        loss_reduction: ``"mean"`` or ``"sum"``.
        output_fn: Explained quantity, as in `PathKernelInfluence.attribute`.
        replay: Credit each example with its term of the step's own batch gradient, the
            batches rerun as training ran them (`replayed_term_gradients`), instead of its
            independent loss gradient (a path with dropout, BatchNorm or a batch loss).
        breaks: ``breaks(w_s, Δ_s, j)``: the points of (0, 1) where query j's gradient is not
            smooth along step s (where a ReLU switches, ...). Each piece between them is then
            integrated with q Gauss–Legendre nodes.

    Returns:
        ``contributions`` (n, N), ``weight_decay`` (n,), ``optimizer_state`` (n,) (the
        effect of the state recorded before step 0), ``initial`` (n,), ``prediction`` (n,),
        ``change`` (n,) = Σ_s φ_s · Δ_s, all float64.
    """
    output_fn = output_fn or select_output
    names = path.param_names
    ref = _Reference(model, names)
    kind = path.optimizer["kind"]
    flat = {
        s: torch.cat([path.params(s)[n].reshape(-1).double() for n in names])
        for s in range(len(path) + 1)
    }
    n, n_train, d = inputs.shape[0], len(train_dataset), flat[0].numel()
    x = inputs.double() if inputs.is_floating_point() else inputs  # (token ids stay ints)

    def f(j: int) -> torch.Tensor:
        t = None if target is None else target[j : j + 1]
        return output_fn(ref.model(x[j : j + 1]), t).reshape(())

    def values(w: torch.Tensor) -> torch.Tensor:
        ref.set(w)
        with torch.no_grad():
            return torch.stack([f(j) for j in range(n)])

    contributions = torch.zeros(n, n_train, dtype=torch.float64)
    decay_out = torch.zeros(n, dtype=torch.float64)
    state_out = torch.zeros(n, dtype=torch.float64)
    change = torch.zeros(n, dtype=torch.float64)
    state = torch.zeros(n_train, d, dtype=torch.float64)  # per-example optimizer buffer
    decay_state = torch.zeros(d, dtype=torch.float64)  # the buffer's weight-decay part
    first = path.step(0)
    key = {"sgd": "momentum_buffer", "rmsprop": "momentum_buffer", "adagrad": None}
    before = first.initial_state.get(key.get(kind, "exp_avg"), {})  # carried into step 0
    prior = (
        torch.cat(
            [
                before[nm].reshape(-1).double()
                if nm in before
                else torch.zeros(path.param_shapes[nm].numel(), dtype=torch.float64)
                for nm in names
            ]
        )
        if before and not first.fresh_state
        else None
    )
    # coordinates whose momentum buffer exists (SGD starts a new one at the gradient)
    has_buffer = torch.zeros(d, dtype=torch.bool) if prior is None else _mask(path, set(before))
    fresh = [path.step(s).fresh_state for s in range(len(path))]
    if any(now and not before for before, now in zip(fresh, fresh[1:], strict=False)):
        raise ValueError("the reference supports one optimizer-state start, at step 0")
    nodes, weights = gauss_legendre(q)
    follow_buffers = replay and _buffers_move(path)
    for s in range(len(path)):
        step = path.step(s)
        w, delta = flat[s], flat[s + 1] - flat[s]
        if follow_buffers:  # the weights' part of the step at the buffers after it
            _set_buffers(ref.model, path.buffers(s + 1))
            buffer_part = _buffer_shares(
                ref, model, names, path, s, train_dataset, f, n, q, flat[s]
            )  # (n, B) per example of the step, and the whole change (n,)
        phi = torch.zeros(n, d, dtype=torch.float64)
        cuts = [[0.0, *sorted(breaks(w, delta, j) if breaks else ()), 1.0] for j in range(n)]
        for a, b in sorted({piece for c in cuts for piece in zip(c, c[1:], strict=False)}):
            mine = [j for j in range(n) if (a, b) in zip(cuts[j], cuts[j][1:], strict=False)]
            for t, om in zip(nodes, weights, strict=True):
                ref.set(w + (a + (b - a) * t) * delta)
                for j in mine:
                    phi[j] += (b - a) * om * ref.grad(lambda j=j: f(j))
        change += phi @ delta
        if follow_buffers:
            shares, moved = buffer_part
            for row, i in enumerate(step.indices.tolist()):
                contributions[:, i] += shares[:, row]
            change += moved
        hyper = {k: [h.get(k, 0.0) for h in step.hyper] for k in step.hyper[0]}
        # the optimizer leaves a parameter without a gradient alone: η = 0, state carried
        active = ~_mask(path, step.skipped)
        eta = _per_coordinate(path, list(step.lr)) * active
        lam = _per_coordinate(path, hyper["weight_decay"])
        sign = 1.0 - 2.0 * _per_coordinate(path, hyper["maximize"])
        # this step's gradient, split by example
        part = torch.zeros(n_train, d, dtype=torch.float64)
        idx, sizes = step.indices, step.batch_sizes
        kappa = torch.repeat_interleave(
            (1.0 / sizes.double()) if loss_reduction == "mean" else torch.ones(len(sizes)), sizes
        )
        if replay:  # the terms carry the batch loss's own reduction
            kappa = torch.ones(len(idx), dtype=torch.float64)
            grads = replayed_term_gradients(
                model, names, path, s, train_dataset, loss_fn, loss_reduction
            )
        else:
            batch = gather_examples(train_dataset, idx)
            grads = per_example_gradients(model, names, w, batch, loss_fn)
        for row, i in enumerate(idx.tolist()):
            part[i] += sign * kappa[row] * grads[row]
        if kind == "sgd":
            mu = _per_coordinate(path, hyper["momentum"])
            damp = 1.0 - _per_coordinate(path, hyper["dampening"])
            nesterov = _per_coordinate(path, hyper["nesterov"]).bool()
            coupled = lam * w
            # the buffer takes the gradient where momentum is on (PyTorch leaves it untouched
            # at a step with momentum 0, and resumes from it later)
            moving = active & (mu != 0)
            starts = moving & ~has_buffer
            state = torch.where(moving, torch.where(starts, part, mu * state + damp * part), state)
            decay_state = torch.where(
                moving,
                torch.where(starts, coupled, mu * decay_state + damp * coupled),
                decay_state,
            )
            has_buffer |= moving
            use = torch.where(mu != 0, torch.where(nesterov, part + mu * state, state), part)
            use_decay = torch.where(
                mu != 0, torch.where(nesterov, coupled + mu * decay_state, decay_state), coupled
            )
            contributions -= (phi * eta) @ use.T
            decay_out -= (phi * eta) @ use_decay
            if prior is not None:  # the carried buffer decays by μ each step it is used
                prior = torch.where(moving, mu * prior, prior)
                use_prior = torch.where(nesterov, mu * prior, prior)
                state_out -= (phi * eta) @ torch.where(mu != 0, use_prior, 0.0)
        elif kind == "adagrad":  # Δ = −η' G / (sqrt(sum) + ε): no state carried
            scale = eta * _divisors(path, step, kind)[0]
            contributions -= (phi * scale) @ part.T
            decay_out -= (phi * scale) @ (lam * w)
        elif kind == "rmsprop":  # the buffer b = μ b + G / (sqrt(q) + ε), from zeros
            D = _divisors(path, step, kind)[0]
            mu = _per_coordinate(path, hyper.get("momentum", [0.0] * len(step.hyper)))
            moving = active & (mu != 0)  # (momentum 0 at a step: the buffer is left alone)
            coupled = lam * w
            state = torch.where(moving, mu * state + D * part, state)
            decay_state = torch.where(moving, mu * decay_state + D * coupled, decay_state)
            use = torch.where(moving, state, D * part)
            contributions -= (phi * eta) @ use.T
            decay_out -= (phi * eta) @ torch.where(moving, decay_state, D * coupled)
            if prior is not None:
                prior = torch.where(moving, mu * prior, prior)
                state_out -= (phi * eta) @ torch.where(moving, prior, 0.0)
        else:  # a first moment m = β1 m + (1 − β1) G; Δ = −η (Dm m + Dg G) − η λ' w
            Dm, Dg = _divisors(path, step, kind)
            default = kind == "adamw"
            decoupled = _per_coordinate(
                path, [float(h.get("decoupled_weight_decay", default)) for h in step.hyper]
            )
            coupled = (1.0 - decoupled) * lam * w
            beta1 = _per_coordinate(path, [b[0] for b in hyper["betas"]])
            carry = torch.where(active, beta1, 1.0)
            state = carry * state + (1 - carry) * part
            decay_state = carry * decay_state + (1 - carry) * coupled
            contributions -= (phi * eta * Dm) @ state.T + (phi * eta * Dg) @ part.T
            decay_out -= (phi * eta * Dm) @ decay_state + (phi * eta * Dg) @ coupled
            decay_out -= phi @ (eta * decoupled * lam * w)
            if prior is not None:  # the carried first moment decays by β1 each step
                prior = carry * prior
                state_out -= (phi * eta * Dm) @ prior
    return {
        "contributions": contributions,
        "weight_decay": decay_out,
        "optimizer_state": state_out,
        "initial": _initial(ref, path, flat, values, follow_buffers),
        "prediction": values(flat[len(path)]),
        "change": change,
    }
