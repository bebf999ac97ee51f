"""What measuring costs a user's own loop: bare loop vs `bl.track`, and plain torch vs `bl.fit`.

One epoch of an MLP 40-100-100-10 on MNIST-1D (4000 samples) at B = 32, SGD lr 0.05, one torch
thread, in this one process; each repeat runs every contender once, in a shuffled order, and the
table gives the median seconds per epoch and the median of the per-repeat ratios to the reference
(paired, so that a slow moment of a shared machine hits both sides of a ratio). Seconds are this
process's CPU time (``time.process_time``): everything here runs in it (one torch thread, the
DataLoader without workers), and other processes' load on a shared machine then does not count as
ours:

- ``loop``: a user's loop over a DataLoader (batch_size=32, shuffle) reading ``loss.item()`` per step;
- ``loop+track``: the same loop inside ``bl.track`` (default views: batch, running, lr);
- ``loop+track+noise``: with ``probes=["noise_scale"]`` (per-sample norms of the linear layers);
- ``loop+taps`` (with ``--parts``): the loop with only the noise scale's capture, the forward hooks
  that keep each linear layer's input and output gradient (`batchlab.probes.LinearTaps`), their
  tensors dropped after each step: the share of ``loop+track+noise`` that no estimator can avoid;
- ``plain``: the fastest hand-written loop on in-memory tensors (index permutation and slices) reading
  the loss and correct count per step, as batchlab records them;
- ``bl.fit``: ``bl.fit`` on the same data, evaluation excluded.

    python benchmarks/track.py [--repeats 15] [--parts]

Time on a shared machine moves by several percent from one run to the next, more than the 5 % a
goal allows. ``--instructions`` counts instead what the CPU executes, which other processes do
not change: each user-loop contender runs in a child process under ``valgrind --tool=callgrind``
(one thread, ``PYTHONHASHSEED=0``, BLAS pools of one thread), once for one epoch and once for
three, and the difference over the 250 steps between them is the count per step (start-up and
first-epoch costs cancel). It needs valgrind on PATH and takes about ten minutes:

    python benchmarks/track.py --instructions
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.probes import LinearTaps

LR, B = 0.05, 32


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100),
                               torch.nn.ReLU(), torch.nn.Linear(100, 10))


def user_loop(loader, probes=None, taps: bool = False) -> float:
    """The user's loop, bare (``probes=None``) or inside ``bl.track``; ``taps``: bare, with only the
    noise scale's forward hooks (`LinearTaps`), their tensors dropped each step as bl.track drops them."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    layers = [(layer, True, True) for layer in model if isinstance(layer, torch.nn.Linear)]
    kept = LinearTaps(model, layers) if taps else None
    started = time.process_time()
    if probes is None:
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            loss.item()
            if kept is not None:
                kept.inputs[:] = kept.outputs[:] = kept.deltas[:] = [None] * len(kept.inputs)
            optimizer.step()
        return time.process_time() - started
    with bl.track(model, optimizer, probes=probes) as run:
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            run.step(loss, outputs=out, targets=y)
            optimizer.step()
        run.end_epoch()
    return time.process_time() - started


def plain(X, y) -> float:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    started = time.process_time()
    for start in range(0, X.shape[0], B):
        index = order[start:start + B]
        output = model(X[index])
        loss = F.cross_entropy(output, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item(), (output.argmax(1) == y[index]).sum().item()
    return time.process_time() - started


def fit(dataset) -> float:
    config = bl.TrainConfig(batch_size=B, epochs=1, lr=LR, eval_train=False)
    started = time.process_time()
    run = bl.fit(mlp(), dataset, config, progress=False)
    return time.process_time() - started - run.eval_seconds


def user_loader() -> torch.utils.data.DataLoader:
    X, y = bl.load_dataset("mnist1d").train
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=B, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


# The user-loop contenders, by name: what a child process runs under valgrind.
USER_LOOPS = {
    "loop": lambda loader: user_loop(loader),
    "loop+track": lambda loader: user_loop(loader, probes=[]),
    "loop+track+noise": lambda loader: user_loop(loader, probes=["noise_scale"]),
    "loop+taps": lambda loader: user_loop(loader, taps=True),
}
GOALS = {"loop+track": "<= 1.05", "loop+track+noise": "<= 1.25", "bl.fit": "<= 1.10"}


def instructions_per_step(workers: int = 2) -> dict[str, float]:
    """Each user loop's instructions per step: callgrind's count for three epochs minus that for one,
    over the 250 steps between them; ``workers`` child processes at a time."""
    if shutil.which("valgrind") is None:
        sys.exit("error: --instructions needs valgrind on PATH (apt install valgrind)")
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}  # no idle BLAS workers spinning: their count would depend on time

    def count(name: str, epochs: int) -> int:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
                   "--child", name, str(epochs)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return int(re.search(r"Collected : (\d+)", done.stderr).group(1))

    with ThreadPoolExecutor(workers) as pool:
        counts = {(name, epochs): pool.submit(count, name, epochs) for name in USER_LOOPS for epochs in (1, 3)}
    steps = 2 * len(user_loader())  # the two epochs between the counts
    return {name: (counts[name, 3].result() - counts[name, 1].result()) / steps for name in USER_LOOPS}


def print_instructions() -> None:
    per_step = instructions_per_step()
    print(f"torch {torch.__version__}, 1 thread, instructions per step (valgrind callgrind, 3 epochs minus 1), "
          f"MLP 40-100-100-10, MNIST-1D 4000 samples, B={B}")
    print()
    print("| contender | M instructions per step | ratio to loop | goal (in time) |")
    print("|---|---|---|---|")
    for name, count in per_step.items():
        print(f"| {name} | {count / 1e6:.3f} | {count / per_step['loop']:.3f} | {GOALS.get(name, '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--parts", action="store_true", help="also time the noise scale's capture alone (loop+taps)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per step of the user loops under valgrind instead of timing")
    parser.add_argument("--child", nargs=2, metavar=("LOOP", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:  # one user loop's epochs, counted by the parent under valgrind
        name, epochs = args.child
        loader = user_loader()
        for _ in range(int(epochs)):
            USER_LOOPS[name](loader)
        return
    if args.instructions:
        print_instructions()
        return
    full = bl.load_dataset("mnist1d")
    dataset = bl.Dataset("mnist1d", full.train, None, None, full.n_classes)
    X, y = full.train
    loader = user_loader()
    names = [name for name in USER_LOOPS if args.parts or name != "loop+taps"]
    contenders = {name: (lambda loop=USER_LOOPS[name]: loop(loader)) for name in names}
    contenders |= {"plain": lambda: plain(X, y), "bl.fit": lambda: fit(dataset)}
    reference = {"loop": "loop", "loop+track": "loop", "loop+track+noise": "loop", "loop+taps": "loop",
                 "plain": "plain", "bl.fit": "plain"}
    for call in contenders.values():  # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(args.repeats):
        shuffle(order)  # no contender always follows the same one (the one before leaves caches, garbage)
        for name in order:
            times[name].append(contenders[name]())
    print(f"torch {torch.__version__}, 1 thread, CPU seconds, MLP 40-100-100-10, MNIST-1D 4000 samples, B={B}, one epoch, "
          f"{args.repeats} paired repeats")
    print()
    print("| contender | s/epoch (median) | ratio to | ratio (median of pairs) | goal |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        base = times[reference[name]]
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"| {name} | {statistics.median(values):.4f} | {reference[name]} | {ratio:.3f} | {GOALS.get(name, '')} |")


if __name__ == "__main__":
    main()
