"""Figures: every result batchlab produces, as a matplotlib figure a person reads at a glance.

Each function takes tables (a run's ``steps``/``evals``/``epochs``, a study's summary) and returns a
`matplotlib.figure.Figure`. Figures are built without pyplot, so importing this package never
changes the user's matplotlib backend and works headless; `save_figure` writes PNG and SVG.

A shared style keeps them comparable: one colour scale that orders batch sizes (viridis over
log2 B, small batches dark, large ones bright), axes labelled with their units, fonts readable at
100% zoom.

Modules:
    curves: learning curves of any metric view, several runs on one axis, the views overlay of
        ``explain``, probe traces.
    study: steps-, samples- and seconds-to-target, best lr and generalization gap vs batch size.
    gradnorm: the gradient-norm experiment (gradient norm vs batch size, with the theory).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.text
from matplotlib.figure import Figure

PNG_DPI = 150
FIGURE_SIZE = (6.4, 4.0)  # inches: 960 x 600 pixels at PNG_DPI
FULL_BATCH = "full"

# Labels with units for the columns batchlab writes (DESIGN.md §2).
AXIS_LABELS = {
    "epoch": "epoch (passes over the training set)",
    "step": "step (parameter updates)",
    "samples_seen": "samples seen",
    "seconds": "training time (s)",
    "batch_size": "batch size B (samples per update)",
    "lr": "learning rate",
    "grad_norm": "gradient norm ‖g_B‖₂",
    "noise_scale": "gradient noise scale B_simple (samples)",
    "dist_from_init": "distance from init ‖θ_t − θ_0‖₂",
    "update_norm": "update norm ‖θ_t − θ_{t−1}‖₂",
}
VIEW_NAMES = {
    "batch": "batch (pre-update, train mode)",
    "running": "running mean (Keras)",
    "train": "train (full pass)",
    "val": "validation (full pass)",
    "test": "test (full pass)",
}

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "svg.fonttype": "none",  # text stays text in SVG: smaller and searchable
    "text.parse_math": False,  # see as_plain_text
    "text.usetex": False,
}


def as_plain_text(fig: Figure) -> Figure:
    """Show every text of ``fig`` as written: no mathtext, no TeX.

    Titles and legends carry user strings (run and study names, dataset paths); matplotlib would
    read ``$...$`` in them as mathtext and fail to draw the figure on ``$\\undefinedcmd$``. No
    batchlab label uses mathtext (they use Unicode: ‖g_B‖₂), so nothing is lost.

    Returns:
        ``fig``, changed in place.
    """
    for text in fig.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
        text.set_usetex(False)
    return fig


def styled(make_figure: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under batchlab's style (matplotlib applies most style when artists are made),
    with all its text shown as plain text (`as_plain_text`)."""

    @functools.wraps(make_figure)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(_STYLE):
            return as_plain_text(make_figure(*args, **kwargs))

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = FIGURE_SIZE, **subplot_kw: Any):
    """A figure and its axes (an array when there is more than one); call it inside a `styled` function.

    Built without pyplot: it does not touch the user's backend or pyplot's figure list.
    """
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """The legend to the right of the axes, outside the data (constrained layout makes room for it)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def metric_label(column: str) -> str:
    """An axis label with units for a column name (``val_acc`` -> ``accuracy (fraction correct)``)."""
    if column in AXIS_LABELS:
        return AXIS_LABELS[column]
    if column.endswith("_acc") or column == "acc":
        return "accuracy (fraction correct)"
    if column.endswith("_loss") or column == "loss":
        return "loss (mean per sample)"
    return column.replace("_", " ")


def batch_size_value(batch_size: Any, n_train: int | None = None) -> float:
    """A batch size as a number; ``"full"`` is the training-set size ``n_train`` (inf if unknown)."""
    if batch_size == FULL_BATCH:
        return float(n_train) if n_train else math.inf
    return float(batch_size)


def batch_size_label(batch_size: Any, n_train: int | None = None) -> str:
    """``B=32``, ``B=full (500)``."""
    if batch_size == FULL_BATCH:
        return f"B=full ({n_train})" if n_train else "B=full"
    value = float(batch_size)
    return f"B={int(value)}" if value == int(value) else f"B={value:g}"


def batch_size_colors(batch_sizes: Iterable[Any], n_train: int | None = None, cmap: str = "viridis") -> dict[Any, tuple]:
    """One colour per batch size, ordered by log2 B so that the colour scale reads as the batch size.

    Args:
        batch_sizes: ints, or ``"full"`` (placed one octave above the largest given size unless
            ``n_train`` is known).
        n_train: the training-set size, the value of ``"full"``.
        cmap: a matplotlib colormap; its top 10% is left out (too pale on white).

    Returns:
        ``{batch_size: RGBA tuple}`` for every distinct batch size given.
    """
    sizes = list(dict.fromkeys(batch_sizes))
    numeric = [batch_size_value(b, n_train) for b in sizes]
    finite = [v for v in numeric if math.isfinite(v)]
    top = max(finite, default=1.0)
    numeric = [v if math.isfinite(v) else 2 * top for v in numeric]
    logs = [math.log2(max(v, 1e-12)) for v in numeric]
    low, high = min(logs, default=0.0), max(logs, default=0.0)
    colormap = matplotlib.colormaps[cmap]
    span = high - low
    return {b: colormap(0.9 * ((x - low) / span if span > 0 else 0.0)) for b, x in zip(sizes, logs)}


def save_figure(fig: Figure, path_without_suffix: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` (150 dpi) and ``<path>.svg``; returns the files written.

    The parent directory is made if missing.
    """
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = base.with_name(base.name + "." + fmt)
        fig.savefig(target, format=fmt, dpi=PNG_DPI)
        written.append(target)
    return written


from .gradnorm import gradnorm_figure  # noqa: E402
from .curves import best_lr_curves, compare_runs, learning_curves, probe_traces, views_overlay  # noqa: E402
from .study import (  # noqa: E402
    best_lr_figure,
    generalization_gap_figure,
    samples_to_target_figure,
    seconds_to_target_figure,
    steps_to_target_figure,
    study_figures,
)

__all__ = [
    "AXIS_LABELS",
    "batch_size_colors",
    "batch_size_label",
    "batch_size_value",
    "best_lr_curves",
    "best_lr_figure",
    "compare_runs",
    "generalization_gap_figure",
    "gradnorm_figure",
    "learning_curves",
    "legend_outside",
    "metric_label",
    "new_figure",
    "probe_traces",
    "samples_to_target_figure",
    "save_figure",
    "seconds_to_target_figure",
    "steps_to_target_figure",
    "study_figures",
    "views_overlay",
]
