"""The factorized projector, and `make_projector`, which builds a projector of any kind.

`FactorizedProjector` projects layers' gradients from their terms (`factors`): they are
never formed.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..exceptions import ArgumentError, PkAttribWarning, UnsupportedError
from .batches import take
from .factors import capture, scaled
from .functional import FunctionalModel
from .layers import Layer, find_layers
from .projection import (
    DenseProjector,
    Projector,
    ProjectorKind,
    Rows,
    SparseProjector,
    _generator,
)


class FactorizedProjector(Projector):
    """Kronecker-factored projection of layers' gradients; dense for other parameters.

    A layer's per-example gradient G = Σ_t u_t v_tᵀ (`layers`: Linear, HF-style Conv1D,
    Embedding, Conv2d; t: positions of a sequence, output positions of a convolution, calls)
    is projected as Σ_t (P_u u_t)(P_v v_t)ᵀ, which equals (P_u ⊗ P_v) applied to the
    flattened gradient, with E[(P_u ⊗ P_v)ᵀ(P_u ⊗ P_v)] = I. A folded bias is one more column
    (or row) of the matrix. Each layer gets k_u × k_v ≤ dim features (√dim each side, except
    that a side no wider than its share stays unprojected and the other side gets dim / its
    width); the remaining parameters share one dense block of dim features, or stay
    unprojected when they have at most dim coordinates. Features are concatenated (dot
    products add up, so they stay unbiased). An Embedding's u is a one-hot row, so P_u u_t is
    a column of P_u: a token costs k_u numbers, not a vocabulary-sized vector.

    Unbiased, but noisier than a dense or sparse projection with as many features: a
    Kronecker product of two √dim-dimensional projections is not a JL projection of
    dimension dim, and the variance of a dot product falls like 1/√dim rather than 1/dim
    (see `ProjectorKind`). It buys speed and memory, not accuracy.

    Args:
        fm: The functional model.
        dim: K.
        seed: The projection's seed.
        plan: ``(layers, rest)`` from `factors.verify_layers`; default: every candidate layer
            (`layers.find_layers`), checked on the first batch of two or more examples, with
            `UnsupportedError` if a layer's terms do not rebuild its gradient.
    """

    kind = ProjectorKind.FACTORIZED

    def __init__(self, fm, dim, seed=0, plan=None):
        super().__init__(fm, dim, seed)
        self.k_in = max(1, math.isqrt(int(dim)))
        self.k_out = max(1, int(dim) // self.k_in)
        self.layers, self.rest = plan or find_layers(fm, self.names)
        self._checked = plan is not None  # whether the layers' terms rebuild their gradients
        self.offsets = {}
        offset = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            self.offsets[name] = (offset, size)
            offset += size
        # the other parameters: projected densely, unless they fit in dim features
        self.dense = None
        rest_size = sum(self.offsets[n][1] for n in self.rest)
        if rest_size > int(dim):
            self.dense = DenseProjector(fm, dim, seed)
            self.dense.names = self.rest
            self.dense.sizes = [self.offsets[n][1] for n in self.rest]
        # each layer's (k_u, k_v): a side no wider than its share stays unprojected
        self.sides = {
            layer.key: _sides(*layer.shape, int(dim), self.k_out, self.k_in)
            for layer in self.layers
        }
        features = sum(k_u * k_v for k_u, k_v in self.sides.values())
        self.dim = features + (int(dim) if self.dense is not None else rest_size)

    def config(self):
        """Adds the layout version (4: Conv1D, Embedding, Conv2d and tied weights as layers)."""
        layers = [[x.key, x.weight, x.bias, list(map(list, x.uses))] for x in self.layers]
        return {**super().config(), "layout": 4, "layers": layers}

    def factors(self, key: str, u_width: int, v_width: int):
        """(P_u (k_u, u_width), P_v (k_v, v_width)) of a layer; None for a side not projected.

        A side that is not projected (its width fits its share of the features) is None:
        that factor of the estimate is exact.
        """
        fm = self.fm
        k_u, k_v = self.sides[key]
        gen = _generator(fm.device, self.seed, "factorized", key)
        p_u = p_v = None
        if k_u < u_width:
            p_u = torch.randn(k_u, u_width, generator=gen, device=fm.device, dtype=fm.dtype)
            p_u /= math.sqrt(k_u)
        if k_v < v_width:
            p_v = torch.randn(k_v, v_width, generator=gen, device=fm.device, dtype=fm.dtype)
            p_v /= math.sqrt(k_v)
        return p_u, p_v

    def _project_layer(self, layer: Layer, x: torch.Tensor, scale) -> torch.Tensor:
        """P_u [s_w W | s_b b] P_vᵀ for each row of flat x, (m, k_u·k_v).

        The weight and the bias are projected apart (each with its columns or rows of P),
        so the layer's gradient is never copied into one matrix.
        """
        s_w = 1.0 if scale is None else float(scale[layer.weight])
        p_u, p_v = self.factors(layer.key, *layer.shape)
        p_u = None if p_u is None else p_u.to(x.dtype)
        p_v = None if p_v is None else p_v.to(x.dtype)
        a, n = self.offsets[layer.weight]
        weight = x[:, a : a + n].reshape(-1, layer.rows, layer.cols)
        if layer.bias is None:
            out = weight if p_u is None else p_u @ weight
            out = out if p_v is None else out @ p_v.T
            return (out if s_w == 1.0 else out * s_w).reshape(x.shape[0], -1)
        s_b = 1.0 if scale is None else float(scale[layer.bias])
        b, nb = self.offsets[layer.bias]
        if layer.bias_side == "v":  # [W | b]: the bias is the last column
            bias = x[:, b : b + nb].reshape(-1, layer.rows, 1)
            if p_u is not None:
                weight, bias = p_u @ weight, p_u @ bias
            weight, bias = weight * s_w, bias * s_b
            if p_v is None:
                out = torch.cat([weight, bias], 2)
            else:
                out = weight @ p_v[:, : layer.cols].T + bias @ p_v[:, layer.cols :].T
        else:  # [W; b]: the bias is the last row
            bias = x[:, b : b + nb].reshape(-1, 1, layer.cols)
            if p_v is not None:
                weight, bias = weight @ p_v.T, bias @ p_v.T
            weight, bias = weight * s_w, bias * s_b
            if p_u is None:
                out = torch.cat([weight, bias], 1)
            else:
                out = p_u[:, : layer.rows] @ weight + p_u[:, layer.rows :] @ bias
        return out.reshape(x.shape[0], -1)

    def project(self, x, scale=None):
        """Projects each layer as P_u [W | b] P_vᵀ and the rest densely."""
        parts = [self._project_layer(layer, x, scale) for layer in self.layers]
        if self.rest:
            rest = torch.cat(
                [x[:, a : a + n] for a, n in (self.offsets[name] for name in self.rest)], 1
            )
            if scale is not None:
                rest = rest * self._rest_scale(scale, rest)
            parts.append(rest if self.dense is None else self.dense.project(rest))
        return torch.cat(parts, 1)

    def _rest_scale(self, scale, like: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                torch.full(
                    (self.offsets[n][1],), float(scale[n]), dtype=like.dtype, device=like.device
                )
                for n in self.rest
            ]
        )

    def rows_per_chunk(self) -> int:
        """Examples captured at once: their projected terms within the budget."""
        return max(1, self.fm.memory_budget // max(1, 64 * self.dim))

    def features(self, w, rows: Rows, scale=None):
        """Layers from forward/backward captures (no per-example gradients formed)."""
        size = self.rows_per_chunk()
        out = [
            self._features(w, rows, slice(a, a + size), scale) for a in range(0, len(rows), size)
        ]
        return self._joined(out)

    def _features(self, w, rows: Rows, r: slice, scale):
        fm = self.fm
        inputs = take(rows.inputs, r)
        found = capture(fm, w, inputs, rows.scalars(r), self.layers, check=not self._checked)
        if found.failed:
            raise UnsupportedError(
                "projector='factorized' builds each layer's per-example gradient from the "
                "layer's own inputs and output gradients, but here they do not add up to "
                f"it ({', '.join(sorted(found.failed))}): its weight is also used outside its "
                "modules, or the layer runs on inputs whose first dimension is not the batch "
                "(e.g. time-major (T, B, ...)): use projector='gaussian', 'rademacher' or "
                "'sparse'"
            )
        batch = found.rows()
        # checked once the model is seen to rebuild a batch of several examples (one alone
        # cannot show how a layer's rows group into examples)
        self._checked = self._checked or batch >= 2
        parts = []
        for layer in self.layers:
            s_w = 1.0 if scale is None else float(scale[layer.weight])
            s_b = 1.0 if scale is None or layer.bias is None else float(scale[layer.bias])
            k_u, k_v = self.sides[layer.key]
            p_u, p_v = self.factors(layer.key, *layer.shape)
            feat = None
            for pair in found.factors[layer.key]:
                u, v = scaled(layer, pair, s_w, s_b)
                if u.dtype == torch.int64:  # token ids: P_u's columns, or one-hot rows
                    u = (
                        torch.nn.functional.one_hot(u, layer.rows).to(v.dtype)
                        if p_u is None
                        else p_u.T[u]
                    )
                elif p_u is not None:
                    u = u @ p_u.T
                v = v if p_v is None else v @ p_v.T
                term = torch.einsum("bto,bti->boi", u, v)
                feat = term if feat is None else feat + term
            parts.append(feat.reshape(batch, k_u * k_v))
        if self.rest:
            grads = rows.grads(r, self.rest)
            if scale is not None:
                grads = grads * self._rest_scale(scale, grads)
            parts.append(grads if self.dense is None else self.dense.project(grads))
        return torch.cat(parts, 1)


def _sides(width_u: int, width_v: int, dim: int, k_u: int, k_v: int) -> tuple[int, int]:
    """(k_u, k_v) of a layer's factorized features, k_u × k_v ≤ dim.

    ``k_u`` × ``k_v`` (≈ √dim each) is the default share of the two sides.

    A side no wider than its share stays unprojected (exact), and the other side gets the
    rest of the dim features: the last layer of a classifier (10 outputs) keeps its output
    gradients exact and projects its inputs to dim / 10 features, rather than spreading 10
    numbers over √dim random ones. A layer with at most dim weights is not projected.
    """
    if width_u * width_v <= dim:
        return width_u, width_v
    if width_u <= k_u:
        return width_u, dim // width_u
    if width_v <= k_v:
        return dim // width_v, width_v
    return k_u, k_v


def make_projector(
    fm: FunctionalModel,
    kind: str | ProjectorKind,
    dim: int | None,
    seed: int = 0,
    plan: tuple[list[Layer], list[str]] | None = None,
) -> Projector:
    """Build a projector of the given kind (``dim=None``: identity).

    A dense or sparse projection to at least as many dimensions as it projects
    (``dim`` >= the active gradient coordinates) saves no memory and only adds noise: it is
    built as asked, with a `PkAttribWarning` saying so. (``"factorized"`` leaves such
    layers unprojected by itself.)

    Args:
        fm: The functional model.
        kind: A `ProjectorKind`.
        dim: K, or None for no projection.
        seed: The projection's seed.
        plan: ``(layers, rest)`` whose terms are known to rebuild the gradients
            (`factors.verify_layers`); default: every candidate layer, checked when used
            (``"factorized"`` then raises `UnsupportedError` where one does not).
    """
    kind = ProjectorKind.parse(kind)
    if dim is None or kind is ProjectorKind.IDENTITY:
        return Projector(fm, None, seed)
    if isinstance(dim, bool) or not isinstance(dim, int) or int(dim) < 1:
        raise ArgumentError(f"projection_dim must be a positive int, got {dim!r}")
    if kind is not ProjectorKind.FACTORIZED and int(dim) >= fm.d_active:
        warnings.warn(
            f"projection_dim={dim} is at least the {fm.d_active:,} gradient coordinates it "
            f"projects: the {kind.value} projection keeps more numbers than the gradients "
            "and only adds noise; drop projection_dim= for exact contributions (or use "
            'projector="factorized", which leaves layers that fit unprojected)',
            PkAttribWarning,
            stacklevel=3,
        )
    if kind is ProjectorKind.SPARSE:
        return SparseProjector(fm, dim, seed)
    if kind is ProjectorKind.FACTORIZED:
        return FactorizedProjector(fm, dim, seed, plan)
    return DenseProjector(fm, dim, seed, rademacher=kind is ProjectorKind.RADEMACHER, plan=plan)
