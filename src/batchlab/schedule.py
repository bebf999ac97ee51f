"""The batch size over a run: a constant, or a schedule of (samples seen → B), planned before training.

Accounting is in samples. An epoch is one pass over the training set; its order is cut into
consecutive batches, and each batch takes the batch size in force at the samples seen when it
starts, so a change takes effect at the next batch (within an epoch, too). The last batch of an
epoch holds what is left (dropped with ``drop_last`` when it is short of its batch size). The
pieces every driver cuts its batches with live here too: an epoch's order (`epoch_order`), its cut
at one batch size (`batch_indices`, `steps_per_epoch`) and the gather of several batches at once
(`gather_batches`).

``TrainConfig.batch_size`` is an int, ``"full"``, or a schedule ``((0, 32), (20000, 64), ...)``:
pairs (samples seen, B) whose first starts at 0 and whose samples increase. On the command line
and in TOML files the same schedule reads ``32,20000:64,60000:128``. Every function here is pure:
the same config and training-set size always give the same batches.

The learning rate follows the batch size in force through ``lr_scaling`` (`batchlab.optim.scaled_lr`
at each batch's B): ``linear`` for SGD-like rules, ``sqrt`` for Adam-like ones, or ``none``.
"""

from __future__ import annotations

from typing import Any

import torch

from .adaptive import adaptive_lr
from .config import Adaptive, TrainConfig, format_schedule, is_schedule
from .errors import ConfigError
from .events import Changes, Clock, batch_at
from .optim import lr_at, scaled_lr, warmup_steps


def require_one_batch_size(batch_size: Any, where: str) -> None:
    """Refuse a batch-size schedule or an adaptive batch size, in one line, where training runs at
    one batch size.

    Raises:
        ConfigError: ``batch_size`` is a schedule or `Adaptive`.
    """
    if is_schedule(batch_size) or isinstance(batch_size, Adaptive):
        kind = "an adaptive batch size" if isinstance(batch_size, Adaptive) else "a batch-size schedule"
        raise ConfigError(f"{where} trains at one batch size; {kind} ({format_schedule(batch_size)}) needs "
                          "bl.fit (batchlab fit)")


def resolve(batch_size: Any, n_train: int) -> Changes:
    """The config's batch size as changes ``((0, B0), (s1, B1), ...)`` with ``"full"`` = N.

    Raises:
        ConfigError: a batch size larger than the training set (``full`` is the way to ask for N).
    """
    if isinstance(batch_size, Adaptive):
        batch_size = batch_size.start  # it grows only as measured, up to min(max, N)
    pairs = batch_size if is_schedule(batch_size) else ((0, batch_size),)
    changes = tuple((samples, n_train if b == "full" else int(b)) for samples, b in pairs)
    for _, b in changes:
        if b > n_train:
            raise ConfigError(f"batch_size {b} is larger than the training set ({n_train} samples); "
                              f"use a batch size <= {n_train}, or 'full' for batch gradient descent")
    return changes


def until(changes: Changes, samples_seen: int) -> Changes:
    """The schedule as far as batches starting before ``samples_seen`` go: two schedules that give
    the same ``until`` trained the same batches up to there."""
    return tuple((s, b) for s, b in changes if s < samples_seen) if samples_seen > 0 else ()


def epoch_batch_sizes(changes: Changes, n_train: int, samples_seen: int, drop_last: bool,
                      start: int = 0) -> list[int]:
    """The sizes of one epoch's batches, for an epoch that starts after ``samples_seen`` samples
    (with ``start``: of its batches from position ``start`` on, ``samples_seen`` counted there).

    Each batch takes the batch size in force where it starts; the last holds what is left of the
    N samples, and is left out with ``drop_last`` when that is less than its batch size.
    """
    left = n_train - start
    if len(changes) == 1 or samples_seen >= changes[-1][0]:  # one batch size for the rest of the epoch
        b = batch_at(changes, samples_seen)
        sizes = [b] * (left // b)
        return sizes if drop_last or left % b == 0 else [*sizes, left % b]
    sizes, at = [], start
    while at < n_train:
        b = batch_at(changes, samples_seen + at - start)
        if n_train - at < b and drop_last:
            break
        sizes.append(min(b, n_train - at))
        at += sizes[-1]
    return sizes


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """ceil(N/B), or floor(N/B) when the last partial batch is dropped."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, generator: torch.Generator, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch: a fresh permutation drawn from ``generator`` (or 0..N-1)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)


def batch_indices(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Split an epoch's order into consecutive batches; the last partial batch is kept unless drop_last."""
    batches = list(torch.split(order, batch_size))
    if drop_last and batches and batches[-1].numel() < batch_size:
        batches.pop()
    return batches


def gather_batches(X: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples at ``index`` (K, B) as K batches: (K, B, *X's sample shape) and (K, B, *y's).

    A plain row copy (``index_select``) of the flattened index: several times cheaper on the CPU
    than advanced indexing (``X[index]``), which takes the general gather path.
    """
    flat = index.reshape(-1)
    return (X.index_select(0, flat).view(*index.shape, *X.shape[1:]),
            y.index_select(0, flat).view(*index.shape, *y.shape[1:]))


def cut_epoch(order: torch.Tensor, clock: Clock, drop_last: bool, start: int = 0) -> list[torch.Tensor]:
    """An epoch's sample order (N,) cut into its batches (index tensors), from position ``start`` on
    (``clock.samples_seen`` counted there): the batch sizes in force as `epoch_batch_sizes` gives them.
    Every driver that draws its own order cuts it here."""
    if not clock.changes:
        return batch_indices(order[start:], clock.batch_size, drop_last)
    sizes = epoch_batch_sizes(clock.changes, clock.n_train, clock.samples_seen, drop_last, start)
    return list(torch.split(order[start:start + sum(sizes)], sizes))


def draw_epoch(clock: Clock, generator: torch.Generator, shuffle: bool, drop_last: bool,
               device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The next epoch of a driver that draws one order for the whole run (`batchlab.fit`, every rank
    of a data-parallel run alike): a permutation from ``generator`` (N,) on ``device``, and its batches."""
    order = epoch_order(clock.n_train, generator, shuffle).to(device)
    return order, cut_epoch(order, clock, drop_last)


def step_lr(config: TrainConfig, clock: Clock, step: int, batch_size: int, epochs_done: int, base_lr: float) -> float:
    """The learning rate of update ``step``: ``lr_at`` at the batch size in force. One batch size for
    the run: ``base_lr`` (`scaled_lr` at it). Under a schedule: `scaled_lr` at ``batch_size``, or for
    an adaptive batch `batchlab.adaptive.adaptive_lr`, with the step schedule counting
    ``epochs_done``."""
    if not clock.changes:
        return lr_at(step, config, base_lr, clock.steps_per_epoch, clock.total_steps)
    base = adaptive_lr(config, batch_size) if isinstance(config.batch_size, Adaptive) else scaled_lr(config, batch_size)
    return lr_at(step, config, base, clock.steps_per_epoch, clock.total_steps, epochs_done)


def of_one_size(batches: list[torch.Tensor], at: int, count: int, batch_size: int) -> int:
    """How many of the ``count`` batches from ``at`` on hold ``batch_size`` samples before the first
    that does not (a schedule's change, an epoch's short last batch): the updates a stretch can make
    at the one batch size whose lr they take."""
    for k in range(count):
        if batches[at + k].numel() != batch_size:
            return k
    return count


def stretch_lrs(config: TrainConfig, clock: Clock, step: int, count: int, batch_size: int, epochs_done: int,
                base_lr: float) -> list[float]:
    """The learning rates of ``count`` updates from ``step`` on, within one epoch at one batch size:
    `step_lr` of each, or, where the schedule is constant past its warm-up, its one value repeated
    (what a stretch of many updates would otherwise compute once per update)."""
    if config.schedule == "constant" and step >= warmup_steps(config, clock.steps_per_epoch):
        return [step_lr(config, clock, step, batch_size, epochs_done, base_lr)] * count
    return [step_lr(config, clock, step + k, batch_size, epochs_done, base_lr) for k in range(count)]


def plan_steps(changes: Changes, n_train: int, drop_last: bool, epochs: int | None,
               max_steps: int | None, samples_seen: int = 0) -> tuple[int, int, int]:
    """The run's length: ``(total steps, epochs started, steps of the first epoch)``.

    Training stops after ``epochs`` epochs or ``max_steps`` steps, whichever comes first. Epochs
    are walked one by one only while the schedule still changes; after its last change every
    epoch is alike and the rest is arithmetic. With ``samples_seen``, the same for the epochs of
    a run that has seen that many samples at an epoch's end (the rest of it).
    """
    total, started, seen, first = 0, 0, samples_seen, 0
    while (epochs is None or started < epochs) and (max_steps is None or total < max_steps):
        sizes = epoch_batch_sizes(changes, n_train, seen, drop_last)  # never empty: every B <= N
        first = first or len(sizes)
        if seen >= changes[-1][0]:  # the batch size is constant from here on
            end = total + len(sizes) * (epochs - started) if epochs is not None else max_steps
            end = min(end, max_steps) if max_steps is not None else end
            return end, started - (-(end - total) // len(sizes)), first
        total, started, seen = total + len(sizes), started + 1, seen + sum(sizes)
    return (min(total, max_steps) if max_steps is not None else total), started, first


def step_plan(changes: Changes, n_train: int, drop_last: bool, total_steps: int) -> list[tuple[int, int]]:
    """For each of the run's steps: (the batch size in force, epochs completed before it), what a
    driver that computes every step's lr ahead (the replicas) needs."""
    plan: list[tuple[int, int]] = []
    seen, epoch = 0, 0
    while len(plan) < total_steps:
        for size in epoch_batch_sizes(changes, n_train, seen, drop_last):
            plan.append((batch_at(changes, seen), epoch))
            seen += size
        epoch += 1
    return plan[:total_steps]


def sizes_used(changes: Changes, n_train: int, drop_last: bool, total_steps: int) -> list[int]:
    """The distinct batch sizes a run of ``total_steps`` trains on, in order of first use: every
    scheduled B it reaches and every short last batch of an epoch (the shapes a compiled step meets)."""
    used, steps, seen = {}, 0, 0
    while steps < total_steps:
        sizes = epoch_batch_sizes(changes, n_train, seen, drop_last)[:total_steps - steps]
        used.update(dict.fromkeys(sizes))
        if seen >= changes[-1][0]:  # every later epoch is alike
            break
        steps, seen = steps + len(sizes), seen + sum(sizes)
    return list(used)
