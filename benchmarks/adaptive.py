"""Benchmark: the adaptive batch size in one run, against the best fixed batch size of a full study.

For each workload and optimizer of `benchmarks/advise_vs_study.py` (blobs MLP, digits MLP, MNIST-1D MLP
and CNN; SGD with momentum 0.9 and Adam), whose full studies are in its JSON
(benchmarks/results/advise_vs_study.json, made by `python benchmarks/advise_vs_study.py`):

* **the best fixed batch size** is the study's recommendation: its steps and samples to the study's
  target (median over the study's 3 seeds at its best lr), from the study's own table;
* **the adaptive run** (`bl.Adaptive`), for each of 5 seeds and each signal (`local_cbs`, `b_simple`):
  start at B0 = the power of two nearest N/256 (as advise does) at the study's best lr at B0 (the one
  tuned number it is given; finding it is not counted), grow up to the study grid's largest batch,
  decide at the start and after every half epoch (`every` = N/2 samples), evaluate the validation
  split after every step to see the target, and stop there.

**Steps and samples** to the target are the adaptive run's own (the step and samples seen at the first
evaluation where the target holds). The measurements' cost is counted apart and added in the last
ratio: the local-CBS branches (factors 1, 2, 4 × 3 seeds × 8 steps of the largest branch, per
decision), as training samples; B_simple's per-sample gradients are not training and are not counted.
Wall time is the run's training plus its measurements (not evaluation), on this machine, one thread.

    python benchmarks/adaptive.py [--only mnist1d-mlp/adam,...] [--seeds 5] [--json PATH]

Progress on stderr; each finished case is written to the JSON at once (default
benchmarks/results/adaptive.json) and skipped when run again. Prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from batchlab.events import Callback, Stop

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "adaptive.json"
STUDIES = ROOT / "benchmarks" / "results" / "advise_vs_study.json"
COMMAND = "python benchmarks/adaptive.py"
SIGNALS = ("local_cbs", "b_simple")
FACTORS, BRANCH_SEEDS, STEPS_AT_LARGEST = (1, 2, 4), 3, 8  # `batchlab.adaptive`'s branches per decision


def _studies_module():
    spec = importlib.util.spec_from_file_location("advise_vs_study", ROOT / "benchmarks" / "advise_vs_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class StopAtTarget(Callback):
    """Stops the run at the first evaluation where the target holds, remembering (step, samples seen)."""

    def __init__(self, target):
        self.target, self.reached = target, None

    def on_evaluation(self, event):
        if self.reached is None and self.target.met({**event.metrics, "step": event.clock.step}):
            self.reached = (event.clock.step, event.clock.samples_seen)
            return Stop(f"reached {self.target}")
        return None


def run_adaptive(workload, optimizer: str, train: dict, seed: int, lr: float, start: int, largest: int,
                 signal: str) -> dict[str, Any]:
    """One adaptive run to the target; its steps, samples, batch sizes and measurement cost."""
    import batchlab as bl
    from batchlab.config import parse_target
    from batchlab.models import model_from_spec

    dataset = bl.load_dataset(workload.dataset)
    n = dataset.n_train
    adaptive = bl.Adaptive(start=start, max=largest, signal=signal, every=n // 2)
    config = bl.TrainConfig(batch_size=adaptive, epochs=200, max_steps=5000, lr=lr, seed=seed, eval_every=1,
                            eval_train=False, **train)
    stop = StopAtTarget(parse_target(workload.target))
    started = time.perf_counter()
    run = bl.fit(model_from_spec(workload.model, dataset, seed=seed), dataset, config, callbacks=[stop],
                 progress=False)
    seconds = time.perf_counter() - started - run.eval_seconds
    steps = run.steps
    decided = run.evals.dropna(subset=["adaptive_signal"]) if "adaptive_signal" in run.evals else run.evals.iloc[:0]
    cost = branch_samples(decided, start, dataset.n_train, signal)
    reached = stop.reached
    return {"seed": seed, "signal": signal, "lr": lr, "start": start, "max": largest, "status": run.status,
            "reached": reached is not None,
            "steps": reached[0] if reached else None, "samples": reached[1] if reached else None,
            "measurement_samples": cost, "batch_sizes": sorted(set(int(b) for b in steps.batch_size)),
            "decisions": [{"step": int(r.step), "samples_seen": int(r.samples_seen), "signal": float(r.adaptive_signal),
                           "batch_size": int(r.adaptive_batch_size)} for r in decided.itertuples()],
            "seconds": seconds}  # fmt: skip


def branch_samples(decided, start: int, n_train: int, signal: str) -> int:
    """Training samples of the local-CBS branches: per decision made at batch B (the batch in force
    then: the previous decision's, or ``start``), usable factors × seeds × 8 steps of the largest
    branch batch (`batchlab.local_cbs`'s default budget)."""
    if signal != "local_cbs":
        return 0
    total, batch = 0, start
    for row in decided.itertuples():
        factors = [k for k in FACTORS if k * batch <= n_train]
        if len(factors) >= 2:
            total += len(factors) * BRANCH_SEEDS * STEPS_AT_LARGEST * max(factors) * batch
        batch = int(row.adaptive_batch_size)
    return total


def summarize(runs: list[dict], best: dict) -> dict[str, Any]:
    """Medians over seeds beside the study's best fixed batch, and the goals' verdicts."""
    reached = [r for r in runs if r["reached"]]
    if len(reached) < len(runs):
        return {"reached": f"{len(reached)}/{len(runs)}", "goal_steps": False, "goal_samples": False}
    steps = statistics.median(r["steps"] for r in reached)
    samples = statistics.median(r["samples"] for r in reached)
    with_cost = statistics.median(r["samples"] + r["measurement_samples"] for r in reached)
    ratios = {"steps_ratio": steps / best["steps_to_target"], "samples_ratio": samples / best["samples_to_target"],
              "samples_with_measurements_ratio": with_cost / best["samples_to_target"]}
    return {"reached": f"{len(reached)}/{len(runs)}", "steps": steps, "samples": samples,
            "samples_with_measurements": with_cost, "seconds": statistics.median(r["seconds"] for r in reached),
            "largest_batch": max(max(r["batch_sizes"]) for r in reached), **ratios,
            "goal_steps": ratios["steps_ratio"] <= 1.0, "goal_samples": ratios["samples_ratio"] <= 1.1}  # fmt: skip


def run_case(case: str, studies: dict, module, seeds: int) -> dict[str, Any]:
    workload_name, optimizer = case.split("/")
    workload = module.WORKLOADS[workload_name]
    study = studies[case]["study"]
    n = study["n_train"]
    start = module.advise_batch_for(n)
    lr = module.best_lr_at(study, start)
    best = next(row for row in study["summary"] if row["batch_size"] == study["recommended_batch_size"])
    result = {"workload": workload_name, "optimizer": optimizer, "target": workload.target, "n_train": n,
              "best_fixed": best, "study_b_crit": study["b_crit"], "start": start, "lr": lr, "signals": {}}
    for signal in SIGNALS:
        runs = []
        for seed in range(seeds):
            run = run_adaptive(workload, optimizer, module.TRAIN[optimizer], seed, lr, start,
                               max(workload.batch_sizes), signal)
            say(f"{case} {signal} seed {seed}: {run['steps']} steps, {run['samples']} samples "
                f"(+{run['measurement_samples']:,} measuring), batches {run['batch_sizes']}, {run['seconds']:.1f} s")
            runs.append(run)
        result["signals"][signal] = {"runs": runs, **summarize(runs, best)}
    return result


def table(results: dict) -> str:
    lines = ["| workload | optimizer | best fixed B: steps, samples | signal | adaptive steps (×) | samples (×) | "
             "with measurements (×) | batches reached | seconds | goals |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"].values():
        best = case["best_fixed"]
        for signal, row in case["signals"].items():
            if "steps" not in row:
                lines.append(f"| {case['workload']} | {case['optimizer']} | B={best['batch_size']}: "
                             f"{best['steps_to_target']:g}, {best['samples_to_target']:,.0f} | {signal} | "
                             f"reached in {row['reached']} seeds | | | | | missed |")
                continue
            goals = ("steps ✓" if row["goal_steps"] else "steps ✗") + ", " + (
                "samples ✓" if row["goal_samples"] else "samples ✗")
            lines.append(
                f"| {case['workload']} | {case['optimizer']} | B={best['batch_size']}: {best['steps_to_target']:g}, "
                f"{best['samples_to_target']:,.0f} | {signal} | {row['steps']:g} ({row['steps_ratio']:.2f}) | "
                f"{row['samples']:,.0f} ({row['samples_ratio']:.2f}) | {row['samples_with_measurements']:,.0f} "
                f"({row['samples_with_measurements_ratio']:.2f}) | {case['start']}–{row['largest_batch']} | "
                f"{row['seconds']:.1f} | {goals} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated cases, e.g. mnist1d-mlp/adam")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = _studies_module()
    studies = json.loads(STUDIES.read_text())["cases"]
    results = json.loads(args.json.read_text()) if args.json.exists() else {"command": COMMAND, "cases": {}}
    wanted = [c for c in module.CASES if c in studies and (not args.only or c in args.only.split(","))]
    for case in wanted:
        if case in results["cases"]:
            continue
        results["cases"][case] = run_case(case, studies, module, args.seeds)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
