"""The figure of ``batchlab explain``: why the running mean jumps at epoch boundaries.

Against steps, with the epoch boundaries marked, every view of the training metric: the per-batch
values (faint), the running mean a Keras log shows (saw-tooth, reset at each boundary), the true
training metric (full pass in eval mode), the train-mode full pass (dropout on, batch norm on batch
statistics) and validation. The running mean jumps at each boundary; the true curves go straight
through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import metric_label, new_figure, styled

# One colour per view, the same in both panels.
VIEW_STYLES = {
    "batch": {"color": "0.55", "linewidth": 0.6, "alpha": 0.35, "label": "batch value (train mode, before update)"},
    "running": {"color": "#d95f02", "linewidth": 1.8, "label": "running mean (what Keras shows)"},
    "train": {"color": "#1b4f9c", "linewidth": 1.8, "label": "train, full pass (eval mode): the true metric"},
    "train_mode": {"color": "#6a8fd0", "linewidth": 1.3, "linestyle": "--", "label": "train, full pass in train mode"},
    "val": {"color": "#1b9e77", "linewidth": 1.4, "label": "validation, full pass"},
}

_LABEL_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


@styled
def explain_figure(
    steps: pd.DataFrame,
    evals: pd.DataFrame,
    explanation: Any = None,
    *,
    title: str | None = None,
) -> Figure:
    """Loss and accuracy panels of every metric view against steps, epoch boundaries dotted.

    Args:
        steps: the run's step table (``step``, ``epoch``, ``batch_*``, ``running_*``).
        evals: its evaluation table (``step``, ``train_*``, ``train_mode_*``, ``val_*``).
        explanation: an `batchlab.explain.Explanation`; its first boundary's jump and lag are
            marked on the panel of its metric.
        title: the figure's title (default: batch size and steps per epoch).

    Returns:
        A figure with a loss panel and, for classification, an accuracy panel below it.
    """
    metrics = [m for m in ("loss", "acc") if f"running_{m}" in steps]
    fig, axes = new_figure(len(metrics), 1, size=(7.5, 3.2 * len(metrics) + 0.6), sharex=True)
    axes = np.atleast_1d(axes)
    steps = steps.sort_values("step")
    evals = evals.sort_values("step")
    per_epoch = steps.groupby("epoch")["step"].max()
    for ax, metric in zip(axes, metrics):
        _draw_views(ax, steps, evals, metric)
        for boundary in per_epoch.iloc[:-1]:
            ax.axvline(boundary + 0.5, color="0.25", linestyle=":", linewidth=0.9, zorder=0)
        ax.set_ylabel(metric_label(metric))
        if explanation is not None and metric == explanation.metric:
            _mark_first_boundary(ax, explanation)
    axes[-1].set_xlabel(metric_label("step") + "; dotted: epoch boundaries")
    fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside lower center", ncols=2, fontsize=8)
    if title is None:
        batch = int(steps["batch_size"].iloc[0])
        spe = int(steps.groupby("epoch")["step"].count().max())
        title = f"Epoch-boundary jump: B={batch}, {spe} steps/epoch"
    fig.suptitle(title)
    return fig


def _draw_views(ax, steps: pd.DataFrame, evals: pd.DataFrame, metric: str) -> None:
    ax.plot(steps["step"], steps[f"batch_{metric}"], **VIEW_STYLES["batch"])
    # One line per epoch, so the saw-tooth is not joined across the reset.
    for index, (_, rows) in enumerate(steps.groupby("epoch")):
        style = dict(VIEW_STYLES["running"])
        if index:
            style.pop("label")
        ax.plot(rows["step"], rows[f"running_{metric}"], **style)
    for view in ("train", "train_mode", "val"):
        column = f"{view}_{metric}"
        if column in evals and evals[column].notna().any():
            present = evals[evals[column].notna()]
            ax.plot(present["step"], present[column], **VIEW_STYLES[view])


def _mark_first_boundary(ax, explanation: Any) -> None:
    bounds = explanation.boundaries.get(explanation.metric, ())
    if not bounds or explanation.batch_gd:
        return
    b = bounds[0]
    ax.annotate("", xy=(b.step + 1, b.running_start), xytext=(b.step + 1, b.running_end),
                arrowprops={"arrowstyle": "->", "color": VIEW_STYLES["running"]["color"], "linewidth": 1.2})
    ax.annotate(f"jump {b.running_jump:+.3f}\ntrue change {b.true_change:+.3f}", xy=(b.step + 1, b.running_start),
                xytext=(8, 0), textcoords="offset points", fontsize=8, va="center",
                color=VIEW_STYLES["running"]["color"], bbox=_LABEL_BOX)
    ax.annotate("", xy=(b.step, b.true_end), xytext=(b.step, b.running_end),
                arrowprops={"arrowstyle": "<->", "color": "0.3", "linewidth": 0.9, "shrinkA": 0, "shrinkB": 0})
    ax.annotate(f"lag {b.lag:+.3f}", xy=(b.step, (b.true_end + b.running_end) / 2), xytext=(-6, 0),
                textcoords="offset points", fontsize=8, ha="right", va="center", color="0.3", bbox=_LABEL_BOX)
