# %% [markdown]
# # 1. Explain a prediction with the training examples that made it
#
# A classifier says "this image is a 3". Which of the images it was *trained on* made it say
# so, and by how much? This tutorial answers that question exactly, for a small network
# trained on handwritten digits.
#
# **The idea in one paragraph.** Gradient descent builds the final weights step by step:
# every step moves the weights a little in the direction that lowers the loss of the
# examples in the current mini-batch. So every change of the model's output on a test image
# x can be traced back to the training examples whose gradients caused it. Adding up those
# changes over the whole run gives
#
#     f(x) = b(x) + Σ_i c_i(x)
#
# where f(x) is the output we explain (here: one logit of the final model), b(x) is the
# **bias** (what the model said before training, plus anything no training example caused,
# such as weight decay) and c_i(x) is the **contribution** of training example i, in the
# same units as f(x). Positive c_i pushed the output up (a *proponent*), negative pulled it
# down (an *opponent*).
#
# Domingos (2020) showed that c_i(x) = a_i(x) K(x, x_i), where K is the **path kernel**: the
# similarity of x and x_i as the network saw them (a dot product of their gradients),
# averaged along the path the weights took during training. That is why pk_attrib needs the
# path: we record it while training, with one extra line in the training loop.
#
# What you will see:
#
# 1. record a training run with `pk.PathRecorder`;
# 2. decompose predictions with `PathKernelInfluence.attribute` and check **completeness**:
#    bias + Σ contributions reproduces the prediction to ~1e-10;
# 3. draw a waterfall, the most influential training images, the path kernel by class and
#    a completeness scatter;
# 4. explain another quantity than a logit (a log-probability) with `output_fn`.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import pk_attrib as pk
from pk_attrib import viz

out = Path(os.environ.get("PK_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="pk_tutorial_"))
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: extra threads cost more than they save
torch.manual_seed(0)

# %% [markdown]
# ## The data and the model
#
# `load_digits` holds 1797 real handwritten digits of 8×8 pixels (values 0..16, scaled here
# to 0..1). We train on the first 800 and explain images from the end of the set, which the
# model never saw. Everything is float64 so that the completeness check below is visibly
# exact rather than limited by float32 rounding.
#
# The training set is a `TensorDataset` of `(image, label)` pairs: pk_attrib refers to
# training examples by their **index in this dataset**, so keep it (and its order) around.

# %%
digits = load_digits()
x_all = torch.tensor(digits.data, dtype=torch.float64) / 16
y_all = torch.tensor(digits.target)
train = TensorDataset(x_all[:800], y_all[:800])
train_x, train_y = train.tensors
test_x, test_y = x_all[1500:], y_all[1500:]
print(f"{len(train)} training images, {len(test_x)} test images, {train_x.shape[1]} pixels")

model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()

# %% [markdown]
# ## Record the training path
#
# This is an ordinary training loop with one change: we iterate over
# `recorder.watch(loader)` instead of `loader`. The recorder hooks the optimizer and keeps,
# for every step, the weights before the step and the dataset indices of the batch
# (shuffling is fine: it reads them from the loader's sampler). `store=None` keeps the path
# in memory; pass a folder (`store="runs/exp"`) to write it to disk and reload it later with
# `pk.TrainingPath.load`.
#
# SGD with momentum is supported exactly, and so are Adam and AdamW.

# %%
loader = DataLoader(train, batch_size=32, shuffle=True)
with pk.PathRecorder(model, optimizer, store=None) as recorder:
    for _epoch in range(3):
        for xb, yb in recorder.watch(loader):  # <- the one-line change
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
model.eval()
path = recorder.path
with torch.no_grad():
    accuracy = float((model(test_x).argmax(1) == test_y).double().mean())
print(path)
print(f"test accuracy after 3 epochs: {accuracy:.1%}")

# %% [markdown]
# ## Decompose predictions
#
# `PathKernelInfluence` takes the trained model, the training set the recorder watched, the
# path and the training loss (it needs the loss to recompute each example's gradient at
# each step). `attribute(inputs, target=...)` explains one logit per query, chosen by
# `target` exactly as in Captum: here, the class the model predicts.
#
# The result is a `pk.Decomposition`. Its `contributions` are shaped
# `(n_test, n_train)`: one row per query, one column per training example.

# %%
explainer = pk.PathKernelInfluence(model, train, path, loss_fn=loss_fn, show_progress=False)
queries = test_x[:6]
with torch.no_grad():
    predicted = model(queries).argmax(1)
dec = explainer.attribute(queries, target=predicted)
print(dec)
print("contributions:", tuple(dec.contributions.shape))

# %% [markdown]
# ## Completeness: the parts add up to the prediction
#
# For each query the decomposition satisfies
# `prediction = bias + contributions.sum(-1) + delta`. `delta` is what is left over; it is
# not a fudge factor but a **measured error**: the only approximation is a numerical
# integral along each optimizer step (Gauss–Legendre quadrature, refined until each step's
# change is reproduced), so `delta` is tiny. `relative_delta` divides it by how much
# training changed the output.

# %%
print(" query  true  pred   prediction        bias       Σ c_i        delta   rel. delta")
for q in range(len(queries)):
    print(
        f"{q:6d} {int(test_y[q]):5d} {int(predicted[q]):5d} {float(dec.prediction[q]):12.6f}"
        f" {float(dec.bias[q]):11.6f} {float(dec.contributions[q].sum()):11.6f}"
        f" {float(dec.delta[q]):12.2e} {float(dec.relative_delta[q]):12.2e}"
    )
print("bias terms:", {k: round(float(v[0]), 6) for k, v in dec.terms.items()})
print(
    "quadrature nodes per step (min/max):",
    dec.diagnostics.nodes.min().item(),
    dec.diagnostics.nodes.max().item(),
)

# %% [markdown]
# `terms` splits the bias. Here it is just the untrained model's logit (`"initial"`): the
# optimizer has no weight decay, and every step is rebuilt exactly from the example
# gradients, so nothing is `"unexplained"`. Everything training added to the logit is
# carried by the 800 contributions. (`diagnostics.nodes` is how many quadrature points
# each step needed to reach that precision.)
#
# ## Who pushed, and who pulled?
#
# `top_k(k)` gives the strongest proponents (largest c_i) and opponents (most negative) for
# each query, as `(indices, values)` pairs shaped (n_test, k). Query 0 is worth a look: the
# table above shows whether the model got it right (in this run it calls a 1 a 3). Below,
# each example is printed as (training index, its label, contribution). Grouping the
# contributions by the label of the training example shows the big picture: images of
# the explained class push its logit up, most other classes pull it down.

# %%
q = 0
top = dec.top_k(5)
print(f"query 0: label {int(test_y[q])}, explaining the logit of class {int(predicted[q])}")
print(
    "  proponents:",
    [
        (int(i), int(train_y[i]), round(float(v), 3))
        for i, v in zip(top.proponents.indices[q], top.proponents.values[q], strict=True)
    ],
)
print(
    "  opponents: ",
    [
        (int(i), int(train_y[i]), round(float(v), 3))
        for i, v in zip(top.opponents.indices[q], top.opponents.values[q], strict=True)
    ],
)
by_class = torch.zeros(10, dtype=torch.float64).index_add_(0, train_y, dec.contributions[q])
print(
    "  sum of contributions by training label:",
    {c: round(float(v), 2) for c, v in enumerate(by_class)},
)

# %% [markdown]
# ## A waterfall: from the bias to the prediction
#
# The waterfall starts at the bias, adds the largest contributions one by one (blue: up,
# orange: down), lumps all the others into one bar, adds `delta`, and lands on the
# prediction (dashed line). The labels show each training example's index and label.

# %%
ax = viz.waterfall(dec, query=q, k=10, labels=[f"y={int(t)}" for t in train_y])
ax.figure.savefig(out / "01_waterfall.png", dpi=110)
plt.close(ax.figure)
print("wrote", out / "01_waterfall.png")

# %% [markdown]
# Note how much the "others" bar carries: a prediction is rarely made by a handful of
# examples; it is the sum of many small pushes. The individual top examples are still the
# most informative ones to look at.
#
# ## The most influential training images
#
# The same information as pictures: the query on the left, its top proponents in the first
# row and its top opponents in the second, each with its index, label and contribution.

# %%
images = train_x.reshape(-1, 8, 8)
for q in range(2):
    fig = plt.figure(figsize=(9, 4), layout="constrained")
    viz.influential_images(
        queries[q].reshape(8, 8),
        images,
        dec,
        query=q,
        k=5,
        train_labels=train_y.tolist(),
        title=f"test image (label {int(test_y[q])}): logit of class {int(predicted[q])}",
        fig=fig,
    )
    fig.savefig(out / f"01_influential_images_{q}.png", dpi=110)
    plt.close(fig)
print("wrote", out / "01_influential_images_0.png", "and _1")

# %% [markdown]
# Proponents are typically images of the explained class written in a similar way;
# opponents are often images of *other* digits that share strokes with the query: training
# the model to call them something else lowered this logit. For a misclassified query this
# is where to look for the reason (a similar-looking training image of the wrong class, or a
# mislabeled one; tutorial 2 hunts for those).
#
# ## The kernel view: K(x, x_i) and a_i(x)
#
# Each contribution factors into a **similarity** and a **weight**: c_i(x) = a_i(x)·K(x, x_i)
# (for a 10-class model K is a 10-vector, one entry per output of x_i, and the product is a
# dot product). K(x, x_i) measures how much a step that moves example i's output moves the
# query's output, accumulated along the path; a_i is how hard the loss pushed example i.
# Computing K costs 10 extra gradients per training example and step, so it is opt-in:
# `attribute(..., kernel=True)`.
#
# We explain 5 test images of each class, then average the kernel by (query class,
# training class): a block-diagonal picture means the network learned a similarity in which
# digits of the same class are close.

# %%
pick = torch.cat([torch.nonzero(test_y == c)[:5, 0] for c in range(10)])
kq, ky = test_x[pick], test_y[pick]
kdec = explainer.attribute(kq, target=ky, kernel=True)
print("kernel:", tuple(kdec.kernel.shape), " weights:", tuple(kdec.weights.shape))
rebuilt = (kdec.weights * kdec.kernel).sum(-1)
print("max |Σ_c a_ic K_c − c_i|:", f"{float((rebuilt - kdec.contributions).abs().max()):.1e}")

ax = viz.kernel_by_class(kdec.kernel, ky.tolist(), train_y.tolist())
ax.figure.savefig(out / "01_kernel_by_class.png", dpi=110)
plt.close(ax.figure)
print("wrote", out / "01_kernel_by_class.png")

# %% [markdown]
# ## Completeness on many queries
#
# One point per query: the prediction against bias + Σ contributions. All 50 points sit on
# the diagonal; the title reports the largest relative `delta`.

# %%
ax = viz.completeness(kdec)
ax.figure.savefig(out / "01_completeness.png", dpi=110)
plt.close(ax.figure)
print(f"max relative delta over {len(kq)} queries: {float(kdec.relative_delta.max()):.1e}")
print("wrote", out / "01_completeness.png")

# %% [markdown]
# ## Explaining something else than a logit: `output_fn`
#
# A logit is not a probability. To explain the **log-probability** of the predicted class,
# pass `output_fn(outputs, target) -> (n,)`; it must work on any number of rows (pk_attrib
# also calls it on single rows). The decomposition is just as complete, now in units of
# log-probability, and the ranking changes: the log-probability also rises when *other*
# logits fall, so examples of confusable classes count more.

# %%


def log_probability(outputs, target):
    return torch.log_softmax(outputs, dim=-1).gather(1, target[:, None])[:, 0]


ldec = explainer.attribute(queries, target=predicted, output_fn=log_probability)
with torch.no_grad():
    direct = log_probability(model(queries), predicted)
print("log p(predicted):", [round(float(v), 4) for v in ldec.prediction])
print("same as the model:", torch.allclose(ldec.prediction, direct))
print(f"max relative delta: {float(ldec.relative_delta.max()):.1e}")
print("top-5 proponents of query 0, logit:   ", dec.top_k(5).proponents.indices[0].tolist())
print("top-5 proponents of query 0, log-prob:", ldec.top_k(5).proponents.indices[0].tolist())

# %% [markdown]
# ## Recap
#
# - `pk.PathRecorder(model, optimizer)` + `recorder.watch(loader)` records the path;
# - `pk.PathKernelInfluence(model, train, path, loss_fn).attribute(x, target=...)` returns
#   `contributions (n_test, n_train)`, `bias`, `prediction` and `delta`, with
#   prediction = bias + Σ contributions + delta and delta at the level of rounding;
# - `kernel=True` adds the path kernel K(x, x_i) and the weights a_i(x);
# - `output_fn` explains any differentiable function of the outputs.
#
# Next: tutorial 2 uses the same machinery to find mislabeled training examples.
