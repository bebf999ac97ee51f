"""The Lightning callback follows ``accumulate_grad_batches`` as Lightning applies it: a step row is
an optimizer step Lightning took (an epoch's short last group included), checked against the
losses, gradients and epoch means Lightning itself computed and logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab.data import load_dataset
from batchlab.store import RunStore

pl = pytest.importorskip("lightning.pytorch")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


class Classifier(pl.LightningModule):
    """Keeps what Lightning computes: each micro-batch's loss, correct count and size, and the
    gradient norm at each optimizer step Lightning takes."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.batches, self.step_norms, self.crash_at = [], [], crash_at

    def training_step(self, batch, batch_idx):
        if self.crash_at is not None and len(self.batches) == self.crash_at:
            raise RuntimeError("the data went bad")
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.batches.append((self.current_epoch, batch_idx, loss.item(), int((logits.argmax(1) == y).sum()), len(y)))
        return {"loss": loss, "logits": logits}

    def on_before_optimizer_step(self, optimizer):
        self.step_norms.append(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).norm().item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BlobsData(pl.LightningDataModule):
    """23 batches of 10 an epoch."""

    def train_dataloader(self):
        X, y = load_dataset("blobs").train
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:230], y[:230]), batch_size=10)


class EpochLogs(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def trainer_for(callbacks, epochs: int = 2) -> "pl.Trainer":
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                      accumulate_grad_batches=2, callbacks=callbacks)


def test_accumulation_with_a_short_last_group_follows_lightnings_steps(tmp_path, cli):
    """Before: "end_epoch came after 1 of 2 micro-batches" at the first epoch's end, which stopped
    the training; the store showed the module's class as the dataset and 0 steps per epoch."""
    from batchlab.integrations.lightning import BatchlabCallback

    path = tmp_path / "l.db"
    module, logs = Classifier(), EpochLogs()
    callback = BatchlabCallback(store=path, name="accumulated", probes=["grad_norm"])
    trainer = trainer_for([logs, callback])
    trainer.fit(module, datamodule=BlobsData())
    steps = callback.tracker.run.steps

    # Lightning's own account: the optimizer steps it took, two micro-batches each, the last alone.
    assert trainer.global_step == len(module.step_norms) == len(steps) == 24
    epoch, index, loss, correct, size = (np.array(c, dtype=float) for c in zip(*module.batches))
    update = epoch * 12 + index // 2  # Lightning steps after batches 1, 3, ..., 21 and on batch 22
    sizes = np.bincount(update.astype(int), weights=size)
    assert steps["batch_size"].tolist() == sizes.tolist() == ([20.0] * 11 + [10.0]) * 2
    weighted = np.bincount(update.astype(int), weights=loss * size) / sizes
    assert np.allclose(steps["batch_loss"], weighted, rtol=1e-6)
    assert np.allclose(steps["batch_acc"], np.bincount(update.astype(int), weights=correct) / sizes, rtol=1e-12)
    assert np.allclose(steps["grad_norm"], module.step_norms, rtol=1e-6)
    # Lightning's epoch mean of the logged loss (weighted by batch size) is the epoch's running_loss.
    assert np.allclose(callback.tracker.run.epochs["running_loss"], [e["train_loss"] for e in logs.epochs], rtol=1e-6)

    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "finished" and len(stored.steps) == 24
    assert stored.spec["dataset"] == "BlobsData"
    assert stored.spec["clock"]["steps_per_epoch"] is None and stored.summary["steps_per_epoch"] == 12
    code, out, err = cli(["runs", "list", "--store", str(path), "--json"])
    assert code == 0, err
    assert [row["dataset"] for row in json.loads(out)] == ["BlobsData"]


def test_a_crash_in_lightning_is_stored_as_failed(tmp_path):
    from batchlab.integrations.lightning import BatchlabCallback

    path = tmp_path / "crash.db"
    callback = BatchlabCallback(store=path)
    module = Classifier(crash_at=7)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*load_dataset("blobs").train), batch_size=50)
    with pytest.raises(RuntimeError, match="the data went bad"):
        trainer_for([callback], epochs=1).fit(module, train)
    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "failed" and stored.message == "RuntimeError: the data went bad"
    assert stored.spec["dataset"] == "user data"  # a TensorDataset names no data
    assert stored.steps["batch_size"].tolist() == [100, 100, 100]
