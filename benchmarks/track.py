"""What measuring costs a user's own loop: bare loop vs `bl.track`, and plain torch vs `bl.fit`.

One epoch of an MLP 40-100-100-10 on MNIST-1D (4000 samples) at B = 32, SGD lr 0.05, one torch
thread, in this one process; each repeat runs every contender once, in a shuffled order, and the
table gives the median seconds per epoch and the median of the per-repeat ratios to the reference
(paired, so that a slow moment of a shared machine hits both sides of a ratio). Seconds are this process's CPU
time (``time.process_time``): everything here runs in it (one torch thread, the DataLoader without
workers), and other processes' load on a shared machine then does not count as ours:

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
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--parts", action="store_true", help="also time the noise scale's capture alone (loop+taps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    full = bl.load_dataset("mnist1d")
    dataset = bl.Dataset("mnist1d", full.train, None, None, full.n_classes)
    X, y = full.train
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=B, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    contenders = {
        "loop": lambda: user_loop(loader),
        "loop+track": lambda: user_loop(loader, probes=[]),
        "loop+track+noise": lambda: user_loop(loader, probes=["noise_scale"]),
    }
    if args.parts:
        contenders["loop+taps"] = lambda: user_loop(loader, taps=True)
    contenders |= {"plain": lambda: plain(X, y), "bl.fit": lambda: fit(dataset)}
    reference = {"loop": "loop", "loop+track": "loop", "loop+track+noise": "loop", "loop+taps": "loop",
                 "plain": "plain", "bl.fit": "plain"}
    goal = {"loop+track": "<= 1.05", "loop+track+noise": "<= 1.25", "bl.fit": "<= 1.10"}
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
        print(f"| {name} | {statistics.median(values):.4f} | {reference[name]} | {ratio:.3f} | {goal.get(name, '')} |")


if __name__ == "__main__":
    main()
