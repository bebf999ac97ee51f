"""Benchmark: a study grid run by `run_study` vs the same grid in a plain PyTorch loop, on one and on all cores.

The grid: 6 batch sizes × 6 learning rates × 3 seeds of the MLP on MNIST-1D, SGD with momentum
0.9, each trial trained until ``val_acc >= TARGET`` or the step budget. The plain loop does the
work a study needs: the same evaluation points (`batchlab.study.evaluation_steps`; full passes
over train and val at epoch ends, val alone in between), the same stop at the target. It is the
fastest straightforward PyTorch: tensors in memory, index permutations drawn as batchlab draws
them, one trial after another — in one process, then on all cores (a process pool, one torch
thread per process). `run_study` runs with its defaults: the process executor on all cores,
vectorized replicas, pruning. The answers are compared: best lr per batch size (median
steps-to-target over seeds) and that median.

    python benchmarks/study.py [--max-steps 400] [--target 0.45] [--workers auto]

Prints a markdown table of wall times and ratios, and whether the answers agree.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

BATCH_SIZES = [8, 16, 32, 64, 128, 256]
LRS = [0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2]
SEEDS = [0, 1, 2]


def plain_trial(ds, batch_size: int, lr: float, seed: int, max_steps: int, target: float, points) -> int | None:
    """One trial in plain PyTorch: returns the first evaluated step with val_acc >= target."""
    from batchlab.models import build_model

    model = build_model("mlp", ds, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    (X, y), (Xv, yv) = ds.train, ds.val
    generator = torch.Generator().manual_seed(seed)
    step, wanted = 0, set(points)
    while step < max_steps:
        order = torch.randperm(X.shape[0], generator=generator)
        for start in range(0, X.shape[0], batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(model(X[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if not torch.isfinite(loss):
                return None
            end_of_epoch = start + batch_size >= X.shape[0]
            if step in wanted or end_of_epoch or step == max_steps:
                model.eval()
                with torch.no_grad():
                    if end_of_epoch or step == max_steps:  # full passes where the study's loop makes them
                        loss_fn(model(X), y)
                    val_acc = model(Xv).argmax(1).eq(yv).float().mean().item()
                model.train()
                if val_acc >= target:
                    with torch.no_grad():
                        loss_fn(model(X), y)  # the full pass at the stopping step, for the gap
                    return step
            if step >= max_steps:
                break
    return None


def _init_plain_worker() -> None:
    torch.set_num_threads(1)


def _plain_task(args) -> tuple[tuple[int, float, int], int | None]:
    ds, batch_size, lr, seed, max_steps, target, points = args
    return (batch_size, lr, seed), plain_trial(ds, batch_size, lr, seed, max_steps, target, points)


def run_plain(ds, max_steps: int, target: float, workers: int = 1) -> dict[tuple[int, float, int], int | None]:
    """Every trial of the grid in the plain loop: one after another, or on ``workers`` processes."""
    from batchlab.study import evaluation_steps

    points = evaluation_steps(max_steps, 0.05)
    tasks = [(ds, b, lr, seed, max_steps, target, points) for b in BATCH_SIZES for lr in LRS for seed in SEEDS]
    if workers == 1:
        return dict(map(_plain_task, tasks))
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_plain_worker) as pool:
        return dict(pool.imap_unordered(_plain_task, tasks, chunksize=1))


def answer_of_plain(results: dict[tuple[int, float, int], int | None]) -> dict[int, tuple[float | None, float]]:
    """Best lr per batch size and its median steps-to-target, by the study's own ranking rule."""
    import math

    import pandas as pd

    from batchlab.study.ranking import best_lr, lr_table

    rows = [{"batch_size": b, "lr": lr, "seed": seed, "steps_to_target": math.nan if steps is None else steps,
             "status": "reached" if steps is not None else "not_reached"} for (b, lr, seed), steps in results.items()]
    trials = pd.DataFrame(rows)
    answer = {}
    for b, at_b in trials.groupby("batch_size"):
        table = lr_table(at_b)
        best = best_lr(table)
        answer[int(b)] = (best, float(table.loc[table["lr"] == best, "median_steps"].iloc[0]) if best else math.nan)
    return answer


def answer_of_study(study) -> dict[int, tuple[float | None, float]]:
    import math

    return {int(row["batch_size"]): (None if math.isnan(row["best_lr"]) else float(row["best_lr"]),
                                     float(row["steps_to_target"])) for _, row in study.summary.iterrows()}


def same_answer(a: dict, b: dict) -> bool:
    import math

    def norm(answer):
        return {k: (lr, None if math.isnan(steps) else steps) for k, (lr, steps) in answer.items()}

    return norm(a) == norm(b)


def table(rows: list[tuple[str, float, str]]) -> str:
    """The markdown table: one row per way of running the grid, with its ratio to the slowest."""
    slowest = rows[0][1]
    lines = ["| how | wall s | speed-up vs sequential | answer |", "|---|---:|---:|---|"]
    for name, seconds, answer in rows:
        lines.append(f"| {name} | {seconds:.1f} | {slowest / seconds:.1f}× | {answer} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--workers", default="auto", help="processes for the parallel plain loop and run_study")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from batchlab.config import make_study_config
    from batchlab.data import load_dataset
    from batchlab.study import make_executor, run_study
    from batchlab.study.executors import resolve_workers

    workers = resolve_workers(args.workers)
    ds = load_dataset("mnist1d")
    config = make_study_config({
        "dataset": "mnist1d", "model": "mlp", "batch_sizes": BATCH_SIZES, "lrs": LRS, "seeds": len(SEEDS),
        "target": f"val_acc>={args.target}", "max_steps": args.max_steps, "noise_scale": False,
        "train": {"momentum": 0.9},
    })
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"grid: {len(BATCH_SIZES)} batch sizes × {len(LRS)} lrs × {len(SEEDS)} seeds = "
          f"{len(BATCH_SIZES) * len(LRS) * len(SEEDS)} trials, MNIST-1D MLP, target val_acc>={args.target}, "
          f"budget {args.max_steps} steps; {workers} cores, 1 torch thread each; load average {load:.2f} at the start")

    started = time.perf_counter()
    sequential = run_plain(ds, args.max_steps, args.target)
    sequential_seconds = time.perf_counter() - started
    reference = answer_of_plain(sequential)

    started = time.perf_counter()
    parallel = run_plain(ds, args.max_steps, args.target, workers)
    parallel_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        study = run_study(config, store=Path(folder) / "bench.db", executor=make_executor("processes", workers=workers))
        study_seconds = time.perf_counter() - started

    def verdict(answer) -> str:
        return "same" if same_answer(answer, reference) else "DIFFERENT"

    rows = [("plain PyTorch loop, one trial after another", sequential_seconds, "reference"),
            (f"plain PyTorch loop on {workers} processes", parallel_seconds, verdict(answer_of_plain(parallel))),
            (f"run_study (defaults: {workers} processes, replicas, pruning)", study_seconds,
             verdict(answer_of_study(study)))]
    print(table(rows))
    print(f"run_study vs the plain loop on {workers} processes: {parallel_seconds / study_seconds:.1f}×")
    study_answer = answer_of_study(study)
    for b in sorted(reference):
        ours, theirs = study_answer.get(b), reference[b]
        if ours is None or not same_answer({b: ours}, {b: theirs}):
            print(f"B={b}: plain loop best lr {theirs[0]} ({theirs[1]} steps), run_study {ours}")


if __name__ == "__main__":
    main()
