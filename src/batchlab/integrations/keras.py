"""Keras 3: ``model.fit(..., callbacks=[BatchlabCallback(store="batchlab.db", batch_size=B)])``.

Keras reports, after each batch, the running means of the epoch so far (``logs["loss"]``,
``logs["accuracy"]``): the sample-weighted mean of the batch values, each computed before its
update, reset when an epoch begins — exactly batchlab's ``running_*``. The callback recovers each
batch's own value from two consecutive running means,

    batch_t = (running_t · n_t − running_{t−1} · n_{t−1}) / b_t,   n_t = b_1 + ... + b_t,

and hands it to the measurement core, which rebuilds the running mean from the batch values: the
stored ``running_*`` equal Keras' logs, ``batch_*`` are Keras' per-batch values. Keras computes in
float32, so a recovered batch value carries the running mean's rounding times n_t/b_t.
Validation metrics (``val_loss``, ``val_accuracy``) join each epoch's evaluation row; ``eval_data``
adds full passes (``train`` densely for ``batchlab explain --run``). Probes need the gradients, which
Keras keeps to itself: use `batchlab.track` or `bl.fit` for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

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
        batch_size: the ``batch_size`` given to ``fit`` (Keras does not tell its callbacks).
        n_train: training samples (default: ``batch_size × steps``, exact unless the last batch is short).
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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be the integer batch size given to fit, got {batch_size!r}")
        self.store, self.name, self.batch_size, self.n_train = store, name, batch_size, n_train
        self.eval_every, self.dataset = eval_every, dataset or "user data"
        self.eval_data = dict(eval_data) if isinstance(eval_data, dict) else ({"val": eval_data} if eval_data else {})
        self.extra_callbacks = list(callbacks)
        self.recorder: Recorder | None = None
        self.run: Run | None = None
        self.run_id: int | None = None
        self._store_callback = None

    # -- keras hooks -----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        steps, epochs = int(self.params["steps"]), int(self.params["epochs"])
        n_train = self.n_train or self.batch_size * steps
        clock = Clock(n_train=n_train, batch_size=self.batch_size, steps_per_epoch=steps, total_steps=steps * epochs,
                      epochs=epochs)
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
        self.recorder.start_run()
        if self.eval_data:
            self._evaluate()
        self._settle()
        self._mark = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.recorder.start_epoch()
        self._previous = (0.0, 0.0, 0)  # running loss, running accuracy, samples, before this batch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        rec = self.recorder
        if not rec.going:
            return
        running_loss, size = float(logs["loss"]), self._batch_size(rec.clock.step_in_epoch)
        accuracy_key = next((k for k in ACCURACY_KEYS if k in logs), None)
        if rec.classification and accuracy_key is None and not rec.steps:
            rec.classification = False
        previous_loss, previous_acc, seen = self._previous
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
        rec.record_step(size, self._lr(), batch_loss, correct, now - self._mark)
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
        self._settle()
        self._mark = time.perf_counter()

    def on_train_end(self, logs=None):
        if self.recorder is not None and self.run is None:
            self.run = self.recorder.finish()
            if self._store_callback is not None:
                self.run_id = self._store_callback.run_id

    # -- helpers ---------------------------------------------------------------------------------

    def _batch_size(self, step_in_epoch: int) -> int:
        """The size of the next batch: ``batch_size``, the last one of an epoch what is left of n_train."""
        clock = self.recorder.clock
        if step_in_epoch == clock.steps_per_epoch - 1:
            return clock.n_train - step_in_epoch * self.batch_size
        return self.batch_size

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
    loss_sum, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        output = keras.ops.convert_to_numpy(model(xb, training=False))
        loss = float(keras.ops.convert_to_numpy(model.loss(yb, output)))  # the batch's mean loss
        loss_sum += loss * len(xb)
        if output.ndim == 2 and yb.ndim == 1 and np.issubdtype(yb.dtype, np.integer):
            correct += int((output.argmax(axis=1) == yb).sum())
        else:
            correct = -1
    classification = correct >= 0
    return loss_sum / len(X), (correct / len(X) if classification else math.nan)
