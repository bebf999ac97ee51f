"""The gradient-norm experiment: how the norm of a mini-batch gradient depends on the batch size.

Takes a table with one row per (point of training, batch size):

======================  =======================================================================
``point``               where in training the gradients were taken (``epoch 2``, ``epoch 30``)
``batch_size``          B, a number
``sq_norm_mean``        mean over trials of ‖g_B‖², g_B the gradient of the batch's mean loss
``sq_norm_lo/_hi``      the spread of ``sq_norm_mean`` (e.g. ± two standard errors), optional
``grad_norm_mean``      mean over trials of ‖g_B‖, optional (a second panel)
``grad_norm_lo/_hi``    its spread, optional
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
from . import metric_label, new_figure, styled


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
            if prefix == "sq_norm" and theory and point in theory:
                g_sq, trace = theory[point]
                grid = np.geomspace(sizes.min(), sizes.max(), 100)
                ax.plot(grid, g_sq + trace / grid, color=colors[point], linestyle="--",
                        label=f"{point}: ‖G‖² + tr(Σ)/B")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = np.unique(table["batch_size"].to_numpy(float))
        ax.set_xticks(sizes, [f"{b:g}" for b in sizes])  # the measured sizes, written plainly
        ax.minorticks_off()
        ax.set_xlabel(metric_label("batch_size"))
        ax.set_ylabel(ylabel)
        ax.legend(title="point of training")
    axes[0].set_title("Gradient norm vs batch size (mean loss)")
    return fig
