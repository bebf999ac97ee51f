"""bl.track: a hand-written loop measured by the same core as bl.fit, checked against oracles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.data import Dataset, load_dataset
from batchlab.errors import ConfigError
from batchlab.gradnorm import gradient_stats, per_sample_gradients
from batchlab.loop import fit
from batchlab.models import build_model
from batchlab.schedule import batch_indices, epoch_order
from batchlab.store import RunStore


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def blobs64() -> Dataset:
    """Blobs in float64, so that two computations of the same numbers agree to 1e-12."""
    ds = load_dataset("blobs")
    train, val = ds.train, ds.val
    return Dataset("blobs", (train[0].double(), train[1]), (val[0].double(), val[1]), None, ds.n_classes)


def model_for(ds: Dataset, seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", ds, hidden=[16, 16], seed=seed).double()


def assert_tables_close(a: pd.DataFrame, b: pd.DataFrame, what: str, tolerance: float = 1e-6) -> None:
    assert list(a.columns) == list(b.columns), what
    assert a.shape == b.shape, what
    for column in a.columns:
        if column == "seconds":
            continue
        x, y = a[column].to_numpy(dtype=float), b[column].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(x), np.isnan(y)), f"{what}.{column}"
        finite = ~np.isnan(y)
        assert np.allclose(x[finite], y[finite], rtol=tolerance, atol=1e-12), f"{what}.{column}"


def train_slices(run, model, optimizer, X, y, size: int, after_step=None) -> None:
    """One epoch of a user's loop over consecutive slices of `size` samples, recorded by `run`;
    `after_step(out)` runs after each update."""
    for start in range(0, len(X) - len(X) % size, size):
        out = model(X[start:start + size])
        loss = F.cross_entropy(out, y[start:start + size])
        optimizer.zero_grad()
        loss.backward()
        run.step(loss, outputs=out, targets=y[start:start + size])
        optimizer.step()
        if after_step is not None:
            after_step(out)
    run.end_epoch()


@pytest.mark.parametrize("eval_every", [4, None])
def test_own_loop_on_fits_batches_gives_fits_tables(blobs64, eval_every):
    """The same batches, model and optimizer by hand and through bl.track: the same three tables.
    Without eval_every, bl.track reads back at epoch ends only: each read settles 11 steps' deferred
    noise-scale reads, full and short batches among them."""
    config = TrainConfig(batch_size=48, epochs=3, lr=0.1, momentum=0.9, seed=3, eval_every=eval_every or "epoch")  # 500 = 10·48 + 20
    probes = ["grad_norm", "dist_from_init", "update_norm", "noise_scale"]
    reference = fit(model_for(blobs64), blobs64, config, probes=probes, progress=False)

    model = model_for(blobs64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    X, y = blobs64.train
    eval_data = {"train": blobs64.train, "val": blobs64.val}
    with bl.track(model, optimizer, probes=probes, eval_every=eval_every, eval_data=eval_data, loss_fn=F.cross_entropy,
                  n_train=blobs64.n_train) as run:
        for _ in range(3):
            for index in batch_indices(epoch_order(blobs64.n_train, generator), 48, drop_last=False):
                out = model(X[index])
                loss = F.cross_entropy(out, y[index])
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y[index])
                optimizer.step()
            run.end_epoch()
    assert run.status == "finished"
    assert_tables_close(run.steps, reference.steps, "steps")
    assert_tables_close(run.evals, reference.evals, "evals")
    assert_tables_close(run.epochs, reference.epochs, "epochs")
    assert run.run.clock.steps_per_epoch == reference.clock.steps_per_epoch == 11


def test_running_mean_and_grad_norm_against_the_loops_own_numbers(blobs64):
    """A DataLoader with a short last batch: batch values, running means reset per epoch, grad norms."""
    model = model_for(blobs64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*blobs64.train), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []  # (epoch, loss, correct, size, grad_norm) as the loop itself computes them
    with bl.track(model, optimizer, probes=["grad_norm"]) as run:
        for epoch in range(1, 4):
            for x, y in loader:
                out = model(x)
                loss = F.cross_entropy(out, y)
                optimizer.zero_grad()
                loss.backward()
                norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
                seen.append((epoch, loss.item(), (out.argmax(1) == y).sum().item(), len(y), norm))
                run.step(loss, outputs=out, targets=y)
                optimizer.step()
            run.end_epoch()
    steps = run.steps
    mine = pd.DataFrame(seen, columns=["epoch", "loss", "correct", "size", "grad_norm"])
    assert steps["batch_size"].tolist() == mine["size"].tolist() and mine["size"].iloc[7] == 500 - 7 * 64
    assert np.allclose(steps["batch_loss"], mine["loss"], rtol=1e-12)
    assert np.allclose(steps["grad_norm"], mine["grad_norm"], rtol=1e-9)
    weighted = mine.assign(loss_sum=mine["loss"] * mine["size"])
    cumulative = weighted.groupby("epoch")[["loss_sum", "correct", "size"]].cumsum()
    assert np.allclose(steps["running_loss"], cumulative["loss_sum"] / cumulative["size"], rtol=1e-12)
    assert np.allclose(steps["running_acc"], cumulative["correct"] / cumulative["size"], rtol=1e-12)
    assert run.epochs["running_acc"].tolist() == steps.groupby("epoch")["running_acc"].last().tolist()
    assert steps["samples_seen"].iloc[-1] == 3 * 500
    assert steps["lr"].eq(0.01).all()


def test_accumulated_noise_scale_agrees_with_brute_force(blobs64):
    """accumulate=4 micro-batches of 8 at fixed weights (lr 0): the micro-batch estimator against the
    exact B_simple from every per-sample gradient of the training set."""
    model = model_for(blobs64, seed=1)
    X, y = blobs64.train
    # A few real steps first, so the gradient is not that of the initialisation.
    warmup = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in range(0, 500, 50):
        warmup.zero_grad()
        F.cross_entropy(model(X[start:start + 50]), y[start:start + 50]).backward()
        warmup.step()
    per_sample = per_sample_gradients(model, X, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    exact = gradient_stats(per_sample)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(0)
    k, micro = 4, 8
    with bl.track(model, optimizer, probes=["noise_scale"], accumulate=k, n_train=500) as run:
        for _ in range(40):
            batches = batch_indices(epoch_order(500, generator), micro, drop_last=True)
            for i in range(len(batches) // k * k):
                index = batches[i]
                out = model(X[index])
                loss = F.cross_entropy(out, y[index])
                if i % k == 0:
                    optimizer.zero_grad()
                (loss / k).backward()
                run.step(loss, outputs=out, targets=y[index])
                if i % k == k - 1:
                    optimizer.step()
            run.end_epoch()
    steps = run.steps
    assert steps["batch_size"].eq(k * micro).all()
    estimate = steps["trace_cov_raw"].mean() / steps["grad_sq_raw"].mean()
    assert abs(estimate / exact.noise_scale - 1) < 0.10, (estimate, exact.noise_scale)
    assert abs(steps["trace_cov_raw"].mean() / exact.trace_cov - 1) < 0.10


def test_amp_rows_are_the_loops_own_numbers_and_a_skipped_update_keeps_its_row():
    """A real AMP loop on the CPU (bfloat16 autocast, a GradScaler): each row's loss, accuracy, running
    mean and gradient norm are those the loop computes itself, the gradient norm unscaled. At step 3
    the gradients are made infinite: the scaler skips that update and lowers its scale, and the
    batch keeps its row (its loss was computed, its samples seen), with an infinite gradient norm."""
    ds = load_dataset("blobs")
    X, y = ds.train
    model = build_model("mlp", ds, hidden=[16], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seen = []  # (loss, correct, size, gradient norm unscaled, scale after the update) by the loop itself
    with bl.track(model, optimizer, probes=["grad_norm"], scaler=scaler) as run:
        for step, start in enumerate(range(0, 500, 100), start=1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(X[start:start + 100])
                loss = F.cross_entropy(out.float(), y[start:start + 100])
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            if step == 3:
                for p in model.parameters():
                    p.grad.fill_(float("inf"))
            scale = scaler.get_scale()
            norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().norm().item() / scale
            run.step(loss, outputs=out, targets=y[start:start + 100])
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(optimizer)
            scaler.update()
            moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            seen.append((loss.item(), (out.argmax(1) == y[start:start + 100]).sum().item(), 100, norm, moved))
        run.end_epoch()
    steps = run.steps
    loss, correct, size, norm, moved = (np.array(c, dtype=float) for c in zip(*seen))
    assert moved.tolist() == [1, 1, 0, 1, 1]  # the scaler skipped the third update, and only it
    assert scaler.get_scale() == 2.0**9
    assert steps["step"].tolist() == [1, 2, 3, 4, 5] and steps["samples_seen"].iloc[-1] == 500
    assert np.allclose(steps["batch_loss"], loss, rtol=1e-7)
    assert np.allclose(steps["batch_acc"], correct / size, rtol=1e-12)
    assert np.allclose(steps["running_acc"], np.cumsum(correct) / np.cumsum(size), rtol=1e-12)
    assert np.allclose(steps["running_loss"], np.cumsum(loss * size) / np.cumsum(size), rtol=1e-6)
    assert np.isinf(steps["grad_norm"].iloc[2]) and np.isinf(norm[2])
    finite = np.arange(5) != 2
    assert np.allclose(steps["grad_norm"][finite], norm[finite], rtol=1e-5)


@pytest.mark.parametrize("read_back_every", [64, 1])
def test_amp_loss_scale_leaves_the_noise_scale_unchanged(blobs64, monkeypatch, read_back_every):
    """The per-sample taps read output gradients of the scaled loss; the estimate must be the one
    of the same loop without a scaler (a power-of-two scale: exact in float64), whether the reads
    are deferred to the read-back or made at each step."""
    import batchlab.tracking as tracking

    monkeypatch.setattr(tracking, "READ_BACK_EVERY", read_back_every)
    X, y = blobs64.train
    tables = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = model_for(blobs64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with bl.track(model, optimizer, probes=["noise_scale"], scaler=scaler, n_train=500) as run:
            for start in range(0, 500, 50):
                out = model(X[start:start + 50])
                loss = F.cross_entropy(out, y[start:start + 50])
                optimizer.zero_grad()
                (loss if scaler is None else scaler.scale(loss)).backward()
                run.step(loss, outputs=out, targets=y[start:start + 50])
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
            run.end_epoch()
        tables.append(run.steps)
    plain, scaled = tables
    assert plain["noise_scale"].notna().sum() >= 8
    for column in ("grad_sq_raw", "trace_cov_raw", "noise_scale"):
        assert np.allclose(scaled[column], plain[column], rtol=1e-9, equal_nan=True), column


def test_tracked_run_in_the_store_and_stops(tmp_path, blobs64):
    """The store holds the tracked run's tables; a divergence stops it with fit's message."""
    path = tmp_path / "b.db"
    model = model_for(blobs64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = blobs64.train
    with bl.track(model, optimizer, store=path, name="mine", eval_data=blobs64.val, loss_fn=F.cross_entropy) as run:
        for _ in range(2):
            train_slices(run, model, optimizer, X[:500], y[:500], 100)
    with RunStore(path) as store:
        stored = store.load_run(run.run_id)
    assert stored.name == "mine" and stored.kind == "track" and stored.status == "finished"
    assert np.allclose(stored.steps["running_loss"], run.steps["running_loss"], rtol=1e-12)
    assert stored.evals["val_acc"].tolist() == run.evals["val_acc"].tolist() and len(stored.epochs) == 2

    with bl.track(model, optimizer) as run:
        for value in (1.0, float("nan"), 0.5):
            if run.should_stop:
                break
            run.step(torch.tensor(value), batch_size=10)
            optimizer.step()
    assert run.status == "diverged" and run.run.message.startswith("loss became nan at step 2 (epoch 1)")
    assert len(run.steps) == 2


def test_bad_use_is_one_line(blobs64):
    model = model_for(blobs64)
    with pytest.raises(ConfigError, match="accumulate"):
        bl.track(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulate=0)
    with pytest.raises(ConfigError, match="loss_fn"):
        bl.track(model, torch.optim.SGD(model.parameters(), lr=0.1), eval_data=blobs64.val)


def test_outputs_changed_in_place_after_step_are_refused_not_miscounted(blobs64):
    """Small CPU outputs are compared at the read-back: a loop that changes them in place before then
    gets one clear error, not an accuracy of numbers that are no longer the model's."""
    model = model_for(blobs64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = blobs64.train
    with pytest.raises(bl.BatchlabError, match="changed in place"):
        with bl.track(model, optimizer) as run:
            # e.g. a loop reusing its outputs' memory (a detached view shares their version counter)
            train_slices(run, model, optimizer, X[:480], y[:480], 48, after_step=lambda out: out.detach().neg_())
