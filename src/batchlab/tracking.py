"""`bl.track` (this module is `tracking`, so that `bl.track` stays the function): the user's own
training loop feeds the measurement core.

Any model, loss, optimizer and data loader::

    with bl.track(model, optimizer, store="batchlab.db", name="mine", probes=["grad_norm"]) as run:
        for epoch in range(epochs):
            for x, y in loader:                      # any batch size, last batch short or not
                out = model(x); loss = loss_fn(out, y)
                optimizer.zero_grad(); loss.backward()
                run.step(loss, outputs=out, targets=y)   # after backward, before optimizer.step
                optimizer.step()
            run.end_epoch(val={"loss": vl, "acc": va})   # or eval_data=... evaluates for you
    run.steps, run.epochs                            # the same tables as bl.fit's

A step row is the `batchlab.record.Recorder`'s, so every column means what it means in `fit`:
``batch_loss`` is the loss passed to `Tracker.step` (the update's own forward pass), ``running_*``
the Keras running mean reset per epoch, ``lr`` the optimizer's first parameter group's lr at the
update. The row is completed when ``optimizer.step()`` returns (a post-step hook), so probes at the
"update" point (``dist_from_init``, ``update_norm``) see the new weights.

Gradient accumulation: ``accumulate=k`` and one `Tracker.step` per micro-batch; a step row covers k
micro-batches (``batch_size`` their total, ``batch_loss`` their sample-weighted mean), or fewer where
the optimizer steps sooner (an epoch's short last group: a pre-step hook ends the update there).
AMP: pass the ``GradScaler`` as ``scaler=`` and the unscaled loss; gradients are unscaled before
probing, and an update the scaler skipped keeps its row.

Mistakes are refused at the call that made them, in one `batchlab.errors.BatchlabError` line (bad
options in `track`; in `Tracker.step`: a bad loss or batch size, outputs and targets of different
lengths, a second call before ``optimizer.step()``, a first call after it, a call before
``backward`` with gradient probes, a call after the run ended); the rows recorded before stay. A measurement never stops the
training: a probe that cannot measure the model gives NaN with one warning (`batchlab.probes.ProbeSet`),
and the run's message names it. A loop that raises ends the run as ``failed`` (Ctrl-C:
``interrupted``).

The noise scale (``noise_scale`` probe) comes without an extra backward pass where it can:

- with ``accumulate=k`` (k ≥ 2), from the micro-batch gradients (the differences of ``p.grad``
  between micro-batches) against the accumulated one: the two-batch estimator of McCandlish et al.
  2018, App. A.1, with b = micro-batch, B = accumulated batch (`MicroBatchNoise`);
- otherwise, for models whose trained parameters all belong to nn.Linear, nn.Conv1d/2d/3d,
  nn.Embedding, nn.LayerNorm, nn.GroupNorm or nn.RMSNorm layers (any nesting, any subclass that
  keeps their own forward), from per-sample gradient norms read off the backward pass
  (`batchlab.probes.LinearTaps`, `batchlab.probes.per_sample.LayerTaps`), as `fit` does;
- otherwise (batch norm, another layer kind, a parameter used directly) the half-batch method of
  `fit` needs the live graph, which a loop that has already called ``backward`` no longer has: the
  noise-scale columns are NaN, with one warning naming the parameters it cannot measure (use
  ``accumulate``).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .checks import is_whole_number
from .errors import ArgumentError, ConfigError, error_line
from .events import Callback, Clock
from .metrics import evaluate, pass_totals
from .probes import NoiseScale, ProbeSet, ProbeWarning, make_probe, two_batch_estimates
from .probes.estimators import NoiseState, advance, unmeasured
from .record import Recorder, Run

GRADIENT_PROBES = ("grad_norm", "noise_scale", "noise_scale_exact")
# Updates kept as tensors before their numbers are read back in one go: the tracker's read-back window
# (`batchlab.looks.Looks.window`). Reading each step's loss and correct count as it comes would wait
# for the device every step; reading every 64 steps costs one wait per 64, and a diverged loop still
# learns of it (``should_stop``) within 64 steps.
READ_BACK_EVERY = 64


@dataclass(frozen=True)
class TrackConfig:
    """What a tracked run was given, as stored with it (the store reads ``model_dump``)."""

    optimizer: str
    lr: float
    batch_size: int | None = None  # the nominal batch (the first step's), known after the first step
    accumulate: int = 1
    eval_every: int | None = None
    probe_every: int = 1
    amp: bool = False
    seed: int | None = None

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _TrackedData:
    """What probes may know of the user's data: its size (``n_train``) and one batch's shape."""

    name: str
    n_train: int | None
    train: tuple[torch.Tensor, None] | None = None


@dataclass(slots=True)
class _Update:
    """One update whose numbers may still be tensors, read back in bulk by `Tracker._read_back`.

    ``micro`` holds each micro-batch's ``(loss, correct, size)``: the loss a 0-d tensor or a number,
    the correct predictions a (b,) 0/1 tensor (arg-max == target), kept `_Predictions`, a count, or
    None (no accuracy). ``values`` are the probes' values: 0-d tensors, numbers, or
    `batchlab.probes.DeferredRead` entries that `ProbeSet.settle` replaces at the read-back.
    """

    micro: list[tuple[Any, Any, int]]
    lr: float
    values: dict[str, Any]
    measuring: bool
    updated: bool = False  # optimizer.step() has run for it
    seconds: float = 0.0
    scale: torch.Tensor | None = None  # the GradScaler's scale when the update was made (AMP)


def track(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    store: Any = None,
    name: str | None = None,
    probes: Sequence[Any] = (),
    eval_every: int | None = None,
    eval_data: Any = None,
    loss_fn: Any = None,
    accumulate: int = 1,
    micro_loss_scale: float | None = None,
    scaler: Any = None,
    callbacks: Sequence[Callback] = (),
    n_train: int | None = None,
    dataset: str = "",
    probe_every: int = 1,
    seed: int | None = None,
) -> "Tracker":
    """Measure a training loop you write yourself: a context manager giving a `Tracker`.

    Args:
        model: the module being trained.
        optimizer: its optimizer (any ``torch.optim.Optimizer``); the lr is read from its first
            parameter group at every update, so schedulers are followed.
        store: a `batchlab.store.RunStore` or a path: the run is recorded there (kind ``track``).
        name: the run's name in the store.
        probes: ``grad_norm``, ``noise_scale``, ``dist_from_init``, ``update_norm`` (names or probe objects).
        eval_every: evaluate ``eval_data`` every this many steps (and at every `Tracker.end_epoch`).
        eval_data: what to evaluate on: ``{"train": data, "val": data, ...}`` or one ``data`` (taken
            as ``val``), each ``(X, y)`` tensors or an iterable of ``(x, y)`` batches (a DataLoader).
            Needs ``loss_fn``. ``batchlab explain --run`` needs ``train`` evaluated densely.
        loss_fn: ``(outputs, targets) -> loss`` for evaluation, per sample or mean (either works).
        accumulate: micro-batches per update (gradient accumulation); call `Tracker.step` for each.
        micro_loss_scale: what your loop multiplies each micro-batch's mean loss by before
            ``backward`` when accumulating; default ``1/accumulate`` (``(loss / k).backward()``, the
            usual pattern). It puts ``grad_sq`` and ``trace_cov`` in the units of one batch's mean-loss
            gradient; the noise scale, their ratio, does not depend on it.
        scaler: the ``torch.amp.GradScaler`` of an AMP loop; gradients are unscaled before probing.
        callbacks: further `batchlab.events.Callback` objects (EarlyStopping: check ``run.should_stop``).
        n_train: training-set size, for the noise scale's finite-population correction (default:
            none, the i.i.d. setting) and the stored accounting.
        dataset: a name for the data, shown in the store.
        probe_every: measure the probes every this many steps.
        seed: the seed you used, stored with the run.

    Returns:
        A `Tracker`; use it as ``with bl.track(...) as run:``.
    """
    from .checks import check_arguments, check_items

    check_arguments("track", model=(model, torch.nn.Module), optimizer=(optimizer, torch.optim.Optimizer))
    check_items("track", "callbacks", callbacks, Callback)
    if isinstance(probes, Iterable) and not isinstance(probes, (str, bytes)):
        probes = list(probes)  # a generator is read once by the check, once by the tracker
    _check_options(store=store, name=name, probes=probes, eval_every=eval_every, eval_data=eval_data,
                   loss_fn=loss_fn, accumulate=accumulate, scaler=scaler, n_train=n_train, dataset=dataset,
                   probe_every=probe_every, seed=seed)
    if micro_loss_scale is None:
        micro_loss_scale = 1.0 / accumulate
    if not (isinstance(micro_loss_scale, (int, float)) and not isinstance(micro_loss_scale, bool)
            and math.isfinite(micro_loss_scale) and micro_loss_scale > 0):
        raise ConfigError(f"micro_loss_scale must be a positive number, got {micro_loss_scale!r}")
    return Tracker(model, optimizer, store=store, name=name, probes=probes, eval_every=eval_every,
                   eval_data=eval_data, loss_fn=loss_fn, accumulate=accumulate, scaler=scaler,
                   micro_loss_scale=float(micro_loss_scale),
                   callbacks=callbacks, n_train=n_train, dataset=dataset, probe_every=probe_every, seed=seed)


class Tracker:
    """One tracked run: `step` per (micro-)batch, `end_epoch` per epoch, ``steps``/``epochs`` tables.

    Made by `track`. ``should_stop`` turns true when a callback asks to stop or the loss diverged
    (NaN/inf): the loop should then break; further steps are not recorded.
    """

    def __init__(self, model, optimizer, *, store, name, probes, eval_every, eval_data, loss_fn, accumulate,
                 scaler, micro_loss_scale, callbacks, n_train, dataset, probe_every, seed):
        self.model, self.optimizer, self.loss_fn, self.scaler = model, optimizer, loss_fn, scaler
        self.accumulate, self.n_train, self.micro_loss_scale = accumulate, n_train, micro_loss_scale
        self.eval_data = _eval_splits(eval_data)
        from .distributed import TrackedRanks

        # In a process group: global-batch step numbers, rank 0 records, the noise scale from the ranks.
        self.ranks, self.probe_specs = TrackedRanks.create(model, [make_probe(p) for p in probes], accumulate)
        self.callbacks = list(callbacks)
        self._store_recorder: Any = None
        if store is not None and (self.ranks is None or self.ranks.is_main):
            from .store import recorder

            self._store_recorder = recorder(store, name=name, kind="track",
                                            provenance=self.ranks.provenance if self.ranks else None)
            self.callbacks.append(self._store_recorder)
        config = TrackConfig(optimizer=type(optimizer).__name__, lr=_lr(optimizer), accumulate=accumulate,
                             eval_every=eval_every, probe_every=probe_every, amp=scaler is not None, seed=seed)
        clock = Clock(n_train=n_train or 0, batch_size=0, steps_per_epoch=0, total_steps=0, epochs=0)
        self.recorder = Recorder(clock, model=model, classification=True, callbacks=self.callbacks, config=config,
                                 dataset=dataset or "user data", probe_names=[p.name for p in self.probe_specs],
                                 probe_every=probe_every, eval_every=eval_every, window=READ_BACK_EVERY, save=None,
                                 save_refusal="bl.track writes no checkpoints; save your model and optimizer yourself")
        self.dataset = _TrackedData(dataset or "user data", n_train)
        self.noise: MicroBatchNoise | None = None
        self._noise_lost: str | None = None  # why the micro-batch noise scale stopped measuring, if it did
        self._hooks: list[Any] = []
        self._started = False
        self._begun = False
        self._finished: Run | None = None
        self._classification: bool | None = None
        self._in_epoch = False
        self._epoch_steps: list[int] = []
        self._micro: list[tuple[Any, Any, int]] = []  # this update's micro-batches so far (see `_Update`)
        self._pending: _Update | None = None  # an update waiting for optimizer.step()
        self._unread: list[_Update] = []  # completed updates whose numbers are not read back yet
        self._updates = 0  # completed updates, read back or not: the step count the probes go by
        self._forward_hook: Any = None
        self._recorded = False  # whether run.step has recorded a batch yet
        self._early_updates = 0  # optimizer steps before the first run.step
        self._gradient_probes: list[str] = []  # probes that read p.grad (set at `_start`)
        self._reads_gradients = False  # whether run.step still checks that backward came first
        self._mark = 0.0
        self.defer_completion = False  # framework callbacks: the step completes at `batch_end`, not at the update

    # -- the context -----------------------------------------------------------------------------

    def __enter__(self) -> "Tracker":
        self._start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.finish()
        elif issubclass(kind, KeyboardInterrupt):
            self.end_abruptly("interrupted")  # the message names the step once the kept rows are read
        else:
            self.end_abruptly("failed", error_line(error))  # the loop raised: the run failed, its rows are kept

    def end_abruptly(self, status: str, message: str | None = None) -> None:
        """End a run that the loop's own error (``failed``) or Ctrl-C (``interrupted``) cut short, with
        the rows it made. The loop's error is what the user must see: one that recording the end
        meets (the store's disk is full, say) is a warning, not a replacement for it."""
        try:
            self.finish(status, message)
        except Exception as error:
            warnings.warn(f"batchlab could not record the end of this {status} run: {error_line(error)}",
                          RuntimeWarning, stacklevel=3)

    def _start(self) -> None:
        """Install the hooks; the run itself begins at the first training forward pass or step."""
        if self._started:
            return
        self._started = True
        wanted = [p.name for p in self.probe_specs]
        # Probes that read p.grad: run.step must come after backward (checked at each measured step).
        self._gradient_probes = [name for name in wanted if name in GRADIENT_PROBES]
        if "noise_scale" in wanted and self.accumulate > 1:
            self.noise = MicroBatchNoise(n_train=float(self.n_train) if self.n_train else math.inf)
            self.probe_specs = [p for p in self.probe_specs if p.name != "noise_scale"]
        self._probe_set_pending = bool(self.probe_specs)
        self._forward_hook = self.model.register_forward_pre_hook(self._first_forward)
        self._hooks.append(self._forward_hook)
        self._hooks.append(self.optimizer.register_step_pre_hook(self._before_update))
        self._hooks.append(self.optimizer.register_step_post_hook(self._after_update))
        self._reads_gradients = bool(self._gradient_probes)

    def _begin(self, batch_size: int | None) -> None:
        """The run begins: `RunStart` (with the nominal batch size, now known) and the step-0 evaluation,
        at the initial weights (the first update has not happened yet)."""
        self._start()
        if self._begun:
            return
        self._begun = True
        rec = self.recorder
        if batch_size:
            rec.learn_batch_size(batch_size)
        if self._store_recorder is not None:
            # What the store keeps of the accounting at the start: the epoch's length and the run's are
            # not known yet (a tracked loop tells them as it goes; the summary has them at the end).
            self._store_recorder.spec["clock"] = {"n_train": self.n_train, "batch_size": batch_size or None,
                                                  "steps_per_epoch": None, "total_steps": None, "epochs": None}
        rec.start_run()
        if self.eval_data:
            self._evaluate_data()
        rec.settle()
        self._mark = time.perf_counter()

    def _first_forward(self, module, args) -> None:
        """Before the first training forward pass: begin the run, and make the probe set, which needs
        one batch's shape (per-sample norms of linear layers) and hooks that see this very pass."""
        if not module.training or not args or not isinstance(args[0], torch.Tensor) or torch.is_inference_mode_enabled():
            return
        if not self._begun:
            self._begin(int(args[0].shape[0]) * self.accumulate if args[0].dim() > 0 else None)
        if self.ranks is not None:
            self.ranks.before_forward(args[0], self._measuring())
        elif not self._probe_set_pending:
            # Its work is done: a module with a hook leaves PyTorch's fast call path, every forward.
            self._forward_hook.remove()
        if self._probe_set_pending:
            self._make_probe_set(args[0].detach()[:2])

    def _make_probe_set(self, example: torch.Tensor | None) -> None:
        """The probe set, made at the first training forward pass of the model (``example``: two of its
        inputs), or, where the loop never calls the model itself (a LightningModule whose
        training_step calls a submodule), at the first step, without one."""
        self._probe_set_pending = False
        data = replace(self.dataset, train=(example, None) if example is not None else None)
        # The taps keep every forward pass's output gradients: the loop runs no "forward" point at
        # which they could be armed for the measured steps only (probe_every > 1).
        config = types.SimpleNamespace(probe_every=1)
        probe_set = ProbeSet.create(self.probe_specs, self.model, data, config, None, defer_reads=True)
        for index, probe in enumerate(probe_set.probes):
            if isinstance(probe, NoiseScale) and any(entry[1] is probe for entry in probe_set._at["forward"]):
                # The half-batch method needs the live graph, which the loop's own backward frees before
                # run.step: this model cannot be measured here, and its training goes on regardless.
                probe_set.fail(index, f"bl.track reads per-sample gradients from Linear, Conv, Embedding and "
                                      f"normalisation layers, and not from {probe.untapped(probe_set.ctx)}; use "
                                      "accumulate=k (the micro-batch estimate) or bl.fit" if example is not None else
                                      "the model given to bl.track never ran a forward pass itself, so no "
                                      "per-sample gradients could be read; call it as model(x), or use accumulate=k")
        self.recorder.attach_probes(probe_set)

    # -- steps -----------------------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        """A callback asked to stop, or the loss diverged: break out of your loop.

        The steps' numbers are read back every `READ_BACK_EVERY` steps (and at every evaluation,
        epoch end, and step a live callback sees: `batchlab.looks`), so a divergence shows here
        within that many steps; the steps after it are not recorded.
        """
        return not self.recorder.going

    def step(self, loss: Any, outputs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
             batch_size: int | None = None) -> None:
        """Record one (micro-)batch; call it after ``loss.backward()`` and before ``optimizer.step()``.

        Once per batch: a second call before ``optimizer.step()`` is refused (with ``accumulate=k``,
        once per micro-batch, k per update). Under AMP, an update the ``GradScaler`` skipped (its
        gradients were not finite, and ``scaler.update()`` lowered the scale) still makes its row:
        the batch's loss was computed and its samples seen. An optimizer step before ``accumulate``
        micro-batches (an epoch's last, short group, as Lightning makes) ends the update there.

        Args:
            loss: the batch's mean loss (a tensor or a number), unscaled under AMP.
            outputs: the model's outputs on the batch (for accuracy: (B, K) logits).
            targets: the batch's targets (class indices for accuracy), one per output.
            batch_size: samples in the batch (a whole number >= 1); default ``len(targets)`` or
                ``len(outputs)``, and it must agree with them where they are given.

        Raises:
            ConfigError: a mistake in the call or in the loop around it (after the run ended, twice
                per update, before ``backward`` with gradient probes), named in one line.
        """
        if self._finished is not None:
            self._refuse_after_end("run.step")
        size = _step_size(batch_size, outputs, targets)
        value = _loss_value(loss)
        if not self._begun:
            self._begin(size * self.accumulate)
        if self._probe_set_pending and self.ranks is None:
            self._make_probe_set(None)
        if self._pending is not None:
            self._check_update_ran()
            self._complete()  # optimizer.step() did not run for the previous step (an AMP skip)
        if not self.recorder.going:
            return
        if not self._in_epoch:
            self.recorder.start_epoch()
            self._in_epoch = True
        if not self._recorded:
            self._check_order()
        if self._reads_gradients:
            self._check_gradients()
        correct = None
        if outputs is not None and targets is not None and self._is_classification(outputs, targets):
            _check_counted(outputs, targets, size)
            correct = _correct(outputs, targets)
        self._micro.append((value, correct, size))
        if self.noise is not None and self._measuring():
            self._noise_call(self.noise.add_micro_batch, self._params(), size,
                             self._grad_scale() * self.micro_loss_scale)
        if len(self._micro) < self.accumulate:
            return
        self._end_of_update()

    def _check_update_ran(self) -> None:
        """Refuse a second run.step for one update: the loop's optimizer did not step since the last
        one. Lightning (``defer_completion``) and AMP skips are the updates that legitimately did not
        run: those are completed as they are."""
        pending = self._pending
        if pending.updated or self.defer_completion or self._amp_skipped(pending):
            return
        raise ConfigError(
            "run.step was called again before optimizer.step() ran for the previous batch; call it once per "
            "batch, after backward and before optimizer.step() (with bl.track's optimizer), or, to accumulate "
            f"gradients over k batches per update, pass accumulate=k to bl.track (now {self.accumulate})")

    def _amp_skipped(self, pending: _Update) -> bool:
        """Whether the GradScaler skipped the update: its scale fell since the update was made (it
        falls exactly when the gradients were not finite and the step was skipped)."""
        if pending.scale is None:
            return False
        now = getattr(self.scaler, "_scale", None)
        return not isinstance(now, torch.Tensor) or float(now) < float(pending.scale)

    def _check_order(self) -> None:
        """The first run.step: an optimizer step before it means the loop calls run.step after
        ``optimizer.step()``, and each row would pair a batch with the next batch's update."""
        if self._early_updates and not self.defer_completion:
            raise ConfigError("run.step came after optimizer.step(): its row would get the next batch's update; "
                              "call run.step after backward and before optimizer.step()")
        self._recorded = True

    def _check_gradients(self) -> None:
        """Gradient probes read p.grad: a run.step before backward finds none. Checked until the first
        step passes: a loop makes this mistake at every step, and at the first one it always shows,
        since no gradient exists before the first backward."""
        if any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"]):
            self._reads_gradients = False  # checked
            return
        raise ConfigError(f"run.step came before loss.backward(): the probes {', '.join(self._gradient_probes)} read "
                          "the gradients; call run.step after backward and before optimizer.step()")

    def _before_update(self, optimizer, args, kwargs) -> None:
        """Before ``optimizer.step()`` of the user's loop: an update with fewer than ``accumulate``
        micro-batches (an epoch's short last group) ends here, its gradients whole and the weights not
        yet moved. (A framework may step with a closure that runs the last micro-batch's backward
        inside ``optimizer.step()``, after this hook: its callback calls `end_update` instead.)"""
        if self._micro and self._pending is None and not self.defer_completion:
            self._end_of_update()

    def end_update(self) -> None:
        """End the update now, with the micro-batches given so far: for a framework callback that
        knows when its optimizer is about to step (Lightning's ``on_before_optimizer_step``), which
        it does on an epoch's last group even when that group is short."""
        if self._micro and self._pending is None:
            self._end_of_update()

    def _end_of_update(self) -> None:
        """The last micro-batch of an update: the gradients are whole; probe them, then wait for the update."""
        measuring = (self.noise is not None or self.recorder.probes is not None
                     or self._noise_lost is not None) and self._measuring()
        values: dict[str, float] = {}
        if measuring:
            if self.scaler is not None and any(p in self.recorder.probe_names for p in GRADIENT_PROBES):
                self._unscale()
            if self.noise is not None:
                values.update(self._noise_call(self.noise.finish) or {})
            if self._noise_lost is not None:
                values.update(unmeasured(""))
            if self.recorder.probes is not None:
                # The scaler's scale: the taps' output gradients carry it (p.grad is unscaled).
                self.recorder.probes.after_backward(self._grad_scale())
        elif self.noise is not None:
            self.noise.reset()
        self._pending = _Update(self._micro, _lr(self.optimizer), values, measuring, scale=self._scale_copy())
        self._micro = []

    def _noise_call(self, method, *args) -> Any:
        """A call of the micro-batch noise scale; where it raises, the noise scale is dropped with one
        warning and NaN from then on (a measurement never stops the training), and the run's message
        says why."""
        try:
            return method(*args)
        except Exception as error:
            self.noise, self._noise_lost = None, error_line(error)
            warnings.warn(f"noise_scale cannot measure this run ({self._noise_lost}); its columns are NaN and "
                          "training goes on", ProbeWarning, stacklevel=3)
            return None

    def _scale_copy(self) -> torch.Tensor | None:
        """The GradScaler's scale at this update, copied without waiting for the device (None without
        an enabled scaler), for `_amp_skipped`."""
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        scale = getattr(self.scaler, "_scale", None)
        return scale.detach().clone() if isinstance(scale, torch.Tensor) else None

    def _after_update(self, optimizer, args, kwargs) -> None:
        pending = self._pending
        if pending is None and not self._recorded:
            self._early_updates += 1  # an update before any run.step: see `_check_order`
        if pending is not None and not pending.updated:
            pending.updated = True
            if pending.measuring and self.recorder.probes is not None:
                self.recorder.probes.after_update()
            if not self.defer_completion:
                self._complete()

    def batch_end(self, correct: int | None) -> None:
        """For framework callbacks, whose batch outputs arrive after the update: the latest
        micro-batch's correct count; a step waiting for it is completed."""
        micro = self._micro if self._micro else self._pending.micro if self._pending is not None else None
        if micro:
            loss, _, size = micro[-1]
            micro[-1] = (loss, correct, size)
        if not self._micro and self._pending is not None and self._pending.updated:
            self._complete()

    def _complete(self) -> None:
        """The pending update is done: keep it for the next read-back, and read back now if due."""
        pending, self._pending = self._pending, None
        pending.seconds = time.perf_counter() - self._mark
        if pending.measuring and self.recorder.probes is not None:
            pending.values.update(self.recorder.probes.take())
        self._unread.append(pending)
        self._updates += 1
        if self._looked_at():
            self._read_back()
        self._mark = time.perf_counter()

    def _looked_at(self) -> bool:
        """Whether the unread updates must be recorded now, the last of them just completed: the ranks
        reduce every step together; otherwise where the run's looks (`batchlab.looks`) say something
        looks at it: a step a live callback sees, an evaluation of ``eval_data`` due, the read-back
        window full."""
        rec, unread = self.recorder, len(self._unread)
        looks = rec.looks
        if self.ranks is not None or unread >= looks.window:
            return True
        clock = rec.clock  # the recorded updates'; the unread ones follow them in this epoch
        if looks.sees(clock.step + unread):
            return True
        if not self.eval_data or looks.eval_every is None:  # nothing to evaluate: no clock to build
            return False
        return looks.evaluates(replace(clock, step=clock.step + unread, step_in_epoch=clock.step_in_epoch + unread))

    def _read_back(self) -> None:
        """Read the unread updates' numbers (one wait for the device) and hand their rows to the core,
        in order; evaluate where due and act on the callbacks' requests. Updates after a divergence
        are not recorded (a loop that checked ``should_stop`` would not have made them)."""
        unread, self._unread = self._unread, []
        rec = self.recorder
        if not unread or not rec.going:
            return
        if rec.probes is not None:
            rec.probes.settle([update.values for update in unread])  # deferred probe reads, in step order
        steps = []
        for update, (size, loss, correct, values) in zip(unread, _read_updates(unread)):
            if self.ranks is not None:
                size, loss, correct = self.ranks.reduce_step(size, loss, correct)
            steps.append((size, update.lr, loss, correct, update.seconds, values))
        if steps[0][3] is None and rec.classification and not rec.steps:
            self._classification = False  # no accuracy given: a loss-only run
            rec.mark_regression()
        rec.record_steps(steps)  # every one, unless the run diverges among them
        # An evaluation falls due only at the last of them: the read-back comes at that step.
        if self.eval_data and rec.evaluation_due():
            self._evaluate_data()
        if rec.wants_attention:
            rec.settle()

    def _settle_steps(self) -> None:
        """Complete the update waiting for the optimizer, if any, and record every unread one."""
        if self._pending is not None:
            self._complete()
        self._read_back()

    # -- epochs and evaluation -------------------------------------------------------------------

    def evaluate(self, data: Any, loss_fn: Any = None, split: str = "val") -> dict[str, float]:
        """Evaluate ``data`` (``(X, y)`` or batches) at the current weights and record it as ``{split}_*``.

        Returns:
            ``{"loss": ..., "acc": ...}`` (``acc`` for classification).
        """
        self._refuse_after_end("run.evaluate")
        loss_fn = loss_fn or self.loss_fn
        if loss_fn is None:
            raise ConfigError("evaluate needs loss_fn=... (or give loss_fn to bl.track)")
        if not callable(loss_fn):
            raise ArgumentError(f"run.evaluate: loss_fn must be a function (outputs, targets) -> loss, "
                                f"got {_kind(loss_fn)}")
        _check_eval_data(split, data)
        self._settle_steps()
        started = time.perf_counter()
        loss, acc = _evaluate_one(self.model, data, loss_fn, self._classification is not False)
        metrics = {f"{split}_loss": loss}
        if not math.isnan(acc):
            metrics[f"{split}_acc"] = acc
        self._record_metrics(metrics, time.perf_counter() - started)
        return {k.removeprefix(f"{split}_"): v for k, v in metrics.items()}

    def end_epoch(self, **splits: Mapping[str, float]) -> None:
        """End the epoch: evaluate ``eval_data`` (unless done at this step), add the metrics given
        (``val={"loss": vl, "acc": va}``, ``train=...``, ``test=...``), and write the epoch row."""
        self._refuse_after_end("run.end_epoch")
        given = _given_metrics(splits)
        self._begin(None)
        self._settle_steps()
        if self._micro:
            raise ConfigError(f"end_epoch came after {len(self._micro)} of {self.accumulate} micro-batches with no "
                              "optimizer.step() for them; step the optimizer on the epoch's last group, even when "
                              "it is short, before end_epoch")
        if not self._in_epoch:
            return
        rec = self.recorder
        if self.eval_data and not rec.evaluated_now():
            self._evaluate_data()
        if given:
            self._record_metrics(given, 0.0)
        rec.end_epoch()
        self._epoch_steps.append(rec.clock.step_in_epoch)
        self._in_epoch = False
        if len(self._epoch_steps) == 1:  # the first epoch tells the accounting
            rec.learn_epoch_length()
        rec.settle()
        self._mark = time.perf_counter()

    def _record_metrics(self, metrics: Mapping[str, float], seconds: float) -> None:
        rec = self.recorder
        if rec.evaluated_now():  # the same weights: one evaluation row
            rec.add_to_evaluation(metrics, seconds)
        else:
            rec.record_evaluation(metrics, seconds)

    def _evaluate_data(self) -> None:
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        for split, data in self.eval_data.items():
            loss, acc = _evaluate_one(self.model, data, self.loss_fn, self._classification is not False)
            metrics[f"{split}_loss"] = loss
            if not math.isnan(acc):
                metrics[f"{split}_acc"] = acc
        self._record_metrics(metrics, time.perf_counter() - started)

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, status: str | None = None, message: str | None = None) -> Run:
        """End the run (the context manager does this): the last step and epoch, `RunEnd`, hooks removed."""
        if self._finished is not None:
            return self._finished
        error, ending_well = None, status is None
        try:
            self._begin(None)
            self._settle_steps()
            if self._micro:  # micro-batches that no optimizer step applied: no update, so no row
                self._micro = []
                if self.noise is not None:
                    self.noise.reset()
            if self._in_epoch and status is None:
                self.end_epoch()
        except Exception as caught:
            # The run ends regardless, with what was read: failed with this error, or, when it is
            # ending for another reason already (the loop's own error), with that one.
            error = caught
            if status is None:
                status, message = "failed", error_line(caught)
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
        if status == "interrupted" and message is None:  # the kept steps are read by now: where the rows end
            message = f"interrupted at step {self.recorder.clock.step}"
        self.recorder.account_as_ran()
        if self._noise_lost is not None:  # the probe set's failures are the core's to name; this one is ours
            note = f"noise_scale not measured: {self._noise_lost}"
            if status is None:
                self.recorder.add_note(note)
            else:
                message = "; ".join(filter(None, [message, note]))
        self._finished = self.recorder.finish(status, message)
        if error is not None and ending_well:
            raise error
        return self._finished

    def _refuse_after_end(self, call: str) -> None:
        if self._finished is not None:
            raise ConfigError(f"{call} after the run ended: call it inside the `with bl.track(...) as run:` block")

    @property
    def run(self) -> Run:
        """The run so far (after the `with` block: the finished run)."""
        if self._finished is None:
            self._read_back()
        return self._finished or self.recorder.run()

    @property
    def steps(self):
        return self.run.steps

    @property
    def evals(self):
        return self.run.evals

    @property
    def epochs(self):
        return self.run.epochs

    @property
    def status(self) -> str:
        return self.recorder.status

    @property
    def run_id(self) -> int | None:
        """The run's id in the store (when ``store`` was given)."""
        for callback in self.callbacks:
            if hasattr(callback, "run_id") and hasattr(callback, "store"):
                return callback.run_id
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def _measuring(self) -> bool:
        return self._updates % self.recorder.probe_every == 0

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _grad_scale(self) -> float:
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        return float(self.scaler.get_scale())

    def _unscale(self) -> None:
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError:  # the loop unscaled already (to clip): the gradients are unscaled
            pass

    def _is_classification(self, outputs: torch.Tensor, targets: torch.Tensor) -> bool:
        if self._classification is None:
            self._classification = _accuracy_shaped(outputs, targets)
            if not self._classification:
                self.recorder.mark_regression()
        return self._classification


class MicroBatchNoise:
    """The noise scale from gradient accumulation: micro-batch vs accumulated gradient norms.

    McCandlish et al. 2018, App. A.1: with b the micro-batch and B the accumulated batch, ‖g_b‖²
    and ‖g_B‖² give unbiased ‖G‖² and tr(Σ) (`batchlab.probes.two_batch_estimates`). A micro-batch's
    gradient is the change of ``p.grad`` its backward pass made, divided by ``scale`` (the loop's
    loss scaling: 1/k for ``(loss / k).backward()``, times an AMP scaler's scale), and ``g_B`` is the
    micro-batches' sample-weighted mean. No extra backward pass: one copy of the gradients
    and one fused norm per micro-batch, and one read of the squared norms per update.
    """

    def __init__(self, n_train: float, beta: float = 0.99):
        self.n_train, self.beta = n_train, beta
        self.state = NoiseState()
        self.reset()

    def reset(self) -> None:
        self.previous: list[torch.Tensor] | None = None  # p.grad after the last micro-batch
        self.small_sq: list[torch.Tensor] = []  # Σ‖Δp.grad‖² of each micro-batch, 0-d float64, read at `finish`
        self.scales: list[float] = []
        self.sizes: list[int] = []
        self.weighted: list[torch.Tensor] | None = None  # Σ_i b_i · g_i

    def add_micro_batch(self, params: Sequence[torch.nn.Parameter], size: int, scale: float) -> None:
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.previous is None:
            delta = [g.clone() for g in grads]
            self.previous = [g.clone() for g in grads]
        else:
            delta = torch._foreach_sub(grads, self.previous)
            torch._foreach_copy_(self.previous, grads)
        self.small_sq.append(torch.stack(torch._foreach_norm(delta)).double().square().sum())
        self.scales.append(scale)
        self.sizes.append(size)
        if self.weighted is None:
            self.weighted = torch._foreach_mul(delta, size / scale)
        else:
            torch._foreach_add_(self.weighted, delta, alpha=size / scale)

    def finish(self) -> dict[str, float]:
        """The step's estimate from its micro-batches; the moving averages advance."""
        small_sq, scales, sizes, weighted = self.small_sq, self.scales, self.sizes, self.weighted
        self.reset()
        if len(sizes) < 2 or weighted is None:
            return unmeasured("")
        big = sum(sizes)
        weighted_sq = torch.stack(torch._foreach_norm(weighted)).double().square().sum()
        *squares, weighted_sq = torch.stack([*small_sq, weighted_sq]).tolist()  # the update's one read
        small_sq = [sq / scale**2 for sq, scale in zip(squares, scales)]
        big_sq = weighted_sq / big**2
        # The micro-batches are the parts of the accumulated batch: fit's half-batch method with k parts.
        grad_sq, trace_cov = two_batch_estimates(small_sq, sizes, big_sq, big, self.n_train)
        if not (math.isfinite(grad_sq) and math.isfinite(trace_cov)):  # an AMP overflow: the update is skipped too
            return unmeasured("")
        self.state, values = advance(self.state, grad_sq, trace_cov, self.beta, "")
        return values


# --- the arguments' checks -----------------------------------------------------------------------
# Each mistake is refused at the call that made it, in one line: not as a TypeError from the first
# forward pass (where the run begins and the store opens) or from an epoch's read-back.


def _check_options(*, store, name, probes, eval_every, eval_data, loss_fn, accumulate, scaler, n_train, dataset,
                   probe_every, seed) -> None:
    """Refuse `track`'s options that cannot work, each with one line naming it."""
    from .store import RunStore

    if store is not None and not isinstance(store, (str, os.PathLike, RunStore)):
        raise ArgumentError(f"track: store must be a path (str or pathlib.Path) or a RunStore, got {_kind(store)}")
    if isinstance(store, (str, os.PathLike)) and _records_here():
        # Opened here once, so that a path that cannot hold a store (no such folder, a file that is
        # not a store) is refused by bl.track, not inside the first forward pass, where the run begins.
        RunStore(store).close()
    if name is not None and not isinstance(name, str):
        raise ArgumentError(f"track: name must be a string, got {_kind(name)}")
    if not isinstance(dataset, str):
        raise ArgumentError(f"track: dataset must be a string (a name for the data), got {_kind(dataset)}")
    _check_probes(probes)
    for option, value in (("accumulate", accumulate), ("probe_every", probe_every)):
        if not is_whole_number(value) or value < 1:
            raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")
    if eval_every is not None and (not is_whole_number(eval_every) or eval_every < 1):
        raise ConfigError(f"eval_every must be an integer >= 1 or None, got {eval_every!r}")
    if n_train is not None and (not is_whole_number(n_train) or n_train < 1):
        raise ConfigError(f"n_train must be the training set's size, an integer >= 1, got {n_train!r}")
    if seed is not None and not is_whole_number(seed):
        raise ConfigError(f"seed must be an integer or None, got {seed!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"track: loss_fn must be a function (outputs, targets) -> loss such as "
                            f"torch.nn.functional.cross_entropy, got {_kind(loss_fn)}")
    if eval_data is not None and loss_fn is None:
        raise ConfigError("eval_data needs loss_fn=... to compute the evaluation's loss")
    for split, data in _eval_splits(eval_data).items():
        _check_eval_data(split, data)
    if scaler is not None and not all(hasattr(scaler, m) for m in ("scale", "unscale_", "get_scale", "is_enabled")):
        raise ArgumentError(f"track: scaler must be a torch.amp.GradScaler, got {_kind(scaler)}")


def _records_here() -> bool:
    """Whether this process writes the store: always, except on ranks other than 0 of a process group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _kind(value: Any) -> str:
    """What was given, for a message: ``an int (123)``, ``a str ('ce')``, ``a DataLoader``."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} ({value!r:.40})" if isinstance(value, (str, int, float)) else f"{article} {name}"


def _check_probes(probes: Any) -> None:
    if isinstance(probes, (str, bytes)) or not isinstance(probes, Iterable):
        raise ArgumentError(f"track: probes must be a list such as [\"grad_norm\"], got {_kind(probes)}")
    for probe in probes:
        if not isinstance(probe, str) and not (isinstance(getattr(probe, "name", None), str)
                                               and callable(getattr(probe, "measure", None))):
            raise ArgumentError(f"track: each probe must be a probe's name (\"grad_norm\", \"noise_scale\", ...) "
                                f"or a probe object, got {_kind(probe)}")
        make_probe(probe)  # an unknown name: one line naming the probes there are


def _check_eval_data(split: str, data: Any) -> None:
    """``(X, y)`` tensors of one length, or an iterable of ``(x, y)`` batches (a DataLoader)."""
    if not isinstance(split, str):
        raise ArgumentError(f"track: eval_data's keys must be split names such as \"val\", got {_kind(split)}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(hasattr(t, "shape") for t in data):
        X, y = data
        if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)) or X.dim() == 0 or y.dim() == 0:
            raise ArgumentError(f"track: eval_data {split!r} must be (X, y) with both tensors of samples, "
                                f"got ({type(X).__name__}, {type(y).__name__})")
        if len(X) != len(y):
            raise ConfigError(f"eval_data {split!r} has {len(X)} inputs but {len(y)} targets; "
                              "give one target per sample")
        return
    if isinstance(data, (str, bytes, torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise ArgumentError(f"track: eval_data must be (X, y) tensors, an iterable of (x, y) batches (a DataLoader) "
                            f"or a dict of them by split, got {_kind(data)} for {split!r}")


# --- data ---------------------------------------------------------------------------------------


def _eval_splits(eval_data: Any) -> dict[str, Any]:
    if eval_data is None:
        return {}
    if isinstance(eval_data, Mapping):
        return dict(eval_data)
    return {"val": eval_data}


def _evaluate_one(model: torch.nn.Module, data: Any, loss_fn, classification: bool) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(X, y)`` tensors or on an iterable of ``(x, y)`` batches."""
    per_sample = _per_sample(loss_fn)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, y = data
        return evaluate(model, (X, y), per_sample, classification and not y.is_floating_point())
    was_training = model.training
    model.eval()
    totals = [0.0, 0, 0]  # loss sum, correct, samples
    try:
        with torch.inference_mode():
            for batch in data:
                xb, yb = batch[0], batch[1]
                loss_sum, correct, n = pass_totals(model, xb, yb, [slice(None)], per_sample,
                                                   classification and not yb.is_floating_point())
                totals[0] += loss_sum.item()
                totals[1] += int(correct.item())
                totals[2] += n
    finally:
        model.train(was_training)
    if totals[2] == 0:
        raise ConfigError("the evaluation data gave no batches")
    return totals[0] / totals[2], (totals[1] / totals[2] if classification else float("nan"))


def _per_sample(loss_fn):
    """A per-sample version of the user's loss: as is when it gives one value per sample, else the
    batch's mean loss repeated for each sample (their sum is then the batch's summed loss)."""

    def losses(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = loss_fn(output, target)
        if value.dim() == 0:
            return value.expand(output.shape[0])
        return value.reshape(output.shape[0], -1).mean(dim=1) if value.dim() > 1 else value

    return losses


def _given_metrics(splits: Mapping[str, Any]) -> dict[str, float]:
    """``end_epoch(val={"loss": 0.3, "acc": 0.9})`` as ``{"val_loss": 0.3, "val_acc": 0.9}``; each
    split a mapping of names to numbers (one-element tensors too), else one line naming it."""
    given = {}
    for split, metrics in splits.items():
        if not isinstance(metrics, Mapping):
            raise ArgumentError(f"run.end_epoch: {split}= must be a dict such as {{\"loss\": 0.3, \"acc\": 0.9}}, "
                                f"got {_kind(metrics)}")
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ArgumentError(f"run.end_epoch: {split}[{name!r}] must be a number, got {_kind(value)}")
            given[f"{split}_{name}"] = float(value)
    return given


def _step_size(batch_size: Any, outputs: Any, targets: Any) -> int:
    """The batch's size for `Tracker.step`: ``batch_size`` if given, else the targets' or outputs'
    length; refused in one line where it is not a whole number >= 1 or they are not tensors. (Where
    the accuracy is counted, `_check_counted` holds the lengths to it.) On the hot path: few ops."""
    if outputs is not None and not isinstance(outputs, torch.Tensor):
        raise ArgumentError(f"run.step: outputs must be a tensor (the model's outputs), got {_kind(outputs)}")
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise ArgumentError(f"run.step: targets must be a tensor (the batch's targets), got {_kind(targets)}")
    if batch_size is not None:
        if not (type(batch_size) is int or is_whole_number(batch_size)) or batch_size < 1:
            raise ConfigError(f"run.step: batch_size must be a whole number >= 1 (the samples in the batch), "
                              f"got {batch_size!r}")
        return int(batch_size)
    for tensor in (targets, outputs):
        if tensor is not None and tensor.dim() > 0:
            return tensor.shape[0]
    raise ConfigError("run.step needs the batch's size: pass outputs=, targets= or batch_size=")


def _check_counted(outputs: torch.Tensor, targets: torch.Tensor, size: int) -> None:
    """A batch whose accuracy is counted: its correct predictions over its targets are divided by
    ``size``, so the outputs, the targets and the size must agree on the batch's length."""
    count = targets.shape[0]  # shape, not len(): len() of a tensor is four Python calls on the hot path
    if outputs.shape[0] != count:
        raise ConfigError(f"run.step got {outputs.shape[0]} outputs but {count} targets; pass the outputs and "
                          "targets of the same batch, one target per output row")
    if size != count:
        raise ConfigError(f"run.step: batch_size={size} but the batch has {count} targets, over which its "
                          "accuracy is counted; leave batch_size out, or pass the whole batch's outputs and targets")


def _accuracy_shaped(outputs: Any, targets: Any) -> bool:
    """Whether a batch's accuracy is counted: (b, K) outputs and (b,) class indices."""
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor) and outputs.dim() == 2
            and targets.dim() == 1 and not targets.is_floating_point() and not targets.is_complex())


def _loss_value(loss: Any) -> Any:
    """The batch's mean loss as kept until read back: a float where reading it waits for nothing (a
    number, a CPU tensor), else a 0-d copy on the device. A copy, not the tensor itself: a loop may
    overwrite its loss in place (a CUDA graph's static output) before the read-back."""
    if not isinstance(loss, torch.Tensor):
        if not isinstance(loss, numbers.Real) or isinstance(loss, bool):
            raise ArgumentError(f"run.step needs the batch's mean loss, a tensor or a number; got {_kind(loss)}")
        return float(loss)
    if loss.numel() != 1:
        raise ConfigError(f"run.step needs the batch's mean loss, one number; got a tensor of shape {tuple(loss.shape)}")
    if loss.is_cpu:
        return loss.item()
    return loss.detach().reshape(()).clone()


def _read_updates(updates: Sequence[_Update]) -> list[tuple[int, float, int | None, dict[str, float] | None]]:
    """Each update's size, batch loss, correct count and probe values (None: none measured) as Python
    numbers: the tensors among them are read in one go (`_read_floats`, `_read_counts`), whatever
    their number."""
    micro = [batch for update in updates for batch in update.micro]
    values = [value for update in updates for value in update.values.values()]
    floats = _read_floats([loss for loss, _, _ in micro] + values)
    corrects = _read_counts(micro)
    numbers, at, at_value = [], 0, len(micro)
    for update in updates:
        count, named = len(update.micro), len(update.values)
        if count == 1:
            size, loss, correct = update.micro[0][2], floats[at], corrects[at]
        else:
            size, loss, correct = _whole_batch(update.micro, floats[at:at + count], corrects[at:at + count])
        read = dict(zip(update.values, floats[at_value:at_value + named])) if named else None
        numbers.append((size, loss, correct, read))
        at, at_value = at + count, at_value + named
    return numbers


def _read_floats(items: Sequence[Any]) -> list[float]:
    """Numbers and one-element tensors as floats; the 0-d tensors read in one stack (one wait for
    the device). Stacking promotes to the widest dtype, so each float is the one its tensor holds."""
    tensors = [item for item in items if isinstance(item, torch.Tensor) and item.dim() == 0]
    if not tensors:
        return [float(item) for item in items]
    try:
        read = iter(torch.stack(tensors).tolist())
    except RuntimeError:  # on different devices: one read each
        read = iter([float(t) for t in tensors])
    return [next(read) if isinstance(item, torch.Tensor) and item.dim() == 0 else float(item) for item in items]


# Outputs of at most this many elements are kept for one bulk arg-max at the read-back: on the CPU
# an op's dispatch (~5-10 µs inside a training loop) costs more than its arithmetic at these sizes,
# and keeping a batch costs one op (the targets' copy) where comparing it now costs two. Larger
# outputs are compared at once.
DEFER_ARGMAX_NUMEL = 1 << 14


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> Any:
    """What the read-back needs to count a batch's correct predictions: small CPU outputs as they are
    and a copy of the targets (`_Predictions`), else the (b,) 0/1 mask of arg-max == target, made now."""
    if outputs.is_cpu and outputs.numel() <= DEFER_ARGMAX_NUMEL:
        # The targets are copied: a loader may refill its batch tensors in place before the read-back.
        return _Predictions(outputs.detach(), targets.clone(), outputs._version)
    # Compared in place in the arg-max's own memory: one tensor made, not two.
    return outputs.argmax(dim=1).eq_(targets)


@dataclass(slots=True)
class _Predictions:
    """A batch's (b, K) outputs and a copy of its (b,) targets, kept to be compared at the read-back;
    ``version`` is the outputs' version counter when kept (an in-place change shows there)."""

    outputs: torch.Tensor
    targets: torch.Tensor
    version: int


def _read_counts(micro: Sequence[tuple[Any, Any, int]]) -> list[int | None]:
    """The micro-batches' correct counts: (b,) 0/1 masks and kept `_Predictions` counted (all of them
    by one reduction and one read), a count or None as is."""
    corrects = [correct for _, correct, _ in micro]
    pending = [correct for correct in corrects if isinstance(correct, (torch.Tensor, _Predictions))]
    if not pending:
        return corrects
    counts = iter(_hit_counts(pending))
    return [next(counts) if isinstance(c, (torch.Tensor, _Predictions)) else c for c in corrects]


def _hit_counts(pending: Sequence[torch.Tensor | _Predictions]) -> list[int]:
    """The correct predictions of each batch, in order: its (b,) 0/1 mask's ones, or, for kept
    predictions, its arg-max == target count; one arg-max and one comparison for all kept batches.
    (A batch's b is its targets' length, which may differ from the ``batch_size`` given to run.step.)"""
    kept = [item for item in pending if isinstance(item, _Predictions)]
    if not kept:
        return _segment_sums(torch.cat(list(pending)), [len(mask) for mask in pending])
    if any(c.outputs._version != c.version for c in kept):
        raise ConfigError("the outputs passed to run.step were changed in place before batchlab read them; "
                          "pass a copy (outputs=out.detach().clone()) or leave them as the model made them")
    hits = torch.cat([c.outputs for c in kept]).argmax(dim=1).eq_(torch.cat([c.targets for c in kept]))  # (Σ b_i,)
    if len(kept) < len(pending):  # masks and kept predictions in one read-back: each as its mask
        parts = iter(hits.split([len(c.targets) for c in kept]))
        hits = torch.cat([next(parts) if isinstance(item, _Predictions) else item for item in pending])
    return _segment_sums(hits, [len(item.targets if isinstance(item, _Predictions) else item) for item in pending])


def _whole_batch(micro: Sequence[tuple[Any, Any, int]], losses: Sequence[float],
                 corrects: Sequence[int | None]) -> tuple[int, float, int | None]:
    """An update's size, batch loss and correct count from its micro-batches' (read back)."""
    sizes = [size for _, _, size in micro]
    size = sum(sizes)
    # The step's batch loss: the sample-weighted mean of its micro-batches' mean losses.
    loss = math.fsum(l * b for l, b in zip(losses, sizes)) / size
    return size, loss, None if any(c is None for c in corrects) else sum(corrects)


def _segment_sums(hits: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """Sums of consecutive segments of ``hits`` (Σ sizes,), of the given sizes: one reduction, one read."""
    if all(size == sizes[0] for size in sizes):
        return hits.view(len(sizes), sizes[0]).sum(dim=1).tolist()  # (S·b,) -> (S,)
    totals = hits.cumsum(0)  # (Σ b_i,) correct predictions so far; a short last batch
    ends = torch.tensor(sizes, device=hits.device).cumsum(0) - 1
    at_ends = totals[ends]  # (S,) correct predictions up to the end of each segment
    return torch.diff(at_ends, prepend=at_ends.new_zeros(1)).tolist()


def _lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0].get("lr", math.nan)
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


__all__ = ["MicroBatchNoise", "TrackConfig", "Tracker", "track"]
