"""Data-parallel scaling: seconds per epoch at N = 1, 2 ranks and the scaling efficiency.

An MLP 40-100-100-10 on MNIST-1D (4000 samples), SGD, per-rank batch ``--batch-size`` (global batch
B×N: N ranks take 1/N of the steps of an epoch), ``--epochs`` epochs of which the first is a warm-up;
the figure is the median training time of the other epochs (evaluations excluded), as the run's own
``seconds`` column records it. Every N runs under ``torchrun --standalone`` with one torch thread per
rank (gloo on the CPU, NCCL with ``--device cuda``), ``--repeats`` times, alternating; ``fit`` is
the single-process `bl.fit` at batch B for reference. Scaling efficiency = T(1 rank) / (N · T(N ranks))
per epoch, i.e. the speed-up over N.

    python benchmarks/ddp.py [--nproc 1,2] [--batch-size 64] [--epochs 3] [--repeats 3] [--device cpu]

Rank 0 of each launch prints one JSON line; this script prints the markdown table of docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import batchlab as bl
from batchlab import distributed


def model(ds) -> torch.nn.Module:
    return bl.build_model("mlp", ds, seed=0, hidden=[100, 100])


def config(args) -> bl.TrainConfig:
    return bl.TrainConfig(batch_size=args.batch_size, epochs=args.epochs, optimizer="sgd", lr=0.05,
                          device=args.device, eval_train=False)


def epoch_seconds(run) -> float:
    """Median training seconds of the epochs after the first (warm-up)."""
    seconds = run.epochs["seconds"].tolist()
    return statistics.median(b - a for a, b in zip(seconds, seconds[1:]))


def rank_main(args) -> None:
    """One rank of a launch: train, then rank 0 prints its seconds per epoch."""
    torch.set_num_threads(1)
    ds = bl.load_dataset("mnist1d")
    run = distributed.fit(model(ds), ds, config(args), progress=False)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"epoch_seconds": epoch_seconds(run)}), flush=True)
    distributed.stop()


def launch(args, nproc: int) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--rank", "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(bl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=True)
    line = next(l for l in result.stdout.splitlines() if l.startswith("{"))
    return json.loads(line)["epoch_seconds"]


def single(args) -> float:
    torch.set_num_threads(1)
    ds = bl.load_dataset("mnist1d")
    return epoch_seconds(bl.fit(model(ds), ds, config(args), progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    counts = [int(n) for n in args.nproc.split(",")]
    times: dict[str, list[float]] = {"fit": [], **{str(n): [] for n in counts}}
    for _ in range(args.repeats):
        times["fit"].append(single(args))
        for n in counts:
            times[str(n)].append(launch(args, n))
    base = statistics.median(times[str(counts[0])]) * counts[0]
    backend = "nccl" if args.device == "cuda" else "gloo"
    print(f"| how | ranks | global batch | s/epoch (median of {args.repeats}) | speed-up | scaling efficiency |")
    print("|---|---|---|---|---|---|")
    print(f"| bl.fit | 1 | {args.batch_size} | {statistics.median(times['fit']):.3f} | | |")
    for n in counts:
        seconds = statistics.median(times[str(n)])
        print(f"| distributed.fit ({backend}) | {n} | {args.batch_size * n} | {seconds:.3f} | "
              f"{base / seconds:.2f} | {base / (n * seconds):.0%} |")


if __name__ == "__main__":
    main()
