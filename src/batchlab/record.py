"""The measurement core: what one run measures, whoever trains it.

A `Recorder` owns a run's bookkeeping: the step rows and their columns, the Keras-exact running
mean, the evaluation rows (with callbacks' `AddMetrics`), the probe values, the callbacks' events
and requests, the epoch rows, the end of the run and its status (finished, stopped, diverged,
interrupted, failed). It trains nothing and evaluates nothing: a driver computes a step or an
evaluation and hands the numbers over. Rows leave the core only through callbacks (the store's
recorder is one) and as the finished `Run`.

Drivers: `batchlab.loop.fit` (one model, batches from a seeded permutation), `batchlab.replicas`
(R models stacked, one `Recorder` per replica), `batchlab.track` (the user's own loop) and the
framework callbacks of `batchlab.integrations`. They differ in how a step is computed and how
batches are ordered; what a step row, an evaluation row or an epoch row means is decided here.

A driver's calls, in order::

    rec.start_run()
    rec.record_evaluation(metrics, seconds)            # step 0, when the driver evaluates
    while ...:
        rec.start_epoch()
        for each batch:
            rec.record_step(b, lr, loss, correct, dt)   # then, when rec.evaluation_due(): record_evaluation
            if rec.wants_attention and not rec.settle(): break
        rec.end_epoch()                                # after an evaluation at this step, if any
        if not rec.settle(): break
    run = rec.finish()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from .errors import ConfigError
from .events import (
    AddMetrics,
    Callback,
    Clock,
    EpochEnd,
    Evaluation,
    RestoreWeights,
    RunEnd,
    RunStart,
    Save,
    SetBatchSize,
    StepEnd,
    Stop,
    batch_at,
)
from .looks import WINDOW, Looks
from .metrics import RunningMean

METRIC_SUFFIXES = ("_loss", "_acc")


# --- what a step hands over ----------------------------------------------------------------------


class StepNumbers(NamedTuple):
    """What a step computes for the core, as tensors read when the driver synchronises.

    One type for every driver: () tensors for one update of one model (`batchlab.loop.train_step`,
    the compiled step), (K,) for K consecutive updates (a compiled chunk), (R,) for one update of R
    stacked replicas.
    """

    loss: Any  # the batch's mean loss, from the forward pass before the update
    correct: Any | None  # samples whose arg-max equals the label; None for regression


# --- the result ---------------------------------------------------------------------------------


@dataclass
class Run:
    """The result of a run: its config, the three tables and how it ended.

    Attributes:
        steps: one row per update: ``step, epoch, samples_seen, batch_size, lr, batch_loss,
            batch_acc, running_loss, running_acc, seconds``, probe columns, and the full-pass
            metrics (``train_*, val_*, test_*``) at the steps where evaluation happened.
        evals: one row per full-pass evaluation (step 0 first): ``step, epoch, samples_seen,
            seconds, train_loss, train_acc, val_*, test_*``.
        epochs: one row per epoch: ``epoch, step, samples_seen, lr, running_loss, running_acc``
            (the epoch-end aggregate Keras stores in ``History``), ``train_*, val_*, test_*`` at the
            epoch's end, ``seconds``.
        status: ``finished``, ``stopped`` (a callback asked), ``diverged`` (NaN/inf loss),
            ``interrupted`` (Ctrl-C) or ``failed`` (an error in the training code); ``message``
            says why, and names the probes that could not measure the run (their columns NaN).
        seconds: training time, full-pass evaluations excluded (they are in ``eval_seconds``).

    The tables are built from the recorded rows (``step_rows``, ``eval_rows``, ``epoch_rows``) on
    first access, so a run nobody inspects costs no pandas work.
    """

    config: Any
    dataset: str
    clock: Clock
    status: str
    message: str | None
    model: Any = field(repr=False)
    seconds: float = 0.0
    eval_seconds: float = 0.0
    step_rows: list[dict] = field(default_factory=list, repr=False)
    eval_rows: list[dict] = field(default_factory=list, repr=False)
    epoch_rows: list[dict] = field(default_factory=list, repr=False)

    @cached_property
    def steps(self) -> pd.DataFrame:
        return step_table(self.step_rows, self.eval_rows)

    @cached_property
    def evals(self) -> pd.DataFrame:
        return pd.DataFrame(self.eval_rows)

    @cached_property
    def epochs(self) -> pd.DataFrame:
        return pd.DataFrame(self.epoch_rows)

    @property
    def summary(self) -> dict[str, Any]:
        """The headline numbers: how far it trained, how it ended, the last and best metrics."""
        out: dict[str, Any] = {
            "status": self.status,
            "message": self.message,
            "dataset": self.dataset,
            "batch_size": self.clock.batch_size,
            "steps_per_epoch": self.clock.steps_per_epoch,
            "steps": self.clock.step,
            "epochs": self.clock.epoch,
            "samples_seen": self.clock.samples_seen,
            "seconds": round(self.seconds, 4),
            "eval_seconds": round(self.eval_seconds, 4),
        }
        out.update(summarize_evals(self.eval_rows))
        return out


def summarize_evals(evals: list[dict]) -> dict[str, float]:
    """Final value of each evaluated metric, and the best validation accuracy/loss with its step."""
    out: dict[str, float] = {}
    if not evals:
        return out
    for column, value in evals[-1].items():
        if column.endswith(METRIC_SUFFIXES):
            out[f"final_{column}"] = float(value)
    for column, better in (("val_acc", max), ("val_loss", min)):
        rows = [r for r in evals if column in r and not math.isnan(r[column])]
        if rows:
            best = better(rows, key=lambda r: r[column])  # the first of equal values, as idxmax does
            out[f"best_{column}"] = float(best[column])
            out[f"best_{column}_step"] = int(best["step"])
    return out


def step_table(steps: list[dict], evals: list[dict]) -> pd.DataFrame:
    """The step rows, with the full-pass metrics filled in at the steps where evaluation happened."""
    table = pd.DataFrame(steps)
    if table.empty or not evals:
        return table
    metrics = pd.DataFrame(evals).drop(columns=["epoch", "samples_seen", "seconds"])
    return table.merge(metrics[metrics["step"] > 0], on="step", how="left")


def divergence_message(batch_loss: float, step: int, epoch: int, lr: float) -> str:
    """The one message of a diverged run (NaN/inf batch loss), saying what to try."""
    return (f"loss became {batch_loss} at step {step} (epoch {epoch}) with lr {lr:g}; "
            "lower the learning rate or check the data")


def _with_probe_failures(message: str | None, failures: Mapping[str, str] | None) -> str | None:
    """The run's message, with a note for each probe that could not measure (once, however often asked)."""
    notes = [f"{name} not measured: {why}" for name, why in (failures or {}).items()]
    notes = [note for note in notes if not message or note not in message]
    return "; ".join([message, *notes] if message else notes) or message


def overrides_step_end(callback: Callback) -> bool:
    """Whether a callback wants every `StepEnd` (the hot path calls only those)."""
    return type(callback).on_step_end is not Callback.on_step_end


# --- the core -----------------------------------------------------------------------------------


class Recorder:
    """The measurement core of one run (see the module docstring for the driver's calls).

    Args:
        clock: the run's accounting (`batchlab.loop.plan_run` for fit); the recorder advances it.
        model: the live module (events carry it; `RestoreWeights` loads into it).
        classification: whether accuracy columns exist (``batch_acc``, ``running_acc``, ``*_acc``).
        callbacks: `Callback` objects; their requests are collected and acted on by `settle`.
        config: what the run was given (a `TrainConfig`, or any object with ``model_dump``); in
            `RunStart` and the `Run`.
        dataset: the dataset's name.
        probes: a `batchlab.probes.ProbeSet` (or None); its values join the step rows of measured steps.
        probe_names: the probes' names when the driver measures them itself (the replicas).
        probe_every: measure the probes every this many steps.
        eval_every: evaluate every this many steps within an epoch (``None``, 0 or ``"epoch"``: at epoch ends only).
        save: writes a checkpoint for a `Save` request; ``None`` refuses `Save` with a `ConfigError`.
        save_refusal: the reason given when ``save`` is None.
        optimizer, data: the driver's optimizer and `Dataset`, handed to callbacks in `RunStart`
            for reading (None where the driver does not own them).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        model: Any,
        classification: bool,
        callbacks: Sequence[Callback] = (),
        config: Any = None,
        dataset: str = "",
        probes: Any = None,
        probe_names: Sequence[str] = (),
        probe_every: int = 1,
        eval_every: int | str | None = None,
        save: Callable[[Path], None] | None = None,
        save_refusal: str = "this run cannot write checkpoints",
        optimizer: Any = None,
        data: Any = None,
        window: int = WINDOW,
    ):
        self.clock = clock
        self.model, self._classification, self._config, self.dataset = model, classification, config, dataset
        self.callbacks = list(callbacks)
        self.per_step = [c for c in self.callbacks if overrides_step_end(c)]
        # The steps the per-step callbacks declared (`Callback.step_end_steps`): None when one needs every step.
        self.step_end_steps: dict[int, frozenset[int] | None] = {
            id(c): None if c.step_end_steps is None else frozenset(c.step_end_steps) for c in self.per_step}
        self._probes, self.probe_every = probes, probe_every
        self.probe_names = tuple(probes.names) if probes is not None else tuple(probe_names)
        # One meaning of "no step-wise evaluation": None (a config's "epoch", an integration's 0 or None).
        self.eval_every = None if eval_every in (None, 0, "epoch") else int(eval_every)
        self.window = window
        self.looks = self._plan_looks()
        self.save, self.save_refusal = save, save_refusal
        self.optimizer, self.data = optimizer, data
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.epochs: list[dict] = []
        self.running = RunningMean()
        self.seconds = 0.0
        self.eval_seconds = 0.0
        self.delivered_steps = 0  # rows already handed to callbacks in an EpochEnd
        self.delivered_evals = 0
        self.status: str = "finished"
        self.message: str | None = None
        self.requests: list = []
        self.wants_attention = False  # the last step needs `settle`: callbacks' requests or divergence

    # Read-only for drivers: each changes through a method that says why (`mark_regression`,
    # `learn_batch_size`, `attach_probes`), so a write from outside fails loudly.

    @property
    def classification(self) -> bool:
        """Whether accuracy columns exist (``batch_acc``, ``running_acc``, ``*_acc``)."""
        return self._classification

    @property
    def config(self) -> Any:
        """What the run was given (in `RunStart` and the `Run`)."""
        return self._config

    @property
    def probes(self) -> Any:
        """The run's `batchlab.probes.ProbeSet`, or None."""
        return self._probes

    # -- events and requests ---------------------------------------------------------------------

    def _plan_looks(self) -> Looks:
        """Where this run is seen (`batchlab.looks`): its evaluations, its probes' steps and the steps
        its live per-step callbacks declared (a display's rows wait for the next read)."""
        live = [self.step_end_steps[id(c)] for c in self.per_step if c.step_end_live]
        steps = None if any(s is None for s in live) else tuple(frozenset().union(*live))
        measured = bool(self.probe_names) or (self.probes is not None and bool(self.probes.names))
        return Looks(eval_every=self.eval_every, probe_every=self.probe_every if measured else None, steps=steps,
                     window=self.window)

    def dispatch(self, method: str, event) -> None:
        """Call every callback for an event (per-step ones only for ``on_step_end``, at the steps
        they declared); keep their requests."""
        if method == "on_step_end":
            step = event.clock.step
            targets = [c for c in self.per_step if (steps := self.step_end_steps[id(c)]) is None or step in steps]
        else:
            targets = self.callbacks
        for callback in targets:
            request = getattr(callback, method)(event)
            if request is not None:
                self.requests.append(request)

    def settle(self) -> bool:
        """Act on the callbacks' requests (checkpoints, weights, stop); True while the run goes on."""
        requests, self.requests, self.wants_attention = self.requests, [], False
        for request in requests:
            if isinstance(request, Save):
                if self.save is None:
                    raise ConfigError(f"cannot write checkpoint {request.path}: {self.save_refusal}")
                self.save(request.path)
            elif isinstance(request, RestoreWeights):
                self.model.load_state_dict(request.state_dict)
            elif isinstance(request, Stop) and self.status == "finished":
                self.status, self.message = "stopped", request.reason
            elif isinstance(request, SetBatchSize):
                self._set_batch_size(request.batch_size)
        return self.status == "finished"

    def _set_batch_size(self, batch_size: int) -> None:
        """Train at ``batch_size`` from the next batch: one more change in the clock's schedule (the
        driver re-plans the rest of the run with `replan`)."""
        clock = self.clock
        if batch_size == clock.batch_size:
            return  # a decision to stay: its evidence is in the evaluation's row
        changes = tuple(c for c in clock.changes if c[0] < clock.samples_seen) + ((clock.samples_seen, batch_size),)
        self.clock = replace(clock, batch_size=batch_size, changes=changes)

    def replan(self, steps_per_epoch: int, total_steps: int, epochs: int) -> None:
        """The run's length after its batch size changed: the current epoch's steps, the total steps
        and the epochs started by the end."""
        self.clock = replace(self.clock, steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs)

    @property
    def going(self) -> bool:
        return self.status == "finished"

    def start_run(self) -> None:
        """The `RunStart` event."""
        self.dispatch("on_run_start", RunStart(self.config, self.dataset, self.clock, self.model, self.probe_names,
                                               self.optimizer, self.data))

    # -- what a driver learns as the run goes ----------------------------------------------------

    def learn_batch_size(self, batch_size: int) -> None:
        """The loop's batch size became known (a tracked loop's first batch, before `start_run`): the
        config (a dataclass with a ``batch_size`` field) and the clock take it."""
        self._config = replace(self._config, batch_size=batch_size)
        self.clock = replace(self.clock, batch_size=batch_size)

    def learn_n_train(self, n_train: int) -> None:
        """The training set's size became known: the samples of a whole epoch, counted by the driver."""
        self.clock = replace(self.clock, n_train=n_train)

    def learn_epoch_length(self) -> None:
        """An epoch of unknown length ended (a tracked loop's first): its steps are the epoch's length,
        and its samples the training set's size where that was not given."""
        clock = self.clock
        self.clock = replace(clock, steps_per_epoch=clock.step_in_epoch, n_train=clock.n_train or clock.samples_seen)

    def account_as_ran(self) -> None:
        """A run whose length was never planned (a tracked loop) ends: its length is what ran. The steps
        and epochs counted, the first epoch's length (this one's, when it is the first), the largest
        batch, and the samples seen as the training set's size where that was not given."""
        clock = self.clock
        sizes = [row["batch_size"] for row in self.steps]
        self.clock = replace(clock, total_steps=clock.step, epochs=clock.epoch,
                             steps_per_epoch=clock.steps_per_epoch or clock.step_in_epoch,
                             batch_size=max(sizes) if sizes else 0, n_train=clock.n_train or clock.samples_seen)

    def attach_probes(self, probes: Any) -> None:
        """Probes attached after the run started (a tracked loop makes them at the first forward pass,
        from its shapes): their values join the rows of the steps measured from now on. The names
        announced in `RunStart` stay as they were."""
        self._probes = probes
        self.looks = self._plan_looks()

    def mark_regression(self) -> None:
        """The run is a regression after all (the driver's first batch had no accuracy): no accuracy
        columns in the rows recorded from now on."""
        self._classification = False

    # -- steps -----------------------------------------------------------------------------------

    def start_epoch(self, steps_per_epoch: int | None = None) -> None:
        """A new epoch: the clock advances and the running mean restarts (Keras resets its metrics).

        Args:
            steps_per_epoch: the epoch's length when it differs from the last one's (a batch-size
                schedule); None keeps it.
        """
        self.clock = replace(self.clock, epoch=self.clock.epoch + 1, step_in_epoch=0,
                             steps_per_epoch=steps_per_epoch or self.clock.steps_per_epoch)
        self.running = RunningMean()

    def measuring(self) -> bool:
        """Whether the probes measure the next step."""
        return self.probes is not None and self.probes.active and self.looks.measures(self.clock.step)

    def record_step(self, batch_size: int, lr: float, batch_loss: float, batch_correct: int | None,
                    seconds: float, probe_values: Mapping[str, float] | None = None) -> dict:
        """Record one update: its step row, the running mean, the `StepEnd` event, divergence.

        Args:
            batch_size: samples in the batch (the last batch of an epoch may be short).
            lr: the learning rate the update used.
            batch_loss: the batch's mean loss from the update's own forward pass.
            batch_correct: correctly classified samples of the batch (ignored for regression).
            seconds: training time of this step.
            probe_values: the probes' values when this step was measured.

        Returns:
            The step row. Afterwards ``wants_attention`` says whether `settle` must be called
            (callbacks asked for something, or the loss is not finite: the run is then diverged).
        """
        return self.record_steps([(batch_size, lr, batch_loss, batch_correct, seconds, probe_values)])[0]

    def record_steps(self, steps: Sequence[tuple[int, float, float, int | None, float, Mapping[str, float] | None]]) -> list[dict]:
        """Record updates in order, each as `record_step` does, for a driver that reads many steps'
        numbers at once; the clock is rebuilt once, unless per-step callbacks need it at every row.

        Args:
            steps: ``(batch_size, lr, batch_loss, batch_correct, seconds, probe_values)`` per update.

        Returns:
            The rows recorded: all of them, unless a row's loss is not finite (the run is then
            diverged, and the updates after it are not recorded). ``wants_attention`` then says
            whether `settle` must be called: the callbacks asked for something, or the run diverged.
            Every update given was made, so a request within them (a callback that reads rows only,
            `Callback.step_end_live`, may make one at any row) is acted on after the last.
        """
        clock, running, classification = self.clock, self.running, self.classification
        step, in_epoch, seen, epoch = clock.step, clock.step_in_epoch, clock.samples_seen, clock.epoch
        rows = []
        for batch_size, lr, batch_loss, batch_correct, seconds, probe_values in steps:
            step, in_epoch, seen = step + 1, in_epoch + 1, seen + batch_size
            self.seconds += seconds
            if classification:
                running_loss, running_acc = running.update(batch_loss, batch_correct, batch_size)
                row = {"step": step, "epoch": epoch, "samples_seen": seen, "batch_size": batch_size, "lr": lr,
                       "batch_loss": batch_loss, "batch_acc": batch_correct / batch_size,
                       "running_loss": running_loss, "running_acc": running_acc, "seconds": self.seconds}
            else:
                running_loss, _ = running.update(batch_loss, 0, batch_size)
                row = {"step": step, "epoch": epoch, "samples_seen": seen, "batch_size": batch_size, "lr": lr,
                       "batch_loss": batch_loss, "running_loss": running_loss, "seconds": self.seconds}
            if probe_values:
                row.update(probe_values)
            self.steps.append(row)
            rows.append(row)
            if self.per_step:
                self.clock = self._advanced(clock, step, in_epoch, seen)
                self.dispatch("on_step_end", StepEnd(self.clock, row, self.model))
            if not math.isfinite(batch_loss):
                self.status, self.message = "diverged", divergence_message(batch_loss, step, clock.epoch, lr)
            if self.status != "finished":
                break
        self.clock = self._advanced(clock, step, in_epoch, seen)
        self.wants_attention = bool(self.requests) or self.status != "finished"
        return rows

    @staticmethod
    def _advanced(clock: Clock, step: int, step_in_epoch: int, samples_seen: int) -> Clock:
        """``clock`` moved on to the given counters (positional: the fastest way to build a Clock); under
        a batch-size schedule, with the batch size in force for the next batch."""
        batch_size = batch_at(clock.changes, samples_seen) if clock.changes else clock.batch_size
        return Clock(clock.n_train, batch_size, clock.steps_per_epoch, clock.total_steps, clock.epochs, step,
                     clock.epoch, step_in_epoch, samples_seen, clock.changes, clock.note)

    def evaluation_due(self) -> bool:
        """Whether the driver should evaluate now: every ``eval_every`` steps, not at an epoch's end
        (`end_epoch` evaluates there) and not after a divergence."""
        return self.status != "diverged" and self.looks.evaluates(self.clock)

    # -- evaluations -----------------------------------------------------------------------------

    def record_evaluation(self, metrics: Mapping[str, float], seconds: float = 0.0) -> dict:
        """Record a full-pass evaluation at the current step, with the metrics callbacks add.

        Args:
            metrics: ``train_loss``, ``train_acc``, ``val_*``, ``test_*``, as measured by the driver.
            seconds: how long the evaluation took (kept apart from training time).

        Returns:
            The evaluation row (callbacks' `AddMetrics` merged in: they cannot overwrite ours).
        """
        self.eval_seconds += seconds
        clock = self.clock
        row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
               "seconds": self.seconds, **metrics}
        self.evals.append(row)
        before = len(self.requests)
        self.dispatch("on_evaluation", Evaluation(clock, dict(metrics), self.seconds, self.model))
        added = [r for r in self.requests[before:] if isinstance(r, AddMetrics)]
        if added:
            self.requests[before:] = [r for r in self.requests[before:] if not isinstance(r, AddMetrics)]
            for request in added:
                row.update({k: v for k, v in request.values.items() if k not in row})
        for request in self.requests[before:]:
            if isinstance(request, SetBatchSize):  # the decision's evidence is stored with the evaluation
                row.update({k: v for k, v in request.evidence.items() if k not in row})
        self.wants_attention = bool(self.requests) or self.status != "finished"
        return row

    def evaluated_now(self) -> bool:
        """Whether the latest evaluation is at the current step."""
        return bool(self.evals) and self.evals[-1]["step"] == self.clock.step

    def add_to_evaluation(self, metrics: Mapping[str, float], seconds: float = 0.0) -> None:
        """More metrics at the weights of the latest evaluation (it is at the current step: see
        `evaluated_now`): they join its row without overwriting what is there, and their time counts
        as evaluation time. No new event: the callbacks had the evaluation already."""
        row = self.evals[-1]
        row.update({k: v for k, v in metrics.items() if k not in row})
        self.eval_seconds += seconds

    # -- epochs and the end ----------------------------------------------------------------------

    def end_epoch(self) -> dict:
        """The epoch row (the last evaluation's metrics if it is at this step) and the `EpochEnd` event."""
        clock = self.clock
        metrics = ({k: v for k, v in self.evals[-1].items() if k.endswith(METRIC_SUFFIXES)}
                   if self.evaluated_now() else {})
        row = {"epoch": clock.epoch, "step": clock.step, "samples_seen": clock.samples_seen,
               "lr": self.steps[-1]["lr"] if self.steps else float("nan"), "running_loss": self.running.loss}
        if self.classification:
            row["running_acc"] = self.running.acc
        row.update(metrics)
        row["seconds"] = self.seconds
        self.epochs.append(row)
        event = EpochEnd(clock, row, tuple(self.steps[self.delivered_steps:]),
                         tuple(self.evals[self.delivered_evals:]), self.model)
        self.delivered_steps, self.delivered_evals = len(self.steps), len(self.evals)
        self.dispatch("on_epoch_end", event)
        return row

    def run(self) -> Run:
        """The run as it stands, as a `Run`."""
        return Run(config=self.config, dataset=self.dataset, clock=self.clock, status=self.status,
                   message=self.message, model=self.model, seconds=self.seconds, eval_seconds=self.eval_seconds,
                   step_rows=self.steps, eval_rows=self.evals, epoch_rows=self.epochs)

    def finish(self, status: str | None = None, message: str | None = None) -> Run:
        """End the run (``status`` overrides, e.g. ``interrupted`` or ``failed``): the `RunEnd` event
        with the rows not yet delivered, then the callbacks' last requests (`RestoreWeights`). The
        message names the probes that could not measure the run, whatever the status."""
        if status is not None:
            self.status, self.message = status, message
        self.message = _with_probe_failures(self.message, getattr(self.probes, "failures", None))
        run = self.run()
        event = RunEnd(self.clock, self.status, self.message, run.summary, tuple(self.steps[self.delivered_steps:]),
                       tuple(self.evals[self.delivered_evals:]), self.model)
        self.delivered_steps, self.delivered_evals = len(self.steps), len(self.evals)
        self.requests = []
        self.dispatch("on_run_end", event)
        status_before = self.status
        self.settle()
        self.status = status_before  # a Stop at the very end changes nothing
        return run

    def stop(self, reason: str) -> None:
        """Stop the run for ``reason``, decided outside this core's callbacks (rank 0's decision, on
        the other ranks); a run that has already ended keeps its status."""
        if self.status == "finished":
            self.status, self.message = "stopped", reason

    def add_note(self, note: str) -> None:
        """Add a note to the run's message (after what it says already, if anything)."""
        self.message = "; ".join(filter(None, [self.message, note]))

    # -- checkpoints -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the core, as plain JSON-able values (tables, clock, seconds)."""
        return {"clock": asdict(self.clock), "steps": self.steps, "evals": self.evals, "epochs": self.epochs,
                "seconds": self.seconds, "eval_seconds": self.eval_seconds}

    def load_state(self, state: Mapping[str, Any], plan: Clock | None = None) -> None:
        """Continue from `state`: the rows so far count as delivered (the store has them).

        Args:
            state: what `state` returned.
            plan: the clock planned for the continued run (its batch sizes, length); the counters
                come from ``state``. Default: the checkpoint's own plan.
        """
        saved = dict(state["clock"])
        saved["changes"] = tuple(tuple(change) for change in saved.get("changes", ()))  # JSON made them lists
        clock = Clock(**saved)
        if plan is not None:
            clock = replace(plan, step=clock.step, epoch=clock.epoch, step_in_epoch=clock.step_in_epoch,
                            samples_seen=clock.samples_seen)
            clock = self._advanced(clock, clock.step, clock.step_in_epoch, clock.samples_seen)  # B in force now
        self.clock = clock
        self.steps, self.evals, self.epochs = list(state["steps"]), list(state["evals"]), list(state["epochs"])
        self.seconds, self.eval_seconds = float(state["seconds"]), float(state["eval_seconds"])
        self.delivered_steps, self.delivered_evals = len(self.steps), len(self.evals)
