"""`PathKernelInfluence`: the Captum-style entry point (`captum.influence.DataInfluence`).

This module imports captum (and through it matplotlib), so `pk_attrib` loads it lazily.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any

import torch
from captum.influence import DataInfluence
from captum.influence._utils.common import KMostInfluentialResults
from torch.utils.data import DataLoader, Dataset

from ..decomposition import Decomposition
from ..engine import tracin
from ..engine.batches import n_rows
from ..engine.exact import warn_unconverged
from ..engine.features import FeatureCache
from ..engine.functional import FunctionalModel
from ..engine.outputs import OutputFn
from ..engine.projection import ProjectorKind
from ..engine.quadrature import Quadrature, QuadratureRule
from ..engine.segments import replayed_path
from ..engine.steps import Problem
from ..exceptions import ArgumentError, ArgumentTypeError, StoreMismatchError, UnsupportedError
from ..record.path import TrainingPath
from ..record.wrappers import module_for
from . import arguments, counterfactual, data, influence, projected, sources
from .distributed import make_engine, world_accumulation

MODES = ("auto", "exact", "checkpoint")


class PathKernelInfluence(DataInfluence):
    """Exact training-data attribution through the path kernel of a recorded training run.

    The constructor also takes Captum ``TracInCP``'s arguments, so a TracInCP workflow moves
    by changing the class it constructs: ``checkpoints`` (a folder, file or list, read with
    ``checkpoints_load_func``, which loads a checkpoint into the model and returns its
    learning rate), ``layers``, ``loss_fn``, ``batch_size``, ``test_loss_fn``; such a path is
    explained in checkpoint mode (TracIn).

    Args:
        model: The trained model (its parameters must equal the path's final ones).
        train_dataset: The training set the path's indices refer to: a Dataset whose items
            are ``(inputs..., label)``, or a non-shuffling DataLoader over it.
        path: A `TrainingPath`, the folder of a store, or (as in TracInCP) checkpoints.
        loss_fn: The training loss, ``loss_fn(outputs, labels)``; e.g.
            ``torch.nn.CrossEntropyLoss()``.
        checkpoints: TracInCP's name for checkpoint files (instead of ``path``).
        checkpoints_load_func: ``f(model, file) -> learning rate`` (TracInCP's default when
            None: load ``state_dict`` from the file, lr from its ``learning_rate`` entry or 1).
        layers: Module names: restrict gradients (and so the kernel) to their parameters,
            like TracInCP's ``layers``. The result is then approximate and ``delta`` says by
            how much (adaptive quadrature falls back to 4 Gauss–Legendre nodes).
        batch_size: Training examples per gradient chunk (TracInCP's name); default: sized by
            ``memory_budget``.
        test_loss_fn: The loss `influence` explains (default: ``loss_fn`` per example).
        sample_wise_grads_per_batch: Accepted for TracInCP compatibility; per-example
            gradients always come from torch.func.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loop reduced the loss over
            a batch. Read from ``loss_fn.reduction`` when it has one.
        accumulation: With gradient accumulation, ``"sum"`` (each micro-batch's loss was
            back-propagated as is), ``"mean"`` (divided by the number of micro-batches of
            its step), or an int n (divided by n, as ``loss / n_accum`` does, also in a
            shorter last group). Under DDP, what each rank's loop did: the path's
            ``world_size`` adds DDP's average over the ranks.
        mode: ``"exact"``, ``"checkpoint"``, or ``"auto"`` (exact when the path allows it).
        quadrature: ``"adaptive"`` (default), ``"left"``, ``"midpoint"``, or an int number
            of Gauss–Legendre nodes; see `pk_attrib.Quadrature`.
        rtol: Per-step tolerance of the adaptive quadrature (default 1e-9 in float64,
            1e-5 in float32).
        dtype: Computation dtype (default: the model's parameter dtype).
        device: Computation device (default: the model's).
        memory_budget: Bytes that one chunk of per-example gradients, or one block of scores,
            may take.
        show_progress: Show tqdm progress bars in `attribute`.
        projection_dim: Project gradients to this many dimensions (per layer with
            ``projector="factorized"``) so memory stays bounded: contributions become
            unbiased estimates with variance ~ 1/projection_dim (~ 1/√projection_dim with
            ``"factorized"``, see `ProjectorKind`), while prediction, bias and Σ φ·Δ stay
            exact (``delta`` then measures the projection noise). Queries are processed in
            chunks whose gradients fit ``memory_budget`` (in checkpoint mode they are kept
            projected). Applies to `attribute`, `influence` and (checkpoint mode)
            `compute_intermediate_quantities`; `self_influence` stays exact.
        projector: A `ProjectorKind`: ``"gaussian"``, ``"rademacher"``, ``"sparse"``,
            ``"factorized"``.
        projection_seed: Seed of the projection (same seed, same numbers).
        feature_dtype: Storage dtype of cached training features (float32, float16, bfloat16).
        cache_features: Keep training-side features for reuse by later query batches:
            ``True`` inside the store when the path is stored on disk, else in memory up
            to ``memory_budget`` bytes (what does not fit is recomputed when needed), on top
            of the working memory: a path held in memory can then take about twice
            ``memory_budget`` (pass ``cache_features=False`` or half the budget to avoid
            it). A folder (str or path) keeps them there for any path, e.g. TracInCP
            checkpoints (a subfolder per projection, loss and path); ``False``: none.
        hessian: How counterfactual scores let a later step's gradient respond to earlier
            changes of the weights: ``"exact"`` (the batch loss's Hessian: the true
            derivative of the run), ``"fisher"`` (the batch's empirical Fisher, as dattri's
            DVEmb) or ``"gauss-newton"`` (`pk_attrib.engine.curvature.Curvature`). Default:
            ``"exact"`` for `counterfactual` and `influence` (it predicted retraining best on
            benchmarks/bench_lds.py), ``"fisher"`` for `self_influence` (it found mislabeled
            examples best there, and costs least with every training example as a query).
        distributed: When a process group of several ranks is initialised (torchrun), None
            (default) splits the work of every call over the ranks, each returning the whole
            result; every rank must then make the same calls. False: this process works
            alone (one explainer per rank on purpose). See docs/guide/distributed.md.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Dataset | DataLoader,
        path: TrainingPath | str | os.PathLike | list | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        checkpoints: str | os.PathLike | list | None = None,
        checkpoints_load_func: Callable[[torch.nn.Module, str], float] | None = None,
        layers: list[str] | None = None,
        batch_size: int | None = None,
        test_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sample_wise_grads_per_batch: bool | None = None,
        loss_reduction: str | None = None,
        accumulation: str | int = "sum",
        mode: str = "auto",
        quadrature: str | int | Quadrature = "adaptive",
        rtol: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        memory_budget: int = 1 << 30,
        show_progress: bool = True,
        projection_dim: int | None = None,
        projector: str | ProjectorKind = "gaussian",
        projection_seed: int = 0,
        feature_dtype: torch.dtype = torch.float32,
        cache_features: bool | str | os.PathLike = True,
        hessian: str | None = None,
        distributed: bool | None = None,
    ):
        if loss_fn is None:
            raise ArgumentTypeError(
                "loss_fn is required: the training loss, e.g. nn.CrossEntropyLoss()"
            )
        memory_budget = arguments.positive_int(memory_budget, "memory_budget (bytes)")
        batch_size = arguments.positive_int(batch_size, "batch_size", allow_none=True)
        self.model = model
        self.train_dataset = data.dataset_of(train_dataset)
        if checkpoints is not None and not isinstance(checkpoints, (str, os.PathLike, list)):
            checkpoints = list(checkpoints)  # (a generator: read once, kept below)
        self.path, from_tracincp = sources.load_path(
            model, path, checkpoints, checkpoints_load_func
        )
        # TracInCP's attributes: the checkpoints as read (natural order), how, in what chunks
        self.checkpoints = (
            sources.checkpoint_files(checkpoints if checkpoints is not None else path)
            if from_tracincp
            else None
        )
        self.checkpoints_load_func = checkpoints_load_func
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.test_loss_fn = test_loss_fn or loss_fn
        self.layers = layers
        needs_reduction = any(True for _ in self.path.step(0).parts) if len(self.path) else False
        self.reduction = arguments.loss_reduction(loss_fn, loss_reduction, needs_reduction)
        fixed = isinstance(accumulation, numbers.Integral) and not isinstance(accumulation, bool)
        if not (accumulation in ("sum", "mean") or (fixed and accumulation >= 1)):
            raise ArgumentError(
                f"accumulation={accumulation!r}: use 'sum', 'mean', or the int n the loop "
                "divided each micro-batch's loss by"
            )
        accumulation = int(accumulation) if fixed else accumulation
        accumulation = world_accumulation(self.path, accumulation)  # (DDP: mean over ranks)
        if mode not in MODES:
            raise ArgumentError(f"mode={mode!r}: use one of {', '.join(map(repr, MODES))}")
        self.mode = sources.resolve_mode(self.path, mode)
        first = next(model.parameters())
        self.dtype = dtype or first.dtype
        model = module_for(model, self.path.param_names)  # inside torch.compile / DDP
        active = arguments.layer_params(model, layers, self.path.param_names)
        if active is not None and quadrature == "adaptive":
            quadrature = 4  # the exact output change cannot check a partial gradient
        self.quadrature = QuadratureRule.parse(quadrature, rtol, self.dtype)
        self.show_progress = show_progress
        self.hessian = None if hessian is None else counterfactual.Curvature.parse(hessian)
        size = self.path.dataset_size
        if size is not None and size != len(self.train_dataset):
            raise StoreMismatchError(
                f"the path was recorded over a training set of {size} examples, but "
                f"train_dataset has {len(self.train_dataset)}: pass the dataset the recorder "
                "watched (same order)"
            )
        budget = memory_budget
        if batch_size is not None:  # TracInCP's knob: examples per gradient chunk
            budget = (
                max(1, batch_size)
                * 3
                * self.dtype.itemsize
                * sum(s.numel() for s in self.path.param_shapes.values())
            )
        self._fm = FunctionalModel(
            model,
            self.path.param_names,
            self.path.param_shapes,
            self.dtype,
            device or first.device,
            budget,
            active,
        )
        self.memory_budget = memory_budget
        data.check_examples(self.train_dataset, self._fm, self.path.final, loss_fn)
        if not from_tracincp:
            sources.check_final(self.path, model)
        self._problem = Problem(
            self._fm,
            self.path,
            self.train_dataset,
            loss_fn,
            self.reduction,
            accumulation,
            show_progress,
        )
        self._engine = make_engine(self._problem, distributed)
        if self.mode == "exact" and self.path.every > 1:  # steps between snapshots replayed
            self._problem.path = replayed_path(self.path, self._engine)
        if self.mode == "exact":  # dropout, BatchNorm, a batch loss: rerun each step's forward
            self._engine.prepare_replay()
        self._projector = projected.projector(self, projector, projection_dim, projection_seed)
        self._examples: data.ExampleIndex | None = None  # built by self_influence(inputs)
        self._step_errors: torch.Tensor | None = None  # the step check, run once (exact mode)
        self._features = None
        if self._projector.kind is not ProjectorKind.IDENTITY:
            self._features = projected.feature_cache(self, cache_features, feature_dtype)

    # -- decomposition ------------------------------------------------------------------------

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        output_fn: OutputFn | None = None,
        kernel: bool = False,
    ) -> Decomposition:
        """Decompose the model's output on each query into training-example contributions.

        Args:
            inputs: Queries, (n_test, ...), or a tuple of the model's inputs
                (``model(*inputs)``), each such a tensor or a tuple / list / dict of them.
            target: Which output to explain, as in Captum: an int, one index per query
                ((n_test,) tensor or list), or None for a model with a scalar output.
            output_fn: Explain ``output_fn(outputs, target) -> (n,)`` instead of one logit
                (a margin, a log-probability, a loss, ...). It is called on single rows too.
            kernel: Also compute the path kernel K(x, x_i) and the weights a_i(x) (costs C
                gradients per training example and step for a model with C outputs). Exact
                mode only (checkpoint mode raises `UnsupportedError`).

        Returns:
            A `Decomposition` with contributions (n_test, n_train), bias, prediction, delta.
        """
        queries = arguments.queries(self._fm, inputs)
        if n_rows(queries) == 0:
            raise ArgumentError("inputs hold no queries (their first dimension is 0)")
        tgt, output_fn = arguments.target_and_output(
            self._fm, self.path.final, queries, target, output_fn
        )
        if self._projector.kind is not ProjectorKind.IDENTITY:
            if kernel:
                raise UnsupportedError(
                    "random projection applies to the contributions, not to the kernel view: "
                    "drop projection_dim= or kernel=True"
                )
            return projected.attribute(self, queries, tgt, output_fn)
        if self.mode == "exact":
            return self._engine.exact(queries, tgt, output_fn, self.quadrature, kernel)
        if kernel:
            raise UnsupportedError("the path kernel is defined in exact mode only")
        return tracin.decompose(self._engine, queries, tgt, output_fn)

    def _call_features(self) -> FeatureCache:
        """The feature cache a call uses (see `projected.call_features`)."""
        return projected.call_features(self)

    def _query_chunk(self) -> int:
        """Queries per chunk of a projected sweep (see `projected.query_chunk`)."""
        return projected.query_chunk(self)

    def counterfactual(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        output_fn: OutputFn | None = None,
        hessian: str | None = None,
    ) -> torch.Tensor:
        """How each query's output responds to upweighting each training example, through training.

        scores[q, i] = d f(x_q; w_S) / d ε_i, where ε_i scales example i's loss term in every
        batch that drew it: the reverse-mode derivative of the whole recorded run, in which
        every later weight and gradient responds too (docs/mathematics.md). Removing example i
        changes f by about −scores[q, i]; positive means proponent, as for contributions.
        Exact mode only; queries are processed in blocks that fit ``memory_budget``, each
        holding a few (d,) adjoints per query.

        Args:
            inputs: Queries, as in `attribute`.
            target: Which output to explain, as in `attribute`.
            output_fn: Explain ``output_fn(outputs, target) -> (n,)`` instead of one logit.
            hessian: ``"exact"``, ``"fisher"`` or ``"gauss-newton"`` (default: the
                explainer's ``hessian``, else ``"exact"``).

        Returns:
            (n_test, n_train) scores.

        Raises:
            UnsupportedError: The path is explained in checkpoint mode, or ``layers`` was given.
        """
        self._check_steps()
        return counterfactual.scores(self, inputs, target, output_fn, hessian)

    # -- Captum contract ------------------------------------------------------------------------

    def _split_batch(self, batch, loss_fn) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """A Captum batch as (queries, labels), checked on ``loss_fn`` once."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ArgumentTypeError(
                "inputs must be a batch (inputs..., labels), as in Captum's TracInCP: "
                "model(*batch[:-1]) gives the outputs, labels come last"
            )
        *x, labels = batch
        queries = arguments.queries(self._fm, tuple(x))
        labels = self._fm.cast((labels,))[0]
        arguments.check_labels(self._fm, self.path.final, queries, labels, loss_fn)
        return queries, labels

    def influence(
        self,
        inputs: Any = None,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
        *,
        score: str = "contribution",
    ) -> torch.Tensor | KMostInfluentialResults:
        """Influence of each training example on each test example's loss (Captum contract).

        A score is the exact contribution of training example i to the *decrease* of the test
        loss (``test_loss_fn``) along the path, so positive means proponent, as in Captum.

        With ``score="cosine"`` each contribution is divided by its Cauchy–Schwarz bound,
        the largest value it could take for gradients of their sizes over the steps that used
        the example: c_i / sqrt(Σ_s κ_i ‖u_s(x)‖² · Σ_s κ_i ‖g_i(w_s)‖²) in [−1, 1], where
        c_i = Σ_s κ_i u_s(x) · g_i(w_s) (u_s: the test side, the adjoint σ v_s in exact mode,
        η_k ∇f(x; w_k) in checkpoint mode). Raw contributions favour examples with large
        gradients (hard or mislabeled ones); the cosine favours examples whose gradients
        point the test example's way, e.g. its duplicates (their cosine is ~1).

        Args:
            inputs: A batch ``(inputs..., labels)`` (``model(*inputs[:-1])``, labels last;
                an input may be a tuple / list / dict of tensors), or a DataLoader of such
                batches.
            k: None for all scores; an int for the k most influential per test example,
                streamed over the training set in blocks (memory O(n_test × (k + block));
                with ``projection_dim``, plus the steps' projected training features,
                which stay in the store's feature cache when the path is on disk).
            proponents: With ``k``: the most positive (True) or most negative (False).
            show_progress: Show progress bars.
            aggregate: As in TracInCP: sum the scores over all test examples, (1, n_train),
                and with ``k`` the k training examples of highest (lowest) sum, each (1, k).
                Computed in blocks of training examples (memory O(n_test × block)).
            score: ``"contribution"`` (default), ``"cosine"``, or ``"counterfactual"``: the
                derivative of the test loss's decrease with respect to upweighting the
                training example through the whole run (see `counterfactual`).

        Returns:
            (n_test, n_train) scores, or ``KMostInfluentialResults(indices, influence_scores)``,
            each (n_test, k), sorted (n_test reads 1 with ``aggregate``).
        """
        if inputs is None:  # (an AssertionError too, as TracInCP's)
            raise ArgumentTypeError(
                "inputs is required: a batch (inputs..., labels) or a DataLoader of them; "
                "for each training example's influence on itself, use self_influence()"
            )
        if score not in ("contribution", "cosine", "counterfactual"):
            raise ArgumentError(
                f"score={score!r}: use 'contribution', 'cosine' or 'counterfactual'"
            )
        k = arguments.positive_int(k, "k", allow_none=True)
        self._check_steps()
        if score == "counterfactual":
            return counterfactual.influence(self, inputs, k, proponents, aggregate, show_progress)
        found = influence.influence(self, inputs, k, proponents, aggregate, score, show_progress)
        self._warn_quadrature()
        return found

    def compute_intermediate_quantities(self, inputs: Any, aggregate: bool = False) -> torch.Tensor:
        """Each example's vector whose dot products are the influence scores (Captum's).

        Row i is the concatenation over the checkpoints k of √η_k ∇ℓ(x_i; w_k) (η_k per
        parameter: its group's learning rate), projected to P(√η_k ∇ℓ(x_i; w_k)) with
        ``projection_dim``: (m, S·d), or (m, S·projection_dim) (S·features with
        ``"factorized"``). So ``influence((x, y))`` equals ``compute_intermediate_quantities
        ((x, y)) @ compute_intermediate_quantities(train_batch).T`` (with ``test_loss_fn``
        left as ``loss_fn``; with projection, the same P on both sides): cache the training
        set's rows and search them with a nearest-neighbour index. ℓ is ``loss_fn`` per
        example, as in Captum. Captum's ``TracInCP`` scales by η rather than √η (its dot
        products are the scores only for η = 1); ``TracInCPFastRandProj`` by √η, as here.

        Checkpoint mode on a path of checkpoints only: in exact mode (and on a recorded path
        explained in checkpoint mode) a contribution pairs the training example's gradients
        at the steps whose batches drew it, each weighted by the batch, with the query's
        adjoint integrated along each step, so the two sides are different functions of
        their examples and there is no one embedding to return.

        Args:
            inputs: A batch ``(inputs..., labels)`` or a DataLoader of such batches.
            aggregate: Return the sum of the rows, (1, S·D), as TracInCP.

        Returns:
            (m, S·D) or (1, S·D).

        Raises:
            UnsupportedError: The explainer runs in exact mode, or on a recorded path.
        """
        return projected.intermediate_quantities(self, inputs, aggregate)

    def self_influence(
        self,
        inputs: Any = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints=False,
        *,
        score: str | None = None,
    ) -> torch.Tensor:
        """Each training example's influence on its own loss, (n_train,) (Captum contract).

        ``score="counterfactual"`` (the default in exact mode): the derivative of the decrease
        of the example's own final loss with respect to upweighting it through the whole run
        (`counterfactual`, with the explainer's ``hessian``, else the empirical Fisher).
        ``score="contribution"`` (the default in checkpoint mode and with ``layers``): in
        exact mode the example's exact contribution to the decrease of its own loss along
        the path; in checkpoint mode TracIn's Σ_k η_k ‖∇ℓ_i(w_k)‖². High scores flag
        examples the model had to work to fit, such as mislabeled ones (which the
        counterfactual score found best on benchmarks/bench_lds.py).

        Args:
            inputs: None for the whole training set; or a batch ``(inputs..., labels)`` (or a
                DataLoader of batches) of training examples, whose entries of the whole
                training set's scores are returned; on a path of checkpoints (TracIn's
                setting, where every example counts at every checkpoint) of any examples.
            show_progress: Show progress bars.
            outer_loop_by_checkpoints: Accepted for TracInCP compatibility (its loop order);
                the numbers do not depend on it.
            score: ``"counterfactual"`` or ``"contribution"`` (default: see above).

        Returns:
            Scores, (n_train,) or (n_inputs,).
        """
        with counterfactual.progress(self, show_progress):
            self._check_steps()
            if counterfactual.self_score(self, score) == "counterfactual":
                return counterfactual.self_influence(self, inputs)
            found = influence.self_influence(self, inputs, show_progress)
        self._warn_quadrature()
        return found

    def _check_steps(self) -> None:
        """The step check `attribute` runs, once per explainer for the Captum methods.

        Their sweeps cover a block of training examples at a time, so the check runs on its
        own (one batched backward pass per step) and warns as `attribute` does: scores of a
        training set in another order, changed labels or another loss reduction are then
        not returned in silence.
        """
        self._engine.unconverged.clear()
        if self.mode != "exact" or self._step_errors is not None:
            return
        self._step_errors = self._engine.check_steps()
        self._engine._warn_reconstruction(self._step_errors, stacklevel=4)

    def _warn_quadrature(self) -> None:
        """Warn once for the steps where the adaptive quadrature ran out of nodes."""
        warn_unconverged(self._engine.unconverged, "the scores")

    def _example_index(self) -> data.ExampleIndex:
        """The training set by content (built on first use: it reads every item once)."""
        if self._examples is None:
            self._examples = data.ExampleIndex(self.train_dataset)
        return self._examples
