"""The one training loop.

`fit` trains a model on an in-memory dataset by mini-batches: every epoch draws a fresh seeded
permutation, batches are slices of it, and every eager update is one call of `train_update` (a
compiled one, `batchlab.compiled`). What the run
measures (step, evaluation and epoch rows, the running mean, probes, events, divergence) is kept
by the measurement core, `batchlab.record.Recorder`; this module computes the steps and the
evaluations and hands the numbers over. It knows nothing of stores, plots or the command line.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as data_lib
from . import schedule
from .adaptive import adaptive_betas
from .config import Adaptive, TrainConfig
from .drive import drive
from .errors import ConfigError, ModelError, error_line
from .events import Callback, Clock
from .metrics import (
    correct_count,
    correct_counts,
    evaluate_splits,
    evaluation_splits,
    loss_function,
    mean_loss_function,
)
from .optim import build_optimizer, scaled_lr, set_lr
from .record import Recorder, Run, StepNumbers, step_table, summarize_evals

# What a stretch may hold at once (`_stretch_length`): eagerly, its outputs until its numbers are read
# (16 MB in float32); compiled, its batches' inputs gathered for the one graph (64 MB in float32).
EAGER_OUTPUTS = 1 << 22
GATHERED_INPUTS = 1 << 24

__all__ = ["Run", "check_model", "fit", "has_batch_norm", "plan_batch_norm", "plan_run", "resolve_device", "step_table",
           "summarize_evals", "train_step"]


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
    changes = schedule.resolve(config.batch_size, n)
    total, epochs, first_epoch = schedule.plan_steps(changes, n, config.drop_last, config.epochs, config.max_steps)
    note = ""
    if isinstance(config.batch_size, Adaptive):  # planned at its start; re-planned as it grows
        adaptive = config.batch_size
        signal = "local critical batch size" if adaptive.signal == "local_cbs" else "noise scale B_simple"
        note = f"adaptive up to {min(adaptive.max, n)} by the {signal}"
    return Clock(n_train=n, batch_size=changes[0][1], steps_per_epoch=first_epoch, total_steps=total, epochs=epochs,
                 changes=changes if len(changes) > 1 or note else (), note=note)


def has_batch_norm(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a batch-norm layer (any ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy ones)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def plan_batch_norm(model: torch.nn.Module, n_train: int, config: TrainConfig,
                    world_size: int = 1) -> tuple[TrainConfig, str | None]:  # fmt: skip
    """Fit the run to batch norm, which in train mode needs at least 2 samples per batch in each process.

    A batch of one sample has no variance to normalise by (torch raises inside the step), so:

    - a batch size that gives a process 1 sample (``batch_size=1``, or ``full`` split over more
      ranks than half the samples) is refused before training;
    - a last batch of an epoch that would give some process fewer than 2 samples (N mod B = 1 in
      one process; under DDP, a last global batch smaller than 2 per rank) is dropped, as
      ``drop_last`` does: the returned config has ``drop_last=True`` (stored with the run), and
      the note says so for the accounting line.

    Args:
        model: the model to train; without batch norm the config is returned unchanged.
        n_train: N, the training set's size.
        config: the run's config; ``batch_size`` is per process (per rank under DDP).
        world_size: the processes sharing each global batch (1 outside data-parallel training).

    Returns:
        The config to train with, and a one-line note when the last batch is dropped (else None).

    Raises:
        ConfigError: a batch gives some process a single sample.
    """
    if not has_batch_norm(model):
        return config, None
    per_process = -(-n_train // world_size) if config.batch_size == "full" else config.batch_size
    smallest = n_train // world_size if config.batch_size == "full" else per_process
    if smallest < 2:
        where = f"batch_size {config.batch_size}" + (f" over {world_size} ranks" if world_size > 1 else "")
        raise ConfigError(f"the model has batch norm, which needs at least 2 samples per batch in training; "
                          f"{where} gives a process 1 sample: use a batch size of 2 or more per process, or a "
                          "model without batch norm")
    if config.batch_size == "full" or config.drop_last:
        return config, None
    last = n_train % (per_process * world_size)  # the last global batch, split over the processes
    if last == 0 or last // world_size >= 2:
        return config, None
    short = f"{last} sample" + ("s" if last != 1 else "")
    note = (f"the last batch of {short} is dropped each epoch (batch norm needs at least 2 samples"
            + (" per rank)" if world_size > 1 else ")"))
    return config.model_copy(update={"drop_last": True}), note


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


def train_step(model, optimizer, loss_fn, mean_loss_fn, xb, yb, classification: bool, probes=None) -> StepNumbers:
    """One update on one batch: forward in train mode, backward, optimizer step.

    ``loss`` and ``correct`` come from this forward pass, i.e. at the weights before the update
    (Keras computes its logged batch metrics the same way). ``probes`` (a `ProbeSet`) may look at
    the live graph, the gradients and the new weights at their three points.
    """
    loss, output = train_update(model, optimizer, loss_fn, mean_loss_fn, xb, yb, probes)
    return StepNumbers(loss, correct_count(output, yb) if classification else None)


def train_update(model, optimizer, loss_fn, mean_loss_fn, xb, yb, probes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward in train mode, backward, optimizer step; the probes (a `ProbeSet`) at their three points.

    Returns:
        The batch's mean loss () and the model's outputs (B, ...), detached, from the forward pass
        before the update, not synchronised.
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
    return loss.detach(), output.detach()


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
        config: a `TrainConfig` (defaults: batch 32, SGD lr 0.01, 10 epochs). With batch norm in
            the model, a batch of one sample is refused and a last batch of one is dropped
            (`plan_batch_norm`; the run's config then says ``drop_last=True``).
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
    from .callbacks import (  # the bar is a callback like any other
        ProgressBar,
        progress_wanted,
    )
    from .checks import check_arguments, check_items
    from .probes import ProbeSet

    check_arguments("fit", model=(model, torch.nn.Module), dataset=(dataset, data_lib.Dataset),
                    config=(config, (TrainConfig, type(None))))
    check_items("fit", "callbacks", callbacks, Callback)
    config = config or TrainConfig()
    config, _ = plan_batch_norm(model, dataset.n_train, config)  # its note is the command line's to print
    clock = plan_run(dataset, config)
    device = resolve_device(config.device)
    dataset = dataset.to(device)
    model.to(device)
    check_model(model, dataset)
    loss_fn = loss_function(config.loss, dataset.task)
    callbacks = list(callbacks)
    if isinstance(config.batch_size, Adaptive):
        from .adaptive import AdaptiveBatch

        callbacks.append(AdaptiveBatch(config.batch_size, min(config.batch_size.max, dataset.n_train)))
    if progress is None:
        progress = progress_wanted()
    if progress:
        callbacks.append(ProgressBar())
    with _seeded(config.seed, device):
        state = _LoopState.start(model, dataset, config, clock, loss_fn)
        probe_set = ProbeSet.create(probes, model, dataset, config, loss_fn)
        state.recorder = Recorder(
            clock, model=model, classification=dataset.n_classes is not None, callbacks=callbacks, config=config,
            dataset=dataset.name, probes=probe_set, probe_every=config.probe_every,
            eval_every=config.eval_every, save=state.checkpoint,
            optimizer=state.optimizer, data=dataset,
        )
        if resume_from is not None:
            state.restore(resume_from)
        return _train(state)


@dataclass
class _LoopState:
    """What the loop itself keeps besides the core: the model, data, optimizer and data order."""

    model: torch.nn.Module
    dataset: data_lib.Dataset
    config: TrainConfig
    loss_fn: Any  # per-sample losses (evaluation, probes)
    mean_loss_fn: Any  # the batch's mean loss, fused (the update)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the data order, separate from the dropout RNG
    base_lr: float  # the lr after `scaled_lr` at the first batch size
    splits: dict  # the splits every evaluation passes over
    recorder: Recorder = None  # type: ignore[assignment]  # set by fit once the probes exist
    compiled: Any = None  # a `batchlab.compiled.CompiledStep` for unmeasured steps, or None: eager
    current_lr: float | None = None  # the lr the optimizer (and the compiled step) hold; None: unknown

    @classmethod
    def start(cls, model, dataset, config, clock, loss_fn) -> "_LoopState":
        base_lr = scaled_lr(config, clock.batch_size)
        return cls(
            model=model,
            dataset=dataset,
            config=config,
            loss_fn=loss_fn,
            mean_loss_fn=mean_loss_function(config.loss, dataset.task),
            optimizer=build_optimizer(model.parameters(), config, base_lr),
            generator=torch.Generator().manual_seed(config.seed),
            base_lr=base_lr,
            splits=evaluation_splits(dataset, config.eval_train),
        )

    def lr_of(self, step: int, batch_size: int, epochs_done: int) -> float:
        """The learning rate of update ``step``, made at ``batch_size`` (the B in force) after
        ``epochs_done`` epochs (`batchlab.schedule.step_lr`)."""
        return schedule.step_lr(self.config, self.recorder.clock, step, batch_size, epochs_done, self.base_lr)

    def use_lr(self, lr: float) -> None:
        """The next update's learning rate, into the optimizer and the compiled step when it changed."""
        if lr != self.current_lr:
            set_lr(self.optimizer, lr)
            if self.compiled is not None:
                self.compiled.set_lr(lr)
            self.current_lr = lr

    @property
    def members(self) -> tuple[Recorder]:
        """The run as `batchlab.drive.drive`'s group: one core."""
        return (self.recorder,)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.config.batch_size, Adaptive)

    def recut(self, order: torch.Tensor, batches: list[torch.Tensor], at: int, start: int) -> list[torch.Tensor]:
        """After the batch size changed inside an epoch (an adaptive decision): the epoch's batches
        re-cut from batch ``at`` (order position ``start``) on, and the run followed to the new batch
        (`batch_size_changed`). Returns the epoch's batches."""
        batches = batches[:at] + schedule.cut_epoch(order, self.recorder.clock, self.config.drop_last, start)
        self.batch_size_changed(len(batches))
        return batches

    def batch_size_changed(self, steps_per_epoch: int | None = None) -> None:
        """The run's length re-planned (and the epoch's, where it was re-cut), Adam's β₂ moved to the
        new batch."""
        self.replan(steps_per_epoch)
        if self.config.optimizer in ("adam", "adamw"):
            for group in self.optimizer.param_groups:
                group["betas"] = adaptive_betas(self.config, self.recorder.clock.batch_size)

    def replan(self, steps_per_epoch: int | None = None) -> None:
        """The run's length from its batch sizes so far and from now on: the clock's schedule holds
        every batch size the run has trained at, where it took effect, so the plan of the whole run
        from them is the plan of what is left."""
        clock, config = self.recorder.clock, self.config
        total, epochs, _ = schedule.plan_steps(clock.changes, clock.n_train, config.drop_last, config.epochs,
                                               config.max_steps)
        self.recorder.replan(steps_per_epoch or clock.steps_per_epoch, total, epochs)

    def epoch_batches(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next epoch's sample order and its batches (index tensors), on the data's device."""
        return schedule.draw_epoch(self.recorder.clock, self.generator, self.config.shuffle, self.config.drop_last,
                                   self.dataset.train[0].device)

    def run_epoch(self, order: torch.Tensor, batches: list[torch.Tensor]) -> None:
        _run_epoch(self, order, batches)

    def settle(self, members: Sequence[Recorder] = ()) -> bool:
        """Act on the callbacks' requests; a batch-size change between epochs re-plans the run.
        (``members``: `drive`'s group, always this run.)"""
        changes = self.recorder.clock.changes
        going = self.recorder.settle()
        if self.recorder.clock.changes is not changes:
            self.batch_size_changed()
        return going

    def evaluate(self, members: Sequence[Recorder] = ()) -> None:
        """Full passes at the current weights, handed to the core with their time. (``members``:
        `drive`'s group, always this run.)"""
        started = time.perf_counter()
        metrics = evaluate_splits(self.model, self.splits, self.loss_fn, self.dataset.n_classes is not None,
                                  self.config.eval_batch_size)
        self.recorder.record_evaluation(metrics, time.perf_counter() - started)

    def checkpoint(self, path: Path) -> None:
        """Write everything needed to continue bit-identically, atomically (temp file, then rename).

        Tensors (weights, optimizer state, RNG states) and plain containers only, so that `restore`
        reads it with ``torch.load(weights_only=True)``; the config, clock and tables go as one JSON
        text beside them.
        """
        path = Path(path)
        probes = self.recorder.probes
        meta = {"config": self.config.model_dump(mode="json"), **self.recorder.state()}
        blob = {
            "meta": json.dumps(meta),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "probe_states": probes.saved_states() if probes is not None else None,
        }
        temporary = path.with_name(path.name + ".tmp")
        torch.save(blob, temporary)
        temporary.replace(path)

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint; a file that is not one of ours is refused, and nothing in it runs."""
        blob = load_checkpoint(path, self.dataset.device)
        try:
            meta = json.loads(blob["meta"])
            saved = TrainConfig(**meta["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"checkpoint {path} is not a batchlab checkpoint ({type(error).__name__}); "
                              "resume from a file written by Checkpoint") from None
        why = resume_mismatch(saved, self.config, meta["clock"]["samples_seen"], self.dataset.n_train)
        if why:
            raise ConfigError(f"checkpoint {path} was written by a run with another config ({why}); resume with "
                              "the same config, changing only what comes after the checkpoint")
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.generator.set_state(blob["generator"])
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        if self.adaptive:  # its decisions so far are in the checkpoint's clock; its length follows this config
            self.recorder.load_state(meta)
            self.replan()
        else:
            self.recorder.load_state(meta, plan=self.recorder.clock)
        if self.recorder.probes is not None and blob["probe_states"] is not None:
            self.recorder.probes.load_saved_states(blob["probe_states"])


# What a resumed run may change: only what happens after the checkpoint.
FUTURE_FIELDS = ("batch_size", "lr", "lr_scaling", "reference_batch_size", "epochs", "max_steps")


def resume_mismatch(saved: TrainConfig, config: TrainConfig, samples_seen: int, n_train: int) -> str | None:
    """Why ``config`` cannot continue a run checkpointed under ``saved`` after ``samples_seen`` samples,
    or None. It may change the learning rate, the run's length and the batch sizes from the
    checkpoint on (a branch at another batch size and lr); everything else, and every batch size
    before the checkpoint, must be the same."""
    changed = [name for name in TrainConfig.model_fields
               if name not in FUTURE_FIELDS and getattr(saved, name) != getattr(config, name)]
    if changed:
        return "it differs in " + ", ".join(changed)
    before = schedule.resolve(saved.batch_size, n_train), schedule.resolve(config.batch_size, n_train)
    if schedule.until(before[0], samples_seen) != schedule.until(before[1], samples_seen):
        return f"its batch sizes before the checkpoint's {samples_seen} samples differ"
    return None


def load_checkpoint(path: str | Path, device: torch.device) -> dict:
    """Read a checkpoint with the safe loader: tensors and plain containers, no code.

    Raises:
        ConfigError: the file cannot be read, or holds anything else (a pickled object, code).
    """
    try:
        blob = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError:
        raise ConfigError(f"checkpoint {path} holds objects other than tensors and plain values; it was not "
                          "loaded (nothing in it was run); resume from a file written by Checkpoint") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ConfigError(f"cannot read checkpoint {path}: {str(error).splitlines()[0] if str(error) else error!r}") from None
    if not isinstance(blob, dict):
        raise ConfigError(f"checkpoint {path} is not a batchlab checkpoint; resume from a file written by Checkpoint")
    return blob


def _choose_step(state: _LoopState) -> None:
    """Compile the update or not (``config.compile``); after a resume, so it holds the restored state."""
    from .compiled.choose import fit_step, say_once

    config, clock, rec = state.config, state.recorder.clock, state.recorder
    if state.adaptive:  # its batch sizes and Adam's β₂ are decided as it goes
        if config.compile == "on":
            say_once("compile: an adaptive batch size trains eagerly")
        return
    probing = rec.probes is not None and rec.probes.active
    changes = clock.changes or ((0, clock.batch_size),)
    state.compiled = fit_step(
        config.compile, state.model, state.optimizer, state.mean_loss_fn, state.dataset.n_classes is not None,
        state.dataset.train, schedule.sizes_used(changes, clock.n_train, config.drop_last, clock.total_steps),
        clock.total_steps - clock.step, config.probe_every if probing else None)


def _train(state: _LoopState) -> Run:
    rec = state.recorder
    _choose_step(state)
    try:
        return drive(state)[0]  # drive records a Ctrl-C (interrupted)
    except Exception as error:  # the run is stored as failed, with the rows it made, and the error goes on
        rec.finish("failed", error_line(error))
        raise


def _run_epoch(state: _LoopState, order: torch.Tensor, batches: list[torch.Tensor]) -> None:
    """The steps of one epoch, a stretch at a time: the updates until something looks at the run
    (`batchlab.looks`) are made without reading their numbers, which go to the core in one read
    (one compiled graph, or eager steps whose losses and outputs stay tensors until then). A step a
    probe measures runs alone, eagerly, through the probes' points. The hot path.

    Args:
        order: the epoch's sample order (N,); ``batches`` are consecutive slices of it.
        batches: the epoch's batches, as index tensors.
    """
    rec = state.recorder
    X, y = state.dataset.train
    classification = state.dataset.n_classes is not None
    done = rec.clock.epoch - 1  # epochs completed before this one
    changes = rec.clock.changes  # the batch sizes planned; an adaptive decision replaces them
    step, total = rec.clock.step, rec.clock.total_steps
    start = 0  # where the next batch starts in the epoch's order
    at = 0  # the next batch of the epoch
    while at < len(batches) and step < total:
        started = time.perf_counter()
        b = batches[at].numel()
        if rec.measuring():
            lr = state.lr_of(step, rec.clock.batch_size, done)
            state.use_lr(lr)
            out = train_step(state.model, state.optimizer, state.loss_fn, state.mean_loss_fn, X[batches[at]],
                             y[batches[at]], classification, rec.probes)
            rec.record_step(b, lr, out.loss.item(), out.correct.item() if classification else None,
                            time.perf_counter() - started, rec.probes.collect())
            count = 1
        else:
            count = _stretch_length(state, step, batches, at)
            lrs = schedule.stretch_lrs(state.config, rec.clock, step, count, rec.clock.batch_size, done,
                                       state.base_lr)
            out, count = _stretch(state, order[start:start + count * b].view(count, b), lrs)
            losses = out.loss.tolist()
            corrects = out.correct.tolist() if classification else [None] * count
            seconds = (time.perf_counter() - started) / count
            # A loss that is not finite stops the rows there; the stretch's later updates are made
            # (the run is diverged: its weights are not finite either).
            rec.record_steps([(b, lr, loss, correct, seconds, None) for lr, loss, correct in zip(lrs, losses, corrects)])
        step, at, start = step + count, at + count, start + count * b
        if not _after_step(state):
            return
        if rec.clock.changes is not changes:  # the batch size changed: re-cut the rest of the epoch
            batches, changes = state.recut(order, batches, at, start), rec.clock.changes


def _stretch(state: _LoopState, index: torch.Tensor, lrs: list[float]) -> tuple[StepNumbers, int]:
    """The updates on the batches ``index`` (K, B), at the learning rates ``lrs``, their numbers as
    (K,) tensors: one compiled graph where the compiled step takes them all, else one compiled step
    (the others wait for the next stretch), else eagerly. Returns the numbers and how many updates
    were made."""
    X, y = state.dataset.train
    compiled = state.compiled
    if compiled is not None and len(lrs) > 1:
        out = compiled.steps(*schedule.gather_batches(X, y, index), torch.tensor(lrs, dtype=torch.float64,
                                                                                 device=X.device))
        if out is not None:
            state.use_lr(lrs[-1])  # the optimizer's own lr follows (checkpoints, probes' steps)
            return out, len(lrs)
        index, lrs = index[:1], lrs[:1]
    if compiled is not None:
        state.use_lr(lrs[0])
        out = compiled(X[index[0]], y[index[0]])
        return StepNumbers(out.loss.reshape(1), None if out.correct is None else out.correct.reshape(1)), 1
    return _eager_stretch(state, index, lrs), len(lrs)


def _eager_stretch(state: _LoopState, index: torch.Tensor, lrs: list[float]) -> StepNumbers:
    """Eager updates on the batches ``index`` (K, B), none of them read back: the losses and the
    outputs stay tensors, and the correct counts are taken from all the outputs at once."""
    X, y = state.dataset.train
    losses, outputs = [], []
    for k, lr in enumerate(lrs):
        state.use_lr(lr)
        loss, output = train_update(state.model, state.optimizer, state.loss_fn, state.mean_loss_fn, X[index[k]],
                              y[index[k]])
        losses.append(loss)
        outputs.append(output)
    if state.dataset.n_classes is None:
        return StepNumbers(torch.stack(losses), None)
    return StepNumbers(torch.stack(losses), correct_counts(torch.stack(outputs), y[index]))


def _after_step(state: _LoopState) -> bool:
    """After a step's (or a stretch's) rows: evaluate where due, act on requests. False: the epoch ends here."""
    rec = state.recorder
    if rec.status == "diverged":
        return False
    if rec.evaluation_due():
        state.evaluate()
    return not (rec.wants_attention and not rec.settle())


def _stretch_length(state: _LoopState, step: int, batches: list[torch.Tensor], at: int) -> int:
    """How many of the next updates make one stretch: until something looks at the run
    (`batchlab.looks.Looks.stretch`: an evaluation, a measured step, a callback's step, the read-back
    window), within the epoch's batches of the size in force; as many as the compiled step takes in
    one graph (`CompiledStep.chunk_length`) within `GATHERED_INPUTS`, or, eagerly, as many as
    `EAGER_OUTPUTS` kept outputs allow."""
    rec = state.recorder
    b = rec.clock.batch_size
    limit = min(rec.clock.total_steps - step, len(batches) - at)
    if state.compiled is not None:
        limit = min(limit, max(1, GATHERED_INPUTS // (b * state.dataset.train[0][0].numel())))
    elif state.dataset.n_classes is not None:
        limit = min(limit, max(1, EAGER_OUTPUTS // (b * state.dataset.n_classes)))
    count = schedule.of_one_size(batches, at, rec.looks.stretch(step, limit), b)
    return max(1, state.compiled.chunk_length(count) if state.compiled is not None else count)
