"""Benchmark: a study grid run by `run_study` vs the same grid in a plain PyTorch loop.

The grid: 6 batch sizes × 6 learning rates × 3 seeds of the MLP on MNIST-1D, SGD with momentum
0.9, each trial trained until ``val_acc >= TARGET`` or the step budget. Both sides do the same
work: the same evaluation points (`batchlab.study.evaluation_steps`, full passes over train and
val), the same stop at the target. Between epoch ends only the validation set is evaluated
(the target's split), on both sides. The plain loop is the fastest straightforward PyTorch: tensors
in memory, index permutations, one trial after another. One process, one thread.

    python benchmarks/study.py [--max-steps 400] [--target 0.45]

Prints both wall times and their ratio.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.45)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from batchlab.config import make_study_config
    from batchlab.data import load_dataset
    from batchlab.study import evaluation_steps, run_study

    ds = load_dataset("mnist1d")
    config = make_study_config({
        "dataset": "mnist1d", "model": "mlp", "batch_sizes": BATCH_SIZES, "lrs": LRS, "seeds": len(SEEDS),
        "target": f"val_acc>={args.target}", "max_steps": args.max_steps, "noise_scale": False,
        "train": {"momentum": 0.9},
    })
    print(f"grid: {len(BATCH_SIZES)} batch sizes × {len(LRS)} lrs × {len(SEEDS)} seeds = "
          f"{len(BATCH_SIZES) * len(LRS) * len(SEEDS)} trials, MNIST-1D MLP, target val_acc>={args.target}, "
          f"budget {args.max_steps} steps, 1 thread")

    started = time.perf_counter()
    plain = {}
    for batch_size in BATCH_SIZES:
        points = evaluation_steps(args.max_steps, 0.05)
        for lr in LRS:
            for seed in SEEDS:
                plain[(batch_size, lr, seed)] = plain_trial(ds, batch_size, lr, seed, args.max_steps, args.target, points)
    plain_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        study = run_study(config, store=Path(folder) / "bench.db")
        study_seconds = time.perf_counter() - started

    reached_plain = sum(v is not None for v in plain.values())
    reached_study = int((study.trials["status"] == "reached").sum())
    print(f"plain PyTorch loop, one trial after another: {plain_seconds:8.1f} s  ({reached_plain} reached the target)")
    print(f"run_study (vectorized replicas, stored):     {study_seconds:8.1f} s  ({reached_study} reached the target)")
    print(f"speed-up: {plain_seconds / study_seconds:.1f}x")


if __name__ == "__main__":
    main()
