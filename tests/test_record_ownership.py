"""The measurement core owns its fields: drivers change a `Recorder` through its methods only.

Every driver (bl.fit, bl.track, the Keras callback) runs here with `Recorder.__setattr__` watched:
an attribute set by code outside record.py (the caller's frame names its file) is a driver writing
the core's fields from outside, and the test names it. The runs take the paths where a driver
learns something as it goes (the batch size, the epoch's length, the training set's size, a
regression, probes made late, metrics added to an evaluation), and their numbers are checked
against the loop's own counts and Keras' History, so the methods that replaced the writes are
seen to do what the writes did.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab import record
from batchlab.events import Clock
from batchlab.record import Recorder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module

RECORD_FILE = Path(record.__file__).resolve()


@pytest.fixture
def outside_writes(monkeypatch) -> list[str]:
    """The attributes of any `Recorder` set from outside record.py while the test runs, as
    ``name from file:line``."""
    writes: list[str] = []

    def watched(self, name, value):
        caller = sys._getframe(1)
        if Path(caller.f_code.co_filename).resolve() != RECORD_FILE:
            writes.append(f"{name} from {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        object.__setattr__(self, name, value)

    monkeypatch.setattr(Recorder, "__setattr__", watched, raising=False)
    return writes


def _blobs(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=generator)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # 3 classes


def test_watch_catches_a_write_from_outside(outside_writes):
    """The watch itself: a write from this file is named, one from the core's own methods is not."""
    rec = Recorder(Clock(n_train=4, batch_size=2, steps_per_epoch=2, total_steps=2, epochs=1),
                   model=None, classification=True)
    rec.start_epoch()
    assert outside_writes == []
    rec.seconds = 1.0
    assert outside_writes == [f"seconds from {Path(__file__).name}:{sys._getframe().f_lineno - 1}"]


def test_fields_with_a_method_are_read_only():
    """classification, config and probes change only through mark_regression, learn_batch_size and
    attach_probes: a write from outside fails at once."""
    rec = Recorder(Clock(n_train=4, batch_size=2, steps_per_epoch=2, total_steps=2, epochs=1),
                   model=None, classification=True)
    for name, value in (("classification", False), ("config", None), ("probes", None)):
        with pytest.raises(AttributeError):
            setattr(rec, name, value)
    rec.mark_regression()
    assert rec.classification is False


def test_stop_and_notes_keep_an_ended_status():
    """`stop` ends a going run with its reason and leaves a diverged one as it was; notes join the message."""
    clock = Clock(n_train=4, batch_size=2, steps_per_epoch=2, total_steps=2, epochs=1)
    going = Recorder(clock, model=None, classification=True)
    going.stop("rank 0 stopped the run")
    assert (going.status, going.message, going.going) == ("stopped", "rank 0 stopped the run", False)
    diverged = Recorder(clock, model=None, classification=True)
    diverged.start_epoch()
    diverged.record_step(2, 0.1, math.nan, 1, 0.0)
    before = diverged.message
    diverged.stop("rank 0 stopped the run")
    assert (diverged.status, diverged.message) == ("diverged", before)
    diverged.add_note("noise_scale not measured: why")
    assert diverged.message == f"{before}; noise_scale not measured: why"
    fresh = Recorder(clock, model=None, classification=True)
    fresh.add_note("a note")
    assert fresh.message == "a note"


def test_track_writes_no_core_field(outside_writes):
    """bl.track: a classification loop with late probes, evaluation data and metrics given at the
    epoch's end, whose batch size, epoch length and training-set size the core learns as it runs."""
    X, y = _blobs(90)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    given = [0.75, 0.5]
    with bl.track(model, optimizer, probes=["grad_norm"], eval_data={"train": (X, y)},
                  loss_fn=F.cross_entropy) as run:
        for epoch in range(2):
            for start in range(0, 90, 20):  # four batches of 20 and one of 10
                out = model(X[start:start + 20])
                loss = F.cross_entropy(out, y[start:start + 20])
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y[start:start + 20])
                optimizer.step()
            run.end_epoch(val={"loss": given[epoch]})
    assert outside_writes == []
    finished = run.run
    clock = finished.clock
    assert (clock.n_train, clock.batch_size, clock.steps_per_epoch, clock.total_steps, clock.epochs) == (90, 20, 5, 10, 2)
    assert finished.config.batch_size == 20
    assert finished.steps["grad_norm"].notna().all()  # the probes made at the first forward pass measured
    assert finished.epochs["val_loss"].tolist() == given  # added to the evaluation row at the epoch's end
    assert finished.epochs["train_loss"].notna().all()


def test_loss_only_track_writes_no_core_field(outside_writes):
    """bl.track given only the loss: the core learns it is a regression from the first batch."""
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    target = X.sum(1, keepdim=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with bl.track(model, optimizer) as run:
        for start in range(0, 40, 10):
            loss = F.mse_loss(model(X[start:start + 10]), target[start:start + 10])
            optimizer.zero_grad()
            loss.backward()
            run.step(loss, batch_size=10)
            optimizer.step()
        run.end_epoch()
    assert outside_writes == []
    assert "batch_acc" not in run.steps.columns and "running_acc" not in run.epochs.columns
    assert run.run.clock.n_train == 40


def test_fit_writes_no_core_field(outside_writes):
    """A short bl.fit with a probe and step-wise evaluation."""
    ds = bl.load_dataset("blobs")
    model = bl.build_model("mlp", ds, hidden=[8])
    run = bl.fit(model, ds, bl.TrainConfig(batch_size=64, epochs=1, lr=0.1, eval_every=3, seed=0),
                 probes=["grad_norm"])
    assert outside_writes == []
    assert run.status == "finished" and len(run.steps) == math.ceil(len(ds.train[0]) / 64)


def test_keras_fit_writes_no_core_field(outside_writes):
    """The Keras callback on a regression without ``n_train``: the core learns both, and its running
    mean is Keras' own History."""
    keras = pytest.importorskip("keras")
    from batchlab.integrations.keras import BatchlabCallback

    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 2)).astype("float32")
    y = X.sum(1, keepdims=True).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse")
    callback = BatchlabCallback(batch_size=32)
    try:
        history = model.fit(X, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    finally:
        keras.utils.clear_session()
    assert outside_writes == []
    run = callback.run
    assert run.clock.n_train == 100 and "running_acc" not in run.epochs.columns
    np.testing.assert_allclose(run.epochs["running_loss"], history.history["loss"], rtol=1e-6)
