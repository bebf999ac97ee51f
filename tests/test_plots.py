"""Figures: each draws exactly the table values it is given, with labelled axes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch

from batchlab import plots
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.errors import DataError
from batchlab.loop import fit


def fake_run(batch_size=10, lr=0.1, n_train=100, epochs=3, name="r", probes=True, seed=0):
    """A run-like object with known tables: steps_per_epoch = ceil(n_train / batch_size)."""
    rng = np.random.default_rng(seed)
    per_epoch = math.ceil(n_train / batch_size)
    steps = np.arange(1, per_epoch * epochs + 1)
    step_table = pd.DataFrame({
        "step": steps, "epoch": (steps - 1) // per_epoch + 1, "samples_seen": np.minimum(steps * batch_size, 10**9),
        "batch_size": batch_size, "lr": lr, "batch_loss": rng.random(len(steps)), "batch_acc": rng.random(len(steps)),
        "running_loss": rng.random(len(steps)), "running_acc": rng.random(len(steps)), "seconds": steps * 0.01,
    })  # fmt: skip
    if probes:
        step_table["grad_norm"] = rng.random(len(steps))
        step_table.loc[step_table.index % 2 == 1, "grad_norm"] = np.nan  # measured every other step
        step_table["dist_from_init"] = np.sqrt(steps)
    eval_steps = np.arange(0, epochs + 1) * per_epoch
    evals = pd.DataFrame({
        "step": eval_steps, "epoch": np.arange(0, epochs + 1), "samples_seen": eval_steps * batch_size,
        "seconds": eval_steps * 0.01, "train_loss": rng.random(epochs + 1), "train_acc": rng.random(epochs + 1),
        "val_loss": rng.random(epochs + 1), "val_acc": rng.random(epochs + 1),
    })  # fmt: skip
    epochs_table = evals.iloc[1:].rename(columns={}).reset_index(drop=True)
    return SimpleNamespace(
        id=None, name=name, steps=step_table, evals=evals, epochs=epochs_table,
        config={"batch_size": batch_size, "lr": lr},
        spec={"clock": {"n_train": n_train, "steps_per_epoch": per_epoch}},
    )  # fmt: skip


def labelled(ax) -> bool:
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def test_learning_curves_plot_the_eval_columns_at_step_over_steps_per_epoch():
    run = fake_run(batch_size=10, n_train=95)  # 10 steps per epoch, the last batch partial
    fig = plots.learning_curves(run, "acc", "epoch", ("train", "val"))
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == [plots.VIEW_NAMES["train"], plots.VIEW_NAMES["val"]]
    np.testing.assert_array_equal(lines[0].get_xdata(), [0, 1, 2, 3])
    np.testing.assert_array_equal(lines[0].get_ydata(), run.evals["train_acc"])
    np.testing.assert_array_equal(lines[1].get_ydata(), run.evals["val_acc"])
    assert labelled(ax) and "accuracy" in ax.get_ylabel() and "epoch" in ax.get_xlabel()


def test_running_view_on_an_epoch_axis_is_fractional_inside_each_epoch():
    run = fake_run(batch_size=25, n_train=100)  # 4 steps per epoch
    fig = plots.learning_curves(run, "loss", "epoch", ("running",))
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_allclose(line.get_xdata()[:5], [0.25, 0.5, 0.75, 1.0, 1.25])
    np.testing.assert_array_equal(line.get_ydata(), run.steps["running_loss"])


@pytest.mark.parametrize("x", ["step", "samples_seen", "seconds"])
def test_learning_curves_against_other_axes_use_that_column(x):
    run = fake_run()
    fig = plots.learning_curves(run, "loss", x, ("batch", "val"))
    batch, val = fig.axes[0].get_lines()
    np.testing.assert_array_equal(batch.get_xdata(), run.steps[x])
    np.testing.assert_array_equal(val.get_xdata(), run.evals[x])
    assert fig.axes[0].get_xlabel() == plots.AXIS_LABELS[x]


def test_missing_views_are_left_out_and_none_at_all_is_a_data_error():
    run = fake_run()
    fig = plots.learning_curves(run, "acc", "step", ("train", "test", "val"))
    assert len(fig.axes[0].get_lines()) == 2
    with pytest.raises(DataError, match="test_acc"):
        plots.learning_curves(run, "acc", "step", ("test",))
    with pytest.raises(DataError, match="unknown x axis"):
        plots.learning_curves(run, "acc", "hours")


def test_views_overlay_draws_four_views_and_a_boundary_per_epoch():
    run = fake_run(batch_size=10, n_train=100, epochs=4)
    ax = plots.views_overlay(run, "acc", "step").axes[0]
    views = [l for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert len(views) == 4
    boundaries = [l for l in ax.get_lines() if l.get_label().startswith("_")]
    assert sorted(l.get_xdata()[0] for l in boundaries) == [10, 20, 30]


def test_compare_runs_one_line_per_run_coloured_in_batch_size_order():
    runs = [fake_run(batch_size=b, lr=lr, seed=i) for i, (b, lr) in enumerate([(50, 0.1), (1, 0.1), (10, 0.1), (10, 0.3)])]
    fig = plots.compare_runs(runs, ("train_acc", "val_acc"), "epoch")
    assert len(fig.axes) == 2
    for ax, column in zip(fig.axes, ("train_acc", "val_acc")):
        lines = ax.get_lines()
        assert [l.get_label() for l in lines] == ["B=1, lr=0.1", "B=10, lr=0.1", "B=10, lr=0.3", "B=50, lr=0.1"]
        np.testing.assert_array_equal(lines[0].get_ydata(), runs[1].evals[column])
        assert lines[1].get_linestyle() != lines[2].get_linestyle()  # same B, different lr
        assert lines[1].get_color() == lines[2].get_color()
        assert ax.get_xlabel()
    assert fig.axes[0].get_ylabel()
    # The colour scale orders batch sizes: viridis gets brighter as B grows.
    luminance = [np.dot(matplotlib.colors.to_rgb(l.get_color()), [0.299, 0.587, 0.114]) for l in fig.axes[0].get_lines()]
    assert luminance[0] < luminance[1] < luminance[3]


def test_batch_size_colors_follow_log2_b_and_place_full_last():
    colors = plots.batch_size_colors([64, 1, "full", 8], n_train=512)
    viridis = matplotlib.colormaps["viridis"]
    assert colors[1] == viridis(0.0) and colors["full"] == viridis(0.9)
    assert colors[8] == viridis(0.9 * 3 / 9) and colors[64] == viridis(0.9 * 6 / 9)  # log2: 0, 3, 6, 9
    assert plots.batch_size_colors(["full", 4])["full"] == viridis(0.9)  # n_train unknown: still last


def test_probe_traces_one_panel_per_present_probe_with_unmeasured_steps_left_out():
    run = fake_run()
    fig = plots.probe_traces(run, ("grad_norm", "noise_scale", "dist_from_init", "lr"))
    assert len(fig.axes) == 3  # the run has no noise_scale
    grad = fig.axes[0].get_lines()[0]
    measured = run.steps["grad_norm"].notna()
    np.testing.assert_array_equal(grad.get_xdata(), run.steps.loc[measured, "step"])
    np.testing.assert_array_equal(grad.get_ydata(), run.steps.loc[measured, "grad_norm"])
    assert all(ax.get_ylabel() for ax in fig.axes) and fig.axes[-1].get_xlabel()
    with pytest.raises(DataError, match="probes"):
        plots.probe_traces(fake_run(probes=False), ("grad_norm",))


def study_lines(ax, *labels):
    """The measured points (the error-bar container's data line), then the lines whose label starts so."""
    points = ax.containers[0].lines[0]
    named = [next(l for l in ax.get_lines() if l.get_label().startswith(label)) for label in labels]
    return [points, *named]


def study_summary():
    sizes = np.array([1, 4, 16, 64, 256])
    steps = 100 * (1 + 30 / sizes)
    return pd.DataFrame({
        "batch_size": [1, 4, 16, 64, "full"], "best_lr": [0.01, 0.02, 0.05, 0.1, 0.2],
        "steps_to_target": steps, "steps_lo": steps * 0.9, "steps_hi": steps * 1.2,
        "samples_to_target": steps * sizes, "seconds_to_target": steps * 0.01, "gen_gap": [0.0, 0.01, 0.02, 0.04, 0.08],
    })  # fmt: skip


def test_steps_to_target_points_perfect_scaling_and_fit():
    summary = study_summary()
    fig = plots.steps_to_target_figure(summary, s_min=100, b_crit=30, n_train=256)
    ax = fig.axes[0]
    points, perfect, fitted = study_lines(ax, "perfect", "fit")
    np.testing.assert_array_equal(points.get_xdata(), [1, 4, 16, 64, 256])
    np.testing.assert_array_equal(points.get_ydata(), summary["steps_to_target"])
    b = perfect.get_xdata()
    np.testing.assert_allclose(perfect.get_ydata(), 3100 / b)  # through (1, 3100), slope -1
    np.testing.assert_allclose(fitted.get_ydata(), 100 * (1 + 30 / b))
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and labelled(ax)
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "full\n(256)"
    with pytest.raises(DataError, match="n_train"):
        plots.steps_to_target_figure(summary)


def test_samples_to_target_fit_is_e_min_times_one_plus_b_over_b_crit():
    fig = plots.samples_to_target_figure(study_summary(), e_min=3000, b_crit=30, n_train=256)
    points, flat, fitted = study_lines(fig.axes[0], "perfect", "fit")
    np.testing.assert_allclose(flat.get_ydata(), study_summary()["samples_to_target"][0])
    np.testing.assert_array_equal(points.get_ydata(), study_summary()["samples_to_target"])
    np.testing.assert_allclose(fitted.get_ydata(), 3000 * (1 + fitted.get_xdata() / 30))
    assert labelled(fig.axes[0])


def test_best_lr_against_linear_and_square_root_rules_from_the_smallest_batch():
    fig = plots.best_lr_figure(study_summary(), n_train=256)
    points, linear, sqrt = study_lines(fig.axes[0], "linear", "square-root")
    np.testing.assert_array_equal(points.get_ydata(), [0.01, 0.02, 0.05, 0.1, 0.2])
    b = linear.get_xdata()
    np.testing.assert_allclose(linear.get_ydata(), 0.01 * b)
    np.testing.assert_allclose(sqrt.get_ydata(), 0.01 * np.sqrt(b))
    assert labelled(fig.axes[0])


def test_generalization_gap_and_study_figures_by_available_columns():
    summary = study_summary()
    fig = plots.generalization_gap_figure(summary, n_train=256)
    np.testing.assert_array_equal(study_lines(fig.axes[0])[0].get_ydata(), summary["gen_gap"])
    figures = plots.study_figures(summary.drop(columns=["seconds_to_target"]), s_min=100, b_crit=30, n_train=256)
    assert set(figures) == {"steps_to_target", "samples_to_target", "best_lr", "gen_gap"}
    e_fit = study_lines(figures["samples_to_target"].axes[0], "fit")[1]
    np.testing.assert_allclose(e_fit.get_ydata(), 3000 * (1 + e_fit.get_xdata() / 30))  # E_min = S_min * B_crit


def test_save_figure_writes_png_and_svg(tmp_path):
    fig = plots.learning_curves(fake_run())
    written = plots.save_figure(fig, tmp_path / "sub" / "curves")
    assert [p.name for p in written] == ["curves.png", "curves.svg"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in written[1].read_bytes()[:500]
    from PIL import Image

    assert Image.open(written[0]).size == (960, 600)  # 6.4 x 4 inches at 150 dpi


def test_figures_from_a_real_fit():
    torch.set_num_threads(1)
    ds = load_dataset("blobs")
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, ds.n_classes))
    run = fit(model, ds, TrainConfig(batch_size=50, epochs=3, lr=0.1), probes=["grad_norm", "dist_from_init"],
              progress=False)  # fmt: skip
    fig = plots.learning_curves(run, "acc", "epoch")
    np.testing.assert_array_equal(fig.axes[0].get_lines()[1].get_ydata(), run.evals["val_acc"])
    np.testing.assert_array_equal(fig.axes[0].get_lines()[1].get_xdata(), [0, 1, 2, 3])
    assert len(plots.probe_traces(run).axes) == 3  # grad_norm, dist_from_init, lr
    assert len(plots.compare_runs([run], "dist_from_init", "samples_seen").axes[0].get_lines()) == 1


def test_gradnorm_figure_series_per_point_and_theory_line():
    sizes = np.array([1, 4, 16, 64])
    table = pd.concat([
        pd.DataFrame({"point": point, "batch_size": sizes, "sq_norm_mean": g + t / sizes,
                      "sq_norm_lo": 0.9 * (g + t / sizes), "sq_norm_hi": 1.1 * (g + t / sizes),
                      "grad_norm_mean": np.sqrt(g + t / sizes)})
        for point, g, t in (("epoch 2", 1.0, 8.0), ("epoch 30", 0.1, 2.0))
    ])  # fmt: skip
    fig = plots.gradnorm_figure(table, theory={"epoch 2": (1.0, 8.0)})
    sq, norm = fig.axes
    assert len(sq.containers) == 2 and len(norm.containers) == 2
    np.testing.assert_allclose(sq.containers[1].lines[0].get_ydata(), 0.1 + 2.0 / sizes)
    np.testing.assert_allclose(norm.containers[0].lines[0].get_ydata(), np.sqrt(1 + 8.0 / sizes))
    theory = next(l for l in sq.get_lines() if "tr(Σ)" in l.get_label())
    np.testing.assert_allclose(theory.get_ydata(), 1.0 + 8.0 / theory.get_xdata())
    assert theory.get_color() == sq.containers[0].lines[0].get_color()
    assert labelled(sq) and labelled(norm)
    with pytest.raises(DataError, match="sq_norm_mean"):
        plots.gradnorm_figure(table.drop(columns=["sq_norm_mean"]))


def test_gradnorm_figure_draws_theory_columns_of_the_table():
    sizes = np.array([2.0, 8.0, 32.0])
    table = pd.DataFrame({"point": "end", "batch_size": sizes, "sq_norm_mean": 1 + 4 / sizes,
                          "theory_sq_norm": 1.1 + 4 / sizes})  # fmt: skip
    (ax,) = plots.gradnorm_figure(table).axes
    theory = next(l for l in ax.get_lines() if l.get_label() == "end: theory")
    np.testing.assert_allclose(theory.get_ydata(), 1.1 + 4 / sizes)


# --- every study figure reads at a glance ------------------------------------------------------


def data_points_in_display(ax) -> np.ndarray:
    """Every drawn data point (lines, markers, bands) in display coordinates, (n, 2)."""
    points = [line.get_xydata() for line in ax.get_lines()]
    points += [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    points += [p.vertices for c in ax.collections for p in c.get_paths()]
    xy = np.vstack([p for p in points if len(p)]).astype(float)
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    return ax.transData.transform(xy)


def assert_reads_at_a_glance(fig):
    """Labelled axes with ticks, a title, and a legend whose box covers no data point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # constrained layout places everything
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        assert labelled(ax) and ax.get_xticks().size and ax.get_yticks().size
        visible_ticks = [t for t in ax.get_xticklabels() if t.get_text()]
        assert visible_ticks, "the x axis has no tick labels"
        for legend in [ax.get_legend(), *fig.legends]:  # the axes' own legend, and one below the axes
            if legend is not None:
                box = legend.get_window_extent(renderer)
                inside = [box.contains(x, y) for x, y in data_points_in_display(ax)]
                assert not any(inside), "the legend covers data"
    assert any(ax.get_title() for ax in fig.axes) or fig._suptitle is not None


def measured_summary():
    from batchlab.study import analyse, trials_table

    rng = np.random.default_rng(0)
    rows = []
    for b in (16, 32, 64, 128, 256, 512, 1024):
        for lr in (0.05, 0.1, 0.2):
            for seed in range(3):
                steps = round(35 * (1 + 300 / b) * (1 if lr == 0.1 else 1.5) * rng.lognormal(0, 0.1))
                rows.append({"group": f"lrs:B={b}", "kind": "lrs", "round": 0, "batch_size": b, "batch_size_value": b,
                             "lr": lr, "seed": seed, "status": "reached", "steps_to_target": steps,
                             "epochs_to_target": steps * b / 4000, "samples_to_target": steps * b,
                             "seconds_to_target": steps * 0.001 * (1 + b / 256), "gen_gap": 0.01 * np.log2(b),
                             "noise_scale": 120.0})  # fmt: skip
    return analyse(trials_table(rows), "val_acc>=0.5")


def test_every_study_figure_has_labelled_axes_ticks_a_finding_and_a_legend_off_the_data():
    result = measured_summary()
    fit = result.fit
    figures = plots.study_figures(result.summary, s_min=fit.s_min, b_crit=fit.b_crit, n_train=4000,
                                  target="val_acc>=0.5", b_crit_interval=(fit.b_crit_lo, fit.b_crit_hi))
    assert set(figures) == {"steps_to_target", "samples_to_target", "seconds_to_target", "best_lr", "gen_gap"}
    for fig in figures.values():
        assert_reads_at_a_glance(fig)
    steps = figures["steps_to_target"].axes[0]
    title = " ".join(steps.get_title().split())  # a long title is wrapped onto the canvas
    ratio = result.summary["steps_to_target"].iloc[0] / result.summary["steps_to_target"].iloc[-1]
    assert f"fall {ratio:.3g}×" in title and f"B_crit ≈ {fit.b_crit:.3g}" in title and f"{fit.b_crit_lo:.3g}" in title


def test_steps_figure_draws_the_bootstrap_intervals_and_the_fits_band():
    result = measured_summary()
    summary, fit = result.summary, result.fit
    ax = plots.steps_to_target_figure(summary, fit.s_min, fit.b_crit, n_train=4000).axes[0]
    bars = ax.containers[0]
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([s[0][1] for s in segments], summary["steps_ci_lo"])
    np.testing.assert_allclose([s[1][1] for s in segments], summary["steps_ci_hi"])
    (band,) = [c for c in ax.collections if c.get_label() == "fit: 95% bootstrap band"]
    vertices = band.get_paths()[0].vertices
    assert np.all(summary["steps_fit_lo"] <= summary["steps_fit"] + 1e-9)
    assert vertices[:, 1].min() == pytest.approx(summary["steps_fit_lo"].min())
    assert vertices[:, 1].max() == pytest.approx(summary["steps_fit_hi"].max())


def seeds_at(batch_size, n_seeds=3, stop=None):
    runs = [fake_run(batch_size=batch_size, n_train=100, epochs=6, seed=s) for s in range(n_seeds)]
    for i, run in enumerate(runs):
        run.evals["val_acc"] = np.linspace(0.1, 0.9, len(run.evals)) + 0.01 * i
        if stop is not None and i == 0:
            run.evals = run.evals.iloc[:stop]
    return runs


def test_best_lr_curves_are_the_median_over_seeds_with_a_range_band():
    by_batch = {10: seeds_at(10, stop=3), 50: seeds_at(50)}
    fig = plots.best_lr_curves(by_batch, "val_acc", target=0.5, target_text="val_acc>=0.5", n_train=100)
    assert_reads_at_a_glance(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    median_10 = ax.get_lines()[0]
    table = pd.concat([r.evals.set_index("step")["val_acc"] for r in by_batch[10]], axis=1)
    table = table[(table.notna().sum(axis=1) >= 2) & (table.index > 0)]  # at least half the seeds, no step 0
    np.testing.assert_allclose(median_10.get_xdata(), table.index)
    np.testing.assert_allclose(median_10.get_ydata(), table.median(axis=1))
    title = " ".join(ax.get_title().split())
    assert "val_acc>=0.5" in title and "B=10" in title and "B=50" in title
    with pytest.raises(DataError):
        plots.best_lr_curves({})
