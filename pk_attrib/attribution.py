"""`PathKernelInfluence`: the Captum-style entry point (`captum.influence.DataInfluence`).

This module imports captum (and through it matplotlib), so `pk_attrib` loads it lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from captum.influence import DataInfluence
from captum.influence._core.tracincp import KMostInfluentialResults
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .decomposition import Decomposition
from .engine import Engine, Problem
from .exceptions import LossReductionError, StoreMismatchError, UnsupportedError
from .gradients import FunctionalModel, OutputFn, Reduction, prepare_target, select_output
from .path import TrainingPath
from .quadrature import Quadrature, QuadratureRule

MODES = ("auto", "exact", "checkpoint")


def _dataset_of(train: Dataset | DataLoader) -> Dataset:
    if isinstance(train, DataLoader):
        if isinstance(train.sampler, RandomSampler) or (
            train.batch_sampler is not None
            and isinstance(train.batch_sampler.sampler, RandomSampler)
        ):
            raise ValueError(
                "train_dataset is a shuffling DataLoader, so its order would not match the "
                "recorded dataset indices: pass the Dataset, or a DataLoader with shuffle=False"
            )
        return train.dataset
    return train


def _reduction(loss_fn, given: str | None) -> Reduction:
    if given is not None:
        try:
            return Reduction(given)
        except ValueError:
            valid = ", ".join(repr(r.value) for r in Reduction)
            raise LossReductionError(f"loss_reduction={given!r}: use one of {valid}") from None
    found = getattr(loss_fn, "reduction", None)
    if found in ("mean", "sum"):
        return Reduction(found)
    raise LossReductionError(
        "cannot tell how the training loss combined the examples of a batch "
        f"({'reduction=' + repr(found) if found else type(loss_fn).__name__ + ' has no reduction'}"
        "): pass loss_reduction='mean' (PyTorch's default) or 'sum', as in the training loop"
    )


class PathKernelInfluence(DataInfluence):
    """Exact training-data attribution through the path kernel of a recorded training run.

    Args:
        model: The trained model (its parameters must equal the path's final ones).
        train_dataset: The training set the path's indices refer to: a Dataset whose items
            are ``(inputs..., label)``, or a non-shuffling DataLoader over it.
        path: A `TrainingPath`, or the folder of a store.
        loss_fn: The training loss, ``loss_fn(outputs, labels)``; e.g.
            ``torch.nn.CrossEntropyLoss()``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loop reduced the loss over
            a batch. Read from ``loss_fn.reduction`` when it has one.
        accumulation: With gradient accumulation, ``"sum"`` (each micro-batch's loss was
            back-propagated as is) or ``"mean"`` (divided by the number of micro-batches).
        mode: ``"exact"``, ``"checkpoint"``, or ``"auto"`` (exact when the path allows it).
        quadrature: ``"adaptive"`` (default), ``"left"``, ``"midpoint"``, or an int number
            of Gauss–Legendre nodes; see `pk_attrib.Quadrature`.
        rtol: Per-step tolerance of the adaptive quadrature (default 1e-9 in float64,
            1e-5 in float32).
        dtype: Computation dtype (default: the model's parameter dtype).
        device: Computation device (default: the model's).
        memory_budget: Bytes that one chunk of per-example gradients may take.
        show_progress: Show tqdm progress bars.
        test_loss_fn: The loss explained by `influence` (default: ``loss_fn`` per example).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Dataset | DataLoader,
        path: TrainingPath | str | os.PathLike,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        loss_reduction: str | None = None,
        accumulation: str = "sum",
        mode: str = "auto",
        quadrature: str | int | Quadrature = "adaptive",
        rtol: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        memory_budget: int = 1 << 30,
        show_progress: bool = True,
        test_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.train_dataset = _dataset_of(train_dataset)
        self.path = path if isinstance(path, TrainingPath) else TrainingPath.load(path)
        self.loss_fn = loss_fn
        self.test_loss_fn = test_loss_fn or loss_fn
        self.reduction = _reduction(loss_fn, loss_reduction)
        if accumulation not in ("sum", "mean"):
            raise ValueError(f"accumulation={accumulation!r}: use 'sum' or 'mean'")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(map(repr, MODES))}")
        self.mode = self._resolve_mode(mode)
        first = next(model.parameters())
        self.dtype = dtype or first.dtype
        self.quadrature = QuadratureRule.parse(quadrature, rtol, self.dtype)
        self.show_progress = show_progress
        size = self.path.dataset_size
        if size is not None and size != len(self.train_dataset):
            raise StoreMismatchError(
                f"the path was recorded over a training set of {size} examples, but "
                f"train_dataset has {len(self.train_dataset)}: pass the dataset the recorder "
                "watched (same order)"
            )
        self._fm = FunctionalModel(
            model,
            self.path.param_names,
            self.path.param_shapes,
            self.dtype,
            device or first.device,
            memory_budget,
        )
        self._check_final(model)
        self._problem = Problem(
            self._fm,
            self.path,
            self.train_dataset,
            loss_fn,
            self.reduction,
            accumulation,
            show_progress,
        )
        self._engine = Engine(self._problem)

    def _resolve_mode(self, mode: str) -> str:
        path = self.path
        exact_ok = not path.approximate and (path.optimizer or {}).get("exact", False)
        if mode == "auto":
            return "exact" if exact_ok else "checkpoint"
        if mode == "exact" and not exact_ok:
            reasons = "; ".join(path.approximate_reasons) or "the optimizer has no exact rule"
            raise UnsupportedError(
                f"exact mode needs a path recorded at every step with SGD, Adam or AdamW, but "
                f"this one is approximate ({reasons}): use mode='checkpoint', or record with "
                "every=1"
            )
        return mode

    def _check_final(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in self.path.final.items():
            mine = params[name].detach().to("cpu", value.dtype)
            if not torch.allclose(mine, value, rtol=0, atol=0, equal_nan=True):
                raise StoreMismatchError(
                    f"the model's parameter {name} differs from the path's final value, so the "
                    "decomposition would explain another model than yours: pass the model at "
                    "the end of the recorded run, or load it with path.load_into(model)"
                )

    # -- decomposition ------------------------------------------------------------------------

    def _queries(self, inputs) -> tuple[torch.Tensor, ...]:
        batch = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        if not batch or not all(isinstance(t, torch.Tensor) for t in batch):
            raise TypeError("inputs must be a tensor or a tuple of tensors (first dim: queries)")
        return self._fm.cast(batch)

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        output_fn: OutputFn | None = None,
        kernel: bool = False,
    ) -> Decomposition:
        """Decompose the model's output on each query into training-example contributions.

        Args:
            inputs: Queries, (n_test, ...), or a tuple of such tensors (``model(*inputs)``).
            target: Which output to explain, as in Captum: an int, one index per query
                ((n_test,) tensor or list), or None for a model with a scalar output.
            output_fn: Explain ``output_fn(outputs, target) -> (n,)`` instead of one logit
                (a margin, a log-probability, a loss, ...). It is called on single rows too.
            kernel: Also compute the path kernel K(x, x_i) and the weights a_i(x) (costs C
                gradients per training example and step for a model with C outputs).

        Returns:
            A `Decomposition` with contributions (n_test, n_train), bias, prediction, delta.
        """
        queries = self._queries(inputs)
        n = queries[0].shape[0]
        if output_fn is None:
            with torch.no_grad():
                outputs = self._fm.outputs(self._fm.flatten(self.path.final), queries[:1])
            n_outputs = outputs[0].numel()
            tgt = prepare_target(target, n, n_outputs)
            output_fn = select_output
        else:
            tgt = None if target is None else torch.as_tensor(target, device=self._fm.device)
            if tgt is not None and tgt.dim() == 0:
                tgt = tgt.expand(n).clone()
        if self.mode == "exact":
            return self._engine.exact(queries, tgt, output_fn, self.quadrature, kernel)
        if kernel:
            raise UnsupportedError("the path kernel is defined in exact mode only")
        return self._engine.checkpoint(queries, tgt, output_fn)

    # -- Captum contract ------------------------------------------------------------------------

    def _loss_output(self) -> OutputFn:
        loss = self.test_loss_fn

        def negative_loss(outputs, labels):
            rows = [loss(outputs[i : i + 1], labels[i : i + 1]).sum() for i in range(len(outputs))]
            return -torch.stack(rows)

        return negative_loss

    def influence(
        self,
        inputs: Any = None,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
    ) -> torch.Tensor | KMostInfluentialResults:
        """Influence of each training example on each test example's loss (Captum contract).

        A score is the exact contribution of training example i to the *decrease* of the test
        loss along the path, so positive means proponent, as in Captum's TracIn.

        Args:
            inputs: A batch ``(inputs..., labels)`` (``model(*inputs[:-1])``, labels last),
                or a DataLoader of such batches.
            k: None for all scores; an int for the k most influential per test example.
            proponents: With ``k``: the most positive (True) or most negative (False).
            show_progress: Show progress bars.

        Returns:
            (n_test, n_train) scores, or ``KMostInfluentialResults(indices, influence_scores)``,
            each (n_test, k), sorted.
        """
        batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
        previous = self._problem.show_progress
        self._problem.show_progress = show_progress
        try:
            scores = []
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError(
                        "influence() takes a batch (inputs..., labels), as Captum's TracInCP does"
                    )
                *x, labels = batch
                dec = self.attribute(tuple(x), target=labels, output_fn=self._loss_output())
                scores.append(dec.contributions)
        finally:
            self._problem.show_progress = previous
        table = torch.cat(scores)
        if k is None:
            return table
        k = min(int(k), table.shape[1])
        top = torch.topk(table, k, dim=1, largest=proponents)
        return KMostInfluentialResults(top.indices, top.values)
