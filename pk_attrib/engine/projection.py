"""Random projection of gradients: memory-bounded, unbiased dot products.

A projector maps a gradient-sized vector g (d,) to P g (K,) with a random P such that
E[PᵀP] = I, so (P u)·(P g) is an unbiased estimate of u·g with variance ~ 1/K. P is
never stored: it is generated block by block — one block per recorded parameter tensor
(split further into column chunks), each from a `torch.Generator` on the computation device
seeded by (seed, parameter name, chunk) — so the projector's memory is O(K × chunk) and
the same P is rebuilt identically for the training and the query side.

`Projector.features` projects per-example gradients of any per-example scalar (`Rows`:
training losses or explained outputs) in chunks that fit ``memory_budget``, optionally
scaled per parameter first (P(s ⊙ g): checkpoint mode's √η).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ArgumentError
from .batches import n_rows, take
from .factors import bias_grad, capture, example_losses, weight_grad
from .functional import FunctionalModel
from .layers import Layer, find_layers


class ProjectorKind(str, enum.Enum):
    """Which random projection to use (``projector=`` on `PathKernelInfluence`).

    - ``IDENTITY``: no projection: exact dot products. The default without
      ``projection_dim``.
    - ``GAUSSIAN``: dense Gaussian P (entries N(0, 1/K)), blocked. The reference choice:
      unbiased, variance ~ 1/K; costs O(d·K) per vector. Use for small and medium models.
    - ``RADEMACHER``: dense ±1/√K entries. Same variance as Gaussian, cheaper to generate.
    - ``SPARSE``: sparse JL — each coordinate is hashed to s rows with a random sign; costs
      O(d·s) instead of O(d·K). Same accuracy as Gaussian at the same K. Use for large models
      on the CPU.
    - ``FACTORIZED``: per-layer projection of the gradients of ``nn.Linear``, HF-style
      ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` layers as Σ_t (P_u u_t)(P_v v_t)ᵀ from
      their inputs and output gradients (`layers`), so per-example gradients of those
      layers are never formed (memory O(batch × K)); other parameters fall back to
      ``GAUSSIAN``. It
      trades accuracy for speed and memory: the estimate is a product of two independent
      projections of dimension √K each, so its variance is larger than dense or sparse JL's
      at the same K and falls like 1/√K, not 1/K (error ~ K^(-1/4), not K^(-1/2)). A side
      no wider than its share is not projected (a classifier's last layer keeps its output
      gradients exact and projects its inputs to K / n_classes features), and a layer with
      at most K weights is not projected at all. Measured by
      benchmarks/bench_projection.py (digits MLP 64-32-10, K = 1024): relative error of the
      contributions 0.13 (0.12 for ``GAUSSIAN`` and ``SPARSE``), mean Spearman correlation
      with the exact contributions 0.99 (0.93); at K = 4096 every layer of that MLP fits
      and it is exact. In exchange, about 360x the throughput of per-example gradients
      times a stored P (1M-parameter MLP). Use for large models made mostly of Linear
      layers (MLPs, transformers) when a dense projection is too slow or too big, and expect
      to need a larger K than a dense one for the same accuracy on wide layers.
    """

    IDENTITY = "identity"
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    SPARSE = "sparse"
    FACTORIZED = "factorized"

    @classmethod
    def parse(cls, value: str | ProjectorKind) -> ProjectorKind:
        """Parse a kind, listing the valid ones in the error."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(k.value) for k in cls)
            raise ArgumentError(f"unknown projector {value!r}: use one of {valid}") from None


P_BLOCK_BYTES = 16 << 20  # the dense projectors generate P in blocks of at most this


def _seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(*parts))
    return gen


@dataclass
class Rows:
    """Examples whose per-example gradients are projected: inputs and their scalar.

    Attributes:
        inputs: The model's inputs, each (n, ...).
        scalars: ``rows -> (outputs -> (b,))``: the differentiated quantity of those rows.
        grads: ``(rows, names or None) -> (b, d_names)``: its per-example gradients.
    """

    inputs: tuple
    scalars: Callable[[slice], Callable[[Any], torch.Tensor]]
    grads: Callable[[slice, Sequence[str] | None], torch.Tensor]

    def __len__(self) -> int:
        return n_rows(self.inputs)


def loss_rows(fm: FunctionalModel, w: torch.Tensor, batch: Sequence, loss_fn) -> Rows:
    """The training losses of a batch ``(inputs..., labels)`` at w."""
    *inputs, labels = batch
    inputs = tuple(inputs)
    return Rows(
        inputs,
        lambda r: example_losses(fm, take(labels, r), loss_fn),
        lambda r, names: fm.loss_grads(w, (*take(inputs, r), take(labels, r)), loss_fn, names),
    )


def output_rows(fm: FunctionalModel, w: torch.Tensor, inputs, target, output_fn) -> Rows:
    """The explained outputs ``output_fn(outputs, target)`` of queries at w."""
    inputs = tuple(inputs)

    def tgt(r):
        return None if target is None else take(target, r)

    return Rows(
        inputs,
        lambda r: lambda out: output_fn(out, tgt(r)),
        lambda r, names: fm.output_grads(w[None], take(inputs, r), tgt(r), output_fn, names=names)[
            0
        ][0],
    )


class Projector:
    """Identity projector and base class: ``project`` maps (m, d) to (m, dim)."""

    kind = ProjectorKind.IDENTITY

    def __init__(self, fm: FunctionalModel, dim: int | None = None, seed: int = 0):
        self.fm = fm
        self.seed = seed
        self.names = fm.active_names
        self.sizes = fm.sizes[: fm.n_active]
        self.dim = fm.d_active if dim is None else int(dim)
        self.chunk = 1 << 16  # columns generated at once: O(dim × chunk) memory

    def config(self) -> dict:
        """What identifies this projection (for caches)."""
        return {"kind": self.kind.value, "dim": self.dim, "seed": self.seed, "names": self.names}

    def project(self, x: torch.Tensor, scale: dict[str, float] | None = None) -> torch.Tensor:
        """P (s ⊙ x) for each row: (m, d_active) -> (m, dim).

        Args:
            x: Gradients, (m, d_active).
            scale: A factor per parameter name applied first (default: none).
        """
        return self._scaled(x, scale)

    def _scaled(self, x: torch.Tensor, scale: dict[str, float] | None) -> torch.Tensor:
        if scale is None:
            return x
        factors = torch.cat(
            [
                torch.full((size,), float(scale[name]), dtype=x.dtype, device=x.device)
                for name, size in zip(self.names, self.sizes, strict=True)
            ]
        )
        return x * factors

    def _blocks(self):
        """(name, column offset in x, column range within the parameter) chunks."""
        offset = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            for a in range(0, size, self.chunk):
                yield name, offset + a, a, min(size, a + self.chunk) - a
            offset += size

    def rows_per_chunk(self) -> int:
        """Examples whose per-example gradients are formed and projected at once."""
        # the unprojected gradients of a chunk stay a small multiple of 4·d bytes; half a
        # plain gradient chunk: the projection's temporaries come on top (measured: a full
        # chunk overshoots memory_budget by ~10% on the 1M MLP with "sparse")
        fm = self.fm
        return max(1, min(fm.chunk_size(2), fm.memory_budget // max(1, 16 * self.dim)))

    def features(
        self, w: torch.Tensor, rows: Rows, scale: dict[str, float] | None = None
    ) -> torch.Tensor:
        """P (s ⊙ ∇_w scalar_i(w)) for each row, (n, dim), in memory-bounded chunks.

        Args:
            w: Flat parameters, (d,).
            rows: The examples and their scalar (`loss_rows`, `output_rows`).
            scale: A factor per parameter name, applied before projecting.
        """
        size = self.rows_per_chunk()
        out = [
            self.project(rows.grads(slice(a, a + size), None), scale)
            for a in range(0, len(rows), size)
        ]
        return self._joined(out)

    def _joined(self, out: list[torch.Tensor]) -> torch.Tensor:
        if not out:
            return torch.zeros(0, self.dim, dtype=self.fm.dtype, device=self.fm.device)
        return out[0] if len(out) == 1 else torch.cat(out)

    def training_features(
        self,
        w: torch.Tensor,
        batch: Sequence[torch.Tensor],
        loss_fn: Callable,
        scale: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Projected per-example loss gradients P g_i(w), (B, dim), in memory-bounded chunks."""
        return self.features(w, loss_rows(self.fm, w, batch, loss_fn), scale)


class DenseProjector(Projector):
    """Dense Gaussian or Rademacher P, generated in (dim × chunk) blocks.

    A block is a function of (seed, kind, parameter, column offset) alone. `project` generates
    each block once per call. `features` generates each block once per batch, not once per
    chunk of per-example gradients: loop over blocks outside, rows inside. For that, the
    gradients of layers (`layers`) are rebuilt block by block from their captured terms;
    other parameters take torch.func per-example gradients. When a layer's captured terms do
    not add up to its gradient (a weight also used elsewhere) the batch takes torch.func
    per-example gradients for every parameter.

    Args:
        fm: The functional model.
        dim: K.
        seed: The projection's seed.
        rademacher: ±1/√K entries instead of Gaussian ones.
        plan: ``(layers, rest)`` from `factors.verify_layers` (default: `layers.find_layers`,
            checked on each batch).
    """

    def __init__(self, fm, dim, seed=0, rademacher: bool = False, plan=None):
        super().__init__(fm, dim, seed)
        self.rademacher = rademacher
        self.kind = ProjectorKind.RADEMACHER if rademacher else ProjectorKind.GAUSSIAN
        # a block of P takes at most 16 MiB (a fixed layout: the same seed, the same P)
        self.chunk = max(1, min(1 << 16, P_BLOCK_BYTES // max(1, 4 * self.dim)))
        self.plan = plan

    def config(self):
        """Adds the block layout (2: blocks of 16 MiB; 1 had 64 MiB)."""
        return {**super().config(), "blocks": 2}

    def block(self, name: str, start: int, width: int) -> torch.Tensor:
        """The (dim, width) block of P for columns start.. of parameter ``name``."""
        fm = self.fm
        gen = _generator(fm.device, self.seed, self.kind.value, name, start)
        scale = 1.0 / math.sqrt(self.dim)
        if self.rademacher:  # one random bit per entry: the low bit of each random byte
            n = self.dim * width
            words = torch.empty((n + 7) // 8, dtype=torch.int64, device=fm.device)
            words.random_(generator=gen)
            bits = words.view(torch.uint8)[:n].reshape(self.dim, width) & 1
            return bits.to(fm.dtype).mul_(2 * scale).sub_(scale)
        gauss = torch.randn(self.dim, width, generator=gen, device=fm.device, dtype=fm.dtype)
        return gauss.div_(math.sqrt(self.dim))

    def project(self, x, scale=None):
        """P (s ⊙ x), accumulated block by block: (m, d_active) -> (m, dim)."""
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        factor = {} if scale is None else scale
        for name, col, start, width in self._blocks():
            block = self.block(name, start, width).to(x.dtype).T
            out.addmm_(x[:, col : col + width], block, alpha=float(factor.get(name, 1.0)))
        return out

    def features(self, w, rows, scale=None):
        """P (s ⊙ g_i) for each row, (n, dim), each block of P made once per group of rows.

        Rows are taken in groups whose captured terms (and the other parameters' gradients)
        fit half of ``memory_budget``: a single group, so P made once, unless the batch is huge.
        """
        fm = self.fm
        layers, rest = self.plan or find_layers(fm, self.names)
        if not layers:
            return super().features(w, rows, scale)
        chunk = fm.chunk_size()  # a forward/backward pass at most as large as a gradient chunk
        out, group, held = [], [], 0
        for a in range(0, len(rows), chunk):
            r = slice(a, a + chunk)
            found = capture(
                fm, w, take(rows.inputs, r), rows.scalars(r), layers, check=self.plan is None
            )
            if found.failed:  # the captured terms do not rebuild a layer's gradient
                return super().features(w, rows, scale)
            grads = rows.grads(r, rest) if rest else None
            group.append((found.factors, grads))
            held += sum(_nbytes(t) for pairs in found.factors.values() for p in pairs for t in p)
            held += 0 if grads is None else _nbytes(grads)
            if held >= fm.memory_budget // 2:
                out.append(self._project_group(group, layers, rest, scale))
                group, held = [], 0
        if group:
            out.append(self._project_group(group, layers, rest, scale))
        return self._joined(out)

    def _project_group(self, group, layers: list[Layer], rest, scale) -> torch.Tensor:
        """P g for the rows of a group: each block of P generated once, rows inside."""
        fm = self.fm
        terms = {
            layer.key: [
                tuple(torch.cat([t[layer.key][j][i] for t, _ in group]) for i in range(2))
                for j in range(len(group[0][0][layer.key]))
            ]
            for layer in layers
        }
        grads = torch.cat([g for _, g in group]) if rest else None
        n = sum(g[1].shape[0] if g[1] is not None else _rows_of(g[0]) for g in group)
        source = {}  # parameter -> ("weight" | "bias", layer) or ("rest", column in grads)
        for layer in layers:
            source[layer.weight] = ("weight", layer)
            if layer.bias is not None:
                source[layer.bias] = ("bias", layer)
        column = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            if name in rest:
                source[name] = ("rest", column)
                column += size
        out = torch.zeros(n, self.dim, dtype=fm.dtype, device=fm.device)
        slice_bytes = max(1, fm.memory_budget // 8)
        factor = {} if scale is None else scale
        for name, _, start, width in self._blocks():
            p = self.block(name, start, width).T
            alpha = float(factor.get(name, 1.0))
            kind, where = source[name]
            if kind == "rest":
                out.addmm_(grads[:, where + start : where + start + width], p, alpha=alpha)
                continue
            pairs = terms[where.key]
            if kind == "bias":
                out.addmm_(bias_grad(where, pairs)[:, start : start + width], p, alpha=alpha)
                continue
            # columns start.. of the flattened weight matrix: its rows first..last
            cols = where.cols
            first, last = start // cols, (start + width - 1) // cols + 1
            skip = start - first * cols
            size = max(1, slice_bytes // max(1, (last - first) * cols * fm.dtype.itemsize))
            for a in range(0, n, size):  # the per-example gradients' columns, size rows at once
                part = [(u[a : a + size], v[a : a + size]) for u, v in pairs]
                g = weight_grad(where, part, first, last)
                out[a : a + size].addmm_(
                    g.reshape(g.shape[0], -1)[:, skip : skip + width], p, alpha=alpha
                )
        return out


def _rows_of(factors: dict) -> int:
    for pairs in factors.values():
        return pairs[0][1].shape[0]
    return 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SparseProjector(Projector):
    """Sparse JL: coordinate j goes to s random rows with random signs, scaled by 1/√s."""

    kind = ProjectorKind.SPARSE

    def __init__(self, fm, dim, seed=0, nonzeros: int = 4):
        super().__init__(fm, dim, seed)
        self.s = max(1, min(int(nonzeros), self.dim))

    def config(self):
        """Adds the number of nonzeros per column."""
        return {**super().config(), "nonzeros": self.s}

    def project(self, x, scale=None):
        """P (s ⊙ x) by scatter-adds: O(m × d × s) work."""
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        factor = {} if scale is None else scale
        for name, col, start, width in self._blocks():
            gen = _generator(x.device, self.seed, "sparse", name, start)
            rows = torch.randint(0, self.dim, (self.s, width), generator=gen, device=x.device)
            signs = torch.randint(0, 2, (self.s, width), generator=gen, device=x.device)
            alpha = float(factor.get(name, 1.0)) / math.sqrt(self.s)
            signs = (signs.to(x.dtype) * 2 - 1) * alpha
            block = x[:, col : col + width]
            for r in range(self.s):
                out.index_add_(1, rows[r], block * signs[r])
        return out
