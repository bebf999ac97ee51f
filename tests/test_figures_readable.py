"""Every figure the command line writes is readable, checked on matplotlib's own renderer.

The figures are drawn from small stored results (a study summary, a few runs, a gradient-norm
table), the way ``batchlab study``, ``explain``, ``gradnorm``, ``distance`` and ``report`` draw
them, at the PNG resolution a user opens. Each must show no mathtext markup as text (a log
axis's ``$\\mathdefault{10^{3}}$``), keep every text on the canvas, and keep the tick labels of an
axis apart. A user's name with ``$`` in it is drawn as written, not as a formula.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import matplotlib.text
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from batchlab import plots
from batchlab.plots.adaptive import adaptive_figure
from batchlab.plots.explain import explain_figure
from batchlab.plots.gradnorm import distance_figure, gradnorm_figure, loss_conventions_figure

HOSTILE = "a$x^2$b"
# What mathtext source looks like when it is drawn as text instead of being parsed.
MARKUP = re.compile(r"\\[A-Za-z]+\{|\\times|\\mathdefault|\^\{")
N_TRAIN = 4000
SIZES = (16, 32, 64, 128, 256, 512, 1024)
RECOMMENDED = 256


# --- the checks, on the renderer ----------------------------------------------------------------


def render(fig):
    """Lay out and draw ``fig`` with Agg at the resolution `save_figure` writes PNGs at."""
    fig.set_dpi(plots.PNG_DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def drawn_ticks(axis):
    """The ticks matplotlib drew on ``axis`` at the last draw (its own list, not ours)."""
    return axis._update_ticks()


def drawn_tick_labels(axis):
    return [label for tick in drawn_ticks(axis) for label in (tick.label1, tick.label2)
            if label.get_visible() and label.get_text()]  # fmt: skip


def drawn_texts(fig):
    """Every text the draw showed: tick labels of drawn ticks, and every other visible, non-empty text."""
    tick_texts = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in [*axis.majorTicks, *axis.minorTicks]:
                tick_texts.update((tick.label1, tick.label2))
    others = [t for t in fig.findobj(matplotlib.text.Text) if t not in tick_texts and _shown(t)]
    ticks = [label for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for label in drawn_tick_labels(axis)]
    return ticks, others


def _shown(text) -> bool:
    if not text.get_text() or not text.get_visible():
        return False
    artist = text
    while artist is not None:  # a legend's texts are hidden when the legend is
        if not artist.get_visible():
            return False
        artist = getattr(artist, "axes", None) if artist is text else None
    return True


def displayed(text) -> tuple[str, bool]:
    """What matplotlib draws for ``text``: the string and whether it parses it as mathtext."""
    return text._preprocess_math(text.get_text())


def problems(fig) -> list[str]:
    """Everything unreadable in ``fig``, in words (empty when it reads well)."""
    renderer = render(fig)
    canvas = fig.bbox
    ticks, others = drawn_texts(fig)
    found = []
    for text in [*ticks, *others]:
        shown, is_math = displayed(text)
        if not is_math and (MARKUP.search(shown) or (text in ticks and "$" in shown)):
            found.append(f"unparsed mathtext {shown!r}")
        box = text.get_window_extent(renderer)
        if box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1:
            found.append(f"off the canvas: {shown!r} at x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f} "
                         f"(canvas {canvas.width:.0f} x {canvas.height:.0f})")
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = drawn_tick_labels(axis)
            boxes = [label.get_window_extent(renderer) for label in labels]
            for i, a in enumerate(boxes):
                for j in range(i + 1, len(boxes)):
                    b = boxes[j]
                    if a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5:
                        found.append(f"{name} tick labels overlap: {labels[i].get_text()!r} and {labels[j].get_text()!r}")
    return found


def squeezed_axes(fig) -> list[str]:
    """Axes narrower than 60% of their share of the width (a legend beside them took the rest)."""
    render(fig)
    width = fig.bbox.width
    found = []
    for ax in fig.axes:
        box = ax.get_window_extent()
        row = [o for o in fig.axes if o.get_position().y0 < ax.get_position().y1 and ax.get_position().y0 < o.get_position().y1]
        if box.width < 0.6 * width / len(row):
            found.append(f"axes {ax.get_title()!r} is {box.width / width:.0%} of the width")
    return found


# --- small stored results ---------------------------------------------------------------------


def study_summary(shared_seconds: bool = True) -> pd.DataFrame:
    """A study summary with the columns the study writes, values shaped like a real study's."""
    b = np.array(SIZES, dtype=float)
    steps = 34 * (1 + 336 / b)
    seconds = np.array([0.51, 0.33, 0.29, 0.265, 0.355, 0.478, 0.495])
    return pd.DataFrame({
        "batch_size": list(SIZES), "batch_size_value": b, "best_lr": [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 0.4],
        "steps_to_target": steps, "steps_lo": steps * 0.9, "steps_hi": steps * 1.2,
        "steps_ci_lo": steps * 0.92, "steps_ci_hi": steps * 1.15, "steps_fit": steps,
        "steps_fit_lo": steps * 0.85, "steps_fit_hi": steps * 1.1,
        "samples_to_target": steps * b, "samples_lo": steps * b * 0.9, "samples_hi": steps * b * 1.2,
        "seconds_to_target": seconds, "seconds_lo": seconds * 0.8, "seconds_hi": seconds * 1.4,
        "seconds_shared": shared_seconds, "gen_gap": 0.03 + 0.01 * np.log2(b / 16),
        "gen_gap_lo": 0.02 + 0.01 * np.log2(b / 16), "gen_gap_hi": 0.05 + 0.01 * np.log2(b / 16),
    })  # fmt: skip


def recommendation(fastest=None) -> dict:
    """A recommendation as the store keeps it (`Recommendation.as_dict()`)."""
    return {"text": f"B = {RECOMMENDED}, lr = 0.4: ...", "batch_size": RECOMMENDED, "lr": 0.4, "supported": True,
            "fastest_batch_size": fastest, "fastest_seconds": 0.265 if fastest is not None else math.nan}


def study_figures(**kwargs):
    return plots.study_figures(study_summary(**kwargs), s_min=33.8, b_crit=336.0, n_train=N_TRAIN,
                               target="val_acc>=0.5", b_crit_interval=(186.0, 517.0),
                               recommendation=recommendation())  # fmt: skip


def stored_run(name="run 113", batch_size=32, lr=0.05, epochs=3, n_train=4000, seed=0, dense=True):
    """A stored-run-like object: step, eval and epoch tables, config and spec (`StoredRun`'s fields)."""
    rng = np.random.default_rng(seed)
    per_epoch = math.ceil(n_train / batch_size)
    steps = np.arange(1, per_epoch * epochs + 1)
    epoch = (steps - 1) // per_epoch + 1
    trend = 0.1 + 0.5 * (1 - np.exp(-steps / per_epoch))
    running = pd.Series(trend + rng.normal(0, 0.05, len(steps))).groupby(epoch).expanding().mean().to_numpy()
    step_table = pd.DataFrame({
        "step": steps, "epoch": epoch, "samples_seen": steps * batch_size, "batch_size": batch_size, "lr": lr,
        "seconds": steps * 0.002, "batch_acc": trend + rng.normal(0, 0.08, len(steps)), "running_acc": running,
        "batch_loss": 2.3 - 2 * trend + rng.normal(0, 0.1, len(steps)), "running_loss": 2.3 - 2 * running,
        "grad_norm": 1 + rng.random(len(steps)), "noise_scale": 10 ** rng.uniform(1, 4, len(steps)),
        "dist_from_init": np.sqrt(steps) * 0.1, "update_norm": rng.random(len(steps)) * 0.01,
    })  # fmt: skip
    eval_steps = np.unique(np.r_[0, np.arange(0, steps[-1] + 1, 5 if dense else per_epoch), steps[-1]])
    at = 0.1 + 0.5 * (1 - np.exp(-eval_steps / per_epoch))
    evals = pd.DataFrame({
        "step": eval_steps, "epoch": eval_steps / per_epoch, "samples_seen": eval_steps * batch_size,
        "seconds": eval_steps * 0.002, "train_acc": at + 0.02, "train_loss": 2.3 - 2 * at,
        "train_mode_acc": at, "train_mode_loss": 2.3 - 2 * at + 0.05, "val_acc": at, "val_loss": 2.35 - 2 * at,
    })  # fmt: skip
    epochs_table = evals[evals["step"] % per_epoch == 0].iloc[1:].reset_index(drop=True)
    return SimpleNamespace(id=113, name=name, steps=step_table, evals=evals, epochs=epochs_table,
                           config={"batch_size": batch_size, "lr": lr},
                           spec={"clock": {"n_train": n_train, "steps_per_epoch": per_epoch}})  # fmt: skip


def best_lr_seeds():
    """Each batch size's seeds at its best lr, their validation accuracy rising to the target."""
    return {b: [stored_run(batch_size=b, epochs=2, seed=s, dense=False) for s in range(2)] for b in (16, RECOMMENDED, 1024)}


def gradnorm_table(points=("epoch 0", "epoch 1")) -> pd.DataFrame:
    """`GradNormResult.table` from the theory of a known ‖G‖² and tr(Σ), with a little spread."""
    rows = []
    for k, point in enumerate(points):
        g_sq, trace = 0.05 * (k + 1), 8.0 + k
        for b in 2.0 ** np.arange(11):
            sq = g_sq + trace / b
            rows.append({"point": point, "batch_size": b, "trials": 10, "sq_norm_mean": sq, "sq_norm_lo": sq * 0.8,
                         "sq_norm_hi": sq * 1.2, "grad_norm_mean": math.sqrt(sq), "grad_norm_std": 0.1 * math.sqrt(sq),
                         "sum_norm_mean": b * math.sqrt(sq), "sum_norm_std": 0.1 * b * math.sqrt(sq),
                         "theory_sq_norm": sq, "theory_sq_norm_iid": g_sq + trace / b,
                         "theory_grad_norm": math.sqrt(sq)})  # fmt: skip
    return pd.DataFrame(rows)


def distance_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """`DistanceResult.curves` and `.final` for 4 batch sizes × 2 learning rates."""
    curves, final = [], []
    for b in (16, 64, 256, 1024):
        for lr in (0.01, 0.1):
            samples = np.arange(0, 8001, b)
            dist = lr * 40 * np.sqrt(samples / b) / 30
            curves += [{"batch_size": b, "lr": lr, "samples_seen": s, "dist_from_init": d} for s, d in zip(samples, dist)]
            final.append({"batch_size": b, "lr": lr, "samples_seen": 8000, "dist_from_init": dist[-1]})
    return pd.DataFrame(curves), pd.DataFrame(final)


def explanation_of(run):
    """The first boundary's numbers for the explain figure's marks (an `Explanation`'s fields)."""
    per_epoch = run.spec["clock"]["steps_per_epoch"]
    boundary = SimpleNamespace(step=per_epoch, running_start=0.5, running_end=0.3, true_end=0.45, running_jump=0.2,
                               true_change=0.0, lag=0.15)  # fmt: skip
    return SimpleNamespace(metric="acc", batch_gd=False, boundaries={"acc": (boundary,)})


def run_figures(name="run 113"):
    """The figures that draw a run's name: ``explain``'s and the run report's."""
    run = stored_run(name=name)
    return {
        "explain": explain_figure(run.steps, run.evals, explanation_of(run),
                                  title=f"Why the running mean jumps: {name}, mnist1d, mlp:hidden=256x256,dropout=0.3, "
                                        "B=32, lr=0.05, seed 0"),
        "report: learning curves": plots.learning_curves(run, "acc"),
        "report: views overlay": plots.views_overlay(run, "acc", "step"),
        "report: probe traces": plots.probe_traces(run, ("grad_norm", "noise_scale", "dist_from_init", "update_norm", "lr")),
    }  # fmt: skip


def cli_figures():
    """Every figure the command line writes, by the file (or report section) it goes to."""
    curves, final = distance_tables()
    figures = dict(study_figures())
    figures["learning_curves"] = plots.best_lr_curves(best_lr_seeds(), "val_acc", target=0.5, target_text="val_acc>=0.5",
                                                      n_train=N_TRAIN, recommended=RECOMMENDED)  # fmt: skip
    figures["gradnorm"] = gradnorm_figure(gradnorm_table())
    figures["gradnorm_conventions"] = loss_conventions_figure(gradnorm_table())
    figures["distance"] = distance_figure(curves, final)
    figures.update(run_figures())
    others = [stored_run(name=f"run B={b}", batch_size=b, seed=b, dense=False) for b in (16, 64, 256)]
    figures["report: group, steps"] = plots.compare_runs(others, "val_acc", "step", logx=True)
    figures["report: group, epochs"] = plots.compare_runs(others, "val_acc", "epoch")
    figures["report: adaptive batch size"] = adaptive_figure(*adaptive_tables(), signal="local_cbs",
                                                             title="run 7: mnist1d, mlp, adaptive from 16 to 1024")
    return figures


def adaptive_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables of a run whose batch grew 16 -> 64 -> 256, with epochs' short last batches."""
    sizes = [16] * 250 + [64] * 62 + [32] + [256] * 15 + [160]
    seen = np.cumsum(sizes)
    lrs = [1e-3 * (b if b in (16, 64, 256) else {32: 64, 160: 256}[b]) ** 0.5 / 4 for b in sizes]
    steps = pd.DataFrame({"step": np.arange(1, len(sizes) + 1), "samples_seen": seen, "batch_size": sizes, "lr": lrs})
    evals = pd.DataFrame({"step": [0, 250, 313, 329], "samples_seen": [0, 4000, 8000, 12000],
                          "adaptive_signal": [16.0, 64.0, 512.0, math.inf], "adaptive_batch_size": [16.0, 64, 256, 1024]})
    return steps, evals


# --- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figures():
    return cli_figures()


FIGURE_NAMES = ["steps_to_target", "samples_to_target", "seconds_to_target", "best_lr", "gen_gap", "learning_curves",
                "explain", "gradnorm", "gradnorm_conventions", "distance", "report: learning curves",
                "report: views overlay", "report: probe traces", "report: group, steps", "report: group, epochs",
                "report: adaptive batch size"]  # fmt: skip


@pytest.mark.parametrize("name", FIGURE_NAMES)
def test_every_cli_figure_reads_well(figures, name):
    assert problems(figures[name]) == []


def test_the_list_of_figures_is_every_one_the_study_writes(figures):
    assert set(FIGURE_NAMES) == set(figures)
    study_files = {"steps_to_target", "samples_to_target", "seconds_to_target", "best_lr", "gen_gap", "learning_curves"}
    assert study_files <= set(figures)


@pytest.mark.parametrize("name", ["steps_to_target", "samples_to_target", "seconds_to_target", "best_lr", "gen_gap",
                                  "learning_curves"])  # fmt: skip
def test_study_figures_keep_their_width_for_the_data(figures, name):
    assert squeezed_axes(figures[name]) == []


@pytest.mark.parametrize("name", ["steps_to_target", "samples_to_target", "best_lr", "learning_curves"])
def test_log_axes_label_their_ticks_as_rendered_powers(figures, name):
    """The log axis's labels are mathtext that matplotlib parses (10³), and there are at least two."""
    fig = figures[name]
    render(fig)
    ax = fig.axes[0]
    axis = ax.xaxis if ax.get_xscale() == "log" and name == "learning_curves" else ax.yaxis
    labels = drawn_tick_labels(axis)
    assert len(labels) >= 2, [label.get_text() for label in labels]
    assert any(displayed(label)[1] for label in labels)  # 10^k, parsed


def test_the_seconds_figure_has_y_tick_labels_within_one_decade(figures):
    """Seconds from 0.2 to 0.7 s span less than a decade: the labels are then on minor ticks."""
    fig = figures["seconds_to_target"]
    render(fig)
    labels = drawn_tick_labels(fig.axes[0].yaxis)
    assert len(labels) >= 3, [label.get_text() for label in labels]
    # Plain numbers (0.3, not 3×10⁻¹), each the value of its tick.
    for label in labels:
        assert float(label.get_text()) == pytest.approx(label.get_position()[1], rel=1e-9), label.get_text()


def test_every_study_figure_marks_the_recommended_batch_size(figures):
    for name in ("steps_to_target", "samples_to_target", "seconds_to_target", "best_lr", "gen_gap"):
        ax = figures[name].axes[0]
        marks = [line for line in ax.get_lines() if line.get_label() == f"recommended B = {RECOMMENDED}"]
        assert len(marks) == 1, name
        assert set(marks[0].get_xdata()) == {RECOMMENDED}
        legend = figures[name].legends[0]
        assert f"recommended B = {RECOMMENDED}" in [t.get_text() for t in legend.get_texts()]
    curves = figures["learning_curves"].axes[0]
    chosen = [line for line in curves.get_lines() if line.get_label().endswith(f"recommended B = {RECOMMENDED}")]
    assert len(chosen) == 1 and chosen[0].get_label().startswith(f"B={RECOMMENDED} ")


def test_nothing_is_marked_where_the_study_recommends_nothing():
    fig = plots.steps_to_target_figure(study_summary(), 33.8, 336.0, n_train=N_TRAIN,
                                       recommendation={"text": "No recommendation: ...", "batch_size": None})
    assert not [line for line in fig.axes[0].get_lines() if "recommended" in line.get_label()]


def test_the_seconds_figure_names_a_fastest_batch_only_where_the_recommendation_does(figures):
    refused = figures["seconds_to_target"].axes[0].get_title()  # seconds_shared, as in the summary
    assert "fastest" in refused and "Fastest" not in refused and "B=128" not in refused
    assert "shared the cores" in refused
    named = plots.seconds_to_target_figure(study_summary(shared_seconds=False), target="val_acc>=0.5",
                                           recommendation=recommendation(fastest=128)).axes[0].get_title()
    assert " ".join(named.split()) == "Fastest to val_acc>=0.5 on this machine: B=128 (0.265 s of training)"
    plain = plots.seconds_to_target_figure(study_summary(shared_seconds=False), target="val_acc>=0.5").axes[0].get_title()
    assert "astest" not in plain  # no recommendation given: no batch size is called fastest


def test_a_hostile_run_name_is_drawn_as_written():
    """``a$x^2$b`` in a run name is neither parsed (x²) nor breaks the figure, and log ticks still parse."""
    figures = run_figures(name=f"run {HOSTILE}")
    for name, fig in figures.items():
        assert problems(fig) == [], name
        shown = [displayed(t) for t in drawn_texts(fig)[1] if HOSTILE in t.get_text().replace("\n", "")]
        assert shown, f"{name}: the name is not drawn"
        assert all(not is_math and HOSTILE in text.replace("\n", "") for text, is_math in shown), shown
    noise = figures["report: probe traces"].axes[1]
    assert noise.get_yscale() == "log" and any(displayed(label)[1] for label in drawn_tick_labels(noise.yaxis))


def test_a_long_title_is_wrapped_onto_the_canvas():
    name = "run 1234 " + "with-a-rather-long-descriptive-name " * 3
    fig = plots.learning_curves(stored_run(name=name), "acc")
    assert problems(fig) == []
    assert "\n" in fig.axes[0].get_title()


def test_crowded_batch_size_labels_are_thinned_from_the_largest():
    """Eleven sizes 1..1024 on a narrow panel: every other label is kept, counted from the largest."""
    fig = gradnorm_figure(gradnorm_table(points=("epoch 0",)))
    render(fig)
    texts = [label.get_text() for label in drawn_tick_labels(fig.axes[0].xaxis)]
    assert texts[-1] == "1024" and problems(fig) == []
    kept = [float(t) for t in texts]
    assert all(b / a == kept[1] / kept[0] for a, b in zip(kept, kept[1:]))  # evenly spaced on the log2 axis


def test_a_study_report_from_the_store_shows_the_stored_recommendation(tmp_path):
    """The store keeps the recommendation as a mapping (`Recommendation.as_dict()`): the report
    shows its text and its figures mark its batch size."""
    import html

    from batchlab.report import build_report
    from batchlab.store import RunStore

    summary = study_summary()
    text = f"B = {RECOMMENDED}, lr = 0.4: reaches val_acc>=0.5 in 80 steps."
    with RunStore(tmp_path / "lab.db") as store:
        group = store.create_group("study", "s", {"target": "val_acc>=0.5", "n_train": N_TRAIN})
        store.finish_group(group, summary={"summary": summary.to_dict(orient="records"),
                                           "recommendation": {**recommendation(), "text": text},
                                           "fit": {"s_min": 33.8, "b_crit": 336.0}})  # fmt: skip
        report = build_report(store, f"study:{group}")
    assert "<h2>Recommendation" in report.html and html.escape(text) in report.html
    assert report.html.count("<img ") == 5  # the five study figures (no trials: no learning curves)
