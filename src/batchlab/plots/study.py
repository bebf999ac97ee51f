"""Study figures: what batch size buys, from a study's summary table.

Every function takes the summary as a DataFrame with one row per batch size. The columns read:

=====================  ==========================================================================
``batch_size``         samples per update: a number, or ``"full"`` (then pass ``n_train``)
``best_lr``            the learning rate that reached the target in the fewest steps at this B
``steps_to_target``    median over seeds (at ``best_lr``) of the first evaluation step meeting the
                       target (Shallue et al. 2019); NaN where no trial reached it
``steps_lo/steps_hi``  the spread of ``steps_to_target`` over seeds (e.g. min/max), optional
``steps_ci_lo/_hi``    its order-statistic interval, optional (drawn instead of the spread), named
                       by ``steps_ci_level``/``steps_ci_seeds`` ("75% CI, range of 3 seeds")
``steps_fit_lo/_hi``   the fitted curve's 95% bootstrap band at each batch size, optional
``samples_to_target``  median samples seen at that step; ``samples_lo/samples_hi`` optional
``seconds_to_target``  median training seconds at that step; ``seconds_lo/seconds_hi`` optional
``gen_gap``            generalization gap, train accuracy − validation accuracy at the end of
                       training (or at the target); ``gen_gap_lo/gen_gap_hi`` optional
=====================  ==========================================================================

The fitted parameters come from the steps/data trade-off of McCandlish et al. 2018
(arXiv 1812.06162): S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit), with
E_min = S_min · B_crit.

Where the study recommends a batch size (`batchlab.study.Recommendation`, or its ``as_dict()`` as
the store keeps it), every figure marks it with a vertical line labelled ``recommended B = ...``;
the seconds figure names a fastest batch size only where the recommendation does.

A study with an adaptive run (`batchlab.study.adaptive`) has one more figure, steps against samples
to target (`steps_vs_samples_figure`): the fixed batch sizes trace the trade-off, and the adaptive
row, which has no single batch size to stand at on the other figures, is a labelled point on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from ..errors import DataError
from . import (
    FULL_BATCH,
    batch_size_axis,
    batch_size_colors,
    batch_size_value,
    legend_below,
    metric_label,
    new_figure,
    recommended_label,
    styled,
)

STUDY_FIGURE_SIZE = (7.0, 5.0)  # inches: the axes span the width; the legend goes below them
RECOMMENDED_STYLE = {"color": "tab:green", "linewidth": 2.5, "alpha": 0.45, "zorder": 1}

POINT_STYLE = {"color": "black", "marker": "o", "markersize": 5, "capsize": 3, "linestyle": "none", "zorder": 3}


@dataclass(frozen=True)
class Advice:
    """What the figures show of the study's recommendation: the batch size it recommends (None
    where the data cannot support one) and the batch size it calls fastest (None where it calls
    none, e.g. seconds measured while trials shared the cores)."""

    batch_size: Any = None
    fastest_batch_size: Any = None
    fastest_seconds: float = math.nan


def advice_of(recommendation: Any) -> Advice:
    """The `Advice` of a `Recommendation`, of its ``as_dict()`` (as stored), or of None (no advice)."""
    if recommendation is None or isinstance(recommendation, str):
        return Advice()
    read = recommendation.get if isinstance(recommendation, Mapping) else lambda k: getattr(recommendation, k, None)
    seconds = read("fastest_seconds")
    return Advice(batch_size=read("batch_size"), fastest_batch_size=read("fastest_batch_size"),
                  fastest_seconds=float(seconds) if seconds is not None else math.nan)


def _mark_recommended(ax: Axes, advice: Advice, n_train: int | None, sizes: np.ndarray) -> None:
    """A vertical line at the recommended batch size, in the legend as ``recommended B = ...``."""
    if advice.batch_size is None:
        return
    at = batch_size_value(advice.batch_size, n_train)
    if not math.isfinite(at):
        return
    ax.axvline(at, label=recommended_label(advice.batch_size), **RECOMMENDED_STYLE)
    # Named at the line's top too, on the side with more room (the x axis is log2 over the sizes).
    right = at < math.sqrt(sizes.min() * sizes.max())
    ax.annotate(recommended_label(advice.batch_size), xy=(at, 1.0), xycoords=ax.get_xaxis_transform(),
                xytext=(4 if right else -4, -4), textcoords="offset points", ha="left" if right else "right",
                va="top", fontsize=8, color=RECOMMENDED_STYLE["color"])


def _sizes(summary: pd.DataFrame, n_train: int | None) -> np.ndarray:
    """The batch sizes as numbers; ``full`` needs ``n_train``."""
    if "batch_size" not in summary:
        raise DataError(f"the study summary has no 'batch_size' column; it has {', '.join(map(str, summary.columns))}")
    sizes = np.array([batch_size_value(b, n_train) for b in summary["batch_size"]], dtype=float)
    if not np.all(np.isfinite(sizes)):
        raise DataError("the summary has batch size 'full' but no training-set size; pass n_train")
    return sizes


def _column(summary: pd.DataFrame, column: str) -> np.ndarray:
    if column not in summary:
        raise DataError(f"the study summary has no {column!r} column; it has {', '.join(map(str, summary.columns))}")
    return summary[column].to_numpy(dtype=float)


def _spread(summary: pd.DataFrame, prefix: str, centre: np.ndarray) -> np.ndarray | None:
    """Error bars (2, n) from ``<prefix>_lo``/``<prefix>_hi``, or None when the summary has none."""
    lo, hi = f"{prefix}_lo", f"{prefix}_hi"
    if lo not in summary or hi not in summary:
        return None
    low, high = summary[lo].to_numpy(dtype=float), summary[hi].to_numpy(dtype=float)
    return np.vstack([np.clip(centre - low, 0, None), np.clip(high - centre, 0, None)])


def _batch_axis(ax: Axes, summary: pd.DataFrame, sizes: np.ndarray, n_train: int | None) -> None:
    """Log2 x axis with a tick at every batch size of the study (``full`` written as such)."""
    labels = [f"full\n({n_train})" if b == FULL_BATCH else f"{v:g}" for b, v in zip(summary["batch_size"], sizes)]
    batch_size_axis(ax, sizes, labels)


def _span(sizes: np.ndarray) -> np.ndarray:
    """A smooth grid over the batch sizes (for theory lines)."""
    return np.geomspace(sizes.min(), sizes.max(), 200)


def _points(ax: Axes, sizes: np.ndarray, values: np.ndarray, spread: np.ndarray | None, label: str) -> None:
    """The measured points, coloured by batch size, with their spread as error bars."""
    ax.errorbar(sizes, values, yerr=spread, label=label, **POINT_STYLE)
    colors = batch_size_colors(list(sizes))
    ax.scatter(sizes, values, c=[colors[s] for s in sizes], s=36, zorder=4)


def _anchor(sizes: np.ndarray, values: np.ndarray) -> tuple[float, float] | None:
    """The smallest batch size with a finite value, and that value: where scaling lines start."""
    finite = np.flatnonzero(np.isfinite(values) & (values > 0))
    if finite.size == 0:
        return None
    i = finite[np.argmin(sizes[finite])]
    return float(sizes[i]), float(values[i])


@styled
def steps_to_target_figure(
    summary: pd.DataFrame,
    s_min: float | None = None,
    b_crit: float | None = None,
    *,
    n_train: int | None = None,
    target: str | None = None,
    b_crit_interval: tuple[float, float] | None = None,
    recommendation: Any = None,
) -> Figure:
    """Steps to target vs batch size, log-log, against perfect scaling and the fitted curve.

    Perfect scaling (doubling B halves the steps) is drawn through the smallest batch size's point;
    the fit S = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11) when ``s_min`` and
    ``b_crit`` are given, with B_crit marked (there training takes 2 S_min steps).

    Args:
        summary: the study summary (module docstring): ``batch_size``, ``steps_to_target`` and
            optionally ``steps_lo``/``steps_hi``.
        s_min, b_crit: the fitted minimum number of steps and critical batch size.
        n_train: the training-set size, the value of batch size ``full``.
        target: the target condition, for the title (``val_acc>=0.8``).
        b_crit_interval: B_crit's 95% bootstrap interval, for the title.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its batch size is marked.

    Returns:
        A figure whose error bars (``ax.containers[0]``) hold the measured points (x = batch sizes,
        y = steps_to_target, bars the bootstrap interval when the summary has it, else the spread),
        and whose title states the finding.
    """
    sizes, steps = _sizes(summary, n_train), _column(summary, "steps_to_target")
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    interval = _spread(summary, "steps_ci", steps)
    what = f"median over seeds, {_interval_name(summary)}" if interval is not None else "median, spread over seeds"
    _points(ax, sizes, steps, interval if interval is not None else _spread(summary, "steps", steps), f"measured ({what})")
    grid = _span(sizes)
    anchor = _anchor(sizes, steps)
    if anchor is not None:
        b0, s0 = anchor
        ax.plot(grid, s0 * b0 / grid, color="0.5", linestyle="--", label="perfect scaling: S ∝ 1/B")
    fitted = s_min is not None and b_crit is not None and math.isfinite(s_min) and math.isfinite(b_crit)
    if fitted:
        ax.plot(grid, s_min * (1 + b_crit / grid), color="tab:red",
                label=f"fit S = S_min(1 + B_crit/B): S_min={s_min:.3g}, B_crit={b_crit:.3g}")
        if "steps_fit_lo" in summary and "steps_fit_hi" in summary:
            ax.fill_between(sizes, _column(summary, "steps_fit_lo"), _column(summary, "steps_fit_hi"), color="tab:red",
                            alpha=0.15, linewidth=0, label="fit: 95% bootstrap band")
        ax.axhline(s_min, color="tab:red", linestyle=":", linewidth=1.0)
        ax.axvline(b_crit, color="tab:red", linestyle=":", linewidth=1.0)
    _mark_recommended(ax, advice_of(recommendation), n_train, sizes)
    ax.set_yscale("log")
    _batch_axis(ax, summary, sizes, n_train)
    ax.set_ylabel("steps to target (parameter updates)")
    ax.set_title(_steps_finding(sizes, steps, summary, b_crit if fitted else None, b_crit_interval, target, n_train))
    legend_below(ax)
    return fig


def _interval_name(summary: pd.DataFrame) -> str:
    """What the steps intervals are, by their true level: one label when every batch size has the
    same (the usual case: the same seeds), else the kind alone."""
    from ..study.analysis import steps_interval_label

    if "steps_ci_level" not in summary or "steps_ci_seeds" not in summary:
        return "interval over seeds"
    names = {steps_interval_label(row) for _, row in summary.iterrows() if row["steps_ci_level"] > 0}
    return names.pop() if len(names) == 1 else "order-statistic CI"


def _steps_finding(sizes, steps, summary, b_crit, b_crit_interval, target, n_train) -> str:
    """The title: how far steps fall over the batch sizes, and where they flatten."""
    finite = np.flatnonzero(np.isfinite(steps))
    if finite.size < 2:
        return "Steps to " + (target or "target") + " vs batch size"
    first, last = finite[0], finite[-1]
    label = lambda i: str(summary["batch_size"].iloc[i])  # noqa: E731
    text = f"Steps to {target or 'target'} fall {steps[first] / steps[last]:.3g}× from B={label(first)} to B={label(last)}"
    if b_crit is not None:
        text += f"; they flatten past B_crit ≈ {b_crit:.3g}"
        if b_crit_interval is not None and all(map(math.isfinite, b_crit_interval)):
            text += f" (95% bootstrap CI {b_crit_interval[0]:.3g}–{b_crit_interval[1]:.3g})"
    return text


@styled
def samples_to_target_figure(
    summary: pd.DataFrame,
    e_min: float | None = None,
    b_crit: float | None = None,
    *,
    n_train: int | None = None,
    target: str | None = None,
    recommendation: Any = None,
) -> Figure:
    """Samples to target vs batch size, log-log, with the fit E = E_min (1 + B / B_crit).

    Under perfect scaling the samples needed do not depend on B (a flat line through the smallest
    batch size); past B_crit each doubling of B costs about twice the samples (McCandlish et al.
    2018). ``e_min`` defaults to S_min · B_crit when you only have those (pass ``e_min=s_min*b_crit``).

    Args:
        summary: ``batch_size``, ``samples_to_target`` and optionally ``samples_lo``/``samples_hi``.
        e_min, b_crit: the fitted minimum number of samples and critical batch size.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its batch size is marked.

    Returns:
        A figure whose error bars (``ax.containers[0]``) hold the measured points (y = samples_to_target).
    """
    sizes, samples = _sizes(summary, n_train), _column(summary, "samples_to_target")
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    _points(ax, sizes, samples, _spread(summary, "samples", samples), "measured (median, spread over seeds)")
    grid = _span(sizes)
    anchor = _anchor(sizes, samples)
    if anchor is not None:
        ax.plot(grid, np.full_like(grid, anchor[1]), color="0.5", linestyle="--",
                label="perfect scaling: samples independent of B")
    if e_min is not None and b_crit is not None and math.isfinite(e_min) and math.isfinite(b_crit):
        ax.plot(grid, e_min * (1 + grid / b_crit), color="tab:red",
                label=f"fit E = E_min(1 + B/B_crit): E_min={e_min:.3g}, B_crit={b_crit:.3g}")
        ax.axvline(b_crit, color="tab:red", linestyle=":", linewidth=1.0)
    _mark_recommended(ax, advice_of(recommendation), n_train, sizes)
    ax.set_yscale("log")
    _batch_axis(ax, summary, sizes, n_train)
    ax.set_ylabel("samples to target (samples seen)")
    ax.set_title(_ratio_title(summary, samples, "samples", target))
    legend_below(ax)
    return fig


@styled
def seconds_to_target_figure(
    summary: pd.DataFrame, *, n_train: int | None = None, target: str | None = None, recommendation: Any = None
) -> Figure:
    """Training seconds to target vs batch size, log-log (wall-clock cost on this machine).

    The title names the fastest batch size only where the recommendation does: seconds measured
    while trials shared the cores (the summary's ``seconds_shared``) say more about the sharing
    than about the batch size, and then the title says so instead.

    Args:
        summary: ``batch_size``, ``seconds_to_target`` and optionally ``seconds_lo``/``seconds_hi``
            and ``seconds_shared``.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its batch size is
            marked, and its ``fastest_batch_size`` (if any) named in the title.

    Returns:
        A figure whose error bars (``ax.containers[0]``) hold the measured points (y = seconds_to_target).
    """
    sizes, seconds = _sizes(summary, n_train), _column(summary, "seconds_to_target")
    advice = advice_of(recommendation)
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    _points(ax, sizes, seconds, _spread(summary, "seconds", seconds), "measured (median, spread over seeds)")
    _mark_recommended(ax, advice, n_train, sizes)
    ax.set_yscale("log")
    # Seconds often span less than a decade: label the minor ticks too, as plain numbers (0.3, not 3×10⁻¹).
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    _batch_axis(ax, summary, sizes, n_train)
    ax.set_ylabel("training time to target (s)")
    ax.set_title(_seconds_title(summary, advice, target))
    legend_below(ax)
    return fig


class _PlainLogFormatter(LogFormatter):
    """A log axis' labels as plain numbers (0.3, 2, 40): matplotlib decides which ticks get one."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _seconds_title(summary: pd.DataFrame, advice: Advice, target: str | None) -> str:
    """The fastest batch size as the recommendation names it, or why none is named."""
    what = target or "target"
    if advice.fastest_batch_size is not None:
        seconds = f" ({advice.fastest_seconds:.3g} s of training)" if math.isfinite(advice.fastest_seconds) else ""
        return f"Fastest to {what} on this machine: B={advice.fastest_batch_size}{seconds}"
    if "seconds_shared" in summary and summary["seconds_shared"].fillna(False).astype(bool).any():
        return (f"Training seconds to {what}, measured while trials shared the cores: "
                "no batch size is called fastest")
    return f"Training seconds to {what} vs batch size (this machine)"


@styled
def best_lr_figure(summary: pd.DataFrame, *, n_train: int | None = None, recommendation: Any = None) -> Figure:
    """The best learning rate per batch size against the linear and square-root scaling rules.

    Both rules start from the smallest batch size's best lr: linear lr ∝ B (Goyal et al. 2017)
    and square root lr ∝ √B (Hoffer et al. 2017).

    Args:
        summary: ``batch_size`` and ``best_lr``.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its batch size is marked.

    Returns:
        A figure with the measured points (``ax.containers[0]``), the linear rule and the square-root rule.
    """
    sizes, lrs = _sizes(summary, n_train), _column(summary, "best_lr")
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    _points(ax, sizes, lrs, None, "best lr (fewest steps to target)")
    grid = _span(sizes)
    anchor = _anchor(sizes, lrs)
    if anchor is not None:
        b0, lr0 = anchor
        ax.plot(grid, lr0 * grid / b0, color="tab:blue", linestyle="--", label="linear rule: lr ∝ B")
        ax.plot(grid, lr0 * np.sqrt(grid / b0), color="tab:orange", linestyle="-.", label="square-root rule: lr ∝ √B")
    _mark_recommended(ax, advice_of(recommendation), n_train, sizes)
    ax.set_yscale("log")
    _batch_axis(ax, summary, sizes, n_train)
    ax.set_ylabel(metric_label("lr"))
    ax.set_title(_range_title(summary, lrs, "Best learning rate"))
    legend_below(ax)
    return fig


@styled
def generalization_gap_figure(summary: pd.DataFrame, *, n_train: int | None = None, recommendation: Any = None) -> Figure:
    """The generalization gap (train − validation accuracy) per batch size (Keskar et al. 2017).

    Args:
        summary: ``batch_size``, ``gen_gap`` and optionally ``gen_gap_lo``/``gen_gap_hi``.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its batch size is marked.

    Returns:
        A figure whose error bars (``ax.containers[0]``) hold the measured points (y = gen_gap), with a line at zero.
    """
    sizes, gaps = _sizes(summary, n_train), _column(summary, "gen_gap")
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    _points(ax, sizes, gaps, _spread(summary, "gen_gap", gaps), "measured (median, spread over seeds)")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _mark_recommended(ax, advice_of(recommendation), n_train, sizes)
    _batch_axis(ax, summary, sizes, n_train)
    ax.set_ylabel("generalization gap (train − val accuracy)")
    ax.set_title(_range_title(summary, gaps, "Generalization gap"))
    legend_below(ax)
    return fig


ADAPTIVE_STYLE = {"color": "tab:purple", "marker": "*", "markersize": 14, "capsize": 3, "linestyle": "none",
                  "zorder": 5}


@styled
def steps_vs_samples_figure(
    summary: pd.DataFrame,
    adaptive: pd.DataFrame,
    s_min: float | None = None,
    b_crit: float | None = None,
    *,
    n_train: int | None = None,
    target: str | None = None,
    recommendation: Any = None,
) -> Figure:
    """Steps against samples to target, log-log: the fixed batch sizes' trade-off and the adaptive run on it.

    Each fixed batch size is a point (its steps interval and samples spread as bars) labelled with
    its B; the fit S = S_min(1 + B_crit/B), E = S·B traces (S/S_min − 1)(E/E_min − 1) = 1
    (McCandlish et al. 2018) when ``s_min`` and ``b_crit`` are given. The adaptive row
    (`batchlab.study.adaptive`) is a star at its median samples and steps, with the same kinds of
    bars, labelled with the batches it went through; an open star at the same steps adds the samples
    its measurements took. An interval open above (a seed that never reached the target) is drawn
    as a dotted arrow to the top of the axes.

    Args:
        summary: the study summary (module docstring): ``batch_size``, ``steps_to_target``,
            ``samples_to_target`` and optionally ``steps_ci_lo``/``_hi``, ``samples_lo``/``_hi``.
        adaptive: the adaptive row (`batchlab.study.adaptive.adaptive_row`), one row.
        s_min, b_crit: the fitted minimum number of steps and critical batch size.
        n_train: the training-set size, the value of batch size ``full``.
        target: the target condition, for the title.
        recommendation: the study's `Recommendation` (or its ``as_dict()``): its point is ringed.

    Returns:
        A figure whose error bars (``ax.containers``) hold the fixed batch sizes' points first
        (x = samples_to_target, y = steps_to_target), then, when the adaptive run has a median,
        its point and its point with the measurements' samples.
    """
    from ..study.adaptive import batches_text

    sizes = _sizes(summary, n_train)
    steps, samples = _column(summary, "steps_to_target"), _column(summary, "samples_to_target")
    fig, ax = new_figure(size=STUDY_FIGURE_SIZE)
    open_above = _bars(ax, summary, samples, steps, "fixed batch sizes (median over seeds, intervals over seeds)",
                       POINT_STYLE)
    colors = batch_size_colors(list(sizes))
    ax.scatter(samples, steps, c=[colors[v] for v in sizes], s=36, zorder=4)
    ax.plot(samples, steps, color="0.6", linewidth=0.8, zorder=2)
    for batch_size, x, y in zip(summary["batch_size"], samples, steps):
        if math.isfinite(x) and math.isfinite(y):
            ax.annotate(f"B={batch_size}", xy=(x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    if s_min is not None and b_crit is not None and math.isfinite(s_min) and math.isfinite(b_crit):
        grid = _span(sizes)
        fitted = s_min * (1 + b_crit / grid)
        ax.plot(fitted * grid, fitted, color="tab:red",
                label=f"fit: S = S_min(1 + B_crit/B), E = S·B (B_crit={b_crit:.3g})")
    _ring_recommended(ax, advice_of(recommendation), summary, samples, steps)
    row = adaptive.iloc[0]
    a_steps, a_samples = float(row["steps_to_target"]), float(row["samples_to_target"])
    if math.isfinite(a_steps) and math.isfinite(a_samples):
        name = f"adaptive {batches_text(row)}"
        open_above += _bars(ax, adaptive, np.array([a_samples]), np.array([a_steps]), f"{name} (median over seeds)",
                            ADAPTIVE_STYLE)
        ax.annotate(name, xy=(a_samples, a_steps), xytext=(6, -12), textcoords="offset points", fontsize=8,
                    color=ADAPTIVE_STYLE["color"])
        total = float(row["samples_with_measurements"])
        if math.isfinite(total) and total > a_samples:
            ax.plot([a_samples, total], [a_steps, a_steps], color=ADAPTIVE_STYLE["color"], linestyle=":", linewidth=1.2)
            ax.errorbar([total], [a_steps], label=f"{name}, with the samples its measurements took",
                        **{**ADAPTIVE_STYLE, "markerfacecolor": "none"})
    ax.set_xscale("log")
    ax.set_yscale("log")
    for x, y, color in open_above:  # after the scales: the arrow ends at the top of the axes
        ax.annotate("", xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(x, y), textcoords="data",
                    arrowprops={"arrowstyle": "->", "color": color, "linestyle": ":", "linewidth": 1.2})
    ax.set_xlabel("samples to target (samples seen)")
    ax.set_ylabel("steps to target (parameter updates)")
    ax.set_title(_adaptive_finding(row, steps, samples, target))
    legend_below(ax)
    return fig


def _bars(ax: Axes, frame: pd.DataFrame, samples: np.ndarray, steps: np.ndarray, label: str,
          style: Mapping[str, Any]) -> list[tuple[float, float, str]]:
    """Points at (samples, steps) with the steps interval and the samples spread as bars.

    Returns:
        ``(x, y, colour)`` of each point whose steps interval is open above (its bar stops at the
        point; the caller draws the arrow once the axes are scaled).
    """
    yerr = _spread(frame, "steps_ci", steps)
    open_above = []
    if yerr is not None:
        infinite = ~np.isfinite(yerr[1])
        open_above = [(float(x), float(y), style["color"]) for x, y, o in zip(samples, steps, infinite)
                      if o and math.isfinite(x) and math.isfinite(y)]
        yerr = np.where(np.isfinite(yerr), yerr, 0.0)
    ax.errorbar(samples, steps, xerr=_spread(frame, "samples", samples), yerr=yerr, label=label, **style)
    return open_above


def _ring_recommended(ax: Axes, advice: Advice, summary: pd.DataFrame, samples: np.ndarray, steps: np.ndarray) -> None:
    """A ring around the recommended batch size's point, in the legend as ``recommended B = ...``."""
    if advice.batch_size is None:
        return
    at = [i for i, b in enumerate(summary["batch_size"]) if str(b) == str(advice.batch_size)]
    if not at or not (math.isfinite(samples[at[0]]) and math.isfinite(steps[at[0]])):
        return
    ax.plot([samples[at[0]]], [steps[at[0]]], marker="o", markersize=14, markerfacecolor="none", linestyle="none",
            markeredgecolor=RECOMMENDED_STYLE["color"], markeredgewidth=2.0, alpha=0.7,
            label=recommended_label(advice.batch_size))


def _adaptive_finding(row: Any, steps: np.ndarray, samples: np.ndarray, target: str | None) -> str:
    """The title: the adaptive run's steps and samples over the fewest any fixed batch size needed."""
    what = target or "target"
    a_steps, a_samples = float(row["steps_to_target"]), float(row["samples_to_target"])
    if not (math.isfinite(a_steps) and math.isfinite(a_samples)):
        return f"Steps vs samples to {what}: the adaptive run reached it in {row['reached']} seeds, too few for a median"
    if not np.isfinite(steps).any():
        return f"Steps vs samples to {what}: no fixed batch size reached it"
    total = float(row["samples_with_measurements"])
    fewest_steps, fewest_samples = np.nanmin(steps), np.nanmin(samples)
    return (f"Adaptive to {what}: {a_steps / fewest_steps:.2g}× the fewest steps and {a_samples / fewest_samples:.2g}× "
            f"the fewest samples of any fixed batch size ({total / fewest_samples:.2g}× with its measurements)")


def _ratio_title(summary: pd.DataFrame, values: np.ndarray, what: str, target: str | None) -> str:
    """``Samples to T grow 3.2× from B=16 to B=1024``: the last measured value over the first."""
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size < 2:
        return f"{what.capitalize()} to {target or 'target'} vs batch size"
    first, last = finite[0], finite[-1]
    ratio = values[last] / values[first]
    verb = "grow" if ratio >= 1 else "fall"
    return (f"{what.capitalize()} to {target or 'target'} {verb} {max(ratio, 1 / ratio):.3g}× from "
            f"B={summary['batch_size'].iloc[first]} to B={summary['batch_size'].iloc[last]}")


def _range_title(summary: pd.DataFrame, values: np.ndarray, what: str) -> str:
    """``Best learning rate goes from 0.025 at B=16 to 0.4 at B=1024``."""
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size < 2:
        return f"{what} vs batch size"
    first, last = finite[0], finite[-1]
    return (f"{what} goes from {values[first]:.3g} at B={summary['batch_size'].iloc[first]} "
            f"to {values[last]:.3g} at B={summary['batch_size'].iloc[last]}")


def study_figures(
    summary: pd.DataFrame,
    *,
    s_min: float | None = None,
    b_crit: float | None = None,
    e_min: float | None = None,
    n_train: int | None = None,
    target: str | None = None,
    which: Sequence[str] | None = None,
    b_crit_interval: tuple[float, float] | None = None,
    recommendation: Any = None,
    adaptive: pd.DataFrame | None = None,
) -> dict[str, Figure]:
    """Every study figure the summary has the columns for, by name.

    Names: ``steps_to_target``, ``samples_to_target``, ``seconds_to_target``, ``best_lr``,
    ``gen_gap``, and with an ``adaptive`` row (`batchlab.study.adaptive.adaptive_row`)
    ``steps_vs_samples``. ``e_min`` defaults to ``s_min * b_crit`` (B_crit = E_min / S_min).
    ``recommendation`` (a `Recommendation` or its ``as_dict()``) is marked on every figure.
    """
    if e_min is None and s_min is not None and b_crit is not None:
        e_min = s_min * b_crit
    advice = advice_of(recommendation)
    common = {"n_train": n_train, "recommendation": advice}
    makers = {
        "steps_to_target": lambda: steps_to_target_figure(summary, s_min, b_crit, target=target,
                                                          b_crit_interval=b_crit_interval, **common),
        "samples_to_target": lambda: samples_to_target_figure(summary, e_min, b_crit, target=target, **common),
        "seconds_to_target": lambda: seconds_to_target_figure(summary, target=target, **common),
        "best_lr": lambda: best_lr_figure(summary, **common),
        "gen_gap": lambda: generalization_gap_figure(summary, **common),
    }
    needed = {"steps_to_target": "steps_to_target", "samples_to_target": "samples_to_target",
              "seconds_to_target": "seconds_to_target", "best_lr": "best_lr", "gen_gap": "gen_gap"}  # fmt: skip
    if adaptive is not None and len(adaptive):
        makers["steps_vs_samples"] = lambda: steps_vs_samples_figure(summary, adaptive, s_min, b_crit, target=target,
                                                                     **common)
        needed["steps_vs_samples"] = "samples_to_target"
    figures = {}
    for name in which or makers:
        column = needed[name]
        if column in summary and summary[column].notna().any():
            figures[name] = makers[name]()
    return figures
