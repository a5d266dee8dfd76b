"""What a training step's forward passes start from, kept so that the engine can rerun them.

Per micro-batch, the random-number state when the batch was handed to the loop (the CPU
generator's, and each CUDA device's the model is on): rerun from it, the forward pass draws
the same dropout masks. Per step, the model's buffers (BatchNorm's running statistics) when
its first batch was handed over, before its forward passes updated them. Both are kept only
when they changed since they were last kept (readers look back for the latest), so a model
without random operations or buffers costs next to nothing.
"""

from __future__ import annotations

import operator

import torch

_TRAINING = operator.attrgetter("training")


class ForwardState:
    """Collects the random-number states and changed buffers of the step being taken.

    Args:
        buffers: The model's buffers by name (the tensors themselves: read when needed).
        cuda: CUDA device indices the model is on (their generators are kept too).
    """

    def __init__(
        self,
        buffers: dict[str, torch.Tensor],
        cuda: list[int],
        compared: frozenset = frozenset(),
        model: torch.nn.Module | None = None,
    ):
        self.model = model
        # its modules, walked once (the recorder holds the parameters it had when made too)
        named = [] if model is None else list(model.named_modules())
        self._module_names = [name for name, _ in named]
        self._module_objects = [module for _, module in named]
        self._mode: bool | list[str] | None = None  # the modules in train mode at the step
        self.buffers = buffers
        self.cuda = cuda
        self.compared = compared  # compared by value: updated where no version counter moves
        self._kept: dict[str, torch.Tensor] = {}  # their last kept values
        self._rng: list[tuple[torch.Tensor, ...]] = []  # the step's micro-batches'
        self._versions: dict[str, tuple[int, int]] = {}
        self._step_buffers: dict[str, torch.Tensor] = {}

    def keep_only(self, names) -> None:
        """Keep these buffers only (a store recorded without some goes on without them)."""
        kept = set(names)
        self.buffers = {n: b for n, b in self.buffers.items() if n in kept}

    def step_begins(self) -> None:
        """A step's first micro-batch is handed over: note the buffers changed since.

        Also which modules are in train mode (dropout draws, BatchNorm uses the batch's
        statistics): True (all), False (none), or the names of those that are.
        """
        if self.model is not None:  # (each step: map and all run in C)
            flags = list(map(_TRAINING, self._module_objects))
            if all(flags):
                self._mode = True
            elif not any(flags):
                self._mode = False
            else:
                named = zip(self._module_names, flags, strict=True)
                self._mode = [name for name, on in named if on]
        for name, buffer in self.buffers.items():
            # changed: PyTorch's version counter of the tensor moved (an in-place update), or
            # the module holds another tensor under the name; normalization layers' running
            # statistics are updated inside their kernel, which moves no counter: compared
            version = (id(buffer), buffer._version)
            if name in self.compared:
                kept = self._kept.get(name)
                if kept is not None and torch.equal(kept, buffer.detach().to(kept.device)):
                    continue
            elif self._versions.get(name) == version:
                continue
            self._step_buffers[name] = buffer.detach().to("cpu", copy=True)
            self._versions[name] = version
            if name in self.compared:
                self._kept[name] = self._step_buffers[name]

    def batch_begins(self) -> None:
        """A micro-batch is handed over: note the random-number state its forward starts in."""
        cpu = torch.get_rng_state()
        if not self.cuda:
            self._rng.append((cpu,))
        else:
            self._rng.append((cpu, *(torch.cuda.get_rng_state(d) for d in self.cuda)))

    def batch_states(self) -> list[tuple[torch.Tensor, ...]]:
        """The random-number states of the micro-batches noted for the step being taken."""
        return self._rng

    def use_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        """Keep these states for the step's micro-batches instead (every rank's, under DDP)."""
        self._rng = list(states)

    def buffer_tensors(self, raw: int) -> dict[str, torch.Tensor]:
        """The buffers step ``raw`` keeps (``"<raw>/buf/<name>"``): those changed since kept.

        (Its micro-batches' random-number states, `batch_states`, are kept where they
        changed by `pk_attrib.record.finish.StepFinisher`.)
        """
        return {f"{raw}/buf/{n}": b for n, b in self._step_buffers.items()}

    def mode(self) -> bool | list[str] | None:
        """The train mode of the step's modules, for its metadata (None: not known)."""
        return self._mode

    def step_done(self) -> None:
        """The step was recorded: start collecting for the next one."""
        self._rng, self._step_buffers = [], {}

    def discard(self) -> None:
        """Forget the micro-batches noted since the last step (the loop skipped its step).

        The buffers noted for them stay: they are the next step's start too.
        """
        self._rng = []

    def current_buffers(self) -> dict[str, torch.Tensor]:
        """CPU copies of all the buffers now (the end of the run)."""
        return {n: b.detach().to("cpu", copy=True) for n, b in self.buffers.items()}


def running_statistics(model: torch.nn.Module) -> frozenset[str]:
    """Names of the buffers normalization layers update in their kernels (running stats)."""
    norm = torch.nn.modules.batchnorm._NormBase
    return frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, norm)
        for name, _ in module.named_buffers(recurse=False)
    )
