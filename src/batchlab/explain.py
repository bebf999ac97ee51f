"""The epoch-boundary jump, measured: why the running mean leaps when a new epoch begins.

A Keras-style log shows the *running mean* of the batch metrics since the epoch began, each batch
value taken in train mode at the weights before its update, and reset when an epoch begins. At
the end of an epoch it averages the whole epoch, so it lags behind the model; the first value of
the next epoch is one batch at the current weights, so it leaps ahead. Nothing happens to the model
at the boundary except a new shuffle. This module shows that with numbers from a run:

- the running mean's *jump* across each boundary, and the true training metric's change across the
  same boundary (full pass in eval mode, interpolated from dense evaluation), next to the true
  metric's typical change per step inside an epoch;
- the running mean's *lag* at the end of each epoch (true metric minus running mean), and that the
  running mean is close to the true curve's mean over the epoch;
- the lag split into a *train-mode part* (dropout on, batch norm on batch statistics: eval-mode
  full pass minus train-mode full pass), an *averaging part* (train-mode curve at the epoch end
  minus its mean over the epoch) and the *remainder* (the epoch's batches are a finite sample of
  the train-mode curve, each scored just before the model trains on it);
- the *jump* over the new epoch's first ``window`` batches as a sum of measured terms: averaging,
  train mode, re-exposure (the batches are drawn from the samples not yet seen this epoch, whose
  loss is measured apart from the seen ones), the schedule and the optimizer's state (branches of
  the run at the boundary with the learning rate held, or the second moment frozen), the model's
  other progress, and what is left unexplained (the draw of the batches) with its expected size;
- the per-batch *sawtooth* (Liu & Ma 2025, arXiv 2410.10056): the batch values' jump at a
  boundary beyond their trend, and counterfactual runs that change one thing (sampling with
  replacement, another optimizer, another beta2, a constant learning rate) to show what makes it.

The train-mode full pass (split into the samples seen and not yet seen this epoch) is measured by
`TrainModePass`, the eval-mode batch values by `EvalModeBatches`, the branches by
`BoundaryBranches`: callbacks that leave the run as it is and add their numbers to the evaluation
rows. Everything else is a pure function of a run's step and evaluation tables (`explain_tables`),
so a stored run is explained exactly as the run in memory; `counterfactual_runs` trains the
variants.

Example:
    >>> ds = bl.load_dataset("mnist1d")
    >>> config = explain_config(bl.TrainConfig(batch_size=32, epochs=5), ds.n_train)
    >>> run = bl.fit(model, ds, config, callbacks=explain_callbacks(ds, config))
    >>> print(explain_run(run).paragraph)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import data as data_lib
from . import schedule
from .config import TrainConfig
from .errors import ConfigError, DataError
from .events import AddMetrics, Callback, Evaluation, RunStart, StepEnd
from .metrics import RunningMean, evaluate, loss_function, mean_loss_function
from .schedule import require_one_batch_size

MIN_EVALS_PER_EPOCH = 20
DEFAULT_EVALS_PER_EPOCH = 25
METRICS = ("acc", "loss")
TRAIN_MODE_COLUMNS = ("train_mode_loss", "train_mode_acc")


# -- dense evaluation --------------------------------------------------------------------------


def dense_eval_every(steps_per_epoch: int, evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH) -> int:
    """The evaluation interval in steps that gives at least ``evals_per_epoch`` points per epoch.

    The loop evaluates at every multiple of ``k`` and at every epoch end, so an epoch of S steps
    holds at least floor(S / k) evaluation points; with ``k = floor(S / n)`` that is at least n.
    An epoch with fewer than n steps is evaluated at every step (k = 1).
    """
    if evals_per_epoch < 1:
        raise ConfigError(f"evals_per_epoch must be >= 1, got {evals_per_epoch}")
    return max(1, steps_per_epoch // evals_per_epoch)


def explain_config(config: TrainConfig, n_train: int, evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH) -> TrainConfig:
    """The config with dense evaluation on the training set: ``eval_every`` at most `dense_eval_every`.

    A denser ``eval_every`` already in the config is kept; a sparser one (or ``"epoch"``) is
    replaced. ``eval_train`` is switched on: the true training metric is what explains the jump.

    Raises:
        ConfigError: a batch-size schedule or an adaptive batch size (the terms compare epochs of
            one batch size).
    """
    require_one_batch_size(config.batch_size, "batchlab explain")
    batch_size = n_train if config.batch_size == "full" else min(config.batch_size, n_train)
    dense = dense_eval_every(schedule.steps_per_epoch(n_train, batch_size, config.drop_last), evals_per_epoch)
    every = dense if config.eval_every == "epoch" else min(config.eval_every, dense)
    return config.replace(eval_every=every, eval_train=True)


class EpochOrders:
    """The sample order of each epoch of a `batchlab.fit` run, drawn as the loop draws it.

    The loop draws one `batchlab.schedule.epoch_order` per epoch from a generator seeded with the run's
    seed that serves nothing else; the same draws here give the same orders, so a callback knows
    which samples an epoch has trained on so far (a test checks this against the loop's batches).

    Args:
        n_train: training-set size.
        seed: the run's seed.
        shuffle: the run's ``shuffle``.
    """

    def __init__(self, n_train: int, seed: int, shuffle: bool):
        self.n_train, self.shuffle = n_train, shuffle
        self._generator = torch.Generator().manual_seed(seed)
        self._orders: list[torch.Tensor] = []

    def order(self, epoch: int) -> torch.Tensor:
        """The order of ``epoch`` (1-based), (N,) int64 on the CPU."""
        while len(self._orders) < epoch:
            self._orders.append(schedule.epoch_order(self.n_train, self._generator, self.shuffle))
        return self._orders[epoch - 1]


def _fit_orders(event: RunStart) -> EpochOrders | None:
    """The run's `EpochOrders` when `batchlab.fit` drives it with one batch size, else None: other
    drivers (`bl.track`, the replicas, a framework) draw their batches in orders of their own."""
    config = event.config
    if event.data is None or not isinstance(config, TrainConfig) or getattr(event.clock, "changes", None):
        return None
    return EpochOrders(event.clock.n_train, config.seed, config.shuffle)


class _EpochStarts:
    """Samples an epoch has trained on so far, from the evaluation clocks alone: every epoch end is
    evaluated, so the last evaluation before an epoch's first one marks where it began."""

    def __init__(self) -> None:
        self.epoch, self.samples_at_start, self.last_samples = 0, 0, 0

    def seen_in_epoch(self, clock: Any) -> int:
        if clock.epoch != self.epoch:
            self.epoch, self.samples_at_start = clock.epoch, self.last_samples
        self.last_samples = clock.samples_seen
        return clock.samples_seen - self.samples_at_start


class TrainModePass(Callback):
    """At every evaluation point, a full pass over the training set in *train mode*.

    This is the curve the batch values sample: each batch metric is computed in train mode (dropout
    on, batch norm on the batch's statistics). With batch norm the pass goes over the training set
    in batches of the run's batch size, in a random order, so batch norm sees batches like the
    training ones; its mean is the expected batch value at these weights. It returns ``train_mode_loss`` and
    ``train_mode_acc`` with `AddMetrics`, so they join the evaluation rows and the store.

    On a `batchlab.fit` run it also splits the pass by the epoch's order (`EpochOrders`): the
    samples already trained on in this epoch and those not yet, ``train_mode_seen_*`` and
    ``train_mode_unseen_*`` (NaN where a side is empty: at an epoch's start and end). The next
    batch is drawn from the unseen ones: their gap to the seen ones is the re-exposure effect.

    The run is left exactly as it was: gradients are off, every buffer (batch norm's running
    statistics and counters) is saved and restored, dropout masks come from a forked RNG seeded per
    evaluation, and the batch order from this callback's own generator. A run gives the same numbers
    with and without this callback.

    Args:
        dataset: the run's dataset (its training split is evaluated).
        config: the run's config (loss, seed, batch size, drop_last).
    """

    def __init__(self, dataset: data_lib.Dataset, config: TrainConfig):
        self.X, self.y = dataset.train
        self.classification = dataset.n_classes is not None
        self.loss_fn = loss_function(config.loss, dataset.task)
        self.seed = config.seed
        self.batch_size = dataset.n_train if config.batch_size == "full" else min(config.batch_size, dataset.n_train)
        self.drop_last = config.drop_last  # as in training: batch norm must not meet a batch of one
        self.eval_batch_size = config.eval_batch_size
        self.orders: EpochOrders | None = None
        self.starts = _EpochStarts()

    def _batches(self, model: torch.nn.Module, order: torch.Tensor) -> list[torch.Tensor]:
        """Batch norm's train-mode output depends on the batch: use the training batches' size (and
        drop_last). Dropout acts per sample, so without batch norm large chunks give the same
        expectation, faster."""
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return schedule.batch_indices(order, self.batch_size, self.drop_last)
        return schedule.batch_indices(order, max(self.batch_size, self.eval_batch_size), False)

    def on_run_start(self, event: RunStart) -> None:
        first = next(iter(event.model.parameters()), None)
        if first is not None and self.X.device != first.device:
            self.X, self.y = self.X.to(first.device), self.y.to(first.device)
        self.orders = _fit_orders(event)

    def on_evaluation(self, event: Evaluation) -> AddMetrics:
        losses, correct = self.per_sample(event.model, event.clock.step)
        seen = self._seen(event.clock)
        groups = {"": torch.ones_like(losses, dtype=torch.bool)}
        if seen is not None:
            groups.update({"_seen": seen, "_unseen": ~seen})
        values = {}
        for suffix, mask in groups.items():
            mask = mask & ~losses.isnan()  # a sample batch norm's drop_last left out has no value
            n = int(mask.sum())
            values[f"train_mode{suffix}_loss"] = losses[mask].sum().item() / n if n else math.nan
            if self.classification:
                values[f"train_mode{suffix}_acc"] = correct[mask].sum().item() / n if n else math.nan
        return AddMetrics(values)

    def _seen(self, clock: Any) -> torch.Tensor | None:
        """The samples the current epoch has trained on, as a mask (N,), or None without the order."""
        consumed = self.starts.seen_in_epoch(clock)
        if self.orders is None:
            return None
        seen = torch.zeros(self.X.shape[0], dtype=torch.bool)
        if clock.epoch >= 1:
            seen[self.orders.order(clock.epoch)[:consumed]] = True
        return seen.to(self.X.device)

    def measure(self, model: torch.nn.Module, step: int) -> tuple[float, float]:
        """Mean loss and accuracy over the training set in train mode; the model is left untouched."""
        losses, correct = self.per_sample(model, step)
        kept = ~losses.isnan()
        n = int(kept.sum())
        return losses[kept].sum().item() / n, (correct[kept].sum().item() / n if self.classification else math.nan)

    def per_sample(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training sample's loss (float64, NaN where no batch held it) and correctness in train
        mode, (N,) each; the model is left untouched."""
        device = self.X.device
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        # Seeded per evaluation point, so the pass is reproducible and independent of the run's stream.
        seed = (self.seed * 1_000_003 + step) % (2**63)
        order = torch.randperm(self.X.shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
        losses = torch.full((self.X.shape[0],), math.nan, dtype=torch.float64, device=device)
        correct = torch.zeros(self.X.shape[0], dtype=torch.bool, device=device)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(seed)
                model.train()
                for index in self._batches(model, order):
                    output = model(self.X[index])  # (b, K)
                    losses[index] = self.loss_fn(output, self.y[index]).double()
                    if self.classification:
                        correct[index] = output.argmax(dim=1) == self.y[index]
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(saved[name])
            model.train(was_training)
        return losses, correct


class EvalModeBatches(Callback):
    """The run's batch values as an eval-mode log would show them: the counterfactual for train mode.

    Each step's batch is scored again at the weights before its update, in eval mode (dropout off,
    batch norm on its running statistics), and averaged since the epoch began like Keras' running
    mean. At every evaluation it adds ``eval_mode_running_loss`` (and ``_acc``): that running mean
    through the step evaluated. Only `batchlab.fit` runs with one batch size (it needs the order);
    the run is left as it was (no gradient, no random draw, no buffer changes in eval mode).

    Args:
        dataset: the run's dataset.
        config: the run's config (its loss).
    """

    def __init__(self, dataset: data_lib.Dataset, config: TrainConfig):
        self.X, self.y = dataset.train
        self.classification = dataset.n_classes is not None
        self.loss_fn = loss_function(config.loss, dataset.task)
        self.orders: EpochOrders | None = None
        self.batches: list[torch.Tensor] = []
        self.running: dict[int, tuple[float, float]] = {}  # step -> running (loss, acc) through it
        self.mean = RunningMean()

    def on_run_start(self, event: RunStart) -> None:
        self.orders = _fit_orders(event)
        if self.orders is not None:
            self.X, self.y = event.data.train
            self.config, self.clock = event.config, event.clock
            self._score_next(event.model, event.clock)

    def on_step_end(self, event: StepEnd) -> None:
        if self.orders is not None:
            self._score_next(event.model, event.clock)

    def _score_next(self, model: torch.nn.Module, clock: Any) -> None:
        """Score the batch of update ``clock.step + 1`` at the current weights (those it is scored at)."""
        if clock.step >= clock.total_steps:
            return
        in_epoch = clock.step_in_epoch if clock.epoch >= 1 else 0
        if clock.epoch == 0 or in_epoch >= len(self.batches):  # the next update opens an epoch
            epoch = clock.epoch + 1
            self.batches = schedule.batch_indices(self.orders.order(epoch), clock.batch_size, self.config.drop_last)
            self.mean, in_epoch = RunningMean(), 0
        index = self.batches[in_epoch].to(self.X.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(self.X[index])
                loss = self.loss_fn(output, self.y[index]).mean().item()
                correct = int((output.argmax(dim=1) == self.y[index]).sum()) if self.classification else 0
        finally:
            model.train(was_training)
        self.running[clock.step + 1] = self.mean.update(loss, correct, index.numel())

    def on_evaluation(self, event: Evaluation) -> AddMetrics | None:
        if event.clock.step not in self.running:
            return None
        loss, acc = self.running[event.clock.step]
        return AddMetrics({"eval_mode_running_loss": loss, **({"eval_mode_running_acc": acc}
                                                               if self.classification else {})})


SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")  # Adam/AdamW, AMSGrad, RMSprop
BRANCH_EVAL_SAMPLES = 1024


class BoundaryBranches(Callback):
    """At every epoch boundary, branches of the run that separate the schedule and the optimizer's state.

    From the weights and optimizer state at the boundary, three copies make the new epoch's first
    ``window - 1`` updates on its real batches with the same dropout masks: with the scheduled
    learning rates, with the old epoch's last rate held, and with that rate held and the optimizer's
    second moment (Adam's ``exp_avg_sq`` and its step count, RMSprop's ``square_avg``) frozen at its
    boundary value. The eval-mode metric's mean over the window's weights, minus its value at the
    boundary, is each copy's progress; it adds to the boundary's evaluation row

    - ``schedule_{loss,acc}``: scheduled minus held: what the schedule's change does in the window;
    - ``optimizer_state_{loss,acc}``: held minus frozen: what the second moment's adaptation to the
      new epoch's batches does (Liu & Ma 2025 trace the sawtooth to it).

    A term that is zero by definition (the rate does not change in the window; an optimizer without a
    second moment) is recorded as 0 without a branch. Progress is measured on a fixed subset of
    `BRANCH_EVAL_SAMPLES` training samples (paired: the same samples for every copy). Only
    `batchlab.fit` runs (it needs the optimizer and the order); the run itself is not touched.

    Args:
        dataset: the run's dataset.
        config: the run's config.
        window: the jump's window in batches (`jump_window`).
    """

    def __init__(self, dataset: data_lib.Dataset, config: TrainConfig, window: int):
        self.classification = dataset.n_classes is not None
        self.loss_fn = loss_function(config.loss, dataset.task)
        self.mean_loss_fn = mean_loss_function(config.loss, dataset.task)
        self.window = window
        self.orders: EpochOrders | None = None

    def on_run_start(self, event: RunStart) -> None:
        from .optim import scaled_lr

        self.orders = _fit_orders(event) if event.optimizer is not None else None
        if self.orders is None:
            return
        self.optimizer, self.config, self.data = event.optimizer, event.config, event.data
        self.base_lr = scaled_lr(event.config, event.clock.batch_size)
        X, y = event.data.train
        pick = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(event.config.seed + 1))
        pick = pick[:BRANCH_EVAL_SAMPLES].to(X.device)
        self.subset = (X[pick], y[pick])
        return

    def on_evaluation(self, event: Evaluation) -> AddMetrics | None:
        clock = event.clock
        if self.orders is None or clock.epoch < 1 or clock.step_in_epoch != clock.steps_per_epoch:
            return None
        if clock.step >= clock.total_steps:
            return None  # the last epoch: no boundary after it
        from .optim import lr_at

        def lr(step):
            return lr_at(step, self.config, self.base_lr, clock.steps_per_epoch, clock.total_steps)

        updates = min(self.window, clock.total_steps - clock.step) - 1
        scheduled = [lr(clock.step + k) for k in range(updates)]
        held = [lr(clock.step - 1)] * updates
        adaptive = any(key in state for state in self.optimizer.state.values() for key in SECOND_MOMENTS)
        if scheduled == held and not adaptive:
            return AddMetrics({"jump_window": float(self.window),
                               **{f"{term}_{m}": 0.0 for term in ("schedule", "optimizer_state") for m in self._metrics()}})
        batches = schedule.batch_indices(self.orders.order(clock.epoch + 1), clock.batch_size,
                                         self.config.drop_last)[:updates]
        start = _branch_start(event.model, self.optimizer)
        seed = (self.config.seed * 1_000_003 + clock.step) % (2**63)
        held_progress = self._progress(start, batches, held, seed, frozen=False)
        with_schedule = (self._progress(start, batches, scheduled, seed, frozen=False) if scheduled != held
                         else held_progress)  # fmt: skip
        frozen = self._progress(start, batches, held, seed, frozen=True) if adaptive else held_progress
        values = {"jump_window": float(self.window)}
        for i, m in enumerate(self._metrics()):
            values[f"schedule_{m}"] = with_schedule[i] - held_progress[i]
            values[f"optimizer_state_{m}"] = held_progress[i] - frozen[i]
        return AddMetrics(values)

    def _metrics(self) -> tuple[str, ...]:
        return ("loss", "acc") if self.classification else ("loss",)

    def _progress(self, start: Any, batches: list[torch.Tensor], lrs: list[float], seed: int, frozen: bool
                  ) -> tuple[float, float]:
        """One branch's mean eval-mode (loss, acc) over the window's weights minus its value at the start."""
        from .critical_batch import branch
        from .loop import train_step
        from .optim import set_lr

        model, optimizer = branch(start, 1.0)
        X, y = self.data.train
        devices = [X.device] if X.device.type == "cuda" else []
        values = [evaluate(model, self.subset, self.loss_fn, self.classification)]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # the same dropout masks in every branch
            for index, lr in zip(batches, lrs):
                index = index.to(X.device)
                kept = _second_moments(optimizer) if frozen else None
                set_lr(optimizer, lr)
                train_step(model, optimizer, self.loss_fn, self.mean_loss_fn, X[index], y[index], self.classification)
                if kept is not None:
                    _restore(optimizer, kept)
                values.append(evaluate(model, self.subset, self.loss_fn, self.classification))
        loss, acc = np.mean(values, axis=0)
        return float(loss - values[0][0]), float(acc - values[0][1])


def _branch_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    from .critical_batch import (
        _branch_point,  # one owner of copying a model and its optimizer
    )

    return _branch_point(model, optimizer)


def _second_moments(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """Copies of each parameter's second-moment state and step count, to freeze them."""
    kept = {}
    for param, state in optimizer.state.items():
        if any(key in state for key in SECOND_MOMENTS):
            kept[id(param)] = {k: v.clone() for k, v in state.items() if k in (*SECOND_MOMENTS, "step")}
    return kept


def _restore(optimizer: torch.optim.Optimizer, kept: dict[int, dict[str, torch.Tensor]]) -> None:
    for param, state in optimizer.state.items():
        for key, value in kept.get(id(param), {}).items():
            state[key].copy_(value)


def explain_callbacks(dataset: data_lib.Dataset, config: TrainConfig, window: int | None = None) -> list[Callback]:
    """The callbacks that record everything the jump's terms need on a `batchlab.fit` run.

    Args:
        dataset: the run's dataset.
        config: the run's config (after `explain_config`).
        window: the jump's window in batches; default `jump_window` of the run.

    Returns:
        `TrainModePass`, `EvalModeBatches` and `BoundaryBranches`.
    """
    if window is None:
        batch_size = dataset.n_train if config.batch_size == "full" else min(config.batch_size, dataset.n_train)
        spe = schedule.steps_per_epoch(dataset.n_train, batch_size, config.drop_last)
        window = jump_window(spe, 1 if config.eval_every == "epoch" else config.eval_every)
    return [TrainModePass(dataset, config), EvalModeBatches(dataset, config), BoundaryBranches(dataset, config, window)]


def jump_window(steps_per_epoch: int, eval_every: int) -> int:
    """The batches of a new epoch the jump is read after: the first multiple of ``eval_every`` that
    reaches a tenth of an epoch (so the window ends on an evaluation point), at most the epoch."""
    tenth = max(1, math.ceil(steps_per_epoch / 10))
    return max(1, min(steps_per_epoch, eval_every * math.ceil(tenth / eval_every)))


# -- the numbers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boundary:
    """The numbers of one epoch boundary for one metric (``acc`` or ``loss``).

    Steps are the step table's: row ``s`` holds the batch value of update ``s``, computed at the
    weights after ``s - 1`` updates. ``step`` is the old epoch's last step; ``step + 1`` the new
    epoch's first.

    Attributes:
        epoch: the epoch that ends at this boundary.
        step: its last step.
        running_end: the running mean at ``step`` (what the log shows at the end of the epoch).
        running_start: the running mean at ``step + 1``: the new epoch's first batch value.
        running_jump: ``running_start - running_end``.
        true_end: the true training metric (full pass, eval mode) at ``step``, an evaluation point.
        true_start: the true metric at ``step + 1``, interpolated linearly in steps between the
            evaluation at ``step`` and the next one (``eval_every`` steps later at most).
        true_change: ``true_start - true_end``: how much the model changed across the boundary.
        typical_change: the true metric's median change per step inside the two epochs that meet
            here (over evaluation intervals that do not cross a boundary), the same number of steps
            as ``true_change`` spans; NaN when no such interval exists (batch gradient descent).
        lag: ``true_end - running_end``: how far behind the model the log is at the epoch end.
        true_epoch_mean: the true metric's mean over the epoch, at the weights each batch value was
            taken at (steps ``step - S`` to ``step - 1``, interpolated, weighted by batch size).
        running_minus_true_mean: ``running_end - true_epoch_mean``.
        train_mode_end: the train-mode full pass at ``step`` (NaN without `TrainModePass`).
        train_mode_epoch_mean: its mean over the epoch, like ``true_epoch_mean``.
        train_mode_part: ``true_end - train_mode_end``: the lag due to dropout/batch norm.
        averaging_part: ``train_mode_end - train_mode_epoch_mean``: the lag due to averaging an
            epoch during which the model improved.
        remainder_part: ``train_mode_epoch_mean - running_end``: the rest; the three parts add up to
            ``lag`` exactly. It holds the sampling noise of the epoch's batches, and a systematic
            part: each batch is scored just before the model trains on it (on samples last seen
            about an epoch ago), while a full pass also scores samples trained on moments ago.
        batch_noise: the spread of one batch value around the trend in the new epoch,
            std(successive differences) / sqrt(2): the noise in ``running_start``.
        window: the new epoch's batches the jump is read after (``w``).
        running_window: the running mean after them (step ``step + w``).
        jump: ``running_window - running_end``: the jump the terms below account for.
        averaging_term: ``true_end - true_epoch_mean``: the old epoch's mean trails the model.
        train_mode_term: the train-mode offset (train-mode pass minus eval-mode pass) averaged over
            the window's weights, minus the same over the old epoch's (NaN without `TrainModePass`).
        reexposure_term: the batches' excess over the train-mode curve because they are drawn from the
            samples not yet seen this epoch, window minus old epoch: at weights ``t`` a batch's
            expectation is the unseen samples' metric, ``f·(unseen - seen)`` away from the whole pass
            (``f``: the fraction of the epoch seen); NaN without the seen/unseen split.
        schedule_term: what the learning rate's change in the window does to the eval-mode metric's
            window mean (`BoundaryBranches`); 0 when the logged lr does not change; NaN otherwise.
        optimizer_state_term: what the second moment's adaptation in the window does
            (`BoundaryBranches`); NaN when the run did not record it.
        progress_term: the eval-mode metric's mean over the window's weights minus ``true_end``
            (the model's real change), less the schedule and optimizer-state terms.
        unexplained: ``jump`` minus every measured term: the draw of the batches (which samples,
            which dropout masks), and any term the run could not measure.
        unexplained_noise: its expected size from the batches' draw alone:
            ``batch_noise·sqrt(1/w + 1/steps_per_epoch)``.
        eval_mode_jump: the same jump in the run's eval-mode log (`EvalModeBatches`), else NaN.
        sawtooth: the per-batch values' jump at the boundary beyond their trend: mean of the new
            epoch's first quarter of batches minus the old epoch's last quarter, less the mean
            change across the middle of either epoch over the same distance (Liu & Ma 2025).
        sawtooth_noise: its standard error from the batches' draw, ``batch_noise·sqrt(3/q)``.
    """

    epoch: int
    step: int
    running_end: float
    running_start: float
    running_jump: float
    true_end: float
    true_start: float
    true_change: float
    typical_change: float
    lag: float
    true_epoch_mean: float
    running_minus_true_mean: float
    train_mode_end: float
    train_mode_epoch_mean: float
    train_mode_part: float
    averaging_part: float
    remainder_part: float
    batch_noise: float
    window: int = 1
    running_window: float = math.nan
    jump: float = math.nan
    averaging_term: float = math.nan
    train_mode_term: float = math.nan
    reexposure_term: float = math.nan
    schedule_term: float = math.nan
    optimizer_state_term: float = math.nan
    progress_term: float = math.nan
    unexplained: float = math.nan
    unexplained_noise: float = math.nan
    eval_mode_jump: float = math.nan
    sawtooth: float = math.nan
    sawtooth_noise: float = math.nan


TERMS = ("averaging_term", "train_mode_term", "reexposure_term", "schedule_term", "optimizer_state_term",
         "progress_term")
ARTIFACT_TERMS = ("averaging_term", "train_mode_term", "reexposure_term")  # the log, not the model
REAL_TERMS = ("schedule_term", "optimizer_state_term", "progress_term")  # the model changed


@dataclass(frozen=True)
class Counterfactual:
    """A run that differs from the explained one in one thing, trained to back a term.

    Attributes:
        name: a short name (``with replacement``, ``adam, beta2=0.95``, ...).
        change: what differs from the explained run, in words.
        backs: the term whose cause it removes or varies.
        jump: per metric, the mean jump over its boundaries (same window as the explained run).
        sawtooth: per metric, the mean per-batch sawtooth over its boundaries.
        sawtooth_noise: per metric, the standard error of that mean.
        profile: the batch loss minus its one-epoch moving average, by position in the epoch (10
            bins, mean over the epochs it covers): the sawtooth's shape, for the figure.
        seconds: its training time.
    """

    name: str
    change: str
    backs: str
    jump: dict[str, float]
    sawtooth: dict[str, float]
    sawtooth_noise: dict[str, float]
    profile: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class Explanation:
    """Why the running mean jumps at the epoch boundaries of one run, in numbers and in words.

    Attributes:
        metric: the metric the paragraph is about, ``acc`` or ``loss``.
        batch_size: the batch size of the first step.
        steps_per_epoch: steps in a full epoch.
        epochs: epochs in the step table.
        evals_per_epoch: the fewest evaluation points in a full epoch (its end included).
        batch_gd: one step per epoch (batch gradient descent): the running mean is the batch value.
        has_train_mode: the evaluations include the train-mode full pass.
        boundaries: per metric (``acc``, ``loss`` as the task allows), one `Boundary` per boundary.
        paragraph: the answer for this run, in words, with its numbers.
        window: the new epoch's batches the jump is read after.
        missing: each term this run's records cannot give, with what would record it.
        profile: the run's sawtooth shape (`Counterfactual.profile`).
        counterfactuals: the counterfactual runs trained with it (`counterfactual_runs`), if any.
    """

    metric: str
    batch_size: int
    steps_per_epoch: int
    epochs: int
    evals_per_epoch: int
    batch_gd: bool
    has_train_mode: bool
    boundaries: dict[str, tuple[Boundary, ...]]
    paragraph: str
    window: int = 1
    missing: dict[str, str] = field(default_factory=dict)
    profile: tuple[float, ...] = ()
    counterfactuals: tuple[Counterfactual, ...] = ()

    def table(self, metric: str | None = None) -> pd.DataFrame:
        """The boundaries of ``metric`` (default: the explained one) as a DataFrame, one row each."""
        return pd.DataFrame([asdict(b) for b in self.boundaries[metric or self.metric]])

    def to_dict(self) -> dict[str, Any]:
        """Every number and the paragraph, as plain values (NaN stays NaN)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("boundaries", "counterfactuals", "profile")}
        out["boundaries"] = {m: [asdict(b) for b in bs] for m, bs in self.boundaries.items()}
        out["profile"] = list(self.profile)
        out["counterfactuals"] = [{**asdict(c), "profile": list(c.profile)} for c in self.counterfactuals]
        return out

    def with_counterfactuals(self, runs: tuple[Counterfactual, ...]) -> Explanation:
        """This explanation with the counterfactual runs added, and its paragraph saying what they show."""
        result = replace(self, counterfactuals=tuple(runs))
        return replace(result, paragraph=explanation_paragraph(result))


def explain_run(run: Any, metric: str = "acc", window: int | None = None) -> Explanation:
    """`explain_tables` over a `Run` (in memory) or a `StoredRun` (from the store)."""
    return explain_tables(run.steps, run.evals, metric, source=run_source(run), window=window)


def run_source(run: Any) -> str:
    """What recorded a run, as the store's kinds name it: ``keras``, ``track`` (``bl.track`` and the
    Lightning callback), ``study-trial``, ``fit``, ... (a run in memory: from its config's type)."""
    from .tracking import TrackConfig

    kind = getattr(run, "kind", None)
    if isinstance(kind, str):
        return kind
    config = run.config
    framework = config.get("framework") if isinstance(config, dict) else getattr(config, "framework", None)
    return "keras" if framework == "keras" else "track" if isinstance(config, TrackConfig) else "fit"


def dense_evaluation_advice(source: str, steps_per_epoch: int | None = None) -> str:
    """How to record a run that explain can measure, in the terms of what recorded it.

    Args:
        source: what recorded the run (`run_source`).
        steps_per_epoch: the run's steps per epoch, to suggest an ``eval_every`` of about
            `DEFAULT_EVALS_PER_EPOCH` evaluations per epoch.
    """
    every = dense_eval_every(steps_per_epoch) if steps_per_epoch else "K"
    train = "eval_data={'train': (X, y)}"
    if source == "keras":
        return f"record it with the Keras BatchlabCallback(..., eval_every={every}, {train}) (docs/integrations.md)"
    if source == "track":
        return (f"record it with bl.track(..., eval_every={every}, {train}, loss_fn=...), or the Lightning "
                f"BatchlabCallback(..., eval_every={every}, {train}, loss_fn=...) (docs/integrations.md)")
    if source == "study-trial":
        return "a study evaluates its trials sparsely; train the trial's settings with `batchlab explain` instead"
    return f"run `batchlab explain`, or `batchlab fit --eval-every {every}` (with --eval-train, the default)"


def explain_tables(steps: pd.DataFrame, evals: pd.DataFrame, metric: str = "acc", *, source: str = "fit",
                   window: int | None = None) -> Explanation:
    """Measure the epoch-boundary jump of a run from its step and evaluation tables.

    Args:
        steps: one row per step with ``step, epoch, batch_size, batch_*, running_*``.
        evals: one row per evaluation with ``step`` and ``train_*`` (optionally ``train_mode_*``),
            at step 0, every epoch end and densely in between.
        metric: ``acc`` or ``loss``: the one the paragraph explains (both are measured).
        source: what recorded the run (`run_source`): an error's advice is given in its terms.
        window: the new epoch's batches the jump is read after; default: the window the run's
            `BoundaryBranches` recorded, else `jump_window` of its evaluation interval.

    Returns:
        An `Explanation`.

    Raises:
        DataError: tables without the columns or the evaluation points the numbers need.
        ConfigError: an unknown metric, or ``acc`` for a regression run.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use acc or loss")
    steps, evals = _check_tables(steps, evals, metric, source)
    per_epoch = steps.groupby("epoch")["step"].count()
    steps_per_epoch = int(per_epoch.max())
    full_epochs = [int(e) for e, n in per_epoch.items() if n == steps_per_epoch]
    metrics = [m for m in METRICS if f"running_{m}" in steps and f"train_{m}" in evals]
    if window is None:
        window = _recorded_window(evals, steps_per_epoch)
    elif not (isinstance(window, int) and 1 <= window):
        raise ConfigError(f"window must be a whole number of batches >= 1, got {window!r}")
    window = min(window, steps_per_epoch)
    boundaries = {m: tuple(_boundaries(steps, evals, m, steps_per_epoch, window)) for m in metrics}
    epoch_end_steps = steps.groupby("epoch")["step"].max()
    evals_per_epoch = min(
        int(((evals["step"] > epoch_end_steps[e] - steps_per_epoch) & (evals["step"] <= epoch_end_steps[e])).sum())
        for e in full_epochs
    )
    has_train_mode = all(f"train_mode_{m}" in evals and evals[f"train_mode_{m}"].notna().any() for m in metrics)
    result = Explanation(
        metric=metric,
        batch_size=int(steps["batch_size"].iloc[0]),
        steps_per_epoch=steps_per_epoch,
        epochs=int(steps["epoch"].max()),
        evals_per_epoch=evals_per_epoch,
        batch_gd=steps_per_epoch == 1,
        has_train_mode=has_train_mode,
        boundaries=boundaries,
        paragraph="",
        window=window,
        missing=missing_terms(steps, evals, metric, source),
        profile=sawtooth_profile(steps["batch_loss"].to_numpy(dtype=float), steps_per_epoch),
    )
    return replace(result, paragraph=explanation_paragraph(result))


def _recorded_window(evals: pd.DataFrame, steps_per_epoch: int) -> int:
    """The window `BoundaryBranches` recorded with the run, else `jump_window` of the median
    evaluation interval."""
    if "jump_window" in evals and evals["jump_window"].notna().any():
        return int(evals["jump_window"].dropna().iloc[0])
    intervals = np.diff(evals["step"].to_numpy())
    return jump_window(steps_per_epoch, max(1, int(np.median(intervals))) if len(intervals) else 1)


# What records each term, in the words of the error advice: the Python API and the command line.
_HOW = {
    "train_mode_term": "a train-mode full pass at the evaluations (batchlab.explain.TrainModePass on a "
                       "bl.fit run, which `batchlab explain` adds)",
    "reexposure_term": "the loss of the samples seen and not yet seen this epoch, which needs the run's sample "
                       "order (TrainModePass on a bl.fit run, which `batchlab explain` adds)",
    "schedule_term": "branches from the live model and optimizer at each boundary "
                     "(batchlab.explain.BoundaryBranches on a bl.fit run, which `batchlab explain` adds)",
    "optimizer_state_term": "branches from the live model and optimizer at each boundary "
                            "(batchlab.explain.BoundaryBranches on a bl.fit run, which `batchlab explain` adds)",
}


def missing_terms(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, source: str) -> dict[str, str]:
    """Each term the run's tables cannot give, with what would record it (for the output and docs)."""
    missing = {}
    columns = {"train_mode_term": f"train_mode_{metric}", "reexposure_term": f"train_mode_unseen_{metric}",
               "optimizer_state_term": f"optimizer_state_{metric}"}
    for term, column in columns.items():
        if column not in evals or evals[column].isna().all():
            missing[term] = _HOW[term]
    lr_changes = "lr" in steps and steps["lr"].nunique() > 1
    if lr_changes and (f"schedule_{metric}" not in evals or evals[f"schedule_{metric}"].isna().all()):
        missing["schedule_term"] = _HOW["schedule_term"]
    if source in ("keras", "track") and missing:
        missing = {k: v + f"; a {source} run cannot record it, so it stays in 'unexplained'"
                   for k, v in missing.items()}
    return missing


_NO_ACCURACY = {  # why a run of each source may have no accuracy
    "keras": "a regression task, or a model compiled without metrics=['accuracy']",
    "track": "a regression task, run.step without outputs and targets, or a Lightning training_step "
             "that returns no logits",
}


def _check_tables(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, source: str
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    if steps is None or steps.empty:
        raise DataError("the run has no steps to explain (it ended before its first update)")
    needed = {"step", "epoch", "batch_size", f"batch_{metric}", f"running_{metric}"}
    missing = sorted(needed - set(steps.columns))
    if metric == "acc" and missing == ["batch_acc", "running_acc"]:
        cause = _NO_ACCURACY.get(source, "a regression task")
        raise ConfigError(f"this run recorded no accuracy ({cause}); use --metric loss")
    if missing:
        raise DataError(f"the run's step table lacks {', '.join(missing)}; explain needs a run recorded by batchlab")
    steps = steps.sort_values("step").reset_index(drop=True)
    advice = dense_evaluation_advice(source, int(steps.groupby("epoch")["step"].count().max()))
    if evals is None or evals.empty or f"train_{metric}" not in evals or evals[f"train_{metric}"].isna().all():
        raise DataError(f"the run has no full-pass {metric} on the training set, which explain needs; {advice}")
    evals = evals[evals[f"train_{metric}"].notna()].sort_values("step").drop_duplicates("step", keep="last")
    ends = steps.groupby("epoch")["step"].max()
    starts = steps.groupby("epoch")["step"].min() - 1
    evaluated = set(evals["step"].astype(int))
    unbracketed = [int(e) for e in ends.index if int(ends[e]) not in evaluated or int(starts[e]) not in evaluated]
    if unbracketed:
        raise DataError(f"epoch {unbracketed[0]} has no evaluation at its start or end; explain needs one "
                        f"on the training set at every epoch end: {advice}")  # fmt: skip
    inside = evaluated - set(int(s) for s in ends) - {0}
    if not inside and int(steps.groupby("epoch")["step"].count().max()) > 1:
        raise DataError(f"the run has no evaluation inside its epochs; explain needs dense evaluation: {advice}")
    return steps, evals


def _boundaries(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, steps_per_epoch: int, window: int = 1
                ) -> list[Boundary]:
    eval_steps = evals["step"].to_numpy(dtype=float)
    true = evals[f"train_{metric}"].to_numpy(dtype=float)
    mode_column = f"train_mode_{metric}"
    train_mode = evals[mode_column].to_numpy(dtype=float) if mode_column in evals else np.full_like(true, np.nan)

    def true_at(step):  # the true curve between evaluation points: linear in steps
        return np.interp(step, eval_steps, true)

    def mode_at(step):
        return np.interp(step, eval_steps, train_mode)

    running = steps.set_index("step")[f"running_{metric}"]
    batch = steps.set_index("step")[f"batch_{metric}"]
    out = []
    epochs = sorted(int(e) for e in steps["epoch"].unique())
    for epoch, following in zip(epochs, epochs[1:]):
        rows = steps[steps["epoch"] == epoch]
        if len(rows) != steps_per_epoch:
            continue  # a partial epoch (max_steps) has no boundary after it
        end = int(rows["step"].max())
        if end + 1 not in running.index:
            continue
        # Batch value of row s was taken at the weights after s - 1 updates.
        weight_steps = rows["step"].to_numpy(dtype=float) - 1
        weights = rows["batch_size"].to_numpy(dtype=float)
        true_mean = float(np.average(true_at(weight_steps), weights=weights))
        mode_mean = float(np.average(mode_at(weight_steps), weights=weights))
        true_end, mode_end = float(true_at(end)), float(mode_at(end))
        true_start = float(true_at(end + 1))
        running_end, running_start = float(running[end]), float(running[end + 1])
        new_batches = batch[steps.loc[steps["epoch"] == following, "step"]].to_numpy(dtype=float)
        noise = float(np.std(np.diff(new_batches)) / math.sqrt(2)) if len(new_batches) > 2 else math.nan
        terms = _jump_terms(steps, evals, metric, (epoch, following), window, noise)
        out.append(Boundary(
            epoch=epoch,
            step=end,
            running_end=running_end,
            running_start=running_start,
            running_jump=running_start - running_end,
            true_end=true_end,
            true_start=true_start,
            true_change=true_start - true_end,
            typical_change=(_typical_change(eval_steps, true, steps, (epoch, following)) if steps_per_epoch > 1
                            else math.nan),  # batch gradient descent: no step inside an epoch
            lag=true_end - running_end,
            true_epoch_mean=true_mean,
            running_minus_true_mean=running_end - true_mean,
            train_mode_end=mode_end,
            train_mode_epoch_mean=mode_mean,
            train_mode_part=true_end - mode_end,
            averaging_part=mode_end - mode_mean,
            remainder_part=mode_mean - running_end,
            batch_noise=noise,
            **terms,
        ))  # fmt: skip
    return out


def _curve(evals: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """An evaluated column's points (steps, values) where it has a value, or None."""
    if column not in evals:
        return None
    present = evals[evals[column].notna()]
    if present.empty:
        return None
    return present["step"].to_numpy(dtype=float), present[column].to_numpy(dtype=float)


def _at(curve: tuple[np.ndarray, np.ndarray] | None, steps: np.ndarray) -> np.ndarray:
    """The curve between its points, linear in steps (NaN without the curve)."""
    if curve is None:
        return np.full(np.shape(steps), math.nan)
    return np.interp(steps, *curve)


def _jump_terms(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, epochs: tuple[int, int], window: int,
                noise: float) -> dict[str, float]:
    """The jump over the first ``window`` batches of ``epochs[1]`` and its terms (`Boundary`).

    Every batch value b is split at the weights it was taken at (step s - 1) as
    ``b = (b - U) + (U - T) + (T - E) + E``: U the expected batch value (the unseen samples' train-mode
    metric), T the train-mode pass, E the eval-mode pass. Averaged over the window and over the old
    epoch, the difference of each piece is a term; E's is averaging plus the model's real change.
    """
    old = steps[steps["epoch"] == epochs[0]]
    new = steps[steps["epoch"] == epochs[1]].iloc[:window]
    end = int(old["step"].max())
    true = _curve(evals, f"train_{metric}")
    mode = _curve(evals, f"train_mode_{metric}")

    def mean(rows, values):  # weighted like the running mean: by batch size
        return float(np.average(values, weights=rows["batch_size"].to_numpy(dtype=float)))

    def at(rows, curve):  # the curve at the weights each batch value was taken at
        return _at(curve, rows["step"].to_numpy(dtype=float) - 1)

    jump = float(new[f"running_{metric}"].iloc[-1] - old[f"running_{metric}"].iloc[-1])
    true_end = float(_at(true, end))
    averaging = true_end - mean(old, at(old, true))
    real_change = mean(new, at(new, true)) - true_end
    train_mode = (mean(new, at(new, mode) - at(new, true)) - mean(old, at(old, mode) - at(old, true))
                  if mode is not None else math.nan)  # fmt: skip
    reexposure = mean(new, _unseen_offset(steps, evals, metric, new)) - mean(old, _unseen_offset(steps, evals, metric, old))
    schedule = _branch_term(evals, f"schedule_{metric}", end)
    if math.isnan(schedule) and "lr" in steps:
        window_lrs = steps.loc[(steps["step"] >= end) & (steps["step"] < end + len(new)), "lr"]
        schedule = 0.0 if window_lrs.nunique() == 1 else math.nan  # the rate did not change: no effect
    optimizer_state = _branch_term(evals, f"optimizer_state_{metric}", end)
    progress = real_change - _or_zero(schedule) - _or_zero(optimizer_state)
    measured = [averaging, train_mode, reexposure, schedule, optimizer_state, progress]
    eval_mode = _curve(evals, f"eval_mode_running_{metric}")
    eval_mode_jump = math.nan
    if eval_mode is not None and {end, end + len(new)} <= set(eval_mode[0].astype(int)):
        eval_mode_jump = float(_at(eval_mode, end + len(new)) - _at(eval_mode, end))
    sawtooth, sawtooth_noise = _sawtooth(steps, f"batch_{metric}", epochs, noise)
    return {
        "window": len(new), "running_window": float(new[f"running_{metric}"].iloc[-1]), "jump": jump,
        "averaging_term": averaging, "train_mode_term": train_mode, "reexposure_term": reexposure,
        "schedule_term": schedule, "optimizer_state_term": optimizer_state, "progress_term": progress,
        "unexplained": jump - sum(_or_zero(t) for t in measured),
        "unexplained_noise": noise * math.sqrt(1 / len(new) + 1 / len(old)),
        "eval_mode_jump": eval_mode_jump, "sawtooth": sawtooth, "sawtooth_noise": sawtooth_noise,
    }  # fmt: skip


def _or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _branch_term(evals: pd.DataFrame, column: str, end: int) -> float:
    """A `BoundaryBranches` value recorded at the boundary's evaluation, or NaN."""
    if column not in evals:
        return math.nan
    row = evals.loc[evals["step"] == end, column]
    return float(row.iloc[0]) if len(row) and pd.notna(row.iloc[0]) else math.nan


def _unseen_offset(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, rows: pd.DataFrame) -> np.ndarray:
    """For each batch of ``rows`` (one epoch's), U - T at its weights: ``f·(unseen - seen)``.

    ``f`` is the fraction of the epoch's samples trained on before the batch; ``unseen - seen`` is
    measured at the epoch's evaluations where both sides have samples, linear in steps between them
    and held beyond them. NaN without the split.
    """
    seen, unseen = f"train_mode_seen_{metric}", f"train_mode_unseen_{metric}"
    if seen not in evals or unseen not in evals:
        return np.full(len(rows), math.nan)
    epoch = steps[steps["epoch"] == rows["epoch"].iloc[0]]
    first, last = int(epoch["step"].min()) - 1, int(epoch["step"].max())
    inside = evals[(evals["step"] > first) & (evals["step"] < last) & evals[seen].notna() & evals[unseen].notna()]
    if inside.empty:
        return np.full(len(rows), math.nan)
    gap = (inside["step"].to_numpy(dtype=float), (inside[unseen] - inside[seen]).to_numpy(dtype=float))
    start_samples = float(epoch["samples_seen"].iloc[0] - epoch["batch_size"].iloc[0])
    epoch_samples = float(epoch["batch_size"].sum())
    before = rows["samples_seen"].to_numpy(dtype=float) - rows["batch_size"].to_numpy(dtype=float) - start_samples
    return before / epoch_samples * _at(gap, rows["step"].to_numpy(dtype=float) - 1)


def _sawtooth(steps: pd.DataFrame, column: str, epochs: tuple[int, int], noise: float) -> tuple[float, float]:
    """The per-batch values' jump across the boundary beyond their trend, and its standard error.

    With q a quarter of an epoch: (mean of the new epoch's first q) - (mean of the old epoch's last
    q), less the mean change over the same distance across the middle of the old and of the new
    epoch. A trend that is linear (or quadratic, by the symmetry) in steps cancels; a sawtooth of
    height h (values rising by h through each epoch, dropping by h at its end) gives -h.
    """
    old = steps.loc[steps["epoch"] == epochs[0], column].to_numpy(dtype=float)
    new = steps.loc[steps["epoch"] == epochs[1], column].to_numpy(dtype=float)
    q = min(len(old), len(new)) // 4
    if q < 1:
        return math.nan, math.nan

    def middle_change(values):
        mid = len(values) // 2
        return values[mid:mid + q].mean() - values[mid - q:mid].mean()

    across = new[:q].mean() - old[-q:].mean()
    return float(across - (middle_change(old) + middle_change(new)) / 2), noise * math.sqrt(3 / q)


PROFILE_BINS = 10


def sawtooth_profile(batch_values: np.ndarray, steps_per_epoch: int, bins: int = PROFILE_BINS) -> tuple[float, ...]:
    """The batch values minus their centred one-epoch moving average, by position in the epoch.

    A moving average over exactly one epoch holds no epoch-periodic part, so the residual keeps the
    sawtooth and drops the trend. Averaged per position over every epoch the average covers, then in
    ``bins`` equal bins of the epoch. Empty with fewer than three epochs or fewer steps than bins.

    Args:
        batch_values: one value per step, full epochs from the first.
        steps_per_epoch: S.

    Returns:
        ``bins`` values, from the epoch's first batches to its last.
    """
    S = steps_per_epoch
    n_epochs = len(batch_values) // S
    if n_epochs < 3 or S < bins:
        return ()
    values = np.asarray(batch_values[:n_epochs * S], dtype=float)
    kernel = np.ones(S) / S
    trend = np.convolve(values, kernel, mode="valid")  # trend[i]: mean of values[i:i+S], centred at i + S/2
    centre = np.arange(len(trend)) + S // 2
    residual = values[centre] - trend
    position = centre % S
    per_position = np.array([residual[position == k].mean() for k in range(S)])
    edges = np.linspace(0, S, bins + 1).astype(int)
    return tuple(float(per_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:]))


def _typical_change(eval_steps: np.ndarray, true: np.ndarray, steps: pd.DataFrame, epochs: tuple[int, int]) -> float:
    """Median change per step of the true curve over evaluation intervals inside the given epochs.

    The interval that starts at the boundary between them is left out: it is the one
    ``true_change`` is measured on.
    """
    bounds = steps.groupby("epoch")["step"].agg(["min", "max"])
    boundary = int(bounds.at[epochs[0], "max"])
    slopes = []
    for epoch in epochs:
        first, last = int(bounds.at[epoch, "min"]) - 1, int(bounds.at[epoch, "max"])
        inside = (eval_steps >= first) & (eval_steps <= last)
        xs, ys = eval_steps[inside], true[inside]
        keep = xs[:-1] != boundary
        slopes.extend((np.diff(ys) / np.diff(xs))[keep])
    return float(np.median(slopes)) if slopes else math.nan


# -- counterfactual runs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One counterfactual: the explained run's config with one thing changed.

    Attributes:
        name: short name.
        change: what differs, in words.
        backs: the term it backs.
        config: the config it trains with.
        replacement: batches drawn with replacement (each sample uniformly, independently) instead of
            from a fresh permutation per epoch.
    """

    name: str
    change: str
    backs: str
    config: TrainConfig
    replacement: bool = False


def counterfactual_variants(config: TrainConfig) -> list[Variant]:
    """The counterfactual runs that back the terms for a run trained with ``config``.

    Sampling with replacement (re-exposure: no sample waits an epoch to be seen again); Adam against
    SGD and a second beta2 (the optimizer's state: Liu & Ma 2025 find the sawtooth with Adam, worse
    for a smaller beta2); a constant learning rate when the run has a schedule. The train-mode and averaging terms need no run (`EvalModeBatches`
    logs the same run in eval mode; averaging is arithmetic on its batch values).
    """
    flat = {"schedule": "constant", "warmup_steps": 0, "warmup_epochs": 0.0}
    variants = [Variant("with replacement", "batches drawn with replacement, no epoch order", "reexposure_term",
                        config, replacement=True)]
    if config.optimizer in ("adam", "adamw"):
        variants.append(Variant("sgd", f"SGD (lr 0.05, momentum 0.9) instead of {config.optimizer}",
                                "optimizer_state_term", config.replace(optimizer="sgd", lr=0.05, momentum=0.9)))
        adam = config
    else:
        adam = config.replace(optimizer="adam", lr=0.001, momentum=0.0, nesterov=False, betas=(0.9, 0.999))
        variants.append(Variant("adam", f"Adam (lr 0.001, betas 0.9, 0.999) instead of {config.optimizer}",
                                "optimizer_state_term", adam))
    beta2 = 0.95 if adam.betas[1] > 0.95 else 0.999
    variants.append(Variant(f"adam, beta2={beta2:g}", f"Adam with beta2 = {beta2:g}", "optimizer_state_term",
                            adam.replace(betas=(adam.betas[0], beta2))))
    if config.schedule != "constant" or config.warmup_steps or config.warmup_epochs:
        variants.append(Variant("constant lr", "the base learning rate throughout, no schedule or warm-up",
                                "schedule_term", config.replace(**flat)))
    return variants


def counterfactual_runs(initial_model: torch.nn.Module, dataset: data_lib.Dataset, config: TrainConfig,
                        window: int, variants: list[Variant] | None = None) -> tuple[Counterfactual, ...]:
    """Train each variant from the explained run's initial weights and measure its jump and sawtooth.

    Each trains as long as the run, with its seed (data order and dropout), without evaluations: the
    jump and the sawtooth are read off its batch values, as for the run.

    Args:
        initial_model: the model at the explained run's initial weights (copied, not trained).
        dataset: the run's dataset.
        config: the run's config.
        window: the explained run's jump window.
        variants: default `counterfactual_variants` of ``config``.

    Returns:
        One `Counterfactual` per variant.
    """
    out = []
    for variant in variants if variants is not None else counterfactual_variants(config):
        started = time.perf_counter()
        steps = train_variant(initial_model, dataset, variant.config, variant.replacement)
        jump, sawtooth, noise = variant_numbers(steps, window)
        out.append(Counterfactual(variant.name, variant.change, variant.backs, jump, sawtooth, noise,
                                  sawtooth_profile(steps["batch_loss"].to_numpy(), _steps_per_epoch(steps)),
                                  time.perf_counter() - started))  # fmt: skip
    return tuple(out)


def train_variant(initial_model: torch.nn.Module, dataset: data_lib.Dataset, config: TrainConfig,
                  replacement: bool = False) -> pd.DataFrame:
    """Train a copy of ``initial_model`` as `batchlab.fit` would (same step, schedule and seeds) and
    return its step table's batch and running values; with ``replacement`` each epoch's N samples are
    drawn uniformly with replacement instead of as a permutation."""
    from .loop import train_step
    from .optim import build_optimizer, lr_at, scaled_lr, set_lr

    model = copy.deepcopy(initial_model).train()
    device = next(model.parameters()).device
    X, y = (t.to(device) for t in dataset.train)
    n = X.shape[0]
    batch_size = n if config.batch_size == "full" else min(config.batch_size, n)
    per_epoch = schedule.steps_per_epoch(n, batch_size, config.drop_last)
    total = min(config.max_steps or math.inf, per_epoch * (config.epochs or math.inf))
    base_lr = scaled_lr(config, batch_size)
    optimizer = build_optimizer(model.parameters(), config, base_lr)
    loss_fn, mean_loss_fn = loss_function(config.loss, dataset.task), mean_loss_function(config.loss, dataset.task)
    classification = dataset.n_classes is not None
    generator = torch.Generator().manual_seed(config.seed)
    rows, outputs = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        epoch = 0
        while len(rows) < total:
            epoch += 1
            order = (torch.randint(n, (n,), generator=generator) if replacement
                     else schedule.epoch_order(n, generator, config.shuffle))  # fmt: skip
            for index in schedule.batch_indices(order.to(device), batch_size, config.drop_last):
                if len(rows) >= total:
                    break
                set_lr(optimizer, lr_at(len(rows), config, base_lr, per_epoch, int(total)))
                out = train_step(model, optimizer, loss_fn, mean_loss_fn, X[index], y[index], classification)
                rows.append((len(rows) + 1, epoch, index.numel()))
                outputs.append((out.loss, out.correct if classification else out.loss))
    losses = torch.stack([o[0] for o in outputs]).tolist()  # one read-back at the end
    corrects = torch.stack([o[1] for o in outputs]).tolist()
    return _step_table(rows, losses, corrects if classification else None)


def _step_table(rows: list[tuple[int, int, int]], losses: list[float], corrects: list[float] | None) -> pd.DataFrame:
    """Step rows as the core writes them (batch values, Keras' running mean reset per epoch)."""
    table, running, epoch, seen = [], RunningMean(), 0, 0
    for (step, row_epoch, size), loss, correct in zip(rows, losses, corrects or losses):
        if row_epoch != epoch:
            running, epoch = RunningMean(), row_epoch
        seen += size
        running_loss, running_acc = running.update(loss, int(correct) if corrects else 0, size)
        row = {"step": step, "epoch": row_epoch, "samples_seen": seen, "batch_size": size, "batch_loss": loss,
               "running_loss": running_loss}
        if corrects is not None:
            row.update(batch_acc=correct / size, running_acc=running_acc)
        table.append(row)
    return pd.DataFrame(table)


def _steps_per_epoch(steps: pd.DataFrame) -> int:
    return int(steps.groupby("epoch")["step"].count().max())


def variant_numbers(steps: pd.DataFrame, window: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """A step table's mean jump over ``window`` batches and mean sawtooth (with its standard error),
    per metric, over its boundaries between full epochs."""
    per_epoch = _steps_per_epoch(steps)
    counts = steps.groupby("epoch")["step"].count()
    epochs = [int(e) for e in counts.index if counts[e] == per_epoch]
    pairs = [(e, e + 1) for e in epochs if e + 1 in counts.index]
    jump, sawtooth, noise = {}, {}, {}
    for metric in [m for m in METRICS if f"running_{m}" in steps]:
        jumps, teeth, errors = [], [], []
        for old, new in pairs:
            old_rows, new_rows = steps[steps["epoch"] == old], steps[steps["epoch"] == new]
            jumps.append(new_rows[f"running_{metric}"].iloc[min(window, len(new_rows)) - 1]
                         - old_rows[f"running_{metric}"].iloc[-1])
            batch_noise = float(np.std(np.diff(new_rows[f"batch_{metric}"])) / math.sqrt(2))
            tooth, error = _sawtooth(steps, f"batch_{metric}", (old, new), batch_noise)
            teeth.append(tooth)
            errors.append(error)
        jump[metric] = float(np.mean(jumps)) if jumps else math.nan
        sawtooth[metric] = float(np.mean(teeth)) if teeth else math.nan
        noise[metric] = float(np.sqrt(np.sum(np.square(errors))) / len(errors)) if errors else math.nan
    return jump, sawtooth, noise


# -- the paragraph -----------------------------------------------------------------------------


def explanation_paragraph(result: Explanation) -> str:
    """The answer for this run in plain words; every number and every clause comes from ``result``."""
    metric = result.metric
    noun = "accuracy" if metric == "acc" else "loss"
    bounds = result.boundaries.get(metric, ())
    if result.batch_gd:
        return _batch_gd_paragraph(result, noun, bounds)
    if not bounds:
        return (f"This run has {result.epochs} epoch(s) and so no epoch boundary to explain; train for at least "
                "two epochs.")  # fmt: skip
    first = bounds[0]
    f = _fmt
    sentences = [
        f"At the end of epoch {first.epoch} (step {first.step}) the running mean of the training {noun}, "
        f"which Keras prints and stores in History, is {f(first.running_end)}; the first batch of epoch "
        f"{first.epoch + 1} brings it to {f(first.running_start)}, a jump of {f(first.running_jump, sign=True)}."
    ]
    sentences.append(_model_sentence(first, noun, result))
    sentences.append(_lag_sentence(first, noun, result))
    if result.has_train_mode:
        sentences.append(_parts_sentence(first, result.steps_per_epoch))
    noise = first.batch_noise
    if math.isfinite(noise) and abs(first.running_jump) < 2 * noise:
        sentences.append(
            f"Here the jump is within the noise of a single batch of {result.batch_size} samples "
            f"(±{f(noise)}), so it is smaller or larger at random from one boundary to the next; the lag "
            f"behind the true curve is the systematic part."
        )
    elif math.isfinite(noise):
        jumps = [b.running_jump for b in bounds]
        spread = (f"; here the jumps range from {f(min(jumps), sign=True)} to {f(max(jumps), sign=True)}"
                  if len(bounds) > 1 else "")  # fmt: skip
        sentences.append(
            f"The new epoch's first value is a single batch of {result.batch_size} samples, noisy by about "
            f"±{f(noise)}, so one jump can be much larger or smaller than another{spread}; on average they "
            f"follow the lag."
        )
    if len(bounds) > 1:
        jumps = np.array([b.running_jump for b in bounds])
        changes = np.array([b.true_change for b in bounds])
        lags = np.array([b.lag for b in bounds])
        sentences.append(
            f"Over all {len(bounds)} boundaries the running mean jumped by {f(jumps.mean(), sign=True)} on "
            f"average while the true {noun} changed by {f(changes.mean(), sign=True)}; the lag at the epoch "
            f"ends {_trend(lags)} from {f(lags[0], sign=True)} to {f(lags[-1], sign=True)}"
            + (", as the model learns more slowly." if _trend(lags) == "shrank" else ".")
        )
    sentences.append(_terms_sentence(bounds, noun, result))
    sentences.extend(_sawtooth_sentences(result))
    return " ".join(s for s in sentences if s)


TERM_WORDS = {"averaging_term": "averaging", "train_mode_term": "train mode", "reexposure_term": "re-exposure",
              "schedule_term": "the schedule", "optimizer_state_term": "the optimizer's state",
              "progress_term": "other progress"}


def _mean_terms(bounds: tuple[Boundary, ...]) -> dict[str, float]:
    """Each term's (and the jump's) mean over the boundaries; NaN where a term is not measured."""
    names = ("jump", *TERMS, "unexplained")
    return {n: float(np.mean([getattr(b, n) for b in bounds])) for n in names}


def _terms_sentence(bounds: tuple[Boundary, ...], noun: str, result: Explanation) -> str:
    """The jump over the window as the sum of its terms, averaged over the boundaries, in words."""
    f = _fmt
    mean = _mean_terms(bounds)
    w = result.window
    noise = float(np.sqrt(np.mean([b.unexplained_noise**2 for b in bounds])) / math.sqrt(len(bounds)))

    def listed(names):
        return ", ".join(f"{TERM_WORDS[n]} {f(mean[n], sign=True)}" for n in names if math.isfinite(mean[n]))

    text = (f"Read after the first {f'{w} batches' if w > 1 else 'batch'} of each new epoch, the running {noun} jumped "
            f"by {f(mean['jump'], sign=True)} on average. As a sum of measured terms: the log's artifacts "
            f"({listed(ARTIFACT_TERMS)}) and the model's real change ({listed(REAL_TERMS)}), with "
            f"{f(mean['unexplained'], sign=True)} unexplained")  # fmt: skip
    text += (f", within the draw of the batches (±{f(noise)})." if abs(mean["unexplained"]) <= 2 * noise
             else f", more than the draw of the batches (±{f(noise)}) explains.")  # fmt: skip
    artifact = sum(_or_zero(mean[n]) for n in ARTIFACT_TERMS)
    if math.isfinite(mean["jump"]) and abs(mean["jump"]) > 2 * noise:
        text += (f" So {f(artifact, sign=True)} of the jump is the log's artifact and "
                 f"{f(sum(_or_zero(mean[n]) for n in REAL_TERMS), sign=True)} the model's real change.")  # fmt: skip
    if result.missing:
        words = " and ".join(TERM_WORDS[n] for n in result.missing)
        text += f" This run did not record {words}: see `missing` for what would."
    return text


def _sawtooth_sentences(result: Explanation) -> list[str]:
    """The per-batch loss's sawtooth in this run and in the counterfactual runs."""
    f = _fmt
    bounds = result.boundaries.get("loss", ())
    teeth = [b.sawtooth for b in bounds if math.isfinite(b.sawtooth)]
    if not teeth:
        return []
    error = float(np.sqrt(np.sum([b.sawtooth_noise**2 for b in bounds])) / len(bounds))
    mean = float(np.mean(teeth))
    shape = ("drop at each epoch's start beyond their trend" if mean < -2 * error
             else "rise at each epoch's start beyond their trend" if mean > 2 * error
             else "show no sawtooth beyond the draw of the batches")  # fmt: skip
    cause = (": the per-batch sawtooth of Liu & Ma (2025), which re-exposure makes" if mean < -2 * error
             else "; Liu & Ma (2025) find a drop there with Adam, made by re-exposure")  # fmt: skip
    sentences = [f"The batch losses themselves {shape} ({f(mean, sign=True)} on average, ±{f(error)}){cause}."]
    if result.counterfactuals:
        others = "; ".join(f"{c.name}: {f(c.sawtooth['loss'], sign=True)} (±{f(c.sawtooth_noise['loss'])})"
                           for c in result.counterfactuals)
        sentences.append(f"Counterfactual runs, each as long as this one from the same initial weights and seed "
                         f"with one thing changed, give the sawtooth {others}.")  # fmt: skip
    return sentences


def _model_sentence(b: Boundary, noun: str, result: Explanation) -> str:
    f = _fmt
    text = (f"The model changed no more at the boundary than between any two steps: the true training {noun} "
            f"(a full pass over the training set in eval mode) went from {f(b.true_end)} to {f(b.true_start)} "
            f"over that step ({f(b.true_change, sign=True)})")  # fmt: skip
    if math.isfinite(b.typical_change):
        text += f", while inside an epoch it changes by {f(b.typical_change, sign=True)} per step (median)"
    if abs(b.running_jump) > 3 * abs(b.true_change):
        ratio = abs(b.running_jump) / abs(b.true_change) if b.true_change else math.inf
        text += (f"; the running mean's jump is {ratio:.0f} times that" if math.isfinite(ratio)
                 else "; the running mean's jump is all of the difference")  # fmt: skip
    else:
        text += "; here the running mean's jump is itself no larger than the model's change over one step"
    return text + "."


def _lag_sentence(b: Boundary, noun: str, result: Explanation) -> str:
    f = _fmt
    behind = "below" if b.lag > 0 else "above"
    text = (f"The running mean was behind because it averages the whole epoch: at the end of epoch {b.epoch} the "
            f"true {noun} was {f(b.true_end)}, and the running mean {f(abs(b.lag))} {behind} it.")  # fmt: skip
    if result.has_train_mode:
        text += (f" It is close to the mean over the epoch of the train-mode curve the batches sample "
                 f"({f(b.train_mode_epoch_mean)}, difference {f(b.running_end - b.train_mode_epoch_mean, sign=True)}); "
                 f"the eval-mode curve's epoch mean is {f(b.true_epoch_mean)} (difference "
                 f"{f(b.running_minus_true_mean, sign=True)}).")  # fmt: skip
    else:
        text += (f" It is close to the mean of the true curve over the epoch ({f(b.true_epoch_mean)}, "
                 f"difference {f(b.running_minus_true_mean, sign=True)}).")  # fmt: skip
    return text


def _parts_sentence(b: Boundary, steps_per_epoch: int) -> str:
    f = _fmt
    lag = abs(b.lag) if b.lag != 0 else math.nan
    mode_share, avg_share = abs(b.train_mode_part) / lag, abs(b.averaging_part) / lag
    text = (f"Of that gap of {f(b.lag, sign=True)}, {f(b.train_mode_part, sign=True)} is train mode (the batch "
            f"values are taken in train mode: dropout on, batch norm on batch statistics) and "
            f"{f(b.averaging_part, sign=True)} is averaging over an epoch in which the model improved.")  # fmt: skip
    if mode_share < 0.1:
        text += " Train mode plays almost no part here: dropout or batch norm, if any, barely moves this metric."
    elif mode_share > avg_share:
        text += (" Train mode is the larger part: batches scored in train mode would sit "
                 + ("below" if b.lag > 0 else "above") + " the eval-mode curve even without averaging.")  # fmt: skip
    else:
        text += " Averaging is the larger part."
    noise = b.batch_noise / math.sqrt(steps_per_epoch) if math.isfinite(b.batch_noise) else math.nan
    if not math.isfinite(noise) or abs(b.remainder_part) <= 2 * noise:
        text += (f" The remaining {f(b.remainder_part, sign=True)} is within the sampling noise of an epoch's "
                 f"batches (±{f(noise)}).")  # fmt: skip
    else:
        text += (f" The remaining {f(b.remainder_part, sign=True)} is more than the sampling noise of an epoch's "
                 f"batches (±{f(noise)}): each batch is scored just before the model trains on it, while a full "
                 f"pass also scores the samples it has just been trained on.")  # fmt: skip
    return text


def _batch_gd_paragraph(result: Explanation, noun: str, bounds: tuple[Boundary, ...]) -> str:
    f = _fmt
    text = (f"This run is batch gradient descent: every epoch is one step over all {result.batch_size} samples, so "
            f"the running mean is the batch value itself and there is no epoch-boundary jump to explain.")  # fmt: skip
    if bounds:
        changes = np.array([b.running_jump for b in bounds])
        true = np.array([b.true_change for b in bounds])
        text += (f" From one epoch to the next the logged {noun} changes by {f(changes.mean(), sign=True)} on "
                 f"average, one update's worth, and the true {noun} by {f(true.mean(), sign=True)}.")  # fmt: skip
        if result.has_train_mode:
            gaps = np.array([b.train_mode_part for b in bounds])
            text += (f" The logged value differs from the eval-mode full pass only by train mode and by being "
                     f"taken before the update (train-mode part {f(gaps.mean(), sign=True)} on average).")  # fmt: skip
    return text


def _trend(values: np.ndarray) -> str:
    first, last = abs(values[0]), abs(values[-1])
    if last < 0.8 * first:
        return "shrank"
    if last > 1.25 * first:
        return "grew"
    return "stayed about the same,"  # followed by "from a to b"


def _fmt(value: float, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    if abs(value) < 1e-12:  # a difference of equal numbers, up to float rounding
        value = 0.0
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    return text if abs(value) >= 0.0005 or value == 0 else (f"{value:+.1e}" if sign else f"{value:.1e}")
