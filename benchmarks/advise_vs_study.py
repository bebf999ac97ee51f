"""Benchmark: `batchlab advise` checked against the full study, per built-in workload and optimizer.

For each workload (blobs MLP, digits MLP, MNIST-1D MLP, MNIST-1D CNN) and each optimizer (SGD with
momentum 0.9, Adam):

* **the study** (`bl.run_study`): batch sizes (powers of two bracketing B_crit) × five learning
  rates per batch size around the square-root rule, extended at the grid's edge (up to 4 times) ×
  3 seeds, each trial trained to the workload's target; it gives B_crit with its 95% bootstrap
  interval, B_simple near the target, and its recommended batch size;
* **advise**, three times (run seeds 0, 1, 2): one run at a small batch B0 ≈ N/256 (a power of
  two, N the training-set size) at the study's best lr at B0 (advise scales the lr from the one you
  train with, so it is given a tuned one; finding it is not counted in its samples), for advise's
  default 4 epochs, with advise's default branching (`--factors 1,2,4,8,16`, 3 branch seeds, 8 steps
  of the largest branch, a measurement at the start and at every epoch's end), run through the same
  pieces as the command (`bl.LocalCBS` on `bl.fit` with the noise-scale probe, then
  `advise_batch_size`); and three more at the study grid's centre lr at B0, a guess made before any
  training, to show how much the answer depends on the lr.

**Advise's recommended B** is the batch of the ramp in force while the advise run first reached the
study's target: the range of the ramp that holds the samples seen just before the first evaluation
at which the target holds (a flat ramp: its one batch). B_crit of a target is a property of training
up to that target, and the ramp's batch there is the smallest local critical batch size measured
from that point to the end of the run. When the run never reaches the target, its last range.

**Samples** are training samples: the study's over all its trials (lr search, extensions, the
noise-scale trials; each trial's steps as it stopped: at its target, pruned, diverged or at its
budget); advise's are its run's plus every branch's (branches × samples per branch, at every
measurement). Evaluations and the noise scale's per-sample gradients are counted in neither.

    python benchmarks/advise_vs_study.py [--only blobs-mlp/sgd,...] [--json PATH] [--store PATH]

Progress goes to stderr; each finished case is written to the JSON at once (default
benchmarks/results/advise_vs_study.json), and cases already there are skipped, so a killed run
resumes (its studies resume from the store too). Prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "advise_vs_study.json"
COMMAND = "python benchmarks/advise_vs_study.py"

# `batchlab advise`'s defaults for the branches (tests check these against the command's options).
ADVISE_FACTORS = (1, 2, 4, 8, 16)
ADVISE_BRANCH_SEEDS = 3
ADVISE_EPOCHS = 4
ADVISE_SEEDS = (0, 1, 2)  # reseeds of the advise run (initial weights, data order, dropout)

STUDY_SEEDS = 3
STUDY_MAX_STEPS = 1200
STUDY_LR_EXTENSIONS = 4  # Adam's best lr at small batches on blobs lies beyond the default 2 extensions
REFERENCE_BATCH = 64  # the auto lr grid's centre is REFERENCE_LR[optimizer] at this batch, √-scaled
REFERENCE_LR = {"sgd": 0.1, "adam": 2e-3}
TRAIN = {"sgd": {"optimizer": "sgd", "momentum": 0.9}, "adam": {"optimizer": "adam"}}
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}


@dataclass(frozen=True)
class Workload:
    """A built-in dataset and model with the study's target and batch-size grid."""

    dataset: str
    model: str
    target: str
    batch_sizes: tuple[int, ...]


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(int(math.log2(low)), int(math.log2(high)) + 1))


# Targets: a validation accuracy every batch size of the grid reaches within the budget at its best lr.
WORKLOADS = {
    "blobs-mlp": Workload("blobs", "mlp", "val_acc>=0.8", powers_of_two(1, 256)),
    "digits-mlp": Workload("digits", "mlp", "val_acc>=0.9", powers_of_two(4, 1024)),
    "mnist1d-mlp": Workload("mnist1d", "mlp", "val_acc>=0.5", powers_of_two(16, 1024)),
    "mnist1d-cnn": Workload("mnist1d", "cnn1d", "val_acc>=0.7", powers_of_two(16, 1024)),
}
CASES = [f"{workload}/{optimizer}" for workload in WORKLOADS for optimizer in TRAIN]


# --- bookkeeping ---------------------------------------------------------------------------------


def samples_trained(steps: int, batch_size: int, n_train: int) -> int:
    """Training samples in the first `steps` steps of epoch-shuffled batches, the last one of each
    epoch short (batchlab's loader without drop_last): whole epochs of N, then full batches."""
    per_epoch = math.ceil(n_train / batch_size)
    return (steps // per_epoch) * n_train + (steps % per_epoch) * batch_size


def advise_batch_for(n_train: int) -> int:
    """B0: the power of two nearest N/256 (on a log scale), at least 2."""
    return max(2, 2 ** round(math.log2(n_train / 256)))


def grid_centre_lr(optimizer: str, batch_size: int) -> float:
    """The study's auto lr grid centre at `batch_size`: REFERENCE_LR × √(B/REFERENCE_BATCH)."""
    return REFERENCE_LR[optimizer] * math.sqrt(batch_size / REFERENCE_BATCH)


def within_factor(a: float | None, b: float | None, factor: float = 2.0) -> bool:
    """Whether two batch sizes lie within `factor` of each other (False when either is missing)."""
    return a is not None and b is not None and a > 0 and b > 0 and max(a, b) <= factor * min(a, b)


def range_in_force(ramp: list[dict], reached_at: float | None) -> dict:
    """The ramp's range that holds the samples seen just before `reached_at` (the last range with
    ``from_samples`` < reached_at); the last range when the run never reached its target."""
    if reached_at is None:
        return ramp[-1]
    started = [row for row in ramp if row["from_samples"] < reached_at]
    return started[-1] if started else ramp[0]


def first_reached(evals: list[dict], target) -> dict | None:
    """The first evaluation row at which `target` holds (None: never)."""
    return next((row for row in evals if target.met(row)), None)


# --- the study -----------------------------------------------------------------------------------


def study_values(workload: Workload, optimizer: str, name: str) -> dict[str, Any]:
    """The StudyConfig values of one case."""
    return {"name": name, "dataset": workload.dataset, "model": workload.model, "batch_sizes": list(workload.batch_sizes),
            "lrs": "auto", "lr_rule": "sqrt", "reference_lr": REFERENCE_LR[optimizer],
            "reference_batch_size": REFERENCE_BATCH, "lr_grid_size": 5, "lr_extensions": STUDY_LR_EXTENSIONS,
            "seeds": STUDY_SEEDS, "target": workload.target, "max_steps": STUDY_MAX_STEPS,
            "train": TRAIN[optimizer]}  # fmt: skip


def study_samples(trials, n_train: int) -> int:
    """Training samples over every trial of a study (`samples_trained` of each trial's steps)."""
    return int(sum(samples_trained(int(steps), int(batch), n_train)
                   for steps, batch in zip(trials["steps"], trials["batch_size_value"])))


def check_study_samples(study, counted: int) -> None:
    """The stored trials' own step tables (resumed groups included) add up to `counted`."""
    from batchlab.store import RunStore

    with RunStore(study.store) as store:
        tables = [store.load_run(run_id).steps for run_id in store.group_runs(study.group_id)]
    stored = sum(int(steps["samples_seen"].iloc[-1]) for steps in tables if len(steps))
    if len(tables) != len(study.trials) or stored != counted:
        raise AssertionError(f"{study.config.name}: {counted} samples counted over {len(study.trials)} trials, "
                             f"{stored} in the {len(tables)} stored step tables")


def run_case_study(workload: Workload, optimizer: str, name: str, store: Path) -> dict[str, Any]:
    """Run (or resume) the case's study in this process and return its numbers."""
    import batchlab as bl
    from batchlab.config import make_study_config

    started = time.perf_counter()
    study = bl.run_study(make_study_config(study_values(workload, optimizer, name)), store=store,
                         executor="in-process")
    n_train = study.plan.n_train
    samples = study_samples(study.trials, n_train)
    check_study_samples(study, samples)
    fit, recommendation = study.fit, study.recommendation
    best = recommendation.batch_size
    return {"config": study_values(workload, optimizer, name), "n_train": n_train, "trials": len(study.trials),
            "samples": samples, "seconds": time.perf_counter() - started,
            "b_crit": fit.b_crit, "b_crit_lo": fit.b_crit_lo, "b_crit_hi": fit.b_crit_hi, "r2": fit.r2,
            "b_simple": fit.b_simple, "fit_ok": bool(fit.ok),
            "recommended_batch_size": None if best is None else study.plan.value_of(best),
            "recommended_lr": recommendation.lr if best is not None else None,
            "recommended_samples_to_target": _samples_to_target(study, best),
            "recommendation": recommendation.text,
            "summary": [{"batch_size": study.plan.value_of(row["batch_size"]), "best_lr": row["best_lr"],
                         "steps_to_target": row["steps_to_target"], "samples_to_target": row["samples_to_target"]}
                        for row in study.summary.to_dict("records")]}  # fmt: skip


def _samples_to_target(study, batch_size) -> float | None:
    if batch_size is None:
        return None
    row = study.summary[study.summary["batch_size"].astype(str) == str(batch_size)]
    return float(row["samples_to_target"].iloc[0])


# --- advise --------------------------------------------------------------------------------------


def run_advise(workload: Workload, optimizer: str, seed: int, lr: float) -> dict[str, Any]:
    """One `batchlab advise` run at B0 = `advise_batch_for` (N) and `lr`, through the command's own
    pieces, with its numbers and samples."""
    import batchlab as bl
    from batchlab.config import parse_target
    from batchlab.critical_batch import advise_batch_size
    from batchlab.models import model_from_spec
    from batchlab.study.trials import _last_measured as last_measured

    started = time.perf_counter()
    dataset = bl.load_dataset(workload.dataset)
    batch_size = advise_batch_for(dataset.n_train)
    config = bl.TrainConfig(batch_size=batch_size, epochs=ADVISE_EPOCHS, lr=lr, seed=seed, **TRAIN[optimizer])
    model = model_from_spec(workload.model, dataset, seed=seed)
    measure = bl.LocalCBS(factors=ADVISE_FACTORS, seeds=ADVISE_BRANCH_SEEDS)
    run = bl.fit(model, dataset, config, probes=("noise_scale",), callbacks=[measure], progress=False)
    advice = advise_batch_size(run.evals, batch_size, lr, optimizer)
    reached = first_reached(run.evals.to_dict("records"), parse_target(workload.target))
    reached_at = None if reached is None else float(reached["samples_seen"])
    in_force = range_in_force(advice.ramp, reached_at)
    # The noise-scale probe's B_simple read as the study reads its trials' (its own function): the
    # smoothed value last measured at or before the target.
    probe_b_simple = last_measured(run.steps.to_dict("records"), "noise_scale",
                                   reached["step"] if reached is not None else math.inf)
    points = advice.points.to_dict("records")
    at = next(p for p in points if p["samples_seen"] == in_force["from_samples"])
    branches = [{"branches": len(result.table), "samples_per_branch": result.samples} for _, result in measure.results]
    if [step for step, _ in measure.results] != [p["step"] for p in points]:
        raise AssertionError("a measurement failed: its branches cannot be counted")
    run_samples = int(run.steps["samples_seen"].iloc[-1])
    branch_samples = sum(b["branches"] * b["samples_per_branch"] for b in branches)
    return {"seed": seed, "batch_size": batch_size, "lr": lr, "epochs": ADVISE_EPOCHS, "n_train": dataset.n_train,
            "factors": list(ADVISE_FACTORS), "branch_seeds": ADVISE_BRANCH_SEEDS, "status": run.status,
            "measurements": [{**_point(p), **b} for p, b in zip(points, branches)],
            "ramp": advice.ramp, "reached_target_at_samples": reached_at,
            "recommended_batch_size": int(in_force["batch_size"]), "recommended_lr": in_force["lr"],
            "local_cbs_at_recommendation": int(at["local_cbs"]), "b_simple_at_recommendation": float(at["b_simple"]),
            "b_simple_probe_at_target": probe_b_simple,
            "run_samples": run_samples, "branch_samples": branch_samples, "samples": run_samples + branch_samples,
            "seconds": time.perf_counter() - started}  # fmt: skip


def _point(point: dict) -> dict[str, Any]:
    """One measurement as plain JSON values (+inf, no tested batch worse, is written Infinity)."""
    return {"step": int(point["step"]), "samples_seen": int(point["samples_seen"]),
            "local_cbs": int(point["local_cbs"]), "local_cbs_upper": float(point["local_cbs_upper"]),
            "b_simple": float(point["b_simple"])}


# --- one case, the verdict, the table ------------------------------------------------------------


def best_lr_at(study: dict, batch_size: int) -> float:
    """The study's best lr at `batch_size` (a batch size of its grid at which some lr reached the target)."""
    rows = [row["best_lr"] for row in study["summary"] if row["batch_size"] == batch_size]
    if not rows or not math.isfinite(rows[0]):
        raise RuntimeError(f"the study found no best lr at B = {batch_size}; widen its grid")
    return float(rows[0])


def advise_runs(case: str, workload: Workload, optimizer: str, lr: float) -> list[dict[str, Any]]:
    """`run_advise` once per seed of ADVISE_SEEDS, with progress on stderr."""
    runs = []
    for seed in ADVISE_SEEDS:
        run = run_advise(workload, optimizer, seed, lr)
        say(f"{case}: advise at lr {lr:.3g}, seed {seed}: B = {run['recommended_batch_size']} "
            f"(local CBS {[m['local_cbs'] for m in run['measurements']]}, {run['samples']:,} samples, "
            f"{run['seconds']:.0f} s)")
        runs.append(run)
    return runs


def verdict(study: dict, advise_runs: list[dict]) -> dict[str, Any]:
    """Within 2× and the samples ratio of each advise run against the study (from the numbers alone)."""
    best = study["recommended_batch_size"]
    within = [within_factor(run["recommended_batch_size"], best) for run in advise_runs]
    ratios = [run["samples"] / study["samples"] for run in advise_runs]
    return {"within_2x": within, "samples_ratio": ratios, "all_within_2x": all(within),
            "all_under_tenth": all(r <= 0.1 for r in ratios)}


def run_case(case: str, store: Path) -> dict[str, Any]:
    """The study and the advise runs of one case, with the verdict."""
    workload_name, optimizer = case.split("/")
    workload = WORKLOADS[workload_name]
    say(f"{case}: study ({len(workload.batch_sizes)} batch sizes, target {workload.target})")
    study = run_case_study(workload, optimizer, f"advise-vs-study {case}", store)
    say(f"{case}: study B_crit {study['b_crit']:.3g}, recommends B = {study['recommended_batch_size']} "
        f"({study['samples']:,} samples, {study['seconds']:.0f} s)")
    b0 = advise_batch_for(study["n_train"])
    tuned = advise_runs(case, workload, optimizer, best_lr_at(study, b0))
    centre = advise_runs(case, workload, optimizer, grid_centre_lr(optimizer, b0))
    return {"workload": workload_name, "optimizer": optimizer, "dataset": workload.dataset, "model": workload.model,
            "target": workload.target, "study": study, "advise": tuned, "verdict": verdict(study, tuned),
            "advise_centre_lr": centre, "verdict_centre_lr": verdict(study, centre)}  # fmt: skip


def number(value: float | None, digits: int = 3) -> str:
    """A table cell: whole with separators from 100 on, else `digits` significant; – when missing."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def span(values: list[float], digits: int = 3) -> str:
    """`low–high` of `values` as table cells (one value when they agree)."""
    low, high = number(min(values), digits), number(max(values), digits)
    return low if low == high else f"{low}–{high}"


TABLE_HEADER = ("| workload | optimizer | study B_crit [95% CI] | study B | study samples | advise B0, lr | "
                "advise B (3 runs) | local CBS range | B_simple (advise's probe, at the target) | advise samples | ratio | "
                "within 2× |")


def table(results: dict[str, Any], cases: list[str] = CASES) -> str:
    """The markdown table of every case in `cases`; a case missing from `results` says so."""
    lines = [TABLE_HEADER, "|---|---|---|---:|---:|---|---|---|---|---:|---:|---|"]
    for case in cases:
        workload, optimizer = case.split("/")
        if case not in results:
            lines.append(f"| {workload} | {optimizer} | not run | | | | | | | | | |")
            continue
        lines.append(table_row(results[case]))
    return "\n".join(lines)


def table_row(case: dict[str, Any]) -> str:
    study, runs, v = case["study"], case["advise"], case["verdict"]
    best = study["recommended_batch_size"]
    return (f"| {case['workload']} | {case['optimizer']} | {number(study['b_crit'])} "
            f"[{number(study['b_crit_lo'])}–{number(study['b_crit_hi'])}] | {best if best is not None else 'none'} | "
            f"{study['samples']:,} | {runs[0]['batch_size']}, {number(runs[0]['lr'])} | "
            f"{', '.join(str(run['recommended_batch_size']) for run in runs)} | "
            f"{span([m['local_cbs'] for run in runs for m in run['measurements']])} | "
            f"{span([run['b_simple_probe_at_target'] for run in runs])} | {span([run['samples'] for run in runs])} | "
            f"{span(v['samples_ratio'], 2)} | {sum(v['within_2x'])}/{len(runs)} |")  # fmt: skip


def centre_lr_table(results: dict[str, Any], cases: list[str] = CASES) -> str:
    """The same advise runs at the study grid's centre lr at B0 instead of its best lr there."""
    header = ("| workload | optimizer | advise B0, lr (grid centre) | study's best lr at B0 | advise B (3 runs) | "
              "reached the target | within 2× of the study's B |")
    lines = [header, "|---|---|---|---:|---|---|---|"]
    for case in (results[case] for case in cases if case in results):
        runs = case["advise_centre_lr"]
        reached = sum(run["reached_target_at_samples"] is not None for run in runs)
        lines.append(f"| {case['workload']} | {case['optimizer']} | {runs[0]['batch_size']}, {number(runs[0]['lr'])} | "
                     f"{number(case['advise'][0]['lr'])} | {', '.join(str(run['recommended_batch_size']) for run in runs)} | "
                     f"{reached}/{len(runs)} | {sum(case['verdict_centre_lr']['within_2x'])}/{len(runs)} |")  # fmt: skip
    return "\n".join(lines)


def signal_table(done: list[dict[str, Any]]) -> str:
    """Each signal (over every advise run at the tuned lr) divided by the study's B_crit."""
    runs = [(case, run) for case in done for run in case["advise"]]
    signals = {"advise's recommended B (local CBS)": [run["recommended_batch_size"] for _, run in runs],
               "B_simple at the same measurement (advise)": [run["b_simple_at_recommendation"] for _, run in runs],
               "B_simple of advise's noise-scale probe at the target": [run["b_simple_probe_at_target"] for _, run in runs],
               "B_simple near the target (the study)": [case["study"]["b_simple"] for case, _ in runs]}
    b_crit = [case["study"]["b_crit"] for case, _ in runs]
    lines = ["| signal | ÷ study B_crit (geometric mean) | range | within 2× of B_crit |", "|---|---:|---|---:|"]
    for name, values in signals.items():
        ratios = [value / reference for value, reference in zip(values, b_crit)]
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.nan
        lines.append(f"| {name} | {number(mean, 2)} | {span(ratios, 2) if ratios else '–'} | "
                     f"{sum(within_factor(r, 1) for r in ratios)} of {len(ratios)} |")
    return "\n".join(lines)


def by_optimizer(done: list[dict[str, Any]]) -> str:
    """Per optimizer: advise's B over the study's (geometric mean and range) and how often within 2×."""
    parts = []
    for optimizer in TRAIN:
        pairs = [(run["recommended_batch_size"], case["study"]["recommended_batch_size"])
                 for case in done if case["optimizer"] == optimizer for run in case["advise"]]
        ratios = [mine / theirs for mine, theirs in pairs if theirs]
        if ratios:
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            parts.append(f"{OPTIMIZER_NAMES[optimizer]}: advise's B ÷ the study's {number(mean, 2)} (geometric mean; {span(ratios, 2)}), "
                         f"within 2× in {sum(within_factor(r, 1) for r in ratios)} of {len(ratios)} runs")
    return "; ".join(parts) + "." if parts else ""


def report(results: dict[str, Any], cases: list[str] = CASES) -> str:
    """The table, what it adds up to (the goal's two counts), the signals against B_crit, and the
    same advise runs at the grid's centre lr."""
    done = [results[case] for case in cases if case in results]
    missing = [case for case in cases if case not in results]
    runs = sum(len(case["advise"]) for case in done)
    within = sum(w for case in done for w in case["verdict"]["within_2x"])
    cheap = sum(r <= 0.1 for case in done for r in case["verdict"]["samples_ratio"])
    whole = [f"{case['workload']}/{case['optimizer']}" for case in done if case["verdict"]["all_within_2x"]]
    goal = (f"Advise's recommended B within 2× of the study's: {within} of {runs} advise runs; in all 3 runs of "
            f"{len(whole)} of {len(done)} cases ({', '.join(whole) or 'none'}). Advise at ≤ 1/10 of the study's "
            f"samples: {cheap} of {runs} runs. {by_optimizer(done)}")
    centre = ("The same advise runs at the study grid's centre lr at B0, a guess made before any training, instead "
              "of the study's best lr there:")
    lines = [table(results, cases), "", goal, "", signal_table(done), "", centre, "", centre_lr_table(results, cases)]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"command": COMMAND, "cases": {}}
    return json.loads(path.read_text())


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write the JSON atomically (a kill mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated cases, e.g. blobs-mlp/sgd (default: all)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file; cases in it are skipped")
    parser.add_argument("--store", type=Path, default=Path("/tmp/advise_vs_study.db"),
                        help="run store of the studies (a killed study resumes from it)")
    args = parser.parse_args(argv)
    cases = CASES if args.only is None else args.only.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; choose among {', '.join(CASES)}")

    import torch

    torch.set_num_threads(1)
    results = load_results(args.json)
    for case in cases:
        if case in results["cases"]:
            say(f"{case}: in {args.json}, skipped")
            continue
        results["cases"][case] = run_case(case, args.store)
        save_results(args.json, results)
    print(report(results["cases"], cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
