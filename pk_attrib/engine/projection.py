"""Random projection of gradients: memory-bounded, unbiased dot products.

A projector maps a gradient-sized vector g (d,) to P g (K,) with a random P such that
E[PᵀP] = I, so (P u)·(P g) is an unbiased estimate of u·g with variance ~ 1/K. P is
never stored: it is generated block by block — one block per recorded parameter tensor
(split further into column chunks), each from a `torch.Generator` on the computation device
seeded by (seed, parameter name, chunk) — so the projector's memory is O(K × chunk) and
the same P is rebuilt identically for the training and the query side.
"""

from __future__ import annotations

import enum
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ..exceptions import PkAttribWarning, UnsupportedError
from .batches import n_rows, take
from .factors import capture, example_losses, linear_layers
from .functional import FunctionalModel


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
    - ``FACTORIZED``: per-layer projection of ``nn.Linear`` gradients as (P_out δ)(P_in a)ᵀ
      from activations and output gradients, so per-example gradients of those layers are
      never formed (memory O(batch × K)); other parameters fall back to ``GAUSSIAN``. It
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
            raise ValueError(f"unknown projector {value!r}: use one of {valid}") from None


def _seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(*parts))
    return gen


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

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x for each row: (m, d_active) -> (m, dim)."""
        return x

    def _blocks(self):
        """(name, column offset in x, column range within the parameter) chunks."""
        offset = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            for a in range(0, size, self.chunk):
                yield name, offset + a, a, min(size, a + self.chunk) - a
            offset += size

    def training_features(
        self,
        w: torch.Tensor,
        batch: Sequence[torch.Tensor],
        loss_fn: Callable,
    ) -> torch.Tensor:
        """Projected per-example loss gradients P g_i(w), (B, dim), in memory-bounded chunks."""
        fm = self.fm
        *inputs, labels = batch
        # chunk so that the unprojected gradients of a chunk stay a small multiple of 4·d bytes;
        # half a plain gradient chunk: the projection's temporaries come on top (measured:
        # a full chunk overshoots memory_budget by ~10% on the 1M MLP with "sparse")
        size = max(1, min(fm.chunk_size(2), fm.memory_budget // max(1, 16 * self.dim)))
        out = []
        for a in range(0, n_rows(labels), size):
            part = (*take(tuple(inputs), slice(a, a + size)), take(labels, slice(a, a + size)))
            out.append(self.project(fm.loss_grads(w, part, loss_fn)))
        if not out:
            return torch.zeros(0, self.dim, dtype=fm.dtype, device=fm.device)
        return torch.cat(out)


class DenseProjector(Projector):
    """Dense Gaussian or Rademacher P, generated in (dim × chunk) blocks.

    A block is a function of (seed, kind, parameter, column offset) alone. `project` generates
    each block once per call. `training_features` generates each block once per batch, not
    once per chunk of per-example gradients: loop over blocks outside, rows inside. For that,
    the gradients of ``nn.Linear`` layers are rebuilt block by block from the layer's inputs
    a_t and output gradients δ_t (g = Σ_t δ_t a_tᵀ, captured in one batched backward pass);
    other parameters take torch.func per-example gradients. When a layer's captured terms do
    not add up to its batch gradient (a layer called twice, a weight also used elsewhere) the
    batch takes torch.func per-example gradients for every parameter.
    """

    def __init__(self, fm, dim, seed=0, rademacher: bool = False):
        super().__init__(fm, dim, seed)
        self.rademacher = rademacher
        self.kind = ProjectorKind.RADEMACHER if rademacher else ProjectorKind.GAUSSIAN
        self.chunk = max(1, min(1 << 16, (64 << 20) // max(1, 4 * self.dim)))

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

    def project(self, x):
        """P x, accumulated block by block: (m, d_active) -> (m, dim)."""
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        for name, col, start, width in self._blocks():
            out.addmm_(x[:, col : col + width], self.block(name, start, width).to(x.dtype).T)
        return out

    def training_features(self, w, batch, loss_fn):
        """Projected per-example loss gradients P g_i(w), (B, dim), each block of P made once.

        Rows are taken in groups whose captured terms (and the other parameters' gradients)
        fit half of ``memory_budget``: a single group, so P made once, unless the batch is huge.
        """
        fm = self.fm
        layers, rest = linear_layers(fm, self.names)
        if not layers:
            return super().training_features(w, batch, loss_fn)
        *inputs, labels = batch
        chunk = fm.chunk_size()  # a forward/backward pass at most as large as a gradient chunk
        out, group, held = [], [], 0
        for a in range(0, n_rows(labels), chunk):
            part = (*take(tuple(inputs), slice(a, a + chunk)), take(labels, slice(a, a + chunk)))
            captured = capture(
                fm, w, part[:-1], example_losses(fm, part[-1], loss_fn), layers, check=True
            )
            if captured is None:  # the captured terms do not rebuild a layer's gradient
                return super().training_features(w, batch, loss_fn)
            terms = captured.factors
            grads = fm.loss_grads(w, part, loss_fn, names=rest) if rest else None
            group.append((terms, grads))
            held += sum(_nbytes(t) for pair in terms.values() for t in pair)
            held += 0 if grads is None else _nbytes(grads)
            if held >= fm.memory_budget // 2:
                out.append(self._project_group(group, rest))
                group, held = [], 0
        if group:
            out.append(self._project_group(group, rest))
        if not out:
            return torch.zeros(0, self.dim, dtype=fm.dtype, device=fm.device)
        return torch.cat(out)

    def _project_group(self, group, rest) -> torch.Tensor:
        """P g for the rows of a group: each block of P generated once, rows inside."""
        fm = self.fm
        terms = {
            m: tuple(torch.cat([t[m][i] for t, _ in group]) for i in range(2)) for m in group[0][0]
        }
        grads = torch.cat([g for _, g in group]) if rest else None
        n = sum(next(iter(t.values()))[0].shape[0] for t, _ in group)
        source = {}  # parameter -> ("weight" | "bias", module) or ("rest", column in grads)
        for mod_name in terms:
            prefix = f"{mod_name}." if mod_name else ""
            source[prefix + "weight"] = ("weight", mod_name)
            source[prefix + "bias"] = ("bias", mod_name)
        column = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            if name in rest:
                source[name] = ("rest", column)
                column += size
        out = torch.zeros(n, self.dim, dtype=fm.dtype, device=fm.device)
        slice_bytes = max(1, fm.memory_budget // 8)
        for name, _, start, width in self._blocks():
            p = self.block(name, start, width).T
            kind, where = source[name]
            if kind == "rest":
                out.addmm_(grads[:, where + start : where + start + width], p)
                continue
            act, delta = terms[where]
            if kind == "bias":
                out.addmm_(delta.sum(1)[:, start : start + width], p)
                continue
            # columns start.. of the flattened (out, in) weight: rows first..last of it
            in_f = act.shape[-1]
            first, last = start // in_f, (start + width - 1) // in_f + 1
            skip = start - first * in_f
            size = max(1, slice_bytes // max(1, (last - first) * in_f * fm.dtype.itemsize))
            for a in range(0, n, size):  # the per-example gradients' columns, size rows at once
                g = torch.einsum(
                    "bto,bti->boi", delta[a : a + size, :, first:last], act[a : a + size]
                )
                out[a : a + size].addmm_(g.reshape(g.shape[0], -1)[:, skip : skip + width], p)
        return out


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

    def project(self, x):
        """P x by scatter-adds: O(m × d × s) work."""
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        scale = 1.0 / math.sqrt(self.s)
        for name, col, start, width in self._blocks():
            gen = _generator(x.device, self.seed, "sparse", name, start)
            rows = torch.randint(0, self.dim, (self.s, width), generator=gen, device=x.device)
            signs = torch.randint(0, 2, (self.s, width), generator=gen, device=x.device)
            signs = (signs.to(x.dtype) * 2 - 1) * scale
            block = x[:, col : col + width]
            for r in range(self.s):
                out.index_add_(1, rows[r], block * signs[r])
        return out


class FactorizedProjector(Projector):
    """Kronecker-factored projection of ``nn.Linear`` gradients; dense for other parameters.

    A Linear layer's per-example gradient [∂W | ∂b] = Σ_t δ_t [a_t; 1]ᵀ (t: positions of a
    sequence) is projected as Σ_t (P_out δ_t)(P_in [a_t; 1])ᵀ, which equals (P_out ⊗ P_in)
    applied to the flattened gradient, with E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I. Each Linear
    layer gets k_out × k_in ≤ dim features (√dim each side, except that a side no wider
    than its share stays unprojected and the other side gets dim / its width); the
    remaining parameters share one dense block of dim features, or stay unprojected when
    they have at most dim coordinates. Features are concatenated (dot products add up, so
    they stay unbiased).

    Unbiased, but noisier than a dense or sparse projection with as many features: a
    Kronecker product of two √dim-dimensional projections is not a JL projection of
    dimension dim, and the variance of a dot product falls like 1/√dim rather than 1/dim
    (see `ProjectorKind`). It buys speed and memory, not accuracy.
    """

    kind = ProjectorKind.FACTORIZED

    def __init__(self, fm, dim, seed=0):
        super().__init__(fm, dim, seed)
        self.k_in = max(1, math.isqrt(int(dim)))
        self.k_out = max(1, int(dim) // self.k_in)
        # (module, weight name, bias name) of the Linear layers, and the other parameters
        self.layers, self.rest = linear_layers(fm, self.names)
        self._checked = False  # whether capture() was seen to rebuild the layers' gradients
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
        # each layer's (k_out, k_in): a side no wider than its share stays unprojected
        self.sides = {}
        for mod_name, weight, bias in self.layers:
            out_f, in_f = self._shape(weight)
            width_in = in_f + (bias is not None)
            self.sides[mod_name] = _sides(out_f, width_in, int(dim), self.k_out, self.k_in)
        features = sum(k_o * k_i for k_o, k_i in self.sides.values())
        self.dim = features + (int(dim) if self.dense is not None else rest_size)

    def config(self):
        """Adds the layout version (3: narrow sides and small other parameters unprojected)."""
        return {**super().config(), "layout": 3}

    def factors(self, mod_name: str, out_features: int, in_features: int):
        """(P_out (k_out, out), P_in (k_in, in [+1 for the bias])) of a layer.

        A side that is not projected (its width fits its share of the features) is None:
        that factor of the estimate is exact.
        """
        fm = self.fm
        k_out, k_in = self.sides[mod_name]
        gen = _generator(fm.device, self.seed, "factorized", mod_name)
        p_out = p_in = None
        if k_out < out_features:
            p_out = torch.randn(
                k_out, out_features, generator=gen, device=fm.device, dtype=fm.dtype
            )
            p_out /= math.sqrt(k_out)
        if k_in < in_features:
            p_in = torch.randn(k_in, in_features, generator=gen, device=fm.device, dtype=fm.dtype)
            p_in /= math.sqrt(k_in)
        return p_out, p_in

    def _shape(self, weight: str):
        out_f, in_f = self.fm.shapes[self.fm.names.index(weight)]
        return out_f, in_f

    def project(self, x):
        """Projects each Linear block as P_out [W | b] P_inᵀ and the rest densely."""
        parts = []
        for mod_name, weight, bias in self.layers:
            out_f, in_f = self._shape(weight)
            a, n = self.offsets[weight]
            block = x[:, a : a + n].reshape(-1, out_f, in_f)
            if bias is not None:
                b, nb = self.offsets[bias]
                block = torch.cat([block, x[:, b : b + nb].reshape(-1, out_f, 1)], 2)
            p_out, p_in = self.factors(mod_name, out_f, block.shape[2])
            if p_out is not None:
                block = p_out.to(x.dtype) @ block
            if p_in is not None:
                block = block @ p_in.to(x.dtype).T
            parts.append(block.reshape(x.shape[0], -1))
        if self.rest:
            rest = torch.cat(
                [x[:, a : a + n] for a, n in (self.offsets[name] for name in self.rest)], 1
            )
            parts.append(rest if self.dense is None else self.dense.project(rest))
        return torch.cat(parts, 1)

    def training_features(self, w, batch, loss_fn):
        """Linear layers from forward/backward captures (no per-example gradients formed)."""
        fm = self.fm
        *inputs, labels = batch
        size = max(1, fm.memory_budget // max(1, 64 * self.dim))
        out = []
        for a in range(0, n_rows(labels), size):
            part = take(tuple(inputs), slice(a, a + size))
            out.append(self._features(w, part, take(labels, slice(a, a + size)), loss_fn))
        if not out:
            return torch.zeros(0, self.dim, dtype=fm.dtype, device=fm.device)
        return torch.cat(out)

    def _features(self, w, inputs, labels, loss_fn):
        fm = self.fm
        check = not self._checked  # once: the model's structure does not change
        captured = capture(
            fm, w, inputs, example_losses(fm, labels, loss_fn), self.layers, check=check
        )
        if captured is None:
            raise UnsupportedError(
                "projector='factorized' builds each Linear layer's per-example gradient from "
                "the layer's own inputs and output gradients, but here they do not add up to "
                "it: a Linear weight is also used outside its module (tied weights), or a "
                "layer runs on inputs whose first dimension is not the batch (e.g. time-major "
                "(T, B, ...)): use projector='gaussian', 'rademacher' or 'sparse'"
            )
        # checked once the model is seen to rebuild a batch of several examples (one alone
        # cannot show how a layer's rows group into examples)
        self._checked = self._checked or n_rows(labels) >= 2
        captured = captured.factors
        parts = []
        batch = n_rows(labels)
        for mod_name, _, bias in self.layers:
            act, delta = captured[mod_name]
            if bias is not None:
                act = torch.cat([act, torch.ones_like(act[..., :1])], -1)
            p_out, p_in = self.factors(mod_name, delta.shape[-1], act.shape[-1])
            delta = delta if p_out is None else delta @ p_out.T
            act = act if p_in is None else act @ p_in.T
            feat = torch.einsum("bto,bti->boi", delta, act)
            parts.append(feat.reshape(batch, -1))
        if self.rest:
            grads = fm.loss_grads(w, (*inputs, labels), loss_fn, names=self.rest)
            parts.append(grads if self.dense is None else self.dense.project(grads))
        return torch.cat(parts, 1)


def _sides(width_out: int, width_in: int, dim: int, k_out: int, k_in: int) -> tuple[int, int]:
    """(k_out, k_in) of a Linear layer's factorized features, k_out × k_in ≤ dim.

    ``k_out`` × ``k_in`` (≈ √dim each) is the default share of the two sides.

    A side no wider than its share stays unprojected (exact), and the other side gets the
    rest of the dim features: the last layer of a classifier (10 outputs) keeps its output
    gradients exact and projects its inputs to dim / 10 features, rather than spreading 10
    numbers over √dim random ones. A layer with at most dim weights is not projected.
    """
    if width_out * width_in <= dim:
        return width_out, width_in
    if width_out <= k_out:
        return width_out, dim // width_out
    if width_in <= k_in:
        return dim // width_in, width_in
    return k_out, k_in


def make_projector(
    fm: FunctionalModel, kind: str | ProjectorKind, dim: int | None, seed: int = 0
) -> Projector:
    """Build a projector of the given kind (``dim=None``: identity).

    A dense or sparse projection to at least as many dimensions as it projects
    (``dim`` >= the active gradient coordinates) saves no memory and only adds noise: it is
    built as asked, with a `PkAttribWarning` saying so. (``"factorized"`` leaves such
    layers unprojected by itself.)
    """
    kind = ProjectorKind.parse(kind)
    if dim is None or kind is ProjectorKind.IDENTITY:
        return Projector(fm, None, seed)
    if int(dim) < 1:
        raise ValueError(f"projection_dim must be a positive int, got {dim}")
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
        return FactorizedProjector(fm, dim, seed)
    return DenseProjector(fm, dim, seed, rademacher=kind is ProjectorKind.RADEMACHER)
