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

from . import metric_label, styled

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
    bounds = getattr(explanation, "boundaries", {}).get(getattr(explanation, "metric", ""), ())
    has_terms = bool(bounds) and hasattr(bounds[0], "jump") and not explanation.batch_gd
    has_profile = bool(getattr(explanation, "profile", ()))
    extra = int(has_terms) + int(has_profile)
    fig = Figure(figsize=(7.5, 3.2 * len(metrics) + 3.0 * extra + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(metrics) + extra, 1)
    axes = [fig.add_subplot(grid[0])]
    axes += [fig.add_subplot(grid[i], sharex=axes[0]) for i in range(1, len(metrics))]
    axes = np.array(axes)
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
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel(metric_label("step") + "; dotted: epoch boundaries")
    axes[-1].legend(handles=axes[0].get_legend_handles_labels()[0], loc="upper center", bbox_to_anchor=(0.5, -0.28),
                    ncols=2, fontsize=8, frameon=False)
    row = len(metrics)
    if has_terms:
        _draw_terms(fig.add_subplot(grid[row]), explanation, bounds)
        row += 1
    if has_profile:
        _draw_profiles(fig.add_subplot(grid[row]), explanation)
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


# Artifact terms in warm colours, the model's real change in blues, the unexplained rest in grey.
TERM_STYLES = {
    "averaging_term": ("#d95f02", "averaging (artifact)"),
    "train_mode_term": ("#f4a259", "train mode (artifact)"),
    "reexposure_term": ("#e7298a", "re-exposure (artifact)"),
    "schedule_term": ("#1b4f9c", "schedule (real)"),
    "optimizer_state_term": ("#6a8fd0", "optimizer state (real)"),
    "progress_term": ("#1b9e77", "other progress (real)"),
    "unexplained": ("0.7", "unexplained (draw of the batches)"),
}


def _draw_terms(ax, explanation: Any, bounds: Any) -> None:
    """At each boundary one stacked bar per sign: the jump's terms, and the observed jump as a dot."""
    epochs = np.array([b.epoch for b in bounds], dtype=float)
    up, down = np.zeros(len(bounds)), np.zeros(len(bounds))
    for name, (color, label) in TERM_STYLES.items():
        values = np.array([getattr(b, name) for b in bounds], dtype=float)
        values = np.where(np.isfinite(values), values, 0.0)
        base = np.where(values >= 0, up, down)
        ax.bar(epochs, values, bottom=base, width=0.6, color=color, label=label,
               hatch="//" if name == "unexplained" else None, edgecolor="white", linewidth=0.4)
        up, down = up + np.clip(values, 0, None), down + np.clip(values, None, 0)
    jumps = np.array([b.jump for b in bounds], dtype=float)
    ax.plot(epochs, jumps, "o", color="black", markersize=5, label="observed jump", zorder=3)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(epochs, [f"{int(e)} to {int(e) + 1}" for e in epochs])
    ax.set_xlabel("epoch boundary")
    noun = "accuracy" if explanation.metric == "acc" else "loss"
    window = getattr(explanation, "window", 1)
    ax.set_ylabel(f"jump of the running {noun}")
    ax.set_title(f"The jump after {window} batch{'es' if window > 1 else ''} of each new epoch, as a sum of terms",
                 fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7, frameon=False, ncols=3)


def _draw_profiles(ax, explanation: Any) -> None:
    """The per-batch loss's sawtooth shape: residual to a one-epoch moving average, by position in the epoch."""
    profiles = [("as trained", explanation.profile)]
    profiles += [(c.name, c.profile) for c in getattr(explanation, "counterfactuals", ()) if c.profile]
    colors = ["black", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
    for (name, profile), color in zip(profiles, colors):
        x = (np.arange(len(profile)) + 0.5) / len(profile)
        ax.plot(x, profile, color=color, linewidth=2.0 if name == "as trained" else 1.3, label=name)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("position in the epoch (fraction of its batches)")
    ax.set_ylabel("batch loss minus trend")
    ax.set_title("Per-batch sawtooth: batch loss by position in the epoch, trend removed", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7, frameon=False, ncols=3)
