"""PyTorch Lightning: ``Trainer(callbacks=[BatchlabCallback(store="batchlab.db")])``.

The callback drives a `batchlab.tracking.Tracker` from Lightning's hooks: the loss of each
(micro-)batch as Lightning back-propagates it (``on_before_backward``, its normalisation by
``accumulate_grad_batches`` undone), the gradients after ``backward`` (probes), the update
(``optimizer.step``), and the batch's correct count when ``training_step`` returns a dict with the
batch's ``logits`` (``return {"loss": loss, "logits": logits}``; without it the run records losses
only). Gradient accumulation follows Lightning: ``accumulate_grad_batches=k`` micro-batches make
an update, and an epoch's last group makes one however short it is (Lightning steps on it:
``on_before_optimizer_step`` ends the update), so a step row is an optimizer step Lightning took.
Validation metrics the module logs as ``val_*`` (``self.log("val_loss", ...)``) join each epoch's
evaluation row; ``eval_data`` adds full passes of batchlab's own (``train`` densely for ``batchlab
explain --run``). A `Stop` request (EarlyStopping, a divergence) sets ``trainer.should_stop``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from ..errors import ConfigError, error_line
from ..events import Callback
from ..tracking import Tracker, track


class BatchlabCallback(pl.Callback):
    """Record a Lightning training run with batchlab's metric views and probes.

    Args:
        store: a `batchlab.store.RunStore` or a path; the run is recorded there (kind ``track``).
        name: the run's name in the store.
        probes: as for `batchlab.track` (``grad_norm``, ``noise_scale``, ``dist_from_init``, ...).
        eval_every: evaluate ``eval_data`` every this many steps (and at every epoch end).
        eval_data: ``{"train": (X, y), "val": ...}`` tensors or loaders, evaluated with ``loss_fn``.
        loss_fn: ``(outputs, targets) -> loss`` for ``eval_data``.
        callbacks: batchlab callbacks (``EarlyStopping`` etc.).
        n_train: training-set size (default: the train dataloader's dataset length).
        dataset: a name for the data, shown in the store (default: the datamodule's class name, or
            the training dataset's ``name`` attribute; else none).
    """

    def __init__(self, store: Any = None, *, name: str | None = None, probes: Sequence[Any] = (),
                 eval_every: int | None = None, eval_data: Any = None, loss_fn: Any = None,
                 callbacks: Sequence[Callback] = (), n_train: int | None = None, dataset: str | None = None):
        super().__init__()
        self.options = dict(store=store, name=name, probes=probes, eval_every=eval_every, eval_data=eval_data,
                             loss_fn=loss_fn, callbacks=callbacks, n_train=n_train, dataset=dataset)
        self.tracker: Tracker | None = None
        self._loss = math.nan
        self._size = 0
        self._scale = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"BatchlabCallback records runs with one optimizer; this module has {len(trainer.optimizers)}")
        options = dict(self.options)
        if options["n_train"] is None:
            options["n_train"] = _dataset_length(trainer)
        if options["dataset"] is None:
            options["dataset"] = _dataset_name(trainer)
        self._scale = trainer.accumulate_grad_batches
        self.tracker = track(pl_module, trainer.optimizers[0], accumulate=self._scale, **options)
        self.tracker.defer_completion = True  # the batch's outputs come after the update
        self.tracker.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._size = _batch_length(batch)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach()) * self._scale  # Lightning divided it by accumulate_grad_batches

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            self.tracker.step(self._loss, batch_size=self._size)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning steps now, after `accumulate_grad_batches` micro-batches or on an epoch's last,
        # shorter group: that is where the update ends.
        if self.tracker is not None:
            self.tracker.end_update()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tracker is None:
            return
        self.tracker.batch_end(_correct_count(outputs, batch))
        if self.tracker.should_stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.tracker is None:
            return
        val = {key[len("val_"):]: float(value) for key, value in trainer.callback_metrics.items()
               if key.startswith("val_") and not key.endswith("_step") and torch.as_tensor(value).numel() == 1}
        self.tracker.end_epoch(**({"val": val} if val else {}))
        if self.tracker.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            self.tracker.finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.tracker is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            self.tracker.end_abruptly("interrupted")  # the message names the step the rows end at
        else:
            self.tracker.end_abruptly("failed", error_line(exception))

    @property
    def run_id(self) -> int | None:
        return self.tracker.run_id if self.tracker is not None else None

    @property
    def steps(self):
        """The run's step table so far (empty before training): what `batchlab.AdaptiveBatchSampler`
        reads the noise scale from."""
        import pandas as pd

        return self.tracker.steps if self.tracker is not None else pd.DataFrame()

    @property
    def optimizer(self):
        """The optimizer the run trains with (None before training), for `batchlab.AdaptiveBatchSampler`."""
        return self.tracker.optimizer if self.tracker is not None else None


def _batch_length(batch: Any) -> int:
    """Samples in a batch: the first tensor's length ((x, y) pairs, dicts of tensors), else len()."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return int(first.shape[0])
    return len(first)


def _correct_count(outputs: Any, batch: Any) -> int | None:
    """The batch's correct predictions when ``training_step`` returned its (b, K) ``logits`` and the
    batch is ``(x, y)`` with (b,) class indices; else None (a loss-only row)."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if not isinstance(logits, torch.Tensor) or not isinstance(batch, (list, tuple)) or len(batch) < 2:
        return None
    targets = batch[1]
    if (not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.is_floating_point()
            or logits.dim() != 2 or len(logits) != len(targets)):
        return None
    return int((logits.detach().argmax(dim=1) == targets).sum())


def _dataset_name(trainer: pl.Trainer) -> str:
    """What the data is called, where Lightning knows: the datamodule's ``name`` or class name, or the
    training dataset's ``name`` attribute; "" where nothing names it (a class such as TensorDataset
    says how the data is held, not what it is)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        name = getattr(datamodule, "name", None)
        return name if isinstance(name, str) and name else type(datamodule).__name__
    name = getattr(getattr(trainer.train_dataloader, "dataset", None), "name", None)
    return name if isinstance(name, str) else ""


def _dataset_length(trainer: pl.Trainer) -> int | None:
    loader = trainer.train_dataloader
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None
