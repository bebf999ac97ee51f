"""Figures: every result batchlab produces, as a matplotlib figure a person reads at a glance.

Each function takes tables (a run's ``steps``/``evals``/``epochs``, a study's summary) and returns a
`matplotlib.figure.Figure`. Figures are built without pyplot, so importing this package never
changes the user's matplotlib backend and works headless; `save_figure` writes PNG and SVG.

A shared style keeps them comparable: one colour scale that orders batch sizes (viridis over
log2 B, small batches dark, large ones bright), axes labelled with their units, fonts readable at
100% zoom. Every figure is fitted to its canvas when built (`fit_to_canvas`): long titles wrap,
crowded batch-size labels are thinned, legends go below the axes (`legend_below`); user strings are
drawn as written, while tick labels keep matplotlib's mathtext (10³ on log axes).

Modules:
    curves: learning curves of any metric view, several runs on one axis, the views overlay of
        ``explain``, probe traces.
    study: steps-, samples- and seconds-to-target, best lr and generalization gap vs batch size.
    gradnorm: the gradient-norm experiment (gradient norm vs batch size, with the theory).
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.text
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, NullFormatter, NullLocator

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
    "text.usetex": False,
}
LEGEND_FONT_POINTS = 9


def formatted_texts(fig: Figure) -> set[matplotlib.text.Text]:
    """The tick labels and offset texts of ``fig``: texts matplotlib's formatters write, not batchlab.

    A log axis's formatter writes its labels as mathtext (``$\\mathdefault{10^{3}}$``); they must
    stay mathtext, or the figure shows that markup instead of 10³.
    """
    texts: set[matplotlib.text.Text] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts.add(axis.offsetText)
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                texts.update((tick.label1, tick.label2))
    return texts


def as_plain_text(fig: Figure) -> Figure:
    """Show every text batchlab or the user wrote in ``fig`` as written: no mathtext, no TeX.

    Titles and legends carry user strings (run and study names, dataset paths); matplotlib would
    read ``$...$`` in them as mathtext and fail to draw the figure on ``$\\undefinedcmd$``, or draw
    ``a$x^2$b`` as a formula. No batchlab label uses mathtext (they use Unicode: ‖g_B‖₂), so nothing
    is lost. Tick labels and offset texts (`formatted_texts`) keep mathtext: matplotlib's log
    formatter writes 10³ in it. (Turning mathtext off for the whole figure, as the rc parameter
    ``text.parse_math`` does, printed ``$\\mathdefault{10^{3}}$`` on every log axis.)

    Returns:
        ``fig``, changed in place.
    """
    formatted = formatted_texts(fig)
    for text in fig.findobj(matplotlib.text.Text):
        if text not in formatted:
            text.set_parse_math(False)
        text.set_usetex(False)
    return fig


def styled(make_figure: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under batchlab's style (matplotlib applies most style when artists are made),
    with its written text shown as plain text (`as_plain_text`) and laid out to fit the canvas
    (`fit_to_canvas`)."""

    @functools.wraps(make_figure)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(_STYLE):
            return fit_to_canvas(as_plain_text(make_figure(*args, **kwargs)))

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = FIGURE_SIZE, **subplot_kw: Any):
    """A figure and its axes (an array when there is more than one); call it inside a `styled` function.

    Built without pyplot: it does not touch the user's backend or pyplot's figure list.
    """
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def legend_below(ax: Any, **kwargs: Any) -> Any:
    """The legend of ``ax`` below the axes, across the figure, in as many columns as fit its width.

    Beside the axes a legend of long labels took half the figure from the data; below them it
    takes a few lines of height. Constrained layout makes room for it.

    Returns:
        The figure legend.
    """
    fig = ax.get_figure()
    handles, labels = ax.get_legend_handles_labels()
    # About 0.6 em per character, plus the handle: how many labels fit side by side.
    chars_per_row = fig.get_figwidth() * 72 / (0.6 * LEGEND_FONT_POINTS)
    widest = max((len(label) for label in labels), default=1) + 8
    ncols = max(1, min(len(labels), int(chars_per_row // widest)))
    rows = math.ceil(len(labels) / ncols)
    if rows > 3:  # taller, rather than squeezing the axes: about 0.2 inch per legend line
        fig.set_figheight(fig.get_figheight() + 0.2 * (rows - 3))
    return fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=LEGEND_FONT_POINTS,
                      **kwargs)


def batch_size_axis(ax: Any, sizes: Sequence[float], labels: Sequence[str] | None = None) -> None:
    """A log2 x axis with a tick at each measured batch size, written plainly (``16``, not 2⁴).

    Only the x axis loses its minor ticks: a log y axis that spans less than a decade has its only
    labels there.
    """
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), list(labels) if labels is not None else [f"{b:g}" for b in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(metric_label("batch_size"))


# --- fitting the texts to the canvas -------------------------------------------------------------

_CANVAS_MARGIN = 4.0  # pixels kept free at the canvas edge
_FIT_ROUNDS = 5


def fit_to_canvas(fig: Figure) -> Figure:
    """Wrap titles wider than their room and thin tick labels that overlap, measured on the laid-out figure.

    A title is centred over its axes; a long one (a run name, a dataset path) ran off the canvas.
    Each round lays the figure out, measures, and changes what does not fit; constrained layout
    then makes room for the wrapped lines.

    Returns:
        ``fig``, changed in place.
    """
    originals: dict[Axis, list[str]] = {}
    for _ in range(_FIT_ROUNDS):
        fig.draw_without_rendering()
        changed = _wrap_titles(fig)
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                changed |= _thin_tick_labels(axis, originals)
        if not changed:
            break
    return fig


def _wrap_titles(fig: Figure) -> bool:
    """Wrap each axes title and the suptitle to its room; True when one changed."""
    width = fig.bbox.width
    changed = False
    for ax in fig.axes:
        centre = ax.title.get_window_extent().x0 + ax.title.get_window_extent().width / 2
        alone = not any(_beside(ax, other) for other in fig.axes if other is not ax)
        room = 2 * min(centre, width - centre) if alone else ax.get_window_extent().width
        changed |= _wrap(ax.title, room - 2 * _CANVAS_MARGIN)
    if fig._suptitle is not None:
        changed |= _wrap(fig._suptitle, width - 2 * _CANVAS_MARGIN)
    return changed


def _beside(ax: Any, other: Any) -> bool:
    """Whether two axes share a row (their vertical spans overlap), so that titles could collide."""
    a, b = ax.get_position(), other.get_position()
    return a.y0 < b.y1 and b.y0 < a.y1


def _wrap(text: matplotlib.text.Text, room: float) -> bool:
    """Break ``text`` into lines no wider than ``room`` pixels; True when it changed."""
    content = text.get_text()
    extent = text.get_window_extent()
    if not content or extent.width <= room:
        return False
    lines = content.split("\n")
    per_char = extent.width / max(len(line) for line in lines)
    limit = max(8, int(room / per_char) - 1)
    wrapped = "\n".join(textwrap.fill(line, limit, break_on_hyphens=False) for line in lines)
    if wrapped == content:
        return False
    text.set_text(wrapped)
    return True


def drawn_tick_labels(axis: Axis, minor: bool = False) -> list[matplotlib.text.Text]:
    """The tick labels of ``axis`` that the last draw showed: inside the view, visible, not empty."""
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    ticks = axis.get_minor_ticks(len(locs)) if minor else axis.get_major_ticks(len(locs))
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(low), abs(high), 1e-300)
    labels = []
    for tick in ticks:
        if low - slack <= tick.get_loc() <= high + slack:
            labels += [label for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text()]
    return labels


def overlapping(labels: Sequence[matplotlib.text.Text]) -> bool:
    """Whether any two of ``labels`` overlap on the canvas (touching edges allowed)."""
    boxes = [label.get_window_extent() for label in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5:
                return True
    return False


def _thin_tick_labels(axis: Axis, originals: dict[Axis, list[str]]) -> bool:
    """Leave out labels of an axis whose labels overlap; True when it changed.

    Fixed labels (the measured batch sizes) keep every k-th, counted from the largest, with k the
    smallest that stops the overlap; overlapping minor labels of a formatter are left out.
    """
    changed = False
    if overlapping(drawn_tick_labels(axis, minor=True)):
        axis.set_minor_formatter(NullFormatter())
        changed = True
    formatter = axis.get_major_formatter()
    if not isinstance(formatter, FixedFormatter) or not overlapping(drawn_tick_labels(axis)):
        return changed
    labels = originals.setdefault(axis, list(formatter.seq))
    shown = sum(1 for label in formatter.seq if label)
    step = max(2, math.ceil(len(labels) / max(shown - 1, 1)))
    n = len(labels)
    axis.set_major_formatter(FixedFormatter([label if (n - 1 - i) % step == 0 else "" for i, label in enumerate(labels)]))
    return True


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
    """A batch size as a number; ``"full"`` is the training-set size ``n_train`` (inf if unknown); a
    schedule's or an adaptive batch's (as stored: pairs, or a mapping) is its first."""
    if isinstance(batch_size, (list, tuple)) and batch_size:
        return batch_size_value(batch_size[0][1], n_train)
    if isinstance(batch_size, dict):
        return float(batch_size.get("start", math.nan))
    if batch_size == FULL_BATCH:
        return float(n_train) if n_train else math.inf
    return float(batch_size)


def batch_size_label(batch_size: Any, n_train: int | None = None) -> str:
    """``B=32``, ``B=full (500)``, ``B=32,600:64`` (a schedule), ``B=adaptive:start=8,max=128``."""
    if isinstance(batch_size, (list, tuple, dict)):
        from ..config import batch_size_text

        return f"B={batch_size_text(batch_size)}"
    if batch_size == FULL_BATCH:
        return f"B=full ({n_train})" if n_train else "B=full"
    value = float(batch_size)
    return f"B={int(value)}" if value == int(value) else f"B={value:g}"


def recommended_label(batch_size: Any) -> str:
    """``recommended B = 256``: how every figure names the batch size a study recommends."""
    return f"recommended B = {batch_size}"


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
    "batch_size_axis",
    "batch_size_colors",
    "batch_size_label",
    "batch_size_value",
    "best_lr_curves",
    "best_lr_figure",
    "compare_runs",
    "generalization_gap_figure",
    "gradnorm_figure",
    "learning_curves",
    "legend_below",
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
