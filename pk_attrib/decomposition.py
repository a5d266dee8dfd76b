"""`Decomposition`: f(x) = b(x) + Σ_i c_i(x) for a batch of queries.

Orientation is always (n_test, n_train).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .exceptions import ArgumentError


def first_terms(parts) -> list[str]:
    """The term names of the first decomposition."""
    return list(parts[0].terms)


class Ranked(NamedTuple):
    """Indices and values of ranked training examples, each (n_test, k)."""

    indices: torch.Tensor
    values: torch.Tensor


class TopK(NamedTuple):
    """Strongest proponents (largest positive contributions) and opponents (most negative)."""

    proponents: Ranked
    opponents: Ranked


@dataclass(frozen=True)
class Diagnostics:
    """How a decomposition was computed, and how far to trust it.

    Attributes:
        mode: ``"exact"`` or ``"checkpoint"``.
        quadrature: The quadrature rule (``"adaptive"``, ``"left"``, ``"gauss-legendre-q"``).
        dtype: Computation dtype.
        nodes: Quadrature nodes used per step, int64 (S,) (where the adaptive rule split a
            step at kinks, the most any query used).
        reconstruction_error: ‖Δ_s − Δ̂_s‖ / ‖Δ_s‖ per step, float64 (S,) (empty in
            checkpoint mode, where the optimizer rule is not modelled).
        query_gradients: Per-query gradient evaluations spent (including rejected nodes).
        train_gradients: Per-example training gradient evaluations spent.
        gradient_route: How the model was batched for per-example gradients: ``"vmap"`` (one
            ``torch.func.vmap`` call over a batch), ``"vmap (GRU stand-in)"`` and the like
            (vmap over stand-ins that compute the same function in operations vmap can
            batch: ``nn.GRU``/``nn.LSTM``/``nn.RNN`` unrolled over time, ``"eager
            attention"`` for HuggingFace models with an attention mask), or ``"per-example
            loop"`` (one example at a time, where vmap cannot batch the model).
        routes: How the per-example gradients reached each function of the model's outputs:
            ``"output_fn"`` (the queries' explained outputs) and ``"loss_fn"`` (the training
            losses), each ``"vmap(grad)"`` (torch.func.vmap of the whole example),
            ``"batched forward + row VJP"`` (the function could not be vmapped: one batched
            forward, its output gradient by autograd, the model's vector-Jacobian product per
            row), ``"one example at a time"`` (the model could not be batched at all:
            ``gradient_route`` is ``"per-example loop"``),
            ``"replayed batch + row VJP"`` (the steps' batches rerun, `replay`) or, for
            models whose per-example gradients of a step pass 4 MiB and whose parameters
            all belong to Linear, Conv1D or Embedding layers called once per example,
            ``"layer factors from a batched pass"`` (the layers read off one batched
            forward and backward pass, their per-example gradients never formed; where
            other parameters take part, ``"; other parameters: ..."`` follows with their
            route).
    """

    mode: str
    quadrature: str
    dtype: torch.dtype
    nodes: torch.Tensor
    reconstruction_error: torch.Tensor
    query_gradients: int
    train_gradients: int
    gradient_route: str = "vmap"
    routes: dict[str, str] = field(default_factory=dict)

    @property
    def max_reconstruction_error(self) -> float:
        """Largest step reconstruction error (0 when none was measured; NaN steps are not)."""
        err = self.reconstruction_error
        err = err[~err.isnan()]
        return float(err.max()) if err.numel() else 0.0

    @property
    def mean_reconstruction_error(self) -> float:
        """Mean step reconstruction error (0 when none was measured; NaN steps are not)."""
        err = self.reconstruction_error
        err = err[~err.isnan()]
        return float(err.mean()) if err.numel() else 0.0


@dataclass(frozen=True)
class Decomposition:
    """An exact (or checkpoint-approximate) decomposition of predictions into training examples.

    ``prediction = bias + contributions.sum(-1) + delta`` holds for every query.

    Attributes:
        contributions: c_i(x), the contribution of each training example, in output units,
            (n_test, n_train). Positive: example i pushed the output up.
        bias: b(x) = f(x; w_0) plus the non-example terms, (n_test,).
        prediction: f(x; w_S), the output of the final model, (n_test,).
        delta: prediction − bias − contributions.sum(-1), (n_test,): the quadrature error
            in exact mode, the approximation error in checkpoint mode.
        terms: The parts of ``bias``, each (n_test,): ``"initial"`` f(x; w_0),
            ``"weight_decay"``, ``"optimizer_state"`` (the output effect of optimizer state
            that existed before the recording began: a momentum buffer or Adam first
            moment carried into the first step; zero for a recording from a fresh
            optimizer) and ``"unexplained"`` (the output effect of what the example
            gradients do not rebuild, see ``diagnostics.reconstruction_error``).
        diagnostics: See `Diagnostics`.
    """

    contributions: torch.Tensor
    bias: torch.Tensor
    prediction: torch.Tensor
    delta: torch.Tensor
    terms: dict[str, torch.Tensor]
    diagnostics: Diagnostics
    _kernel: torch.Tensor | None = field(default=None, repr=False)
    _weights: torch.Tensor | None = field(default=None, repr=False)

    @property
    def kernel(self) -> torch.Tensor:
        """K(x, x_i): (n_test, n_train), or (n_test, n_train, C) for a model with C outputs.

        Raises:
            ValueError: The decomposition was computed without ``kernel=True``.
        """
        if self._kernel is None:
            raise ArgumentError(
                "the path kernel costs C extra gradients per training example and step, so it "
                "is computed only when asked for: call attribute(..., kernel=True)"
            )
        return self._kernel

    @property
    def weights(self) -> torch.Tensor:
        """a_i(x), shaped like `kernel`, with Σ_c a_{i,c} K_c(x, x_i) = c_i(x).

        Entries where |K| is negligible (below 1e-12 of the largest) are set to 0.

        Raises:
            ValueError: The decomposition was computed without ``kernel=True``.
        """
        if self._weights is None:
            self.kernel  # noqa: B018 - raises the explanatory error
        return self._weights

    @property
    def relative_delta(self) -> torch.Tensor:
        """|delta| / |f(x; w_S) − f(x; w_0)|, (n_test,): the completeness residual."""
        change = (self.prediction - self.terms["initial"]).abs()
        return self.delta.abs() / change.clamp_min(torch.finfo(change.dtype).tiny)

    @classmethod
    def concat(cls, parts: list[Decomposition]) -> Decomposition:
        """Stack decompositions of query chunks (same training set) along the query axis."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0].diagnostics

        def cat(name):
            return torch.cat([getattr(p, name) for p in parts])

        diagnostics = Diagnostics(
            first.mode,
            first.quadrature,
            first.dtype,
            torch.stack([p.diagnostics.nodes for p in parts]).amax(0),
            first.reconstruction_error,
            sum(p.diagnostics.query_gradients for p in parts),
            sum(p.diagnostics.train_gradients for p in parts),
            first.gradient_route,
            first.routes,
        )
        terms = {k: torch.cat([p.terms[k] for p in parts]) for k in first_terms(parts)}
        return cls(
            cat("contributions"), cat("bias"), cat("prediction"), cat("delta"), terms, diagnostics
        )

    def top_k(self, k: int) -> TopK:
        """The k strongest proponents and opponents of each query.

        Args:
            k: How many of each (clipped to n_train).

        Returns:
            `TopK` of `Ranked` (indices, contributions), each (n_test, k); proponents sorted
            by decreasing contribution, opponents by increasing (most negative first).
        """
        if k < 1:
            raise ArgumentError(f"k must be a positive int, got {k}")
        k = min(k, self.contributions.shape[1])
        up = torch.topk(self.contributions, k, dim=1)
        down = torch.topk(self.contributions, k, dim=1, largest=False)
        return TopK(Ranked(up.indices, up.values), Ranked(down.indices, down.values))

    def __repr__(self) -> str:
        n, m = self.contributions.shape
        worst = float(self.relative_delta.max()) if n else 0.0
        return (
            f"Decomposition(n_test={n}, n_train={m}, mode={self.diagnostics.mode}, "
            f"max relative delta={worst:.2e})"
        )
