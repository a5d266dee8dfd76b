"""Parameters whose per-example gradients are sums of outer products, found in a model.

A layer's weight, read as a matrix, gets from each call t of each module that uses it the
gradient u_t v_tᵀ, with u_t and v_t read off the call's input and output gradient:

- ``nn.Linear`` (weight (out, in)): u = output gradient δ, v = input a;
- HF-style ``Conv1D`` (weight stored (in, out), ``x @ W + b``): u = a, v = δ;
- ``nn.Embedding`` (weight (vocab, dim)): u = the one-hot row of the token id, v = δ;
- ``nn.Conv2d`` without groups (weight (out, in·kh·kw)): u = δ at each output position,
  v = the input patch there (``unfold``, as LoGra and Kronfluence treat convolutions).

So example i's gradient of the weight is Σ_t u_t v_tᵀ over every position and call, and
its dot products and projections need u and v only, never the (out × in) gradient. A weight
several modules use (a head tied to the embedding) collects the calls of all of them. A
module's bias joins its weight's matrix as one more column (Linear, Conv2d: v gets a
constant 1) or row (Conv1D: u gets it) when no other module uses the weight.

`find_layers` lists the candidates by their module types; `factors.verify_layers` keeps those
whose captured terms do rebuild autograd's gradients on a batch and on its first example alone (a
weight also used outside its modules fails, and so does a call whose rows do not group into
examples: a position embedding called on ``arange(T)``, a time-major input). The rest of
the parameters take ordinary per-example gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .functional import FunctionalModel

KINDS = ("linear", "conv1d", "embedding", "conv2d")


@dataclass(frozen=True)
class Layer:
    """A weight whose per-example gradient is Σ_t u_t v_tᵀ, with an optional folded bias.

    Attributes:
        key: The first module's name (names the layer and seeds its projection).
        weight: The weight's recorded name.
        bias: The recorded name of a bias folded into the matrix, or None.
        uses: ``(module name, kind)`` of every module that calls the weight.
        rows: Rows of the weight as a matrix (u's width without the bias).
        cols: Columns (v's width without the bias).
        bias_side: ``"v"`` (the bias is an extra column: v gets a 1), ``"u"`` (an extra
            row: u gets a 1), or None.
    """

    key: str
    weight: str
    bias: str | None
    uses: tuple[tuple[str, str], ...]
    rows: int
    cols: int
    bias_side: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the matrix [weight | bias] the terms build."""
        return self.rows + (self.bias_side == "u"), self.cols + (self.bias_side == "v")

    @property
    def names(self) -> tuple[str, ...]:
        """The recorded parameters the layer covers."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def module_kind(module: torch.nn.Module) -> str | None:
    """The kind of layer a module is (see `KINDS`), or None when it has no rule."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        # max_norm rewrites the weight in forward; scale_grad_by_freq scales a token's
        # gradient by its count in the whole batch: neither has a per-example rule
        ok = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if ok else None
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d" if module.groups == 1 else None
    if type(module).__name__ == "Conv1D" and weight.dim() == 2 and hasattr(module, "nf"):
        return "conv1d"  # transformers.pytorch_utils.Conv1D: x @ W + b, W (in, out)
    return None


def find_layers(
    fm: FunctionalModel, names: Sequence[str] | None = None
) -> tuple[list[Layer], list[str]]:
    """The candidate layers among the differentiated parameters, and the other parameters.

    Args:
        fm: The functional model.
        names: The parameters to consider, in flat-vector order (default: the active ones).

    Returns:
        ``(layers, rest)``: layers in the order of their weights in ``names``; ``rest`` the
        other names, in flat-vector order.
    """
    names = list(fm.active_names if names is None else names)
    active = set(names)
    by_id = {id(p): n for n, p in fm.model.named_parameters()}
    uses: dict[str, list[tuple[str, str, torch.nn.Module]]] = {}
    for mod_name, module in fm.model.named_modules():
        kind = module_kind(module)
        weight = by_id.get(id(getattr(module, "weight", None)))
        if kind is None or weight not in active:
            continue
        uses.setdefault(weight, []).append((mod_name, kind, module))
    layers = []
    for weight in [n for n in names if n in uses]:
        found = uses[weight]
        kinds = {kind for _, kind, _ in found}
        shapes = {_matrix_shape(kind, module) for _, kind, module in found}
        if len(shapes) != 1 or ("conv2d" in kinds and len(kinds) > 1):
            continue  # one weight read as matrices of different shapes: no common rule
        rows, cols = shapes.pop()
        bias, side = None, None
        mod_name, kind, module = found[0]
        own_bias = by_id.get(id(getattr(module, "bias", None)))
        if len(found) == 1 and own_bias in active and kind != "embedding":
            bias, side = own_bias, ("u" if kind == "conv1d" else "v")
        uses_ = tuple((m, k) for m, k, _ in found)
        layers.append(Layer(found[0][0], weight, bias, uses_, rows, cols, side))
    covered = {n for layer in layers for n in layer.names}
    return layers, [n for n in names if n not in covered]


def _matrix_shape(kind: str, module: torch.nn.Module) -> tuple[int, int]:
    weight = module.weight
    if kind == "conv2d":
        return weight.shape[0], weight[0].numel()
    return tuple(weight.shape)
