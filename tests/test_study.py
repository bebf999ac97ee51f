"""The batch-size study: planning, evaluation points, analysis on known curves, end to end, resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.config import StudyConfig, make_study_config, parse_target
from batchlab.errors import ConfigError, StoreError
from batchlab.store import RunStore
from batchlab.study import (
    LR_GROUP,
    GroupPlan,
    StudyPlan,
    analyse,
    evaluation_steps,
    fit_scaling,
    initial_groups,
    next_groups,
    recommend,
    resolve_batch_sizes,
    run_study,
    study_id,
    summarize,
    trials_table,
)

SECONDS_COLUMNS = ("seconds_to_target", "seconds_lo", "seconds_hi")


# --- config and plan -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["val_acc=0.8", "accuracy>=0.8", "val_acc>=high", "val_acc>=inf", ""])
def test_bad_target_is_one_line_config_error(bad):
    with pytest.raises(ConfigError) as error:
        make_study_config({"target": bad})
    message = str(error.value)
    assert "\n" not in message and "target" in message and "val_acc>=0.8" in message


def test_target_parsing_and_meaning():
    target = parse_target(" train_loss <= 0.05 ")
    assert (target.metric, target.operator, target.value) == ("train_loss", "<=", 0.05)
    assert target.met({"train_loss": 0.05}) and not target.met({"train_loss": 0.0501})
    assert not target.met({"train_loss": math.nan}) and not target.met({})
    assert not parse_target("val_acc>0.5").met({"val_acc": 0.5})


def test_study_owned_train_fields_are_refused():
    with pytest.raises(ConfigError, match="train.batch_size is set by the study"):
        make_study_config({"train": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="give a budget"):
        make_study_config({"max_steps": None})
    config = make_study_config({"train": {"momentum": 0.5}, "dataset": "moons"})
    assert config.train.momentum == 0.5 and config.dataset.name == "moons"


def test_study_id_ignores_the_name_only():
    a = StudyConfig(name="a")
    assert study_id(a) == study_id(StudyConfig(name="b"))
    assert study_id(a) != study_id(StudyConfig(seeds=4))


def test_default_batch_sizes_are_powers_of_two_and_full():
    assert resolve_batch_sizes(StudyConfig(batch_sizes=None), 500) == (1, 2, 4, 8, 16, 32, 64, 128, 256, "full")
    assert resolve_batch_sizes(StudyConfig(batch_sizes=None), 512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, "full")
    assert resolve_batch_sizes(StudyConfig(batch_sizes=["full", 8, 500]), 500) == (8, "full")
    with pytest.raises(ConfigError, match="larger than the training set"):
        resolve_batch_sizes(StudyConfig(batch_sizes=[1000]), 500)


@pytest.mark.parametrize("total", [1, 7, 19, 20, 21, 100, 1000, 12345])
def test_evaluation_points_resolve_steps_to_target_within_five_percent(total):
    points = np.array(evaluation_steps(total, 0.05))
    assert points[0] == 1 and points[-1] == total and np.all(np.diff(points) > 0)
    for first_step in range(1, total + 1):  # the target first holds at this step
        reported = points[np.searchsorted(points, first_step)]
        assert first_step <= reported and reported - first_step <= 0.05 * reported
    assert len(points) <= 20 + 21 * math.log(max(total, 20) / 20) + 1  # ~ln(S)/r evaluations, not S


def _plan(**values) -> StudyPlan:
    config = make_study_config({"batch_sizes": [1, 16, 256], **values})
    return StudyPlan(config, study_id(config), "toy", 500, resolve_batch_sizes(config, 500), config.parsed_target)


def test_auto_lr_grid_follows_the_sqrt_rule_on_one_lattice():
    plan = _plan(reference_lr=0.1, reference_batch_size=16, lr_grid_size=3, lr_grid_factor=2.0)
    grids = {g.batch_size: g.lrs for g in initial_groups(plan)}
    assert grids[16] == (0.05, 0.1, 0.2)
    assert grids[256] == (0.2, 0.4, 0.8)  # sqrt(256/16) = 4 = 2^2: two lattice steps up
    assert grids[1] == (0.0125, 0.025, 0.05)  # sqrt(1/16) = 1/4


def _fake_trials(group: GroupPlan, steps_by_lr: dict[float, list[float]], diverged=()) -> list[dict]:
    rows = []
    for lr in group.lrs:
        for seed, steps in zip(group.seeds, steps_by_lr[lr]):
            status = "diverged" if lr in diverged else "reached" if math.isfinite(steps) else "not_reached"
            rows.append({"group": group.key, "kind": group.kind, "round": group.round, "batch_size": group.batch_size,
                         "batch_size_value": group.batch_size_value, "lr": lr, "seed": seed, "status": status,
                         "steps_to_target": steps, "epochs_to_target": steps / 10, "samples_to_target": steps * group.batch_size_value,
                         "seconds_to_target": steps / 100, "gen_gap": 0.01, "noise_scale": math.nan})  # fmt: skip
    return rows


def test_best_lr_at_the_edge_extends_the_grid_then_stops():
    plan = _plan(lr_grid_size=3, lr_extensions=1, noise_scale=False)
    first = {g.batch_size: g for g in initial_groups(plan)}
    rows = []
    for b, group in first.items():
        lo, mid, hi = group.lrs
        rows += _fake_trials(group, {lo: [90, 95, 99], mid: [50, 55, 60], hi: [20, 25, math.nan]})  # best: top edge
    pending = next_groups(plan, trials_table(rows))
    assert {g.batch_size for g in pending} == {1, 16, 256} and all(g.round == 1 for g in pending)
    extension = {g.batch_size: g for g in pending}[16]
    assert min(extension.lrs) > max(first[16].lrs)  # further up the lattice
    for group in pending:  # the extension diverges: the best is now inside the grid
        rows += _fake_trials(group, {lr: [math.nan] * 3 for lr in group.lrs}, diverged=group.lrs)
    assert next_groups(plan, trials_table(rows)) == []


def test_nothing_reached_with_divergence_extends_downwards():
    plan = _plan(lr_grid_size=3, batch_sizes=[16], noise_scale=False)
    (group,) = initial_groups(plan)
    rows = _fake_trials(group, {lr: [math.nan] * 3 for lr in group.lrs}, diverged=group.lrs[1:])
    (extension,) = next_groups(plan, trials_table(rows))
    assert max(extension.lrs) < min(group.lrs)


# --- analysis on synthetic results -----------------------------------------------------------


def test_fit_recovers_s_min_and_b_crit_from_an_exact_curve():
    b = np.array([1, 4, 16, 64, 256, 1024], dtype=float)
    fit = fit_scaling(b, 120 * (1 + 50 / b))
    assert fit.s_min == pytest.approx(120, rel=1e-6) and fit.b_crit == pytest.approx(50, rel=1e-6)
    assert fit.e_min == pytest.approx(120 * 50, rel=1e-6)


def test_fit_recovers_b_crit_from_noisy_seeds_within_its_uncertainty():
    rng = np.random.default_rng(0)
    s_min, b_crit = 200.0, 30.0
    group_rows = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        group = GroupPlan(LR_GROUP, b, b, (0.1,), (0, 1, 2, 3, 4))
        truth = s_min * (1 + b_crit / b)
        group_rows += _fake_trials(group, {0.1: list(np.round(truth * rng.lognormal(0, 0.1, 5)))})
    result = analyse(trials_table(group_rows), "val_acc>=0.8")
    fit = result.fit
    assert abs(fit.b_crit - b_crit) < 3 * fit.b_crit_err and fit.b_crit_err < 0.5 * b_crit
    assert abs(fit.s_min - s_min) < 3 * fit.s_min_err
    regimes = dict(zip(result.summary["batch_size_value"], result.summary["regime"]))
    assert regimes[1] == "perfect scaling" and regimes[512] == "no gain" and regimes[32] == "diminishing returns"


def test_best_lr_is_the_fewest_median_steps_with_not_reached_as_never():
    group = GroupPlan(LR_GROUP, 8, 8, (0.1, 0.2, 0.4), (0, 1, 2))
    rows = _fake_trials(group, {0.1: [50, 52, 54], 0.2: [10, math.nan, math.nan], 0.4: [30, 31, math.nan]})
    summary = summarize(trials_table(rows))
    (row,) = summary.to_dict("records")
    assert row["best_lr"] == 0.4 and row["steps_to_target"] == 31 and row["reached"] == "2/3"
    assert (row["steps_lo"], row["steps_hi"]) == (30, 31) and row["samples_to_target"] == 31 * 8


def test_recommendation_sits_at_the_critical_batch_size_of_a_clean_curve():
    rows = []
    for b in (1, 4, 16, 64, 256, 1024):
        rows += _fake_trials(GroupPlan(LR_GROUP, b, b, (0.1,), (0,)), {0.1: [100 * (1 + 64 / b)]})
    result = analyse(trials_table(rows), "val_acc>=0.8")
    rec = result.recommendation
    assert rec.batch_size == 64 and rec.steps_ratio == pytest.approx(2 / 1.0625, rel=1e-6)
    assert "B = 64" in rec.text and "val_acc>=0.8" in rec.text and rec.no_gain_above == 256
    assert recommend(result.summary.iloc[0:0], result.fit, "x").batch_size is None


# --- end to end ------------------------------------------------------------------------------


def tiny_config(**changes) -> StudyConfig:
    values = dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[8, 64, "full"], lrs=[0.05, 0.2, 1e4],
                  seeds=2, target="val_acc>=0.75", max_steps=150, noise_scale=True)
    values.update(changes)
    return make_study_config(values)


def test_tiny_study_end_to_end_with_a_diverging_lr(tmp_path):
    torch.set_num_threads(1)
    study = run_study(tiny_config(), store=tmp_path / "s.db")
    trials, summary = study.trials, study.summary
    search = trials[trials["kind"] == LR_GROUP]
    assert len(search) == 3 * 3 * 2
    assert set(search.loc[search["lr"] == 1e4, "status"]) == {"diverged"}  # recorded, and the study went on
    assert list(summary["batch_size"]) == [8, 64, "full"]
    assert summary["steps_to_target"].notna().all() and (summary["best_lr"] < 1e4).all()
    reached = search[search["status"] == "reached"]
    per_epoch = np.ceil(500 / reached["batch_size_value"])  # blobs: N = 500; the last batch of an epoch is short
    epochs, within = np.divmod(reached["steps_to_target"], per_epoch)
    assert np.allclose(reached["samples_to_target"], epochs * 500 + within * reached["batch_size_value"])
    assert np.allclose(reached["epochs_to_target"], reached["steps_to_target"] / per_epoch)
    assert summary["noise_scale"].notna().all()  # measured at every batch size >= 2
    with RunStore(tmp_path / "s.db") as store:
        stored = store.group_run_summaries(study.group_id)
        assert len(stored) == len(trials) and store.get_group(study.group_id)["status"] == "finished"
    assert (study.recommendation.batch_size in (8, 64, "full")) == study.recommendation.supported
    assert study.recommendation.text


def test_steps_to_target_agrees_with_an_evaluation_at_every_step():
    """The sequential path against `fit` evaluating every step: within the 5% resolution."""
    from batchlab.config import TrainConfig
    from batchlab.data import load_dataset
    from batchlab.loop import fit
    from batchlab.models import model_from_spec

    torch.set_num_threads(1)
    config = tiny_config(batch_sizes=[8], lrs=[0.05], seeds=1, noise_scale=False)
    study = run_study(config, vectorized=False)
    (trial,) = study.trials.to_dict("records")
    ds = load_dataset("blobs")
    run = fit(model_from_spec("mlp:hidden=16", ds, seed=0), ds,
              TrainConfig(batch_size=8, lr=0.05, momentum=0.9, max_steps=150, eval_every=1), progress=False)
    evals = run.evals
    exact = int(evals.loc[evals["val_acc"] >= 0.75, "step"].iloc[0])
    assert exact <= trial["steps_to_target"] <= exact + 0.05 * trial["steps_to_target"]


# Runs a study in a process of its own; with a kill count, the process SIGKILLs itself right after
# the driver has stored that many groups (wrapping the driver's private store step, so the library
# carries no hook for it): a hard crash with groups left to run, which a resume must survive.
RESUME_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, torch
    torch.set_num_threads(1)
    from batchlab.config import make_study_config
    from batchlab.study import run, run_study
    kill_after = int(sys.argv[3])
    if kill_after:
        store_group = run._Driver._store
        def store_then_kill(driver, group, records):
            store_group(driver, group, records)
            if driver.groups_run >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        run._Driver._store = store_then_kill
    study = run_study(make_study_config(json.loads(sys.argv[1])), store=sys.argv[2])
    print(json.dumps({"resumed": study.groups_resumed, "run": study.groups_run}))
""")


def _study_in_subprocess(values: dict, store, kill_after: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(values), str(store), str(kill_after)],
                          capture_output=True, text=True, timeout=300)


def _comparable(summary: pd.DataFrame) -> pd.DataFrame:
    return summary.drop(columns=[c for c in SECONDS_COLUMNS if c in summary]).reset_index(drop=True)


def test_killed_study_resumes_without_redoing_groups_and_ends_the_same(tmp_path):
    values = dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[8, 64, "full"], lrs=[0.05, 0.2],
                  seeds=2, target="val_acc>=0.75", max_steps=150, noise_scale=False)
    killed = _study_in_subprocess(values, tmp_path / "resumed.db", kill_after=1)
    assert killed.returncode == -9, killed.stderr
    with RunStore(tmp_path / "resumed.db") as store:
        (group,) = store.find_groups("study")
        assert len({r["summary"]["group"] for r in store.group_run_summaries(group["id"])}) == 1
    resumed = _study_in_subprocess(values, tmp_path / "resumed.db")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1]) == {"resumed": 1, "run": 2}
    torch.set_num_threads(1)
    uninterrupted = run_study(make_study_config(values), store=tmp_path / "whole.db")
    again = run_study(make_study_config(values), store=tmp_path / "resumed.db")  # everything stored: no training
    assert again.groups_run == 0 and again.groups_resumed == 3
    pd.testing.assert_frame_equal(_comparable(again.summary), _comparable(uninterrupted.summary))
    trials = lambda s: s.trials.drop(columns=["seconds", "seconds_to_target"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(trials(again), trials(uninterrupted))


# --- the store methods the study uses ---------------------------------------------------------


def _run(**changes):
    run = {"name": "r", "kind": "study-trial", "config": {"lr": 0.1}, "spec": {}, "provenance": {},
           "status": "finished", "summary": {"x": math.nan}, "message": None,
           "steps": [{"step": 1, "batch_loss": 0.5}], "evals": [{"step": 0, "val_acc": 0.1}], "epochs": []}
    run.update(changes)
    return run


def test_record_runs_stores_all_or_nothing(tmp_path):
    with RunStore(tmp_path / "s.db") as store:
        group = store.create_group("study", "g", {"study_id": "abc"})
        ids = store.record_runs(group, [_run(), _run(name="s")])
        assert store.group_runs(group) == ids
        loaded = store.load_run(ids[0])
        assert loaded.steps["batch_loss"].tolist() == [0.5] and loaded.summary == {"x": None}
        with pytest.raises(StoreError):
            store.record_runs(group, [_run(name="fine"), _run(steps=[{"batch_loss": 1.0}])])  # no "step" key
        assert store.group_runs(group) == ids  # the good run of the failed call was not stored either
        assert [g["config"]["study_id"] for g in store.find_groups("study")] == ["abc"]
        assert store.find_groups("replica") == []
        assert [r["name"] for r in store.group_run_summaries(group, "study-trial")] == ["r", "s"]


# --- the command line ------------------------------------------------------------------------


def _cli(argv, capsys):
    from batchlab.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_bad_target_is_one_line_and_stores_nothing(tmp_path, capsys):
    code, out, err = _cli(["study", "--target", "val_acc=0.8", "--store", str(tmp_path / "s.db")], capsys)
    assert code == 2 and err.startswith("error: invalid study config: target:") and err.count("\n") == 1
    assert not (tmp_path / "s.db").exists()


def test_cli_study_json_prints_summary_and_recommendation(tmp_path, capsys):
    argv = ["study", "--dataset", "blobs", "--model", "mlp:hidden=16", "--batch-sizes", "8,full", "--lrs", "0.2",
            "--seeds", "1", "--max-steps", "100", "--target", "val_acc>=0.7", "--no-noise-scale",
            "--store", str(tmp_path / "s.db"), "--json", "--quiet"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert [row["batch_size"] for row in result["summary"]] == [8, "full"]
    assert result["recommendation"]["text"].startswith("Only 2 batch sizes") and result["groups_run"] == 2  # too few to fit
    assert any(f.endswith("steps_to_target.png") for f in result["files"])
    code, out, _ = _cli(argv, capsys)  # the same command again: everything resumed, nothing trained
    again = json.loads(out)
    assert again["groups_run"] == 0 and again["groups_resumed"] == 2 and again["summary"] == result["summary"]


def test_a_vectorized_group_reads_back_only_at_its_check_points(monkeypatch):
    """The target checks declare their steps: the replica loop synchronises there (and at epoch
    ends), not every step, and measures what it measures when reading back every step."""
    from batchlab.replicas import fit as replica_fit
    from batchlab.study.plan import load_dataset_for, plan_study
    from batchlab.study.trials import TargetWatcher, train_group

    torch.set_num_threads(1)
    config = tiny_config(batch_sizes=[8], lrs=[0.0002, 0.05], seeds=2, noise_scale=False, max_steps=150)
    dataset = load_dataset_for(config)
    plan = plan_study(config, dataset, prune=False)  # a slow lr trains on, past the schedule's dense start
    (group,) = initial_groups(plan)
    synced: list[int] = []  # the step of every read-back of the replica loop
    flush = replica_fit._flush

    def counting_flush(state, pending):
        if pending and state.active:
            synced.append(state.active[0].recorder.clock.step + len(pending))
        flush(state, pending)

    monkeypatch.setattr(replica_fit, "_flush", counting_flush)

    def summaries(records):
        return [{k: v for k, v in r.summary.items() if not k.startswith("seconds")} for r in records]

    declared = summaries(train_group(plan, group, dataset))
    declared_syncs = list(synced)
    trained = max(s["steps"] for s in declared)
    assert trained > 60  # enough steps past the dense start of the schedule for the count to mean something
    schedule = set(evaluation_steps(plan.total_steps(8), config.resolution))
    per_epoch = math.ceil(dataset.n_train / 8)
    assert set(declared_syncs) <= schedule | set(range(per_epoch, trained + 1, per_epoch))
    assert len(declared_syncs) < 0.7 * trained

    synced.clear()
    init = TargetWatcher.__init__

    def every_step(self, *args, **kwargs):  # the watcher as it was: it needs every step's StepEnd
        init(self, *args, **kwargs)
        self.step_end_steps = None

    monkeypatch.setattr(TargetWatcher, "__init__", every_step)
    assert summaries(train_group(plan, group, dataset)) == declared
    assert len(synced) == trained  # the baseline read back at every step
