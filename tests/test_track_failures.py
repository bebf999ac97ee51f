"""A measurement never stops the user's training: a probe that cannot measure a model records NaN
with one warning and the run says why; a run whose training code raised is stored as ``failed``
(Ctrl-C: ``interrupted``), with the rows it made."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.events import Callback
from batchlab.models import build_model
from batchlab.probes import ProbeWarning
from batchlab.store import RunStore, recorder

NOISE_COLUMNS = ["grad_sq", "trace_cov", "noise_scale", "grad_sq_raw", "trace_cov_raw"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


def small_cnn() -> torch.nn.Module:
    """A CNN with batch norm, which mixes a batch's samples: no per-sample gradient norms to read."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 6 * 6, 3))  # (B, 1, 8, 8) -> (B, 2, 6, 6) -> (B, 3)


def test_noise_scale_on_a_cnn_with_batch_norm_warns_once_records_nan_and_training_goes_on(tmp_path):
    """Before: "it is not made of nn.Linear layers" raised from inside the first forward pass. Now one
    ProbeWarning naming what cannot be measured, NaN noise-scale columns at every step, and the other
    probe and every row as the loop computed them; the run is finished and its message says which
    probe was not measured."""
    generator = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 1, 8, 8, generator=generator), torch.randint(0, 3, (120,), generator=generator)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []  # (loss, gradient norm) as the loop computes them
    path = tmp_path / "cnn.db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bl.track(model, optimizer, store=path, probes=["noise_scale", "grad_norm"]) as run:
            for _ in range(2):
                for start in range(0, 120, 40):
                    out = model(X[start:start + 40])
                    loss = F.cross_entropy(out, y[start:start + 40])
                    optimizer.zero_grad()
                    loss.backward()
                    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
                    seen.append((loss.item(), norm))
                    run.step(loss, outputs=out, targets=y[start:start + 40])
                    optimizer.step()
                run.end_epoch()
    probe_warnings = [w for w in caught if issubclass(w.category, ProbeWarning)]
    assert len(probe_warnings) == 1 and "noise_scale" in str(probe_warnings[0].message)
    assert "\n" not in str(probe_warnings[0].message) and "batch norm" in str(probe_warnings[0].message)
    assert probe_warnings[0].filename == __file__  # it points at the loop's own line
    steps = run.steps
    loss, norm = (np.array(c) for c in zip(*seen))
    assert len(steps) == 6 and np.allclose(steps["batch_loss"], loss, rtol=1e-7)
    assert np.allclose(steps["grad_norm"], norm, rtol=1e-5)
    assert steps[NOISE_COLUMNS].isna().all().all()
    assert run.status == "finished" and "noise_scale not measured" in run.run.message
    with RunStore(path) as store:
        stored = store.load_run(run.run_id)
    assert stored.status == "finished" and "noise_scale not measured" in stored.message
    assert stored.steps[NOISE_COLUMNS].isna().all().all() and len(stored.steps) == 6
    # What the store knows of the accounting: unknown at the start (not 0), observed at the end.
    assert stored.spec["clock"] == {"n_train": None, "batch_size": 40, "steps_per_epoch": None,
                                    "total_steps": None, "epochs": None}
    assert stored.summary["steps_per_epoch"] == 3 and stored.summary["epochs"] == 2


@dataclass(frozen=True)
class Broken:
    """A probe that measures twice, then fails (as a probe meeting a layer it cannot handle would)."""

    name: str = "broken"
    point: str = "backward"

    def init(self, ctx):
        return 0

    def measure(self, state, ctx, losses):
        if state >= 2:
            raise RuntimeError("cannot handle this layer\nsecond line")
        return state + 1, {"broken": float(state)}


def test_a_failing_probe_in_fit_leaves_the_training_as_it_would_have_been():
    """bl.fit shares the probe set: the failing probe's column is NaN from its failure on, one warning,
    and every training number equals those of the same run without it."""
    ds = load_dataset("blobs")
    config = TrainConfig(batch_size=100, epochs=2, lr=0.1, seed=0)
    plain = bl.fit(build_model("mlp", ds, hidden=[8], seed=0), ds, config, probes=["grad_norm"], progress=False)
    with pytest.warns(ProbeWarning, match="broken cannot measure this run .RuntimeError: cannot handle this layer."):
        probed = bl.fit(build_model("mlp", ds, hidden=[8], seed=0), ds, config, probes=["grad_norm", Broken()],
                        progress=False)
    for column in ("batch_loss", "batch_acc", "running_loss", "grad_norm"):
        assert probed.steps[column].tolist() == plain.steps[column].tolist(), column
    assert probed.steps["broken"].tolist()[:2] == [0.0, 1.0] and probed.steps["broken"].iloc[2:].isna().all()
    assert probed.status == "finished"
    assert probed.message == "broken not measured: RuntimeError: cannot handle this layer"


def train_until(run, model, optimizer, X, y, crash_at: int, error: BaseException) -> None:
    for step, start in enumerate(range(0, 500, 50), start=1):
        if step == crash_at:
            raise error
        out = model(X[start:start + 50])
        loss = F.cross_entropy(out, y[start:start + 50])
        optimizer.zero_grad()
        loss.backward()
        run.step(loss, outputs=out, targets=y[start:start + 50])
        optimizer.step()


@pytest.mark.parametrize("error, status", [(RuntimeError("CUDA out of memory"), "failed"),
                                           (KeyboardInterrupt(), "interrupted")])
def test_a_crashed_loop_is_stored_as_failed_and_listed_so(tmp_path, cli, error, status):
    """Before: every error in the loop was stored as ``interrupted``, and ``runs list --status
    failed`` was not accepted."""
    ds = load_dataset("blobs")
    model = build_model("mlp", ds, hidden=[8], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "crash.db"
    with pytest.raises(type(error)):
        with bl.track(model, optimizer, store=path, name="crashes") as run:
            train_until(run, model, optimizer, *ds.train, crash_at=4, error=error)
    with RunStore(path) as store:
        stored = store.load_run(run.run_id)
    assert stored.status == status and stored.steps["step"].tolist() == [1, 2, 3]
    if status == "failed":
        assert stored.message == "RuntimeError: CUDA out of memory"
    code, out, err = cli(["runs", "list", "--status", status, "--store", str(path), "--json"])
    assert code == 0, err
    assert [row["name"] for row in json.loads(out)] == ["crashes"]


class RaisesAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, event):
        if event.clock.step == self.step:
            raise ValueError("a bug in the callback")


def test_a_crash_inside_fit_is_stored_as_failed(tmp_path):
    """bl.fit stored nothing at the end of a run its training code crashed (the run stayed
    ``running``, later shown as ``interrupted``)."""
    ds = load_dataset("blobs")
    path = tmp_path / "fit.db"
    config = TrainConfig(batch_size=100, epochs=2, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="a bug in the callback"):
        bl.fit(build_model("mlp", ds, hidden=[8], seed=0), ds, config, callbacks=[recorder(path), RaisesAt(7)],
               progress=False)
    with RunStore(path) as store:
        listed = store.list_runs()
        stored = store.load_run(int(listed["id"].iloc[0]))
    assert stored.status == "failed" and stored.message == "ValueError: a bug in the callback"
    assert stored.steps["step"].tolist() == list(range(1, 8))


def test_the_micro_batch_noise_scale_failing_leaves_nan_and_the_training_going(monkeypatch):
    """The accumulation path's noise scale (not in the probe set) keeps the same promise."""
    import batchlab.tracking as tracking

    calls = []
    original = tracking.MicroBatchNoise.finish

    def finish(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a gradient went missing")
        return original(self)

    monkeypatch.setattr(tracking.MicroBatchNoise, "finish", finish)
    ds = load_dataset("blobs")
    X, y = ds.train
    model = build_model("mlp", ds, hidden=[8], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(ProbeWarning, match="noise_scale cannot measure this run .RuntimeError: a gradient went missing"):
        with bl.track(model, optimizer, probes=["noise_scale"], accumulate=2) as run:
            for i in range(12):
                out = model(X[25 * i:25 * i + 25])
                (F.cross_entropy(out, y[25 * i:25 * i + 25]) / 2).backward()
                run.step(0.5, outputs=out, targets=y[25 * i:25 * i + 25])
                if i % 2:
                    optimizer.step()
                    optimizer.zero_grad()
    steps = run.steps
    assert len(steps) == 6 and len(calls) == 3
    assert steps["grad_sq_raw"].iloc[:2].notna().all() and steps[NOISE_COLUMNS].iloc[2:].isna().all().all()
    assert run.run.message == "noise_scale not measured: RuntimeError: a gradient went missing"


def test_an_interrupted_loop_names_the_step_its_rows_end_at(tmp_path):
    """Steps are kept as tensors and read back every 64: the message is made after the read-back
    (before: "interrupted at step 0" with 15 rows stored)."""
    generator = torch.Generator().manual_seed(0)
    X, y = torch.randn(300, 4, generator=generator), torch.randint(0, 3, (300,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "interrupted.db"
    with pytest.raises(KeyboardInterrupt):
        with bl.track(model, optimizer, store=path) as run:
            for step, start in enumerate(range(0, 300, 20)):
                out = model(X[start:start + 20])
                loss = F.cross_entropy(out, y[start:start + 20])
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y[start:start + 20])
                optimizer.step()
                if step == 14:
                    raise KeyboardInterrupt
    with RunStore(path) as store:
        stored = store.load_run(run.run_id)
    assert stored.status == "interrupted" and len(stored.steps) == 15
    assert stored.message == f"interrupted at step {int(stored.steps['step'].iloc[-1])}" == "interrupted at step 15"
