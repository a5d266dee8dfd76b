"""Curvature products of a step's batch loss, for counterfactual scores.

A later step's gradient G_s = σ ∇L_s(w_s) + λ w_s responds to an earlier change of the weights
through the Hessian of the batch loss L_s(w) = Σ_j κ_j ℓ_j(w). Counterfactual scores carry n
query adjoints u back through it, so they need H u for a block of n vectors (n, d) at a time.
`Curvature` names the three choices; each product is a torch.func transform of the batch's
forward pass, vectorized over the n vectors (memory O(n × d) plus the batch's activations
per vector).
"""

from __future__ import annotations

import enum
import functools
import importlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import grad, jvp, vjp, vmap

from ..exceptions import ArgumentError
from .functional import FunctionalModel


class Curvature(str, enum.Enum):
    """How a step's gradient responds to a change of the weights before it (``hessian=``).

    ``EXACT``: the Hessian of the batch loss (the vjp of its gradient, once per step). The true
    derivative of the training run, which finite differences of real retraining confirm; it
    may be indefinite, and on long runs with large steps its products can grow.

    ``GAUSS_NEWTON``: the generalized Gauss–Newton matrix Σ_j κ_j J_jᵀ (∂²ℓ_j/∂o²) J_j
    (J_j: the Jacobian of example j's outputs), positive semi-definite for convex losses: the
    Hessian without the model's own second derivatives. One jvp and one vjp of the batch's
    forward pass per vector.

    ``FISHER``: the empirical Fisher Σ_j κ_j g_j g_jᵀ of the step's batch (what Data Value
    Embedding uses). Built from the per-example gradients the scores need anyway, so it
    costs two matrix products a step: the cheapest.

    On benchmarks/bench_lds.py (digits MLP, SGD, 640 steps) the linear datamodeling scores
    were 0.867 (exact), 0.816 (Gauss–Newton) and 0.822 (Fisher, equal to dattri's DVEmb);
    flipped labels were found best by the Fisher self-influence.
    """

    EXACT = "exact"
    GAUSS_NEWTON = "gauss-newton"
    FISHER = "fisher"

    @classmethod
    def parse(cls, value: str | Curvature) -> Curvature:
        """The member named by ``value``.

        Raises:
            ValueError: ``value`` names none; the message lists the valid ones.
        """
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(c.value) for c in cls)
            raise ArgumentError(f"hessian={value!r}: use one of {valid}") from None


@functools.cache
def _jvp_ready() -> None:
    """Load what torch.func.jvp loads on first use, without its deprecation warning.

    torch registers its jvp decompositions with ``torch.jit.script``, deprecated since
    torch 2.10: a warning about torch's internals that no caller can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def _forward(fm: FunctionalModel, inputs: tuple) -> Callable[[torch.Tensor], object]:
    """The batch's outputs as a function of the flat parameters w (d,)."""
    return lambda w: fm._call(fm.unflatten(w), inputs)


def _losses(fm: FunctionalModel, labels, loss_fn: Callable) -> Callable:
    """The per-example losses ℓ_j (B,) as a function of the batch's outputs."""
    return lambda out: fm.per_example_losses(out, labels, loss_fn)


def product(
    curvature: Curvature,
    fm: FunctionalModel,
    w: torch.Tensor,
    batch: Sequence,
    loss_fn: Callable,
    kappa: torch.Tensor,
    vectors: torch.Tensor,
    grads: torch.Tensor | None = None,
    dots: torch.Tensor | None = None,
) -> torch.Tensor:
    """C u for each of n vectors u, with C the chosen curvature of Σ_j κ_j ℓ_j at w.

    Args:
        curvature: Which matrix C.
        fm: The model at flat parameters.
        w: The step's parameters, (d,).
        batch: The step's batch ``(inputs..., labels)``.
        loss_fn: The training loss.
        kappa: Each example's weight κ_j in the batch loss, (B,).
        vectors: The vectors u, (n, d).
        grads: The per-example gradients g_j, (B, d), when the caller has them (Fisher then
            needs no pass through the model).
        dots: u · g_j, (n, B), when the caller has them.

    Returns:
        (n, d).
    """
    _jvp_ready()
    *inputs, labels = batch
    inputs = tuple(inputs)
    forward = _forward(fm, inputs)
    losses = _losses(fm, labels, loss_fn)
    if curvature is Curvature.FISHER:
        if grads is not None:
            dots = vectors @ grads.T if dots is None else dots
            return (dots * kappa) @ grads
        per_example = lambda v: losses(forward(v))  # noqa: E731
        _, pull = vjp(per_example, w)

        def fisher(u):
            return pull(jvp(per_example, (w,), (u,))[1] * kappa)[0]

        return vmap(fisher)(vectors)
    if curvature is Curvature.EXACT:  # reverse over reverse: one graph for every vector
        gradient = grad(lambda v: (losses(forward(v)) * kappa).sum())
        return vmap(vjp(gradient, w)[1])(vectors)[0]
    outputs, pull = vjp(forward, w)
    output_gradient = grad(lambda out: (losses(out) * kappa).sum())

    def gauss_newton(u):
        _, ju = jvp(forward, (w,), (u,))
        _, hju = jvp(output_gradient, (outputs,), (ju,))
        return pull(hju)[0]

    return vmap(gauss_newton)(vectors)
