"""Typed events the training loop emits, and the requests callbacks may return.

Callbacks and the run store see training only through these frozen records. A callback never
mutates the loop: it returns a request (`Stop`, `Save`, `RestoreWeights`) and the loop acts on it.
The ``model`` field is the live module, for reading (evaluating, copying weights); a callback that
changes it breaks the run's meaning.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig
    from .data import Dataset


Changes = tuple[tuple[int, int], ...]  # a batch-size schedule: (samples seen, B), B a whole number


def batch_at(changes: Changes, samples_seen: int) -> int:
    """The batch size of a batch that starts after ``samples_seen`` samples."""
    return changes[bisect.bisect_right([s for s, _ in changes], samples_seen) - 1][1]


def describe_changes(changes: Changes, n_train: int) -> str:
    """``batch 32 -> 64 at 20,000 samples -> 128 at 60,000 samples`` (``full batch`` for B = N)."""
    def name(b: int) -> str:
        return "full batch" if b == n_train else f"batch {b}"
    return " -> ".join([name(changes[0][1]), *(f"{b} at {s:,} samples" for s, b in changes[1:])])


@dataclass(frozen=True)
class Clock:
    """The step/epoch accounting of one run: every counter the loop keeps, in one place.

    ``step`` counts parameter updates done; ``epoch`` is the 1-based epoch in progress (0 before
    training); ``step_in_epoch`` counts updates done in that epoch. With a batch-size schedule,
    ``changes`` holds it as (samples seen, B) pairs (`batchlab.schedule`), ``batch_size`` is the
    batch size in force for the next batch and ``steps_per_epoch`` the length of the epoch in
    progress (of the first epoch before training); without one, ``changes`` is empty.
    """

    n_train: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs started by the end of training (the last may be partial with max_steps)
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    changes: Changes = ()
    note: str = ""  # an adaptive batch size's rule, said in the accounting line (its steps are then at most)

    def describe(self) -> str:
        """The accounting line printed at start: "4000 samples, batch 32 -> 125 steps/epoch, ..."."""
        epochs = "epoch" if self.epochs == 1 else "epochs"
        if self.changes:
            return (f"{self.n_train} samples, {describe_changes(self.changes, self.n_train)}"
                    f"{', ' + self.note if self.note else ''}; "
                    f"{self.epochs} {epochs} = {'at most ' if self.note else ''}{self.total_steps} steps")
        batch = "full batch" if self.batch_size == self.n_train else f"batch {self.batch_size}"
        return (
            f"{self.n_train} samples, {batch} -> {self.steps_per_epoch} steps/epoch, "
            f"{self.epochs} {epochs} = {self.total_steps} steps"
        )


@dataclass(frozen=True)
class RunStart:
    """Training begins. ``optimizer`` and ``data`` (the `batchlab.data.Dataset` on the run's device)
    are the live objects the loop trains with, for reading (`batchlab.LocalCBS` branches from deep
    copies of them); drivers that do not own them (`batchlab.track`, the replicas) leave them None."""

    config: "TrainConfig"
    dataset: str
    clock: Clock
    model: "torch.nn.Module"
    probes: tuple[str, ...] = ()
    optimizer: "torch.optim.Optimizer | None" = None
    data: "Dataset | None" = None


@dataclass(frozen=True)
class StepEnd:
    """After one update. ``row`` is the step table's row (batch/running values, lr, probes)."""

    clock: Clock
    row: Mapping[str, float]
    model: "torch.nn.Module"


@dataclass(frozen=True)
class Evaluation:
    """After a full-pass evaluation (step 0, every ``eval_every`` steps, and every epoch end).

    ``metrics`` holds ``train_loss``, ``train_acc``, ``val_*``, ``test_*`` as the dataset allows.
    """

    clock: Clock
    metrics: Mapping[str, float]
    seconds: float
    model: "torch.nn.Module"


@dataclass(frozen=True)
class EpochEnd:
    """After the last step of an epoch and its evaluation.

    ``row`` is the epoch table's row; ``steps`` and ``evals`` are the step-table and evaluation
    rows produced during this epoch (what a store appends in one transaction).
    """

    clock: Clock
    row: Mapping[str, float]
    steps: tuple[Mapping[str, float], ...]
    evals: tuple[Mapping[str, float], ...]
    model: "torch.nn.Module"


@dataclass(frozen=True)
class RunEnd:
    """Training is over. ``status`` is finished, stopped, diverged, interrupted (Ctrl-C) or failed
    (an error in the training code); ``message`` says why.

    ``steps`` and ``evals`` hold rows not yet delivered by an `EpochEnd` (a partial last epoch).
    """

    clock: Clock
    status: str
    message: str | None
    summary: Mapping[str, Any]
    steps: tuple[Mapping[str, float], ...] = ()
    evals: tuple[Mapping[str, float], ...] = ()
    model: "torch.nn.Module | None" = None


@dataclass(frozen=True)
class Stop:
    """Ask the loop to stop after the current step or epoch."""

    reason: str


@dataclass(frozen=True)
class Save:
    """Ask the loop to write a checkpoint (weights, optimizer, RNG and clock) to ``path``."""

    path: Path


@dataclass(frozen=True)
class RestoreWeights:
    """Ask the loop to load these weights into the model (EarlyStopping's restore_best_weights)."""

    state_dict: Mapping[str, Any] = field(repr=False)
    reason: str = ""


@dataclass(frozen=True)
class AddMetrics:
    """Ask the loop to add these metrics to the evaluation's row (only from ``on_evaluation``).

    The loop merges ``values`` into the evaluation row (and so into the stored evals table, the
    step table and the epoch row) before the row is delivered in an `EpochEnd`. This is how a
    callback measures something at the evaluation's weights and keeps it with the run, e.g.
    ``explain``'s train-mode full pass (``train_mode_loss``, ``train_mode_acc``). A name the row
    already has is ignored: a callback cannot overwrite what the loop measured.
    """

    values: Mapping[str, float]


@dataclass(frozen=True)
class SetBatchSize:
    """Ask the loop to train at ``batch_size`` from the next batch on (only from ``on_evaluation``;
    `batchlab.adaptive`). ``evidence`` joins the evaluation's row as `AddMetrics` values do, so the
    decision is stored with what caused it."""

    batch_size: int
    evidence: Mapping[str, float] = field(default_factory=dict)


Request = Union[Stop, Save, RestoreWeights, AddMetrics, SetBatchSize, None]


class Callback:
    """Receives the loop's events; each method may return a request. Override what you need.

    ``step_end_steps``: the steps whose `on_step_end` this callback needs, or None (the default)
    for every step. A driver that reads results back in batches (`batchlab.fit_replicas`)
    otherwise synchronises every step for a callback that overrides `on_step_end`; with the steps
    declared it synchronises only at them, and `on_step_end` is called only there, with the
    model at that step's weights. Read once, when the run starts.

    ``step_end_live``: whether `on_step_end` must run while the model is at that step (a callback
    that reads or changes the model, or stops the run there: the default). A callback that reads
    only the row (a progress display) sets it False: it then receives every row as the driver reads
    its numbers back, perhaps some steps later, and never makes the driver stop to show it one
    (`batchlab.looks`).
    """

    step_end_steps: Collection[int] | None = None
    step_end_live: bool = True

    def on_run_start(self, event: RunStart) -> Request:
        return None

    def on_step_end(self, event: StepEnd) -> Request:
        return None

    def on_evaluation(self, event: Evaluation) -> Request:
        return None

    def on_epoch_end(self, event: EpochEnd) -> Request:
        return None

    def on_run_end(self, event: RunEnd) -> Request:
        return None
