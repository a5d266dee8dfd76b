"""Stage 3, the API on top: `PathKernelInfluence`, a Captum ``DataInfluence``.

- `explainer`: `PathKernelInfluence` (``attribute``, ``influence``, ``self_influence``).
- `sources`: the path an explainer is given: a store folder, a `TrainingPath`, or TracInCP
  checkpoints.
- `data`: training sets given as Datasets or DataLoaders, and finding examples in them.
- `arguments`: checking the other arguments (loss reduction, layers, queries, targets).

`explainer` imports captum (and through it matplotlib): ``import pk_attrib`` loads it on first
use of `PathKernelInfluence`.
"""
