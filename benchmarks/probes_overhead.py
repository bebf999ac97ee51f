"""What do the probes cost? The same training run with probes off and on.

Two epochs (250 steps) of an MLP 40-100-100-10 on MNIST-1D (4000 samples), SGD lr 0.05, B = 32,
probes measured at every step (``probe_every=1``; one row also at 4), by ``bl.fit`` with ``eval_train=False`` and no
validation set, so that ``run.seconds`` is the training steps alone. Every probe set runs in this
one process with one torch thread, alternating, ``--repeats`` times, from the same initial
weights and data order; the table shows the median seconds per run and the median of the ratios
to the run without probes of the same repeat (training seconds, and CPU time of the thread).

Targets: ≤ 1.10 for ``grad_norm + dist_from_init``, ≤ 1.25 for ``noise_scale``. The row
"noise_scale, half-batch method" is the general method (one extra backward pass), which models
other than linear layers and per-sample maps use.

    python benchmarks/probes_overhead.py [--repeats 15] [--epochs 2] [--skip "noise_scale_exact,all five"]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.loop import fit
from batchlab.probes import NoiseScale

PROBE_SETS = {
    "none": [],
    "grad_norm": ["grad_norm"],
    "grad_norm+dist_from_init": ["grad_norm", "dist_from_init"],
    "update_norm": ["update_norm"],
    "noise_scale": ["noise_scale"],
    "noise_scale, probe_every=4": ["noise_scale"],
    "noise_scale, half-batch method": [NoiseScale(method="parts")],
    "noise_scale_exact": ["noise_scale_exact"],
    "all five": ["grad_norm", "dist_from_init", "update_norm", "noise_scale", "noise_scale_exact"],
}
TARGETS = {"grad_norm+dist_from_init": 1.10, "noise_scale": 1.25}
EVERY = {"noise_scale, probe_every=4": 4}  # probe sets measured less often than every step


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100),
                               torch.nn.ReLU(), torch.nn.Linear(100, 10))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", default="", help="Probe sets to leave out, comma-separated (e.g. noise_scale_exact,all five).")
    args = parser.parse_args()
    for name in filter(None, args.skip.split(",")):
        PROBE_SETS.pop(name, None)
    torch.set_num_threads(1)
    dataset = load_dataset("mnist1d")
    dataset = dataclasses.replace(dataset, val=None, test=None)  # time the steps, not evaluations
    config = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, lr=0.05, eval_train=False)
    fit(mlp(), dataset, config.replace(epochs=1), probes=["grad_norm", "dist_from_init", "update_norm", "noise_scale"], progress=False)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in PROBE_SETS}
    cpu: dict[str, list[float]] = {name: [] for name in PROBE_SETS}
    for _ in range(args.repeats):
        for name, probes in PROBE_SETS.items():
            run_config = config.replace(probe_every=EVERY.get(name, 1))
            started = time.thread_time()
            seconds[name].append(fit(mlp(), dataset, run_config, probes=probes, progress=False).seconds)
            cpu[name].append(time.thread_time() - started)
    steps = args.epochs * -(-dataset.n_train // args.batch_size)
    print(f"batchlab {bl.__version__}, torch {torch.__version__}, 1 thread; MLP 40-100-100-10, MNIST-1D, "
          f"B={args.batch_size}, {steps} steps, probes every step unless said, median of {args.repeats}")  # fmt: skip
    # Ratios pair each run with the run without probes of the same repeat (seconds apart), which
    # cancels most of a shared machine's drift; the CPU-time ratio (whole fit call, this thread)
    # does not count time the process waited for a core.
    print("| probes | seconds | ms/step | ratio to none | CPU-time ratio | target |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        ratio = statistics.median(v / b for v, b in zip(values, seconds["none"]))
        cpu_ratio = statistics.median(v / b for v, b in zip(cpu[name], cpu["none"]))
        target = f"≤ {TARGETS[name]:.2f}" if name in TARGETS else ""
        print(f"| {name} | {median:.3f} | {1000 * median / steps:.2f} | {ratio:.2f} | {cpu_ratio:.2f} | {target} |")


if __name__ == "__main__":
    main()
