"""How much does batchlab's loop cost over the fastest hand-written PyTorch loop, and over peers?

One epoch of an MLP 40-100-100-10 on MNIST-1D (4000 samples), SGD lr 0.05, at B = 1, 32, 1024,
trained by:

- ``plain``: the fastest hand-written loop: tensors in memory, an index permutation, slices,
  forward/backward/step, the batch loss kept as a tensor (no per-step synchronisation);
- ``plain+log``: the same, reading each batch's loss and accuracy as Python numbers (what any loop
  that logs per step does, and what batchlab records);
- ``batchlab``: ``bl.fit`` with ``eval_train=False`` and no validation set, so only the training
  steps are timed (the full-pass evaluations it makes are counted separately in ``eval_s``);
- ``lightning``: PyTorch Lightning's Trainer on a DataLoader (progress bar, logger, checkpointing off);
- ``keras``: Keras 3 on its torch backend, ``model.fit(X, y, batch_size=B, epochs=1, verbose=0)``.

Every contender runs in this one process with one torch thread, alternating, ``--repeats`` times;
the table shows the median seconds per epoch and the ratio to ``plain``.

    python benchmarks/overhead.py [--repeats 5] [--skip keras,lightning]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batchlab as bl  # noqa: E402

LR = 0.05


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100),
                               torch.nn.ReLU(), torch.nn.Linear(100, 10))


def plain(X, y, batch_size: int, log: bool) -> float:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    order = torch.randperm(X.shape[0], generator=generator)
    total = torch.zeros(())
    logged = []
    for start in range(0, X.shape[0], batch_size):
        index = order[start:start + batch_size]
        output = model(X[index])
        loss = F.cross_entropy(output, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log:
            logged.append((loss.item(), (output.argmax(1) == y[index]).sum().item()))
        else:
            total += loss.detach()
    total.item()
    return time.perf_counter() - started


def batchlab_fit(dataset, batch_size: int) -> tuple[float, float]:
    config = bl.TrainConfig(batch_size=batch_size, epochs=1, lr=LR, eval_train=False)
    model = mlp()
    started = time.perf_counter()
    run = bl.fit(model, dataset, config, progress=False)
    wall = time.perf_counter() - started
    return wall - run.eval_seconds, run.eval_seconds


def lightning(X, y, batch_size: int) -> float:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, _):
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - started


def keras_fit(X, y, batch_size: int) -> float:
    import keras

    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(100, activation="relu"),
                              keras.layers.Dense(100, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    Xn, yn = X.numpy(), y.numpy()
    started = time.perf_counter()
    model.fit(Xn, yn, batch_size=batch_size, epochs=1, verbose=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,32,1024")
    parser.add_argument("--skip", default="", help="comma-separated contenders to skip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    full = bl.load_dataset("mnist1d")
    dataset = bl.Dataset("mnist1d", full.train, None, None, full.n_classes)  # no val: time the steps
    X, y = full.train
    skip = set(filter(None, args.skip.split(",")))
    contenders = {
        "plain": lambda b: plain(X, y, b, log=False),
        "plain+log": lambda b: plain(X, y, b, log=True),
        "batchlab": lambda b: batchlab_fit(dataset, b),
        "lightning": lambda b: lightning(X, y, b),
        "keras": lambda b: keras_fit(X, y, b),
    }
    contenders = {k: v for k, v in contenders.items() if k not in skip}
    print(f"torch {torch.__version__}, 1 thread, MLP 40-100-100-10, MNIST-1D 4000 samples, one epoch, "
          f"median of {args.repeats}")
    print(f"{'B':>6} {'contender':>10} {'s/epoch':>9} {'x plain':>8} {'eval_s':>7}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        times: dict[str, list[float]] = {k: [] for k in contenders}
        evals: list[float] = []
        for name, call in contenders.items():  # warm-up: imports, allocator, first-call costs
            call(batch_size)
        for _ in range(args.repeats):
            for name, call in contenders.items():
                result = call(batch_size)
                if isinstance(result, tuple):
                    result, eval_seconds = result
                    evals.append(eval_seconds)
                times[name].append(result)
        base = statistics.median(times["plain"])
        for name, values in times.items():
            median = statistics.median(values)
            extra = f"{statistics.median(evals):7.3f}" if name == "batchlab" else ""
            print(f"{batch_size:>6} {name:>10} {median:9.4f} {median / base:8.2f} {extra}")


if __name__ == "__main__":
    main()
