"""Data-parallel training on torch.distributed: one run over N ranks, recorded as one run.

Launched by ``torchrun --nproc-per-node N -m batchlab fit ...`` (or ``batchlab fit --nproc N``),
or by any script that calls `fit` in every rank of a process group. A rank trains its share of
each global batch; the global batch is what a single process at batch B×N would take:

- every rank draws the same seeded permutation per epoch; the global batch is the same slice of it
  as in `batchlab.loop.fit` at batch B×N, split into N consecutive parts (sizes differing by at
  most one: a short last batch is split too), rank r taking part r;
- ``DistributedDataParallel`` all-reduces the gradients (gloo on the CPU, NCCL on GPUs); each rank's
  loss is its summed per-sample loss × N/B, so DDP's average is the gradient of the global batch's
  mean loss, exactly as one process computes it;
- the steps' losses and correct counts are summed over ranks, one all-reduce per stretch of updates
  between two looks at the run (`batchlab.looks`, as `batchlab.loop.fit` reads its numbers once per
  stretch), evaluations are sharded over the ranks and summed, so ``batch_*``, ``running_*``,
  ``train_*`` and ``val_*`` describe the global batch and the whole splits: the step table equals the
  single-process one;
- ``noise_scale`` comes from the ranks' local vs the all-reduced gradient norms
  (`batchlab.probes.RankNoiseScale`), no extra backward pass;
- callbacks (the store's recorder, the progress bar) run on rank 0 only; their stop requests are
  broadcast to the other ranks where they can arise: evaluations, epoch ends, and the steps rank 0's
  live per-step callbacks see (`batchlab.looks`, told to every rank once at the start; a progress
  bar, which only reads rows, adds no collective);
- a rank that raises tells rank 0 through the process group's key-value store; rank 0 ends the run
  as ``failed`` with that message (or, for a rank killed without a word, what its failed collective
  showed); every collective has a timeout, so no rank waits forever; Ctrl-C (SIGINT, which the
  launcher passes to every rank) ends it as ``interrupted``.

Dropout masks are drawn per rank (rank 0 from the run's seed): runs with dropout are data-parallel
but not bit-equal to one process. Batch norm normalises per rank (use ``SyncBatchNorm`` for the
global batch's statistics); `batchlab.loop.plan_batch_norm` refuses a per-rank batch of one and drops
a last global batch that would give a rank fewer than 2 samples.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import data as data_lib
from . import schedule
from .config import Adaptive, TrainConfig, is_schedule
from .drive import drive
from .errors import BatchlabError, ConfigError, error_line
from .events import Callback, Clock, RestoreWeights
from .looks import Looks
from .loop import check_model, plan_batch_norm, plan_run, resolve_device
from .metrics import correct_count, evaluation_splits, loss_function, pass_totals
from .optim import build_optimizer, scaled_lr, set_lr
from .probes import NoiseScale, NoiseScaleExact, ProbeSet, RankGradients, RankNoiseScale, make_probe, part_sizes
from .record import Recorder, Run
from .schedule import require_one_batch_size

DEFAULT_TIMEOUT = 300.0  # seconds any collective may wait before the run fails
FAILURE_KEY = "batchlab/failure/{rank}"  # where a failing rank leaves its message for rank 0
HOST_BYTES = 256  # hostnames travel as fixed-size byte tensors (no pickling between ranks)

__all__ = ["Ranks", "RankFailure", "TrackedRanks", "check_nproc", "fit", "launch", "launched", "plan_global", "rank_part",
           "rank_probe", "start", "stop"]


class RankFailure(BatchlabError):
    """A rank of a data-parallel run failed; the message names the rank and its error."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the process group.

    Attributes:
        rank: this process's rank (0 records and prints).
        world_size: N, the number of ranks.
        local_rank: the rank on this host (its GPU index under NCCL).
        backend: ``gloo`` or ``nccl``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by a launcher of torch.distributed (``torchrun`` sets these)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def current() -> Ranks | None:
    """The ranks of the initialised default process group, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 str(dist.get_backend()))


def start(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Ranks:
    """Join the process group described by the launcher's environment (once; later calls return it).

    Args:
        device: ``cpu``, ``cuda`` or ``auto``: NCCL for CUDA, gloo for the CPU.
        timeout: seconds any collective may wait (a dead or stuck rank then fails the run).

    Returns:
        This process's `Ranks`.
    """
    ranks = current()
    if ranks is not None:
        return ranks
    if not launched():
        raise ConfigError("no process group: start the run with torchrun --nproc-per-node N -m batchlab fit ..., "
                          "or batchlab fit --nproc N")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return current()  # type: ignore[return-value]


def stop() -> None:
    """Leave the process group (a process that exits inside one is aborted by its threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_part(index: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Rank r's consecutive part of a global batch's indices (the N parts' sizes differ by at most one)."""
    sizes = part_sizes(index.numel(), ranks.world_size)
    begin = sum(sizes[:ranks.rank])
    return index[begin:begin + sizes[ranks.rank]]


def plan_global(dataset: data_lib.Dataset, config: TrainConfig, world_size: int) -> tuple[TrainConfig, Clock]:
    """The run as one process would see it: the config at the global batch B×N, and its accounting.

    Raises:
        ConfigError: the global batch is larger than the training set.
    """
    if isinstance(config.batch_size, Adaptive):
        require_one_batch_size(config.batch_size, "a data-parallel run")
    per_rank = config.batch_size if is_schedule(config.batch_size) else ((0, config.batch_size),)
    global_batches = []
    for samples, batch in per_rank:
        if batch != "full" and batch * world_size > dataset.n_train:
            raise ConfigError(f"batch_size {batch} per rank × {world_size} ranks = {batch * world_size} is larger "
                              f"than the training set ({dataset.n_train} samples); use a per-rank batch size <= "
                              f"{dataset.n_train // world_size}")
        global_batches.append((samples, batch if batch == "full" else batch * world_size))
    global_size = global_batches[0][1] if len(global_batches) == 1 else tuple(global_batches)
    global_config = config.model_copy(update={"batch_size": global_size})
    return global_config, plan_run(dataset, global_config)


# --- the run --------------------------------------------------------------------------------------


def fit(
    model: torch.nn.Module,
    dataset: data_lib.Dataset,
    config: TrainConfig | None = None,
    *,
    probes: Sequence[Any] = (),
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Run:
    """Train ``model`` data-parallel over the ranks of a process group; call it in every rank.

    Args:
        model: the same module in every rank (built from the same seed; DDP also broadcasts rank 0's weights).
        dataset: the same dataset in every rank (each rank reads only its parts of the batches).
        config: a `TrainConfig` whose ``batch_size`` is the per-rank batch B (global batch B×N);
            ``"full"`` splits the whole training set over the ranks.
        probes: as `batchlab.loop.fit`; ``noise_scale`` is measured from the ranks
            (`batchlab.probes.RankNoiseScale`). Probes that need the live graph (``noise_scale_exact``)
            are refused.
        callbacks: run on rank 0 only (the store's recorder, EarlyStopping); other ranks follow its stops.
        progress: a progress bar on rank 0; default: `batchlab.callbacks.progress_wanted` (a terminal, not CI).
        timeout: seconds any collective may wait; the process group is started with it when this
            call starts it.

    Returns:
        The `Run` in every rank (identical tables); its config has the global batch size.

    Raises:
        RankFailure: a rank raised or a collective failed (a rank killed, or silent past ``timeout``);
            on rank 0 the run is recorded as ``failed`` with the same one-line message.
        KeyboardInterrupt: Ctrl-C (SIGINT, which torchrun passes to every rank); rank 0 records
            the run as ``interrupted``.
        ConfigError: bad input, before any training (``noise_scale`` with one rank, a batch of one
            sample per rank with batch norm, a global batch larger than the data).
    """
    from .callbacks import ProgressBar, progress_wanted

    config = config or TrainConfig()
    ranks = start(config.device, timeout)
    for spec in probes:  # bad probes fail here, in every rank alike, before any collective
        rank_probe(spec, world_size=ranks.world_size)
    config, _ = plan_batch_norm(model, dataset.n_train, config, ranks.world_size)
    global_config, clock = plan_global(dataset, config, ranks.world_size)
    device = _rank_device(config.device, ranks)
    dataset = dataset.to(device)
    model.to(device)
    check_model(model, dataset)
    callbacks = list(callbacks) if ranks.is_main else []
    if ranks.is_main and (progress if progress is not None else progress_wanted()):
        callbacks.append(ProgressBar())
    recorder = None
    with _seeded(config.seed + 1_000_003 * ranks.rank, device), _Signals(ranks) as signals:
        try:  # from the first collective on, a rank that fails or leaves ends the run in one line
            _add_provenance(callbacks, _provenance(ranks, config, clock))
            state = _DistributedState.start(model, dataset, global_config, clock, ranks)
            probe_set = ProbeSet.create([rank_probe(p, state.rank_gradients, ranks.world_size) for p in probes],
                                        model, dataset, global_config, state.loss_fn)
            state.recorder = recorder = Recorder(
                clock, model=model, classification=dataset.n_classes is not None, callbacks=callbacks,
                config=global_config, dataset=dataset.name, probes=probe_set, probe_every=config.probe_every,
                eval_every=config.eval_every, save=None,
                save_refusal="data-parallel runs write no checkpoints yet")
            return _train(state)
        except BaseException as error:
            signals.shield()  # the launcher's signals wait until the run's end is recorded
            ending = _ended(recorder, ranks, error, signals)
            if ending is error:
                raise
            raise ending from error


def _ended(rec: Recorder | None, ranks: Ranks, error: BaseException, signals: "_Signals") -> BaseException:
    """Record how the run ended (rank 0, once its core exists) and return what ``fit`` raises:
    KeyboardInterrupt for a Ctrl-C (the launcher passes it to every rank; a rank may first see it as
    a failed collective, when another rank has already left), else one `RankFailure` with the run's
    one-line message."""
    interrupted = signals.interrupted or isinstance(error, KeyboardInterrupt)
    if rec is None and isinstance(error, BatchlabError) and not interrupted:
        return error  # bad input, found alike in every rank before the run started
    message = "" if interrupted else _failure(error, ranks)
    # _failure waits a little after a failed collective: a Ctrl-C that reached the other ranks first
    # has arrived here too by then.
    interrupted = interrupted or signals.interrupted
    if interrupted:
        message = f"interrupted at step {rec.clock.step if rec is not None else 0}"
    if ranks.is_main and rec is not None and rec.status != "interrupted":  # drive records a Ctrl-C it meets
        rec.finish("interrupted" if interrupted else "failed", message)
    if interrupted:
        return error if isinstance(error, KeyboardInterrupt) else KeyboardInterrupt()
    return error if isinstance(error, RankFailure) else RankFailure(message)


def rank_probe(spec: Any, gradients: RankGradients | None = None, world_size: int = 2) -> Any:
    """The probe a data-parallel run measures for ``spec``: the noise scale comes from the ranks
    (``gradients``, the run's `RankGradients`).

    Raises:
        ConfigError: a probe that needs the whole batch in one process, or ``noise_scale`` with one
            rank (its two batch sizes, a rank's share and the global batch, are then the same).
    """
    if spec == "noise_scale":
        if world_size < 2:
            raise ConfigError("noise_scale in a data-parallel run compares the ranks' gradients and needs 2 or more "
                              "ranks; with one process train without --nproc (or torchrun), where it is measured "
                              "from per-sample gradients")
        return RankNoiseScale(gradients=gradients)
    probe = make_probe(spec)
    if isinstance(probe, (NoiseScale, NoiseScaleExact)):
        raise ConfigError(f"probe {probe.name!r} needs the whole batch in one process; in a data-parallel run "
                          "ask for 'noise_scale', which is measured from the ranks' gradients")
    return probe


@dataclass
class _DistributedState:
    """What the data-parallel loop keeps besides the core: the wrapped model, optimizer and data order."""

    model: torch.nn.Module  # the user's module (evaluation, probes)
    ddp: torch.nn.Module  # the same module in DistributedDataParallel (training forward passes)
    dataset: data_lib.Dataset
    config: TrainConfig  # at the global batch
    ranks: Ranks
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    base_lr: float
    splits: dict
    rank_gradients: RankGradients
    recorder: Recorder = None  # type: ignore[assignment]
    # Where rank 0 looks at the run (its evaluations, probes, live callbacks' steps): every rank's
    # stretches end there, and the ranks agree there on rank 0's requests.
    looks: Looks = Looks()
    current_lr: float | None = None  # the lr the optimizer holds; None: not set yet

    @classmethod
    def start(cls, model, dataset, config, clock, ranks) -> "_DistributedState":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        rank_gradients = RankGradients()
        ddp.register_comm_hook(rank_gradients, RankGradients.hook)
        base_lr = scaled_lr(config, clock.batch_size)
        return cls(model=model, ddp=ddp, dataset=dataset, config=config, ranks=ranks,
                   loss_fn=loss_function(config.loss, dataset.task),
                   optimizer=build_optimizer(model.parameters(), config, base_lr),
                   generator=torch.Generator().manual_seed(config.seed), base_lr=base_lr,
                   splits=evaluation_splits(dataset, config.eval_train), rank_gradients=rank_gradients)

    def use_lr(self, lr: float) -> None:
        """The next update's learning rate, into the optimizer when it changed."""
        if lr != self.current_lr:
            set_lr(self.optimizer, lr)
            self.current_lr = lr

    def epoch_batches(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next epoch's global order (the same on every rank: one seed) and its global batches."""
        return schedule.draw_epoch(self.recorder.clock, self.generator, self.config.shuffle, self.config.drop_last,
                                   self.dataset.train[0].device)

    @property
    def members(self) -> tuple[Recorder]:
        """The rank's run as `batchlab.drive.drive`'s group: one core."""
        return (self.recorder,)

    def run_epoch(self, order: torch.Tensor, batches: list[torch.Tensor]) -> None:
        _run_epoch(self, batches)

    def settle(self, members: Sequence[Recorder] = ()) -> bool:
        return _agree(self)

    def evaluate(self, members: Sequence[Recorder] = ()) -> None:
        """Full passes over the splits, each rank over its share of the rows, summed over ranks.
        (``members``: `drive`'s group, always this rank's run.)"""
        started = time.perf_counter()
        classification = self.dataset.n_classes is not None
        totals = []
        self.model.eval()
        try:
            with torch.inference_mode():
                for X, y in self.splits.values():
                    rows = rank_part(torch.arange(X.shape[0]), self.ranks)
                    begin, end = (int(rows[0]), int(rows[-1]) + 1) if rows.numel() else (0, 0)
                    batch = self.config.eval_batch_size
                    slices = [slice(s, min(s + batch, end)) for s in range(begin, end, batch)]
                    loss_sum, correct, n = pass_totals(self.model, X, y, slices, self.loss_fn, classification)
                    totals.append(torch.stack([loss_sum, correct.double(), torch.tensor(float(n), device=X.device,
                                                                                      dtype=torch.float64)]))
        finally:
            self.model.train()
        summed = torch.stack(totals)  # (splits, 3): loss sum, correct, samples
        dist.all_reduce(summed)
        metrics: dict[str, float] = {}
        for name, (loss_sum, correct, n) in zip(self.splits, summed.tolist()):
            metrics[f"{name}_loss"] = loss_sum / n
            if classification:
                metrics[f"{name}_acc"] = correct / n
        self.recorder.record_evaluation(metrics, time.perf_counter() - started)


def _train(state: _DistributedState) -> Run:
    # The plan is shared (eval_every, probe_every, the window); the callbacks' steps are rank 0's alone.
    state.looks = replace(state.recorder.looks, steps=_rank0_look_steps(state))
    return drive(state)[0]


def _rank0_look_steps(state: _DistributedState) -> tuple[int, ...] | None:
    """Rank 0's look steps (`batchlab.looks.Looks.steps`: None for every step) in every rank: a count
    (-1 for None), then the steps as one int64 tensor; no pickling between ranks."""
    steps, device = state.recorder.looks.steps, _collective_device(state)
    count = torch.tensor([-1 if steps is None else len(steps)], dtype=torch.int64, device=device)
    dist.broadcast(count, 0)
    n = int(count.item())
    if n < 0:
        return None
    if n == 0:
        return ()
    values = (torch.tensor(steps, dtype=torch.int64, device=device) if state.ranks.is_main
              else torch.empty(n, dtype=torch.int64, device=device))  # (n,)
    dist.broadcast(values, 0)
    return tuple(values.tolist())


def _run_epoch(state: _DistributedState, batches: list[torch.Tensor]) -> None:
    """One epoch, a stretch at a time, as `batchlab.loop.fit` trains one: the updates until rank 0
    looks at the run (`_stretch_length`) keep each step's loss sum and correct count as tensors, and
    one all-reduce at the stretch's end gives every rank the same global numbers for the core. A step
    the probes measure is a stretch of its own. Every rank computes the same stretches (one plan,
    rank 0's look steps), so their collectives match.

    Args:
        batches: the epoch's global batches (index tensors); each rank takes its part of each.
    """
    rec = state.recorder
    classification = state.dataset.n_classes is not None
    done = rec.clock.epoch - 1  # epochs completed before this one
    at = 0  # the next batch of the epoch
    while at < len(batches) and rec.clock.step < rec.clock.total_steps:
        started = time.perf_counter()
        step, measuring = rec.clock.step, rec.measuring()
        count = 1 if measuring else _stretch_length(state, batches, at)
        stretch = batches[at:at + count]
        lrs = schedule.stretch_lrs(state.config, rec.clock, step, count, rec.clock.batch_size, done, state.base_lr)
        totals = _stretch(state, stretch, lrs, measuring)  # (loss sum, correct) per update, global
        seconds = (time.perf_counter() - started) / count
        probe_values = rec.probes.collect() if measuring else None
        _record(rec, [(index.numel(), lr, loss_sum / index.numel(), int(correct) if classification else None,
                       seconds, probe_values) for index, lr, (loss_sum, correct) in zip(stretch, lrs, totals)])
        at += count
        if not _after_stretch(state):
            return


def _stretch_length(state: _DistributedState, batches: list[torch.Tensor], at: int) -> int:
    """How many of the next updates make one stretch: until rank 0 looks at the run (its evaluations,
    measured steps, live callbacks' steps and read-back window: `batchlab.looks.Looks.stretch` of
    ``state.looks``), within the epoch's batches of the size in force (a schedule's change or a short
    last batch ends it, as in `batchlab.loop.fit`, so that one B in force gives every update's lr)."""
    clock = state.recorder.clock
    limit = min(clock.total_steps - clock.step, len(batches) - at)
    return max(1, schedule.of_one_size(batches, at, state.looks.stretch(clock.step, limit), clock.batch_size))


def _stretch(state: _DistributedState, batches: list[torch.Tensor], lrs: list[float],
             measuring: bool) -> list[list[float]]:  # fmt: skip
    """This rank's updates on its parts of the global ``batches`` at the learning rates ``lrs``, none of
    them read back until the stretch's one all-reduce of the steps' (loss sum, correct count).

    Returns:
        Per update, the global batch's loss sum and correct count (0 for regression).
    """
    local = torch.stack([_rank_step(state, index, lr, measuring) for index, lr in zip(batches, lrs)])  # (K, 2)
    dist.all_reduce(local)
    return local.tolist()


def _rank_step(state: _DistributedState, index: torch.Tensor, lr: float, measuring: bool) -> torch.Tensor:
    """One update on this rank's part of the global batch ``index``, DDP all-reducing the gradients;
    the probes look on where ``measuring``. Returns this rank's (loss sum, correct count), (2,) float64,
    not synchronised."""
    X, y = state.dataset.train
    probes = state.recorder.probes if measuring else None
    state.use_lr(lr)
    local = rank_part(index, state.ranks)  # (b_r,)
    output = state.ddp(X[local])  # (b_r, K)
    losses = state.loss_fn(output, y[local])  # (b_r,)
    # DDP averages over N ranks: N/B · Σ_i ℓ_i per rank makes the average the global batch's mean-loss gradient.
    loss = losses.sum() * (state.ranks.world_size / index.numel())
    if measuring:
        state.rank_gradients.arm(local.numel(), index.numel())
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if probes is not None:
        probes.after_backward()
    state.optimizer.step()
    if probes is not None:
        probes.after_update()
    loss_sum = losses.detach().double().sum()
    if state.dataset.n_classes is None:
        return torch.stack([loss_sum, loss_sum.new_zeros(())])
    return torch.stack([loss_sum, correct_count(output.detach(), y[local]).double()])


def _record(rec: Recorder, rows: list[tuple]) -> None:
    """A stretch's rows into the core, all of them unless the run diverges (the same global loss on
    every rank: all stop at the same row). A request of rank 0's callbacks within the stretch waits for
    the next agreement (`Recorder.record_steps`): every rank counts the same steps."""
    rec.record_steps(rows)


def _after_stretch(state: _DistributedState) -> bool:
    """After a stretch's rows: evaluate where due, and agree on rank 0's requests where it looks
    (an evaluation, a step its live callbacks see; a progress bar, which only reads rows, adds no
    collective). False: the epoch ends here, on every rank."""
    rec = state.recorder
    if rec.status == "diverged":
        return False
    evaluated = rec.evaluation_due()
    if evaluated:
        state.evaluate()
    if evaluated or state.looks.sees(rec.clock.step):
        return _agree(state)
    return True


def _agree(state: _DistributedState) -> bool:
    """Act on rank 0's callbacks' requests in every rank: its stop, its restored weights. True while going on."""
    rec, ranks = state.recorder, state.ranks
    restored = any(isinstance(r, RestoreWeights) for r in rec.requests)
    rec.settle()
    decision = torch.tensor([int(not rec.going), int(restored)], dtype=torch.int64, device=_collective_device(state))
    dist.broadcast(decision, 0)
    stop, restored_on_main = decision.tolist()
    if restored_on_main:
        for tensor in state.model.state_dict().values():
            dist.broadcast(tensor, 0)
    if stop and rec.going and not ranks.is_main:
        rec.stop("rank 0 stopped the run")
    return rec.going


def _collective_device(state: _DistributedState) -> torch.device:
    return state.dataset.train[0].device


def _rank_device(name: str, ranks: Ranks) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


@contextmanager
def _seeded(seed: int, device: torch.device):
    """The global RNG (dropout) seeded per rank for the run; the caller's RNG state is restored."""
    cpu_state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)


# --- bl.track in a process group -------------------------------------------------------------------


class TrackedRanks:
    """What `batchlab.track` does in a process group of several ranks: step numbers of the global
    batch (loss, correct count and size summed over ranks), and ``noise_scale`` from the ranks.

    Made by `TrackedRanks.create`; the tracker records on rank 0 only.
    """

    def __init__(self, ranks: Ranks, gradients: RankGradients | None, device: torch.device):
        self.ranks, self.gradients, self.device = ranks, gradients, device
        self.provenance = provenance(ranks)  # a collective: every rank gathers the hosts

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @classmethod
    def create(cls, model: torch.nn.Module, probes: list[Any], accumulate: int) -> tuple["TrackedRanks | None", list[Any]]:
        """The ranks of a tracked DDP loop (None outside a process group of 2+ ranks), and its probes,
        ``noise_scale`` measured from the ranks (its communication hook registered on ``model``)."""
        from torch.nn.parallel import DistributedDataParallel

        ranks = current()
        if ranks is None or ranks.world_size < 2:
            return None, probes
        gradients = None
        if accumulate == 1 and any(p.name == "noise_scale" for p in probes):
            if not isinstance(model, DistributedDataParallel):
                raise ConfigError("noise_scale in a data-parallel loop is measured from DDP's all-reduce: pass the "
                                  "DistributedDataParallel model to bl.track")
            gradients = RankGradients()
            model.register_comm_hook(gradients, RankGradients.hook)
            probes = [RankNoiseScale(gradients=gradients) if p.name == "noise_scale" else p for p in probes]
        device = next(model.parameters()).device
        return cls(ranks, gradients, device), probes

    def before_forward(self, inputs: torch.Tensor, measuring: bool) -> None:
        """A training forward pass of ``inputs`` (b, ...): arm the gradients' hook when the step is measured.
        The ranks' batches are taken as equal (DistributedSampler's are), so the global batch is b×N."""
        if self.gradients is not None and measuring:
            batch = int(inputs.shape[0])
            self.gradients.arm(batch, batch * self.ranks.world_size)

    def reduce_step(self, size: int, loss: float, correct: int | None) -> tuple[int, float, int | None]:
        """The global batch's size, mean loss and correct count from every rank's (one all-reduce)."""
        totals = torch.tensor([loss * size, float(correct or 0), float(size), float(correct is None)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        loss_sum, correct_sum, total, missing = totals.tolist()
        return int(total), loss_sum / total, None if missing else int(correct_sum)


# --- provenance -----------------------------------------------------------------------------------


def _provenance(ranks: Ranks, config: TrainConfig, clock: Clock) -> dict[str, Any]:
    """World size, backend, per-rank batch, global batch and every rank's host."""
    per_rank = config.batch_size if config.batch_size != "full" else part_sizes(clock.batch_size, ranks.world_size)[0]
    entries = provenance(ranks)
    entries["distributed"].update(per_rank_batch=per_rank, global_batch=clock.batch_size)
    return entries


def provenance(ranks: Ranks) -> dict[str, Any]:
    """``{"distributed": {world_size, backend, hosts}}``; every rank must call it (the hosts are
    gathered as bytes, never pickled)."""
    name = socket.gethostname().encode()[:HOST_BYTES]
    mine = torch.zeros(HOST_BYTES, dtype=torch.uint8)
    mine[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    device = torch.device("cuda", ranks.local_rank) if ranks.backend == "nccl" else torch.device("cpu")
    gathered = [torch.zeros(HOST_BYTES, dtype=torch.uint8, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, mine.to(device))
    hosts = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
    return {"distributed": {"world_size": ranks.world_size, "backend": ranks.backend, "hosts": hosts}}


def _add_provenance(callbacks: Sequence[Callback], entries: dict[str, Any]) -> None:
    """Give the store's recorders (rank 0's) the run's data-parallel provenance."""
    for callback in callbacks:
        extra = getattr(callback, "extra_provenance", None)
        if isinstance(extra, dict):
            extra.update(entries)


# --- failures -------------------------------------------------------------------------------------


class _Terminated(Exception):
    """The launcher ended this rank (torchrun stops the others when one rank fails)."""


class _Signals:
    """The signals a rank meets while it trains, in the main thread (elsewhere Python cannot catch them).

    - SIGINT (Ctrl-C; the launcher passes it on to every rank) raises KeyboardInterrupt and is
      remembered: a rank may first see it as a failed collective, when another rank has already left.
    - SIGTERM (the launcher stopping the ranks after one failed) becomes `_Terminated` in rank 0, so
      that it records the run as failed before it exits; other ranks keep the default (they end).

    Once either has raised, or `shield` is called (the run is ending), neither raises any more: a
    second signal must not cut short the recording of the first.
    """

    def __init__(self, ranks: Ranks):
        self.ranks, self.interrupted, self.shielded = ranks, False, False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        if self.ranks.is_main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def shield(self) -> None:
        self.shielded = True

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        if not self.shielded:
            self.shielded = True  # once: the run's end is being recorded
            raise KeyboardInterrupt

    def _terminate(self, signum: int, frame: Any) -> None:
        if not self.shielded:
            self.shielded = True  # once: the failure is being recorded
            raise _Terminated("the launcher stopped this rank")


def _failure(error: BaseException, ranks: Ranks) -> str:
    """The run's failure message, one line: this rank's own error, or (rank 0, after a failed
    collective) the message a failing rank left in the process group's store, or what rank 0 saw
    of a rank that ended without leaving one (killed, out of memory)."""
    store = _key_value_store()
    lost = _lost_peer(error)
    own = _lost_message(error, ranks) if lost else f"rank {ranks.rank}: {error_line(error)}"
    if not ranks.is_main:
        if store is not None and not lost:  # a root cause, not the echo of another rank's
            try:
                store.set(FAILURE_KEY.format(rank=ranks.rank), own)
            except Exception:  # the store went with the launcher: nothing more to tell
                pass
        return own
    if isinstance(error, RankFailure):
        return str(error)
    if (lost or isinstance(error, RuntimeError)) and store is not None:
        # A rank that raised leaves its message before it exits, i.e. before its peers' collectives fail.
        told = _told(store, ranks, wait=2.0)
        if told is not None:
            return told
    return own


# What a collective says when a peer is gone: gloo's "Connection reset/closed by peer", read and write
# errors of its sockets (pair.cc), timeouts, NCCL errors.
_LOST_PEER = re.compile(r"connection (reset|closed|refused)|broken pipe|(read|write) error|pair\.cc|socket|"
                        r"timed? ?out|timeout|gloo|nccl", re.IGNORECASE)


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank left or stopped answering
    (or the launcher's SIGTERM, sent when it saw another rank end)."""
    if isinstance(error, (_Terminated, dist.DistError)):
        return True
    if not isinstance(error, RuntimeError) or isinstance(error, RankFailure):
        return False
    return bool(_LOST_PEER.search(str(error)))


def _lost_message(error: BaseException, ranks: Ranks) -> str:
    """One line for a failed collective, in place of the backend's many (its text names C++ files).
    Whether the connection broke first or the launcher's SIGTERM came first is a race: one message."""
    if not isinstance(error, _Terminated) and re.search(r"timed? ?out|timeout", str(error), re.IGNORECASE):
        what = "timed out waiting for the other ranks in a collective: another rank is stuck or gone"
    else:
        what = "lost another rank, which ended without a message (killed, or out of memory?)"
    return f"rank {ranks.rank}: {what}"


def _told(store: Any, ranks: Ranks, wait: float) -> str | None:
    """A failing rank's message from the store, waiting up to ``wait`` seconds for one to arrive."""
    deadline = time.monotonic() + wait
    keys = [FAILURE_KEY.format(rank=r) for r in range(1, ranks.world_size)]
    while True:
        for key in keys:
            try:
                if store.check([key]):
                    return store.get(key).decode(errors="replace")
            except Exception:
                return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _key_value_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


# --- launching ------------------------------------------------------------------------------------


def check_nproc(nproc: int, device: str = "auto") -> None:
    """Refuse more ranks than this machine has places for: a CPU core per rank (gloo), a GPU per rank (NCCL).

    More ranks than cores would time-share the cores (each rank's steps wait for the slowest), and
    NCCL needs a GPU of its own per rank.

    Raises:
        ConfigError: ``nproc`` is above the machine's cores (or GPUs), with the largest that fits.
    """
    if resolve_device(device).type == "cuda":
        available, what = torch.cuda.device_count(), "GPU"
    else:
        available, what = _cpu_cores(), "CPU core"
    what += "" if available == 1 else "s"
    if nproc > available:
        raise ConfigError(f"--nproc {nproc} is more than this machine's {available} {what} (one per rank); "
                          f"use --nproc {available} or fewer, or torchrun to train across machines")


def _cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(arguments: Sequence[str], nproc: int) -> int:
    """Run ``batchlab <arguments>`` in ``nproc`` ranks on this machine, as ``torchrun --standalone
    --nproc-per-node nproc -m batchlab <arguments>`` would.

    Rank 0 prints the run's one line when it ends in error; the launcher adds nothing (no log lines,
    no traceback) unless rank 0 could not speak.

    Returns:
        The exit status: 0 when every rank succeeded, 1 when a rank failed (rank 0 recorded the run
        as ``failed`` and said why), 128 + the signal's number when the launcher was signalled
        (130 for Ctrl-C: it passes SIGINT on to the ranks, and rank 0 records ``interrupted``).

    Raises:
        RankFailure: rank 0 itself was killed by a signal, so nothing recorded the run's end.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--monitor-interval", "0.1",
                                          "-m", "batchlab", *arguments])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with _launcher_silenced():
            run(args)
    except SignalException as signalled:
        return 128 + int(signalled.sigval)
    except ChildFailedError as failed:
        _check_rank0_spoke(failed.failures)
        return 1
    return 0


@contextmanager
def _launcher_silenced():
    """The ranks report their own errors: the launcher's log lines (torch.distributed.elastic gives
    each of its modules a logger at WARNING) would repeat them, as tracebacks."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_rank0_spoke(failures: dict[int, Any]) -> None:
    """Raise `RankFailure` when rank 0 ended by a signal (it printed nothing, and recorded nothing)."""
    rank0 = failures.get(0)
    exitcode = getattr(rank0, "exitcode", 0)
    if rank0 is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else str(-exitcode)
        raise RankFailure(f"rank 0 was killed by {name}: the run's end could not be recorded (the store may still "
                          "show it as running)")
