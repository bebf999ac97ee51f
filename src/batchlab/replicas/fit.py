"""`fit_replicas`: R trainings as one vectorized pass, each replica recorded by its own core.

The pass (`batchlab.replicas.vectorized`) computes every active replica's step at once; each
replica's numbers go to its own `batchlab.record.Recorder`, the same core `fit` drives, and the
replicas run through `fit`'s own epoch skeleton (`batchlab.drive.drive`) as one group, so a
replica's rows, events, evaluations, stop, divergence and end mean what they mean in `fit`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import data as data_lib
from .. import schedule
from ..callbacks import Checkpoint, progress_wanted
from ..config import Adaptive, TrainConfig
from ..drive import after_steps, drive
from ..errors import ConfigError
from ..events import Callback, Clock
from ..looks import Looks
from ..loop import check_model, plan_run, resolve_device
from ..optim import scaled_lr
from ..record import Recorder, Run, StepNumbers
from ..schedule import require_one_batch_size
from .plan import (
    REPLICA_PROBES,
    CallbackFactory,
    check_replica_configs,
    default_memory_budget,
    plan_chunks,
    replica_bytes,
)
from .vectorized import _Pass

log = logging.getLogger("batchlab.replicas")

SAVE_REFUSAL = "checkpoints are not supported for replicas; train this config with fit to checkpoint it"


# --- the result ---------------------------------------------------------------------------------


@dataclass
class ReplicaRuns(Sequence):
    """The runs of `fit_replicas`, one `Run` per replica in the order of the configs.

    Attributes:
        runs: replica r's `Run`, with the same tables as `fit` gives.
        chunks: how many replicas each vectorized pass held (one pass unless memory was short).
        bytes_per_replica: the memory estimate that decided the chunks.
        memory_budget: the budget in bytes.
        seconds: wall time of the whole ensemble, evaluations included.
    """

    runs: list[Run]
    chunks: list[int]
    bytes_per_replica: int
    memory_budget: int
    seconds: float = 0.0

    def __getitem__(self, index):
        return self.runs[index]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per replica: its seed, lr and the headline numbers of its `Run.summary`."""
        rows = [{"replica": i, "seed": run.config.seed, "lr": run.config.lr, **run.summary}
                for i, run in enumerate(self.runs)]
        return pd.DataFrame(rows)


@dataclass(eq=False)
class _Replica:
    """One replica: its config, live module (views of the stack while training), generators and core."""

    index: int
    config: TrainConfig
    model: nn.Module
    recorder: Recorder
    base_lr: float
    data_generator: torch.Generator
    dropout_generator: torch.Generator


# --- training ------------------------------------------------------------------------------------


def fit_replicas(
    model_fn: Callable[[int], nn.Module],
    dataset: data_lib.Dataset,
    configs: Sequence[TrainConfig],
    *,
    probes: Sequence[str] = (),
    callbacks: CallbackFactory | Sequence[Sequence[Callback]] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> ReplicaRuns:
    """Train one replica per config in one vectorized pass; replica r reproduces ``fit`` with config r.

    Args:
        model_fn: ``seed -> nn.Module``, e.g. ``lambda seed: build_model("mlp", ds, seed=seed)``;
            called once per replica with its config's seed. All models must share one architecture.
        dataset: a `batchlab.data.Dataset`.
        configs: one `TrainConfig` per replica. They must share `SHARED_FIELDS` (batch size,
            epochs/max_steps, optimizer kind, evaluation points, ...) and may differ in seed, lr,
            momentum, weight decay, betas, schedule and its parameters, warm-up and lr scaling.
        probes: names among ``grad_norm``, ``dist_from_init``, ``update_norm``, measured per replica
            with the meaning they have in `fit`.
        callbacks: per-replica callbacks, as a function ``(replica index, config) -> [callbacks]``
            or one list per replica. A replica stops alone when its callbacks return `Stop`.
        memory_budget: bytes the stacked training may use; default half the free memory. Replicas
            that do not fit are trained in further chunks, one after another.
        chunk_size: replicas per vectorized pass, overriding the memory estimate.
        progress: show a progress bar; default: `batchlab.callbacks.progress_wanted` (a terminal, not CI).

    Returns:
        A `ReplicaRuns`: a sequence of `Run` in the order of ``configs``, with ``.chunks``.

    Example:
        >>> configs = [bl.TrainConfig(batch_size=32, epochs=5, lr=lr, seed=s) for lr in (0.01, 0.1) for s in range(4)]
        >>> runs = bl.fit_replicas(lambda seed: bl.build_model("mlp", ds, seed=seed), ds, configs)
        >>> [run.summary["final_val_acc"] for run in runs]
    """
    from ..checks import check_arguments, check_items

    check_arguments("fit_replicas", model_fn=(model_fn, Callable), dataset=(dataset, data_lib.Dataset))
    check_items("fit_replicas", "configs", configs, TrainConfig)
    started = time.perf_counter()
    configs = check_replica_configs(configs)
    unknown = [p for p in probes if not isinstance(p, str) or p not in REPLICA_PROBES]
    if unknown:
        raise ConfigError(f"probe {unknown[0]!r} is not available for replicas; choose from "
                          f"{', '.join(REPLICA_PROBES)}, or train with fit")
    factory = _callback_factory(callbacks, len(configs))
    if isinstance(configs[0].batch_size, Adaptive):  # its decisions differ from replica to replica
        require_one_batch_size(configs[0].batch_size, "fit_replicas")
    clock = plan_run(dataset, configs[0])
    device = resolve_device(configs[0].device)
    dataset = dataset.to(device)
    models = [model_fn(config.seed).to(device) for config in configs]
    check_model(models[0], dataset)
    shapes = [[(n, p.shape) for n, p in m.state_dict().items()] for m in models]
    for index, described in enumerate(shapes[1:], start=1):
        if described != shapes[0]:
            raise ConfigError(f"model_fn gave replica {index} another architecture than replica 0; "
                              "replicas must share the architecture")
    budget = memory_budget or default_memory_budget(device)
    per_replica = _estimate_bytes(models[0], dataset, configs[0], clock, probes)
    chunks = plan_chunks(len(configs), per_replica, budget, chunk_size)
    log.info("%d replicas, about %.1f MiB each, budget %.1f MiB -> %d chunk(s) of %s replicas",
             len(configs), per_replica / 2**20, budget / 2**20, len(chunks), "/".join(map(str, chunks)))
    if progress is None:
        progress = progress_wanted()
    display = _ProgressDisplay(len(configs), clock.total_steps * len(chunks)) if progress else None
    runs: list[Run] = []
    try:
        start = 0
        for size in chunks:
            indices = range(start, start + size)
            replicas = [_make_replica(i, configs[i], models[i], factory(i, configs[i]), clock, dataset.name, probes,
                                      dataset.n_classes is not None) for i in indices]
            runs += _train_chunk(replicas, dataset, clock, list(probes), device, display)
            start += size
    finally:
        if display is not None:
            display.close()
    return ReplicaRuns(runs, chunks, per_replica, budget, time.perf_counter() - started)


def _callback_factory(callbacks, n: int) -> CallbackFactory:
    if callbacks is None:
        return lambda index, config: []
    if callable(callbacks):
        return lambda index, config: list(callbacks(index, config))
    callbacks = list(callbacks)
    if len(callbacks) != n or any(isinstance(c, Callback) for c in callbacks):
        raise ConfigError("give replica callbacks as a function (index, config) -> [callbacks], "
                          f"or one list per replica ({n} lists)")
    return lambda index, config: list(callbacks[index])


def _make_replica(index: int, config: TrainConfig, model: nn.Module, callbacks, clock: Clock, dataset: str = "",
                  probes: Sequence[str] = (), classification: bool = True) -> _Replica:
    callbacks = list(callbacks)
    refused = [c for c in callbacks if isinstance(c, Checkpoint)]
    if refused:  # refused before any work, rather than at the first epoch end
        raise ConfigError(f"replica {index}: {SAVE_REFUSAL}")
    recorder = Recorder(
        clock, model=model, classification=classification, callbacks=callbacks, config=config, dataset=dataset,
        probe_names=tuple(probes), probe_every=config.probe_every,
        eval_every=config.eval_every, save=None, save_refusal=SAVE_REFUSAL,
    )
    return _Replica(
        index=index, config=config, model=model, recorder=recorder,
        base_lr=scaled_lr(config, clock.batch_size),
        data_generator=torch.Generator().manual_seed(config.seed),
        dropout_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed),
    )


def _estimate_bytes(model: nn.Module, dataset, config: TrainConfig, clock: Clock, probes) -> int:
    """`replica_bytes` for this model: counts its tensors and measures its activations on 2 samples."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out[0].numel())) for m in leaves]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(dataset.train[0][:1])
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    copies = 1 + {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 2}[config.optimizer] + len(probes)
    return replica_bytes(
        n_params=sum(p.numel() for p in model.parameters()),
        n_buffers=sum(b.numel() for b in model.buffers()),
        state_copies=copies,
        activations_per_sample=sum(sizes) + dataset.train[0][0].numel(),
        batch_size=clock.batch_size,
        eval_rows=min(config.eval_batch_size, clock.n_train),
        element_bytes=dataset.train[0].element_size(),
    )


def _train_chunk(replicas: list[_Replica], dataset, clock: Clock, probes: list[str], device, display) -> list[Run]:
    """Train one chunk of replicas together (`batchlab.drive.drive`) and return their runs in order."""
    state = _Pass(replicas, dataset, clock, probes, device)
    state.choose_compiled()
    try:
        return drive(_Replicas(state, display))
    finally:
        state.drop(list(state.active))  # each model keeps its own weights, out of the stack


class _Replicas:
    """The chunk's replicas as a group for `batchlab.drive.drive`: the members are their cores.

    The stack (`_Pass`) holds the replicas that train; one that stopped or diverged leaves it when
    the epoch goes on without it (its epoch's end is evaluated while it is still there). An epoch's
    steps keep their numbers as tensors (`_Pending`) and are read back in bulk (`_flush`, one
    synchronisation) where a core looks at the run (`batchlab.looks`: an evaluation, a live
    callback's `StepEnd`), after the looks' window at most, and at the epoch's end;
    `batchlab.drive.after_steps` follows each read-back.
    """

    def __init__(self, state: _Pass, display):
        self.state, self.display = state, display
        self.members = [replica.recorder for replica in state.active]
        self.model = state.skeleton  # the module that trains (each replica's own is only evaluated)
        self.epoch_rows: list[_Replica] = []  # whose rows the epoch's order holds, in its order
        self.rows: torch.Tensor | None = None  # the rows of the order still in the stack, once some left
        self.at = 0  # the epoch's next batch
        self.looks: list[Looks] = []  # where the replicas in the stack are looked at (see `_follow`)
        self._follow()

    def _follow(self) -> None:
        """The replicas that stopped or diverged leave the stack; the read-back points and the epoch's
        rows follow the others."""
        state = self.state
        state.drop([replica for replica in state.active if not replica.recorder.going])
        # A measured step is no look here: the stacked step measures it and keeps the values as tensors.
        self.looks = [replace(replica.recorder.looks, probe_every=None) for replica in state.active]
        if self.epoch_rows and len(self.epoch_rows) != len(state.active):
            self.rows = torch.tensor([self.epoch_rows.index(r) for r in state.active], device=self.state.device)

    def epoch_batches(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next epoch: each replica's own order (a permutation from its own generator, as its `fit`
        draws it), stacked (R, N), and cut into batches (R, b) where `batchlab.schedule.cut_epoch` cuts."""
        self._follow()
        state = self.state
        clock, config = state.active[0].recorder.clock, state.config
        order = torch.stack([schedule.epoch_order(clock.n_train, replica.data_generator, config.shuffle)
                             for replica in state.active]).to(state.dataset.train[0].device)  # (R, N)
        sizes = [len(batch) for batch in schedule.cut_epoch(order[0], clock, config.drop_last)]
        self.epoch_rows, self.rows, self.at = list(state.active), None, 0
        return order, list(torch.split(order[:, :sum(sizes)], sizes, dim=1))  # each (R, b)

    def run_epoch(self, order: torch.Tensor, batches: list[torch.Tensor]) -> None:
        """The epoch's steps for the replicas in the stack, from where the epoch stands, read back where
        the nearest core looks (`_stretch`); returns early once a replica stops or diverges
        (`batchlab.drive.drive` ends it, then calls again)."""
        self._follow()
        clock = self.state.active[0].recorder.clock  # every core has its rows so far
        while self.at < len(batches) and clock.step < clock.total_steps:
            pending: list[_Pending] = []
            for _ in range(self._stretch(clock.step, min(len(batches) - self.at, clock.total_steps - clock.step))):
                clock = self._step(batches[self.at], clock, pending)
                self.at += 1
            if not self._read_back(pending):
                return

    def _step(self, batch: torch.Tensor, clock: Clock, pending: list[_Pending]) -> Clock:
        """One stacked update on ``batch`` (R_epoch, b), its numbers kept in ``pending``; returns the
        clock after it."""
        state = self.state
        index = batch if self.rows is None else batch.index_select(0, self.rows)
        # probe_every is shared (`SHARED_FIELDS`): the first core's looks say which steps are measured.
        measuring = bool(state.probes) and state.active[0].recorder.looks.measures(clock.step)
        started = time.perf_counter()
        numbers, probed = state.step(index, clock, measuring)
        pending.append(_Pending(numbers, probed, state.lrs[clock.step], time.perf_counter() - started, index.shape[1]))
        return replace(clock, step=clock.step + 1, step_in_epoch=clock.step_in_epoch + 1,
                       samples_seen=clock.samples_seen + index.shape[1])

    def _stretch(self, step: int, limit: int) -> int:
        """How many steps from ``step`` on run before a read-back: up to the nearest step where a core
        looks at its run (`batchlab.looks.Looks.stretch`: an evaluation, a live callback's `StepEnd`,
        the read-back window), at most ``limit`` (the epoch's remaining batches and the run's steps)."""
        return min(looks.stretch(step, limit) for looks in self.looks)

    def _read_back(self, pending: list[_Pending]) -> bool:
        """The pending steps into the cores, then what follows them (`batchlab.drive.after_steps`).
        Returns whether every replica trains on."""
        if not pending:
            return True
        _flush(self.state, pending)
        going = after_steps(self, [replica.recorder for replica in self.state.active])
        if self.display is not None:
            self.display.update(self.state, self.state.active[0].recorder.clock)
        return going

    def evaluate(self, members: Sequence[Recorder]) -> None:
        """Evaluate these members (replicas in the stack) and hand each its metrics, with its share of the time."""
        state = self.state
        row_of = {id(replica.recorder): row for row, replica in enumerate(state.active)}
        started = time.perf_counter()
        results = state.evaluate([row_of[id(member)] for member in members])
        seconds = (time.perf_counter() - started) / len(members)
        for member, metrics in zip(members, results):
            member.record_evaluation(metrics, seconds)

    def settle(self, members: Sequence[Recorder]) -> bool:
        """Act on these members' requests; True while all of them train on."""
        for member in members:
            member.settle()
        return all(member.going for member in members)


@dataclass(frozen=True)
class _Pending:
    """A step whose numbers are still tensors: read in bulk by `_flush` (one synchronisation)."""

    numbers: StepNumbers  # (R,) batch losses and correct counts
    probes: dict[str, torch.Tensor]  # (R,) per probe measured at this step
    lrs: np.ndarray  # (R_chunk,) the lr of every replica of the chunk at this step
    seconds: float
    batch_size: int


def _flush(state: _Pass, pending: list[_Pending]) -> None:
    """Hand the pending steps to the core of every replica in the stack, in order.

    A core records until its loss is not finite (it has then diverged, and `batchlab.drive.drive`
    ends it); callbacks ask for something only at a read-back's last step (`_Replicas._stretch`).
    """
    if not pending:
        return
    classification = state.classification
    # (S, R) as nested Python lists, one sync each: .tolist() converts every element at once, as
    # float()/int() of each numpy element would, but without a numpy scalar per step per replica.
    losses = torch.stack([p.numbers.loss for p in pending]).cpu().tolist()
    corrects = torch.stack([p.numbers.correct for p in pending]).cpu().tolist() if classification else None
    probe_values: dict[str, dict[int, np.ndarray]] = {}
    for name in REPLICA_PROBES:
        measured = [k for k, p in enumerate(pending) if name in p.probes]
        if measured:
            values = torch.stack([pending[k].probes[name] for k in measured]).cpu().numpy()  # (S', R)
            probe_values[name] = dict(zip(measured, values))
    n_active = len(state.active)
    for row, replica in enumerate(state.active):
        column = state.column[replica.index]
        replica.recorder.record_steps([
            (p.batch_size, float(p.lrs[column]), losses[k][row], corrects[k][row] if classification else None,
             p.seconds / n_active,  # the replica's share of the vectorized step
             {name: float(values[k][row]) for name, values in probe_values.items() if k in values})
            for k, p in enumerate(pending)])


class _ProgressDisplay:
    """A rich progress bar over all replicas' steps: active replicas and their best running loss."""

    def __init__(self, n_replicas: int, total_steps: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.n_replicas = n_replicas
        self.done_before = 0
        self.progress = Progress(TextColumn("replicas"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[values]}"), console=Console(stderr=True), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("steps", total=total_steps, values="")
        self.last_draw = 0.0

    def update(self, state: _Pass, clock: Clock) -> None:
        now = time.monotonic()
        if now - self.last_draw < 0.1:
            return
        self.last_draw = now
        running = [r.recorder.steps[-1]["running_loss"] for r in state.active if r.recorder.steps]
        best = f"  best running_loss {min(running):.4f}" if running else ""
        self.progress.update(self.task, completed=clock.step, values=f"active {len(state.active)}{best}")

    def close(self) -> None:
        self.progress.stop()
