"""benchmarks/advise_vs_study.py: its bookkeeping against independent computations.

The samples it counts for a study are the trials' own step tables; for an advise run, the run's
steps table plus factors × seeds × branch samples at each measurement; its advise run is what
`batchlab advise` computes from the same flags; and every verdict in the committed JSON follows
from the numbers beside it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import batchlab as bl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_benchmark():
    """benchmarks/advise_vs_study.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("advise_vs_study", ROOT / "benchmarks" / "advise_vs_study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
COMMITTED = json.loads(bench.RESULTS.read_text()) if bench.RESULTS.exists() else {"cases": {}}


def test_samples_trained_is_what_the_loop_counts():
    # 500 samples at B = 64: 8 steps per epoch, the last of 52 samples.
    ds = bl.load_dataset("blobs")
    run = bl.fit(bl.build_model("logreg", ds, seed=0), ds, bl.TrainConfig(batch_size=64, max_steps=19), progress=False)
    for step, seen in zip(run.steps["step"], run.steps["samples_seen"]):
        assert bench.samples_trained(int(step), 64, 500) == int(seen)


def test_study_samples_are_the_trials_step_tables(tmp_path):
    config = bl.StudyConfig(dataset="blobs", model="logreg", batch_sizes=[16, 64], lrs=[0.05, 0.2], seeds=2,
                            target="val_acc>=0.99", max_steps=20, noise_scale=False)  # never reached: every trial runs 20 steps
    study = bl.run_study(config, store=tmp_path / "s.db", executor="in-process", prune=False)
    from_tables = sum(int(record.steps[-1]["samples_seen"]) for record in study.records)
    assert len(study.records) == len(study.trials) == 8
    assert bench.study_samples(study.trials, 500) == from_tables == 4 * (20 * 16) + 4 * (2 * 500 + 4 * 64)
    bench.check_study_samples(study, from_tables)  # the benchmark's own check reads the store alike
    with pytest.raises(AssertionError, match="stored step tables"):
        bench.check_study_samples(study, from_tables + 16)


def test_the_branch_settings_are_batchlab_advise_defaults():
    from batchlab.cli.advise import ADVISE_DEFAULTS, advise_command

    defaults = {param.name: param.default for param in advise_command.params}
    assert tuple(int(k) for k in defaults["factors"].split(",")) == bench.ADVISE_FACTORS
    assert defaults["branch_seeds"] == bench.ADVISE_BRANCH_SEEDS
    assert defaults["branch_samples"] is None and defaults["every"] is None
    assert ADVISE_DEFAULTS["epochs"] == bench.ADVISE_EPOCHS


@pytest.fixture(scope="module")
def one_epoch_advise_run():
    """The benchmark's advise run on blobs for one epoch at B0 = 2: measurements at the start and the end."""
    epochs, bench.ADVISE_EPOCHS = bench.ADVISE_EPOCHS, 1
    try:
        return bench.run_advise(bench.WORKLOADS["blobs-mlp"], "sgd", seed=0, lr=0.05)
    finally:
        bench.ADVISE_EPOCHS = epochs


def test_an_advise_run_counts_its_run_and_every_branch(one_epoch_advise_run):
    run = one_epoch_advise_run
    B0, factors, seeds = run["batch_size"], bench.ADVISE_FACTORS, bench.ADVISE_BRANCH_SEEDS
    assert B0 == 2 and len(run["measurements"]) == 2
    per_branch = 8 * max(factors) * B0  # advise's default branch budget: 8 steps of the largest branch
    assert run["run_samples"] == 500
    assert run["samples"] == 500 + 2 * len(factors) * seeds * per_branch


@pytest.mark.slow
def test_the_benchmarks_advise_run_is_what_batchlab_advise_prints(one_epoch_advise_run, cli, tmp_path):
    run = one_epoch_advise_run
    status, stdout, _ = cli(["advise", "--dataset", "blobs", "--model", "mlp", "--batch-size", "2", "--epochs", "1",
                             "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--seed", "0",
                             "--store", str(tmp_path / "a.db"), "--out", str(tmp_path), "--json", "-q"])
    assert status == 0
    shown = json.loads(stdout)
    assert shown["ramp"] == run["ramp"]
    assert [(m["step"], m["local_cbs"], m["b_simple"]) for m in shown["measurements"]] == \
        [(m["step"], m["local_cbs"], m["b_simple"]) for m in run["measurements"]]


def test_within_factor_and_the_range_in_force():
    assert bench.within_factor(16, 32) and bench.within_factor(32, 16) and not bench.within_factor(16, 33)
    assert not bench.within_factor(None, 16) and not bench.within_factor(16, None)
    ramp = [{"from_samples": 0, "batch_size": 8}, {"from_samples": 100, "batch_size": 16},
            {"from_samples": 200, "batch_size": 32}]
    assert bench.range_in_force(ramp, 100)["batch_size"] == 8  # reached at the evaluation that starts 16
    assert bench.range_in_force(ramp, 150)["batch_size"] == 16
    assert bench.range_in_force(ramp, None)["batch_size"] == 32  # never reached: the last range
    assert bench.range_in_force(ramp, 0)["batch_size"] == 8


@pytest.mark.parametrize("case", sorted(COMMITTED["cases"]))
def test_committed_verdicts_follow_from_the_numbers(case):
    result = COMMITTED["cases"][case]
    study = result["study"]
    assert study["samples"] > 0
    B0 = result["advise"][0]["batch_size"]
    best_at_b0 = next(row["best_lr"] for row in study["summary"] if row["batch_size"] == B0)
    centre = bench.REFERENCE_LR[result["optimizer"]] * (B0 / bench.REFERENCE_BATCH) ** 0.5
    for runs, verdict, lr in ((result["advise"], result["verdict"], best_at_b0),
                              (result["advise_centre_lr"], result["verdict_centre_lr"], centre)):
        assert len(runs) == len(bench.ADVISE_SEEDS) and all(math.isclose(run["lr"], lr) for run in runs)
        for run, within, ratio in zip(runs, verdict["within_2x"], verdict["samples_ratio"]):
            check_advise_run(run, study["recommended_batch_size"], within)
            assert math.isclose(ratio, run["samples"] / study["samples"], rel_tol=1e-12)
        assert verdict["all_within_2x"] == all(verdict["within_2x"])
        assert verdict["all_under_tenth"] == all(r <= 0.1 for r in verdict["samples_ratio"])


def check_advise_run(run: dict, study_batch: int | None, within: bool) -> None:
    """One advise run's samples, recommended B and verdict, recomputed from its own numbers."""
    per_branch = 8 * max(run["factors"]) * run["batch_size"]
    for m in run["measurements"]:
        assert (m["branches"], m["samples_per_branch"]) == (len(run["factors"]) * run["branch_seeds"], per_branch)
    assert run["run_samples"] == run["epochs"] * run["n_train"]
    assert run["samples"] == run["run_samples"] + len(run["measurements"]) * len(run["factors"]) * 3 * per_branch
    # The recommended B: the smallest local CBS from the last measurement before the target on.
    reached = run["reached_target_at_samples"]
    seen = [m["samples_seen"] for m in run["measurements"]]
    before = [s for s in seen if reached is not None and s < reached]
    start = max(before) if before else seen[0] if reached is not None else seen[-1]
    assert run["recommended_batch_size"] == min(m["local_cbs"] for m in run["measurements"] if m["samples_seen"] >= start)
    assert within == (study_batch is not None and 0.5 <= run["recommended_batch_size"] / study_batch <= 2.0)
