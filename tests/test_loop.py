"""The training loop: accounting, metric views, determinism, events, stopping, resuming."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.callbacks import Checkpoint, EarlyStopping
from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError, ModelError
from batchlab.events import Callback, Stop
from batchlab.loop import fit, plan_run
from batchlab.metrics import evaluate, loss_function


def toy(n=120, n_val=40, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, 6, generator=g)
    y = ((X[:, 0] > 0).long() + (X[:, 1] > 0.5).long())
    return Dataset("toy", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=3)


def mlp(seed=0, dropout=0.0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                   torch.nn.Linear(20, 3))


def train(config, dataset=None, model=None, **kwargs):
    return fit(model or mlp(), dataset or toy(), config, progress=False, **kwargs)


@pytest.mark.parametrize(("batch_size", "drop_last", "per_epoch"), [(32, False, 4), (32, True, 3), (1, False, 120),
                                                                  ("full", False, 1), (120, True, 1)])
def test_accounting(batch_size, drop_last, per_epoch):
    run = train(TrainConfig(batch_size=batch_size, drop_last=drop_last, epochs=3))
    assert run.clock.steps_per_epoch == per_epoch
    assert len(run.steps) == 3 * per_epoch
    assert run.steps["step"].tolist() == list(range(1, 3 * per_epoch + 1))
    sizes = run.steps.groupby("epoch")["batch_size"].sum()
    batch = 120 if batch_size == "full" else batch_size
    assert (sizes == (per_epoch * batch if drop_last else 120)).all()
    assert run.epochs["samples_seen"].tolist() == np.cumsum(sizes).tolist()


def test_accounting_line():
    clock = plan_run(toy(n=4000), TrainConfig(batch_size=32, epochs=20))
    assert clock.describe() == "4000 samples, batch 32 -> 125 steps/epoch, 20 epochs = 2500 steps"


def test_max_steps_ends_mid_epoch():
    run = train(TrainConfig(batch_size=32, epochs=5, max_steps=6))
    assert len(run.steps) == 6 and run.clock.epoch == 2
    assert run.epochs["step"].tolist() == [4, 6]
    assert run.evals["step"].tolist() == [0, 4, 6]


def test_batch_order_is_a_fresh_permutation_each_epoch():
    """The documented order: one ``torch.randperm(N)`` per epoch from a generator seeded with the seed."""
    config = TrainConfig(batch_size=40, epochs=2, lr=1e-9, seed=5)
    dataset = toy()
    generator = torch.Generator().manual_seed(5)
    orders = [torch.randperm(120, generator=generator) for _ in range(2)]  # written out, not the library's
    assert not torch.equal(orders[0], orders[1])
    model = mlp()
    expected = []
    with torch.no_grad():
        for order in orders:
            for start in range(0, 120, 40):
                index = order[start:start + 40]
                expected.append(torch.nn.functional.cross_entropy(model(dataset.train[0][index]),
                                                                  dataset.train[1][index]).item())
    run = train(config, dataset, model)
    # lr ~ 0: the weights do not move, so each batch's loss identifies the batch drawn.
    np.testing.assert_allclose(run.steps["batch_loss"], expected, rtol=1e-5)
    first, second = run.steps["batch_loss"].iloc[:3].to_numpy(), run.steps["batch_loss"].iloc[3:].to_numpy()
    assert not np.allclose(np.sort(first), np.sort(second))  # other batches in epoch 2, not a replay


def test_batch_values_are_before_the_update_and_running_is_their_weighted_mean():
    dataset = toy()
    model = mlp()
    first_batch = torch.randperm(120, generator=torch.Generator().manual_seed(0))[:50]  # the documented order
    with torch.no_grad():
        out = model(dataset.train[0][first_batch])
        loss0 = torch.nn.functional.cross_entropy(out, dataset.train[1][first_batch]).item()
        acc0 = (out.argmax(1) == dataset.train[1][first_batch]).float().mean().item()
    run = train(TrainConfig(batch_size=50, epochs=3, lr=0.3), dataset, model)
    steps = run.steps
    assert steps.loc[0, "batch_loss"] == pytest.approx(loss0, rel=1e-6)
    assert steps.loc[0, "batch_acc"] == pytest.approx(acc0)
    for epoch, group in steps.groupby("epoch"):
        weights = group["batch_size"].cumsum()
        np.testing.assert_allclose(group["running_loss"], (group["batch_loss"] * group["batch_size"]).cumsum() / weights)
        np.testing.assert_allclose(group["running_acc"], (group["batch_acc"] * group["batch_size"]).cumsum() / weights)
        by_hand = (group["batch_loss"] * group["batch_size"]).sum() / group["batch_size"].sum()
        assert run.epochs.set_index("epoch").loc[epoch, "running_loss"] == pytest.approx(by_hand, rel=1e-12)


def test_full_pass_metrics_equal_an_independent_evaluation():
    dataset = toy()
    model = mlp(dropout=0.3)
    run = train(TrainConfig(batch_size=16, epochs=2, lr=0.1), dataset, model)
    assert model.training  # every evaluation switched to eval mode and back; training ends in train mode
    model.eval()
    with torch.no_grad():
        for split, prefix in ((dataset.train, "train"), (dataset.val, "val")):
            out = model(split[0])
            loss = torch.nn.functional.cross_entropy(out, split[1]).item()
            acc = (out.argmax(1) == split[1]).float().mean().item()
            assert run.epochs[f"{prefix}_loss"].iloc[-1] == pytest.approx(loss, rel=1e-5)
            assert run.epochs[f"{prefix}_acc"].iloc[-1] == pytest.approx(acc)


def test_evaluate_restores_mode_and_handles_chunks():
    dataset = toy()
    model = mlp(dropout=0.5).train()
    loss_fn = loss_function("auto", "classification")
    whole = evaluate(model, dataset.train, loss_fn, True, batch_size=10_000)
    chunked = evaluate(model, dataset.train, loss_fn, True, batch_size=7)
    assert model.training
    assert whole[0] == pytest.approx(chunked[0], rel=1e-6) and whole[1] == chunked[1]


def test_eval_every_k_steps_and_step_table_merge():
    run = train(TrainConfig(batch_size=10, epochs=2, eval_every=5))  # 12 steps per epoch
    assert run.evals["step"].tolist() == [0, 5, 10, 12, 15, 20, 24]
    evaluated = run.steps.dropna(subset=["train_loss"])["step"].tolist()
    assert evaluated == [5, 10, 12, 15, 20, 24]


def test_same_seed_is_bit_identical_and_other_seed_differs():
    config = TrainConfig(batch_size=8, epochs=2, lr=0.1, momentum=0.9, seed=7)
    a = train(config, model=mlp(dropout=0.2))
    b = train(config, model=mlp(dropout=0.2))
    pd.testing.assert_frame_equal(a.steps.drop(columns="seconds"), b.steps.drop(columns="seconds"), check_exact=True)
    c = train(config.replace(seed=8), model=mlp(dropout=0.2))
    assert not np.array_equal(a.steps["batch_loss"], c.steps["batch_loss"])


def test_fit_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(TrainConfig(batch_size=8, epochs=1), model=mlp(dropout=0.5))
    assert torch.equal(torch.rand(3), expected)


def test_divergence_is_recorded_and_stops():
    run = train(TrainConfig(batch_size=4, epochs=5, lr=1e6, momentum=0.9))
    assert run.status == "diverged"
    assert not math.isfinite(run.steps["batch_loss"].iloc[-1])
    assert "lower the learning rate" in run.message
    assert len(run.steps) < 5 * 30


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, event):
        self.events.append(("start", event.clock.step))

    def on_step_end(self, event):
        self.events.append(("step", event.clock.step))

    def on_evaluation(self, event):
        self.events.append(("eval", event.clock.step))

    def on_epoch_end(self, event):
        self.events.append(("epoch", event.clock.epoch, len(event.steps), len(event.evals)))

    def on_run_end(self, event):
        self.events.append(("end", event.status))


def test_event_order():
    recorder = Recorder()
    train(TrainConfig(batch_size=60, epochs=2), callbacks=[recorder])
    assert recorder.events == [
        ("start", 0), ("eval", 0),
        ("step", 1), ("step", 2), ("eval", 2), ("epoch", 1, 2, 2),
        ("step", 3), ("step", 4), ("eval", 4), ("epoch", 2, 2, 1),
        ("end", "finished"),
    ]


def test_stop_request_from_a_callback():
    class StopAtStep3(Callback):
        def on_step_end(self, event):
            return Stop("enough") if event.clock.step == 3 else None

    run = train(TrainConfig(batch_size=10, epochs=5), callbacks=[StopAtStep3()])
    assert run.status == "stopped" and run.message == "enough" and len(run.steps) == 3


def test_checkpoint_resume_is_bit_identical(tmp_path):
    config = TrainConfig(batch_size=16, epochs=4, lr=0.1, momentum=0.9, seed=2)
    whole = train(config, model=mlp(dropout=0.3))

    class StopAfterEpoch2(Callback):
        def on_epoch_end(self, event):
            return Stop("killed") if event.clock.epoch == 2 else None

    path = tmp_path / "run.ckpt"
    first = train(config, model=mlp(dropout=0.3), callbacks=[Checkpoint(path), StopAfterEpoch2()])
    assert first.status == "stopped" and path.exists()
    resumed = train(config, model=mlp(seed=99, dropout=0.3), resume_from=path)
    pd.testing.assert_frame_equal(whole.steps.drop(columns="seconds"), resumed.steps.drop(columns="seconds"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(whole.epochs.drop(columns="seconds"), resumed.epochs.drop(columns="seconds"),
                                  check_exact=True)


def test_resume_with_another_config_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    train(TrainConfig(batch_size=16, epochs=1), callbacks=[Checkpoint(path)])
    with pytest.raises(ConfigError, match="another config"):
        train(TrainConfig(batch_size=8, epochs=1), resume_from=path)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, writer):
    """A checkpoint whose pickle would create a file when loaded: refused in one line, file not created."""
    import pickle

    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    blob = {"meta": "{}", "model": _Payload(marker)}
    if writer == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob))
    with pytest.raises(ConfigError) as error:
        train(TrainConfig(batch_size=16, epochs=1), resume_from=path)
    assert "\n" not in str(error.value) and "nothing in it was run" in str(error.value)
    assert not marker.exists()
    if writer == "pickle":  # the payload is real: an unsafe load runs it
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_is_tensors_and_json(tmp_path):
    """The checkpoint loads with the safe loader alone; its metadata is JSON text."""
    import json

    path = tmp_path / "run.ckpt"
    train(TrainConfig(batch_size=16, epochs=1), callbacks=[Checkpoint(path)], probes=["noise_scale", "dist_from_init"])
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    assert meta["config"]["batch_size"] == 16 and meta["clock"]["step"] == len(meta["steps"])


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(TrainConfig(batch_size=500))
    with pytest.raises(ModelError, match="3 classes"):
        train(TrainConfig(), model=torch.nn.Linear(6, 2))
    with pytest.raises(ModelError, match="cannot take"):
        train(TrainConfig(), model=torch.nn.Linear(7, 3))



def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same check on every machine
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(TrainConfig(device="cuda"))


def test_regression_task_uses_mse():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5])
    dataset = Dataset("reg", (X, y), None, None, n_classes=None)
    run = fit(torch.nn.Linear(3, 1), dataset, TrainConfig(batch_size=16, epochs=30, lr=0.1), progress=False)
    assert "batch_acc" not in run.steps and "train_acc" not in run.epochs
    assert run.epochs["train_loss"].iloc[-1] < 0.01 * run.evals["train_loss"].iloc[0]


# EarlyStopping, checked against Keras' own EarlyStopping on the same sequence of epoch values.

def _keras_stop_epoch(values, **kwargs):
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")

    class Model:
        stop_training = False

        def get_weights(self):
            return []

        def set_weights(self, weights):
            pass

    if kwargs.get("monitor", "").endswith("acc") and "mode" not in kwargs:
        kwargs = {**kwargs, "mode": "max"}  # Keras infers this from the compiled metric; ours from the name
    callback = keras.callbacks.EarlyStopping(**kwargs)
    callback.set_model(Model())
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {kwargs.get("monitor", "val_loss"): value})
        if callback.model.stop_training:
            return epoch + 1
    return None


def _our_stop_epoch(values, **kwargs):
    from types import SimpleNamespace

    callback = EarlyStopping(**kwargs)
    callback.on_run_start(None)
    model = torch.nn.Linear(1, 1)
    for epoch, value in enumerate(values, start=1):
        event = SimpleNamespace(row={kwargs.get("monitor", "val_loss"): value},
                                clock=SimpleNamespace(epoch=epoch), model=model)
        if isinstance(callback.on_epoch_end(event), Stop):
            return epoch
    return None


@pytest.mark.parametrize("kwargs", [
    dict(patience=2),
    dict(patience=0),
    dict(patience=2, min_delta=0.05),
    dict(patience=1, start_from_epoch=3),
    dict(patience=3, baseline=0.5),
    dict(monitor="val_acc", patience=2),
    dict(monitor="val_acc", patience=1, mode="min"),
])
def test_early_stopping_matches_keras(kwargs):
    rng = np.random.default_rng(0)
    for trial in range(20):
        values = list(np.round(rng.uniform(0.4, 1.0, size=12), 2))
        assert _our_stop_epoch(values, **kwargs) == _keras_stop_epoch(values, **kwargs), (trial, values)


def test_early_stopping_restores_best_weights():
    dataset = toy()
    model = mlp()
    best = {}

    class Snapshot(Callback):
        def on_epoch_end(self, event):
            best[event.clock.epoch] = (event.row["val_loss"], {k: v.clone() for k, v in event.model.state_dict().items()})

    run = train(TrainConfig(batch_size=8, epochs=8, lr=2.0), dataset, model,
                callbacks=[Snapshot(), EarlyStopping(patience=2, restore_best_weights=True)])
    best_epoch = min(best, key=lambda e: best[e][0])
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[best_epoch][1][key])
