"""The drivers that read their steps back in bulk (the replicas' vectorized pass, bl.track) read
back exactly where the run's looks (`batchlab.looks`) say something looks at it, and nowhere else."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.events import Callback, Stop
from batchlab.loop import fit
from batchlab.models import build_model
from batchlab.record import Recorder
from batchlab.replicas import fit as replica_fit
from batchlab.replicas import fit_replicas

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def blobs():
    return bl.load_dataset("blobs", dtype=torch.float64)


def model_fn(dataset):
    return lambda seed: build_model("mlp", dataset, seed=seed, hidden=[8]).double()


class SeesAt(Callback):
    """A live callback that sees step ``step`` only (declared) and asks for nothing."""

    def __init__(self, step: int):
        self.step, self.step_end_steps = step, (step,)

    def on_step_end(self, event):
        return None


class StopAt(SeesAt):
    """A live callback that sees step ``step`` only (declared) and stops its run there."""

    def on_step_end(self, event):
        return Stop(f"stopped at step {self.step}") if event.clock.step == self.step else None


class CountsRows(Callback):
    """A row-reading callback (as a progress display): never a look, handed every row."""

    step_end_live = False

    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, event):
        self.steps.append(event.clock.step)


def expected_reads(total: int, per_epoch: int, eval_every: int, window: int, seen=()) -> list[int]:
    """The steps after which the rows must be read, walked one step at a time: an evaluation
    (every ``eval_every`` steps), a step a live callback sees, an epoch's end, or ``window`` steps
    since the last read."""
    reads, last = [], 0
    for step in range(1, total + 1):
        if step % eval_every == 0 or step in seen or step % per_epoch == 0 or step - last >= window:
            reads.append(step)
            last = step
    return reads


def test_replicas_read_back_where_their_looks_say(blobs, monkeypatch):
    """Two replicas, probes measured at every step, evaluations every 7 steps, one replica's live
    callback at step 20 and a read-back window of 10: the pass reads back at the nearest look of
    any replica, measured steps are no look (their values still fill every row), and a display's
    rows arrive at every step; the replica still equals its own fit."""
    monkeypatch.setattr(replica_fit, "Recorder", functools.partial(Recorder, window=10))
    reads: list[int] = []
    flush = replica_fit._flush

    def counting_flush(state, pending):
        if pending:
            reads.append(state.active[0].recorder.clock.step + len(pending))
        flush(state, pending)

    monkeypatch.setattr(replica_fit, "_flush", counting_flush)
    configs = [TrainConfig(batch_size=16, epochs=2, lr=lr, eval_every=7, seed=seed)
               for seed, lr in enumerate((0.05, 0.1))]  # 500 samples: 32 steps per epoch
    displays = [CountsRows(), CountsRows()]

    def callbacks(index, config):
        return [displays[index], *([StopAt(20)] if index == 1 else [])]

    runs = fit_replicas(model_fn(blobs), blobs, configs, probes=["grad_norm"], callbacks=callbacks, progress=False)
    assert runs[1].status == "stopped" and runs[0].clock.step == 64
    # until 20 both replicas train (replica 1's look at 20); after it replica 0 alone
    assert reads == expected_reads(64, 32, 7, 10, seen={20})
    assert runs[0].steps["grad_norm"].notna().all() and len(runs[0].steps) == 64
    assert displays[0].steps == list(range(1, 65)) and displays[1].steps == list(range(1, 21))
    single = fit(model_fn(blobs)(0), blobs, configs[0], probes=["grad_norm"], progress=False)
    for column in ("batch_loss", "running_loss", "grad_norm"):
        assert np.allclose(runs[0].steps[column], single.steps[column], rtol=1e-10), column
    assert runs[0].evals["step"].tolist() == single.evals["step"].tolist()


class ReadsCounted:
    """Wraps `Tracker._read_back` to keep the step after each read-back that recorded something."""

    def __init__(self, monkeypatch):
        from batchlab.tracking import Tracker

        self.reads: list[int] = []
        read_back = Tracker._read_back

        def counted(tracker):
            unread = len(tracker._unread)
            if unread and tracker.recorder.going:
                self.reads.append(tracker.recorder.clock.step + unread)
            read_back(tracker)

        monkeypatch.setattr(Tracker, "_read_back", counted)


def tracked_epochs(blobs, callbacks, epochs=2, batch=20, **options):
    """A plain loop over blobs' 500 samples in batches of 20 (25 per epoch), measured by bl.track."""
    model = model_fn(blobs)(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    X, y = blobs.train
    with bl.track(model, optimizer, callbacks=callbacks, **options) as run:
        for _ in range(epochs):
            for start in range(0, len(X), batch):
                out = model(X[start:start + batch])
                loss = F.cross_entropy(out, y[start:start + batch])
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y[start:start + batch])
                optimizer.step()
            run.end_epoch()
    return run


def test_track_reads_back_where_its_looks_say(blobs, monkeypatch):
    """bl.track with eval_data every 7 steps, a live callback at step 30, a display, and a window of
    10: read-backs at exactly those looks and epochs' ends, the display handed every row."""
    from batchlab import tracking

    monkeypatch.setattr(tracking, "READ_BACK_EVERY", 10)
    counted = ReadsCounted(monkeypatch)
    display = CountsRows()
    run = tracked_epochs(blobs, [display, SeesAt(30)], eval_every=7, eval_data=blobs.val, loss_fn=F.cross_entropy)
    assert run.status == "finished" and len(run.steps) == 50
    assert counted.reads == expected_reads(50, 25, 7, 10, seen={30})
    assert display.steps == list(range(1, 51))
    # the evaluations where fit makes them: every 7 steps within an epoch, and at each epoch's end
    assert run.evals["step"].tolist() == [0, 7, 14, 21, 25, 28, 35, 42, 49, 50]


def test_track_stops_at_a_live_callbacks_declared_step(blobs, monkeypatch):
    """A callback declaring step 13 stops the tracked run there, though no window ends at 13; a
    display alone never makes the tracker read back before its window."""
    counted = ReadsCounted(monkeypatch)
    run = tracked_epochs(blobs, [CountsRows(), StopAt(13)], epochs=1)
    assert run.status == "stopped" and run.steps["step"].tolist() == list(range(1, 14))
    assert counted.reads[0] == 13
    counted.reads.clear()
    display = CountsRows()
    run = tracked_epochs(blobs, [display], epochs=1, batch=2)  # 250 steps: windows of 64, then the end
    assert counted.reads == [64, 128, 192, 250] and display.steps == list(range(1, 251))
