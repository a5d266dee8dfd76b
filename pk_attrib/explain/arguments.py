"""Checking an explainer's arguments: the loss reduction, ``layers``, queries and targets.

Each function turns what a user passed into what the engine takes, or raises an error that
names the mistake and the fix.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ..engine.batches import leaves, n_rows, take
from ..engine.functional import FunctionalModel
from ..engine.outputs import (
    OutputFn,
    Reduction,
    check_batch_dimension,
    prepare_target,
    select_output,
)
from ..exceptions import ArgumentError, ArgumentTypeError, LossReductionError
from ..record.wrappers import plain_name


def loss_reduction(loss_fn, given: str | None, needed: bool) -> Reduction:
    """How the training loop reduced the loss over a batch (explicit, or read from loss_fn)."""
    if given is not None:
        try:
            return Reduction(given)
        except ValueError:
            valid = ", ".join(repr(r.value) for r in Reduction)
            raise LossReductionError(f"loss_reduction={given!r}: use one of {valid}") from None
    found = getattr(loss_fn, "reduction", None)
    if found in ("mean", "sum"):
        return Reduction(found)
    if not needed:  # checkpoints weigh every example alike: the reduction plays no part
        return Reduction.SUM
    raise LossReductionError(
        "cannot tell how the training loss combined the examples of a batch "
        f"({'reduction=' + repr(found) if found else type(loss_fn).__name__ + ' has no reduction'}"
        "): pass loss_reduction='mean' (PyTorch's default) or 'sum', as in the training loop"
    )


def layer_params(model: torch.nn.Module, layers: list[str] | None, names: list[str]):
    """Recorded parameter names inside the given modules (None: all)."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise ArgumentTypeError(
            f"layers must be a list of module names, like TracInCP's (e.g. ['fc2']), got {layers!r}"
        )
    if "" in layers:  # the model itself: every parameter, so the kernel stays exact
        return None
    modules = dict(model.named_modules())
    layers = [plain_name(name, modules) for name in layers]
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ArgumentError(
            f"layers {unknown} are not modules of the model (valid: "
            f"{[n for n in modules if n][:8]}...)"
        )
    chosen = [
        n
        for n in names
        if any(n == f"{m}.{n.split('.')[-1]}" or n.startswith(m + ".") for m in layers)
    ]
    if not chosen:
        raise ArgumentError(f"layers {layers} hold no recorded (trainable) parameters")
    return chosen


def queries(fm: FunctionalModel, inputs: Any) -> tuple[Any, ...]:
    """The queries of ``attribute(inputs)`` as a batch tuple on the computation device.

    Args:
        fm: The functional model (its device and dtype).
        inputs: A tensor (n, ...), or a tuple of the model's inputs, each a tensor or a
            tuple / list / dict of tensors whose first dimension indexes the queries.

    Raises:
        TypeError: ``inputs`` holds something else than tensors.
        ValueError: A tensor has no query dimension, or they disagree on it.
    """
    batch = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    tensors = [leaves(x) if isinstance(x, (tuple, list, dict)) else [x] for x in batch]
    if not batch or not all(
        part and all(isinstance(t, torch.Tensor) for t in part) for part in tensors
    ):
        raise ArgumentTypeError(
            "inputs must be a tensor or a tuple of the model's inputs, each a tensor or a "
            "tuple / list / dict of tensors (first dimension: queries)"
        )
    found = [t for part in tensors for t in part]
    if any(t.dim() == 0 for t in found):
        raise ArgumentError("inputs must have a first dimension indexing the queries")
    if len({t.shape[0] for t in found}) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in found)
        raise ArgumentError(f"the inputs' first dimensions (queries) differ: {shapes}")
    return fm.cast(batch)


def first_outputs(fm: FunctionalModel, final: dict[str, torch.Tensor], queries) -> Any:
    """The final model's outputs for the first query (a batch of one)."""
    with torch.no_grad():
        return fm.outputs(fm.flatten(final), take(queries, slice(0, 1)))


def target_and_output(
    fm: FunctionalModel,
    final: dict[str, torch.Tensor],
    queries,
    target: Any,
    output_fn: OutputFn | None,
) -> tuple[torch.Tensor | None, OutputFn]:
    """What ``attribute(inputs, target, output_fn)`` explains, checked on the first query.

    Args:
        fm: The functional model.
        final: The path's final parameters (the explained model).
        queries: The queries, as `queries` returns them.
        target: Captum's target: an int, one index per query, or None.
        output_fn: ``output_fn(outputs, target) -> (n,)``, or None for one logit.

    Returns:
        ``(target, output_fn)``: the target as an (n,) tensor (or None) and the explained
        quantity (`select_output` without ``output_fn``).

    Raises:
        ValueError, TypeError: The model fails on the queries, the target does not fit its
            outputs, or ``output_fn`` has the wrong signature or result.
    """
    n = n_rows(queries)
    if output_fn is None:
        try:
            outputs = first_outputs(fm, final, queries)
        except RuntimeError as err:
            shapes = ", ".join(str(tuple(q.shape)) for q in leaves(queries))
            raise ArgumentError(
                f"the model fails on the first query (inputs of shape {shapes}; the first "
                "dimension indexes the queries: one example x is x.unsqueeze(0)): "
                f"{str(err).splitlines()[0]}"
            ) from err
        check_batch_dimension(outputs, "the first query")
        if not isinstance(outputs, torch.Tensor):
            raise ArgumentTypeError(
                f"the model returns a {type(outputs).__name__}, not a tensor: pass "
                "output_fn(outputs, target) -> (n,) to say which output to explain"
            )
        return prepare_target(target, n, outputs[0].numel()), select_output
    tgt = None if target is None else torch.as_tensor(target, device=fm.device)
    if tgt is not None and tgt.dim() == 0:
        tgt = tgt.expand(n).clone()
    if tgt is not None and tgt.shape[0] != n:
        raise ArgumentError(f"target has {tgt.shape[0]} rows for {n} queries")
    outputs = first_outputs(fm, final, queries)
    try:  # a first call, to name a wrong signature or shape here
        with torch.no_grad():
            value = output_fn(outputs, None if tgt is None else tgt[:1])
    except TypeError as err:
        raise ArgumentTypeError(
            f"output_fn is called as output_fn(outputs, target) and returns one value "
            f"per query (n,); calling it failed: {err}"
        ) from err
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ArgumentError(
            f"output_fn must return one value per query, a (n,) tensor; for one query it "
            f"returned {got}"
        )
    return tgt, output_fn


def positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (None when allowed); a bool, float or string is refused.

    Raises:
        ValueError: Naming the argument and what it must be.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_labels(fm: FunctionalModel, final, queries, labels, loss_fn) -> None:
    """Evaluate the test loss of every query once, so that bad labels fail here, named.

    Raises:
        ValueError: ``loss_fn(outputs, labels)`` fails (a label out of the model's range, a
            wrong dtype or shape) or is not finite.
    """
    if n_rows(queries) == 0:
        return
    with torch.no_grad():
        outputs = fm.outputs(fm.flatten(final), queries)
        try:
            losses = loss_fn(outputs, labels)
        except (IndexError, RuntimeError, ValueError, TypeError) as err:
            found = leaves(labels)
            shown = f"labels {found[0].tolist()[:8]}" if found else "the labels"
            raise ArgumentError(
                f"the test loss fails on the given {shown} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}): labels must fit the model's outputs "
                "(class indices in range, as the loss expects)"
            ) from err
    if isinstance(losses, torch.Tensor) and not bool(torch.isfinite(losses).all()):
        raise ArgumentError(
            "the test loss of some given examples is not finite at the final weights: check "
            "their inputs and labels"
        )
