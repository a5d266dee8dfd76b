"""Captum compatibility: TracInCP's arguments, training sets given as DataLoaders, ``layers``.

Helpers for `PathKernelInfluence`'s constructor, kept apart so that it reads as the API.
"""

from __future__ import annotations

import copy
import glob
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
    default_convert,
)

from .exceptions import LossReductionError
from .gradients import (
    CollatedDataset,
    Reduction,
    check_batch_dimension,
    gather_examples,
    leaves,
)
from .path import TrainingPath
from .wrappers import plain_name, unwrap

_SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
_DEFAULT_COLLATE = (default_collate, default_convert)


def dataset_of(train: Dataset | DataLoader) -> Dataset:
    """The Dataset behind a training set given as a Dataset or a DataLoader.

    Scores are indexed by dataset index (the indices a recorder stores), so a DataLoader
    must yield every example of its dataset once, in order; its ``collate_fn`` is kept
    (a `CollatedDataset`), so examples are collated as the loader collates them.

    Raises:
        ValueError: The loader shuffles, picks a subset or another order, drops a last
            partial batch, or the dataset is an IterableDataset (no indices).
    """
    dataset = train.dataset if isinstance(train, DataLoader) else train
    if isinstance(dataset, IterableDataset):
        where = (
            "a DataLoader over an IterableDataset" if dataset is not train else "an IterableDataset"
        )
        raise ValueError(
            f"train_dataset is {where}, which has no indices: "
            "influence scores are indexed by training example, so pass a map-style Dataset "
            "(with __getitem__ and __len__), in the order the training examples are numbered"
        )
    if not isinstance(train, DataLoader):
        return train
    sampler = getattr(train.batch_sampler, "sampler", train.sampler)
    if isinstance(sampler, _SHUFFLING) or isinstance(train.sampler, _SHUFFLING):
        raise ValueError(
            f"train_dataset is a DataLoader with a shuffling sampler ({type(sampler).__name__}), "
            "so its order would not match the recorded dataset indices: pass the Dataset, or "
            "a DataLoader with shuffle=False"
        )
    _check_in_order(train, len(dataset))
    if train.collate_fn in _DEFAULT_COLLATE:
        return dataset
    return CollatedDataset(dataset, train.collate_fn, per_example=train.batch_sampler is None)


def _check_in_order(train: DataLoader, n: int) -> None:
    """Refuse a loader that does not yield examples 0..n−1 once each, in order."""
    batches = train.batch_sampler
    plain = (
        isinstance(train.sampler, SequentialSampler) and train.sampler.data_source is train.dataset
    ) and (
        batches is None
        or (
            type(batches) is BatchSampler
            and batches.sampler is train.sampler
            and not (batches.drop_last and n % batches.batch_size)
        )
    )
    if plain:
        return
    order = [int(i) for b in batches for i in b] if batches is not None else list(train.sampler)
    if order == list(range(n)):
        return
    if (
        batches is not None
        and getattr(batches, "drop_last", False)
        and order == list(range(len(order)))
    ):
        why = f"drop_last=True leaves out its last {n - len(order)} examples"
    else:
        pairs = enumerate(zip(order, range(n), strict=False))
        at = next((j for j, (a, b) in pairs if a != b), min(len(order), n))
        got = order[at] if at < len(order) else "nothing more"
        why = (
            f"sampler yields {len(order)} examples of {n}, not 0..{n - 1} in order "
            f"(position {at} holds {got})"
        )
    raise ValueError(
        f"train_dataset is a DataLoader whose {why}: scores are indexed by the dataset's "
        "indices (those a recorder stores), one per example. Pass the Dataset, or a "
        "DataLoader over it with the default sampler and drop_last=False; for a subset, "
        "torch.utils.data.Subset(dataset, indices) (checkpoint paths)"
    )


def check_examples(dataset: Dataset, fm, final: dict[str, torch.Tensor], loss_fn) -> None:
    """Check that the training set's items are ``(inputs..., label)``, on its first example.

    Runs ``loss_fn(model(*inputs), label)`` once, so that a dataset of another layout fails
    here with the convention named, not deep inside a sweep.

    Raises:
        TypeError: The items are not tuples of tensors, or the model or the loss refuses them.
    """
    if len(dataset) == 0:
        return
    item = dataset[0]
    convention = (
        "train_dataset's items must be (inputs..., label), as in Captum's TracInCP: "
        "model(*item[:-1]) gives the outputs and loss_fn(outputs, item[-1]) the loss"
    )
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(
            f"{convention}; item 0 is a {type(item).__name__}: wrap the dataset so that "
            "__getitem__ returns (x, y)"
        )
    try:
        batch = gather_examples(dataset, torch.tensor([0]))
        *x, labels = fm.cast(batch)
        with torch.no_grad():
            outputs = fm.outputs(fm.flatten(final), x)
    except Exception as exc:  # name the convention, keep the cause
        hint = (
            f"Item 0 has {len(item)} parts, so the model was called with {len(item) - 1} "
            "inputs: a dataset whose items carry more (e.g. (x, y, index)) needs a wrapper "
            "that returns (x, y)"
            if len(item) > 2
            else "If the model needs the rest of the batch to compute an example's output "
            "(BatchNorm without running statistics), it cannot be explained example by example"
        )
        raise TypeError(
            f"{convention}; pk_attrib evaluates one example at a time (a batch of one), and "
            f"on item 0 the model failed with {type(exc).__name__}: {exc}. {hint}"
        ) from exc
    check_batch_dimension(outputs, "training example 0")
    try:
        with torch.no_grad():
            loss_fn(outputs, labels)
    except Exception as exc:
        raise TypeError(
            f"{convention}, but on item 0 loss_fn(outputs, label) failed with "
            f"{type(exc).__name__}: {exc}"
        ) from exc


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


def example_key(items) -> bytes:
    """A byte key identifying an example by its tensors, to find it in the training set."""
    return b"".join(
        torch.as_tensor(t)
        .detach()
        .cpu()
        .contiguous()
        .reshape(-1)
        .view(torch.uint8)
        .numpy()
        .tobytes()
        for t in items
    )


def checkpoint_files(checkpoints: Any) -> list[Any]:
    """Checkpoints as TracInCP reads them.

    A folder's files, or a list of file names, in natural order ("epoch-2" before
    "epoch-10"); one file; or any other objects as given (for a ``checkpoints_load_func``
    that reads them).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        folder = Path(checkpoints)
        if folder.is_dir():  # (sub-folders cannot be checkpoints)
            found = [f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f)]
            return sorted(found, key=_natural)
        return [str(folder)]
    if isinstance(checkpoints, Iterable):
        items = list(checkpoints)
        if items and all(isinstance(c, (str, os.PathLike)) for c in items):
            return sorted((str(c) for c in items), key=_natural)
        return items
    raise TypeError(f"checkpoints must be a folder, a file or a list of files, got {checkpoints!r}")


def _natural(name: str) -> list:
    """Sort key: digit runs compare as numbers ("ckpt-9" < "ckpt-10"), as Captum sorts."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def path_from_tracincp(model, checkpoints, load_func) -> TrainingPath:
    """Build a checkpoint path the way TracInCP reads checkpoints (load_func returns the lr)."""
    if load_func is None:
        from captum.influence._core.tracincp import _load_flexible_state_dict as load_func
    scratch = copy.deepcopy(model)
    states, lrs = [], []
    for file in checkpoint_files(checkpoints):
        lrs.append(float(load_func(scratch, file)))  # into the model as given, as TracInCP
        inner = unwrap(scratch)  # by the wrapper-free names; buffers too (BatchNorm)
        tensors = [*inner.named_parameters(), *inner.named_buffers()]
        states.append({n: t.detach().clone() for n, t in tensors})
    if not states:
        raise ValueError(f"no checkpoint files found in {checkpoints!r}")
    return TrainingPath.from_checkpoints(states, lrs, model=unwrap(model))


def layer_params(model: torch.nn.Module, layers: list[str] | None, names: list[str]):
    """Recorded parameter names inside the given modules (None: all)."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise TypeError(
            f"layers must be a list of module names, like TracInCP's (e.g. ['fc2']), got {layers!r}"
        )
    if "" in layers:  # the model itself: every parameter, so the kernel stays exact
        return None
    modules = dict(model.named_modules())
    layers = [plain_name(name, modules) for name in layers]
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not modules of the model (valid: "
            f"{[n for n in modules if n][:8]}...)"
        )
    chosen = [
        n
        for n in names
        if any(n == f"{m}.{n.split('.')[-1]}" or n.startswith(m + ".") for m in layers)
    ]
    if not chosen:
        raise ValueError(f"layers {layers} hold no recorded (trainable) parameters")
    return chosen


class ExampleIndex:
    """The training set's examples by content, to find given examples in it (built once).

    Args:
        dataset: The training set; its items are ``(inputs..., label)``.

    Raises:
        ValueError: The dataset is empty.
    """

    def __init__(self, dataset: Dataset):
        if len(dataset) == 0:
            raise ValueError("train_dataset is empty: no example can be located in it")
        # dtypes as training saw them: collated (Python floats become float64)
        self.reference = tensors_of(gather_examples(dataset, torch.tensor([0])))
        self.dtypes = dtypes = [t.dtype for t in self.reference]
        self.rows: dict[bytes, list[int]] = {}
        for i in range(len(dataset)):
            item = tensors_of(dataset[i])
            if len(item) != len(dtypes):
                raise ValueError(
                    f"train_dataset's item {i} holds {len(item)} tensors, item 0 {len(dtypes)}"
                )
            item = [t.to(dt) for t, dt in zip(item, dtypes, strict=True)]
            self.rows.setdefault(example_key(item), []).append(i)


def tensors_of(parts) -> list[torch.Tensor]:
    """The tensors of a batch or an item, in order.

    Each part is a tensor, a tuple / list / dict of tensors (nested inputs), or numbers
    (made one tensor; a Python number as a DataLoader collates it: a float is float64).
    """
    found = []
    for part in parts:
        if isinstance(part, (tuple, list, dict)) and leaves(part):
            found += leaves(_keys_sorted(part))  # (dicts match whatever their key order)
        elif isinstance(part, numbers.Number):
            found.append(default_collate([part])[0])
        else:
            found.append(torch.as_tensor(part))
    return found


def _keys_sorted(tree):
    """The tree with every dict's keys in sorted order (by their text)."""
    if isinstance(tree, dict):
        return {k: _keys_sorted(tree[k]) for k in sorted(tree, key=str)}
    if isinstance(tree, (tuple, list)):
        return [_keys_sorted(v) for v in tree]  # (only the order of the leaves matters)
    return tree


def locate(dataset: Dataset | ExampleIndex, inputs: Any) -> torch.Tensor:
    """Training indices of the given examples (a batch or a DataLoader of batches), (n,).

    ``dataset`` may be an `ExampleIndex` of it, built once for many calls.

    An example matches a training example when its tensors, cast to the dtypes the training
    set's items collate to (as in training: Python floats become float64), equal that
    example's bit for bit, and the cast loses nothing (NaNs match NaNs).

    Raises:
        ValueError: An example is not in the dataset, or occurs in it more than once (its
            copies sit in different batches, so their exact self-influences differ).
    """
    batches = list(inputs) if isinstance(inputs, DataLoader) else [inputs]
    index = dataset if isinstance(dataset, ExampleIndex) else ExampleIndex(dataset)
    reference, lookup, dtypes = index.reference, index.rows, index.dtypes
    found = []
    for batch in batches:
        items = [t.detach().cpu() for t in tensors_of(batch)]
        if len(items) != len(dtypes):
            raise ValueError(
                f"the inputs have {len(items)} tensors per example (inputs..., labels), "
                f"train_dataset's items {len(dtypes)}"
            )
        if any(t.dim() == 0 for t in items):
            raise ValueError("inputs must be a batch: every tensor's first dimension indexes")
        n = items[-1].shape[0]
        if n == 0:
            continue
        cast, lossless = [], torch.ones(n, dtype=torch.bool)
        for t, dt in zip(items, dtypes, strict=True):
            c = t.to(dt)
            back = c.to(t.dtype)
            same = back == t
            if t.is_floating_point():
                same |= back.isnan() & t.isnan()
            lossless &= same.reshape(n, -1).all(1)
            cast.append(c)
        for r in range(n):
            rows = lookup.get(example_key([c[r] for c in cast])) if lossless[r] else None
            if rows is None:
                hint = _difference(items, reference)
                raise ValueError(
                    f"example {r} of the inputs is not in train_dataset{hint}: on a recorded "
                    "path self-influence is defined for training examples (each counts in "
                    "its own batches); TracIn's self-influence of any example needs a path "
                    "of checkpoints (TrainingPath.from_checkpoints)"
                )
            if len(rows) > 1:
                shown = rows[:5] + (["..."] if len(rows) > 5 else [])
                raise ValueError(
                    f"example {r} of the inputs occurs {len(rows)} times in train_dataset "
                    f"(indices {', '.join(map(str, shown))}), and the copies' exact "
                    "self-influences differ (they sit in different batches): call "
                    "self_influence() without inputs and index its result"
                )
            found.append(rows[0])
    return torch.tensor(found, dtype=torch.int64)


def _difference(items: list[torch.Tensor], reference: tuple[torch.Tensor, ...]) -> str:
    """How a batch's tensors differ in dtype or shape from the training set's first item.

    A hint for an example that was not found (the items of a set may vary in shape).
    """
    notes = []
    for pos, (t, ref) in enumerate(zip(items, reference, strict=True)):
        if t.dtype != ref.dtype:
            notes.append(f"tensor {pos} is {t.dtype}, train_dataset's {ref.dtype}")
        if tuple(t.shape[1:]) != tuple(ref.shape[1:]):
            notes.append(
                f"tensor {pos} holds examples of shape {tuple(t.shape[1:])}, train_dataset's "
                f"first {tuple(ref.shape[1:])}"
            )
    return f" ({'; '.join(notes)})" if notes else ""
