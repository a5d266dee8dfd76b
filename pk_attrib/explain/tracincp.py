"""`TracInCP`: `PathKernelInfluence` with Captum TracInCP's constructor, positions included."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..record.path import TrainingPath
from .explainer import PathKernelInfluence


class TracInCP(PathKernelInfluence):
    """`PathKernelInfluence` constructed with Captum ``TracInCP``'s signature.

    ``TracInCP(model, train_dataset, checkpoints, checkpoints_load_func, layers, loss_fn,
    batch_size, test_loss_fn, sample_wise_grads_per_batch)`` takes its arguments in
    Captum's order, by position or by name, so a script that passes them positionally moves
    by changing the class alone (`PathKernelInfluence`'s fourth positional argument is
    ``loss_fn``, Captum's is ``checkpoints_load_func``). Everything else is
    `PathKernelInfluence`: its methods, its keyword options (``projection_dim=``,
    ``mode=``, ...), and its defaults where Captum's would change nothing but speed:
    ``batch_size=None`` sizes gradient chunks by ``memory_budget`` (Captum's default of 1
    evaluates one example at a time; the scores do not depend on it), and
    ``checkpoints_load_func=None`` reads checkpoints without running code from them.
    Progress bars carry Captum's names ("Using TracInCP to compute influence for training
    batches").

    Args:
        model: The trained model.
        train_dataset: The training set (a Dataset or a non-shuffling DataLoader).
        checkpoints: A folder of checkpoint files, a file, a list of them, or (going further
            than TracIn) a store folder or a `TrainingPath`.
        checkpoints_load_func: ``f(model, file) -> learning rate``.
        layers: Module names whose parameters the gradients are restricted to.
        loss_fn: The training loss.
        batch_size: Training examples per gradient chunk (None: from ``memory_budget``).
        test_loss_fn: The loss `influence` explains (default: ``loss_fn``).
        sample_wise_grads_per_batch: Accepted; per-example gradients come from torch.func.
        **options: `PathKernelInfluence`'s other keyword arguments.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike | list | TrainingPath,
        checkpoints_load_func: Callable[[torch.nn.Module, str], float] | None = None,
        layers: list[str] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        batch_size: int | None = None,
        test_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sample_wise_grads_per_batch: bool = False,
        **options: Any,
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoints,  # (as PathKernelInfluence's path: checkpoints, or a store)
            loss_fn,
            checkpoints_load_func=checkpoints_load_func,
            layers=layers,
            batch_size=batch_size,
            test_loss_fn=test_loss_fn,
            sample_wise_grads_per_batch=sample_wise_grads_per_batch,
            **options,
        )
