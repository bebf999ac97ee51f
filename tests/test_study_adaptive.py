"""The adaptive row of a study: its numbers recomputed from the stored runs' own tables, its
measurements' samples counted as the branches train, the analysis untouched by it, the row in the
table, the figure and the report, resume without retraining, and its errors in one line."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from batchlab import critical_batch
from batchlab.adaptive import AdaptiveBatch
from batchlab.config import StudyConfig, make_study_config
from batchlab.store import RunStore
from batchlab.study import LR_GROUP, analyse, run_study, study_id, trials_table
from batchlab.study.adaptive import adaptive_groups, resolve_adaptive, start_lr
from batchlab.study.plan import StudyPlan

pytestmark = pytest.mark.usefixtures("one_thread")

# blobs (N = 500) from B = 4: at lr 0.002 the target takes a few epochs, so each seed's adaptive
# run decides at step 0 and at an epoch end before it, and grows (measured: 4→16 and 16→64).
VALUES = dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[4, 16], lrs=[0.002], seeds=2,
              target="val_acc>=0.8", max_steps=300, noise_scale=False)
ADAPTIVE = {"seeds": 2, "max": 64}
FLAGS = ["--dataset", "blobs", "--model", "mlp:hidden=16", "--batch-sizes", "4,16", "--lrs", "0.002", "--seeds", "2",
         "--target", "val_acc>=0.8", "--max-steps", "300", "--no-noise-scale", "--adaptive", "seeds=2,max=64"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The grid alone, then the same study with ``adaptive``, on one store; while it trains, every
    local-CBS branch's samples are counted under the step of the decision that trained it."""
    store = tmp_path_factory.mktemp("adaptive") / "s.db"
    grid = run_study(make_study_config(VALUES), store=store, executor="in-process")
    branch_samples: dict[tuple[int, int], int] = defaultdict(int)  # (seed, decision step) -> samples
    current = {}
    measure, train_branch = AdaptiveBatch._measure, critical_batch.train_branch

    def measuring(self, model, batch, step):
        current["step"] = step
        return measure(self, model, batch, step)

    def counting(model, optimizer, loss_fn, data, stream, batch_size, seed):
        branch_samples[(current["seed"], current["step"])] += len(stream)
        return train_branch(model, optimizer, loss_fn, data, stream, batch_size, seed)

    def on_run_start(self, event):
        current["seed"] = event.config.seed
        return start(self, event)

    start = AdaptiveBatch.on_run_start
    progress = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdaptiveBatch, "_measure", measuring)
        patch.setattr(AdaptiveBatch, "on_run_start", on_run_start)
        patch.setattr(critical_batch, "train_branch", counting)
        study = run_study(make_study_config({**VALUES, "adaptive": ADAPTIVE}), store=store, executor="in-process",
                          on_progress=progress.append)
    return {"store": store, "grid": grid, "study": study, "branch_samples": dict(branch_samples),
            "progress": progress}


def stored_adaptive_runs(store, group_id):
    with RunStore(store) as runs:
        loaded = [runs.load_run(i) for i in runs.group_runs(group_id)]
    return sorted([r for r in loaded if r.spec["group"].startswith("adaptive:")], key=lambda r: r.config["seed"])


def from_tables(run, target=0.8):
    """Steps, samples and batches to the target, read off the stored step and eval tables alone."""
    evals, steps = run.evals.sort_values("step"), run.steps
    hit = evals[evals["val_acc"] >= target]
    if hit.empty:
        return None
    step = int(hit["step"].iloc[0])
    trained = steps[steps["step"] <= step]
    assert int(hit["samples_seen"].iloc[0]) == int(trained["batch_size"].sum())  # samples seen = the batches' sizes
    return {"steps": step, "samples": int(trained["batch_size"].sum()), "first": int(trained["batch_size"].iloc[0]),
            "last": int(trained["batch_size"].max())}


def test_adding_adaptive_to_a_stored_study_trains_the_adaptive_runs_only(stored):
    grid, study = stored["grid"], stored["study"]
    assert study_id(make_study_config(VALUES)) == study_id(make_study_config({**VALUES, "adaptive": ADAPTIVE}))
    assert (study.groups_resumed, study.groups_run) == (grid.groups_run, 2)  # one run per seed
    assert len(grid.adaptive) == 0 and len(study.adaptive) == 1


def test_the_row_is_what_the_stored_runs_tables_say(stored):
    study = stored["study"]
    runs = stored_adaptive_runs(stored["store"], study.group_id)
    assert [r.config["seed"] for r in runs] == [0, 1]
    assert all(r.config["batch_size"] == {**r.config["batch_size"], "start": 4, "max": 64, "signal": "local_cbs",
                                          "seeds": 2} for r in runs)
    seen = [from_tables(r) for r in runs]
    assert all(s is not None for s in seen), "the test needs adaptive runs that reach the target"
    assert any(s["last"] > s["first"] for s in seen), "the test needs a run whose batch grows"
    row = study.adaptive.iloc[0]
    steps, samples = [s["steps"] for s in seen], [s["samples"] for s in seen]
    assert row["batch_size"] == "adaptive" and row["reached"] == "2/2"
    assert row["steps_to_target"] == np.median(steps) and row["samples_to_target"] == np.median(samples)
    assert (row["steps_lo"], row["steps_hi"]) == (min(steps), max(steps))
    assert (row["samples_lo"], row["samples_hi"]) == (min(samples), max(samples))
    # The fixed rows' interval convention: 2 seeds give their range, at 50% confidence (1 − 2·½²).
    assert (row["steps_ci_lo"], row["steps_ci_hi"], row["steps_ci_level"]) == (min(steps), max(steps), 0.5)
    assert row["epochs_to_target"] == pytest.approx(np.median(samples) / 500, rel=1e-12)
    assert row["batch_size_first"] == min(s["first"] for s in seen)
    assert (row["batch_size_last_lo"], row["batch_size_last_hi"]) == (min(s["last"] for s in seen),
                                                                      max(s["last"] for s in seen))
    # Its lr is the best the study found at its start, B = 4.
    fixed = study.summary.set_index("batch_size")
    assert row["best_lr"] == fixed.loc[4, "best_lr"] and row["lr_source"] == "best lr at B=4"
    assert all(r.config["lr"] == row["best_lr"] for r in runs)


def test_the_measurements_samples_are_those_the_branches_trained_on(stored):
    study, counted = stored["study"], stored["branch_samples"]
    trials = study.trials[study.trials["kind"] == "adaptive"].set_index("seed")
    for seed, trial in trials.iterrows():
        before = sum(n for (s, step), n in counted.items() if s == seed and step < trial["steps_to_target"])
        assert before > 0 and trial["measurement_samples"] == before
        assert trial["samples_with_measurements"] == trial["samples_to_target"] + before
    row = study.adaptive.iloc[0]
    assert row["measurement_samples"] == trials["measurement_samples"].median()
    assert row["samples_with_measurements"] == trials["samples_with_measurements"].median()


def test_the_analysis_is_not_changed_by_the_adaptive_row(stored):
    study, grid = stored["study"], stored["grid"]
    alone = analyse(study.trials[study.trials["kind"] != "adaptive"], str(study.plan.target))
    pd.testing.assert_frame_equal(study.summary, alone.summary)
    pd.testing.assert_frame_equal(study.summary, grid.summary)
    assert study.recommendation == grid.recommendation and study.fit.as_dict() == grid.fit.as_dict()
    assert "adaptive" not in set(study.summary["batch_size"])


def test_progress_counts_the_adaptive_runs_and_never_moves_back(stored):
    progress = stored["progress"]
    known = [p.groups_known for p in progress]
    assert known == sorted(known, reverse=True) and progress[-1].groups_done == known[-1]
    assert progress[0].groups_known - progress[0].groups_done == 2  # the two seeds, known before they are planned


def test_the_command_line_shows_the_row_and_retrains_nothing(stored, cli, tmp_path):
    store, study = stored["store"], stored["study"]
    out_dir = tmp_path / "out"
    status, out, err = cli(["study", *FLAGS, "--store", str(store), "--out", str(out_dir)])
    assert status == 0, err
    assert "0 groups run, 4 resumed" in out  # the grid's 2 groups and the 2 adaptive runs, all stored
    table_row = next(line for line in out.splitlines() if "adaptive" in line and "│" in line)
    cells = [cell.strip() for cell in table_row.split("│")]
    row = study.adaptive.iloc[0]
    steps = row["steps_to_target"]
    assert (f"{steps:,.0f}" if steps == int(steps) else f"{steps:,.1f}") in cells
    assert f"{row['measurement_samples']:,.0f}" in cells and any("→" in cell for cell in cells)
    assert "adaptive: Adaptive batch size (4 up to 64" in out and "the fit and the recommendation do not use it" in out
    summary = pd.read_csv(out_dir / "summary.csv")
    assert list(summary["batch_size"].astype(str)) == ["4", "16", "adaptive"]
    assert summary["measurement_samples"].iloc[-1] == row["measurement_samples"]
    assert (out_dir / "steps_vs_samples.png").exists()
    page = (out_dir / "report.html").read_text()
    assert "Steps vs samples to target" in page and "measurement samples" in page and "and an adaptive run" in page
    printed = json.loads(json.dumps(study.to_dict()))  # what --json prints
    assert printed["adaptive"]["reached"] == "2/2" and printed["adaptive"]["steps_to_target"] == steps


def test_the_stored_study_reports_the_row_and_its_learning_curves(stored):
    from batchlab.report import build_report

    with RunStore(stored["store"]) as runs:
        page = build_report(runs, f"study:{stored['study'].group_id}").html
    assert "Steps vs samples to target" in page and "adaptive" in page
    # The target is in the stored study config: the learning curves at each best lr are drawn.
    assert "Learning curves at each batch size" in page


def test_the_figure_places_the_adaptive_point_and_reads_well(stored):
    from test_figures_readable import problems, squeezed_axes

    from batchlab.plots.study import steps_vs_samples_figure

    study = stored["study"]
    fig = steps_vs_samples_figure(study.summary, study.adaptive, 10.0, 8.0, n_train=500, target="val_acc>=0.8",
                                  recommendation={"batch_size": 16})
    ax = fig.axes[0]
    fixed, adaptive, with_cost = ax.containers
    row = study.adaptive.iloc[0]
    x, y = adaptive.lines[0].get_data()
    assert (x[0], y[0]) == (row["samples_to_target"], row["steps_to_target"])
    assert adaptive.get_label().startswith("adaptive 4→") and "median over seeds" in adaptive.get_label()
    assert with_cost.lines[0].get_data()[0][0] == row["samples_with_measurements"]
    assert list(fixed.lines[0].get_data()[0]) == list(study.summary["samples_to_target"])
    assert problems(fig) == [] and squeezed_axes(fig) == []


@pytest.mark.parametrize(("flags", "words"), [
    (["--adaptive", "--no-stop-at-target"], "needs a study that trains to its target"),
    (["--adaptive", "signal=foo"], "signal: must be 'local_cbs' or 'b_simple'"),
    (["--adaptive", "seeds=1"], "seeds: must be greater than or equal to 2"),
    (["--adaptive", "start=600,max=1000"], "adaptive: start 600 is larger than the training set (500 samples)"),
    (["--adaptive", "start=32"], "max (16) must be at least start (32); start and max default to the grid's"),
    (["--adaptive", "--schedule", "cosine"], "use a constant or step lr schedule"),
    (["--adaptive", "max=8"], "max (8) must be at least start (16); give start too when max is below 16"),
])
def test_bad_adaptive_settings_are_one_line_and_store_nothing(cli, tmp_path, flags, words):
    base = [flag for flag in FLAGS if flag not in ("--adaptive", "seeds=2,max=64")]
    status, _, err = cli(["study", *base, *flags, "--store", str(tmp_path / "s.db")])
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "s.db").exists()


# --- the lr at the start, as a pure function of the stored trials -----------------------------


def plan_of(config: StudyConfig, batch_sizes=(4, 16), n_train=500) -> StudyPlan:
    adaptive = resolve_adaptive(config, list(batch_sizes), n_train)
    return StudyPlan(config, study_id(config), "blobs", n_train, tuple(batch_sizes), config.parsed_target,
                     adaptive=adaptive)


def searched(steps_by_lr: dict[float, list[float]], batch_size=4) -> pd.DataFrame:
    return trials_table([{"group": f"lrs:B={batch_size}", "kind": LR_GROUP, "round": 0, "batch_size": batch_size,
                          "batch_size_value": batch_size, "lr": lr, "seed": seed,
                          "status": "reached" if math.isfinite(s) else "not_reached",
                          "steps_to_target": s} for lr, steps in steps_by_lr.items() for seed, s in enumerate(steps)])


def test_the_start_lr_is_the_best_at_start_once_its_search_is_done():
    config = make_study_config({**VALUES, "lrs": "auto", "adaptive": True})
    plan = plan_of(config)
    assert (plan.adaptive.start, plan.adaptive.max) == (4, 16)
    trials = searched({0.05: [30, 40], 0.1: [20, 25], 0.2: [math.nan, math.nan]})
    assert start_lr(plan, trials) == (0.1, "best lr at B=4")
    from batchlab.study.plan import GroupPlan

    pending = [GroupPlan(LR_GROUP, 4, 4, (0.4,), (0, 1), round=1)]  # an extension still to run at B = 4
    assert start_lr(plan, trials, pending) is None and adaptive_groups(plan, trials, pending, set()) == []
    assert start_lr(plan, trials.iloc[0:0]) is None  # not trained yet
    groups = adaptive_groups(plan, trials, [], set())
    assert [g.seeds for g in groups] == [(0,), (1,)] and {g.lrs for g in groups} == {(0.1,)}
    assert adaptive_groups(plan, trials, [], {groups[0].key}) == groups[1:]


def test_without_a_best_lr_at_start_it_is_the_reference_lr_moved_by_the_rule():
    config = make_study_config({**VALUES, "adaptive": {"start": 8}, "reference_lr": 0.1, "reference_batch_size": 32,
                                "lr_rule": "linear", "lr_grid_factor": 2.0})
    lr, source = start_lr(plan_of(config), searched({0.002: [math.nan, math.nan]}))
    assert lr == pytest.approx(0.1 * 8 / 32) and "not in the grid" in source
    lr, source = start_lr(plan_of(config.replace(adaptive=True)), searched({0.002: [math.nan, math.nan]}))
    assert lr == pytest.approx(0.1 * 4 / 32) and "no lr reached the target there" in source


def test_settings_not_given_come_from_the_grid_and_name_the_runs():
    config = make_study_config({**VALUES, "adaptive": "adaptive:signal=b_simple,every=1000"})
    plan = plan_of(config, batch_sizes=(4, 16, 500))
    assert (plan.adaptive.start, plan.adaptive.max, plan.adaptive.signal) == (4, 500, "b_simple")
    (group, _) = adaptive_groups(plan, searched({0.002: [10.0, 12.0]}), [], set())
    assert group.key == "adaptive:B=adaptive:lrs=0.002:seeds=0:start=4,max=500,signal=b_simple,every=1000"
    assert make_study_config({**VALUES, "adaptive": {"seeds": 3}}).replace(seeds=3).adaptive.model_fields_set == {"seeds"}
