"""Stage 1, recording: a training run in, a `TrainingPath` out.

- `recorder`: `PathRecorder`, the training callback (optimizer hooks, `watch(loader)`);
  `sampling` finds each batch's dataset indices; `resume` opens or continues a store folder.
- `optimizers`: what the recorder reads from an optimizer (kind, hyperparameters, groups).
- `path`: `TrainingPath` and `Step`, read access to a recording; `from_checkpoints` builds an
  approximate path from a few saved checkpoints.
- `store` (the folder's format: manifest, safetensors shards, the writer thread),
  `backends` (a path's tensors in memory or in a store), `diskio` (O_DIRECT writes),
  `buffers` (snapshot memory).
- `wrappers`: models inside ``torch.compile`` / DDP wrappers keep their plain names.

Nothing here imports the engine: a recording is explained by whatever reads it.
"""
