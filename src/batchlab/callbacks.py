"""Built-in callbacks: early stopping, checkpointing, the progress bar and the local critical batch size.

Each receives the loop's typed events and returns requests; none reaches into the loop.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .events import Callback, EpochEnd, RestoreWeights, RunEnd, RunStart, Save, StepEnd, Stop


class EarlyStopping(Callback):
    """Stop when a monitored metric has stopped improving, with the semantics of Keras' EarlyStopping.

    Checked at every epoch end on the epoch table's row (``val_loss``, ``val_acc``, ``train_loss``,
    ``running_loss``, ...).

    Args:
        monitor: the epoch-table column to watch.
        min_delta: a change smaller than this is not an improvement.
        patience: epochs without improvement before stopping.
        mode: ``min``, ``max``, or ``auto`` (``max`` for accuracies, ``min`` otherwise).
        baseline: training stops unless the metric beats this within ``patience`` epochs.
        restore_best_weights: at the end of training, restore the weights of the best epoch seen
            (whenever a best exists, as Keras 3 does — also when training was not stopped early).
        start_from_epoch: epochs to wait before monitoring starts (a warm-up).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: Literal["auto", "min", "max"] = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'auto', 'min' or 'max', got {mode!r}")
        if patience < 0 or start_from_epoch < 0:
            raise ConfigError("EarlyStopping patience and start_from_epoch must be >= 0")
        self.monitor = monitor
        self.patience = patience
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        if mode == "auto":
            mode = "max" if monitor.endswith("acc") or "accuracy" in monitor else "min"
        self.mode = mode
        self.min_delta = abs(min_delta)
        self.wait = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights = None
        self.stopped_epoch: int | None = None

    def _improves(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def on_run_start(self, event: RunStart):
        self.wait, self.best, self.best_epoch, self.best_weights, self.stopped_epoch = 0, None, None, None, None
        return None

    def on_epoch_end(self, event: EpochEnd):
        value = event.row.get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            available = ", ".join(k for k in event.row if k not in ("epoch", "step", "samples_seen", "seconds"))
            warnings.warn(f"EarlyStopping: metric {self.monitor!r} is not available; available: {available}")
            return None
        epoch = event.clock.epoch - 1  # Keras counts epochs from 0
        if epoch < self.start_from_epoch:
            return None
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = _copy_weights(event.model)
        self.wait += 1
        if self._improves(value, self.best):
            self.best, self.best_epoch = value, event.clock.epoch
            if self.restore_best_weights:
                self.best_weights = _copy_weights(event.model)
            if self.baseline is None or self._improves(value, self.baseline):
                self.wait = 0
            return None
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = event.clock.epoch
            return Stop(f"early stopping: {self.monitor} did not improve for {self.wait} epochs "
                        f"(best {self.best:.6g} at epoch {self.best_epoch})")
        return None

    def on_run_end(self, event: RunEnd):
        if self.restore_best_weights and self.best_weights is not None:
            return RestoreWeights(self.best_weights, reason=f"best {self.monitor} at epoch {self.best_epoch}")
        return None


def _copy_weights(model):
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})


class Checkpoint(Callback):
    """Write a checkpoint every ``every`` epochs (and at the end), overwriting ``path`` atomically.

    Pass the same path to ``fit(..., resume_from=path)`` to continue a run; it ends with the same
    numbers as an uninterrupted run.
    """

    def __init__(self, path: str | Path, every: int = 1):
        if every < 1:
            raise ConfigError("Checkpoint every must be >= 1 epoch")
        self.path = Path(path)
        self.every = every

    def on_epoch_end(self, event: EpochEnd):
        return Save(self.path) if event.clock.epoch % self.every == 0 else None


def progress_wanted() -> bool:
    """Whether to draw progress by default: on a terminal, and not under CI (whose logs keep every redraw)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class ProgressBar(Callback):
    """A rich progress bar: epoch, step i/steps per epoch, ETA, the batch and running values.

    Redrawn at most ten times a second, so it costs the hot path a clock read per step. It shows
    the rows the driver has read back: it never makes a driver stop to show one.
    """

    step_end_live = False

    @staticmethod
    def wanted() -> bool:
        return progress_wanted()

    def __init__(self):
        self.progress = None
        self.last_draw = 0.0

    def on_run_start(self, event: RunStart):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[values]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.epoch_task = self.progress.add_task(
            "epoch", total=event.clock.steps_per_epoch, epoch=1, epochs=event.clock.epochs, values=""
        )
        return None

    def on_step_end(self, event: StepEnd):
        now = time.monotonic()
        if self.progress is None or (now - self.last_draw < 0.1 and event.clock.step_in_epoch != event.clock.steps_per_epoch):
            return None
        self.last_draw = now
        row = event.row
        values = f"batch_loss {row['batch_loss']:.4f}  running_loss {row['running_loss']:.4f}"
        if "running_acc" in row:
            values += f"  running_acc {row['running_acc']:.4f}"
        self.progress.update(self.epoch_task, completed=event.clock.step_in_epoch, epoch=event.clock.epoch, values=values)
        return None

    def on_epoch_end(self, event: EpochEnd):
        if self.progress is not None:
            row = event.row
            shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("_loss", "_acc")))
            self.progress.console.print(f"epoch {event.clock.epoch}: {shown}")
            if event.clock.step < event.clock.total_steps:  # the bar moves on only to an epoch that will run
                # reset(**fields) would replace every field (rich drops the others); set them by update.
                self.progress.reset(self.epoch_task, total=event.clock.steps_per_epoch)
                self.progress.update(self.epoch_task, epoch=event.clock.epoch + 1, values="")
        return None

    def on_run_end(self, event: RunEnd):
        if self.progress is not None:
            # stop() draws one last frame: the epoch and step where the run really ended (an early
            # stop or an interruption ends before the planned last epoch).
            self.progress.update(self.epoch_task, epoch=max(event.clock.epoch, 1),
                                 completed=event.clock.step_in_epoch)
            self.progress.stop()
            self.progress = None
        return None
