"""Smith et al. 2018 on MNIST-1D: decay the learning rate, or increase the batch size instead?

"Don't decay the learning rate, increase the batch size" (Smith, Kindermans, Ying & Le, ICLR 2018)
claims that multiplying the batch size by k where a step schedule divides the learning rate by k
reaches the same test accuracy with fewer parameter updates, as long as the batch stays well
below the training set (the SGD noise scale g = lr·(N/B - 1)/(1 - momentum) then falls by about k
either way). Two arms, the same in everything else (SGD with momentum 0.9, the MLP 40-100-100-10,
each seed the same initial weights and first-phase batches in both arms):

* ``decay lr``: batch B throughout; the lr divided by 5 after every PHASE_EPOCHS epochs
  (``schedule="step", step_epochs=PHASE_EPOCHS, gamma=0.2``);
* ``increase B``: the lr held; the batch multiplied by 5 at the same epochs instead
  (``batch_size=[(0, B), (PHASE_EPOCHS·N, 5B), (2·PHASE_EPOCHS·N, 25B)], lr_scaling="none"``).

MNIST-1D is split as ``bl.load_dataset("mnist1d", val_fraction=0.1)``: N = 3600 training samples,
400 validation samples carved from them, and the dataset's own 1000 held-out samples as the test
split. "Test accuracy" is the test split's, at the last epoch's end.

The runs are eager (no compiled step) on the portable kernels (PORTABLE_KERNELS, as docs/generate.py
pins its blocks): the script re-executes itself with them, so the accuracies it writes are the
same on every x86-64 CPU, and the slow test in tests/test_smith_increase_batch.py gets them again.

    python benchmarks/smith_increase_batch.py [--seeds 5] [--first-seed 0] [--batch 16] [--lr 0.05]
                                              [--phase-epochs 10] [--json PATH] [--figure PATH] [--replot]

Prints a markdown table (arm, batch sizes, lr, updates, test accuracy mean ± sd over the seeds,
median wall seconds per run); writes the JSON (default benchmarks/results/smith_increase_batch.json,
with a suffix naming each option that differs from the defaults: ``-lr0.1``, ``-seeds5-9``) and,
for the default setup, the figure docs/figures/smith_increase_batch.png (``--replot`` redraws it,
and prints the table, from the JSON without training). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import batchlab as bl
from batchlab import plots

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "smith_increase_batch.json"
FIGURE = ROOT / "docs" / "figures" / "smith_increase_batch"
COMMAND = "python benchmarks/smith_increase_batch.py"
# docs/generate.py's PORTABLE_KERNELS (a test checks they agree): ATen's scalar kernels, MKL's
# reproducible code path; the same bits on every x86-64 CPU.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT"}

DATASET, VAL_FRACTION = "mnist1d", 0.1
MODEL, HIDDEN = "mlp", [100, 100]
BATCH, LR, MOMENTUM = 16, 0.05, 0.9
FACTOR = 5  # the lr is divided, or the batch multiplied, by this at each phase's end
PHASE_EPOCHS, PHASES = 10, 3
SEEDS = 5
ARMS = ("decay lr", "increase B")
ZOOM_FROM = 40  # the figure's lowest test accuracy, in %: the first epochs, alike in both arms, lie below


def load_dataset() -> bl.Dataset:
    """MNIST-1D: 3600 training, 400 validation (from the 4000), the 1000 held-out samples as test."""
    return bl.load_dataset(DATASET, val_fraction=VAL_FRACTION)


def arms(n_train: int, seed: int = 0, batch: int = BATCH, lr: float = LR,
         phase_epochs: int = PHASE_EPOCHS) -> dict[str, bl.TrainConfig]:
    """The two arms' configs: the same everything, but the lr decays in one and the batch grows in the other.

    Args:
        n_train: training-set size N; the batch changes at k·phase_epochs·N samples seen, which is
            where the step schedule's epochs k·phase_epochs end.
        seed: initial weights, data order.
        batch: the first phase's batch size B (the last phase's is B·FACTOR², at most N).
        lr: the first phase's learning rate (kept throughout by ``increase B``).
        phase_epochs: epochs per phase; PHASES phases.

    Returns:
        ``{"decay lr": config, "increase B": config}``.
    """
    common = {"epochs": PHASES * phase_epochs, "optimizer": "sgd", "lr": lr, "momentum": MOMENTUM, "seed": seed,
              "lr_scaling": "none",  # the lr stays fixed while the batch grows
              "compile": "off"}  # eager: inductor compiles its kernels for the machine, the portable ones are eager
    schedule = [(k * phase_epochs * n_train, batch * FACTOR**k) for k in range(PHASES)]
    return {"decay lr": bl.TrainConfig(batch_size=batch, schedule="step", step_epochs=phase_epochs,
                                       gamma=1 / FACTOR, **common),
            "increase B": bl.TrainConfig(batch_size=schedule, schedule="constant", **common)}


def train(config: bl.TrainConfig, dataset: bl.Dataset) -> dict[str, Any]:
    """One run: its updates, final accuracies, seconds and the curve at every evaluation."""
    model = bl.build_model(MODEL, dataset, hidden=HIDDEN, seed=config.seed)
    started = time.perf_counter()
    run = bl.fit(model, dataset, config, progress=False)
    wall = time.perf_counter() - started
    last, evals = run.epochs.iloc[-1], run.evals  # evaluations at step 0 and every epoch's end
    return {"seed": config.seed, "updates": len(run.steps), "wall_seconds": wall, "train_seconds": run.seconds,
            **{name: float(last[name]) for name in ("train_acc", "val_acc", "test_acc", "test_loss")},
            "curve": {name: evals[name].tolist() for name in ("step", "epoch", "train_loss", "val_acc", "test_acc")}}


def measure(seeds: range, batch: int = BATCH, lr: float = LR, phase_epochs: int = PHASE_EPOCHS,
            log: Any = None) -> dict[str, Any]:
    """Train both arms for each seed (one arm's runs after the other's); the results as JSON-ready data."""
    dataset = load_dataset()
    results: dict[str, Any] = {"setup": setup(dataset, seeds, batch, lr, phase_epochs), "arms": {}}
    for arm in ARMS:
        runs = []
        for seed in seeds:
            runs.append(train(arms(dataset.n_train, seed, batch, lr, phase_epochs)[arm], dataset))
            if log is not None:
                print(f"{arm}, seed {seed}: test_acc {runs[-1]['test_acc']:.4f}, {runs[-1]['updates']} updates, "
                      f"{runs[-1]['wall_seconds']:.1f} s", file=log, flush=True)
        results["arms"][arm] = {"config": arms(dataset.n_train, seeds[0], batch, lr, phase_epochs)[arm].model_dump(mode="json"),
                                "runs": runs}
    return results


def setup(dataset: bl.Dataset, seeds: range, batch: int, lr: float, phase_epochs: int) -> dict[str, Any]:
    """What was trained, and where (the seconds are this machine's)."""
    return {"dataset": DATASET, "val_fraction": VAL_FRACTION, "n_train": dataset.n_train,
            "n_val": len(dataset.val[1]), "n_test": len(dataset.test[1]), "model": MODEL, "hidden": HIDDEN,
            "optimizer": "sgd", "momentum": MOMENTUM, "batch": batch, "lr": lr, "factor": FACTOR,
            "phase_epochs": phase_epochs, "phases": PHASES, "seeds": list(seeds), "torch": torch.__version__,
            "kernels": {name: os.environ.get(name) for name in PORTABLE_KERNELS}, "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def result_path(seeds: range, batch: int, lr: float, phase_epochs: int) -> Path:
    """The JSON of a setup: RESULTS, with a suffix for each option that differs from the defaults."""
    suffix = "".join(f"-{name}{value}" for name, value, default in (
        ("b", batch, BATCH), ("lr", f"{lr:g}", f"{LR:g}"), ("e", phase_epochs, PHASE_EPOCHS),
        ("seeds", f"{seeds[0]}-{seeds[-1]}", f"0-{SEEDS - 1}")) if value != default)
    return RESULTS.with_name(f"{RESULTS.stem}{suffix}.json")


# --- the report: pure functions of the JSON ------------------------------------------------------


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm: batch sizes and lrs per phase, updates, accuracies (mean and sd over seeds, in %),
    median wall seconds per run."""
    s = results["setup"]
    sizes = {"decay lr": [s["batch"]] * s["phases"], "increase B": [s["batch"] * s["factor"]**k for k in range(s["phases"])]}
    lrs = {"decay lr": [s["lr"] / s["factor"]**k for k in range(s["phases"])], "increase B": [s["lr"]] * s["phases"]}
    rows = []
    for arm, data in results["arms"].items():
        runs = data["runs"]
        updates = {run["updates"] for run in runs}
        assert len(updates) == 1, f"{arm}: the seeds made different numbers of updates {sorted(updates)}"
        rows.append({"arm": arm, "batch sizes": sizes[arm], "lrs": lrs[arm], "updates": updates.pop(),
                     **{key: statistics.mean(100 * run[key] for run in runs) for key in ("train_acc", "val_acc", "test_acc")},
                     "test_acc_sd": statistics.stdev(100 * run["test_acc"] for run in runs),
                     "seconds": statistics.median(run["wall_seconds"] for run in runs)})
    return rows


def paired_difference(results: dict[str, Any], key: str = "test_acc") -> tuple[float, float]:
    """``key`` of ``increase B`` minus ``decay lr``, seed by seed, in points: (mean, sd)."""
    first, second = (results["arms"][arm]["runs"] for arm in ARMS)
    diffs = [100 * (b[key] - a[key]) for a, b in zip(first, second)]
    return statistics.mean(diffs), statistics.stdev(diffs)


def report(results: dict[str, Any]) -> str:
    """The markdown table of `summary`, and a line with the paired difference and the update ratio."""
    rows = summary(results)
    lines = ["| arm | batch size per phase | lr per phase | updates | test acc % (mean ± sd) | seconds per run |",
             "|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {' → '.join(map(str, row['batch sizes']))} | "
                     f"{' → '.join(f'{lr:g}' for lr in row['lrs'])} | {row['updates']:,} | "
                     f"{row['test_acc']:.2f} ± {row['test_acc_sd']:.2f} | {row['seconds']:.1f} |")
    mean, sd = paired_difference(results)
    lines += ["", f"Increase B minus decay lr, seed by seed: {mean:+.2f} points of test accuracy (sd {sd:.2f} over "
                  f"{len(results['setup']['seeds'])} seeds), with {rows[0]['updates'] / rows[1]['updates']:.2f}× fewer updates."]
    return "\n".join(lines)


def setups_report(all_results: list[dict[str, Any]]) -> str:
    """One row per setup tried: where each arm ends (train and test accuracy) and the paired differences."""
    lines = ["| B → 25B | lr | epochs per phase | seeds | updates | train acc % | test acc %, decay lr | "
             "test acc %, increase B | increase − decay, test (sd) | increase − decay, val (sd) |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for results in all_results:
        s, (decay, grow) = results["setup"], summary(results)
        test, val = paired_difference(results), paired_difference(results, "val_acc")
        lines.append(f"| {s['batch']} → {s['batch'] * s['factor']**2} | {s['lr']:g} | {s['phase_epochs']} | "
                     f"{s['seeds'][0]}–{s['seeds'][-1]} | {decay['updates']:,} / {grow['updates']:,} | "
                     f"{decay['train_acc']:.1f} / {grow['train_acc']:.1f} | {decay['test_acc']:.2f} | "
                     f"{grow['test_acc']:.2f} | {test[0]:+.2f} ({test[1]:.2f}) | {val[0]:+.2f} ({val[1]:.2f}) |")
    return "\n".join(lines)


def setup_key(results: dict[str, Any]) -> tuple[int, float, int]:
    """What a setup trains: (B, lr, epochs per phase); the seeds aside."""
    s = results["setup"]
    return s["batch"], s["lr"], s["phase_epochs"]


def committed() -> list[dict[str, Any]]:
    """Every committed result: the default setup's (seeds 0.. first), then the others by B, lr, epochs."""
    default = (BATCH, LR, PHASE_EPOCHS)
    results = [json.loads(path.read_text()) for path in RESULTS.parent.glob(f"{RESULTS.stem}*.json")]
    return sorted(results, key=lambda r: (setup_key(r) != default, setup_key(r), r["setup"]["seeds"][0]))


def pooled_difference(all_results: list[dict[str, Any]]) -> tuple[float, float, list[int]]:
    """Test accuracy of ``increase B`` minus ``decay lr`` over every seed of the first result's setup, in
    points: (mean, standard error, seeds)."""
    same = [r for r in all_results if setup_key(r) == setup_key(all_results[0])]
    diffs = [100 * (b["test_acc"] - a["test_acc"]) for r in same
             for a, b in zip(*(r["arms"][arm]["runs"] for arm in ARMS))]
    seeds = sorted(seed for r in same for seed in r["setup"]["seeds"])
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5, seeds


@plots.styled
def figure(results: dict[str, Any]):
    """Test accuracy (mean over seeds) against epochs and against updates, both arms, phases marked."""
    fig, (by_epoch, by_update) = plots.new_figure(1, 2, size=(8.0, 3.6))
    s = results["setup"]
    top = 0.0
    for arm, color, style in zip(ARMS, ("#1b4f9c", "#d95f02"), ("-", "--")):
        curves = [run["curve"] for run in results["arms"][arm]["runs"]]
        mean = [100 * statistics.mean(values) for values in zip(*(c["test_acc"] for c in curves))]
        by_epoch.plot(curves[0]["epoch"], mean, color=color, linestyle=style, label=arm)
        by_update.plot(curves[0]["step"], mean, color=color, linestyle=style, label=arm)
        top = max(top, *mean)
    for k in range(1, s["phases"]):
        by_epoch.axvline(k * s["phase_epochs"], color="0.5", linestyle=":", linewidth=1)
    for ax in (by_epoch, by_update):  # the first phase is the same run in both arms; the end is what differs
        ax.set_ylim(ZOOM_FROM, top + 2)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="Against epochs (phases dotted)")
    by_update.set(xlabel="updates", ylabel="test accuracy (%)", title="Against updates")
    plots.legend_below(by_epoch)
    fig.suptitle(f"MNIST-1D MLP, mean of {len(s['seeds'])} seeds: lr ÷{s['factor']} or batch ×{s['factor']} "
                 f"every {s['phase_epochs']} epochs", fontsize=11)
    return fig


def on_portable_kernels() -> None:
    """Re-execute this script with PORTABLE_KERNELS set, unless they are (before torch computes anything)."""
    if any(os.environ.get(name) != value for name, value in PORTABLE_KERNELS.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PORTABLE_KERNELS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=BATCH, help="the first phase's batch size")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--phase-epochs", type=int, default=PHASE_EPOCHS)
    parser.add_argument("--json", type=Path, default=None, help="default: RESULTS, suffixed for a non-default setup")
    parser.add_argument("--figure", type=Path, default=None,
                        help="path without suffix (writes .png); default: docs/figures/smith_increase_batch "
                             "for the default setup, none otherwise")
    parser.add_argument("--replot", action="store_true", help="train nothing: the table and figure from the JSON")
    args = parser.parse_args()
    on_portable_kernels()
    torch.set_num_threads(1)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    path = args.json or result_path(seeds, args.batch, args.lr, args.phase_epochs)
    if args.replot:
        results = json.loads(path.read_text())
    else:
        results = measure(seeds, args.batch, args.lr, args.phase_epochs, log=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    figure_path = args.figure or (FIGURE if path == RESULTS else None)
    if figure_path is not None:
        plots.save_figure(figure(results), figure_path, formats=("png",))
    print(report(results))


if __name__ == "__main__":
    main()
