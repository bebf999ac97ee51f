"""How much faster are R trainings as one vectorized pass than R calls of ``bl.fit``?

R replicas (seeds 0..R-1, learning rates spread over 0.01..0.1, SGD momentum 0.9) of the MLP
40-100-100-10 on MNIST-1D (4000 samples) for one epoch at batch size B, trained

- ``vectorized``: by one ``bl.fit_replicas`` call (one stacked pass; chunks only if memory says so);
- ``sequential``: by ``bl.fit``, one replica after another, the same configs. Where R runs would
  take long (B=1), only the first runs until ``--sequential-budget`` seconds are timed and the
  per-run mean is multiplied by R: the table says how many were timed.

Both evaluate as ``fit`` does (full passes over train and validation at step 0 and the epoch's
end). ``train_x`` compares training time only (``Run.seconds``: evaluations excluded). One
process, one torch thread, a warm-up of both first.

    python benchmarks/replicas.py [--replicas 1,8,64] [--batch-sizes 1,32,1024]
                                  [--sequential-budget 30] [--chunk-size N] [--compile on]
"""

from __future__ import annotations

import argparse
import time

import torch

import batchlab as bl
from batchlab.replicas import fit_replicas


COMPILE = "off"  # --compile: how the vectorized pass runs its steps (sequential fits stay eager)


def configs(n: int, batch_size: int, compile: str = "off") -> list[bl.TrainConfig]:
    lrs = torch.logspace(-2, -1, max(n, 2)).tolist()
    return [bl.TrainConfig(batch_size=batch_size, epochs=1, lr=lrs[i % len(lrs)], momentum=0.9, seed=i,
                           compile=compile) for i in range(n)]


def time_vectorized(dataset, make_model, batch_size: int, n: int, chunk_size: int | None) -> dict:
    started = time.perf_counter()
    runs = fit_replicas(make_model, dataset, configs(n, batch_size, COMPILE), chunk_size=chunk_size, progress=False)
    total = time.perf_counter() - started
    return {"seconds": total, "train_seconds": sum(r.seconds for r in runs), "chunks": runs.chunks}


def time_sequential(dataset, make_model, batch_size: int, n: int, budget: float) -> dict:
    timed, total, train = 0, 0.0, 0.0
    for config in configs(n, batch_size):
        started = time.perf_counter()
        run = bl.fit(make_model(config.seed), dataset, config, progress=False)
        total += time.perf_counter() - started
        train += run.seconds
        timed += 1
        if total > budget:
            break
    scale = n / timed  # extrapolate the per-run mean to all R runs
    return {"seconds": total * scale, "train_seconds": train * scale, "timed": timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,8,64")
    parser.add_argument("--batch-sizes", default="1,32,1024")
    parser.add_argument("--sequential-budget", type=float, default=30.0,
                        help="seconds of sequential runs to time before extrapolating to R runs")
    parser.add_argument("--chunk-size", type=int, default=None, help="replicas per vectorized pass")
    parser.add_argument("--compile", default="off", choices=["off", "on"],
                        help="vectorized pass compiled (on: its compile time is timed once, in a warm-up)")
    args = parser.parse_args()
    global COMPILE
    COMPILE = args.compile
    torch.set_num_threads(1)
    dataset = bl.load_dataset("mnist1d")

    def make_model(seed: int) -> torch.nn.Module:
        return bl.build_model("mlp", dataset, hidden=[100, 100], seed=seed)

    time_vectorized(dataset, make_model, 1024, 2, None)  # warm-up: first calls, allocator, imports
    if COMPILE == "on":  # compile each (R, B) graph once, outside the timings
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            for n in [int(r) for r in args.replicas.split(",")]:
                started = time.perf_counter()
                time_vectorized(dataset, make_model, batch_size, n, args.chunk_size)
                print(f"compile + first epoch, R={n} B={batch_size}: {time.perf_counter() - started:.1f} s", flush=True)
    time_sequential(dataset, make_model, 1024, 1, 1e9)
    print(f"torch {torch.__version__}, 1 thread; MLP 40-100-100-10, MNIST-1D 4000 samples, 1 epoch, SGD momentum 0.9; "
          f"vectorized compile={COMPILE}")
    header = f"{'B':>5} {'R':>4} {'steps':>6} {'vectorized_s':>13} {'sequential_s':>13} {'timed':>6} {'speedup':>8} {'train_x':>8}  chunks"
    print(header)
    print("-" * len(header))
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for n in [int(r) for r in args.replicas.split(",")]:
            vectorized = time_vectorized(dataset, make_model, batch_size, n, args.chunk_size)
            sequential = time_sequential(dataset, make_model, batch_size, n, args.sequential_budget)
            steps = -(-dataset.n_train // batch_size)
            print(f"{batch_size:>5} {n:>4} {steps:>6} {vectorized['seconds']:>13.2f} {sequential['seconds']:>13.2f} "
                  f"{sequential['timed']:>3}/{n:<2} {sequential['seconds'] / vectorized['seconds']:>8.2f} "
                  f"{sequential['train_seconds'] / vectorized['train_seconds']:>8.2f}  "
                  f"{'/'.join(map(str, vectorized['chunks']))}", flush=True)


if __name__ == "__main__":
    main()
