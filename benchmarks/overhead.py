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
- ``keras``: Keras 3 on its torch backend, ``model.fit(X, y, batch_size=B, epochs=1, verbose=0)``;
- ``plain+compile``: ``plain`` with the step compiled (`batchlab.compiled.CompiledStep`: forward,
  backward, update and the batch numbers as one graph); compile time reported separately;
- ``batchlab+compile``: ``bl.fit`` with ``compile="on"`` (on the CPU each stretch between two looks
  at the run is one graph, a loop over its batches; every table recorded); compile time (first
  epoch minus a compiled epoch) reported separately;
- ``jax``: the same MLP and SGD in JAX, ``jit`` of a ``lax.scan`` over the epoch's steps (the
  anchor; needs ``pip install jax``, extra ``[bench]``); compile time reported separately.

Every contender runs in this one process with one torch thread (JAX on one thread too, through
``XLA_FLAGS``), alternating, ``--repeats`` times; the table shows the median seconds per epoch and
the ratio to ``plain``, and the last lines ``batchlab+compile``'s time over ``jax``'s.

    python benchmarks/overhead.py [--repeats 5] [--skip keras,lightning]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")
# JAX on one thread too, as torch is (XLA's CPU backend otherwise runs its ops on every core).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batchlab as bl  # noqa: E402
from batchlab.schedule import gather_batches  # noqa: E402

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


def plain_compiled(X, y, batch_size: int) -> float:
    """``plain`` with the step compiled by `batchlab.compiled.CompiledStep` (graphs compiled beforehand)."""
    from batchlab.compiled import CompiledStep

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step = CompiledStep(model, optimizer, F.cross_entropy, classification=True)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    order = torch.randperm(X.shape[0], generator=generator)
    total = torch.zeros(())
    for start in range(0, X.shape[0], batch_size):
        index = order[start:start + batch_size]
        loss, _ = step(X[index], y[index])
        total += loss
    total.item()
    return time.perf_counter() - started


def compile_seconds(X, y, batch_size: int) -> float:
    """Seconds to compile every shape of an epoch's steps (B, and N mod B when nonzero) in this process."""
    from batchlab.compiled import CompiledStep

    model = mlp()
    step = CompiledStep(model, torch.optim.SGD(model.parameters(), lr=LR), F.cross_entropy, classification=True)
    started = time.perf_counter()
    for size in {batch_size, X.shape[0] % batch_size} - {0}:
        step(X[:size], y[:size])
    if step.fallback_reason:
        raise SystemExit(f"the benchmark's step did not compile: {step.fallback_reason}")
    return time.perf_counter() - started


def jax_scan(X, y, batch_size: int) -> tuple[float, float] | None:
    """JAX: the same MLP, SGD and epoch, one ``jit`` of a ``lax.scan`` over the epoch's full batches.

    Returns (seconds per epoch, compile seconds); None when JAX is not installed (extra ``[bench]``).
    The short last batch (N mod B) is left out: a scan needs equal batches (1-3% of an epoch's samples).
    """
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    steps = X.shape[0] // batch_size
    Xj, yj = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())

    def init(key):
        sizes = [40, 100, 100, 10]
        keys = jax.random.split(key, len(sizes) - 1)
        return [(jax.random.uniform(k, (a, b), minval=-a ** -0.5, maxval=a ** -0.5), jnp.zeros(b))
                for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def loss_fn(params, xb, yb):
        h = xb
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        logits = h @ params[-1][0] + params[-1][1]
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))
        return loss, jnp.sum(jnp.argmax(logits, axis=1) == yb)

    @jax.jit
    def epoch(params, order):
        def step(params, index):
            (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, Xj[index], yj[index])
            return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), (loss, correct)
        return jax.lax.scan(step, params, order[:steps * batch_size].reshape(steps, batch_size))

    params = init(jax.random.PRNGKey(0))
    order = jax.random.permutation(jax.random.PRNGKey(1), X.shape[0])
    started = time.perf_counter()
    compiled = epoch.lower(params, order).compile()
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    _, numbers = compiled(params, order)
    jax.block_until_ready(numbers)
    return time.perf_counter() - started, compile_s


def compiled_contenders(X, y, dataset) -> tuple[dict, dict[str, dict[int, float]]]:
    """The compiled rows: ``plain+compile``, ``batchlab+compile`` and ``jax`` (when installed), and
    their compile seconds.

    Returns:
        ``({name: call(batch_size) -> seconds}, {name: {batch_size: compile seconds}})``; the
        compile seconds are filled by the first (warm-up) call of each batch size.
    """
    compile_s: dict[str, dict[int, float]] = {"plain+compile": {}, "batchlab+compile": {}, "jax": {}}

    def torch_compiled(batch_size: int) -> float:
        if batch_size not in compile_s["plain+compile"]:
            compile_s["plain+compile"][batch_size] = compile_seconds(X, y, batch_size)
        return plain_compiled(X, y, batch_size)

    def jax_compiled(batch_size: int) -> float:
        seconds, compile_s["jax"][batch_size] = jax_scan(X, y, batch_size)
        return seconds

    def fit_compiled(batch_size: int) -> tuple[float, float]:
        result = batchlab_fit(dataset, batch_size, compile="on")
        if batch_size not in compile_s["batchlab+compile"]:  # the warm-up call: compile + one epoch
            compile_s["batchlab+compile"][batch_size] = result[0] - batchlab_fit(dataset, batch_size, "on")[0]
        return result

    contenders = {"plain+compile": torch_compiled, "batchlab+compile": fit_compiled}
    if jax_scan(X, y, 1024) is not None:
        contenders["jax"] = jax_compiled
    return contenders, compile_s


def print_compile_seconds(compile_s: dict[str, dict[int, float]]) -> None:
    """Compile time per contender and batch size (paid once per process; torch caches on disk too)."""
    for name, by_batch in compile_s.items():
        if by_batch:
            times = ", ".join(f"B={b}: {s:.1f} s" for b, s in sorted(by_batch.items()))
            print(f"compile time, {name}: {times}")


def replicas_compiled(X, y, n_replicas: int, batch_size: int) -> tuple[float, float]:
    """One epoch of ``n_replicas`` MLPs (own orders, lrs spread 0.01-0.1) by the compiled stacked step.

    Returns:
        (seconds per epoch, compile seconds of the first step).
    """
    import numpy as np

    from batchlab.compiled import StackedStep
    from batchlab.optim import stacked_chain

    models = [mlp() for _ in range(n_replicas)]
    names = [n for n, _ in models[0].named_parameters()]
    params = [torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_() for n in names]
    ones = np.ones(n_replicas)
    optimizer = stacked_chain("sgd", False, {"momentum": 0 * ones, "weight_decay": 0 * ones, "beta1": 0.9 * ones,
                                             "beta2": 0.999 * ones}, X.device)
    state = optimizer.init(params)
    step = StackedStep(mlp(), names, optimizer, lambda o, t: F.cross_entropy(o, t, reduction="none"), True)
    lr = torch.linspace(0.01, 0.1, n_replicas, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(X.shape[0], generator=generator) for _ in range(n_replicas)])
    started = time.perf_counter()
    step(params, [], state, lr, *gather_batches(X, y, orders[:, :batch_size]))
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    total = torch.zeros(n_replicas)
    for start in range(0, X.shape[0] - batch_size + 1, batch_size):  # full batches: one compiled shape
        total += step(params, [], state, lr, *gather_batches(X, y, orders[:, start:start + batch_size])).loss
    total.sum().item()
    return time.perf_counter() - started, compile_s


def print_replica_rows(X, y, n_replicas: int, batch_size: int, repeats: int) -> None:
    """R models one after another by ``plain`` vs all R at once by the compiled stacked step."""
    plain_s = statistics.median(plain(X, y, batch_size, log=False) for _ in range(repeats)) * n_replicas
    runs = [replicas_compiled(X, y, n_replicas, batch_size) for _ in range(repeats + 1)]
    stacked_s = statistics.median(r[0] for r in runs[1:])
    print(f"R={n_replicas} replicas, B={batch_size}: plain one after another {plain_s:.3f} s/epoch, "
          f"compiled stacked {stacked_s:.3f} s/epoch ({plain_s / stacked_s:.1f}x faster; compile {runs[0][1]:.1f} s)")


def batchlab_fit(dataset, batch_size: int, compile: str = "off") -> tuple[float, float]:
    config = bl.TrainConfig(batch_size=batch_size, epochs=1, lr=LR, eval_train=False, compile=compile)
    model = mlp()
    started = time.perf_counter()
    run = bl.fit(model, dataset, config, progress=False)
    wall = time.perf_counter() - started
    return wall - run.eval_seconds, run.eval_seconds


def lightning(X, y, batch_size: int) -> float:
    import lightning as L

    # Lightning sets its own loggers to INFO when first imported: quiet them after the import
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

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
    parser.add_argument("--replicas", type=int, default=0, help="also time R replicas at B=32, compiled")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
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
    compiled, compile_s = compiled_contenders(X, y, dataset)
    contenders.update(compiled)
    contenders = {k: v for k, v in contenders.items() if k not in skip}
    print(f"torch {torch.__version__}, 1 thread, MLP 40-100-100-10, MNIST-1D 4000 samples, one epoch, "
          f"median of {args.repeats}")
    print(f"{'B':>6} {'contender':>16} {'s/epoch':>9} {'x plain':>8} {'eval_s':>7}")
    ratios: dict[int, float] = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        times: dict[str, list[float]] = {k: [] for k in contenders}
        evals: dict[str, list[float]] = {k: [] for k in contenders}
        for name, call in contenders.items():  # warm-up: imports, allocator, first-call costs
            call(batch_size)
        for _ in range(args.repeats):
            for name, call in contenders.items():
                result = call(batch_size)
                if isinstance(result, tuple):
                    result, eval_seconds = result
                    evals[name].append(eval_seconds)
                times[name].append(result)
        base = statistics.median(times["plain"])
        for name, values in times.items():
            median = statistics.median(values)
            extra = f"{statistics.median(evals[name]):7.3f}" if evals[name] else ""
            print(f"{batch_size:>6} {name:>16} {median:9.4f} {median / base:8.2f} {extra}".rstrip())
        if "batchlab+compile" in times and "jax" in times:
            ratios[batch_size] = statistics.median(times["batchlab+compile"]) / statistics.median(times["jax"])
    print_compile_seconds(compile_s)
    if ratios:
        print("batchlab+compile / jax: " + ", ".join(f"B={b}: {r:.2f}x" for b, r in ratios.items()))
    if args.replicas:
        print_replica_rows(X, y, args.replicas, 32, args.repeats)


if __name__ == "__main__":
    main()
