"""Stage 2, the engine: a `TrainingPath` and queries in, a `Decomposition` out.

- `exact`: the exact decomposition, a backward adjoint sweep over the recorded steps;
  `quadrature` integrates each step's query gradient, `rules` (one module per optimizer)
  turn it into each example's share and check each step.
- `tracin`: checkpoint mode (TracIn: the left endpoint on a few checkpoints).
- `scores`: the Captum contract's quantities (negative test loss, cosine, streaming top-k,
  self-influence).
- `functional`: the model at flat parameter vectors, per-example gradients (torch.func);
  `batches` and `outputs`: what it is evaluated on and what is differentiated.
- `projection` (random projection of gradients), `factors` (``nn.Linear`` gradients without
  forming them), `features` (the projected training side, cached).

Nothing here imports the explainer on top (`pk_attrib.explain`).
"""
