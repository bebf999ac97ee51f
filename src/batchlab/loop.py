"""The one training loop.

`fit` trains a model on an in-memory dataset by mini-batches: every epoch draws a fresh seeded
permutation, batches are slices of it, and every update is one call of `train_step`. The step and
epoch counters live in one `Clock`. Everything the loop measures leaves it as rows of three tables
(steps, evaluations, epochs) and as typed events for callbacks; the loop knows nothing of stores,
plots or the command line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import data as data_lib
from .config import TrainConfig
from .errors import ConfigError, ModelError
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
    StepEnd,
    Stop,
)
from .metrics import RunningMean, correct_count, evaluate, loss_function, mean_loss_function
from .optim import build_optimizer, lr_at, scaled_lr, set_lr


@dataclass
class Run:
    """The result of `fit`: the config, the three tables and how the run ended.

    Attributes:
        steps: one row per update: ``step, epoch, samples_seen, batch_size, lr, batch_loss,
            batch_acc, running_loss, running_acc, seconds``, probe columns, and the full-pass
            metrics (``train_*, val_*, test_*``) at the steps where evaluation happened.
        evals: one row per full-pass evaluation (step 0 first): ``step, epoch, samples_seen,
            seconds, train_loss, train_acc, val_*, test_*``.
        epochs: one row per epoch: ``epoch, step, samples_seen, lr, running_loss, running_acc``
            (the epoch-end aggregate Keras stores in ``History``), ``train_*, val_*, test_*`` at the
            epoch's end, ``seconds``.
        status: ``finished``, ``stopped`` (a callback asked), ``diverged`` (NaN/inf loss) or
            ``interrupted``.
        seconds: training time, full-pass evaluations excluded (they are in ``eval_seconds``).

    The tables are built from the recorded rows (``step_rows``, ``eval_rows``, ``epoch_rows``) on
    first access, so a run nobody inspects costs no pandas work.
    """

    config: TrainConfig
    dataset: str
    clock: Clock
    status: str
    message: str | None
    model: torch.nn.Module = field(repr=False)
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
        if column.endswith(("_loss", "_acc")):
            out[f"final_{column}"] = float(value)
    for column, better in (("val_acc", max), ("val_loss", min)):
        rows = [r for r in evals if column in r and not math.isnan(r[column])]
        if rows:
            best = better(rows, key=lambda r: r[column])  # the first of equal values, as idxmax does
            out[f"best_{column}"] = float(best[column])
            out[f"best_{column}_step"] = int(best["step"])
    return out


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available) as a torch device, with a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def plan_run(dataset: data_lib.Dataset, config: TrainConfig) -> Clock:
    """Validate the config against the data and work out the run's accounting, before any work.

    Raises:
        ConfigError: a batch size larger than the training set (without ``full``), or a run of 0 steps.
    """
    n = dataset.n_train
    if config.batch_size == "full":
        batch_size = n
    else:
        batch_size = config.batch_size
        if batch_size > n:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the training set ({n} samples); "
                f"use a batch size <= {n}, or 'full' for batch gradient descent"
            )
    per_epoch = data_lib.steps_per_epoch(n, batch_size, config.drop_last)
    total = config.epochs * per_epoch if config.epochs is not None else config.max_steps
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return Clock(
        n_train=n,
        batch_size=batch_size,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=math.ceil(total / per_epoch),
    )


def check_model(model: torch.nn.Module, dataset: data_lib.Dataset) -> None:
    """Run two samples through the model and check its output fits the labels, with a clear error."""
    X, y = dataset.train
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(X[:2])
    except Exception as error:  # any failure here is a model/data mismatch the user must fix
        raise ModelError(
            f"the model cannot take this dataset's inputs of shape {tuple(X.shape[1:])}: "
            f"{type(error).__name__}: {error}"
        ) from None
    finally:
        model.train(was_training)
    if dataset.n_classes is not None:
        if output.ndim != 2 or output.shape[1] != dataset.n_classes:
            raise ModelError(
                f"the model outputs shape {tuple(output.shape[1:])} per sample but the dataset has "
                f"{dataset.n_classes} classes; its last layer must give {dataset.n_classes} logits"
            )
    elif output[0].numel() != y[0].numel():
        raise ModelError(
            f"the model outputs {output[0].numel()} values per sample but the targets have {y[0].numel()}"
        )


@dataclass
class StepOutput:
    """What one update returns: the batch's mean loss and correct count, as unsynchronised tensors."""

    loss: torch.Tensor
    correct: torch.Tensor | None


def train_step(model, optimizer, loss_fn, mean_loss_fn, xb, yb, classification: bool, probes=None) -> StepOutput:
    """One update on one batch: forward in train mode, backward, optimizer step.

    ``loss`` and ``correct`` come from this forward pass, i.e. at the weights before the update
    (Keras computes its logged batch metrics the same way). ``probes`` (a `ProbeSet`) may look at
    the live graph, the gradients and the new weights at their three points.
    """
    output = model(xb)  # (B, K)
    if probes is not None and probes.wants_losses:
        losses = loss_fn(output, yb)  # (B,) with their graph, for probes that split the batch
        loss = losses.mean()
        probes.after_forward(losses)
    else:
        loss = mean_loss_fn(output, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if probes is not None:
        probes.after_backward()
    optimizer.step()
    if probes is not None:
        probes.after_update()
    correct = correct_count(output.detach(), yb) if classification else None
    return StepOutput(loss.detach(), correct)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's global RNG (dropout masks) for the run without disturbing the caller's RNG.

    Seeds only the generators the run uses: ``torch.manual_seed`` also visits every accelerator
    backend, which costs ~0.2 ms, a visible share of a short run.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.default_generator.manual_seed(seed)
    if cuda_state is not None:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


class _Dispatch:
    """Calls every callback for an event and collects their requests."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)
        # Only callbacks that override on_step_end are called per step (the hot path).
        self.per_step = [c for c in self.callbacks if type(c).on_step_end is not Callback.on_step_end]

    def __call__(self, method: str, event) -> list:
        targets = self.per_step if method == "on_step_end" else self.callbacks
        return [r for c in targets if (r := getattr(c, method)(event)) is not None]


def fit(
    model: torch.nn.Module,
    dataset: data_lib.Dataset,
    config: TrainConfig | None = None,
    *,
    probes: Sequence[Any] = (),
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
    resume_from: str | Path | None = None,
) -> Run:
    """Train ``model`` on ``dataset`` by mini-batches and record every metric view.

    Args:
        model: any ``torch.nn.Module`` mapping a batch of inputs to logits (or regression outputs).
        dataset: a `batchlab.data.Dataset`; its tensors are moved to the config's device.
        config: a `TrainConfig` (defaults: batch 32, SGD lr 0.01, 10 epochs).
        probes: names (``"grad_norm"``, ``"noise_scale"``, ...) or probe objects, measured every
            ``config.probe_every`` steps into the step table.
        callbacks: `batchlab.events.Callback` objects (EarlyStopping, Checkpoint, a store recorder).
        progress: show a progress bar; default: when stderr is a terminal.
        resume_from: a checkpoint written by `Checkpoint`; training continues from it and gives the
            same numbers as an uninterrupted run.

    Returns:
        A `Run` with the ``steps``, ``evals`` and ``epochs`` tables.

    Example:
        >>> ds = bl.load_dataset("blobs")
        >>> run = bl.fit(bl.build_model("mlp", ds, hidden=[50]), ds, bl.TrainConfig(batch_size=32, epochs=5))
        >>> run.epochs[["epoch", "running_acc", "train_acc", "val_acc"]]
    """
    from .callbacks import ProgressBar  # the bar is a callback like any other
    from .checks import check_arguments, check_items
    from .probes import ProbeSet

    check_arguments("fit", model=(model, torch.nn.Module), dataset=(dataset, data_lib.Dataset), config=(config, (TrainConfig, type(None))))
    check_items("fit", "callbacks", callbacks, Callback)
    config = config or TrainConfig()
    clock = plan_run(dataset, config)
    device = resolve_device(config.device)
    dataset = dataset.to(device)
    model.to(device)
    check_model(model, dataset)
    loss_fn = loss_function(config.loss, dataset.task)
    callbacks = list(callbacks)
    if progress is None:
        progress = ProgressBar.wanted()
    if progress:
        callbacks.append(ProgressBar())
    with _seeded(config.seed, device):
        state = _LoopState.start(model, dataset, config, clock, loss_fn)
        state.probes = ProbeSet.create(probes, model, dataset, config, loss_fn)
        if resume_from is not None:
            state.restore(resume_from)
        return _train(state, state.probes, _Dispatch(callbacks))


@dataclass
class _LoopState:
    """Everything that changes while training, in one place (and in every checkpoint)."""

    model: torch.nn.Module
    dataset: data_lib.Dataset
    config: TrainConfig
    clock: Clock
    loss_fn: Any  # per-sample losses (evaluation, probes)
    mean_loss_fn: Any  # the batch's mean loss, fused (the update)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the data order, separate from the dropout RNG
    base_lr: float
    probes: Any = None  # the run's ProbeSet; its states travel in checkpoints
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    eval_seconds: float = 0.0
    delivered_steps: int = 0  # rows already handed to callbacks in an EpochEnd
    delivered_evals: int = 0

    @classmethod
    def start(cls, model, dataset, config, clock, loss_fn) -> "_LoopState":
        base_lr = scaled_lr(config, clock.batch_size)
        return cls(
            model=model,
            dataset=dataset,
            config=config,
            clock=clock,
            loss_fn=loss_fn,
            mean_loss_fn=mean_loss_function(config.loss, dataset.task),
            optimizer=build_optimizer(model.parameters(), config, base_lr),
            generator=torch.Generator().manual_seed(config.seed),
            base_lr=base_lr,
        )

    def checkpoint(self, path: Path) -> None:
        """Write everything needed to continue bit-identically, atomically (temp file, then rename)."""
        path = Path(path)
        blob = {
            "config": self.config.model_dump(mode="json"),
            "clock": self.clock,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tables": (self.steps, self.evals, self.epochs),
            "seconds": (self.seconds, self.eval_seconds),
            "probe_states": self.probes.states if self.probes is not None else None,
        }
        temporary = path.with_name(path.name + ".tmp")
        torch.save(blob, temporary)
        temporary.replace(path)

    def restore(self, path: str | Path) -> None:
        try:
            blob = torch.load(path, weights_only=False, map_location=self.dataset.device)
        except (OSError, RuntimeError, EOFError) as error:
            raise ConfigError(f"cannot read checkpoint {path}: {error}") from None
        saved = TrainConfig(**blob["config"])
        if saved != self.config:
            raise ConfigError(f"checkpoint {path} was written by a run with another config; resume with the same config")
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.generator.set_state(blob["generator"])
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        self.clock = blob["clock"]
        self.steps, self.evals, self.epochs = (list(t) for t in blob["tables"])
        self.seconds, self.eval_seconds = blob["seconds"]
        if self.probes is not None and blob["probe_states"] is not None:
            self.probes.states = blob["probe_states"]
        self.delivered_steps, self.delivered_evals = len(self.steps), len(self.evals)


def _evaluate_all(state: _LoopState) -> dict[str, float]:
    """Full passes over train (if enabled), val and test at the current weights."""
    classification = state.dataset.n_classes is not None
    splits = {"train": state.dataset.train if state.config.eval_train else None,
              "val": state.dataset.val, "test": state.dataset.test}
    metrics: dict[str, float] = {}
    for name, split in splits.items():
        if split is None:
            continue
        loss, acc = evaluate(state.model, split, state.loss_fn, classification, state.config.eval_batch_size)
        metrics[f"{name}_loss"] = loss
        if classification:
            metrics[f"{name}_acc"] = acc
    return metrics


def _run_evaluation(state: _LoopState, dispatch: _Dispatch) -> tuple[dict[str, float], list]:
    started = time.perf_counter()
    metrics = _evaluate_all(state)
    state.eval_seconds += time.perf_counter() - started
    clock = state.clock
    row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
           "seconds": state.seconds, **metrics}
    state.evals.append(row)
    requests = dispatch("on_evaluation", Evaluation(clock, metrics, state.seconds, state.model))
    # Callbacks may add metrics measured at these weights (events.AddMetrics): they join the row
    # before it is delivered to the store and the epoch row.
    added = {k: v for r in requests if isinstance(r, AddMetrics) for k, v in r.values.items()}
    if added:
        row.update({k: v for k, v in added.items() if k not in row})
        metrics = {**metrics, **{k: v for k, v in added.items() if k not in metrics}}
    return metrics, [r for r in requests if not isinstance(r, AddMetrics)]


def _metrics_of(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.endswith(("_loss", "_acc"))}


def _train(state: _LoopState, probes, dispatch: _Dispatch) -> Run:
    status, message = "finished", None
    config, dataset, model = state.config, state.dataset, state.model
    requests = dispatch("on_run_start", RunStart(config, dataset.name, state.clock, model, probes.names))
    if not state.evals:
        requests += _run_evaluation(state, dispatch)[1]
    status, message = _handle(requests, state, status, message)
    model.train()
    try:
        while status == "finished" and state.clock.step < state.clock.total_steps:
            state.clock = replace(state.clock, epoch=state.clock.epoch + 1, step_in_epoch=0)
            running = RunningMean()  # Keras resets its metrics when an epoch begins
            status, message = _run_epoch(state, probes, dispatch, running)
            if status == "diverged":
                break
            status, message = _end_epoch(state, dispatch, running, status, message)
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted at step {state.clock.step}"
        _finish(state, dispatch, status, message)
        raise
    return _finish(state, dispatch, status, message)


def _run_epoch(state: _LoopState, probes, dispatch: _Dispatch, running: RunningMean) -> tuple[str, str | None]:
    """The steps of one epoch. The hot path: counters are plain ints, a `Clock` is made only for events."""
    config, model, optimizer = state.config, state.model, state.optimizer
    X, y = state.dataset.train
    classification = state.dataset.n_classes is not None
    eval_every = 0 if config.eval_every == "epoch" else config.eval_every
    clock = state.clock
    step, in_epoch, seen, total = clock.step, 0, clock.samples_seen, clock.total_steps
    current_lr = None
    order = data_lib.epoch_order(clock.n_train, state.generator, config.shuffle).to(X.device)
    last = time.perf_counter()
    for index in data_lib.batch_indices(order, clock.batch_size, config.drop_last):
        if step >= total:
            break
        lr = lr_at(step, config, state.base_lr, clock.steps_per_epoch, total)
        if lr != current_lr:
            set_lr(optimizer, lr)
            current_lr = lr
        measuring = probes.active and step % config.probe_every == 0
        out = train_step(model, optimizer, state.loss_fn, state.mean_loss_fn, X[index], y[index], classification,
                         probes if measuring else None)
        batch_loss = out.loss.item()
        b = index.numel()
        step, in_epoch, seen = step + 1, in_epoch + 1, seen + b
        row = {"step": step, "epoch": clock.epoch, "samples_seen": seen, "batch_size": b, "lr": lr,
               "batch_loss": batch_loss}
        if classification:
            batch_correct = out.correct.item()
            running.update(batch_loss, batch_correct, b)
            row.update(batch_acc=batch_correct / b, running_loss=running.loss, running_acc=running.acc)
        else:
            running.update(batch_loss, 0, b)
            row["running_loss"] = running.loss
        now = time.perf_counter()
        state.seconds += now - last
        last = now
        row["seconds"] = state.seconds
        if measuring:
            row.update(probes.collect())
        state.steps.append(row)
        evaluating = eval_every and step % eval_every == 0 and in_epoch < clock.steps_per_epoch
        finite = math.isfinite(batch_loss)
        if not (dispatch.per_step or evaluating or not finite):
            continue
        state.clock = clock = replace(clock, step=step, step_in_epoch=in_epoch, samples_seen=seen)
        requests = dispatch("on_step_end", StepEnd(clock, row, model)) if dispatch.per_step else []
        if not finite:
            return "diverged", (f"loss became {batch_loss} at step {step} (epoch {clock.epoch}) with lr {lr:g}; "
                                "lower the learning rate or check the data")
        if evaluating:
            requests += _run_evaluation(state, dispatch)[1]
            last = time.perf_counter()  # evaluation time is not training time
        status, message = _handle(requests, state, "finished", None)
        if status != "finished":
            return status, message
    state.clock = replace(clock, step=step, step_in_epoch=in_epoch, samples_seen=seen)
    return "finished", None


def _end_epoch(state: _LoopState, dispatch: _Dispatch, running: RunningMean, status: str, message: str | None):
    """Evaluate at the epoch's end, add its row to the epoch table and deliver the `EpochEnd` event."""
    clock = state.clock
    if state.evals and state.evals[-1]["step"] == clock.step:  # evaluated at this step already
        metrics, requests = _metrics_of(state.evals[-1]), []
    else:
        metrics, requests = _run_evaluation(state, dispatch)
    row = {"epoch": clock.epoch, "step": clock.step, "samples_seen": clock.samples_seen,
           "lr": state.steps[-1]["lr"] if state.steps else float("nan"), "running_loss": running.loss}
    if state.dataset.n_classes is not None:
        row["running_acc"] = running.acc
    row.update(metrics)
    row["seconds"] = state.seconds
    state.epochs.append(row)
    event = EpochEnd(clock, row, tuple(state.steps[state.delivered_steps:]),
                     tuple(state.evals[state.delivered_evals:]), state.model)
    state.delivered_steps, state.delivered_evals = len(state.steps), len(state.evals)
    requests += dispatch("on_epoch_end", event)
    return _handle(requests, state, status, message)


def _handle(requests: list, state: _LoopState, status: str, message: str | None) -> tuple[str, str | None]:
    """Act on callbacks' requests: write checkpoints, restore weights, stop."""
    for request in requests:
        if isinstance(request, Save):
            state.checkpoint(request.path)
        elif isinstance(request, RestoreWeights):
            state.model.load_state_dict(request.state_dict)
        elif isinstance(request, Stop) and status == "finished":
            status, message = "stopped", request.reason
    return status, message


def step_table(steps: list[dict], evals: list[dict]) -> pd.DataFrame:
    """The step rows, with the full-pass metrics filled in at the steps where evaluation happened."""
    table = pd.DataFrame(steps)
    if table.empty or not evals:
        return table
    metrics = pd.DataFrame(evals).drop(columns=["epoch", "samples_seen", "seconds"])
    return table.merge(metrics[metrics["step"] > 0], on="step", how="left")


def _finish(state: _LoopState, dispatch: _Dispatch, status: str, message: str | None) -> Run:
    run = Run(
        config=state.config,
        dataset=state.dataset.name,
        clock=state.clock,
        status=status,
        message=message,
        model=state.model,
        seconds=state.seconds,
        eval_seconds=state.eval_seconds,
        step_rows=state.steps,
        eval_rows=state.evals,
        epoch_rows=state.epochs,
    )
    event = RunEnd(state.clock, status, message, run.summary, tuple(state.steps[state.delivered_steps:]),
                   tuple(state.evals[state.delivered_evals:]), state.model)
    _handle(dispatch("on_run_end", event), state, status, message)
    return run
