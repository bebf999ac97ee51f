"""The figure of ``batchlab advise``: the local critical batch size over training, beside B_simple.

Against samples seen: each measurement's local critical batch size as a bar from the largest batch
shown no worse to the smallest shown worse (an arrow up where none was), B_simple at the same
weights, the run's batch size, and the recommended batch size (a ramp where it grows).
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from . import legend_below, new_figure, styled

_COLORS = {"cbs": "#1b4f9c", "b_simple": "#d95f02", "run": "0.45", "ramp": "#1b9e77"}


@styled
def advise_figure(advice: Any, *, title: str | None = None) -> Figure:
    """Local CBS intervals, B_simple and the recommended batch size against samples seen (log2 y).

    Args:
        advice: a `batchlab.critical_batch.BatchAdvice`.
        title: the axes title.
    """
    fig, ax = new_figure(size=(7.0, 4.6))
    points = advice.points
    x = points.samples_seen.to_numpy(dtype=float)
    lower = points.local_cbs.to_numpy(dtype=float)
    upper = points.local_cbs_upper.to_numpy(dtype=float)
    closed = [math.isfinite(u) for u in upper]
    for i, (start, low, high) in enumerate(zip(x, lower, upper)):
        top = high if closed[i] else low * 2  # an open interval: an arrow up by one factor of 2
        ax.annotate("", xy=(start, top), xytext=(start, low),
                    arrowprops={"arrowstyle": "-[" if closed[i] else "->", "color": _COLORS["cbs"], "lw": 1.4})
    ax.plot(x, lower, "o", color=_COLORS["cbs"],
            label="local critical batch size: largest batch no worse (bar: up to the first batch worse)")
    ax.plot(x, points.b_simple.to_numpy(dtype=float), "s--", color=_COLORS["b_simple"], markersize=5,
            label="B_simple = tr(Σ)/‖G‖² at the same weights")
    ax.axhline(advice.batch_size, color=_COLORS["run"], linestyle=":", label=f"the run's batch size {advice.batch_size}")
    ramp_x, ramp_y = _ramp_steps(advice.ramp, x[-1])
    ax.step(ramp_x, ramp_y, where="post", color=_COLORS["ramp"], linewidth=2.2, alpha=0.8,
            label="recommended batch size" + (" (ramp)" if len(advice.ramp) > 1 else ""))
    _power_of_two_axis(ax, [*lower, *[u for u in upper if math.isfinite(u)], *(2 * lower),
                            *points.b_simple.to_numpy(dtype=float), advice.batch_size])
    ax.set_xlabel("samples seen")
    ax.set_ylabel("batch size")
    ax.margins(x=0.05)
    if title:
        ax.set_title(title)
    legend_below(ax)
    return fig


def _power_of_two_axis(ax: Any, values: list[float]) -> None:
    """A log2 y axis spanning ``values`` with a tick at each power of two, written plainly (``64``, not 2⁶)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    low, high = math.floor(math.log2(min(finite))), math.ceil(math.log2(max(finite)))
    ax.set_yscale("log", base=2)
    ax.set_yticks([2.0**k for k in range(low, high + 1)], [f"{2**k:g}" for k in range(low, high + 1)])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(2.0 ** (low - 0.15), 2.0 ** (high + 0.15))


def _ramp_steps(ramp: list[dict], last: float) -> tuple[list[float], list[float]]:
    """The ramp as a step line ending at the last measurement."""
    xs = [float(r["from_samples"]) for r in ramp] + [last]
    ys = [float(r["batch_size"]) for r in ramp] + [float(ramp[-1]["batch_size"])]
    return xs, ys
