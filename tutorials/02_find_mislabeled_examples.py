# %% [markdown]
# # 2. Find mislabeled training examples with self-influence
#
# Real datasets contain wrong labels. A classic way to find them is **self-influence**: how
# much a training example helped *itself*, i.e. how much the training steps that used it
# lowered its own loss. A correctly labeled "7" looks like the other sevens, so the model
# fits it for free while learning from them. A "7" labeled "2" contradicts everything else;
# the only thing that pulls the model towards calling it a 2 is the example itself, so its
# self-influence is large.
#
# In this tutorial we:
#
# 1. flip the labels of 10 % of a digits training set (so we know the truth);
# 2. train a small network with plain SGD, recording the path with `pk.PathRecorder` and,
#    like many existing projects, also saving a checkpoint at the end of each epoch;
# 3. rank the training examples by self-influence three ways:
#    - **exact** (pk_attrib on the recorded path): each example's exact contribution to the
#      decrease of its own loss, summed over every step that used it;
#    - **TracInCP** (Captum, on the epoch checkpoints): Σ_k η_k ‖∇ℓ_i(w_k)‖², the TracIn
#      approximation that only looks at a few checkpoints;
#    - **pk_attrib checkpoint mode** on the same checkpoints, which computes TracIn's number;
# 4. measure how well each ranking finds the flipped labels (ROC AUC, and the fraction
#    caught when a person inspects the top 10 % of the ranking).

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from captum.influence import TracInCP
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
from pk_attrib import viz

out = Path(os.environ.get("PK_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="pk_tutorial_"))
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: extra threads cost more than they save
torch.manual_seed(0)

# %% [markdown]
# ## A training set with 10 % wrong labels
#
# 1000 real 8×8 digits. We pick 100 of them with a seeded generator and replace each label
# by a different, random class. `flipped` remembers which ones: in real life you would not
# have it, here it lets us score the rankings.

# %%
digits = load_digits()
x = torch.tensor(digits.data[:1000], dtype=torch.float64) / 16
true_y = torch.tensor(digits.target[:1000])
n = len(x)

g = torch.Generator().manual_seed(0)
chosen = torch.randperm(n, generator=g)[: n // 10]
noisy_y = true_y.clone()
noisy_y[chosen] = (true_y[chosen] + torch.randint(1, 10, (len(chosen),), generator=g)) % 10
flipped = noisy_y != true_y
train = TensorDataset(x, noisy_y)
print(f"{n} training examples, {int(flipped.sum())} labels flipped")

# %% [markdown]
# ## Train with plain SGD, record the path, save epoch checkpoints
#
# Plain SGD (no momentum) makes exact self-influence cheap: each step's update is built from
# its batch alone, so an example's self-influence only needs that example's own gradients at
# the steps that used it. (Momentum and Adam work too, at the price of more computation.)
#
# The checkpoint files hold the state dict and the learning rate, the way TracIn users save
# them. The recorder and the checkpoints watch **the same run**, so the comparison is fair.

# %%
model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
lr, epochs = 0.5, 10
optimizer = torch.optim.SGD(model.parameters(), lr=lr)
loss_fn = torch.nn.CrossEntropyLoss()
loader = DataLoader(train, batch_size=32, shuffle=True)
ckpt_dir = out / "02_checkpoints"
ckpt_dir.mkdir(exist_ok=True)
files = []

start = time.perf_counter()
with pk.PathRecorder(model, optimizer) as recorder:
    for epoch in range(epochs):
        for xb, yb in recorder.watch(loader):
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
        files.append(str(ckpt_dir / f"epoch_{epoch:02d}.pt"))
        torch.save({"model_state_dict": model.state_dict(), "lr": lr}, files[-1])
model.eval()
path = recorder.path
with torch.no_grad():
    fits = model(x).argmax(1)
print(path, f"({time.perf_counter() - start:.1f} s)")
print(
    f"the model agrees with {float((fits == noisy_y)[~flipped].double().mean()):.1%} of the "
    f"clean labels and {float((fits == noisy_y)[flipped].double().mean()):.1%} of the "
    "flipped ones"
)

# %% [markdown]
# The model agrees with most clean labels and few of the flipped ones: after 10 epochs it has
# not memorized the noise (yet). Their loss stays high, their gradients stay large.
#
# ## Exact self-influence
#
# `self_influence(score="contribution")` returns one score per training example, shape
# `(n_train,)`, ordered like the dataset. With the recorded path it is exact: the score of
# example i is its contribution c_i(x_i) to the decrease of its own loss ℓ_i along the whole
# path, computed with the same decomposition as tutorial 1 (with −loss as the explained
# output). (`self_influence()` without `score=` returns the counterfactual score on a
# recorded path: how much upweighting the example lowers its own final loss through the
# whole run; see the README.)

# %%
explainer = pk.PathKernelInfluence(model, train, path, loss_fn=loss_fn, show_progress=False)
start = time.perf_counter()
exact = explainer.self_influence(score="contribution")
print(f"exact self-influence: shape {tuple(exact.shape)} ({time.perf_counter() - start:.1f} s)")
print(f"  mean over clean examples   {float(exact[~flipped].mean()):8.4f}")
print(f"  mean over flipped examples {float(exact[flipped].mean()):8.4f}")

# %% [markdown]
# ## TracInCP on the epoch checkpoints (Captum)
#
# TracInCP approximates the same quantity from the checkpoints only: at each checkpoint k it
# takes the squared norm of the example's loss gradient, weighted by the learning rate that
# `checkpoints_load_func` returns. Captum wants a loss with `reduction="none"` for
# per-example gradients. We hand it a separate copy of the model, because TracInCP loads the
# checkpoints into the model it is given.


# %%
def load_checkpoint(net, file):
    state = torch.load(file, weights_only=True)
    net.load_state_dict(state["model_state_dict"])
    return state["lr"]


tracin_model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
tracin = TracInCP(
    tracin_model,
    train,
    checkpoints=files,
    checkpoints_load_func=load_checkpoint,
    loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
    batch_size=250,
)
start = time.perf_counter()
tracin_scores = tracin.self_influence(show_progress=False)
print(
    f"TracInCP self-influence: shape {tuple(tracin_scores.shape)} "
    f"({time.perf_counter() - start:.1f} s)"
)

# %% [markdown]
# ## pk_attrib's checkpoint mode on the same checkpoints
#
# If you only have checkpoints, `pk.TrainingPath.from_checkpoints(files, learning_rates)`
# builds an approximate path from them; `PathKernelInfluence` then runs in *checkpoint
# mode*, which is TracIn. It reproduces Captum's numbers.

# %%
ckpt_path = pk.TrainingPath.from_checkpoints(files, learning_rates=lr, model=model)
print(ckpt_path)
ckpt_explainer = pk.PathKernelInfluence(
    model, train, ckpt_path, loss_fn=loss_fn, show_progress=False
)
start = time.perf_counter()
ckpt_scores = ckpt_explainer.self_influence()
print(
    f"checkpoint-mode self-influence ({time.perf_counter() - start:.1f} s); "
    f"equal to TracInCP: {torch.allclose(ckpt_scores, tracin_scores.to(ckpt_scores))}"
)

# %% [markdown]
# ## How well does each ranking find the flipped labels?
#
# Two numbers per method:
#
# - **ROC AUC**: the probability that a random flipped example is ranked above a random
#   clean one (1 = perfect, 0.5 = chance);
# - **found in the top 10 %**: if someone re-labels the 100 highest-ranked examples by hand,
#   which fraction of the 100 flipped labels do they fix?

# %%
results = {
    "exact (recorded path)": exact,
    "TracInCP (10 checkpoints)": tracin_scores.to(exact),
    "pk checkpoint mode": ckpt_scores,
}
budget = n // 10
for name, scores in results.items():
    auc = roc_auc_score(flipped.numpy(), scores.numpy())
    top = torch.argsort(scores, descending=True)[:budget]
    found = float(flipped[top].sum()) / float(flipped.sum())
    print(f"{name:>26}: ROC AUC {auc:.3f}, found in the top 10 %: {found:.0%}")

# %% [markdown]
# Both approaches separate the flipped labels well; compare the numbers above. They measure
# related but different things. TracIn samples the squared gradient norm at ten snapshots
# (the end of each epoch) and counts every example at every snapshot. The exact score
# follows the example through the steps that really used it, at the weights of that
# moment, and integrates along each step. A flipped example's loss changes a lot during an
# epoch, so snapshots taken at epoch ends miss part of its story, and the rankings can
# disagree; the exact ranking is the one whose scores add up (each is a term of a complete
# decomposition of the loss decrease).
#
# ## The ROC curves
#
# `viz.self_influence_roc` draws one curve per call; calling it again on the same axes
# overlays another method. (Checkpoint mode equals TracInCP, so we draw only one of them.)

# %%
ax = viz.self_influence_roc(exact, flipped, label="pk_attrib exact")
viz.self_influence_roc(tracin_scores, flipped, ax=ax, label="Captum TracInCP")
ax.figure.savefig(out / "02_self_influence_roc.png", dpi=110)
plt.close(ax.figure)
print("wrote", out / "02_self_influence_roc.png")

# %% [markdown]
# ## Look at what was flagged
#
# Top row: the 8 training examples with the highest exact self-influence, with the label
# they were given and (for this demo) the true one; red titles are flipped labels. Bottom
# row: the highest-ranked examples whose label is *correct*. These false alarms are worth a
# look too: they tend to be badly written or ambiguous digits, the other thing a data
# cleaner wants to find.

# %%
ranking = torch.argsort(exact, descending=True)
rows = [ranking[:8], ranking[~flipped[ranking]][:8]]
fig, axes = plt.subplots(2, 8, figsize=(10, 3.8), layout="constrained")
for row, picked in zip(axes, rows, strict=True):
    for ax, i in zip(row, picked.tolist(), strict=True):
        rank = int((ranking == i).nonzero()[0, 0]) + 1
        ax.imshow(x[i].reshape(8, 8).numpy(), cmap="gray_r")
        ax.set_title(
            f"rank {rank}: #{i}\ngiven {int(noisy_y[i])}, true {int(true_y[i])}",
            fontsize=8,
            color="tab:red" if flipped[i] else "black",
        )
        ax.set_xticks([])
        ax.set_yticks([])
axes[0, 0].set_ylabel("top ranked", fontsize=9)
axes[1, 0].set_ylabel("top clean", fontsize=9)
fig.suptitle("highest exact self-influence (red: flipped label)", fontsize=10)
fig.savefig(out / "02_top_self_influence.png", dpi=110)
plt.close(fig)
print("flipped among the top 8:", int(flipped[ranking[:8]].sum()))
print(
    "ranks of the first clean examples:",
    [int((ranking == i).nonzero()[0, 0]) + 1 for i in rows[1].tolist()],
)
print("wrote", out / "02_top_self_influence.png")

# %% [markdown]
# ## Recap
#
# - `explainer.self_influence()` ranks training examples; high = the model had to work to
#   fit them, which flags wrong labels;
# - with a recorded path the scores are exact; with only checkpoints,
#   `pk.TrainingPath.from_checkpoints` gives TracIn's scores (identical to Captum's TracInCP);
# - plain SGD makes the exact scores cheap; momentum and Adam are supported too.
