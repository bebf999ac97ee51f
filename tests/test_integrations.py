"""Framework callbacks against what each framework itself logged; the runs in report, runs show, explain."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab.data import load_dataset
from batchlab.store import RunStore

keras = pytest.importorskip("keras")
pl = pytest.importorskip("lightning.pytorch")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module", autouse=True)
def fresh_keras_session():
    """Keras caches its global dtype policy at the first layer made; clear it afterwards, so that a
    later ``set_floatx`` (the float64 equivalence tests) takes effect."""
    yield
    try:
        import keras
    except ImportError:
        return
    keras.utils.clear_session()


@pytest.fixture(scope="module")
def blobs():
    return load_dataset("blobs")


# --- Keras --------------------------------------------------------------------------------------


def keras_model(lr: float):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class KerasLogs(keras.callbacks.Callback):
    """Keras' own per-batch logs, as Keras hands them to any callback."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))


def test_keras_views_equal_keras_logs_and_batches_are_recovered(tmp_path, blobs, cli):
    from batchlab.integrations.keras import BatchlabCallback

    X, y = blobs.train[0].numpy(), blobs.train[1].numpy()
    Xv, yv = blobs.val[0].numpy(), blobs.val[1].numpy()
    path = tmp_path / "k.db"
    model = keras_model(lr=0.05)
    logs = KerasLogs()
    callback = BatchlabCallback(store=path, name="keras run", batch_size=48, n_train=500)
    history = model.fit(X, y, batch_size=48, epochs=3, shuffle=True, validation_data=(Xv, yv), verbose=0,
                        callbacks=[logs, callback])
    run = callback.run
    steps = run.steps
    assert len(steps) == 3 * 11 and steps["batch_size"].tolist()[:11] == [48] * 10 + [20]
    assert np.allclose(steps["running_loss"], [b["loss"] for b in logs.batches], rtol=1e-5)
    assert np.allclose(steps["running_acc"], [b["accuracy"] for b in logs.batches], rtol=1e-5)
    assert np.allclose(run.epochs["running_loss"], history.history["loss"], rtol=1e-5)
    assert np.allclose(run.epochs["val_loss"], history.history["val_loss"], rtol=1e-6)
    assert np.allclose(run.epochs["val_acc"], history.history["val_accuracy"], rtol=1e-6)

    # Exact batch values: at lr 0 and in order, batch t's loss is the model's loss on rows of batch t.
    still = keras_model(lr=0.0)
    callback = BatchlabCallback(batch_size=48, n_train=500)
    still.fit(X, y, batch_size=48, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    direct = [float(still.loss(y[s:s + 48], keras.ops.convert_to_numpy(still(X[s:s + 48])))) for s in range(0, 500, 48)]
    correct = [int((keras.ops.convert_to_numpy(still(X[s:s + 48])).argmax(1) == y[s:s + 48]).sum())
               for s in range(0, 500, 48)]
    assert np.allclose(callback.run.steps["batch_loss"], direct, rtol=1e-4)
    assert (callback.run.steps["batch_acc"] * callback.run.steps["batch_size"]).round().astype(int).tolist() == correct

    status, out, err = cli(["runs", "show", str(callback.run_id or 1), "--store", str(path)])
    assert status == 0 and "keras run" in out, err
    report = tmp_path / "r.html"
    status, out, err = cli(["report", "1", "--store", str(path), "--out", str(report)])
    assert status == 0 and report.exists() and "running_acc" in report.read_text(), err


def test_keras_run_with_dense_evaluation_is_explained(tmp_path, blobs, cli):
    from batchlab.integrations.keras import BatchlabCallback

    X, y = blobs.train[0].numpy(), blobs.train[1].numpy()
    path = tmp_path / "k.db"
    callback = BatchlabCallback(store=path, batch_size=25, n_train=500, eval_every=4, eval_data={"train": (X, y)})
    keras_model(lr=0.05).fit(X, y, batch_size=25, epochs=3, verbose=0, callbacks=[callback])
    evals = callback.run.evals
    assert evals["step"].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60]
    status, out, err = cli(["explain", "--run", str(callback.run_id), "--store", str(path), "--out", str(tmp_path / "fig")])
    assert status == 0, err
    assert "epoch" in out
    # The terms a Keras run's records cannot give are named, with what would record them.
    for term in ("train_mode_term", "reexposure_term", "optimizer_state_term"):
        assert f"not measured: {term}" in out and "a keras run cannot record it" in out


# --- Lightning ----------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    """Logs what Lightning itself reports: the batch loss per step and its epoch mean, val metrics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.logged = []  # (loss, correct, size) per batch, as training_step computes them
        self.seen = []  # (weights before the update, x, y) per batch: the gradient norm's oracle

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        self.logged.append((loss.item(), int((logits.argmax(1) == y).sum()), len(y)))
        self.seen.append(({k: v.detach().clone() for k, v in self.net.state_dict().items()}, x.clone(), y.clone()))
        return {"loss": loss, "logits": logits}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _grad_norm_by_hand(net, weights, x, y) -> float:
    """The L2 norm of the gradient of the batch's mean cross-entropy, in float64, from the weights
    the batch's update started from: an oracle that shares no code with Lightning or batchlab."""
    params = {k: v.double().requires_grad_() for k, v in weights.items()}
    logits = torch.func.functional_call(net, params, (x.double(),))
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(params.values()))
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


class EpochLogs(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_lightning_run_with_dense_evaluation_is_explained_naming_what_it_cannot_give(tmp_path, blobs, cli):
    from batchlab.integrations.lightning import BatchlabCallback

    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs.train), batch_size=50, shuffle=True)
    path = tmp_path / "l.db"
    callback = BatchlabCallback(store=path, eval_every=2, eval_data={"train": blobs.train}, loss_fn=F.cross_entropy)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Classifier(), train)
    status, out, err = cli(["explain", "--run", str(callback.run_id), "--store", str(path), "--out", str(tmp_path / "fig")])
    assert status == 0, err
    for term in ("train_mode_term", "reexposure_term", "optimizer_state_term"):
        assert f"not measured: {term}" in out
    assert "averaging" in out


def test_lightning_views_equal_lightnings_logs(tmp_path, blobs, cli):
    from batchlab.integrations.lightning import BatchlabCallback

    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs.train), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs.val), batch_size=500)
    path = tmp_path / "l.db"
    module, logs = Classifier(), EpochLogs()
    callback = BatchlabCallback(store=path, name="lightning run", probes=["grad_norm"])
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[logs, callback])
    trainer.fit(module, train, val)
    run = callback.tracker.run
    steps = run.steps
    loss, correct, size = (np.array(c, dtype=float) for c in zip(*module.logged))
    assert np.allclose(steps["batch_loss"], loss, rtol=1e-7) and steps["batch_size"].tolist() == size.tolist()
    assert np.allclose(steps["batch_acc"], correct / size, rtol=1e-12)
    # Lightning's epoch value of train_loss is its batch-size-weighted mean: the epoch's running_loss.
    assert np.allclose(run.epochs["running_loss"], [e["train_loss_epoch"] for e in logs.epochs], rtol=1e-6)
    assert np.allclose(run.epochs["val_loss"], [e["val_loss"] for e in logs.epochs], rtol=1e-6)
    assert np.allclose(run.epochs["val_acc"], [e["val_acc"] for e in logs.epochs], rtol=1e-6)
    np.testing.assert_allclose(steps["grad_norm"], [_grad_norm_by_hand(module.net, *seen) for seen in module.seen], rtol=1e-5)

    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "finished" and len(stored.steps) == len(steps) == 24
    status, out, err = cli(["runs", "show", str(callback.run_id), "--store", str(path)])
    assert status == 0 and "lightning run" in out, err
    report = tmp_path / "r.html"
    status, out, err = cli(["report", str(callback.run_id), "--store", str(path), "--out", str(report)])
    assert status == 0 and report.exists(), err
