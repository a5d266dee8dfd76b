"""Optimizer rules: how each recorded step depends on the example gradients.

Every supported optimizer makes Δ_s a linear function of the "effective gradients" of the
current and earlier steps; a rule produces the adjoint that turns a query's φ_s into each
example's share, walking the steps backwards, and checks every step (`base.Rule`).

One module per optimizer family, each a `Rule` subclass naming the optimizer kinds it
explains (`Rule.KINDS`) and the options it models (`Rule.OPTIONS`); `RULES` maps a kind to its
rule. A new optimizer's rule is a module here and a line in `RULES`.
"""

from __future__ import annotations

from ...exceptions import CorruptStoreError, UnsupportedError
from ...record.optimizers import SCHEDULER_KEYS
from ...record.path import TrainingPath
from .adagrad import AdagradRule
from .adam import AdamRule
from .adamax import AdamaxRule
from .base import GroupVectors, Rule
from .nadam import NAdamRule
from .radam import RAdamRule
from .rmsprop import RMSpropRule
from .sgd import SGDRule

RULES: dict[str, type[Rule]] = {
    kind: rule
    for rule in (SGDRule, AdamRule, RMSpropRule, AdagradRule, AdamaxRule, NAdamRule, RAdamRule)
    for kind in rule.KINDS
}


def make_rule(path: TrainingPath, vectors: GroupVectors, names: list[str]) -> Rule:
    """The exact rule for the path's optimizer.

    Args:
        path: The training path (its manifest names the optimizer and its param groups).
        vectors: Per-param-group values as per-coordinate vectors.
        names: The differentiated parameters, in flat-vector order.

    Raises:
        UnsupportedError: The optimizer (or one of its options) has no exact rule.
        CorruptStoreError: Its hyperparameters are not what the rule reads.
    """
    return rule_for(path)(path, vectors, names, path.optimizer["kind"])


def unsupported(path: TrainingPath) -> str | None:
    """Why the path's optimizer has no exact rule, naming it; None when it has one.

    Either the optimizer has no rule (``RULES``), or a param group sets an option its rule
    does not model to a value other than its default.
    """
    optimizer = path.optimizer or {}
    kind = optimizer.get("kind")
    name = str(optimizer.get("class", kind)).rpartition(".")[2]
    rule = RULES.get(kind)
    if rule is None:
        return f"the optimizer {name} has no exact decomposition rule"
    for g, group in enumerate(optimizer["groups"]):
        unknown = {
            k
            for k, v in group["hyper"].items()
            if k not in rule.OPTIONS and k not in SCHEDULER_KEYS and v not in (None, False, 0, 0.0)
        }
        if unknown:
            return (
                f"param group {g} of the optimizer {name} uses {sorted(unknown)}, which the "
                f"exact {kind} rule does not model"
            )
    return None


def rule_for(path: TrainingPath) -> type[Rule]:
    """The rule class that explains the path's optimizer, its settings checked.

    Raises:
        UnsupportedError: The optimizer (or one of its options) has no exact rule.
        CorruptStoreError: Its hyperparameters are not what the rule reads.
    """
    rule = RULES.get((path.optimizer or {}).get("kind"))
    if rule is not None:  # (damaged settings first: they are no missing feature)
        _check_hyper(path, rule)
    why = unsupported(path)
    if why is not None:
        raise UnsupportedError(f"{why} (exact rules: {', '.join(RULES)}): use mode='checkpoint'")
    return rule


def _check_hyper(path: TrainingPath, rule: type[Rule]) -> None:
    """Refuse hyperparameters the rule cannot read (a store's manifest edited by hand).

    Raises:
        CorruptStoreError: Naming the step or group and the value.
    """
    groups = [("the optimizer's param group", g["hyper"]) for g in path.optimizer["groups"]]
    for raw, meta in enumerate(path.manifest.get("steps", [])):
        groups += [(f"optimizer step {raw}'s param group", h) for h in meta.get("hyper") or []]
    for where, hyper in groups:
        for key, kind in rule.HYPER.items():
            if key not in hyper:
                if kind.required:
                    raise _bad(f"{where} has no {key!r}", path)
            elif not kind.accepts(hyper[key]):
                raise _bad(f"{where} has {key}={hyper[key]!r}, not {kind.description}", path)


def _bad(what: str, path: TrainingPath) -> CorruptStoreError:
    return CorruptStoreError(
        f"the path's optimizer description is damaged: {what}. Restore the store's "
        "manifest.json from a backup, or re-record the run"
    )


__all__ = [
    "RULES",
    "AdagradRule",
    "AdamRule",
    "AdamaxRule",
    "GroupVectors",
    "NAdamRule",
    "RAdamRule",
    "RMSpropRule",
    "Rule",
    "SGDRule",
    "make_rule",
    "rule_for",
    "unsupported",
]
