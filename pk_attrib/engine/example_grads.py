"""A step's per-example training gradients, held densely or as each layer's factors.

The exact sweep needs three things of the gradients g_j of a step's examples: their dot
products with the queries' adjoints, v · g_j (the contributions); their weighted sum
Σ_j κ_j g_j (the step check); and, for cosine scores, ‖g_j‖². `DenseGrads` holds them as one
(m, d_active) matrix, as `FunctionalModel.loss_grads` gives them. `LayerGrads` never forms
them for the layers of `engine.layers` (Linear, Conv1D, Embedding, Conv2d): example j's
gradient of such a layer is Σ_t u_t v_tᵀ (`engine.factors`), so

    v · g_j = Σ_t u_tᵀ V v_t        (V: the adjoint's part on the layer, as a matrix)

is one matrix product over the batch, and the weighted sum is Σ_j κ_j Σ_t u_t v_tᵀ — for a
large model a fraction of the memory traffic of writing and reading B copies of d numbers.
The other parameters keep dense per-example gradients. Both compute the same numbers (up to
the order of the sums); `StepGrads` chooses, once per engine. `QueryLayers` does the same for
the queries' gradients at the quadrature nodes, which the sweep needs as flat vectors: each
layer's weighted sum over the nodes is written into them by one batched product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .batches import n_rows
from .factors import (
    LayerFactors,
    bias_grad,
    capture,
    dot_products,
    example_losses,
    squared_norms,
    verify_layers,
)
from .functional import FunctionalModel
from .layers import Layer, find_layers
from .outputs import NotBatchFirst

# the intermediate (n, m, T, rows) of a layer's dot products is formed in slices of at most
# this many elements (32 MiB in float64)
SLICE_ELEMENTS = 1 << 22
# models whose per-example gradients of a step are smaller than this take the dense route:
# their vmap calls batch several steps at once, and one capture per step costs more
LAYER_ROUTE_BYTES = 4 << 20
# the route's name in `Diagnostics.routes`
LAYERS = "layer factors from a batched pass"
# take the route only where it forms no per-example gradient at all: every parameter in a
# layer, each layer called once per example (a sequence's or an image's positions make it
# form each example's gradient of the layer, and parameters outside the layers need a vmap
# pass of their own: slower than one vmap over the model, as measured on a small GPT-2).
# The tests switch it off to check those paths, which are exact too
WHOLE_MODELS_ONLY = True


def _worth_it(found: LayerFactors, rest: list[str]) -> bool:
    """Whether the layer route beats vmap: no other parameters, one position per example."""
    if not WHOLE_MODELS_ONLY:
        return True
    return not rest and all(w.shape[1] == 1 for pairs in found.factors.values() for _, w in pairs)


def columns(offsets: dict[str, tuple[int, int]], name: str) -> slice:
    """The coordinates of parameter ``name`` in the flat vectors."""
    a, size = offsets[name]
    return slice(a, a + size)


def per_parameter(x: torch.Tensor | float, offsets: dict[str, tuple[int, int]]) -> dict:
    """A per-coordinate vector that is constant on each parameter, as name -> float.

    Args:
        x: (d_active,), or a scalar.
        offsets: Parameter name -> (first coordinate, size).
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return dict.fromkeys(offsets, float(x))
    firsts = torch.tensor([a for a, _ in offsets.values()], device=x.device)
    return dict(zip(offsets, x[firsts].tolist(), strict=True))


class DenseGrads:
    """The per-example gradients as one matrix.

    Args:
        grads: (m, d_active).
    """

    def __init__(self, grads: torch.Tensor):
        self.grads = grads

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """The dot products v · g_j, (n, m), of each row of v (n, d_active) and each example."""
        return v @ self.grads.T

    def weighted_sum(self, kappa: torch.Tensor) -> torch.Tensor:
        """Σ_j κ_j g_j, (d_active,). ``kappa``: (m,)."""
        return kappa @ self.grads

    def squared_norms(self) -> torch.Tensor:
        """‖g_j‖², (m,)."""
        return (self.grads * self.grads).sum(1)

    def finite_probe(self) -> torch.Tensor:
        """A tensor that is finite exactly when every gradient is (a 0-dim sum)."""
        return self.grads.sum()


class LayerGrads:
    """The per-example gradients as each layer's factors and the rest's dense gradients.

    Args:
        found: The factors `factors.capture` read off one batched pass.
        layers: The layers they were captured for.
        rest: The other active parameters, in flat-vector order (``found.rest`` holds their
            per-example gradients).
        offsets: Active parameter name -> (first coordinate, size) in the flat vectors.
        d_active: The flat vectors' length.
    """

    def __init__(
        self,
        found: LayerFactors,
        layers: list[Layer],
        rest: list[str],
        offsets: dict[str, tuple[int, int]],
        d_active: int,
    ):
        self.found, self.layers, self.rest = found, layers, rest
        self.offsets, self.d_active = offsets, d_active

    def _part(self, v: torch.Tensor, name: str) -> torch.Tensor:
        return v[:, columns(self.offsets, name)]

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """The dot products v · g_j, (n, m), of each row of v (n, d_active) and each example."""
        out = None
        for layer in self.layers:
            weight = self._part(v, layer.weight)
            bias = None if layer.bias is None else self._part(v, layer.bias)
            for u, w in self.found.factors[layer.key]:
                term = _weight_dot(weight, layer.rows, layer.cols, u, w)
                if bias is not None:  # a column Σ_t u_t (side "v") or a row Σ_t v_t ("u")
                    term = term + bias @ bias_grad(layer, [(u, w)]).T
                out = term if out is None else out + term
        if self.rest:
            rest = torch.cat([self._part(v, name) for name in self.rest], 1)
            term = rest @ self.found.rest.T
            out = term if out is None else out + term
        return out

    def weighted_sum(self, kappa: torch.Tensor) -> torch.Tensor:
        """Σ_j κ_j g_j, (d_active,). ``kappa``: (m,)."""
        first = next(iter(self.found.factors.values()))[0][1]
        total = torch.zeros(self.d_active, dtype=first.dtype, device=first.device)
        for layer in self.layers:
            weight = total[columns(self.offsets, layer.weight)].view(layer.rows, layer.cols)
            bias = None if layer.bias is None else total[columns(self.offsets, layer.bias)]
            for u, w in self.found.factors[layer.key]:
                weighted = w * kappa[:, None, None]
                if u.dtype == torch.int64:  # token ids: rows of the embedding
                    weight.index_add_(0, u.reshape(-1), weighted.reshape(-1, layer.cols))
                else:
                    weight += torch.einsum("btr,btc->rc", u, weighted)
                if bias is not None:
                    bias += kappa @ bias_grad(layer, [(u, w)])
        if self.rest:
            summed = kappa @ self.found.rest
            k = 0
            for name in self.rest:
                part = total[columns(self.offsets, name)]
                part.copy_(summed[k : k + part.numel()])
                k += part.numel()
        return total

    def squared_norms(self) -> torch.Tensor:
        """‖g_j‖², (m,)."""
        return squared_norms(self.found, self.layers)

    def finite_probe(self) -> torch.Tensor:
        """A tensor that is finite exactly when every gradient is (a 0-dim sum).

        The factors' sums: a gradient Σ_t u_t v_tᵀ is finite when its factors are (and
        overflows are caught where the dot products are checked).
        """
        sums = [
            t.sum()
            for pairs in self.found.factors.values()
            for pair in pairs
            for t in pair
            if t.dtype != torch.int64
        ]
        if self.found.rest is not None:
            sums.append(self.found.rest.sum())
        return torch.stack(sums).sum()


def _weight_dot(part: torch.Tensor, rows: int, cols: int, u: torch.Tensor, w: torch.Tensor):
    """Σ_t u_tᵀ V_q w_t for each query q and example b, (n, m).

    Args:
        part: The adjoints' coordinates of the layer's weight, (n, rows·cols) (a slice of
            the flat vectors: not copied).
        rows: The weight's rows as a matrix.
        cols: Its columns.
        u: (m, T, rows) floating, or (m, T) token ids (the one-hot rows).
        w: (m, T, cols).
    """
    n = part.shape[0]
    weight = part.view(n, rows, cols)  # V_q (a view: the slice's rows are contiguous)
    m, t = w.shape[0], w.shape[1]
    if not m:
        return part.new_zeros(n, 0)
    if u.dtype == torch.int64:  # V_q's row of each token, against w_t
        size = max(1, SLICE_ELEMENTS // max(1, n * t * cols))
        return torch.cat(
            [
                torch.einsum("qbtc,btc->qb", weight[:, u[a : a + size]], w[a : a + size])
                for a in range(0, m, size)
            ],
            1,
        )
    # the cheaper of forming each example's gradient Σ_t u_t w_tᵀ (m·T·rows·cols, then
    # n·m·rows·cols) and contracting V_q with w_t first (n·m·T·rows·cols)
    if t > 1 and n * t > n + t:
        grads = torch.einsum("btr,btc->brc", u, w).reshape(m, rows * cols)
        return part @ grads.T
    size = max(1, SLICE_ELEMENTS // max(1, n * t * rows))
    parts = []
    for a in range(0, m, size):
        wa, ua = w[a : a + size], u[a : a + size]
        k = wa.shape[0]
        vw = torch.matmul(weight, wa.reshape(k * t, cols).T)  # V_q w_t, (n, rows, k·T)
        parts.append((vw * ua.reshape(k * t, rows).T).reshape(n, rows, k, t).sum((1, 3)))
    return torch.cat(parts, 1)


class StepGrads:
    """Chooses, once per engine, how a step's per-example gradients are held.

    Args:
        fm: The functional model.
        loss_fn: The training loss.
        batch_of: ``indices -> (inputs..., labels)``: the training examples, cast.
        n_train: The number of training examples.
    """

    def __init__(self, fm: FunctionalModel, loss_fn: Callable, batch_of: Callable, n_train: int):
        self.fm, self.loss_fn, self.batch_of, self.n_train = fm, loss_fn, batch_of, n_train
        self.plan: tuple[list[Layer], list[str]] | None = None
        self.offsets = self.offsets_of(fm)

    @staticmethod
    def offsets_of(fm: FunctionalModel) -> dict[str, tuple[int, int]]:
        """Active parameter name -> (first coordinate, size) in the flat vectors."""
        offsets, a = {}, 0
        for name, size in zip(fm.active_names, fm.sizes, strict=False):
            offsets[name] = (a, size)
            a += size
        return offsets

    def by_layer(self, step) -> bool:
        """Whether the step's examples take the layer route (decided on the first step asked).

        They do for models whose per-example gradients of a step pass `LAYER_ROUTE_BYTES`
        and that have layers whose captured factors rebuild autograd's gradients on two
        examples (`factors.verify_layers`, at the step's weights).

        Args:
            step: A `Step` of the path (its batch's indices and weights).
        """
        fm = self.fm
        if len(step.indices) * fm.d_active * fm.dtype.itemsize < LAYER_ROUTE_BYTES:
            return False
        if self.plan is None:
            layers, rest = find_layers(fm)
            if self.n_train < 2:  # (one example cannot show how rows group into examples)
                layers = []
            if layers:
                two = self.batch_of(torch.arange(2))
                w = fm.flatten(step.params)
                layers, rest = verify_layers(fm, w, two, self.loss_fn, layers, rest)
            if layers:
                *inputs, labels = two
                scalars = example_losses(fm, labels, self.loss_fn)
                if not _worth_it(capture(fm, w, inputs, scalars, layers), rest):
                    layers = []
            self.plan = (layers, rest)
        return bool(self.plan[0])

    def layer_grads(self, w: torch.Tensor, indices: torch.Tensor) -> LayerGrads | None:
        """The examples' gradients at w by layer (None when this batch cannot be captured).

        Args:
            w: Flat parameters, (d,).
            indices: The examples' dataset indices, (m,).
        """
        fm = self.fm
        layers, rest = self.plan
        if len(indices) < 1:
            return None
        *inputs, labels = self.batch_of(indices)
        fm.routes.pop("loss_fn", None)  # (set again by the rest's gradients, if any)
        try:
            found = capture(
                fm,
                w,
                inputs,
                example_losses(fm, labels, self.loss_fn),
                layers,
                rest,
                lambda names: fm.loss_grads(w, (*inputs, labels), self.loss_fn, names=names),
            )
        except (NotBatchFirst, ValueError):  # (a layer called without the batch first)
            return None
        # (diagnostics: the layers from one batched pass; the rest's route, if any)
        others = fm.routes.get("loss_fn")
        others = f"; other parameters: {others}" if others else ""
        fm.routes["loss_fn"] = LAYERS + others
        return LayerGrads(found, layers, rest, self.offsets, fm.d_active)


class QueryLayers:
    """The queries' weighted node gradients Σ_k ω_k ∇f(x; p_k) by layer, for large models.

    The quadrature needs, for each query and step, Σ_k ω_k ∇_w f(x; w_s + t_k Δ_s) as a flat
    (d,) vector. By vmap each node's gradient is formed for every query, then weighted and
    copied into the flat vector; here each node is one batched forward and backward pass of
    the queries, and each layer's term Σ_k ω_k Σ_t u_t v_tᵀ is added straight into the
    flat vector (Linear: a batched product of the captured output gradients and inputs).
    Used when one node's query gradients pass `LAYER_ROUTE_BYTES` and the layers' captured
    terms rebuild autograd's gradients of the explained outputs (checked on the first call).

    Args:
        fm: The functional model.
        inputs: The queries' inputs, each (n, ...).
        target: Their targets, (n,), or None.
        output_fn: The explained quantity, acting row by row (`FunctionalModel.check_rows`).
    """

    def __init__(self, fm: FunctionalModel, inputs, target, output_fn):
        self.fm, self.inputs, self.target, self.output_fn = fm, inputs, target, output_fn
        self.plan: tuple[list[Layer], list[str]] | None = None
        self.offsets = StepGrads.offsets_of(fm)

    def usable(self, w: torch.Tensor, n: int) -> bool:
        """Whether to take this route for n queries (decided on the first call, at w (d,))."""
        fm = self.fm
        if n < 1 or n * fm.d_active * fm.dtype.itemsize < LAYER_ROUTE_BYTES:
            return False
        if self.plan is None:
            layers, rest = find_layers(fm)
            fm.check_rows(self.output_fn, w, self.inputs, self.target)
            try:
                probe = capture(fm, w, self.inputs, self._scalars, layers, check=True)
                layers = [x for x in layers if x.key not in probe.failed]
            except NotBatchFirst:  # (outputs without a row per query)
                layers, probe = [], None
            covered = {name for layer in layers for name in layer.names}
            rest = [name for name in fm.active_names if name not in covered]
            if probe is not None and not _worth_it(probe, rest):
                layers = []
            self.plan = (layers, rest)
        return bool(self.plan[0])

    def _scalars(self, outputs) -> torch.Tensor:
        return self.output_fn(outputs, self.target).reshape(-1)

    def grads(self, points: torch.Tensor, weights: torch.Tensor, factored: bool = False):
        """Σ_k ω_gk ∇_w f(x; points[g·q + k]) for each group g and query, (g, n, d_active).

        Args:
            points: Flat parameters, (g·q, d).
            weights: (g, q) quadrature weights.
            factored: Return each group's sum as its nodes' factors (a list of g
                `NodeFactors`), where every parameter is in a layer.
        """
        fm = self.fm
        layers, rest = self.plan
        groups, q = weights.shape
        n = n_rows(self.inputs)
        if factored and not rest:
            fm.routes["output_fn"] = LAYERS
            return [
                NodeFactors(
                    self,
                    [capture(fm, points[g * q + k], self.inputs, self._scalars, layers)
                     for k in range(q)],
                    [float(x) for x in weights[g]],
                )
                for g in range(groups)
            ]  # fmt: skip
        # every coordinate is written: the layers' by one product of all nodes' factors
        out = torch.empty(groups, n, fm.d_active, dtype=fm.dtype, device=fm.device)
        route = None
        for g in range(groups):
            flat = out[g]
            omegas = [float(x) for x in weights[g]]
            found = [
                capture(fm, points[g * q + k], self.inputs, self._scalars, layers) for k in range(q)
            ]
            self.write_layers(flat, found, omegas)
            for name in rest:  # (the rest's gradients by vmap, node by node)
                flat[:, columns(self.offsets, name)].zero_()
            for k in range(q if rest else 0):
                part, _ = fm.output_grads(
                    points[g * q + k][None], self.inputs, self.target, self.output_fn, names=rest
                )
                route = fm.routes.get("output_fn")
                at = 0
                for name in rest:
                    block = flat[:, columns(self.offsets, name)]
                    block.add_(part[0][:, at : at + block.shape[1]], alpha=omegas[k])
                    at += block.shape[1]
        fm.routes["output_fn"] = LAYERS + (f"; other parameters: {route}" if route else "")
        return out

    def write_layers(self, flat: torch.Tensor, found: list[LayerFactors], omegas) -> None:
        """flat[:, layers] = Σ_k ω_k (node k's layer terms), (n, d_active) in place."""
        for layer in self.plan[0]:
            pairs = [
                (u, w, omega)
                for f, omega in zip(found, omegas, strict=True)
                for u, w in f.factors[layer.key]
            ]
            self._write_layer(flat, layer, pairs)

    def _write_layer(self, flat: torch.Tensor, layer: Layer, pairs) -> None:
        """flat[:, layer] = Σ over (u, v, ω) of ω Σ_t u_t v_tᵀ (and the folded bias)."""
        n = flat.shape[0]
        weight = flat[:, columns(self.offsets, layer.weight)].view(n, layer.rows, layer.cols)
        dense = [(u * omega, w) for u, w, omega in pairs if u.dtype != torch.int64]
        if dense:  # one batched product over every node's positions, written in place
            u = torch.cat([u for u, _ in dense], 1)
            torch.bmm(u.transpose(1, 2), torch.cat([w for _, w in dense], 1), out=weight)
        else:
            weight.zero_()
        for u, w, omega in pairs:
            if u.dtype == torch.int64:  # token ids: rows of the embedding
                rows = torch.arange(n, device=u.device)[:, None].expand_as(u)
                weight.index_put_((rows, u), w * omega, accumulate=True)
        if layer.bias is not None:
            sides = [bias_grad(layer, [(u, w)]) * omega for u, w, omega in pairs]
            flat[:, columns(self.offsets, layer.bias)].copy_(torch.stack(sides).sum(0))


class NodeFactors:
    """One group's φ = Σ_k ω_k ∇f(x; p_k) for n queries, kept as its nodes' layer factors.

    For plain SGD the adjoint is v = η φ, and the sweep needs φ only through dot products:
    with Δ_s (the step's check), with the coupled weight decay, and with the batch's
    gradients (the contributions). Each is a few products of the factors,
    Σ_t u_tᵀ X v_t or Σ_{t,s} (u_t·u'_s)(v_t·v'_s), never the (n, d_active) φ, which
    `dense` forms for anything else. Only for models whose parameters are all in layers.

    Args:
        owner: The `QueryLayers` that captured them (its plan and offsets).
        found: Each node's factors.
        omegas: Each node's quadrature weight.
    """

    def __init__(self, owner: QueryLayers, found: list[LayerFactors], omegas: list[float]):
        self.owner, self.found, self.omegas = owner, found, omegas
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """φ as flat vectors, (n, d_active) (formed once)."""
        if self._dense is None:
            fm = self.owner.fm
            n = n_rows(self.owner.inputs)
            flat = torch.empty(n, fm.d_active, dtype=fm.dtype, device=fm.device)
            self.owner.write_layers(flat, self.found, self.omegas)
            self._dense = flat
        return self._dense

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        """φ · x for each query, (n,). ``x``: (d_active,)."""
        total = None
        offsets = self.owner.offsets
        for layer in self.owner.plan[0]:
            matrix = x[columns(offsets, layer.weight)].view(layer.rows, layer.cols)
            bias = None if layer.bias is None else x[columns(offsets, layer.bias)]
            for f, omega in zip(self.found, self.omegas, strict=True):
                for u, w in f.factors[layer.key]:
                    if u.dtype == torch.int64:  # token ids: rows of the matrix
                        term = (matrix[u] * w).sum((1, 2))
                    else:
                        term = ((u @ matrix) * w).sum((1, 2))
                    if bias is not None:
                        term = term + bias_grad(layer, [(u, w)]) @ bias
                    term = term * omega
                    total = term if total is None else total + term
        return total

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dot(x)

    def dot_train(self, train: LayerFactors, scale: Callable[[str], float]) -> torch.Tensor:
        """Σ_params scale(param) φ_p · g_{j,p} for each query and example, (n, m).

        Args:
            train: The examples' factors (`LayerGrads.found`), captured for the same layers.
            scale: A parameter's weight (η σ of its group).
        """
        layers = self.owner.plan[0]
        total = None
        for f, omega in zip(self.found, self.omegas, strict=True):
            term = dot_products(f, train, layers, lambda name, o=omega: o * scale(name))
            total = term if total is None else total + term
        return total
