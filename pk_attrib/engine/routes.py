"""How a model is batched for per-example gradients: vmap, vmap over stand-ins, or a loop.

`ModelRoutes` is the part of `FunctionalModel` that chooses, once per model, the first route
that works (`ModelRoutes._map`) and names it (``route``, reported as
``diagnostics.gradient_route``): ``torch.func.vmap`` on the model itself; vmap on a copy with
stand-ins that compute the same function in operations vmap can batch (`standins`), checked
against the model on the first call; or the per-example loop, with a `VectorizationWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import vmap

from ..exceptions import VectorizationWarning
from .batches import leaves, map_by_loop, n_rows, one_row, take
from .rows import not_vmaps_doing
from .standins import vmappable_copy

MODEL_LOOP = "per-example loop"  # (the model's route; `rows.LOOP` is a function's, `routes`)


class ModelRoutes:
    """The route part of `FunctionalModel` (its ``model``, ``names``, ``dtype``, ``_call``).

    Attributes:
        route: The model's route once one has run (None before): ``"vmap"``, ``"vmap (GRU
            stand-in)"`` and the like, or ``"per-example loop"``.
    """

    route: str | None
    _standin: torch.nn.Module | bool | None
    _use_standin: bool
    _depth: int

    def _map(self, fn: Callable, in_dims: tuple[int | None, ...]) -> Callable:
        """``vmap(fn, in_dims)``, by the first route that works on this model (`route`).

        1. ``"vmap"`` on the model itself;
        2. where vmap fails, vmap on a copy with stand-ins it can batch (`standins`:
           ``nn.GRU``/``nn.LSTM``/``nn.RNN`` unrolled over time, HuggingFace attention with
           the mask always built), kept only if its results equal the one-at-a-time results
           of the model itself on the first rows of this call (route ``"vmap (GRU
           stand-in)"``, ...);
        3. ``"per-example loop"``: one example at a time, the same numbers more slowly, and
           a `VectorizationWarning` says so once. If the loop fails too, its error is the
           model's own.

        Failures are handled by the outermost mapped call (maps nest: points x queries).
        """
        mapped = vmap(fn, in_dims=in_dims)

        def call(*args):
            if self.route == MODEL_LOOP:
                return map_by_loop(fn, in_dims, args)
            if self._depth:  # inside an outer mapped call, which handles failures
                return mapped(*args)
            done = self._attempt(mapped, args)
            if not isinstance(done, str):
                self.route = self.route or "vmap"
                return done[0]
            why = done
            if self._standin is None:  # not tried yet on this model
                done = self._through_standins(fn, in_dims, mapped, args)
                if not isinstance(done, str):
                    return done[0]
                why = f"{why}; {done}" if done else why
            self._use_standin, before, self.route = False, self.route, MODEL_LOOP
            try:
                out = map_by_loop(fn, in_dims, args)
            except BaseException:
                self.route = before
                raise
            warnings.warn(
                f"torch.func.vmap cannot batch this model ({why}); pk_attrib evaluates it "
                "one example at a time instead: the same numbers, more slowly",
                VectorizationWarning,
                stacklevel=2,
            )
            return out

        return call

    def _through_standins(self, fn, in_dims, mapped, args) -> tuple[Any] | str:
        """``(mapped(*args),)`` on a copy with stand-ins (kept as the route if it matches).

        Returns why not where it does not ("" where no stand-in fits the model).
        """
        made = vmappable_copy(self.model)
        self._standin = made[0] if made else False
        if not made:
            return ""
        names = ", ".join(made[1])
        kept = False
        try:
            self._use_standin = True
            done = self._attempt(mapped, args)
            if isinstance(done, str):
                return f"with stand-ins ({names}): {done}"
            mismatch = self._standin_mismatch(fn, in_dims, args, done[0])
            if mismatch is not None:
                return f"stand-ins ({names}) {mismatch}"
            self.route, kept = f"vmap ({names})", True
            return done
        finally:
            self._use_standin = kept

    def _attempt(self, mapped: Callable, args: tuple) -> tuple[Any] | str:
        """``(mapped(*args),)``, or why vmap failed (errors a loop would not cure propagate)."""
        self._depth += 1
        try:
            return (mapped(*args),)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            if not_vmaps_doing(err):
                raise
            return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        finally:
            self._depth -= 1

    def _standin_mismatch(self, fn, in_dims, args, out, rows: int = 1) -> str | None:
        """Whether the stand-ins' results differ from the model's own, one row at a time.

        The first ``rows`` rows (a point, or an example) are recomputed by the per-example
        loop on the model itself.
        The allowed difference, √eps of the largest value, lies far above the rounding of
        either computation and far below what computing another function gives.
        """
        part = tuple(
            a if d is None else take(a, slice(0, rows)) for a, d in zip(args, in_dims, strict=True)
        )
        route, self._use_standin, self.route = self.route, False, MODEL_LOOP
        try:
            ref = leaves(map_by_loop(fn, in_dims, part))
            ref = torch.cat([t.detach().reshape(-1) for t in ref])
        finally:
            self._use_standin, self.route = True, route
        got = torch.cat([t.detach()[:rows].reshape(-1) for t in leaves(out)])
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        if diff <= torch.finfo(self.dtype).eps ** 0.5 * scale:
            return None
        return f"differ from the model by {diff:.3g} (largest value {scale:.3g})"

    def settle_route(self, inputs) -> None:
        """Choose the model's route (`_map`) on a forward pass of two examples, if not yet.

        Args:
            inputs: The model's inputs, each (n, ...); the first two rows are used.
        """
        if self.route is not None or n_rows(inputs) == 0:
            return
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in self.names}

        def forward(x):
            return self._call(params, one_row(x))

        with torch.no_grad():
            self._map(forward, (0,))(take(tuple(inputs), slice(0, 2)))

    # -- routes: vmap of the whole example, or rows of one batched forward -------------------

