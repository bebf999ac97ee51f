"""The figure of an adaptive batch size over a run: the batch, its evidence and the learning rate.

Against samples seen: above, each batch's size (a step line), every decision's measured signal (the
local critical batch size or B_simple) and the doubled batch a decision needed to reach; below, the
learning rate each update used. Reads the run's tables only.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import legend_below, new_figure, styled
from .advise import _power_of_two_axis

_COLORS = {"batch": "#1b4f9c", "signal": "#d95f02", "needed": "0.55", "lr": "#1b9e77"}
SIGNAL_NAMES = {"local_cbs": "local critical batch size", "b_simple": "B_simple = tr(Σ)/‖G‖²"}


@styled
def adaptive_figure(steps: pd.DataFrame, evals: pd.DataFrame, *, signal: str = "local_cbs",
                    title: str | None = None) -> Figure:
    """Batch size and lr over a run whose batch adapted (`batchlab.adaptive`).

    Args:
        steps: the run's step table (``samples_seen``, ``batch_size``, ``lr``).
        evals: its evals table with the decisions' ``adaptive_signal`` and ``adaptive_batch_size``.
        signal: ``local_cbs`` or ``b_simple``: what ``adaptive_signal`` measured.
        title: the figure's title.
    """
    fig, (top, bottom) = new_figure(2, 1, size=(7.0, 5.6), sharex=True, height_ratios=[2.2, 1])
    before = (steps.samples_seen - steps.batch_size).to_numpy(dtype=float)  # where each batch starts
    decided = evals.dropna(subset=["adaptive_signal"]) if "adaptive_signal" in evals else evals.iloc[:0]
    x = decided.samples_seen.to_numpy(dtype=float)
    start, end = int(steps.batch_size.iloc[0]), float(steps.samples_seen.iloc[-1])
    # The batch size in force (an epoch's short last batch is left out: it is what remained, not a choice).
    xs = [0.0, *x, end]
    ys = [float(start), *_after_each(decided, start)]
    top.step(xs, [*ys, ys[-1]], where="post", color=_COLORS["batch"], linewidth=2.0, label="batch size in force")
    measured = decided.adaptive_signal.to_numpy(dtype=float)
    shown = [v for v in measured if math.isfinite(v) and v > 0]
    top.plot(x, measured, "o", color=_COLORS["signal"], markersize=6,
             label=f"measured at each decision: {SIGNAL_NAMES.get(signal, signal)}")
    in_force = _batch_in_force(decided, int(steps.batch_size.iloc[0]))
    top.plot(x, [2 * b for b in in_force], "_", color=_COLORS["needed"], markersize=14, markeredgewidth=2,
             label="twice the batch at the decision: the batch grows where the measurement reaches it")
    _power_of_two_axis(top, [*ys, *shown, *(2.0 * b for b in in_force)])
    top.set_ylabel("batch size")
    if title:
        top.set_title(title)
    bottom.step(before, steps.lr, where="post", color=_COLORS["lr"])
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("samples seen")
    bottom.ticklabel_format(axis="y", style="plain", useOffset=False)
    legend_below(top)
    return fig


def _after_each(decided: pd.DataFrame, start: int) -> list[float]:
    """The batch size from each decision on (a failed measurement, NaN, keeps the batch)."""
    batches, batch = [], float(start)
    for after in decided.adaptive_batch_size.to_numpy(dtype=float):
        batch = after if math.isfinite(after) else batch
        batches.append(batch)
    return batches


def _batch_in_force(decided: pd.DataFrame, start: int) -> list[float]:
    """The batch size when each decision was made: ``start``, then each previous decision's."""
    return [float(start), *_after_each(decided, start)][:len(decided)]


def signal_of(config: Any) -> str:
    """The signal an adaptive run's stored config names (``local_cbs`` when it does not say)."""
    batch = config.get("batch_size") if isinstance(config, dict) else None
    return batch.get("signal", "local_cbs") if isinstance(batch, dict) else "local_cbs"
