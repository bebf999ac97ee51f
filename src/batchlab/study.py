"""The batch-size study: which batch size and learning rate, and for how many epochs.

A study trains a grid of batch sizes × learning rates × seeds to a target (``val_acc>=0.8``)
within a budget and measures, for every trial, the steps, epochs, samples and seconds it took
(Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network Training").
It runs in three separate steps:

* **plan** (`plan_study`, `next_groups`): the grid as *groups*, one batch size with its learning
  rates × seeds each; with ``lrs="auto"`` a batch size whose best learning rate lies at the edge
  of its grid gets an extra group with further learning rates. What remains to run is a pure
  function of the results stored so far, so a study killed at any moment and run again continues
  where it stopped and ends with the same results.
* **execute** (`train_group`): one group's trials, as vectorized replicas (`fit_replicas`) or one
  `fit` after another; `batchlab.executors` decides where groups run.
* **analyse** (`analyse`): a pure step over the trials' stored summaries: best learning rate per
  batch size (median steps-to-target over seeds), the fit S = S_min (1 + B_crit/B) of McCandlish
  et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.11) with B_crit's uncertainty,
  the regimes, the generalization gap (Keskar et al. 2017) and a recommendation.

Steps-to-target is the first *evaluated* step at which the target holds. Evaluation points are
spaced so that it is resolved to within ``resolution`` (5%) of its own value at any batch size
(`evaluation_steps`). With ``stop_at_target`` (the default) a trial ends at its target, so its
"final" metrics and its generalization gap are those at the target; trials that never reach it
report them at the end of their budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import StudyConfig, Target, TrainConfig
from .data import Dataset, steps_per_epoch
from .errors import ConfigError
from .events import Callback, Evaluation, RunEnd, RunStart, StepEnd, Stop

TRIAL_KIND = "study-trial"
STUDY_KIND = "study"
LR_GROUP = "lrs"  # a group searching learning rates at one batch size
NOISE_GROUP = "noise"  # one extra trial measuring the gradient noise scale at the best lr
# Below this share of seeds reaching the target, a learning rate has no median steps-to-target.
NO_GAIN_FACTOR = 1.25  # "no gain": no larger batch saves more than 1/1.25 = 20% of the steps
PERFECT_EFFICIENCY, NO_GAIN_EFFICIENCY = 0.8, 0.2  # -dlogS/dlogB thresholds of the regimes
STOP_AFTER_ENV = "BATCHLAB_STUDY_KILL_AFTER_GROUPS"  # kill -9 the process after storing this many groups


# ================================================================================================
# plan
# ================================================================================================


@dataclass(frozen=True)
class GroupPlan:
    """One unit of work: a batch size with some learning rates × seeds, trained together.

    ``kind`` is ``lrs`` (the learning-rate search) or ``noise`` (one trial at the best lr measuring
    the noise scale, where the vectorized replicas cannot). ``round`` 0 is the initial grid,
    1, 2, ... its extensions.
    """

    kind: str
    batch_size: int | str
    batch_size_value: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    round: int = 0

    @property
    def key(self) -> str:
        """A name that identifies the group within its study (stored with each of its trials)."""
        lrs = ",".join(f"{lr:g}" for lr in self.lrs)
        seeds = ",".join(map(str, self.seeds))
        return f"{self.kind}:B={self.batch_size}:lrs={lrs}:seeds={seeds}"

    @property
    def n_trials(self) -> int:
        return len(self.lrs) * len(self.seeds)


@dataclass(frozen=True)
class StudyPlan:
    """A study's config made concrete for its dataset: batch sizes, budget, evaluation points."""

    config: StudyConfig
    study_id: str
    dataset_name: str
    n_train: int
    batch_sizes: tuple[int | str, ...]
    target: Target
    vectorized: bool = True

    def value_of(self, batch_size: int | str) -> int:
        return self.n_train if batch_size == "full" else int(batch_size)

    def train_config(self, batch_size: int | str, lr: float, seed: int) -> TrainConfig:
        """The trial's TrainConfig: the study's ``train`` table with B, lr, seed and budget."""
        return self.config.train.replace(batch_size=batch_size, lr=lr, seed=seed, epochs=self.config.epochs,
                                         max_steps=self.config.max_steps, eval_every="epoch", lr_scaling="none")

    def total_steps(self, batch_size: int | str) -> int:
        """The budget in steps at this batch size (epochs and max_steps, whichever ends first)."""
        per_epoch = steps_per_epoch(self.n_train, self.value_of(batch_size), self.config.train.drop_last)
        budget = [self.config.epochs * per_epoch] if self.config.epochs else []
        if self.config.max_steps:
            budget.append(self.config.max_steps)
        return min(budget)


def study_id(config: StudyConfig) -> str:
    """The study's identity: a hash of everything in its config that can change its results."""
    canonical = json.dumps(config.model_dump(mode="json", exclude={"name"}), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resolve_batch_sizes(config: StudyConfig, n_train: int) -> tuple[int | str, ...]:
    """The study's batch sizes, smallest first: the given ones, or powers of two below N and ``full``.

    Raises:
        ConfigError: a batch size larger than the training set.
    """
    if config.batch_sizes is None:
        sizes: list[int | str] = [2**k for k in range(int(math.log2(n_train)) + 1) if 2**k < n_train]
        return (*sizes, "full")
    too_big = [b for b in config.batch_sizes if b != "full" and b > n_train]
    if too_big:
        raise ConfigError(f"batch size {too_big[0]} is larger than the training set ({n_train} samples); "
                          f"use batch sizes <= {n_train}, or 'full'")
    unique: dict[int, int | str] = {}
    for b in config.batch_sizes:
        unique.setdefault(n_train if b == "full" else int(b), b)  # B = N given twice: keep the first
    return tuple(unique[v] for v in sorted(unique))


def lr_from_index(config: StudyConfig, index: int) -> float:
    """The auto grid's learning rates lie on one lattice: reference_lr × factor^index (6 digits)."""
    return float(f"{config.reference_lr * config.lr_grid_factor ** index:.6g}")


def lr_centre_index(config: StudyConfig, batch_size_value: int) -> int:
    """The lattice index nearest the scaling rule's lr at B: linear (Goyal et al. 2017), sqrt (Hoffer et al. 2017)."""
    ratio = batch_size_value / config.reference_batch_size
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[config.lr_rule]
    return round(math.log(scale) / math.log(config.lr_grid_factor))


def _index_of(config: StudyConfig, lr: float) -> int:
    return round(math.log(lr / config.reference_lr) / math.log(config.lr_grid_factor))


def initial_groups(plan: StudyPlan) -> list[GroupPlan]:
    """Round 0: every batch size with its learning-rate grid and all seeds."""
    config, groups = plan.config, []
    for batch_size in plan.batch_sizes:
        value = plan.value_of(batch_size)
        if config.lrs == "auto":
            centre, n = lr_centre_index(config, value), config.lr_grid_size
            lrs = tuple(lr_from_index(config, k) for k in range(centre - (n - 1) // 2, centre + n // 2 + 1))
        else:
            lrs = tuple(sorted(config.lrs))
        groups.append(GroupPlan(LR_GROUP, batch_size, value, lrs, config.seed_list))
    return groups


def evaluation_steps(total_steps: int, resolution: float = 0.05) -> tuple[int, ...]:
    """Steps at which to evaluate so that steps-to-target is known to within ``resolution`` of itself.

    If the target first holds at step S* and the first evaluation at or after it is t_k (the
    previous one t_{k-1} < S*), the error t_k − S* is at most t_k − t_{k−1} − 1. Choosing
    t_k = max(t_{k−1} + 1, floor((t_{k−1} + 1)/(1 − r))) keeps it ≤ r·t_k: every step while steps
    are few (the first ~1/r steps), then geometrically spaced, ~ln(S)/r evaluations in all.

    Returns:
        Increasing steps from 1, the last one ``total_steps``.
    """
    steps, t = [], 1
    while t < total_steps:
        steps.append(t)
        t = max(t + 1, math.floor((t + 1) / (1 - resolution)))
    steps.append(total_steps)
    return tuple(steps)


def next_groups(plan: StudyPlan, trials: pd.DataFrame) -> list[GroupPlan]:
    """The groups still to run, given the trials stored so far: a pure function of them.

    Round 0 groups not yet run; for every batch size whose learning-rate search is complete, an
    extension when its best lr lies at the edge of the lrs tried (``lrs="auto"``, at most
    ``lr_extensions`` times), then, with vectorized replicas and ``noise_scale``, its noise group.
    """
    done = set(trials["group"]) if not trials.empty else set()
    pending = [g for g in initial_groups(plan) if g.key not in done]
    started = {g.batch_size for g in pending}
    for batch_size in plan.batch_sizes:
        if batch_size in started:
            continue
        at_b = trials[(trials["batch_size"] == batch_size) & (trials["kind"] == LR_GROUP)]
        extension = _extension(plan, batch_size, at_b)
        if extension is not None:
            if extension.key not in done:
                pending.append(extension)
            continue
        noise = _noise_group(plan, batch_size, at_b)
        if noise is not None and noise.key not in done:
            pending.append(noise)
    return pending


def _extension(plan: StudyPlan, batch_size: int | str, trials: pd.DataFrame) -> GroupPlan | None:
    """The next learning rates to try at this B when its best lies at the edge of those tried."""
    config = plan.config
    if config.lrs != "auto" or trials.empty:
        return None
    rounds = int(trials["round"].max())
    lrs = sorted(set(trials["lr"]))
    table = lr_table(trials)
    if rounds >= config.lr_extensions:
        return None
    best = _best_lr(table)
    top, bottom = lrs[-1], lrs[0]
    top_row, bottom_row = table.loc[table["lr"] == top].iloc[0], table.loc[table["lr"] == bottom].iloc[0]
    if best is not None:
        direction = +1 if best == top else -1 if best == bottom else 0
    elif table["diverged"].sum() > 0:  # nothing reached and some lrs diverge: the lrs are too large
        direction = -1 if bottom_row["reached"] == 0 else 0
    else:  # nothing reached, nothing diverged: the lrs are too small for the budget
        direction = +1 if top_row["reached"] == 0 else 0
    if direction == 0:
        return None
    n = max(1, config.lr_grid_size // 2)
    edge = _index_of(config, top if direction > 0 else bottom)
    new = tuple(sorted(lr_from_index(config, edge + direction * k) for k in range(1, n + 1)))
    return GroupPlan(LR_GROUP, batch_size, plan.value_of(batch_size), new, config.seed_list, rounds + 1)


def _noise_group(plan: StudyPlan, batch_size: int | str, trials: pd.DataFrame) -> GroupPlan | None:
    """One trial at the best lr (first seed) that measures noise_scale, where replicas cannot."""
    from .probes import PROBES

    if not (plan.vectorized and plan.config.noise_scale and "noise_scale" in PROBES) or trials.empty:
        return None
    if plan.value_of(batch_size) < 2:  # a batch of one sample has no spread to measure
        return None
    best = _best_lr(lr_table(trials))
    if best is None:
        return None
    return GroupPlan(NOISE_GROUP, batch_size, plan.value_of(batch_size), (best,), plan.config.seed_list[:1])


def plan_study(config: StudyConfig, dataset: Dataset, *, vectorized: bool = True) -> StudyPlan:
    """Check the study against its data and model before any training, and make it concrete.

    Raises:
        ConfigError, ModelError: a batch size larger than the data, a target metric the dataset
            cannot give, a model that does not fit the data.
    """
    from .loop import check_model, plan_run
    from .models import model_from_spec

    target = config.parsed_target
    split = target.metric.split("_")[0]
    if split == "val" and dataset.val is None or split == "test" and dataset.test is None:
        raise ConfigError(f"target {target} needs a {split} split but dataset {dataset.name!r} has none; "
                          "use a train_* target or give the dataset a validation split (val_fraction)")
    if target.metric.endswith("_acc") and dataset.n_classes is None:
        raise ConfigError(f"target {target} needs accuracy but {dataset.name!r} is a regression dataset; use a *_loss target")
    if split == "train" and not config.train.eval_train:
        raise ConfigError(f"target {target} needs train metrics; remove eval_train=false from the train table")
    batch_sizes = resolve_batch_sizes(config, dataset.n_train)
    plan = StudyPlan(config, study_id(config), dataset.name, dataset.n_train, batch_sizes, target, vectorized)
    for batch_size in (batch_sizes[0], batch_sizes[-1]):
        plan_run(dataset, plan.train_config(batch_size, config.reference_lr, 0))
    check_model(model_from_spec(config.model, dataset, seed=0).to(dataset.device), dataset)
    return plan


# ================================================================================================
# execute
# ================================================================================================


class GroupEvaluator:
    """Full-pass metrics of several same-shaped models at once, cached per step.

    The replicas of a vectorized pass reach each step together; the first to ask for step t's
    metrics gets every registered model evaluated in one ``vmap``, the others read the cache.
    ``splits`` limits the passes to what is needed (the target's split: a full pass over the
    training set at every check would cost more than the training itself).
    """

    def __init__(self, dataset: Dataset, config: TrainConfig, splits: Sequence[str] = ("train", "val", "test")):
        from .metrics import loss_function

        every = {"train": dataset.train if config.eval_train else None, "val": dataset.val, "test": dataset.test}
        self.splits = {name: every[name] for name in splits if every.get(name) is not None}
        self.loss_fn = loss_function(config.loss, dataset.task)
        self.classification = dataset.n_classes is not None
        self.eval_batch_size = config.eval_batch_size
        self.models: dict[int, torch.nn.Module] = {}
        self.cached_step: int | None = None
        self.cache: dict[int, dict[str, float]] = {}

    def register(self, key: int, model: torch.nn.Module) -> None:
        self.models[key] = model
        self.cached_step = None

    def unregister(self, key: int) -> None:
        self.models.pop(key, None)

    def metrics(self, key: int, step: int) -> dict[str, float]:
        if self.cached_step != step or key not in self.cache:
            self.cache = self._evaluate_all()
            self.cached_step = step
        return self.cache[key]

    def _evaluate_all(self) -> dict[int, dict[str, float]]:
        from .metrics import evaluate

        keys, models = list(self.models), list(self.models.values())
        if len(models) == 1:  # the loop's own evaluation, exactly
            out = {}
            for name, split in self.splits.items():
                loss, acc = evaluate(models[0], split, self.loss_fn, self.classification, self.eval_batch_size)
                out[f"{name}_loss"] = loss
                if self.classification:
                    out[f"{name}_acc"] = acc
            return {keys[0]: out}
        return dict(zip(keys, self._evaluate_stacked(models)))

    def _evaluate_stacked(self, models: list[torch.nn.Module]) -> list[dict[str, float]]:
        import copy

        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(models)  # each (R, *shape), copies
        skeleton = copy.deepcopy(models[0]).eval()
        forward = vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)), in_dims=(0, 0, None))
        results: list[dict[str, float]] = [{} for _ in models]
        with torch.no_grad():
            for name, (X, y) in self.splits.items():
                loss_sum = torch.zeros(len(models), dtype=torch.float64)
                correct = torch.zeros(len(models), dtype=torch.int64)
                for start in range(0, X.shape[0], self.eval_batch_size):
                    xb, yb = X[start:start + self.eval_batch_size], y[start:start + self.eval_batch_size]
                    output = forward(params, buffers, xb)  # (R, n, K)
                    n = xb.shape[0]
                    losses = self.loss_fn(output.reshape(len(models) * n, *output.shape[2:]),
                                          yb.repeat(len(models), *([1] * (yb.ndim - 1))))  # (R·n,)
                    loss_sum += losses.reshape(len(models), n).sum(dim=1, dtype=torch.float64).cpu()
                    if self.classification:
                        correct += (output.argmax(dim=2) == yb).sum(dim=1).cpu()
                for result, loss, right in zip(results, (loss_sum / X.shape[0]).tolist(), correct.tolist()):
                    result[f"{name}_loss"] = loss
                    if self.classification:
                        result[f"{name}_acc"] = right / X.shape[0]
        return results


class TargetWatcher(Callback):
    """Evaluates at the study's evaluation points, notes when the target first holds, and stops there.

    The loop evaluates at step 0 and every epoch end; this callback adds the evaluations of
    `evaluation_steps` in between, so steps-to-target has the study's resolution at any batch size.

    Args:
        target: the condition.
        schedule: the steps at which to evaluate (`evaluation_steps`).
        evaluator: the `GroupEvaluator` shared by the replicas of one pass.
        key: this replica's key in the evaluator.
        stop_at_target: ask the loop to stop when the target is reached.
    """

    def __init__(self, target: Target, schedule: Iterable[int], evaluator: GroupEvaluator, key: int,
                 stop_at_target: bool = True):
        self.target, self.schedule, self.evaluator, self.key = target, frozenset(schedule), evaluator, key
        self.stop_at_target = stop_at_target
        self.rows: list[dict[str, float]] = []  # this callback's own evaluations
        self.reached: dict[str, float] | None = None
        self.steps_per_epoch = 1

    def on_run_start(self, event: RunStart):
        self.steps_per_epoch = event.clock.steps_per_epoch
        self.evaluator.register(self.key, event.model)
        return None

    def on_step_end(self, event: StepEnd):
        clock = event.clock
        # Epoch ends (and the last step, always an epoch end) are evaluated by the loop itself.
        if clock.step not in self.schedule or clock.step_in_epoch == clock.steps_per_epoch or self.reached:
            return None
        if clock.step >= clock.total_steps:
            return None
        row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
               "seconds": event.row["seconds"], **self.evaluator.metrics(self.key, clock.step)}
        self.rows.append(row)
        return self._check(row)

    def on_evaluation(self, event: Evaluation):
        clock = event.clock
        row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
               "seconds": event.seconds, **event.metrics}
        return self._check(row)

    def on_run_end(self, event: RunEnd):
        self.evaluator.unregister(self.key)
        return None

    def _check(self, row: dict[str, float]):
        if self.reached is None and self.target.met(row):
            self.reached = row
            if self.stop_at_target:
                return Stop(f"target {self.target} reached at step {row['step']}")
        return None


@dataclass
class TrialRecord:
    """One trained trial as the store keeps it: its summary and its three tables as rows."""

    group: GroupPlan
    config: TrainConfig
    summary: dict[str, Any]
    status: str  # the loop's: finished, stopped, diverged
    message: str | None
    steps: list[dict] = field(repr=False)
    evals: list[dict] = field(repr=False)
    epochs: list[dict] = field(repr=False)
    clock: dict[str, int] = field(default_factory=dict)
    started_at: str = ""
    ended_at: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def train_group(plan: StudyPlan, group: GroupPlan, dataset: Dataset, *, vectorized: bool | None = None) -> list[TrialRecord]:
    """Train every trial of one group: its learning rates × seeds at its batch size.

    With ``vectorized`` (default: the plan's choice) the lr search runs as one `fit_replicas` pass,
    each replica stopping alone at its target; otherwise (and for the noise group, whose probe the
    replicas lack) one `fit` after another.

    Returns:
        One `TrialRecord` per (lr, seed), lrs outer, seeds inner.
    """
    from .loop import fit
    from .models import model_from_spec
    from .probes import PROBES

    vectorized = plan.vectorized if vectorized is None else vectorized
    configs = [plan.train_config(group.batch_size, lr, seed) for lr in group.lrs for seed in group.seeds]
    schedule = evaluation_steps(plan.total_steps(group.batch_size), plan.config.resolution)
    target, stop = plan.target, plan.config.stop_at_target
    wants_noise = plan.config.noise_scale and "noise_scale" in PROBES
    # Target checks need the target's split only; the loop's own evaluations (step 0, epoch ends,
    # the step a trial stops at) are full, so the gap at the target is measured there.
    evaluator = GroupEvaluator(dataset, configs[0], splits=(target.metric.split("_")[0],))
    watchers = [TargetWatcher(target, schedule, evaluator, i, stop) for i in range(len(configs))]
    started = _now()
    if vectorized and group.kind == LR_GROUP and len(configs) > 1:
        from .ensemble import fit_replicas

        runs = list(fit_replicas(lambda seed: model_from_spec(plan.config.model, dataset, seed=seed), dataset,
                                 configs, callbacks=lambda i, config: [watchers[i]], progress=False))
    else:
        probes = ["noise_scale"] if wants_noise and (group.kind == NOISE_GROUP or not vectorized) else []
        runs = [fit(model_from_spec(plan.config.model, dataset, seed=c.seed), dataset, c, probes=probes,
                    callbacks=[w], progress=False) for c, w in zip(configs, watchers)]
    ended = _now()
    return [_record(plan, group, run, watcher, started, ended) for run, watcher in zip(runs, watchers)]


def _record(plan: StudyPlan, group: GroupPlan, run, watcher: TargetWatcher, started: str, ended: str) -> TrialRecord:
    loop_evals = {row["step"]: row for row in run.eval_rows}
    extra = [row for row in watcher.rows if row["step"] not in loop_evals]
    evals = sorted([*run.eval_rows, *extra], key=lambda row: row["step"])
    clock = run.clock
    summary = trial_summary(plan, group, run.config, run.status, evals, run.step_rows, watcher.reached,
                            clock.steps_per_epoch, run.seconds)
    return TrialRecord(group, run.config, summary, run.status, run.message, list(run.step_rows), evals,
                       list(run.epoch_rows),
                       {"n_train": clock.n_train, "batch_size": clock.batch_size, "steps_per_epoch": clock.steps_per_epoch,
                        "total_steps": clock.total_steps, "epochs": clock.epochs}, started, ended)


def _gap(row: dict[str, float]) -> float:
    """Generalization gap: train − val accuracy (Keskar et al. 2017), or val − train loss for regression."""
    if "train_acc" in row and "val_acc" in row:
        return row["train_acc"] - row["val_acc"]
    if "train_loss" in row and "val_loss" in row:
        return row["val_loss"] - row["train_loss"]
    return math.nan


def _last_measured(step_rows: Sequence[dict], column: str, up_to: float) -> float:
    for row in reversed(step_rows):
        if row["step"] <= up_to and column in row and math.isfinite(row[column]):
            return float(row[column])
    return math.nan


def trial_summary(plan: StudyPlan, group: GroupPlan, config: TrainConfig, loop_status: str, evals: list[dict],
                  step_rows: Sequence[dict], reached: dict | None, steps_per_epoch: int, seconds: float) -> dict[str, Any]:
    """The numbers of one trial the analysis reads (and nothing else): a flat dict of plain values."""
    last = evals[-1] if evals else {}
    status = "reached" if reached else "diverged" if loop_status == "diverged" else "not_reached"
    steps_trained = int(step_rows[-1]["step"]) if step_rows else 0
    val = "val_acc" if any("val_acc" in e for e in evals) else "val_loss"
    values = [e[val] for e in evals if val in e and math.isfinite(e[val])]
    best_val = (max(values) if val.endswith("acc") else min(values)) if values else math.nan
    noise_at = reached["step"] if reached else steps_trained
    out: dict[str, Any] = {
        "group": group.key, "kind": group.kind, "round": group.round,
        "batch_size": group.batch_size, "batch_size_value": group.batch_size_value,
        "lr": config.lr, "seed": config.seed, "status": status, "loop_status": loop_status,
        "steps_to_target": reached["step"] if reached else math.nan,
        "epochs_to_target": reached["step"] / steps_per_epoch if reached else math.nan,
        "samples_to_target": reached["samples_seen"] if reached else math.nan,
        "seconds_to_target": reached["seconds"] if reached else math.nan,
        "steps": steps_trained, "epochs": steps_trained / steps_per_epoch, "seconds": seconds,
        "target_metric_at_end": last.get(plan.target.metric, math.nan),
        f"best_{val}": best_val,
        "gen_gap": _gap(last),
        "gen_gap_at_target": _gap(next(e for e in evals if e["step"] == reached["step"])) if reached else math.nan,
        "noise_scale": _last_measured(step_rows, "noise_scale", noise_at),
    }
    for metric in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        if metric in last:
            out[f"final_{metric}"] = last[metric]
    return out


# ================================================================================================
# analyse (pure: stored trial summaries in, tables and numbers out)
# ================================================================================================


def trials_table(summaries: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The trial summaries as a table; JSON nulls (stored NaN) back to NaN."""
    rows = [{k: (math.nan if v is None else v) for k, v in s.items()} for s in summaries]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["group", "kind", "round", "batch_size", "batch_size_value", "lr", "seed", "status"])
    return table.sort_values(["batch_size_value", "kind", "lr", "seed"], kind="stable").reset_index(drop=True)


def _median_steps(values: pd.Series) -> float:
    """Median over seeds with not-reached as +inf: finite only when at least half the seeds reached."""
    return float(np.median(values.fillna(np.inf).to_numpy(dtype=float)))


def lr_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per learning rate of a batch size's lr search: median steps over seeds, counts."""
    rows = []
    for lr, at_lr in trials.groupby("lr", sort=True):
        reached = at_lr["steps_to_target"].dropna()
        rows.append({"lr": float(lr), "trials": len(at_lr), "reached": int((at_lr["status"] == "reached").sum()),
                     "diverged": int((at_lr["status"] == "diverged").sum()),
                     "median_steps": _median_steps(at_lr["steps_to_target"]),
                     "mean_reached_steps": float(reached.mean()) if len(reached) else math.inf})  # fmt: skip
    return pd.DataFrame(rows)


def _best_lr(table: pd.DataFrame) -> float | None:
    """Fewest median steps; ties broken by the mean over reached seeds, then the smaller lr."""
    finite = table[np.isfinite(table["median_steps"])]
    if finite.empty:
        return None
    ranked = finite.sort_values(["median_steps", "mean_reached_steps", "lr"], kind="stable")
    return float(ranked.iloc[0]["lr"])


@dataclass(frozen=True)
class ScalingFit:
    """S = S_min (1 + B_crit/B) fitted to the steps-to-target curve (McCandlish et al. 2018, eq. 2.11).

    Since E = S·B, the same two numbers give E = E_min (1 + B/B_crit) with E_min = S_min·B_crit
    (eq. 2.12); the ``*_err`` are one standard error from the fit's covariance. ``b_simple`` is
    the gradient noise scale measured near the target (median over batch sizes), for comparison:
    the paper predicts B_crit ≈ B_noise, with B_simple a proxy for B_noise.
    """

    s_min: float = math.nan
    s_min_err: float = math.nan
    e_min: float = math.nan
    e_min_err: float = math.nan
    b_crit: float = math.nan
    b_crit_err: float = math.nan
    b_simple: float = math.nan
    n_points: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.b_crit)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def fit_scaling(batch_sizes: Sequence[float], steps: Sequence[float], b_simple: float = math.nan) -> ScalingFit:
    """Fit S = S_min + E_min/B (i.e. S_min (1 + B_crit/B)) by least squares on log S.

    Log residuals weigh every batch size alike (S spans orders of magnitude). The parameters are
    log S_min and log E_min, so both stay positive; B_crit = E_min/S_min and its standard error
    follows from the covariance by the delta method.

    Args:
        batch_sizes: B of each point (``full`` as N).
        steps: steps-to-target at each B; non-finite points are left out.
        b_simple: the measured noise scale, carried into the result.

    Returns:
        A `ScalingFit`; NaN with a ``message`` when fewer than 3 points reached the target.
    """
    from scipy.optimize import curve_fit

    B, S = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    keep = np.isfinite(S) & (S > 0) & np.isfinite(B)
    B, S = B[keep], S[keep]
    if len(B) < 3:
        return ScalingFit(b_simple=b_simple, n_points=len(B),
                          message=f"{len(B)} batch sizes reached the target; the fit needs at least 3")

    def model(b, log_s_min, log_e_min):
        return np.log(np.exp(log_s_min) + np.exp(log_e_min) / b)

    start = (math.log(S.min()), math.log(max((S * B).min(), 1e-12)))
    try:
        params, cov = curve_fit(model, B, np.log(S), p0=start, bounds=([-50, -50], [50, 50]))
    except (RuntimeError, ValueError) as error:
        return ScalingFit(b_simple=b_simple, n_points=len(B), message=f"the fit did not converge: {error}")
    log_s, log_e = params
    s_min, e_min = math.exp(log_s), math.exp(log_e)
    b_crit = e_min / s_min
    var_log_b = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    err = lambda value, var: value * math.sqrt(var) if np.isfinite(var) and var >= 0 else math.nan  # noqa: E731
    return ScalingFit(s_min, err(s_min, cov[0, 0]), e_min, err(e_min, cov[1, 1]), b_crit, err(b_crit, var_log_b),
                      b_simple, len(B))


def _regime(efficiency: float) -> str:
    if not math.isfinite(efficiency):
        return ""
    if efficiency >= PERFECT_EFFICIENCY:
        return "perfect scaling"
    if efficiency <= NO_GAIN_EFFICIENCY:
        return "no gain"
    return "diminishing returns"


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per batch size: the best lr and what it took to reach the target (median, spread).

    The best lr has the fewest median steps-to-target over seeds (not reached counts as never);
    the ``*_lo``/``*_hi`` columns are the smallest and largest value over the seeds that reached
    it at that lr. ``gen_gap`` is the median over those seeds of train − val accuracy at the end
    of the trial (at the target with ``stop_at_target``). ``noise_scale`` is B_simple at the
    target (last measurement before it). ``scaling_efficiency`` is −Δlog S/Δlog B from the
    previous batch size: 1 when doubling B halves the steps, 0 when it saves none.
    """
    search = trials[trials["kind"] == LR_GROUP]
    noise = trials[trials["kind"] == NOISE_GROUP] if "kind" in trials else trials.iloc[0:0]
    rows = []
    for value, at_b in search.groupby("batch_size_value", sort=True):
        table = lr_table(at_b)
        best = _best_lr(table)
        lrs = sorted(set(at_b["lr"]))
        row: dict[str, Any] = {"batch_size": at_b["batch_size"].iloc[0], "batch_size_value": int(value),
                               "best_lr": best if best is not None else math.nan, "lrs_tried": len(lrs),
                               "lr_at_edge": best is not None and len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                               "diverged": int((at_b["status"] == "diverged").sum()), "trials": len(at_b)}  # fmt: skip
        chosen = at_b[at_b["lr"] == best] if best is not None else at_b.iloc[0:0]
        row["reached"] = f"{int((chosen['status'] == 'reached').sum())}/{len(chosen)}" if best is not None else f"0/{len(at_b)}"
        for quantity in ("steps", "epochs", "samples", "seconds"):
            column = chosen[f"{quantity}_to_target"] if best is not None else pd.Series(dtype=float)
            median = _median_steps(column) if len(column) else math.inf
            row[f"{quantity}_to_target"] = median if math.isfinite(median) else math.nan
            row[f"{quantity}_lo"] = float(column.min()) if column.notna().any() else math.nan
            row[f"{quantity}_hi"] = float(column.max()) if column.notna().any() else math.nan
        gaps = chosen["gen_gap"].dropna() if best is not None else pd.Series(dtype=float)
        row["gen_gap"] = float(gaps.median()) if len(gaps) else math.nan
        row["gen_gap_lo"] = float(gaps.min()) if len(gaps) else math.nan
        row["gen_gap_hi"] = float(gaps.max()) if len(gaps) else math.nan
        measured = noise[noise["batch_size_value"] == value]["noise_scale"] if len(noise) else chosen["noise_scale"]
        measured = measured.dropna() if "noise_scale" in trials else pd.Series(dtype=float)
        row["noise_scale"] = float(measured.median()) if len(measured) else math.nan
        for metric in ("final_val_acc", "final_val_loss"):
            if metric in chosen and chosen[metric].notna().any():
                row[metric] = float(chosen[metric].median())
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    logs_b, logs_s = np.log(summary["batch_size_value"].to_numpy(float)), np.log(summary["steps_to_target"].to_numpy(float))
    efficiency = [math.nan] + [float(-(logs_s[i] - logs_s[i - 1]) / (logs_b[i] - logs_b[i - 1]))
                               for i in range(1, len(summary))]
    summary["scaling_efficiency"] = efficiency
    return summary


def mark_regimes(summary: pd.DataFrame, fit: ScalingFit) -> pd.DataFrame:
    """Add ``regime``: perfect scaling, diminishing returns or no gain.

    From the fit, the local efficiency −dlog S/dlog B is B_crit/(B + B_crit): ≥ 0.8 (B ≤ B_crit/4)
    is perfect scaling, ≤ 0.2 (B ≥ 4 B_crit) no gain (Shallue et al. 2019's three regimes).
    Without a fit, the measured ``scaling_efficiency`` decides.
    """
    summary = summary.copy()
    if summary.empty:
        return summary
    if fit.ok:
        b = summary["batch_size_value"].to_numpy(float)
        efficiency = fit.b_crit / (b + fit.b_crit)
    else:
        efficiency = summary["scaling_efficiency"].to_numpy(float)
    regimes = [_regime(float(e)) for e in efficiency]
    summary["regime"] = [r if math.isfinite(s) else "" for r, s in zip(regimes, summary["steps_to_target"])]
    return summary


@dataclass(frozen=True)
class Recommendation:
    """A batch size and learning rate to use, the numbers behind them, and the sentence that says so.

    The choice balances steps against samples: among the batch sizes that reached the target, the
    one with the smallest product (S/S_min)·(E/E_min) on the fitted curve, i.e. the one nearest
    B_crit, where both are 2× their minimum (McCandlish et al. 2018); without a fit, the smallest
    product of the measured steps and samples relative to the fewest any batch size needed. The
    ratios quoted are measured ones.
    """

    text: str
    batch_size: int | str | None = None
    lr: float = math.nan
    steps: float = math.nan
    epochs: float = math.nan
    samples: float = math.nan
    seconds: float = math.nan
    steps_ratio: float = math.nan
    samples_ratio: float = math.nan
    no_gain_above: int | str | None = None
    fastest_batch_size: int | str | None = None
    fastest_seconds: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def recommend(summary: pd.DataFrame, fit: ScalingFit, target: str) -> Recommendation:
    """The recommendation (see `Recommendation`) from the summary and the fit."""
    reached = summary[summary["steps_to_target"].notna()] if not summary.empty else summary
    if reached.empty:
        return Recommendation(f"no batch size reached {target} within the budget; raise the budget "
                              "(epochs, max_steps), widen the learning rates or ease the target")
    s_min, e_min = reached["steps_to_target"].min(), reached["samples_to_target"].min()
    if fit.ok:  # the fitted trade-off is smoother than single measurements: pick the B nearest B_crit
        b = reached["batch_size_value"].astype(float)
        cost = (1 + fit.b_crit / b) * (1 + b / fit.b_crit)
    else:
        cost = (reached["steps_to_target"] / s_min) * (reached["samples_to_target"] / e_min)
    best = reached.loc[cost.idxmin()]
    steps = reached["steps_to_target"].to_numpy(float)
    no_gain = None
    for i in range(len(reached)):
        if all(steps[j] >= steps[i] / NO_GAIN_FACTOR for j in range(i + 1, len(reached))):
            no_gain = reached["batch_size"].iloc[i]
            break
    fastest = reached.loc[reached["seconds_to_target"].idxmin()] if reached["seconds_to_target"].notna().any() else None
    b = best["batch_size"]
    text = (f"B = {b}, lr = {best['best_lr']:.3g}: reaches {target} in {_fmt(best['steps_to_target'])} steps "
            f"({best['epochs_to_target']:.3g} epochs, {_fmt(best['samples_to_target'])} samples), "
            f"{best['steps_to_target'] / s_min:.1f}× the minimum steps and "
            f"{best['samples_to_target'] / e_min:.1f}× the minimum samples")
    if no_gain is not None and no_gain != reached["batch_size"].iloc[-1]:
        text += f"; batches above ~{no_gain} buy no fewer steps"
    elif len(reached) > 1:
        text += f"; even the largest batch ({reached['batch_size'].iloc[-1]}) still saves steps"
    if fit.ok:
        text += (f". Critical batch size B_crit = {_fmt(fit.b_crit)} ± {_fmt(fit.b_crit_err)} "
                 f"(S_min = {_fmt(fit.s_min)} steps, E_min = {_fmt(fit.e_min)} samples)")
    if math.isfinite(fit.b_simple):
        text += f"; noise scale B_simple ≈ {_fmt(fit.b_simple)} near the target"
    if fastest is not None:
        text += f". Fastest here: B = {fastest['batch_size']} ({fastest['seconds_to_target']:.3g} s of training)"
    return Recommendation(
        text=text + ".", batch_size=_plain(b), lr=float(best["best_lr"]), steps=float(best["steps_to_target"]),
        epochs=float(best["epochs_to_target"]), samples=float(best["samples_to_target"]),
        seconds=float(best["seconds_to_target"]), steps_ratio=float(best["steps_to_target"] / s_min),
        samples_ratio=float(best["samples_to_target"] / e_min), no_gain_above=_plain(no_gain),
        fastest_batch_size=_plain(fastest["batch_size"]) if fastest is not None else None,
        fastest_seconds=float(fastest["seconds_to_target"]) if fastest is not None else math.nan,
    )


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class Analysis:
    summary: pd.DataFrame
    fit: ScalingFit
    recommendation: Recommendation


def analyse(trials: pd.DataFrame, target: str) -> Analysis:
    """Summary, fit, regimes and recommendation from the trials' summaries alone."""
    summary = summarize(trials)
    if summary.empty:
        return Analysis(summary, ScalingFit(message="no trials"), recommend(summary, ScalingFit(), target))
    measured = summary.loc[summary["batch_size_value"] >= 2, "noise_scale"].dropna()
    fit = fit_scaling(summary["batch_size_value"], summary["steps_to_target"],
                      float(measured.median()) if len(measured) else math.nan)
    summary = mark_regimes(summary, fit)
    return Analysis(summary, fit, recommend(summary, fit, target))


# ================================================================================================
# run: plan -> execute (stored group by group) -> analyse
# ================================================================================================


@dataclass
class Study:
    """The result of `run_study`.

    Attributes:
        summary: one row per batch size (`summarize`, plus ``regime``).
        trials: one row per trial (`trial_summary`).
        fit: the `ScalingFit` (S_min, E_min, B_crit ± err, B_simple).
        recommendation: a `Recommendation` (``.text`` and its numbers).
        group_id: the study's group in the store (None without a store).
        groups_run, groups_resumed: groups trained by this call, and found already stored.
    """

    config: StudyConfig
    plan: StudyPlan
    summary: pd.DataFrame
    trials: pd.DataFrame
    fit: ScalingFit
    recommendation: Recommendation
    store: Path | None = None
    group_id: int | None = None
    groups_run: int = 0
    groups_resumed: int = 0
    seconds: float = 0.0
    records: list[TrialRecord] = field(default_factory=list, repr=False)

    @property
    def study_id(self) -> str:
        return self.plan.study_id

    def to_dict(self) -> dict[str, Any]:
        """The summary table, fit and recommendation as plain values (what ``--json`` prints)."""
        return {"study_id": self.study_id, "group_id": self.group_id, "store": str(self.store) if self.store else None,
                "dataset": self.plan.dataset_name, "n_train": self.plan.n_train, "target": str(self.plan.target),
                "trials": len(self.trials), "groups_run": self.groups_run, "groups_resumed": self.groups_resumed,
                "summary": self.summary.to_dict(orient="records"), "fit": self.fit.as_dict(),
                "recommendation": self.recommendation.as_dict()}  # fmt: skip


@dataclass(frozen=True)
class StudyProgress:
    """What a progress display needs after each stored group."""

    groups_done: int
    groups_known: int  # done + pending now (extensions may add more)
    trials_done: int
    group: GroupPlan | None
    elapsed: float


def _normalized(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary as it comes back from the store (JSON round trip), so stored and fresh agree exactly."""
    from .store import json_ready

    return json.loads(json.dumps(json_ready(summary)))


def _store_group(store, group_id: int, plan: StudyPlan, records: Sequence[TrialRecord]) -> None:
    from .store import collect_provenance

    runs = []
    for record in records:
        config = record.config.model_dump(mode="json")
        spec = {"dataset": plan.dataset_name, "model": plan.config.model, "study_id": plan.study_id,
                "group": record.group.key, "target": str(plan.target), "clock": record.clock}
        runs.append({"name": f"B={record.group.batch_size} lr={record.config.lr:g} seed={record.config.seed}",
                     "kind": TRIAL_KIND, "config": config, "spec": spec, "provenance": collect_provenance(config),
                     "status": record.status, "summary": record.summary, "message": record.message,
                     "started_at": record.started_at, "ended_at": record.ended_at,
                     "steps": record.steps, "evals": record.evals, "epochs": record.epochs})  # fmt: skip
    store.record_runs(group_id, runs)


def _open_study_group(store, plan: StudyPlan) -> int:
    for group in store.find_groups(STUDY_KIND):
        if group["config"].get("study_id") == plan.study_id:
            return group["id"]
    return store.create_group(STUDY_KIND, plan.config.name,
                              {"study_id": plan.study_id, "config": plan.config.model_dump(mode="json")})


def load_dataset_for(config: StudyConfig, device: str | None = None) -> Dataset:
    from .data import load_dataset
    from .loop import resolve_device

    d = config.dataset
    return load_dataset(d.name, target=d.target, val_fraction=d.val_fraction, split_seed=d.split_seed,
                        standardize=d.standardize, device=resolve_device(device or config.train.device))


def run_study(
    config: StudyConfig,
    *,
    store: Any = None,
    executor: Any = None,
    vectorized: bool = True,
    on_progress: Callable[[StudyProgress], None] | None = None,
) -> Study:
    """Run a batch-size study: plan, train group by group (storing each), analyse.

    Args:
        config: the `StudyConfig`.
        store: a `RunStore` or a path. Each group's trials are stored in one transaction as soon as
            the group ends; running the same study again (same config) skips the stored groups,
            so a killed study resumes and ends with the results of an uninterrupted one.
        executor: where groups run (`batchlab.executors`); default in this process.
        vectorized: train a group's replicas in one `fit_replicas` pass (else one `fit` each).
        on_progress: called after every group with a `StudyProgress`.

    Returns:
        A `Study` with ``.summary``, ``.trials``, ``.fit`` and ``.recommendation``.

    Example:
        >>> study = bl.run_study(bl.StudyConfig(dataset="blobs", batch_sizes=[1, 4, 16, 64, 256, "full"],
        ...                                     seeds=5, target="val_acc>=0.8"), store="batchlab.db")
        >>> print(study.recommendation.text)
    """
    from .checks import check_argument
    from .executors import InProcessExecutor
    from .store import RunStore

    check_argument("run_study", "config", config, StudyConfig)
    started = time.perf_counter()
    dataset = load_dataset_for(config)
    plan = plan_study(config, dataset, vectorized=vectorized)
    executor = executor or InProcessExecutor()
    owns_store = store is not None and not isinstance(store, RunStore)
    run_store = RunStore(store) if owns_store else store
    try:
        group_id, summaries = None, []
        if run_store is not None:
            group_id = _open_study_group(run_store, plan)
            summaries = [r["summary"] for r in run_store.group_run_summaries(group_id, TRIAL_KIND)]
        resumed = len({s["group"] for s in summaries})
        groups_run, records = 0, []
        kill_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        while True:
            pending = next_groups(plan, trials_table(summaries))
            if not pending:
                break
            for done_now, (group, group_records) in enumerate(executor.run(plan, pending, dataset), start=1):
                if run_store is not None:
                    _store_group(run_store, group_id, plan, group_records)
                summaries += [_normalized(r.summary) for r in group_records]
                records += group_records
                groups_run += 1
                if kill_after and groups_run >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after a stored group
                if on_progress is not None:
                    done = resumed + groups_run
                    on_progress(StudyProgress(done, done + len(pending) - done_now, len(summaries), group,
                                              time.perf_counter() - started))
        trials = trials_table(summaries)
        analysis = analyse(trials, str(plan.target))
        if run_store is not None:
            run_store.finish_group(group_id, "finished", summary={
                "summary": analysis.summary.to_dict(orient="records"), "fit": analysis.fit.as_dict(),
                "recommendation": analysis.recommendation.as_dict()})
        return Study(config, plan, analysis.summary, trials, analysis.fit, analysis.recommendation,
                     Path(run_store.path) if run_store is not None else None, group_id, groups_run, resumed,
                     time.perf_counter() - started, records)
    finally:
        if owns_store:
            run_store.close()


def representative_runs(store, study: Study) -> list:
    """For learning curves: per batch size, the stored trial at its best lr with the first seed."""
    if store is None or study.group_id is None:
        return []
    wanted = {}
    first_seed = study.plan.config.seed_list[0]
    for row in study.summary.itertuples():
        if math.isfinite(row.best_lr):
            wanted[(row.batch_size_value, float(row.best_lr))] = None
    out = []
    for run in store.group_run_summaries(study.group_id, TRIAL_KIND):
        s = run["summary"]
        key = (s.get("batch_size_value"), float(s.get("lr", math.nan)))
        if s.get("kind") == LR_GROUP and key in wanted and s.get("seed") == first_seed and wanted[key] is None:
            wanted[key] = run["id"]
    for key in sorted(wanted):
        if wanted[key] is not None:
            out.append(store.load_run(wanted[key]))
    return out


# ================================================================================================
# presets and outputs
# ================================================================================================

# Brownlee, "How to Control the Stability of Training Neural Networks With the Batch Size" (2020):
# final (train, test) accuracy after 200 epochs of SGD lr 0.01 momentum 0.9 on blobs; his test
# set is the last 500 samples, which is blobs' validation split here.
BROWNLEE_ACCURACY = {"full": (0.816, 0.830), 1: (0.612, 0.606), 32: (0.832, 0.812)}

PRESETS: dict[str, dict[str, Any]] = {
    "blobs-batch-size": {
        "name": "blobs-batch-size (Brownlee 2020)",
        "dataset": "blobs", "model": "mlp:hidden=50,init=keras", "batch_sizes": ["full", 1, 32], "lrs": [0.01],
        "seeds": 3, "target": "val_acc>=0.8", "epochs": 200, "max_steps": None, "stop_at_target": False,
        "train": {"optimizer": "sgd", "momentum": 0.9},
    },
    "mnist1d": {
        "name": "mnist1d steps-to-target",
        "dataset": "mnist1d", "model": "mlp", "batch_sizes": [8, 16, 32, 64, 128, 256, 512, 1024, "full"],
        "lrs": "auto", "reference_lr": 0.05, "reference_batch_size": 32, "lr_grid_size": 4, "seeds": 3,
        "target": "val_acc>=0.5", "max_steps": 3000, "train": {"optimizer": "sgd", "momentum": 0.9},
    },
}  # fmt: skip


def preset_values(name: str) -> dict[str, Any]:
    """A preset's StudyConfig values (flags and a config file may override them)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))  # a deep copy


def brownlee_comparison(study: Study) -> pd.DataFrame:
    """Our final train/val accuracy (median over seeds) beside Brownlee's published numbers."""
    trials = study.trials[study.trials["kind"] == LR_GROUP]
    rows = []
    for batch_size, (train, test) in BROWNLEE_ACCURACY.items():
        ours = trials[trials["batch_size"].astype(str) == str(batch_size)]
        if ours.empty:
            continue
        rows.append({"batch_size": batch_size, "train_acc": float(ours["final_train_acc"].median()),
                     "val_acc": float(ours["final_val_acc"].median()),
                     "brownlee_train_acc": train, "brownlee_test_acc": test})  # fmt: skip
    return pd.DataFrame(rows)


def write_study_outputs(study: Study, folder: str | Path, *, report: bool = True) -> list[Path]:
    """The study's figures (PNG + SVG), the summary and trials as CSV, and the HTML report if available.

    Figures: steps-, samples- and seconds-to-target, best lr and generalization gap vs batch size
    (`batchlab.plots.study`), and the learning curves (train and val metric of the target) of
    every batch size at its best lr.
    """
    from . import plots
    from .store import RunStore

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    study.summary.to_csv(folder / "summary.csv", index=False)
    study.trials.to_csv(folder / "trials.csv", index=False)
    written += [folder / "summary.csv", folder / "trials.csv"]
    fit, n_train, target = study.fit, study.plan.n_train, str(study.plan.target)
    figures = plots.study_figures(study.summary, s_min=fit.s_min if fit.ok else None,
                                  b_crit=fit.b_crit if fit.ok else None, n_train=n_train, target=target)
    for name, figure in figures.items():
        written += plots.save_figure(figure, folder / name)
    if study.store is None:
        return written
    with RunStore(study.store, create=False) as store:
        curves = representative_runs(store, study)
        if curves:
            metric = study.plan.target.metric.split("_", 1)[1]
            figure = plots.compare_runs(curves, metric=(f"train_{metric}", f"val_{metric}"), x="samples_seen",
                                        logx=True, title=f"Learning curves at each batch size's best lr (seed {study.plan.config.seed_list[0]})")
            written += plots.save_figure(figure, folder / "learning_curves")
        if report:
            written += _write_report(store, study, folder)
    return written


def _write_report(store, study: Study, folder: Path) -> list[Path]:
    try:
        from .report import study_report
    except ImportError:
        return []
    runs = [store.load_run(run_id) for run_id in store.group_runs(study.group_id)]
    fit = study.fit
    page = study_report(store.get_group(study.group_id), runs, study.summary,
                        s_min=fit.s_min if fit.ok else None, b_crit=fit.b_crit if fit.ok else None,
                        e_min=fit.e_min if fit.ok else None, recommendation=study.recommendation.text,
                        target=str(study.plan.target), n_train=study.plan.n_train)
    path = folder / "report.html"
    path.write_text(page.html, encoding="utf-8")
    return [path]
