"""Learning curves: metric views against epochs, steps, samples seen or seconds.

Every function takes a run: anything with ``steps``, ``evals`` and ``epochs`` tables and a
``config`` (a `batchlab.loop.Run` from ``fit``, or a `batchlab.store.StoredRun` from the store).
Which table a column comes from follows its meaning (DESIGN.md §2): ``batch_*``, ``running_*``,
probes and ``lr`` are per step (the ``steps`` table); ``train_*``, ``val_*``, ``test_*`` are full
passes (the ``evals`` table, step 0 included).

On an ``epoch`` axis a row sits at ``step / steps_per_epoch``: the running mean then shows its
saw-tooth within each epoch, and a full-pass evaluation at an epoch's end sits on the whole number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import DataError
from . import (
    VIEW_NAMES,
    batch_size_colors,
    batch_size_label,
    batch_size_value,
    legend_below,
    metric_label,
    new_figure,
    recommended_label,
    styled,
)

X_AXES = ("epoch", "step", "samples_seen", "seconds")
STEP_PREFIXES = ("batch_", "running_")
EVAL_PREFIXES = ("train_", "val_", "test_")
VIEW_STYLES = {
    "batch": {"color": "0.6", "linewidth": 0.8, "alpha": 0.6},
    "running": {"color": "tab:orange"},
    "train": {"color": "tab:blue", "marker": "o", "markersize": 3},
    "val": {"color": "tab:green", "marker": "s", "markersize": 3},
    "test": {"color": "tab:red", "marker": "^", "markersize": 3},
}


@dataclass(frozen=True)
class RunFacts:
    """What a figure needs to know about a run besides its tables."""

    name: str
    batch_size: Any  # as configured: an int or "full"
    n_train: int | None
    lr: float | None
    steps_per_epoch: int | None

    @property
    def label(self) -> str:
        """``B=32, lr=0.05``: how a legend names the run."""
        lr = f", lr={self.lr:g}" if self.lr is not None else ""
        return batch_size_label(self.batch_size, self.n_train) + lr


def run_facts(run: Any) -> RunFacts:
    """Batch size, lr, training-set size and steps per epoch of a `Run` or a `StoredRun`."""
    config = run.config if isinstance(run.config, dict) else run.config.model_dump()
    clock = getattr(run, "clock", None)
    if clock is None:  # a StoredRun keeps the clock in its spec
        clock_dict = (getattr(run, "spec", None) or {}).get("clock") or {}
    else:
        clock_dict = {"n_train": clock.n_train, "steps_per_epoch": clock.steps_per_epoch}
    per_epoch = clock_dict.get("steps_per_epoch")
    if per_epoch is None and not run.steps.empty and "epoch" in run.steps:
        per_epoch = int(run.steps.groupby("epoch").size().max())  # every epoch but a cut-short last one is full
    name = getattr(run, "name", None) or (f"run {run.id}" if getattr(run, "id", None) is not None else "run")
    lr = config.get("lr")
    return RunFacts(
        name=str(name),
        batch_size=config.get("batch_size"),
        n_train=clock_dict.get("n_train"),
        lr=float(lr) if lr is not None else None,
        steps_per_epoch=int(per_epoch) if per_epoch else None,
    )


def table_for(run: Any, column: str) -> pd.DataFrame:
    """The table that holds ``column``: full-pass metrics from ``evals``, the rest from ``steps``."""
    if column.startswith(EVAL_PREFIXES):
        table = run.evals if not run.evals.empty else run.epochs
    else:
        table = run.steps
    if column not in table or table[column].isna().all():
        raise DataError(
            f"the run has no values of {column!r}; it has {', '.join(_plottable(run)) or 'no metrics'}"
        )
    return table


def x_values(table: pd.DataFrame, x: str, steps_per_epoch: int | None) -> pd.Series:
    """The x coordinate of each row: ``epoch`` is ``step / steps_per_epoch`` (fractional inside an epoch)."""
    if x not in X_AXES:
        raise DataError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    if x == "epoch":
        if not steps_per_epoch:
            raise DataError("the run does not say how many steps an epoch has; plot against 'step' instead")
        return table["step"] / steps_per_epoch
    return table[x]


def curve(run: Any, column: str, x: str, steps_per_epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one column of a run, rows where it was not measured left out."""
    table = table_for(run, column)
    per_epoch = steps_per_epoch if steps_per_epoch is not None else run_facts(run).steps_per_epoch
    xs = x_values(table, x, per_epoch)
    measured = table[column].notna()
    return xs[measured].to_numpy(dtype=float), table.loc[measured, column].to_numpy(dtype=float)


def _plottable(run: Any) -> list[str]:
    columns = [c for c in run.steps.columns if c not in ("step", "epoch", "samples_seen", "seconds", "batch_size")]
    return columns + [c for c in run.evals.columns if c.startswith(EVAL_PREFIXES)]


@styled
def learning_curves(
    run: Any,
    metric: str = "acc",
    x: str = "epoch",
    views: Sequence[str] = ("train", "val"),
    *,
    title: str | None = None,
) -> Figure:
    """A learning curve: one metric (``loss`` or ``acc``) in several views against time.

    Args:
        run: a `Run` or `StoredRun`.
        metric: ``acc`` or ``loss`` (the column is ``<view>_<metric>``).
        x: ``epoch``, ``step``, ``samples_seen`` or ``seconds`` (training time, evaluations excluded).
        views: any of ``batch``, ``running``, ``train``, ``val``, ``test``; views the run lacks are
            left out (at least one must be present).
        title: defaults to the run's name, batch size and lr.

    Returns:
        A figure with one line per view present, in the order given.
    """
    if x not in X_AXES:  # checked first: a bad axis must not read as a missing view
        raise DataError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    facts = run_facts(run)
    fig, ax = new_figure()
    drawn = 0
    for view in views:
        column = f"{view}_{metric}"
        try:
            xs, ys = curve(run, column, x, facts.steps_per_epoch)
        except DataError:
            continue
        style = dict(VIEW_STYLES.get(view, {}))
        if view == "batch" and len(xs) > 300:  # thousands of noisy points: keep them a faint band
            style.update(linewidth=0.4, alpha=0.35)
        ax.plot(xs, ys, label=VIEW_NAMES.get(view, view), **style)
        drawn += 1
    if drawn == 0:
        wanted = ", ".join(f"{v}_{metric}" for v in views)
        raise DataError(f"the run has none of {wanted}; it has {', '.join(_plottable(run))}")
    ax.set_xlabel(metric_label(x))
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title if title is not None else _run_title(facts))
    ax.legend()
    return fig


@styled
def views_overlay(run: Any, metric: str = "acc", x: str = "step", *, title: str | None = None) -> Figure:
    """The overlay behind ``explain``: batch, running-mean and full-pass views on one axis.

    Dotted vertical lines mark epoch boundaries (up to 60 of them), where the running mean resets;
    the jump there is the average catching up, not the model improving.

    Args:
        run: a `Run` or `StoredRun`.
        metric: ``acc`` or ``loss``.
        x: ``step`` or ``epoch`` (also ``samples_seen``, ``seconds``, without boundary lines).

    Returns:
        A figure with one line per view present among batch, running, train, val.
    """
    facts = run_facts(run)
    fig = learning_curves.__wrapped__(run, metric, x, ("batch", "running", "train", "val"), title=title)
    ax = fig.axes[0]
    n_epochs = int(run.steps["epoch"].max()) if not run.steps.empty else 0
    if x in ("step", "epoch") and facts.steps_per_epoch and 1 < n_epochs <= 60:
        for epoch in range(1, n_epochs):
            at = epoch if x == "epoch" else epoch * facts.steps_per_epoch
            ax.axvline(at, color="0.3", linestyle=":", linewidth=0.8, zorder=0)
    if title is None:
        ax.set_title(f"Metric views of {_run_title(facts)}; dotted: epoch boundaries")
    return fig


@styled
def compare_runs(
    runs: Sequence[Any],
    metric: str | Sequence[str] = "val_acc",
    x: str = "epoch",
    *,
    logx: bool = False,
    logy: bool = False,
    title: str | None = None,
) -> Figure:
    """Several runs on one axis, coloured by batch size: the "batch GD vs SGD vs mini-batch" figure.

    Colours order the batch sizes (`batch_size_colors`); runs that share a batch size are told
    apart by line style, in the order of their learning rates. The legend names B and lr.

    Args:
        runs: `Run` or `StoredRun` objects.
        metric: a column (``val_acc``, ``train_loss``, ``running_acc``, ``dist_from_init``, ...),
            or several: one panel each, side by side (e.g. ``("train_acc", "val_acc")``).
        x: ``epoch``, ``step``, ``samples_seen`` or ``seconds``.
        logx, logy: log scales (steps differ by orders of magnitude across batch sizes).

    Returns:
        A figure with one axis per metric and one line per run on each.
    """
    if not runs:
        raise DataError("no runs to compare; give at least one run")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    facts = [run_facts(r) for r in runs]
    colors = batch_size_colors([f.batch_size for f in facts], _common_n_train(facts))
    order = sorted(range(len(runs)), key=lambda i: (batch_size_value(facts[i].batch_size, facts[i].n_train),
                                                   facts[i].lr or 0.0))
    styles = _line_styles(facts)
    width = 6.4 if len(metrics) == 1 else 4.6 * len(metrics)
    fig, axes = new_figure(1, len(metrics), size=(width, 4.0), sharey=len(metrics) > 1)
    axes = np.atleast_1d(axes)
    for ax, column in zip(axes, metrics):
        for i in order:
            xs, ys = curve(runs[i], column, x, facts[i].steps_per_epoch)
            ax.plot(xs, ys, color=colors[facts[i].batch_size], linestyle=styles[i], label=facts[i].label)
        ax.set_xlabel(metric_label(x))
        ax.set_title(column)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
    axes[0].set_ylabel(metric_label(metrics[0]))
    legend_below(axes[-1], title="batch size, lr")
    if title is not None:
        fig.suptitle(title)
    return fig


def _run_title(facts: RunFacts) -> str:
    """``baseline (B=32, lr=0.05)``, or just ``B=32, lr=0.05`` when the name says no more."""
    if facts.label.startswith(facts.name) or facts.name == "run":
        return facts.label
    return f"{facts.name} ({facts.label})"


def _common_n_train(facts: Sequence[RunFacts]) -> int | None:
    sizes = {f.n_train for f in facts if f.n_train}
    return sizes.pop() if len(sizes) == 1 else None


def _line_styles(facts: Sequence[RunFacts]) -> list[str]:
    """Solid for the smallest lr of each batch size, then dashed, dotted, dash-dot."""
    cycle = ["-", "--", ":", "-."]
    styles = []
    for f in facts:
        lrs = sorted({g.lr or 0.0 for g in facts if g.batch_size == f.batch_size})
        styles.append(cycle[lrs.index(f.lr or 0.0) % len(cycle)])
    return styles


@styled
def probe_traces(
    run: Any,
    probes: Sequence[str] = ("grad_norm", "noise_scale", "dist_from_init", "lr"),
    x: str = "step",
    *,
    title: str | None = None,
) -> Figure:
    """Probe traces: one panel per probe column present, stacked, sharing the x axis.

    Args:
        run: a `Run` or `StoredRun` trained with probes.
        probes: step-table columns to show; those the run lacks are left out (at least one must
            be present). ``lr`` is always in the step table.
        x: ``step``, ``epoch``, ``samples_seen`` or ``seconds``.

    Returns:
        A figure with one axis per probe present, in the order given.
    """
    facts = run_facts(run)
    present = [p for p in probes if p in run.steps and run.steps[p].notna().any()]
    if not present:
        raise DataError(
            f"the run has none of the probes {', '.join(probes)}; train it with probes=[...] "
            f"(it has {', '.join(_plottable(run))})"
        )
    fig, axes = new_figure(len(present), 1, size=(6.4, 1.0 + 1.9 * len(present)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, column in zip(axes, present):
        xs, ys = curve(run, column, x, facts.steps_per_epoch)
        ax.plot(xs, ys, color="tab:purple", linewidth=1.0)
        ax.set_ylabel(metric_label(column))
        if column == "noise_scale" and np.all(ys[np.isfinite(ys)] > 0) and _spans_decades(ys):
            ax.set_yscale("log")
    axes[-1].set_xlabel(metric_label(x))
    axes[0].set_title(title if title is not None else f"Probes of {_run_title(facts)}")
    return fig


def _spans_decades(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 1 and finite.max() / finite.min() > 100 and not math.isclose(finite.min(), 0.0)


def seed_band(runs: Sequence[Any], column: str, x: str = "step") -> pd.DataFrame:
    """Median and range over seeds of one column, at the evaluation points the seeds share.

    The seeds of one batch size are evaluated at the same steps; one that stopped earlier (at its
    target) drops out there. Points where fewer than half the seeds remain are left out, so the
    median is always over most of them.

    Returns:
        Columns ``x``, ``median``, ``lo``, ``hi``, ``seeds`` (how many seeds at that point).
    """
    tables = []
    for i, run in enumerate(runs):
        xs, ys = curve(run, column, x)
        tables.append(pd.Series(ys, index=xs, name=i).groupby(level=0).last())
    wide = pd.concat(tables, axis=1).sort_index()  # (points, seeds), NaN after a seed stopped
    present = wide.notna().sum(axis=1)
    wide = wide[present * 2 >= len(runs)]
    return pd.DataFrame({"x": wide.index.to_numpy(float), "median": wide.median(axis=1).to_numpy(),
                         "lo": wide.min(axis=1).to_numpy(), "hi": wide.max(axis=1).to_numpy(),
                         "seeds": wide.notna().sum(axis=1).to_numpy()})


@styled
def best_lr_curves(
    runs_by_batch_size: dict[Any, Sequence[Any]],
    metric: str = "val_acc",
    *,
    target: float | None = None,
    target_text: str | None = None,
    n_train: int | None = None,
    recommended: Any = None,
) -> Figure:
    """Learning curves of each batch size at its best lr: median over seeds with a min–max band.

    Steps on a log axis, since they differ by orders of magnitude across batch sizes; the target
    drawn as a line, so where each curve crosses it is its steps-to-target. The title states the
    finding: how many steps the smallest and the largest batch size took to the target (medians).

    Args:
        runs_by_batch_size: ``{batch_size: [runs of its seeds at its best lr]}``.
        metric: the column (``val_acc``, ``train_loss``, ...).
        target: the target's value; ``target_text`` its condition (``val_acc>=0.5``) for the title.
        n_train: the training-set size, the value of batch size ``full``.
        recommended: the batch size the study recommends: its line is drawn thicker and its
            legend entry ends in ``recommended B = ...``.

    Returns:
        A figure with one median line (and band) per batch size, smallest B first.
    """
    if not runs_by_batch_size:
        raise DataError("no runs to draw; give each batch size's runs at its best lr")
    order = sorted(runs_by_batch_size, key=lambda b: batch_size_value(b, n_train))
    colors = batch_size_colors(order, n_train)
    fig, ax = new_figure(size=(7.6, 4.2))
    crossings = {}
    for batch_size in order:
        band = seed_band(runs_by_batch_size[batch_size], metric)
        band = band[band["x"] > 0]  # step 0 has no place on a log axis
        if band.empty:
            continue
        label = f"{batch_size_label(batch_size, n_train)} ({int(band['seeds'].max())} seeds)"
        chosen = recommended is not None and str(batch_size) == str(recommended)
        ax.fill_between(band["x"], band["lo"], band["hi"], color=colors[batch_size], alpha=0.18, linewidth=0)
        ax.plot(band["x"], band["median"], color=colors[batch_size], linewidth=3.2 if chosen else None,
                label=f"{label}: {recommended_label(recommended)}" if chosen else label)
        if target is not None:
            crossings[batch_size] = _first_crossing(band, target, metric)
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1.0, label=f"target {target_text or target}")
    ax.set_xscale("log")
    ax.set_xlabel(metric_label("step") + ", log scale")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(_crossing_title(crossings, metric, target_text, n_train))
    legend_below(ax, title="batch size (best lr)")
    return fig


def _first_crossing(band: pd.DataFrame, target: float, metric: str) -> float:
    met = band["median"] >= target if not metric.endswith("loss") else band["median"] <= target
    return float(band.loc[met, "x"].iloc[0]) if met.any() else math.nan


def _crossing_title(crossings: dict[Any, float], metric: str, target_text: str | None, n_train: int | None) -> str:
    reached = {b: s for b, s in crossings.items() if math.isfinite(s)}
    if len(reached) < 2:
        return f"{metric} at each batch size's best lr (median over seeds, band: range)"
    small, large = list(reached)[0], list(reached)[-1]
    return (f"Median {metric} reaches {target_text or 'the target'} in {reached[small]:,.0f} steps at "
            f"{batch_size_label(small, n_train)}, {reached[large]:,.0f} at {batch_size_label(large, n_train)}")
