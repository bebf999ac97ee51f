"""Trials: the execution of one group, its learning rates × seeds at one batch size.

A group trains as vectorized replicas (`fit_replicas`) or one `fit` after another. A
`TargetWatcher` on every trial evaluates at the study's evaluation points (`evaluation_steps`),
notes the first step at which the target holds and stops the trial there. `train_group` returns
one `TrialRecord` per trial: its summary (`trial_summary`, all the analysis reads) and its tables.
What a group computes does not depend on where it runs.

Steps-to-target is the first *evaluated* step at which the target holds. With ``stop_at_target``
(the default) a trial ends at its target, so its "final" metrics and its generalization gap are
those at the target; trials that never reach it report them at the end of their budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from ..config import Target, TrainConfig
from ..data import Dataset
from ..events import Callback, Evaluation, RunEnd, RunStart, StepEnd, Stop
from .plan import ADAPTIVE_GROUP, LR_GROUP, NOISE_GROUP, GroupPlan, StudyPlan, evaluation_steps
from .pruning import LrPruner


class GroupEvaluator:
    """Full-pass metrics of several same-shaped models at once, cached per step.

    The replicas of a vectorized pass reach each check point together; the first to ask for step
    t's metrics gets every registered model evaluated (on a GPU in one stacked pass,
    `batchlab.metrics.evaluate_stacked`; on the CPU one model after another), the others read the
    cache. ``splits`` limits the passes to what is needed (the target's split: a full pass over the
    training set at every check would cost more than the training itself).
    """

    def __init__(self, dataset: Dataset, config: TrainConfig, splits: Sequence[str] = ("train", "val", "test")):
        from ..metrics import evaluation_splits, loss_function

        every = evaluation_splits(dataset, config.eval_train)
        self.splits = {name: every[name] for name in splits if name in every}
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
        from ..metrics import evaluate_splits, evaluate_stacked

        keys, models = list(self.models), list(self.models.values())
        # On the CPU each model is evaluated in turn, exactly as the loop evaluates: measured, one
        # vmapped pass streams R times the activations through memory and took twice as long
        # (18 MLPs on MNIST-1D's validation split: 30 ms vs 15 ms). On a GPU the stacked pass wins.
        if len(models) == 1 or next(models[0].parameters()).device.type == "cpu":
            return {key: evaluate_splits(model, self.splits, self.loss_fn, self.classification, self.eval_batch_size)
                    for key, model in zip(keys, models)}
        forward = _stacked_forward(models)
        return dict(zip(keys, evaluate_stacked(forward, len(models), self.splits, self.loss_fn, self.classification,
                                               self.eval_batch_size)))


def _stacked_forward(models: Sequence[torch.nn.Module]):
    """``x (b, ...) -> (R, b, K)``: the R same-shaped models at their current weights, in eval mode."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(list(models))  # each (R, *shape)
    skeleton = copy.deepcopy(models[0]).eval()
    batched = vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)), in_dims=(0, 0, None))
    return lambda x: batched(params, buffers, x)


class TargetWatcher(Callback):
    """Evaluates at the study's evaluation points, notes when the target first holds, and stops there.

    The loop evaluates at step 0 and every epoch end; this callback adds the evaluations of
    `evaluation_steps` in between, so steps-to-target has the study's resolution at any batch size.

    Args:
        target: the condition.
        schedule: the steps at which to evaluate (`evaluation_steps`).
        evaluator: the `GroupEvaluator` shared by the replicas of one pass.
        key: this replica's key in the evaluator (and in the pruner).
        stop_at_target: ask the loop to stop when the target is reached.
        pruner: the group's `LrPruner`, or None to train every trial to its target or budget.
    """

    def __init__(self, target: Target, schedule: Iterable[int], evaluator: GroupEvaluator, key: int,
                 stop_at_target: bool = True, pruner: LrPruner | None = None):
        self.target, self.schedule, self.evaluator, self.key = target, frozenset(schedule), evaluator, key
        # Only the check points need the live weights: a vectorized pass reads back at them alone.
        self.step_end_steps = self.schedule
        self.stop_at_target, self.pruner = stop_at_target, pruner
        self.rows: list[dict[str, float]] = []  # this callback's own evaluations
        self.reached: dict[str, float] | None = None
        self.pruned_at: int | None = None  # the step at which the pruner stopped this trial
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
        if self.pruned_at is not None:
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
        if self.pruner is not None and self.reached is None and self.pruned_at is None:
            self.pruner.ended_without_target(self.key)
        return None

    def _check(self, row: dict[str, float]):
        if self.reached is not None or self.pruned_at is not None:
            return None
        step = int(row["step"])
        if self.target.met(row):
            self.reached = row
            if self.pruner is not None:
                self.pruner.evaluated(self.key, step, reached=True)
            return Stop(f"target {self.target} reached at step {step}") if self.stop_at_target else None
        if self.pruner is not None:
            self.pruner.evaluated(self.key, step, reached=False)
            if self.pruner.should_stop(self.key):
                self.pruned_at = step
                return Stop(f"pruned at step {step}: this lr's median steps-to-target can no longer beat the best")
        return None


@dataclass
class TrialRecord:
    """One trained trial as the store keeps it: its summary and its three tables as rows."""

    group: GroupPlan
    config: TrainConfig
    summary: dict[str, Any]
    status: str  # as stored (`stored_status`): finished, stopped (pruned), diverged
    message: str | None
    steps: list[dict] = field(repr=False)
    evals: list[dict] = field(repr=False)
    epochs: list[dict] = field(repr=False)
    clock: dict[str, int] = field(default_factory=dict)
    started_at: str = ""
    ended_at: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)  # where it ran: host, pid, device (the worker's)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def train_group(plan: StudyPlan, group: GroupPlan, dataset: Dataset, *, vectorized: bool | None = None) -> list[TrialRecord]:
    """Train every trial of one group: its learning rates × seeds at its batch size.

    With ``vectorized`` (default: the plan's choice) the lr search runs as one `fit_replicas` pass,
    each replica stopping alone at its target; otherwise (and for the noise group, whose probe the
    replicas lack) one `fit` after another. An adaptive group trains its one run
    (`batchlab.study.adaptive.train_adaptive`).

    Returns:
        One `TrialRecord` per (lr, seed), lrs outer, seeds inner.
    """
    from ..loop import fit
    from ..probes import PROBES

    if group.kind == ADAPTIVE_GROUP:
        from .adaptive import train_adaptive

        return train_adaptive(plan, group, dataset)
    vectorized = plan.vectorized if vectorized is None else vectorized
    configs = [plan.train_config(group.batch_size, lr, seed) for lr in group.lrs for seed in group.seeds]
    schedule = evaluation_steps(plan.total_steps(group.batch_size), plan.config.resolution)
    target, stop = plan.target, plan.config.stop_at_target
    wants_noise = plan.config.noise_scale and "noise_scale" in PROBES
    # Target checks need the target's split only; the loop's own evaluations (step 0, epoch ends,
    # the step a trial stops at) are full, so the gap at the target is measured there.
    evaluator = GroupEvaluator(dataset, configs[0], splits=(target.metric.split("_")[0],))
    # Pruning stops work that cannot change the answer; with stop_at_target off the user asked
    # for every trial's whole budget, so it stays off too.
    pruner = (LrPruner([c.lr for c in configs], group.best_before)
              if plan.prune and stop and group.kind == LR_GROUP else None)
    watchers = [TargetWatcher(target, schedule, evaluator, i, stop, pruner) for i in range(len(configs))]
    started = _now()
    if vectorized and group.kind == LR_GROUP and len(configs) > 1:
        from ..replicas import fit_replicas

        runs = list(fit_replicas(lambda seed: plan.build_model(dataset, seed), dataset,
                                 configs, callbacks=lambda i, config: [watchers[i]], progress=False))
    else:
        probes = ["noise_scale"] if wants_noise and (group.kind == NOISE_GROUP or not vectorized) else []
        runs = [fit(plan.build_model(dataset, c.seed), dataset, c, probes=probes,
                    callbacks=[w], progress=False) for c, w in zip(configs, watchers)]
    ended = _now()
    return [_record(plan, group, run, watcher, started, ended) for run, watcher in zip(runs, watchers)]


def _record(plan: StudyPlan, group: GroupPlan, run, watcher: TargetWatcher, started: str, ended: str) -> TrialRecord:
    from ..store import collect_provenance

    loop_evals = {row["step"]: row for row in run.eval_rows}
    extra = [row for row in watcher.rows if row["step"] not in loop_evals]
    evals = sorted([*run.eval_rows, *extra], key=lambda row: row["step"])
    clock = run.clock
    summary = trial_summary(plan, group, run.config, run.status, evals, run.step_rows, watcher.reached,
                            clock.steps_per_epoch, run.seconds, watcher.pruned_at)
    return TrialRecord(group, run.config, summary, stored_status(summary["status"], run.status),
                       _message(plan, run, summary), list(run.step_rows), evals, list(run.epoch_rows),
                       {"n_train": clock.n_train, "batch_size": clock.batch_size, "steps_per_epoch": clock.steps_per_epoch,
                        "total_steps": clock.total_steps, "epochs": clock.epochs}, started, ended,
                       collect_provenance(run.config.model_dump(mode="json")))


def _message(plan: StudyPlan, run, summary: dict[str, Any]) -> str | None:
    """The stored run's message: the loop's (why it stopped or diverged), else how the trial ended."""
    if run.message:
        return run.message
    if summary["status"] == "reached":
        return f"target {plan.target} reached at step {summary['steps_to_target']:g}"
    return f"target {plan.target} not reached within the budget ({summary['steps']} steps)"


def stored_status(trial_status: str, loop_status: str) -> str:
    """A trial's run status in the store, true to what the study asked of it.

    The study asks a trial to train until its target (with ``stop_at_target``) or its budget ends,
    so reaching either is ``finished``, although the loop calls a target stop ``stopped`` (a
    callback asked). ``stopped`` is kept for the trials the study cut short: pruned, their lr
    could no longer be the best. ``diverged`` stays ``diverged``.

    Args:
        trial_status: the summary's ``status`` (`trial_summary`).
        loop_status: the loop's run status.
    """
    if trial_status == "reached":
        return "finished"
    if trial_status == "pruned":
        return "stopped"
    return loop_status


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
                  step_rows: Sequence[dict], reached: dict | None, steps_per_epoch: int, seconds: float,
                  pruned_at: int | None = None) -> dict[str, Any]:
    """The numbers of one trial the analysis reads (and nothing else): a flat dict of plain values.

    ``status`` is ``reached``, ``not_reached`` (within the budget), ``diverged``, or ``pruned``
    (stopped at ``pruned_at_step`` because its lr could no longer be the best, `LrPruner`).
    """
    last = evals[-1] if evals else {}
    status = ("reached" if reached else "diverged" if loop_status == "diverged"
              else "pruned" if pruned_at is not None else "not_reached")
    steps_trained = int(step_rows[-1]["step"]) if step_rows else 0
    val = "val_acc" if any("val_acc" in e for e in evals) else "val_loss"
    values = [e[val] for e in evals if val in e and math.isfinite(e[val])]
    best_val = (max(values) if val.endswith("acc") else min(values)) if values else math.nan
    noise_at = reached["step"] if reached else steps_trained
    out: dict[str, Any] = {
        "group": group.key, "kind": group.kind, "round": group.round,
        "batch_size": group.batch_size, "batch_size_value": group.batch_size_value,
        "lr": config.lr, "seed": config.seed, "status": status, "loop_status": loop_status,
        "pruned_at_step": pruned_at if pruned_at is not None else math.nan,
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
