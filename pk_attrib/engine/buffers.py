"""Buffers that move along the path: BatchNorm's running statistics, split by example.

A query is explained in eval mode, where BatchNorm normalizes by its running statistics, and
those change at every training step outside any gradient: r ← r + m (μ_B − r) for the mean,
v ← v + m (σ²_B − v) for the variance, with μ_B, σ²_B the batch's statistics of the layer's
input (m the momentum). Each step then moves the query's output twice: by the weights' step
Δw_s, which the optimizer rules split by example, and by the buffers' step Δb_s. The engine
walks each step as (w_s, b_s) → (w_s, b_s+1) → (w_s+1, b_s+1): the weights' part is
integrated with the buffers at b_s+1, and the buffers' part here, with

    f(x; w_s, b_s+1) − f(x; w_s, b_s) = φ_b · Δb_s,   φ_b = ∫_0^1 ∇_b f(x; w_s, b_s + t Δb_s) dt

(Gauss–Legendre, checked against the two forward passes). The statistics' update is a sum
over the batch's examples — example j of a micro-batch of B (N elements a channel) adds
(m/B)(μ_j − r) to the mean and m Σ_hw (a_j − μ_B)² / (N − 1) − (m/B) v to the variance —
so its share of the output change is φ_b · δb_j, exactly. What other buffers do (a counter,
a buffer the recording cannot attribute) is a term of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from .batches import n_rows, one_row
from .functional import FunctionalModel
from .quadrature import gauss_legendre
from .replay import Replay
from .rows import NotRows, output_cotangents, routed, zero_if_unread

_NORM = torch.nn.modules.batchnorm._NormBase


@contextlib.contextmanager
def _differentiable_batch_norm() -> Iterator[None]:
    """Eval-mode batch_norm written out, so that its running statistics take gradients.

    (PyTorch's kernel does not differentiate with respect to them.)
    """
    original = F.batch_norm

    def batch_norm(
        input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: A002
        momentum=0.1, eps=1e-5,
    ):  # fmt: skip
        if training or running_mean is None or running_var is None:
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
        if weight is not None:
            out = out * weight.reshape(shape)
        if bias is not None:
            out = out + bias.reshape(shape)
        return out

    F.batch_norm = batch_norm
    try:
        yield
    finally:
        F.batch_norm = original


class MovingBuffers:
    """The buffers' part of each step: its output change, split by example where it can be.

    Args:
        fm: The functional model (its module holds the normalization layers).
        path: The training path (its buffers at every step).
        replay: The replay of the path's steps (to rerun a step's batches for their
            statistics); None when the path is not replayed.
    """

    def __init__(self, fm: FunctionalModel, path, replay: Replay | None):
        self.fm, self.path, self.replay = fm, path, replay
        own = fm._own_buffers
        self.names = [n for n in path.manifest.get("buffers", []) if n in own]
        self.floating = [n for n in self.names if own[n].is_floating_point()]
        self.layers = {  # module name -> the module, for normalization layers with statistics
            name: m
            for name, m in fm.model.named_modules()
            if isinstance(m, _NORM) and m.track_running_stats
        }
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def moving(fm: FunctionalModel, path) -> bool:
        """Whether any floating buffer the path kept differs between its start and its end."""
        first, last = path.buffers(0), path.buffers(len(path))
        return any(
            name in last and value.is_floating_point() and not torch.equal(value, last[name])
            for name, value in first.items()
        )

    def at(self, s: int) -> dict[str, torch.Tensor]:
        """The buffers at w_s (s = len(path): the end), in the computation dtype."""
        found = self._cache.get(s)
        if found is None:
            found = {
                n: t.to(self.fm.device, self.fm.dtype if t.is_floating_point() else t.dtype)
                for n, t in self.path.buffers(s).items()
            }
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[s] = found
        return found

    # -- the query side -------------------------------------------------------------------

    def _outputs(self, w, buffers, inputs, target, output_fn) -> torch.Tensor:
        """f(x; w, buffers) in eval mode, (n,)."""
        params = {**self.fm.constants, **buffers, **self.fm.unflatten(w)}
        with torch.no_grad():
            out = functional_call(self.fm.model, params, tuple(inputs))
        return output_fn(out, target).reshape(-1)

    def _phi(self, w, start, delta, inputs, target, output_fn, q: int) -> torch.Tensor:
        """∫ ∇_b f(x; w, b_s + t Δb) dt over the moving buffers, (n, d_b), q nodes."""
        fm = self.fm
        names = list(delta)
        fixed = {**fm.constants, **{k: v for k, v in start.items() if k not in delta}}
        fixed.update(fm.unflatten(w))
        n = n_rows(inputs)
        tgt = target if target is not None else torch.zeros(n, dtype=torch.int64)
        has_target = target is not None

        def one(b, x, t):  # a query as a batch of one
            with _differentiable_batch_norm():
                out = functional_call(fm.model, {**fixed, **b}, one_row(x))
            return output_fn(out, one_row(t) if has_target else None).reshape(())

        def rows(b, x, t):  # output_fn that vmap cannot batch: the queries' rows' VJPs
            with torch.no_grad():
                out = functional_call(fm.model, {**fixed, **b}, tuple(x))
            stacked = pytree.tree_map(lambda o: o[None] if torch.is_tensor(o) else o, out)
            _, where, cots = output_cotangents(output_fn, stacked, t if has_target else None, n)
            if any(c.dim() < 2 or c.shape[1] != n for c in cots):
                raise NotRows("output_fn reads an output without a row per query")
            where, cots = zero_if_unread(pytree.tree_leaves(stacked), where, cots)

            def linear(b_, x_, cs):
                with _differentiable_batch_norm():
                    o = pytree.tree_leaves(functional_call(fm.model, {**fixed, **b_}, one_row(x_)))
                return sum((o[j] * c[None]).sum() for j, c in zip(where, cs, strict=True))

            return fm._map(grad(linear), (None, 0, 0))(b, x, [c[0] for c in cots])

        example = grad(one)
        per_query = routed(
            fm,
            output_fn,
            "output_fn",
            vmap(example, in_dims=(None, 0, 0)),
            rows,
            fm._map(example, (None, 0, 0)),
        )
        nodes, weights = gauss_legendre(q)
        width = sum(start[k].numel() for k in names)
        total = torch.zeros(n, width, dtype=fm.dtype, device=fm.device)
        for t, om in zip(nodes, weights, strict=True):
            point = {k: start[k] + t * delta[k] for k in names}
            g = per_query(point, tuple(inputs), tgt)
            total += om * torch.cat([g[k].reshape(n, -1) for k in names], 1)
        return total

    # -- the training side ----------------------------------------------------------------

    def _shares(self, step, w_full, start, names) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's share of the statistics' change over the step.

        Returns:
            ``(shares, rebuilt)``: (B, d_b) per example, and the change they add up to
            (d_b,), over ``names`` flattened in order.
        """
        fm = self.fm
        sizes = step.batch_sizes.tolist()
        running = {k: v.clone() for k, v in start.items()}
        rows = []
        for indices, state in zip(torch.split(step.indices, sizes), step.rng_states, strict=True):
            *inputs, labels = self._batch(indices)
            seen = self._inputs_of_layers(w_full, inputs, start, state, step.train_modules)
            b = n_rows(labels)
            share = {
                k: torch.zeros(b, running[k].numel(), dtype=fm.dtype, device=fm.device)
                for k in names
            }
            for layer, a in seen.items():
                module = self.layers[layer]
                mean_key, var_key = f"{layer}.running_mean", f"{layer}.running_var"
                count_key = f"{layer}.num_batches_tracked"
                if mean_key not in share and var_key not in share:
                    continue
                if module.momentum is None:  # a cumulative average: 1 / batches seen
                    m = 1.0 / (float(running.get(count_key, torch.tensor(0.0))) + 1.0)
                else:
                    m = float(module.momentum)
                a = a.to(fm.dtype).transpose(0, 1).reshape(a.shape[1], b, -1)  # (C, B, HW)
                per_example = a.mean(2)  # μ_j, (C, B)
                mean_b = a.mean((1, 2))  # μ_B, (C,)
                count = a.shape[1] * a.shape[2]
                if mean_key in share:
                    r = running[mean_key]
                    share[mean_key] = (m / b) * (per_example.T - r)
                    running[mean_key] = r + m * (mean_b - r)
                if var_key in share:
                    v = running[var_key]
                    squares = ((a - mean_b[:, None, None]) ** 2).sum(2)  # (C, B)
                    share[var_key] = m * squares.T / max(count - 1, 1) - (m / b) * v
                    running[var_key] = v + share[var_key].sum(0)
                if count_key in running:
                    running[count_key] = running[count_key] + 1
            rows.append(torch.cat([share[k] for k in names], 1))
        shares = torch.cat(rows) if rows else torch.zeros(0, 0)
        return shares, torch.cat([(running[k] - start[k]).reshape(-1) for k in names])

    def _inputs_of_layers(self, w_full, inputs, start, state, modules) -> dict:
        """What each normalization layer receives when the micro-batch is rerun."""
        seen: dict[str, torch.Tensor] = {}

        def hook(name: str):
            return lambda module, args: seen.setdefault(name, args[0].detach())

        hooks = [m.register_forward_pre_hook(hook(name)) for name, m in self.layers.items()]
        try:
            self.replay.modules = modules
            self.replay.forward(w_full, inputs, start, state)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def _batch(self, indices):
        raise NotImplementedError  # set by the engine: its `_batch`

    # -- one step -------------------------------------------------------------------------

    def step(self, s, step, w_full, inputs, target, output_fn, f_after, tol, keep=None):
        """The buffers' part of step s for the queries.

        Args:
            s: The step.
            step: The path's `Step`.
            w_full: w_s, (d,).
            inputs: The queries' inputs.
            target: Their targets (or None).
            output_fn: What is explained of their outputs.
            f_after: f(x; w_s, b_s+1), (n,).
            tol: (n,) the output change each step may leave unmatched.
            keep: (B,) bool: the step's examples wanted (None: all).

        Returns:
            ``(shares, rest, change, f_before, scale)``: each kept example's share of the
            output change (n, m), the change no example made (other buffers, and what the
            shares do not rebuild) (n,), the whole change φ_b · Δb (n,), f(x; w_s, b_s) and
            its rounding scale (n,).
        """
        fm = self.fm
        start, end = self.at(s), self.at(s + 1)
        delta = {
            n: end[n] - start[n]
            for n in self.floating
            if n in start and n in end and not torch.equal(start[n], end[n])
        }
        f_before = self._outputs(w_full, start, inputs, target, output_fn)
        scale = f_before.abs()
        n = n_rows(inputs)
        zeros = torch.zeros(n, dtype=fm.dtype, device=fm.device)
        if not delta:
            width = 0 if keep is None else int(keep.sum())
            return (
                torch.zeros(n, width, dtype=fm.dtype, device=fm.device),
                zeros,
                zeros,
                f_before,
                scale,
            )
        exact = f_after - f_before
        q, phi = 2, None
        while True:  # Gauss–Legendre, checked against the two forward passes
            phi = self._phi(w_full, start, delta, inputs, target, output_fn, q)
            moved = phi @ torch.cat([delta[k].reshape(-1) for k in delta])
            if bool(((moved - exact).abs() <= tol).all()) or q >= 32:
                break
            q *= 2
        names = list(delta)
        offsets, total = {}, 0
        for k in names:
            offsets[k] = (total, total + start[k].numel())
            total += start[k].numel()
        statistics = [
            k
            for k in names
            if k.rsplit(".", 1)[0] in self.layers and k.endswith(("running_mean", "running_var"))
        ]
        if self.replay is None or step.rng_states is None or not statistics:
            width = 0 if keep is None else int(keep.sum())
            return (
                torch.zeros(n, width, dtype=fm.dtype, device=fm.device),
                moved,
                moved,
                f_before,
                scale,
            )
        shares, rebuilt = self._shares(step, w_full, start, statistics)
        columns = torch.cat([torch.arange(*offsets[k]) for k in statistics]).to(phi.device)
        phi_stats = phi[:, columns]
        per_example = phi_stats @ shares.T  # (n, B)
        if keep is not None:
            per_example = per_example[:, keep.to(per_example.device)]
        rest = moved - phi_stats @ rebuilt  # other buffers, and what the shares miss
        return per_example, rest, moved, f_before, scale
