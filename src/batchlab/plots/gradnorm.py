"""The gradient-norm experiment: how the norm of a mini-batch gradient depends on the batch size.

Takes a table with one row per (point of training, batch size):

======================  =======================================================================
``point``               where in training the gradients were taken (``epoch 2``, ``epoch 30``)
``batch_size``          B, a number
``sq_norm_mean``        mean over trials of ‖g_B‖², g_B the gradient of the batch's mean loss
``sq_norm_lo/_hi``      the spread of ``sq_norm_mean`` (e.g. ± two standard errors), optional
``grad_norm_mean``      mean over trials of ‖g_B‖, optional (a second panel)
``grad_norm_lo/_hi``    its spread, optional
``theory_sq_norm``      the theory's E‖g_B‖² at this B, optional (``theory_grad_norm`` likewise);
                        drawn dashed in the series' colour (`batchlab.gradnorm` writes both)
======================  =======================================================================

The theory (McCandlish et al. 2018, eq. 2.3): E‖g_B‖² = ‖G‖² + tr(Σ)/B for the mean loss, which
falls with B towards ‖G‖²; the gradient of the *summed* loss is B·g_B, whose squared norm
B²‖G‖² + B·tr(Σ) grows about linearly in B while B‖G‖² ≪ tr(Σ) (the claim quoted from Shen 2018).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import DataError
from . import batch_size_axis, metric_label, new_figure, styled


@styled
def gradnorm_figure(table: pd.DataFrame, theory: Mapping[str, tuple[float, float]] | None = None) -> Figure:
    """Mean squared gradient norm vs batch size, one series per point of training, log-log.

    Args:
        table: the columns of the module docstring.
        theory: ``{point: (‖G‖², tr(Σ))}``; each draws E‖g_B‖² = ‖G‖² + tr(Σ)/B in the series' colour.

    Returns:
        A figure: the squared norm panel, and a panel of ‖g_B‖ when ``grad_norm_mean`` is given.
        On each panel the error bars (``ax.containers``) hold the measured means, one per point.
    """
    missing = {"point", "batch_size", "sq_norm_mean"} - set(table.columns)
    if missing:
        raise DataError(f"the gradient-norm table lacks {', '.join(sorted(missing))}; it has {', '.join(table.columns)}")
    panels = [("sq_norm", "mean squared gradient norm E‖g_B‖²")]
    if "grad_norm_mean" in table:
        panels.append(("grad_norm", "mean gradient norm E‖g_B‖₂"))
    fig, axes = new_figure(1, len(panels), size=(6.4 if len(panels) == 1 else 10.0, 4.0))
    axes = np.atleast_1d(axes)
    colors = {}
    for ax, (prefix, ylabel) in zip(axes, panels):
        for i, (point, rows) in enumerate(table.groupby("point", sort=False)):
            rows = rows.sort_values("batch_size")
            sizes, means = rows["batch_size"].to_numpy(float), rows[f"{prefix}_mean"].to_numpy(float)
            spread = None
            if f"{prefix}_lo" in rows and f"{prefix}_hi" in rows:
                spread = np.vstack([means - rows[f"{prefix}_lo"].to_numpy(float), rows[f"{prefix}_hi"].to_numpy(float) - means])
            bars = ax.errorbar(sizes, means, yerr=spread, marker="o", capsize=3, label=str(point),
                               color=colors.get(point, f"C{i}"))  # fmt: skip
            colors[point] = bars.lines[0].get_color()
            theory_column = f"theory_{prefix}"
            if theory_column in rows and rows[theory_column].notna().any():  # the table carries its theory
                ax.plot(sizes, rows[theory_column].to_numpy(float), color=colors[point], linestyle="--",
                        label=f"{point}: theory")  # fmt: skip
            elif prefix == "sq_norm" and theory and point in theory:
                g_sq, trace = theory[point]
                grid = np.geomspace(sizes.min(), sizes.max(), 100)
                ax.plot(grid, g_sq + trace / grid, color=colors[point], linestyle="--",
                        label=f"{point}: ‖G‖² + tr(Σ)/B")  # fmt: skip
        ax.set_yscale("log")
        batch_size_axis(ax, np.unique(table["batch_size"].to_numpy(float)))
        ax.set_ylabel(ylabel)
        ax.legend(title="point of training")
    axes[0].set_title("Gradient norm vs batch size (mean loss)")
    return fig


# --- the two loss conventions, and the distance from the initial weights -------------------------


@styled
def loss_conventions_figure(table: pd.DataFrame) -> Figure:
    """‖g_B‖ of the mean loss and ‖Σ_{i∈B} g_i‖ of the summed loss vs batch size, log-log.

    The same trials in both panels (the summed-loss gradient is B·g_B); they show why the
    literature reports opposite trends: the mean-loss norm falls with B towards ‖G‖, the
    summed-loss norm grows (about as √B while B‖G‖² ≪ tr(Σ), then as B).

    Args:
        table: `batchlab.gradnorm.GradNormResult.table`: ``point, batch_size, grad_norm_mean,
            grad_norm_std, sum_norm_mean, sum_norm_std, theory_sq_norm`` (and optionally
            ``theory_sq_norm_iid``).

    Returns:
        A figure with two panels; the error bars (``ax.containers``) are ±1 standard deviation
        over the trials, one container per point of training; dashed lines are the theory.
    """
    needed = {"point", "batch_size", "grad_norm_mean", "grad_norm_std", "sum_norm_mean", "sum_norm_std", "theory_sq_norm"}
    missing = needed - set(table.columns)
    if missing:
        raise DataError(f"the gradient-norm table lacks {', '.join(sorted(missing))}; make it with batchlab.gradnorm")
    fig, (mean_ax, sum_ax) = new_figure(1, 2, size=(11.0, 4.2))
    for i, (point, rows) in enumerate(table.groupby("point", sort=False)):
        rows = rows.sort_values("batch_size")
        sizes = rows["batch_size"].to_numpy(float)
        theory = np.sqrt(rows["theory_sq_norm"].to_numpy(float))
        color = f"C{i}"
        mean_ax.errorbar(sizes, rows["grad_norm_mean"], yerr=rows["grad_norm_std"], marker="o", capsize=3,
                         color=color, label=f"{point}: measured")  # fmt: skip
        mean_ax.plot(sizes, theory, color=color, linestyle="--", label=f"{point}: theory")
        if "theory_sq_norm_iid" in rows:
            mean_ax.plot(sizes, np.sqrt(rows["theory_sq_norm_iid"].to_numpy(float)), color=color, linestyle=":",
                         label=f"{point}: theory, i.i.d. batches")  # fmt: skip
        sum_ax.errorbar(sizes, rows["sum_norm_mean"], yerr=rows["sum_norm_std"], marker="s", capsize=3,
                        color=color, label=f"{point}: measured")  # fmt: skip
        sum_ax.plot(sizes, sizes * theory, color=color, linestyle="--", label=f"{point}: theory")
    mean_ax.set_title("mean loss: ‖g_B‖ falls as B grows")
    mean_ax.set_ylabel("‖g_B‖₂, gradient of the mean loss")
    sum_ax.set_title("summed loss: ‖B·g_B‖ grows with B")
    sum_ax.set_ylabel("‖B·g_B‖₂, gradient of the summed loss")
    trials = int(table["trials"].iloc[0]) if "trials" in table else None
    for ax in (mean_ax, sum_ax):
        ax.set_yscale("log")
        batch_size_axis(ax, np.unique(table["batch_size"].to_numpy(float)))
        ax.legend(fontsize=8)
    note = f"error bars: ±1 std over {trials} random batches per size" if trials else "error bars: ±1 std over trials"
    iid = "; dotted: √(‖G‖² + tr(Σ)/B), i.i.d. batches" if "theory_sq_norm_iid" in table else ""
    fig.suptitle(f"Gradient norm vs batch size, two loss conventions ({note}). Dashed: theory "
                 f"√E‖g_B‖² = √(‖G‖² + tr(Σ)(1/B − 1/N)), times B on the right{iid}", fontsize=10)
    return fig


@styled
def distance_figure(curves: pd.DataFrame, final: pd.DataFrame) -> Figure:
    """Distance from the initial weights ‖θ_t − θ_0‖ over training and at equal samples seen.

    Args:
        curves: `batchlab.gradnorm.DistanceResult.curves` (``batch_size, lr, samples_seen,
            dist_from_init``).
        final: `DistanceResult.final` (``batch_size, lr, dist_from_init`` after the same number of
            samples seen by every run).

    Returns:
        Two panels: left, distance vs samples seen, one line per (batch size, lr), colour by
        batch size and line style by lr; right, the final distance vs batch size, one line per lr.
    """
    from . import batch_size_colors, batch_size_label

    missing = {"batch_size", "lr", "samples_seen", "dist_from_init"} - set(curves.columns)
    if missing:
        raise DataError(f"the distance curves lack {', '.join(sorted(missing))}; make them with batchlab.gradnorm")
    fig, (curve_ax, final_ax) = new_figure(1, 2, size=(11.0, 4.2))
    colors = batch_size_colors(sorted(curves["batch_size"].unique()))
    lrs = sorted(curves["lr"].unique())
    styles = dict(zip(lrs, ["-", "--", ":", "-."] * 4))
    for (size, lr), rows in curves.groupby(["batch_size", "lr"], sort=True):
        curve_ax.plot(rows["samples_seen"], rows["dist_from_init"], color=colors[size], linestyle=styles[lr],
                      label=f"{batch_size_label(size)}, lr {lr:g}")  # fmt: skip
    curve_ax.set_xlabel(metric_label("samples_seen"))
    curve_ax.set_ylabel(metric_label("dist_from_init"))
    curve_ax.set_title("distance from the initial weights over training")
    curve_ax.legend(fontsize=7, ncol=2)
    for lr, rows in final.groupby("lr", sort=True):
        rows = rows.sort_values("batch_size")
        final_ax.plot(rows["batch_size"], rows["dist_from_init"], marker="o", linestyle=styles.get(lr, "-"),
                      color="black", label=f"lr {lr:g}")  # fmt: skip
    samples = int(final["samples_seen"].iloc[0]) if "samples_seen" in final and len(final) else None
    batch_size_axis(final_ax, np.unique(final["batch_size"].to_numpy(float)))
    final_ax.set_ylabel(metric_label("dist_from_init"))
    final_ax.set_title(f"after the same {samples} samples seen" if samples else "at the end of training")
    final_ax.legend()
    return fig
