# %% [markdown]
# # 4. Scale with random projection: memory against accuracy
#
# Exact attribution takes dot products between a query-side vector and each training
# example's gradient, both as long as the model has parameters (d). For a large model, the
# per-example training gradients (batch × d numbers at every step) are what does not fit.
#
# `projection_dim=k` replaces every such dot product u·g by (Pu)·(Pg) with a random k × d
# matrix P whose expectation satisfies E[PᵀP] = I: an **unbiased** estimate whose error
# shrinks like 1/√k. P is never stored: it is regenerated block by block from a seed.
#
# What stays exact: the prediction, the bias, and the total Σ_s φ_s·Δ_s. So `delta` now
# measures the projection noise, and you can read off how much to trust the estimate.

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk

out = Path(os.environ.get("PK_TUTORIAL_OUT", tempfile.mkdtemp()))
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models run faster on one thread than on several

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
train = TensorDataset(x[:600], y[:600])
queries, labels = x[1500:1512], y[1500:1512]

# %% [markdown]
# Record a small run into a store on disk (projected training features will be cached
# there, so later query batches reuse them).

# %%
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
store = out / "store"
with pk.PathRecorder(model, optimizer, store=store) as recorder:
    for _ in range(2):
        for xb, yb in recorder.watch(DataLoader(train, batch_size=32, shuffle=True)):
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
model.eval()
path = pk.TrainingPath.load(store)
print(path)

# %% [markdown]
# The exact decomposition is the reference.

# %%
exact = pk.PathKernelInfluence(model, train, path, loss_fn, show_progress=False).attribute(
    queries, target=labels
)
print(f"exact: max relative delta {float(exact.relative_delta.max()):.1e}")


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Spearman correlation of the rows of a and b."""
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


# %% [markdown]
# Now the projected estimates, for three projector kinds (`pk.ProjectorKind` says when to
# use which) and growing k. The relative error should roughly halve each time k grows 4×
# for gaussian and sparse. factorized projects a Linear layer's output gradients and
# inputs separately; on wide layers its error is larger and falls more slowly (like
# k^(-1/4)), but a side no wider than its share stays exact: here the last layer's 10
# outputs from k = 256 on, and at k = 1024 the first layer's 32 outputs and the whole last
# layer (330 weights), so it ends up as accurate as the others.

# %%
results = {}
for kind in ("gaussian", "sparse", "factorized"):
    for k in (64, 256, 1024):
        start = time.perf_counter()
        explainer = pk.PathKernelInfluence(
            model, train, path, loss_fn, show_progress=False, projection_dim=k, projector=kind
        )
        dec = explainer.attribute(queries, target=labels)
        error = float((dec.contributions - exact.contributions).norm() / exact.contributions.norm())
        results[kind, k] = error
        print(
            f"{kind:>10} k={k:5d}: relative error {error:.3f}, rank correlation "
            f"{rank_correlation(dec.contributions, exact.contributions):.3f}, "
            f"bias exact: {torch.allclose(dec.bias, exact.bias, atol=1e-5)}, "
            f"|delta| up to {float(dec.delta.abs().max()):.3f} "
            f"({time.perf_counter() - start:.1f}s)"
        )

# %% [markdown]
# The training side was computed once per step and cached in the store: a second explainer
# (say, in another session) reads the features back instead of recomputing gradients.

# %%
again = pk.PathKernelInfluence(
    model, train, path, loss_fn, show_progress=False, projection_dim=256, projector="sparse"
).attribute(queries, target=labels)
print("training gradients evaluated on reuse:", again.diagnostics.train_gradients)
print("cached feature sets:", sorted(p.name for p in (store / "features").iterdir()))

# %%
fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
for kind in ("gaussian", "sparse", "factorized"):
    ks = [64, 256, 1024]
    ax.loglog(ks, [results[kind, k] for k in ks], marker="o", label=kind)
ax.loglog([64, 1024], [results["gaussian", 64], results["gaussian", 64] / 4], "k:", label="1/√k")
ax.set_xlabel("projection dimension k")
ax.set_ylabel("relative error of contributions")
ax.set_title("projection: accuracy against k")
ax.legend()
fig.savefig(out / "04_projection_error.png", dpi=100)
print("wrote", out / "04_projection_error.png")

# %% [markdown]
# Memory: with projection the training side holds O(batch × k) numbers per step instead of
# O(batch × d), and the query side is processed in chunks sized by `memory_budget`, so
# peak memory grows like the model, not like d × k. `benchmarks/bench_projection.py`
# measures it for MLPs of 1M, 5M and 25M parameters.
