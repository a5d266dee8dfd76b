"""Models inside wrappers: ``torch.compile`` and (Distributed)DataParallel.

A wrapper prefixes every parameter name (``_orig_mod.``, ``module.``) but trains the
parameters of the module it wraps. Recordings use the wrapped module's names, so a path
recorded through a wrapper is explained with the plain model and vice versa.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def wrapped_chain(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model, then each module it wraps, innermost last.

    Args:
        model: Any module; ``torch.compile``'s result (``_orig_mod``) and
            ``nn.DataParallel`` / ``DistributedDataParallel`` (``module``) are unwrapped.
    """
    chain = [model]
    while True:
        outer = chain[-1]
        inner = getattr(outer, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, torch.nn.Module) and isinstance(
            outer, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        ):
            inner = outer.module
        if not isinstance(inner, torch.nn.Module) or inner is outer:
            return chain
        chain.append(inner)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module a wrapper trains (the model itself when it is not wrapped)."""
    return wrapped_chain(model)[-1]


def module_for(model: torch.nn.Module, names: Iterable[str]) -> torch.nn.Module:
    """The module of the model's wrapper chain whose parameters carry these names.

    The innermost one that has them all (a path recorded with this library's wrapper-free
    names), else an outer one that does (a path built from a wrapper's state_dict), else the
    innermost, whose name check then reports what is missing.
    """
    names = list(names)
    chain = wrapped_chain(model)
    for module in reversed(chain):
        have = dict(module.named_parameters())
        if all(n in have for n in names):
            return module
    return chain[-1]


def plain_name(name: str, known) -> str:
    """``name`` without wrapper prefixes (``_orig_mod.``, ``module.``) when only that is known.

    Args:
        name: A parameter, buffer or module name as a wrapper spells it ("_orig_mod.fc").
        known: The plain names (a set or dict): the prefixes come off until one matches.

    Returns:
        The known plain name, or ``name`` unchanged when none matches.
    """
    plain = name
    while plain not in known and plain.startswith(("_orig_mod.", "module.")):
        plain = plain.split(".", 1)[1]
    return plain if plain in known else name
