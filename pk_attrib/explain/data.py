"""The training set an explainer is given, and finding given examples in it.

Scores are indexed by dataset index (the indices a recorder stores): `dataset_of` accepts a
Dataset or a DataLoader that yields every example once, in order (its ``collate_fn`` kept);
`check_examples` tries item 0 the way the engine will use every item; `locate` finds the
training examples a Captum-style batch holds (`ExampleIndex`: the training set by content).
"""

from __future__ import annotations

import numbers
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

from ..engine.batches import CollatedDataset, gather_examples, leaves
from ..engine.outputs import check_batch_dimension
from ..exceptions import ArgumentError, ArgumentTypeError

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
        raise ArgumentError(
            f"train_dataset is {where}, which has no indices: "
            "influence scores are indexed by training example, so pass a map-style Dataset "
            "(with __getitem__ and __len__), in the order the training examples are numbered"
        )
    if not isinstance(train, DataLoader):
        return train
    sampler = getattr(train.batch_sampler, "sampler", train.sampler)
    if isinstance(sampler, _SHUFFLING) or isinstance(train.sampler, _SHUFFLING):
        raise ArgumentError(
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
    raise ArgumentError(
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
        raise ArgumentTypeError(
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
        raise ArgumentTypeError(
            f"{convention}; pk_attrib evaluates one example at a time (a batch of one), and "
            f"on item 0 the model failed with {type(exc).__name__}: {exc}. {hint}"
        ) from exc
    check_batch_dimension(outputs, "training example 0")
    try:
        with torch.no_grad():
            loss_fn(outputs, labels)
    except Exception as exc:
        raise ArgumentTypeError(
            f"{convention}, but on item 0 loss_fn(outputs, label) failed with "
            f"{type(exc).__name__}: {exc}. (If loss_fn is a checkpoints_load_func: TracInCP "
            "takes it as its fourth positional argument, PathKernelInfluence takes loss_fn; "
            "pass the arguments after train_dataset by keyword, or construct "
            "pk_attrib.TracInCP, which takes TracInCP's positional order)"
        ) from exc


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


class ExampleIndex:
    """The training set's examples by content, to find given examples in it (built once).

    Args:
        dataset: The training set; its items are ``(inputs..., label)``.

    Raises:
        ValueError: The dataset is empty.
    """

    def __init__(self, dataset: Dataset):
        if len(dataset) == 0:
            raise ArgumentError("train_dataset is empty: no example can be located in it")
        # dtypes as training saw them: collated (Python floats become float64)
        self.reference = tensors_of(gather_examples(dataset, torch.tensor([0])))
        self.dtypes = dtypes = [t.dtype for t in self.reference]
        self.rows: dict[bytes, list[int]] = {}
        for i in range(len(dataset)):
            item = tensors_of(dataset[i])
            if len(item) != len(dtypes):
                raise ArgumentError(
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
            raise ArgumentError(
                f"the inputs have {len(items)} tensors per example (inputs..., labels), "
                f"train_dataset's items {len(dtypes)}"
            )
        if any(t.dim() == 0 for t in items):
            raise ArgumentError("inputs must be a batch: every tensor's first dimension indexes")
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
                raise ArgumentError(
                    f"example {r} of the inputs is not in train_dataset{hint}: on a recorded "
                    "path self-influence is defined for training examples (each counts in "
                    "its own batches); TracIn's self-influence of any example needs a path "
                    "of checkpoints (TrainingPath.from_checkpoints)"
                )
            if len(rows) > 1:
                shown = rows[:5] + (["..."] if len(rows) > 5 else [])
                raise ArgumentError(
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
