"""Keras 3: ``model.fit(..., callbacks=[BatchlabCallback(store="batchlab.db", batch_size=B)])``.

Keras reports, after each batch, the running means of the epoch so far (``logs["loss"]``,
``logs["accuracy"]``): the sample-weighted mean of the batch values, each computed before its
update, reset when an epoch begins — exactly batchlab's ``running_*``. The callback recovers each
batch's own value from two consecutive running means,

    batch_t = (running_t · n_t − running_{t−1} · n_{t−1}) / b_t,   n_t = b_1 + ... + b_t,

and hands it to the measurement core, which rebuilds the running mean from the batch values: the
stored ``running_*`` equal Keras' logs, ``batch_*`` are Keras' per-batch values. Keras computes in
float32, so a recovered batch value carries the running mean's rounding times n_t/b_t.

Each b_t is learned, not assumed: Keras' loss tracker counts the samples behind its running loss
(n_t, reset with the metrics at each epoch start), so a short last batch has its true size without
``n_train``. The training-set size is then the first epoch's sample count. A ``batch_size`` or
``n_train`` that contradicts what Keras reports is refused in one line.

Keras 3 calls no hook when an exception leaves ``fit`` (Ctrl-C in a notebook), so the callback
guards the calls ``fit`` makes into its callbacks and its train and test steps: an exception there
ends the run ``interrupted`` (Ctrl-C) or ``failed`` (an error) in the store at once, its message
naming the step the rows end at, and then goes on. A Ctrl-C that lands while Keras reads the next
batch is not seen at once: the run ends ``interrupted`` at the callback's next ``fit``, or is shown
so by the store once the process is gone.

Validation metrics (``val_loss``, ``val_accuracy``) join each epoch's evaluation row; ``eval_data``
adds full passes (``train`` densely for ``batchlab explain --run``). Probes need the gradients, which
Keras keeps to itself: use `batchlab.track` or `bl.fit` for them.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..checks import is_count
from ..errors import ConfigError
from ..events import Callback, Clock
from ..record import Recorder, Run

ACCURACY_KEYS = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy")


@dataclass(frozen=True)
class KerasConfig:
    """What a Keras run was given, as stored with it."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    eval_every: int | None = None
    framework: str = "keras"

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        return dict(self.__dict__)


class BatchlabCallback(keras.callbacks.Callback):
    """Record a Keras ``fit`` with batchlab's metric views.

    Args:
        store: a `batchlab.store.RunStore` or a path; the run is recorded there (kind ``keras``).
        batch_size: the ``batch_size`` given to ``fit`` (Keras does not tell its callbacks); every
            batch but an epoch's last must hold this many samples.
        n_train: training samples per epoch, checked against what Keras reports (default: learned
            from the first epoch).
        name: the run's name in the store.
        eval_every: evaluate ``eval_data`` every this many steps (and at every epoch end).
        eval_data: ``{"train": (X, y), "val": (X, y)}`` arrays, evaluated with the model's compiled loss.
        callbacks: batchlab callbacks (their `Stop` sets ``model.stop_training``).
        dataset: a name for the data.
    """

    def __init__(self, store: Any = None, *, batch_size: int, n_train: int | None = None, name: str | None = None,
                 eval_every: int | None = None, eval_data: Any = None, callbacks: Sequence[Callback] = (),
                 dataset: str = ""):
        super().__init__()
        if not is_count(batch_size):
            raise ConfigError(f"batch_size must be the integer batch size given to fit, got {batch_size!r}")
        if n_train is not None and not is_count(n_train):
            raise ConfigError(f"n_train must be the number of training samples, a whole number >= 1, got {n_train!r}; "
                              "leave it out to learn it from the first epoch")
        self.store, self.name, self.batch_size, self.n_train = store, name, batch_size, n_train
        self.eval_every, self.dataset = eval_every, dataset or "user data"
        self.eval_data = dict(eval_data) if isinstance(eval_data, dict) else ({"val": eval_data} if eval_data else {})
        self.extra_callbacks = list(callbacks)
        self.recorder: Recorder | None = None
        self.run: Run | None = None
        self.run_id: int | None = None
        self._store_callback = None
        self._loss_counter = None
        self._guard: _FitGuard | None = None
        self._update_lr = math.nan

    # -- keras hooks -----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self.recorder is not None and self.run is None:  # the last fit left without a word (see the module)
            self._end_on_error(KeyboardInterrupt())
        steps, epochs = self.params.get("steps"), int(self.params["epochs"])
        if steps is None:
            raise ConfigError("Keras does not know how many steps an epoch of this data has; pass steps_per_epoch "
                              "to fit so that BatchlabCallback can count epochs")
        steps = int(steps)
        if self.n_train is not None:
            _check_n_train(self.n_train, self.batch_size, steps)
        if self.eval_data:
            _compiled_loss(self.model)  # refused before the run starts, not at its first evaluation
        self.run, self.run_id, self._store_callback = None, None, None
        self._loss_counter = _loss_counter(self.model)
        # n_train 0 until known: given, or counted over the first epoch (the store reads 0 as unknown).
        clock = Clock(n_train=self.n_train or 0, batch_size=self.batch_size, steps_per_epoch=steps,
                      total_steps=steps * epochs, epochs=epochs)
        config = KerasConfig(optimizer=type(self.model.optimizer).__name__, lr=self._lr(), batch_size=self.batch_size,
                             epochs=epochs, eval_every=self.eval_every)
        callbacks = list(self.extra_callbacks)
        if self.store is not None:
            from ..store import recorder

            self._store_callback = recorder(self.store, name=self.name, kind="keras",
                                            spec={"model": type(self.model).__name__, "framework": "keras"})
            callbacks.append(self._store_callback)
        self.recorder = Recorder(clock, model=_KerasWeights(self.model), classification=True, callbacks=callbacks,
                                 config=config, dataset=self.dataset, eval_every=self.eval_every, save=None,
                                 save_refusal="the Keras callback writes no checkpoints; use Keras' ModelCheckpoint")
        self._guard = _FitGuard(self.model, _callback_list_holding(self), self._end_on_error)
        try:  # this hook is not guarded: Keras is calling it now
            self.recorder.start_run()
            if self.eval_data:
                self._evaluate()
            self._settle()
        except BaseException as error:
            self._end_on_error(error)
            raise
        self._mark = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.recorder.start_epoch()
        self._previous = (0.0, 0.0, 0)  # running loss, running accuracy, samples, before this batch

    def on_train_batch_begin(self, batch, logs=None):
        # The rate this update uses: once it is done, Keras' optimizer reports the next one's.
        self._update_lr = self._lr()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        rec = self.recorder
        if not rec.going:
            return
        previous_loss, previous_acc, seen = self._previous
        running_loss, size = float(logs["loss"]), self._batch_size(rec.clock.step_in_epoch, seen)
        accuracy_key = next((k for k in ACCURACY_KEYS if k in logs), None)
        if rec.classification and accuracy_key is None and not rec.steps:
            rec.mark_regression()
        total = seen + size
        batch_loss = (running_loss * total - previous_loss * seen) / size
        correct = None
        if accuracy_key is not None:
            running_acc = float(logs[accuracy_key])
            correct = int(round(running_acc * total - previous_acc * seen))
            self._previous = (running_loss, running_acc, total)
        else:
            self._previous = (running_loss, 0.0, total)
        now = time.perf_counter()
        rec.record_step(size, self._update_lr, batch_loss, correct, now - self._mark)
        if rec.status != "diverged" and rec.evaluation_due() and self.eval_data:
            self._evaluate()
        self._settle()
        self._mark = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rec = self.recorder
        if rec.status == "diverged":
            return
        logs = logs or {}
        given = {}
        for key, value in logs.items():
            if key.startswith("val_"):
                name = "val_acc" if key[len("val_"):] in ACCURACY_KEYS else key
                given[name] = float(value)
        if self.eval_data and not rec.evaluated_now():
            self._evaluate(extra=given)
        elif given:
            rec.record_evaluation(given)
        rec.end_epoch()
        clock = rec.clock
        if clock.n_train == 0 and clock.step_in_epoch == clock.steps_per_epoch:  # a whole epoch: its samples
            rec.learn_n_train(self._previous[2])
        self._settle()
        self._mark = time.perf_counter()

    def on_test_begin(self, logs=None):
        if self._guard is not None:  # Keras makes its test step just before: guard it too
            self._guard.wrap_steps()

    def on_train_end(self, logs=None):
        rec = self.recorder
        if rec is not None and rec.going and self.model.stop_training and rec.clock.step < rec.clock.total_steps:
            # Another callback (Keras' EarlyStopping) ended fit early: ours ask through the recorder.
            self._end("stopped", f"a Keras callback stopped training at step {rec.clock.step}")
        else:
            self._end()

    # -- the end ---------------------------------------------------------------------------------

    def _end(self, status: str | None = None, message: str | None = None) -> None:
        """End the run once (``status`` overrides), and hand Keras back its own steps and callbacks."""
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        if self.recorder is not None and self.run is None:
            self.run = self.recorder.finish(status, message)
            if self._store_callback is not None:
                self.run_id = self._store_callback.run_id

    def _end_on_error(self, error: BaseException) -> None:
        """An exception is leaving ``fit``: the run ends ``interrupted`` (Ctrl-C) or ``failed`` (an
        error) with the rows recorded so far, and the message names the step they end at."""
        if self.recorder is None or self.run is not None:
            return
        rows = self.recorder.steps
        step = rows[-1]["step"] if rows else 0
        if isinstance(error, KeyboardInterrupt):
            status, message = "interrupted", f"interrupted at step {step}"
        else:
            text = str(error).strip().splitlines()
            what = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
            status, message = "failed", f"{what} (the rows end at step {step})"
        try:
            self._end(status, message)
        except Exception as failure:  # the user's exception must still reach them
            warnings.warn(f"batchlab could not end the run as {status}: {failure}", RuntimeWarning, stacklevel=2)

    # -- helpers ---------------------------------------------------------------------------------

    def _batch_size(self, batch: int, seen: int) -> int:
        """The size of the epoch's batch ``batch`` (0-based), after ``seen`` samples of the epoch:
        what Keras' loss tracker counted for it, checked against ``batch_size`` and ``n_train``.

        Without a counting loss tracker (a custom ``train_step``) the sizes follow from ``n_train``;
        without that either they are unknown, and the run is refused rather than guessed.
        """
        clock = self.recorder.clock
        last = batch == clock.steps_per_epoch - 1
        counted = _samples_counted(self._loss_counter)
        if counted is not None and counted > seen:
            size = counted - seen
        elif self.n_train is not None:
            size = self.n_train - batch * self.batch_size if last else self.batch_size
        else:
            raise ConfigError(f"Keras' loss tracker counted no samples for batch {batch + 1} (a custom train_step?), "
                              "so its size is unknown; give BatchlabCallback n_train, the number of training samples")
        where = f"Keras' batch {batch + 1} of epoch {clock.epoch}"
        if size > self.batch_size or (size < self.batch_size and not last):
            raise ConfigError(f"{where} held {size} samples, not batch_size={self.batch_size} (only an epoch's last "
                              "batch may be smaller): give BatchlabCallback the batch_size passed to fit")
        if self.n_train is not None and (seen + size > self.n_train or (last and seen + size != self.n_train)):
            raise ConfigError(f"n_train={self.n_train} contradicts Keras: by {where} the epoch held {seen + size} "
                              "samples; leave n_train out to learn it")
        return size

    def _lr(self) -> float:
        value = self.model.optimizer.learning_rate
        try:
            return float(np.asarray(keras.ops.convert_to_numpy(value)))
        except (TypeError, ValueError):
            return math.nan

    def _settle(self) -> None:
        if not self.recorder.settle():
            self.model.stop_training = True

    def _evaluate(self, extra: dict | None = None) -> None:
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        for split, (X, y) in self.eval_data.items():
            loss, acc = _evaluate_arrays(self.model, X, y)
            metrics[f"{split}_loss"] = loss
            if not math.isnan(acc):
                metrics[f"{split}_acc"] = acc
        metrics.update({k: v for k, v in (extra or {}).items() if k not in metrics})
        self.recorder.record_evaluation(metrics, time.perf_counter() - started)


class _FitGuard:
    """Sees an exception leave Keras' ``fit``, which calls no hook then: wraps the calls ``fit`` makes
    (its callback list's hooks, the model's train and test steps) so that ``on_error`` runs before
    the exception goes on. `remove` makes the wrappers inert and unwraps what it can (another
    guard's wrapper may sit on top of one; it unwraps the inert ones beneath it when it goes)."""

    HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end", "on_test_begin",
             "on_test_end", "on_test_batch_begin", "on_test_batch_end", "on_train_end")
    STEPS = ("train_function", "test_function")

    def __init__(self, model, callback_list, on_error):
        self.model, self.on_error, self.active = model, on_error, True
        self.wrapped: list[tuple[Any, str]] = []
        if callback_list is not None:
            for name in self.HOOKS:
                self._wrap(callback_list, name)
        self.wrap_steps()

    def wrap_steps(self) -> None:
        """Wrap the model's steps that exist and are not wrapped yet (Keras makes the test step late)."""
        for name in self.STEPS:
            current = getattr(self.model, name, None)
            if current is not None and getattr(current, "batchlab_guard", None) is not self:
                self._wrap(self.model, name)

    def _wrap(self, owner, name: str) -> None:
        original, guard = getattr(owner, name), self

        def guarded(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except BaseException as error:
                if guard.active:
                    guard.on_error(error)
                raise

        guarded.batchlab_guard, guarded.batchlab_original = self, original  # type: ignore[attr-defined]
        setattr(owner, name, guarded)
        self.wrapped.append((owner, name))

    def remove(self) -> None:
        self.active = False
        for owner, name in self.wrapped:
            current = getattr(owner, name, None)
            bare: Any = current
            while getattr(bare, "batchlab_guard", None) is not None and not bare.batchlab_guard.active:
                bare = bare.batchlab_original
            if bare is not current:
                setattr(owner, name, bare)
        self.wrapped = []


def _callback_list_holding(callback) -> Any:
    """The `keras.callbacks.CallbackList` that is calling ``callback``'s hook now (None if none is):
    ``fit`` keeps it to itself, and it is the only way into the calls ``fit`` makes."""
    frame: Any = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and any(c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


def _loss_counter(model) -> Any:
    """Keras' loss tracker (a ``Mean`` named ``loss``): its ``count`` is the samples behind the running
    loss, reset at each epoch start. None when the model has none."""
    for metric in getattr(model, "metrics", ()):
        if getattr(metric, "name", None) == "loss" and hasattr(metric, "count"):
            return metric
    return None


def _samples_counted(counter) -> int | None:
    """The samples Keras' loss tracker has counted this epoch (None without a tracker)."""
    if counter is None:
        return None
    return int(round(float(np.asarray(keras.ops.convert_to_numpy(counter.count)))))


def _check_n_train(n_train: int, batch_size: int, steps: int) -> None:
    """Refuse an ``n_train`` that cannot give Keras' ``steps`` batches of ``batch_size`` per epoch."""
    low, high = (steps - 1) * batch_size + 1, steps * batch_size
    if not low <= n_train <= high:
        raise ConfigError(f"n_train={n_train} contradicts Keras: {steps} steps per epoch of batch {batch_size} hold "
                          f"{low} to {high} samples; leave n_train out to learn it from the first epoch")


class _KerasWeights:
    """What events carry as ``model`` for a Keras run: its weights as arrays (``parameters()``), and
    ``load_state_dict`` for `RestoreWeights` (a list of arrays in ``model.get_weights()`` order)."""

    def __init__(self, model):
        self.keras_model = model

    def parameters(self):
        import torch

        return [torch.as_tensor(np.asarray(w)) for w in self.keras_model.get_weights()]

    def state_dict(self):
        return {str(i): np.asarray(w).copy() for i, w in enumerate(self.keras_model.get_weights())}

    def load_state_dict(self, state):
        self.keras_model.set_weights([state[str(i)] for i in range(len(state))])


def _evaluate_arrays(model, X, y, batch_size: int = 8192) -> tuple[float, float]:
    """Mean compiled loss and accuracy of a Keras model over arrays, in inference mode."""
    X, y = np.asarray(X), np.asarray(y)
    loss_fn = _compiled_loss(model)
    loss_sum, correct = 0.0, 0
    classification = y.ndim == 1 and np.issubdtype(y.dtype, np.integer)
    for start in range(0, len(X), batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        output = keras.ops.convert_to_numpy(model(xb, training=False))
        loss = float(keras.ops.convert_to_numpy(loss_fn(yb, output)))  # the batch's mean loss
        loss_sum += loss * len(xb)
        classification = classification and output.ndim == 2
        if classification:
            correct += int((output.argmax(axis=1) == yb).sum())
    return loss_sum / len(X), (correct / len(X) if classification else math.nan)


def _compiled_loss(model) -> Any:
    """The model's compiled loss as ``(y_true, y_pred) -> the batch's mean loss``: a `keras.losses.Loss`
    as it is; a name or a function (per-sample values) averaged over the batch, as Keras reduces it."""
    loss = model.loss
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str) or callable(loss):
        function = keras.losses.get(loss) if isinstance(loss, str) else loss
        if isinstance(function, keras.losses.Loss):
            return function
        return lambda y_true, y_pred: keras.ops.mean(function(y_true, y_pred))
    raise ConfigError(f"eval_data needs a model compiled with one loss, not a {type(loss).__name__}; "
                      "leave eval_data out and give fit validation_data")
