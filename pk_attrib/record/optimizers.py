"""What the recorder and the engine need to know about an optimizer.

`describe_optimizer` turns a live `torch.optim.Optimizer` into a JSON-able description
(kind, hyperparameters per param group, which parameter names each group updates)
that the store keeps in its manifest and the engine reads back.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch

from ..exceptions import StoreMismatchError


class OptimizerKind(str, enum.Enum):
    """Optimizer families pk_attrib knows.

    Every kind but ``OTHER`` has an exact decomposition rule (see docs/mathematics.md).
    ``OTHER`` is any other optimizer: it is recorded all the same, but only the
    approximate (checkpoint) mode can explain it.
    """

    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"
    ADAGRAD = "adagrad"
    ADAMAX = "adamax"
    NADAM = "nadam"
    RADAM = "radam"
    OTHER = "other"

    @property
    def exact(self) -> bool:
        """Whether the exact decomposition supports this optimizer family."""
        return self is not OptimizerKind.OTHER


# Hyperparameters the exact rules depend on, by family. They are recorded per group.
HYPER_KEYS = {
    OptimizerKind.SGD: ("momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    OptimizerKind.ADAM: ("betas", "eps", "weight_decay", "amsgrad", "maximize"),
    OptimizerKind.ADAMW: ("betas", "eps", "weight_decay", "amsgrad", "maximize"),
    OptimizerKind.RMSPROP: (
        "alpha",
        "eps",
        "momentum",
        "centered",
        "weight_decay",
        "maximize",
    ),  # fmt: skip
    OptimizerKind.ADAGRAD: (
        "lr_decay",
        "eps",
        "weight_decay",
        "initial_accumulator_value",
        "maximize",
    ),  # fmt: skip
    OptimizerKind.ADAMAX: ("betas", "eps", "weight_decay", "maximize"),
    OptimizerKind.NADAM: (
        "betas",
        "eps",
        "weight_decay",
        "momentum_decay",
        "decoupled_weight_decay",
        "maximize",
    ),  # fmt: skip
    OptimizerKind.RADAM: ("betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize"),
}
# Optimizer state an exact rule reads back at every recorded step, by family: what the step
# divides by (second moments, Adagrad's sum, Adamax's infinity norm) and the step counts (and
# NAdam's product of momentum coefficients). With them fixed, a step is linear in its
# gradients; the first moment or momentum buffer, linear in the gradients, is not recorded.
STATE_AFTER_STEP = {
    OptimizerKind.ADAM: ("exp_avg_sq", "max_exp_avg_sq", "step"),
    OptimizerKind.ADAMW: ("exp_avg_sq", "max_exp_avg_sq", "step"),
    OptimizerKind.RMSPROP: ("square_avg", "grad_avg"),
    OptimizerKind.ADAGRAD: ("sum", "step"),
    OptimizerKind.ADAMAX: ("exp_inf", "step"),
    OptimizerKind.NADAM: ("exp_avg_sq", "mu_product", "step"),
    OptimizerKind.RADAM: ("exp_avg_sq", "step"),
}
# State kept as one number per parameter (a 0-dim tensor), not one per coordinate.
SCALAR_STATE = frozenset({"step", "mu_product"})
# State an optimizer may already hold when the recording begins: kept once, since its effect
# on the outputs is a term of its own (not an example's doing), and counterfactual scores
# linearize the first recorded step at it.
INITIAL_STATE = (
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg",
    "sum", "exp_inf", "mu_product", "step",
)  # fmt: skip
# Keys torch's LR schedulers (and SWALR) add to param groups: bookkeeping, not step options
# (the values they set, lr, momentum and betas, are recorded per step).
SCHEDULER_KEYS = {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
# Hyperparameters schedulers move during a run (recorded per step like the learning rate).
SCHEDULED_KEYS = {"momentum", "betas"}
# Keys that describe how a step is computed, not what it computes.
_IMPLEMENTATION_KEYS = {"params", "lr", "foreach", "fused", "capturable", "differentiable"}

# (exact classes only: a subclass may change the update)
_KINDS = {
    torch.optim.RMSprop: OptimizerKind.RMSPROP,
    torch.optim.Adagrad: OptimizerKind.ADAGRAD,
    torch.optim.Adamax: OptimizerKind.ADAMAX,
    torch.optim.NAdam: OptimizerKind.NADAM,
    torch.optim.RAdam: OptimizerKind.RADAM,
}


# Optimizers whose steps between snapshots a path recorded with ``every > 1`` can replay
REPLAYABLE = frozenset({OptimizerKind.SGD, OptimizerKind.ADAM, OptimizerKind.ADAMW})


def approximate_reasons(
    optimizer: torch.optim.Optimizer, description: dict[str, Any], every: int
) -> tuple[list[str], bool]:
    """Why a recording of this optimizer every ``every`` steps is approximate, if it is.

    Args:
        optimizer: The optimizer.
        description: Its `describe_optimizer`.
        every: The snapshot interval.

    Returns:
        ``(reasons, replayable)``: the reasons (none: an exact path), and whether the steps
        between snapshots can be replayed (``every > 1`` and an exact rule that replays).
    """
    kind = optimizer_kind(optimizer)
    reasons = []
    replayable = every > 1 and kind in REPLAYABLE
    if every > 1 and not replayable:
        reasons.append(
            f"every={every}: a snapshot of one step in {every} ({optimizer_name(optimizer)}'s "
            "steps between snapshots are not replayed)"
        )
    if not kind.exact:
        reasons.append(description["note"])
    return reasons, replayable


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class name, for messages."""
    return type(optimizer).__name__


def optimizer_kind(optimizer: torch.optim.Optimizer) -> OptimizerKind:
    """Classify an optimizer into an `OptimizerKind`."""
    if type(optimizer) is torch.optim.SGD:
        return OptimizerKind.SGD
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = type(optimizer) is torch.optim.AdamW or any(
            g.get("decoupled_weight_decay", False) for g in optimizer.param_groups
        )
        return OptimizerKind.ADAMW if decoupled else OptimizerKind.ADAM
    return _KINDS.get(type(optimizer), OptimizerKind.OTHER)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (tuple, list)):
        items = [_jsonable(v) for v in value]
        return None if any(i is _UNSERIALIZABLE for i in items) else items
    return _UNSERIALIZABLE


_UNSERIALIZABLE = object()


def group_hyper(group: dict) -> dict[str, Any]:
    """JSON-able hyperparameters of one param group, without ``params`` and ``lr``."""
    out = {}
    for key, value in group.items():
        if key in _IMPLEMENTATION_KEYS:
            continue
        converted = _jsonable(value)
        if converted is not _UNSERIALIZABLE:
            out[key] = converted
    return out


class GroupHyper:
    """`group_hyper` of each param group, step after step, recomputed only when one changed.

    A training loop's hooks call it every step, where each call of `group_hyper` converts
    every value of every group. Here a group whose keys and values are those of the last
    call (the same objects, or equal ones; the learning rate aside: it is recorded on its
    own), all of them immutable (numbers, strings, None, tuples of those), gets the dicts
    made then; a group holding a tensor or a list (changed in place, possibly) is converted
    every time. `differs` tells whether they differ from a run's first ones.
    """

    def __init__(self, base: list[dict[str, Any]] | None = None) -> None:
        self.base = base  # the hyperparameters the run started with
        self._seen: list[tuple] | None = None  # per group: (keys, values but lr, lr's place)
        self._hyper: list[dict[str, Any]] = []
        self.differs = False  # whether the last call's differ from ``base``

    def __call__(self, groups: list[dict]) -> list[dict[str, Any]]:
        """``[group_hyper(g) for g in groups]`` (the same list while nothing changed)."""
        seen = self._seen
        if seen is not None and len(seen) == len(groups):
            for group, (keys, before, after, at) in zip(groups, seen, strict=True):
                values = tuple(group.values())  # (tuples compare items by identity first)
                if tuple(group) != keys or values[:at] != before or values[at + 1 :] != after:
                    break
            else:
                return self._hyper
        self._hyper = [group_hyper(g) for g in groups]
        self.differs = self._hyper != self.base
        self._seen = None
        if all(_immutable(v) for g in groups for k, v in g.items() if k not in ("params", "lr")):
            self._seen = []
            for g in groups:
                values, at = tuple(g.values()), list(g).index("lr") if "lr" in g else len(g)
                self._seen.append((tuple(g), values[:at], values[at + 1 :], at))
        return self._hyper


def _immutable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(map(_immutable, value))
    return value is None or type(value) in (bool, int, float, str)


def group_lr(group: dict) -> float:
    """The learning rate of a param group as a Python float (tensors allowed)."""
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def describe_optimizer(
    optimizer: torch.optim.Optimizer, names_by_id: dict[int, str]
) -> dict[str, Any]:
    """Describe an optimizer for the manifest.

    Args:
        optimizer: The optimizer being recorded.
        names_by_id: ``id(parameter) -> name`` for the model's parameters.

    Returns:
        ``{"kind", "class", "exact", "groups": [{"params": [names], "hyper": {...}}]}``.

    Raises:
        StoreMismatchError: If the optimizer updates a tensor that is not a parameter of
            the model.
    """
    kind = optimizer_kind(optimizer)
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in names_by_id:
                raise StoreMismatchError(
                    f"param group {g} of the optimizer updates a tensor of shape "
                    f"{tuple(p.shape)} that is not a parameter of the model; pass the model "
                    "whose parameters the optimizer trains"
                )
            names.append(names_by_id[id(p)])
        groups.append({"params": names, "hyper": group_hyper(group)})
    cls = type(optimizer)
    description = {
        "kind": kind.value,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "exact": kind.exact,
        "groups": groups,
    }
    if not kind.exact:
        description["note"] = (
            f"{cls.__qualname__} has no exact decomposition rule: only approximate "
            "(checkpoint) modes can explain this path"
        )
    return description


def state_tensors(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], keys
) -> dict[tuple[str, str], torch.Tensor]:
    """The optimizer's state tensors under ``keys``, by ``(key, parameter name)``.

    Scalars (step counts) come as float64 0-dim tensors, the rest as they are held (the
    caller copies what it keeps).
    """
    out = {}
    for name, p in params.items():
        for key, value in (optimizer.state.get(p) or {}).items():
            if key in keys and isinstance(value, torch.Tensor):
                out[key, name] = value.detach().to(torch.float64) if value.dim() == 0 else value
    return out
