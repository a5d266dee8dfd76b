"""Per-example gradients with torch.func, over a flat parameter vector.

The engine works with the recorded (trainable) parameters as one flat vector w of
length d, in `TrainingPath.param_names` order. `FunctionalModel` evaluates the model at
any such w with `torch.func.functional_call` (buffers and parameters that were not recorded
are held constant), and computes per-example gradients with ``vmap(grad(...))`` (the route
taken is `FunctionalModel.route`):

- `FunctionalModel.loss_grads`: g_i(w) = ∇_w ℓ_i(w), (B, d), for training examples;
- `FunctionalModel.output_grads`: ∇_w f(x_j; w), (q, n, d), for queries at q points at once;
- `FunctionalModel.loss_jacobians`: ∇_w f_c(x_i; w) and ∂ℓ_i/∂f_c, for the kernel view.

Work is split into chunks whose gradients fit ``memory_budget`` bytes. A model that vmap
cannot batch (``nn.GRU``/``nn.LSTM``, whose fused kernels have no batching rule; HuggingFace
attention, which skips an all-ones mask after a data-dependent check) is evaluated through
vmappable stand-ins that compute the same function (`standins`), checked against the model
on the first call; where none fits, one example (or point) at a time: the same numbers,
slower, and a `VectorizationWarning` says so once. An ``output_fn`` or loss that vmap cannot
batch (written with ``one_hot``, ``masked_fill``) is not vmapped at all: it is applied to one
batched forward's outputs and each example's gradient is its row's vector-Jacobian product
(`rows`); ``routes`` says which way each was taken.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils import _pytree as pytree

from ..exceptions import StoreMismatchError
from .batches import leaves, map_by_loop, n_rows, one_row, take
from .outputs import OutputFn, row_losses
from .routes import MODEL_LOOP, ModelRoutes
from .rows import (
    LOOP,
    ROWS,
    VMAP,
    Memo,
    check_row_independence,
    not_vmaps_doing,
    routed,
    row_loss_grads,
    row_query_grads,
)


class FunctionalModel(ModelRoutes):
    """A model evaluated at flat parameter vectors (float ``dtype``), with per-example gradients.

    Args:
        model: The model. It is copied, converted to ``dtype`` and put in eval mode (and
            embeddings with ``sparse=True`` take dense gradients: the same values); the
            original is not modified.
        names: Recorded parameter names, in flat-vector order.
        shapes: Their shapes.
        dtype: Computation dtype.
        device: Computation device.
        memory_budget: Bytes the per-example gradients of one chunk may take.
        active: The parameters gradients are taken with respect to (default: all recorded
            ones). The others still move along the path but are not differentiated
            (Captum's ``layers``). Active parameters come first in the flat vector, so the
            gradient coordinates are its first ``d_active`` entries.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        shapes: dict[str, torch.Size],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        memory_budget: int = 1 << 30,
        active: Sequence[str] | None = None,
    ):
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise StoreMismatchError(
                f"the model has no parameters named {missing[:5]} that the path recorded: pass "
                "the model the path was recorded from"
            )
        wrong = [n for n in names if params[n].shape != shapes[n]]
        if wrong:
            n = wrong[0]
            raise StoreMismatchError(
                f"parameter {n} has shape {tuple(params[n].shape)} in the model but "
                f"{tuple(shapes[n])} in the path: pass the model the path was recorded from"
            )
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        for module in self.model.modules():  # sparse gradients: the same values, other layout
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                module.sparse = False
        chosen = set(names if active is None else active)
        self.names = [n for n in names if n in chosen] + [n for n in names if n not in chosen]
        self.n_active = len(chosen & set(names))
        self.shapes = [shapes[n] for n in self.names]
        self.sizes = [s.numel() for s in self.shapes]
        self.d = sum(self.sizes)
        self.d_active = sum(self.sizes[: self.n_active])
        self.dtype = dtype
        self.device = torch.device(device)
        self.memory_budget = memory_budget
        # the per-example-gradient route of the model, once one has run (see `_map`)
        self.route: str | None = None
        self._standin: torch.nn.Module | bool | None = None  # the copy; False: none fits
        self._use_standin = False
        self._depth = 0  # mapped calls under way, nested
        # how per-example gradients of the output_fn and the loss were last computed,
        # {"output_fn": ..., "loss_fn": ...} (`rows`: VMAP, ROWS or LOOP), and the route each
        # function takes once tried
        self.routes: dict[str, str] = {}
        self._route = Memo()
        self._checked = Memo()  # the output_fns checked to act row by row
        self._vectorized = Memo()  # the losses whose rows vmap's forward gives (`rows`)
        recorded = set(names)
        self.constants = {
            n: p.detach() for n, p in self.model.named_parameters() if n not in recorded
        }
        self.constants.update({n: b.detach() for n, b in self.model.named_buffers()})
        self._own_buffers = {n: b.detach() for n, b in self.model.named_buffers()}

    def use_buffers(self, buffers: dict[str, torch.Tensor] | None) -> None:
        """Evaluate with these buffer values from now on (None: the model's own again).

        Args:
            buffers: Name -> tensor (a checkpoint's BatchNorm statistics, ...), any shapes
                matching the model's buffers; floating ones are cast to the computation dtype.
        """
        self.constants.update(self._own_buffers)
        for name, value in (buffers or {}).items():
            own = self._own_buffers.get(name)
            if own is not None:
                self.constants[name] = value.to(device=own.device, dtype=own.dtype)

    # -- flat vectors -------------------------------------------------------------------------

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors into a flat (d,) vector in the computation dtype."""
        return torch.cat(
            [tensors[n].reshape(-1).to(device=self.device, dtype=self.dtype) for n in self.names]
        )

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a (..., d) tensor into named (..., *shape) views."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return {
            n: p.reshape((*lead, *s))  # (a tuple: a 0-dim parameter has no sizes to unpack)
            for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    @property
    def active_names(self) -> list[str]:
        """Names of the differentiated parameters, in gradient-coordinate order."""
        return self.names[: self.n_active]

    @property
    def partial(self) -> bool:
        """True when only some recorded parameters are differentiated (``layers``)."""
        return self.n_active < len(self.names)

    def active(self, flat: torch.Tensor) -> torch.Tensor:
        """The differentiated coordinates of a (..., d) vector: (..., d_active)."""
        return flat[..., : self.d_active]

    def _split(self, params: dict[str, torch.Tensor], names: Sequence[str] | None = None):
        chosen = self.active_names if names is None else list(names)
        act = {n: params[n] for n in chosen}
        passive = {n: p for n, p in params.items() if n not in act}
        return act, passive

    def _flat_grads(self, grads: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        names = [n for n in self.names if n in grads]
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in names], -1)

    def cast(self, batch: Sequence[Any]) -> tuple[Any, ...]:
        """Move a batch to the device; floating tensors take the computation dtype.

        Each part is a tensor, a nested tuple / list / dict of tensors (cast leaf by leaf),
        or numbers (made a tensor).
        """

        def one(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None)

        def part(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return one(x)
            if isinstance(x, (tuple, list, dict)) and leaves(x):
                return pytree.tree_map(lambda t: one(t) if isinstance(t, torch.Tensor) else t, x)
            return torch.as_tensor(x, device=self.device)

        return tuple(part(x) for x in batch)

    def _call(self, params: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor]):
        model = self._standin if self._use_standin else self.model
        return functional_call(model, {**self.constants, **params}, tuple(inputs))

    def _example_loss(self, loss_fn: Callable) -> Callable:
        """One example's loss as a batch of one: ``(active, other params, inputs, label) -> ℓ``."""

        def single(pa, pp, x, label):
            out = self._call({**pa, **pp}, one_row(x))
            return loss_fn(out, one_row(label)).sum()

        return single

    def chunk_size(self, per_item: int = 1) -> int:
        """How many per-example gradients (each ``per_item`` × d values) fit the budget."""
        item = max(1, self.d_active * per_item * self.dtype.itemsize * 3)  # grads + temporaries
        return max(1, self.memory_budget // item)

    def route_of(self, fn: Callable) -> str | None:
        """The route ``fn`` (an output_fn or a loss) takes (None: not tried yet)."""
        return LOOP if self.looped else self._route.get(fn)

    @property
    def looped(self) -> bool:
        """Whether the model is evaluated one example at a time (vmap cannot batch it)."""
        return self.route == MODEL_LOOP

    def _loss_map(self, loss_fn: Callable, levels: list[tuple]) -> Callable:
        """Per-example loss gradients ``(active, passive, inputs, labels) -> grads``.

        ``levels``: the maps' ``in_dims``, innermost first.
        """
        example = grad(self._example_loss(loss_fn))
        vmapped, looped = example, example
        for dims in levels:
            vmapped, looped = vmap(vmapped, in_dims=dims), self._map(looped, dims)

        def rows(act, passive, inputs, labels):
            return row_loss_grads(self, loss_fn, levels, act, passive, inputs, labels)

        return routed(self, loss_fn, "loss_fn", vmapped, rows, looped)

    def check_rows(self, output_fn: OutputFn, w: torch.Tensor, inputs, target) -> None:
        """Check once per ``output_fn`` that a query's value reads its own outputs' row only.

        Args:
            output_fn: The explained quantity.
            w: Flat parameters (d,) to evaluate the model at.
            inputs: Queries, each (n, ...); the first (up to) four are used.
            target: (n,) or None.

        Raises:
            RowDependenceError: See `rows.check_row_independence`.
        """
        n = n_rows(inputs)
        if n < 2 or self._checked.get(output_fn):
            return
        m = min(n, 4)
        outputs = self.outputs(w, take(inputs, slice(0, m)))
        check_row_independence(output_fn, outputs, None if target is None else target[:m], m)
        self._checked.set(output_fn, True)

    # -- evaluations ------------------------------------------------------------------------

    def outputs(self, w: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Model outputs at flat parameters w (d,) for a batch of inputs."""
        with torch.no_grad():
            return self._call(self.unflatten(w), inputs)

    def loss_grads(
        self,
        w: torch.Tensor,
        batch: Sequence[torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Per-example loss gradients g_i(w), (B, d_active). ``batch`` is (inputs..., labels).

        ``names`` restricts the gradient to those parameters (in flat-vector order).
        """
        act, passive = self._split(self.unflatten(w), names)

        *inputs, labels = batch
        inputs = tuple(inputs)
        step = self._loss_map(loss_fn, [(None, None, 0, 0)])
        n = n_rows(labels)
        size = self.chunk_size()
        chunks = []
        for a in range(0, n, size):
            part, lab = take(inputs, slice(a, a + size)), take(labels, slice(a, a + size))
            chunks.append(self._flat_grads(step(act, passive, part, lab), 1))
        if not chunks:
            width = sum(v.numel() for v in act.values())
            return torch.zeros(0, width, dtype=self.dtype, device=self.device)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def loss_grads_at(
        self,
        ws: torch.Tensor,
        batch: Sequence[torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Per-example loss gradients, each at its own parameters, (B, d_active).

        Lets the engine take the batches of several steps in one vmap call.

        Args:
            ws: Flat parameters of each example, (B, d).
            batch: ``(inputs..., labels)`` of B examples.
            loss_fn: The training loss.
        """
        *inputs, labels = batch
        inputs = tuple(inputs)

        step = self._loss_map(loss_fn, [(0, 0, 0, 0)])
        size = max(1, self.chunk_size(2))  # the parameters are replicated per example
        chunks = []
        for a in range(0, n_rows(labels), size):
            act, passive = self._split(self.unflatten(ws[a : a + size]))
            part, lab = take(inputs, slice(a, a + size)), take(labels, slice(a, a + size))
            chunks.append(self._flat_grads(step(act, passive, part, lab), 1))
        if not chunks:
            return torch.zeros(0, self.d_active, dtype=self.dtype, device=self.device)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def loss_grads_by_step(
        self,
        ws: torch.Tensor,
        batch: Sequence[Any],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Per-example loss gradients of S equal-sized batches at their steps' parameters.

        Returns (S·B, d_active), batch by batch.

        The same numbers as `loss_grads_at` with each row of ``ws`` repeated B times, without
        copying the parameters per example (the steps are a vmap dimension of their own).

        Args:
            ws: Flat parameters of each step, (S, d).
            batch: ``(inputs..., labels)`` of the S·B examples, step by step.
            loss_fn: The training loss.
        """
        *inputs, labels = batch
        inputs = tuple(inputs)
        steps = ws.shape[0]
        size = n_rows(labels) // steps
        if size == 0:
            return torch.zeros(0, self.d_active, dtype=self.dtype, device=self.device)

        per_step = self._loss_map(loss_fn, [(None, None, 0, 0), (0, 0, 0, 0)])

        def by_step(tree, a, b):
            return pytree.tree_map(
                lambda t: (
                    t[a * size : b * size].reshape(b - a, size, *t.shape[1:])
                    if isinstance(t, torch.Tensor)
                    else t
                ),
                tree,
            )

        chunk = max(1, self.chunk_size(2) // max(1, size))
        chunks = []
        for a in range(0, steps, chunk):
            b = min(steps, a + chunk)
            act, passive = self._split(self.unflatten(ws[a:b]))
            g = per_step(act, passive, by_step(inputs, a, b), by_step(labels, a, b))
            chunks.append(self._flat_grads(g, 2).reshape((b - a) * size, -1))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    @staticmethod
    def per_example_losses(outputs, labels, loss_fn) -> torch.Tensor:
        """ℓ_i for each row of a batch's outputs, (B,), whatever the loss's reduction."""

        def one(out, label):
            return loss_fn(one_row(out), one_row(label)).sum()

        try:
            return vmap(one)(outputs, labels)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            if not_vmaps_doing(err):
                raise
        # a loss vmap cannot trace (data-dependent branches, .item()), or outputs of which
        # some are not batch-first (a GRU's h_n)
        return row_losses(outputs, labels, loss_fn)

    def batch_grad(self, w, batch, loss_fn, weights: torch.Tensor) -> torch.Tensor:
        """∇_w Σ_i weights_i ℓ_i(w) in one backward pass, (d_active,)."""
        act, passive = self._split(self.unflatten(w))
        *inputs, labels = batch

        def total(pa):
            out = self._call({**pa, **passive}, tuple(inputs))
            return (self.per_example_losses(out, labels, loss_fn) * weights).sum()

        return self._flat_grads(grad(total)(act), 0)

    def output_grads(
        self,
        ws: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        target: torch.Tensor | None,
        output_fn: OutputFn,
        weights: torch.Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the explained output of each query at several points.

        Args:
            ws: Flat parameters, (q, d).
            inputs: Query inputs, each (n, ...).
            target: Per-query target, (n,), or None.
            output_fn: ``output_fn(outputs, target) -> (n,)``.
            weights: Optional (q,) weights: then the weighted sum over the points is
                returned, (n, d), formed per parameter before flattening (quadrature);
                or (g, q) weights for g groups of q consecutive points: (g, n, d).
            names: Restrict the gradient to these parameters (default: the active ones).

        Returns:
            ``(grads, values)``: ∇_w f(x_j; ws[k]) as (q, n, d) (or the weighted sum (n, d))
            and f(x_j; ws[k]) as (q, n).
        """
        act, passive = self._split(self.unflatten(ws), names)
        inputs = tuple(inputs)
        n = n_rows(inputs)
        tgt = target if target is not None else torch.zeros(n, dtype=torch.int64)
        has_target = target is not None
        self.check_rows(output_fn, ws[0], inputs, target)

        def single(pa, pp, x, t):
            out = self._call({**pa, **pp}, one_row(x))
            value = output_fn(out, one_row(t) if has_target else None).reshape(())
            return value, value

        example = grad(single, has_aux=True)
        looped = self._map(self._map(example, (None, None, 0, 0)), (0, 0, None, None))
        vmapped = vmap(vmap(example, in_dims=(None, None, 0, 0)), in_dims=(0, 0, None, None))

        def rows(pa, pp, x, t):
            return row_query_grads(self, output_fn, pa, pp, x, t if has_target else None)

        per_point = routed(self, output_fn, "output_fn", vmapped, rows, looped)
        size = max(1, self.chunk_size(ws.shape[0]))
        grads, values = [], []
        for a in range(0, n, size):
            part = take(inputs, slice(a, a + size))
            g, v = per_point(act, passive, part, take(tgt, slice(a, a + size)))
            if weights is None:
                grads.append(self._flat_grads(g, 2))
            elif weights.dim() == 1:
                summed = {k: torch.tensordot(weights, t, dims=1) for k, t in g.items()}
                grads.append(self._flat_grads(summed, 1))
            else:  # (groups, q): one weighted sum per group of q consecutive points
                groups, q = weights.shape
                summed = {
                    k: torch.einsum("gq,gq...->g...", weights, t.reshape(groups, q, *t.shape[1:]))
                    for k, t in g.items()
                }
                grads.append(self._flat_grads(summed, 2))
            values.append(v)
        if len(grads) == 1:
            return grads[0], values[0]
        axis = 0 if weights is not None and weights.dim() == 1 else 1
        return torch.cat(grads, axis), torch.cat(values, 1)

    def loss_jacobians(
        self,
        w: torch.Tensor,
        batch: Sequence[torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output Jacobians and loss derivatives of training examples, for the kernel.

        Returns:
            ``(jac, dloss)``: ∇_w f_c(x_i; w) as (B, C, d) and ∂ℓ_i/∂f_c as (B, C), so that
            g_i = Σ_c dloss[i, c] jac[i, c].
        """
        params = self.unflatten(w)
        act, passive = self._split(params)
        *inputs, labels = batch
        inputs = tuple(inputs)
        n = n_rows(labels)
        with torch.no_grad():
            batched, spec = pytree.tree_flatten(self._call(params, inputs))
        # the outputs' tensors, flattened per example and concatenated: (n, C)
        where = [j for j, t in enumerate(batched) if isinstance(t, torch.Tensor)]
        shapes = [batched[j].shape[1:] for j in where]
        outs = torch.cat([batched[j].reshape(n, -1) for j in where], 1)

        def as_outputs(flat: torch.Tensor):
            """One example's (C,) outputs back in the model's structure, a batch of one."""
            parts = torch.split(flat, [s.numel() for s in shapes])
            tree = list(batched)
            for j, part, shape in zip(where, parts, shapes, strict=True):
                tree[j] = part.reshape(1, *shape)
            return pytree.tree_unflatten(tree, spec)

        def out_single(pa, x):
            out = self._call({**pa, **passive}, one_row(x))
            return torch.cat([t.reshape(-1) for t in leaves(out)])

        def dloss_single(out, label):
            return grad(lambda o: loss_fn(as_outputs(o), one_row(label)).sum())(out)

        c = outs.shape[1]
        size = max(1, self.chunk_size(c))
        jac = self._map(jacrev(out_single), (None, 0))
        jacs = []
        for a in range(0, n, size):
            jacs.append(self._flat_grads(jac(act, take(inputs, slice(a, a + size))), 2))
        try:
            dloss, route = vmap(dloss_single)(outs, labels), VMAP
        except (RuntimeError, NotImplementedError, ValueError) as err:
            if not_vmaps_doing(err):
                raise
            dloss = map_by_loop(dloss_single, (0, 0), (outs, labels))  # (loss calls only, no model)
            route = ROWS
        self.routes["loss_fn"] = LOOP if self.looped else route
        return (jacs[0] if len(jacs) == 1 else torch.cat(jacs)), dloss


