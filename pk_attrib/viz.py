"""Plots of decompositions.

matplotlib is imported inside each function (``pip install 'pk-attrib[viz]'``); each takes
``ax=None`` (a new figure) and returns the Axes it drew on.

Colours: proponents (positive contributions) are blue, opponents (negative) are orange.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decomposition import Decomposition

PROPONENT = "#1f77b4"
OPPONENT = "#ff7f0e"
NEUTRAL = "#7f7f7f"


def _np(tensor):
    return torch.as_tensor(tensor).detach().cpu().numpy()


def _axes(ax, figsize=(6, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def waterfall(
    dec: Decomposition,
    query: int = 0,
    k: int = 8,
    labels: Sequence[str] | None = None,
    ax=None,
):
    """A waterfall from the bias to the prediction through the k largest contributions.

    Args:
        dec: A decomposition.
        query: Which query (row) to draw.
        k: How many contributions to draw individually (by |c_i|); the rest are one bar.
        labels: Optional label per training example, shown in the bar names.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes. Bars are in drawing order: bias, the k examples, "other", and delta;
        ``ax.patches`` holds them and the final cumulative value is the prediction.
    """
    ax = _axes(ax, (7, 0.45 * (k + 4) + 1))
    c = dec.contributions[query].double().cpu()
    top = torch.argsort(c.abs(), descending=True)[:k]
    names = ["bias b(x)"]
    steps = [float(dec.bias[query])]
    for i in top.tolist():
        tag = f" ({labels[i]})" if labels is not None else ""
        names.append(f"train #{i}{tag}")
        steps.append(float(c[i]))
    names.append(f"{len(c) - len(top)} others")
    steps.append(float(c.sum() - c[top].sum()))
    names.append("delta")
    steps.append(float(dec.delta[query]))
    start, ends = 0.0, [0.0]
    for row, (name, value) in enumerate(zip(names, steps, strict=True)):
        left = 0.0 if row == 0 else start
        colour = NEUTRAL if row == 0 or name == "delta" else (PROPONENT if value >= 0 else OPPONENT)
        ax.barh(row, value, left=left, color=colour)
        start = value if row == 0 else start + value
        ends.append(start)
        ax.annotate(
            f"{value:+.3g}",
            (start, row),
            xytext=(3 if value >= 0 else -3, 0),
            textcoords="offset points",
            ha="left" if value >= 0 else "right",
            va="center",
            fontsize=8,
        )
    ax.axvline(float(dec.prediction[query]), color="black", linestyle="--", linewidth=1)
    ax.axvline(0.0, color=NEUTRAL, linewidth=0.8)
    lo, hi = min(ends), max(ends)
    pad = 0.2 * (hi - lo or 1.0)  # room for the value labels
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("explained output")
    ax.set_title(f"prediction {float(dec.prediction[query]):.3f} = bias + contributions + delta")
    return ax


def influential_images(
    query_image: torch.Tensor,
    train_images: torch.Tensor,
    dec: Decomposition,
    query: int = 0,
    k: int = 4,
    train_labels: Sequence | None = None,
    title: str | None = None,
    fig=None,
    query_label=None,
):
    """A query image beside its top-k proponents (blue) and opponents (orange).

    Args:
        query_image: The query as an image, (H, W) or (H, W, C).
        train_images: Training images indexed like the training set, (n_train, H, W[, C]).
        dec: A decomposition of that query.
        query: The query's row in ``dec``.
        k: Proponents and opponents to show.
        train_labels: Optional labels of the training examples.
        title: Figure title.
        fig: A matplotlib Figure to draw into (default: a new one).
        query_label: Optional true label of the query, shown above it with f(x).

    Returns:
        The list of Axes: the query, then k proponents, then k opponents.
    """
    import matplotlib.pyplot as plt

    top = dec.top_k(k)
    if fig is None:
        fig = plt.figure(figsize=(1.6 * (k + 1), 3.8), layout="constrained")
    grid = fig.subplots(2, k + 1, squeeze=False)
    axes = [grid[0, 0]]
    grid[0, 0].imshow(_np(query_image), cmap="gray_r")
    caption = "" if query_label is None else f": label {query_label}"
    grid[0, 0].set_title(f"query{caption}\nf(x)={float(dec.prediction[query]):.2f}", fontsize=9)
    grid[1, 0].axis("off")
    for row, (ranked, colour, word) in enumerate(
        [(top.proponents, PROPONENT, "+"), (top.opponents, OPPONENT, "−")]
    ):
        for j in range(k):
            ax = grid[row, j + 1]
            i = int(ranked.indices[query, j])
            ax.imshow(_np(train_images[i]), cmap="gray_r")
            label = f" y={train_labels[i]}" if train_labels is not None else ""
            ax.set_title(
                f"#{i}{label}\n{float(ranked.values[query, j]):+.3f}", fontsize=8, color=colour
            )
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
            axes.append(ax)
        grid[row, 1].set_ylabel("proponents" if word == "+" else "opponents", color=colour)
    for ax in grid.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return axes


def completeness(dec: Decomposition, ax=None):
    """Prediction against bias + Σ contributions, one point per query (on the diagonal).

    Returns:
        The Axes; its first collection holds the points (x: prediction, y: the sum).
    """
    ax = _axes(ax, (4.5, 4.5))
    pred = dec.prediction.double().cpu()
    total = (dec.bias + dec.contributions.sum(-1)).double().cpu()
    lo, hi = float(min(pred.min(), total.min())), float(max(pred.max(), total.max()))
    ax.plot([lo, hi], [lo, hi], color=NEUTRAL, linewidth=1, zorder=0)
    ax.scatter(_np(pred), _np(total), s=18, color=PROPONENT)
    worst = float(dec.relative_delta.max()) if len(pred) else 0.0
    ax.set_xlabel("prediction f(x)")
    ax.set_ylabel("bias + Σ contributions")
    ax.set_title(f"completeness (max |delta|/|change| = {worst:.1e})")
    return ax


def kernel_by_class(
    kernel: torch.Tensor,
    query_labels: Sequence[int],
    train_labels: Sequence[int],
    ax=None,
):
    """Mean path kernel between query classes (rows) and training classes (columns).

    Args:
        kernel: K(x, x_i), (n_test, n_train); for a multi-output kernel (n_test, n_train, C)
            the component of each training example's own label is used, i.e. how much the
            query's explained output moves with example i's own logit.
        query_labels: Class of each query.
        train_labels: Class of each training example.
        ax: Axes to draw on.

    Returns:
        The Axes; ``ax.images[0].get_array()`` is the (n_query_classes, n_train_classes) mean.
    """
    ax = _axes(ax, (5.5, 4.5))
    q = torch.as_tensor(list(query_labels))
    t = torch.as_tensor(list(train_labels))
    if kernel.dim() == 3:
        kernel = kernel.gather(2, t.to(kernel.device)[None, :, None].expand(len(kernel), -1, 1))[
            ..., 0
        ]
    qc, tc = torch.unique(q), torch.unique(t)
    means = torch.stack(
        [torch.stack([kernel[q == a][:, t == b].double().mean() for b in tc]) for a in qc]
    )
    limit = float(means.abs().max()) or 1.0
    image = ax.imshow(_np(means), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(tc)), [str(int(b)) for b in tc])
    ax.set_yticks(range(len(qc)), [str(int(a)) for a in qc])
    ax.set_xlabel("training class")
    ax.set_ylabel("query class")
    ax.set_title("mean path kernel K(x, x_i)")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    return ax


def self_influence_roc(
    scores: torch.Tensor, flipped: torch.Tensor, ax=None, label: str = "pk_attrib"
):
    """ROC curve of ranking training examples by self-influence against known flipped labels.

    Args:
        scores: Self-influence, (n_train,) (higher = more suspicious).
        flipped: Bool (n_train,): which labels were flipped.
        ax: Axes to draw on; call again with the same ax to add another method.
        label: Legend label.

    Returns:
        The Axes; the curve's data is ``ax.lines[-1].get_xydata()`` (FPR, TPR).
    """
    ax = _axes(ax, (4.5, 4.5))
    order = torch.argsort(scores.double().cpu(), descending=True)
    hits = flipped.cpu()[order].double()
    tpr = torch.cat([torch.zeros(1), hits.cumsum(0) / hits.sum().clamp_min(1)])
    fpr = torch.cat([torch.zeros(1), (1 - hits).cumsum(0) / (1 - hits).sum().clamp_min(1)])
    auc = float(torch.trapezoid(tpr, fpr))
    if not ax.lines:
        ax.plot([0, 1], [0, 1], color=NEUTRAL, linewidth=1, linestyle=":")
    ax.plot(_np(fpr), _np(tpr), label=f"{label} (AUC {auc:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (flipped labels found)")
    ax.set_title("mislabel detection by self-influence")
    ax.legend(loc="lower right")
    return ax
