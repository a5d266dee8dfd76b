"""Recording a training run that a framework's trainer runs, with one line in the user's script.

Each submodule holds a training callback for one framework; it creates a `PathRecorder` once
the trainer has built its model and optimizer, and finds each step's dataset indices through
the trainer's own DataLoader (`pk_attrib.record.sampling.LoaderTap`):

- `pk_attrib.integrations.hf`: HuggingFace ``transformers.Trainer``
  (``pip install "pk-attrib[integrations]"``);
- `pk_attrib.integrations.lightning`: PyTorch Lightning's ``lightning.pytorch.Trainer``.

Importing this package imports neither framework: ``pk.integrations.hf`` loads on first use.
The guide page is docs/guide/integrations.md.
"""

import importlib

_SUBMODULES = ("hf", "lightning")


def __getattr__(name: str):
    if name in _SUBMODULES:  # pk.integrations.hf without importing it first
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
