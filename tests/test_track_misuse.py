"""bl.track refuses each misuse at the call that made it, in one `BatchlabError` line, and keeps
what it measured before: no silent wrong number, no plain Python error at a later forward pass or
at an epoch's read-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.data import Dataset, load_dataset
from batchlab.errors import BatchlabError
from batchlab.models import build_model
from batchlab.store import RunStore


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def blobs() -> Dataset:
    return load_dataset("blobs")


def model_and_optimizer(ds: Dataset):
    model = build_model("mlp", ds, hidden=[8], seed=0)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_line(info: pytest.ExceptionInfo, *words: str) -> str:
    message = str(info.value)
    assert isinstance(info.value, BatchlabError), (type(info.value).__name__, message)
    assert "\n" not in message and message
    for word in words:
        assert word in message, (word, message)
    return message


OPTIONS = [  # bl.track(model, optimizer, **options): each refused by bl.track itself
    ({"store": 123}, ("store", "int")),
    ({"probe_every": 0}, ("probe_every",)),
    ({"probe_every": 1.5}, ("probe_every",)),
    ({"loss_fn": "ce"}, ("loss_fn", "function")),
    ({"eval_data": "xy", "loss_fn": F.cross_entropy}, ("eval_data", "str")),
    ({"eval_data": (np.zeros((4, 2)), np.zeros(4)), "loss_fn": F.cross_entropy}, ("eval_data", "tensors")),
    ({"eval_data": (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)), "loss_fn": F.cross_entropy},
     ("4 inputs", "3 targets")),
    ({"probes": "grad_norm"}, ("probes", "list")),
    ({"probes": [5]}, ("probe",)),
    ({"name": 5}, ("name",)),
    ({"n_train": -1}, ("n_train",)),
    ({"dataset": 3}, ("dataset",)),
    ({"scaler": "amp"}, ("scaler", "GradScaler")),
    ({"accumulate": True}, ("accumulate",)),
]


@pytest.mark.parametrize("store, words", [("missing/folder/runs.db", ("does not exist",)),
                                         ("notes.txt", ("not a batchlab store",))])
def test_a_store_path_that_cannot_hold_a_store_is_refused_by_track_itself(tmp_path, blobs, store, words):
    """Before: a StoreError raised from inside the loop's first forward pass."""
    (tmp_path / "notes.txt").write_text("my notes")
    model, optimizer = model_and_optimizer(blobs)
    with pytest.raises(BatchlabError) as info:
        bl.track(model, optimizer, store=tmp_path / store)
    one_line(info, *words)
    assert (tmp_path / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("options, words", OPTIONS, ids=[str(sorted(o)) for o, _ in OPTIONS])
def test_bad_options_are_refused_by_track_itself(blobs, options, words):
    """Before: store=123 raised a TypeError from the first forward pass (where the store opens),
    loss_fn="ce" and eval_data="xy" a TypeError/IndexError from the step-0 evaluation, probe_every=0
    was accepted and measured nothing."""
    model, optimizer = model_and_optimizer(blobs)
    with pytest.raises(BatchlabError) as info:
        bl.track(model, optimizer, **options)
    one_line(info, *words)


def a_batch(model, blobs, size=10, start=0):
    X, y = blobs.train
    out = model(X[start:start + size])
    return out, y[start:start + size], F.cross_entropy(out, y[start:start + size])


@pytest.mark.parametrize("batch_size, words", [(-3, ("batch_size", "-3")), (2.5, ("batch_size", "2.5")),
                                               (0, ("batch_size",)), (True, ("batch_size",)),
                                               (50, ("batch_size=50", "100 targets"))])
def test_a_bad_batch_size_is_refused_at_the_step(blobs, batch_size, words):
    """Before: batch_size=-3 stored an epoch accuracy of -4.9 and 2.5 one of 7.35 (the correct count
    of 100 targets divided by the size given); 50 for 100 targets an accuracy above 1."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        out, y, loss = a_batch(model, blobs, size=100)
        optimizer.zero_grad()
        loss.backward()
        with pytest.raises(BatchlabError) as info:
            run.step(loss, outputs=out, targets=y, batch_size=batch_size)
        one_line(info, *words)
        run.step(loss, outputs=out, targets=y)  # the loop can go on, and its numbers are right
        optimizer.step()
    assert run.steps["batch_acc"].iloc[0] == (out.argmax(1) == y).double().mean().item()


def test_a_batch_size_for_a_loss_only_row_may_differ_from_the_targets_shape(blobs):
    """Where no accuracy is counted (regression targets), batch_size is the loop's to say: sequence
    models pass (T, B) targets with batch_size=B."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        run.step(torch.tensor(0.5), targets=torch.zeros(7, 3), batch_size=3)
        optimizer.step()
    assert run.steps["batch_size"].tolist() == [3] and run.steps["samples_seen"].tolist() == [3]


def test_step_twice_per_update_is_refused_at_the_second_call(blobs):
    """Before: two run.step calls per update counted 600 samples in a 300-sample epoch. Without
    ``accumulate`` and without an AMP scaler, nothing legitimately skips optimizer.step(): the second
    call names the mistake and the way to accumulate."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        out, y, loss = a_batch(model, blobs)
        optimizer.zero_grad()
        loss.backward()
        run.step(loss, outputs=out, targets=y)
        with pytest.raises(BatchlabError) as info:
            run.step(loss, outputs=out, targets=y)
        one_line(info, "before optimizer.step()", "accumulate=k")
        optimizer.step()
    assert run.steps["samples_seen"].tolist() == [10]


def test_step_twice_under_an_enabled_scaler_that_did_not_skip_is_refused(blobs):
    """Under AMP, a missing optimizer.step() is a skip only if the scaler lowered its scale."""
    model, optimizer = model_and_optimizer(blobs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    with bl.track(model, optimizer, scaler=scaler) as run:
        out, y, loss = a_batch(model, blobs)
        scaler.scale(loss).backward()
        run.step(loss, outputs=out, targets=y)
        with pytest.raises(BatchlabError, match="before optimizer.step"):
            run.step(loss, outputs=out, targets=y)


def test_step_after_the_optimizer_step_is_refused_at_the_first_step(blobs):
    """The other wrong order: each row would get the next batch's update (update_norm, lr)."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer, probes=["update_norm"]) as run:
        out, y, loss = a_batch(model, blobs)
        loss.backward()
        optimizer.step()
        with pytest.raises(BatchlabError) as info:
            run.step(loss, outputs=out, targets=y)
        one_line(info, "after optimizer.step()")


def test_calls_after_the_with_block_are_refused(blobs):
    """Before: run.step after the `with` block was silently ignored."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        out, y, loss = a_batch(model, blobs)
        loss.backward()
        run.step(loss, outputs=out, targets=y)
        optimizer.step()
    out, y, loss = a_batch(model, blobs)
    for call in (lambda: run.step(loss, outputs=out, targets=y), lambda: run.end_epoch()):
        with pytest.raises(BatchlabError) as info:
            call()
        one_line(info, "after the run ended", "with bl.track")
    assert len(run.steps) == 1


@pytest.mark.parametrize("loss", ["abc", None, [0.5], torch.ones(3)])
def test_a_loss_that_is_not_one_number_is_refused(blobs, loss):
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        with pytest.raises(BatchlabError) as info:
            run.step(loss, batch_size=4)
        one_line(info, "loss")


@pytest.mark.parametrize("probe", ["grad_norm", "noise_scale"])
def test_step_before_backward_with_gradient_probes_is_refused(blobs, probe):
    """Before: a torch.cat error at the read-back ("expected a non-empty list of Tensors")."""
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer, probes=[probe]) as run:
        out, y, loss = a_batch(model, blobs)
        optimizer.zero_grad()
        with pytest.raises(BatchlabError) as info:
            run.step(loss, outputs=out, targets=y)
        one_line(info, "before loss.backward()", probe)


def test_outputs_and_targets_of_different_lengths_refused_at_the_step_keeping_the_rows(tmp_path, blobs):
    """Before: a RuntimeError at the epoch's read-back, and the epoch's rows were lost. Now the call
    is refused, the run is stored as failed, and the steps before it are in the store."""
    model, optimizer = model_and_optimizer(blobs)
    path = tmp_path / "t.db"
    losses = []
    with pytest.raises(BatchlabError) as info:
        with bl.track(model, optimizer, store=path) as run:
            for start in range(0, 50, 10):
                out, y, loss = a_batch(model, blobs, start=start)
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y if start < 40 else y[:7])
                optimizer.step()
                losses.append(loss.item())
    one_line(info, "10 outputs", "7 targets")
    assert np.allclose(run.steps["batch_loss"], losses, rtol=1e-7) and len(losses) == 4
    with RunStore(path) as store:
        stored = store.load_run(run.run_id)
    assert stored.status == "failed" and stored.message.startswith("ConfigError: run.step got 10 outputs")
    assert stored.steps["step"].tolist() == [1, 2, 3, 4]


def test_end_epoch_metrics_must_be_numbers(blobs):
    model, optimizer = model_and_optimizer(blobs)
    with bl.track(model, optimizer) as run:
        run.step(0.5, batch_size=4)
        optimizer.step()
        with pytest.raises(BatchlabError) as info:
            run.end_epoch(val={"loss": "low"})
        one_line(info, "val['loss']", "number")
        run.end_epoch(val={"loss": torch.tensor(0.25)})
    assert run.epochs["val_loss"].tolist() == [0.25]
