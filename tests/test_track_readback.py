"""bl.track reads its steps' numbers back in bulk: the rows must be those the loop itself computed,
whatever the read-back window, with divergence and per-step callbacks where they belong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.data import Dataset, load_dataset
from batchlab.events import Callback
from batchlab.models import build_model
from batchlab.tracking import READ_BACK_EVERY


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def blobs64() -> Dataset:
    ds = load_dataset("blobs")
    return Dataset("blobs", (ds.train[0].double(), ds.train[1]), None, None, ds.n_classes)


def test_rows_across_read_back_windows_are_the_loops_own(blobs64):
    """Epochs longer than the read-back window, a short last batch, an lr that changes every step and
    a probe measured every third step: each row holds what the loop computed at that step."""
    model = build_model("mlp", blobs64, hidden=[8], seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.999)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs64.train), batch_size=3, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))  # 500 = 166·3 + 2
    assert len(loader) > 2 * READ_BACK_EVERY
    seen = []  # (epoch, loss, correct, size, lr, grad_norm or NaN), as the loop computes them
    with bl.track(model, optimizer, probes=["grad_norm"], probe_every=3) as run:
        for epoch in (1, 2):
            for x, y in loader:
                out = model(x)
                loss = F.cross_entropy(out, y)
                optimizer.zero_grad()
                loss.backward()
                measured = len(seen) % 3 == 0
                norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item() if measured else np.nan
                seen.append((epoch, loss.item(), (out.argmax(1) == y).sum().item(), len(y),
                             optimizer.param_groups[0]["lr"], norm))
                run.step(loss, outputs=out, targets=y)
                optimizer.step()
                schedule.step()
            run.end_epoch()
    mine = pd.DataFrame(seen, columns=["epoch", "loss", "correct", "size", "lr", "grad_norm"])
    steps = run.steps
    assert len(steps) == len(mine) == 2 * 167 and mine["size"].iloc[166] == 2
    assert steps["batch_size"].tolist() == mine["size"].tolist()
    assert np.allclose(steps["batch_loss"], mine["loss"], rtol=1e-12)
    assert np.allclose(steps["batch_acc"], mine["correct"] / mine["size"], rtol=1e-12)
    assert np.allclose(steps["lr"], mine["lr"], rtol=1e-12)
    assert np.allclose(steps["grad_norm"], mine["grad_norm"], rtol=1e-9, equal_nan=True)
    cumulative = mine.assign(loss_sum=mine["loss"] * mine["size"]).groupby("epoch")[["loss_sum", "correct", "size"]].cumsum()
    assert np.allclose(steps["running_acc"], cumulative["correct"] / cumulative["size"], rtol=1e-12)
    assert np.allclose(steps["running_loss"], cumulative["loss_sum"] / cumulative["size"], rtol=1e-12)


def test_divergence_inside_a_window_stops_the_record_at_that_step(blobs64):
    """A NaN loss at step 5 of a loop that never checks ``should_stop``: the run is diverged at step 5
    and records nothing after it, as if the loop had stopped there."""
    model = build_model("mlp", blobs64, hidden=[8], seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with bl.track(model, optimizer) as run:
        for step in range(1, 11):
            run.step(torch.tensor(float("nan") if step == 5 else 1.0 / step), batch_size=4)
            optimizer.step()
        run.end_epoch()
        assert run.should_stop
    assert run.status == "diverged" and run.run.message.startswith("loss became nan at step 5 (epoch 1)")
    assert run.steps["step"].tolist() == [1, 2, 3, 4, 5]
    assert np.allclose(run.steps["batch_loss"].iloc[:4], [1.0, 1 / 2, 1 / 3, 1 / 4], rtol=1e-12)


class RowsAsTheyCome(Callback):
    """Keeps each step's row and what the loop had done when the row arrived."""

    def __init__(self, loop_steps: list[int]):
        self.loop_steps, self.arrivals = loop_steps, []

    def on_step_end(self, event):
        self.arrivals.append((event.row["step"], len(self.loop_steps), event.row["batch_acc"]))


def test_a_per_step_callback_gets_each_row_at_its_step(blobs64):
    model = build_model("mlp", blobs64, hidden=[8], seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    X, y = blobs64.train
    done: list[int] = []
    callback = RowsAsTheyCome(done)
    accuracies = []
    with bl.track(model, optimizer, callbacks=[callback]) as run:
        for start in range(0, 500, 50):
            out = model(X[start:start + 50])
            loss = F.cross_entropy(out, y[start:start + 50])
            optimizer.zero_grad()
            loss.backward()
            accuracies.append((out.argmax(1) == y[start:start + 50]).double().mean().item())
            run.step(loss, outputs=out, targets=y[start:start + 50])
            optimizer.step()
            done.append(start)
        run.end_epoch()
    # The row of step k arrives during optimizer.step() of step k: before the loop counts it done.
    assert [(step, before) for step, before, _ in callback.arrivals] == [(k, k - 1) for k in range(1, 11)]
    assert np.allclose([acc for _, _, acc in callback.arrivals], accuracies, rtol=1e-12)
