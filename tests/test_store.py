"""The run store: round trips, the recorder, interrupted runs, the `runs` commands (exports: test_export.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.config import TrainConfig
from batchlab.errors import StoreError
from batchlab.events import Clock, EpochEnd, RunEnd, RunStart
from batchlab.store import LIST_COLUMNS, RunStore, recorder

NAN, INF = float("nan"), float("inf")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def step_row(step: int, steps_per_epoch: int = 5, **extra) -> dict:
    epoch = (step - 1) // steps_per_epoch + 1
    return {"step": step, "epoch": epoch, "samples_seen": 4 * step, "batch_size": 4, "lr": 0.1,
            "batch_loss": 1.0 / step, "batch_acc": 0.5, "running_loss": 0.9, "running_acc": 0.4,
            "seconds": 0.01 * step, **extra}  # fmt: skip


def new_run(store: RunStore, **kw) -> int:
    values = dict(name="r", kind="fit", config={"batch_size": 4, "lr": 0.1}, spec={"dataset": "blobs", "model": "mlp"},
                  provenance={"seed": 0})  # fmt: skip
    return store.begin_run(**{**values, **kw})


def expected_frame(rows: list[dict], key: str) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows)
    return frame[[key, *(c for c in frame.columns if c != key)]].sort_values(key, kind="stable").reset_index(drop=True)


# -- rows ---------------------------------------------------------------------------------------


def test_rows_round_trip_with_nan_inf_and_varying_columns(tmp_path):
    steps = [step_row(s) for s in range(1, 11)]
    steps[2]["grad_norm"] = 3.5  # probe columns on some rows only
    steps[4]["grad_norm"] = NAN
    steps[4]["noise_scale"] = INF
    steps[6]["batch_loss"] = NAN
    steps[7]["batch_loss"] = -INF
    evals = [{"step": 5, "epoch": 1, "val_loss": 0.7, "val_acc": NAN}, {"step": 0, "epoch": 0, "val_loss": 2.3, "val_acc": 0.1}]
    epochs = [{"epoch": 2, "step": 10, "running_acc": 0.6}, {"epoch": 1, "step": 5, "running_acc": 0.5, "train_mode_loss": 0.2}]
    with RunStore(tmp_path / "s.db") as store:
        run_id = new_run(store)
        store.append_rows(run_id, steps=steps[:5], evals=evals[1:])
        store.append_rows(run_id, steps=steps[5:], evals=evals[:1], epochs=epochs)
        run = store.load_run(run_id)
    pd.testing.assert_frame_equal(run.steps, expected_frame(steps, "step"))
    pd.testing.assert_frame_equal(run.evals, expected_frame(evals, "step"))  # step 0 comes first
    pd.testing.assert_frame_equal(run.epochs, expected_frame(epochs, "epoch"))
    assert run.steps["noise_scale"].iloc[4] == INF and run.steps["batch_loss"].iloc[7] == -INF
    assert math.isnan(run.steps["grad_norm"].iloc[0]) and run.steps["grad_norm"].iloc[2] == 3.5


def test_numpy_and_torch_scalars_are_stored_as_numbers(tmp_path):
    row = {"step": np.int64(1), "lr": np.float32(0.5), "batch_loss": torch.tensor(0.25), "flag": True}
    with RunStore(tmp_path / "s.db") as store:
        run_id = new_run(store)
        store.append_rows(run_id, steps=[row])
        assert store.load_run(run_id).steps.iloc[0].to_dict() == {"step": 1, "lr": 0.5, "batch_loss": 0.25, "flag": 1}


def test_a_bad_row_writes_nothing(tmp_path):
    with RunStore(tmp_path / "s.db") as store:
        run_id = new_run(store)
        with pytest.raises(StoreError, match="no whole-number 'step'"):
            store.append_rows(run_id, steps=[step_row(1), {"epoch": 1, "lr": 0.1}])
        with pytest.raises(StoreError, match="'note' holds str"):
            store.append_rows(run_id, epochs=[{"epoch": 1, "note": "x"}])
        assert store.load_run(run_id).steps.empty
        with pytest.raises(StoreError, match="no run 99 in"):
            store.append_rows(99, steps=[step_row(1)])


def test_many_rows_round_trip(tmp_path):
    """50,000 rows in one append come back complete and in order (speed is measured in benchmarks)."""
    rows = [step_row(s, steps_per_epoch=1000, grad_norm=0.1 * s) for s in range(1, 50_001)]
    with RunStore(tmp_path / "s.db") as store:
        run_id = new_run(store)
        store.append_rows(run_id, steps=rows)
        steps = store.load_run(run_id).steps
    assert steps["step"].tolist() == list(range(1, 50_001))
    np.testing.assert_array_equal(steps["grad_norm"].to_numpy(), [row["grad_norm"] for row in rows])


# -- runs, groups, opening ------------------------------------------------------------------------


def test_runs_groups_list_finish_and_delete(tmp_path):
    with RunStore(tmp_path / "s.db") as store:
        group = store.create_group("study", "bs sweep", {"batch_sizes": [4, 8]})
        first = new_run(store, kind="study-trial", group_id=group)
        second = new_run(store, kind="study-trial", group_id=group, config={"batch_size": 8, "lr": 0.2})
        alone = new_run(store, name="solo")
        store.append_rows(first, steps=[step_row(1)], evals=[{"step": 0, "val_acc": 0.1}, {"step": 1, "val_acc": 0.7}],
                          epochs=[{"epoch": 1, "step": 1}])  # fmt: skip
        store.finish_run(first, "finished", summary={"best_val_acc": 0.7, "nan": NAN})
        store.finish_run(second, "diverged", message="loss is nan at step 3")
        store.finish_group(group, summary={"critical_batch_size": 8})

        runs = store.list_runs()
        assert list(runs.columns) == LIST_COLUMNS
        assert list(runs["id"]) == [first, second, alone]
        assert list(runs["status"]) == ["finished", "diverged", "running"]  # this process is alive
        row = runs.iloc[0]
        assert (row["dataset"], row["model"], row["batch_size"], row["lr"]) == ("blobs", "mlp", 4, 0.1)
        assert (row["epochs"], row["steps"], row["val_acc"]) == (1, 1, 0.7) and row["duration"] >= 0
        assert list(store.list_runs(group=group)["id"]) == [first, second] == store.group_runs(group)
        assert list(store.list_runs(kind="fit")["id"]) == [alone]
        assert store.get_group(group)["status"] == "finished"

        loaded = store.load_run(first)
        assert loaded.summary == {"best_val_acc": 0.7, "nan": None}  # JSON has no NaN
        assert store.load_run(second).message == "loss is nan at step 3"
        with pytest.raises(StoreError, match="unknown run status"):
            store.finish_run(alone, "done")

        store.delete_run(first)
        with pytest.raises(StoreError, match=r"no run \d+ in .*`batchlab runs list` shows the runs"):
            store.load_run(first)
        assert store._query("SELECT count(*) FROM steps")[0][0] == 0


# -- the recorder -----------------------------------------------------------------------------------


def test_recorder_records_a_run_from_events(tmp_path):
    model = torch.nn.Linear(3, 2)
    config = TrainConfig(batch_size=4, epochs=2, lr=0.05, seed=7)
    clock = Clock(n_train=20, batch_size=4, steps_per_epoch=5, total_steps=10, epochs=2)
    steps = [step_row(s) for s in range(1, 11)]
    evals = [{"step": 0, "epoch": 0, "val_acc": 0.1}, {"step": 5, "epoch": 1, "val_acc": 0.5}]
    rec = recorder(tmp_path / "s.db", name="demo", spec={"model": {"name": "linear"}})

    rec.on_run_start(RunStart(config=config, dataset="blobs", clock=clock, model=model, probes=("grad_norm",)))
    assert rec.run_id is not None
    rec.on_epoch_end(EpochEnd(clock=clock, row={"epoch": 1, "step": 5, "running_acc": 0.4}, steps=tuple(steps[:5]),
                              evals=tuple(evals), model=model))  # fmt: skip
    with pytest.warns(RuntimeWarning):  # a bad row is left out, training goes on
        rec.on_run_end(RunEnd(clock=clock, status="stopped", message="early stopping", summary={"best": 0.5},
                              steps=(*steps[5:], {"lr": 0.1}, {"step": 11, "note": "x"}), model=model))  # fmt: skip

    with RunStore(tmp_path / "s.db") as store:
        run = store.load_run(rec.run_id)
    assert (run.name, run.kind, run.status, run.message, run.summary) == ("demo", "fit", "stopped", "early stopping", {"best": 0.5})
    assert run.config == config.model_dump(mode="json")
    assert run.spec["dataset"] == "blobs" and run.spec["model"] == {"name": "linear"} and run.spec["probes"] == ["grad_norm"]
    assert run.spec["n_parameters"] == 8 and run.spec["clock"]["steps_per_epoch"] == 5
    provenance = run.provenance
    assert provenance["seed"] == 7 and provenance["device"] == "cpu" and provenance["pid"] == os.getpid()
    assert provenance["torch"] == torch.__version__ and {"batchlab", "python", "hostname", "argv"} <= set(provenance)
    # the row without a step was skipped; the text value was dropped from its row, the row kept
    assert list(run.steps["step"]) == list(range(1, 12)) and "note" not in run.steps.columns
    assert list(run.evals["step"]) == [0, 5] and list(run.epochs["epoch"]) == [1]
    assert run.ended_at is not None


KILLED_WRITER = """
import sys, time
from batchlab.store import RunStore
store = RunStore(sys.argv[1])
run_id = store.begin_run(name="killed", kind="fit", config={{}}, spec={{}}, provenance={{}})
store.append_rows(run_id, steps=[{{"step": s, "epoch": 1}} for s in range(1, 6)], epochs=[{{"epoch": 1, "step": 5}}],
                  evals=[{{"step": 0}}, {{"step": 5}}])
print(run_id, flush=True)
time.sleep(60)
"""


def test_a_killed_process_leaves_an_interrupted_run_with_its_epochs(tmp_path):
    path = tmp_path / "s.db"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(), str(path)], stdout=subprocess.PIPE,
                              text=True, env=ENV)  # fmt: skip
    run_id = int(writer.stdout.readline())
    with RunStore(path) as store:
        assert store.list_runs()["status"].tolist() == ["running"]  # its process is alive
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    with RunStore(path) as store:
        assert store.list_runs()["status"].tolist() == ["interrupted"]
        run = store.load_run(run_id)
    assert run.status == "interrupted" and run.ended_at is not None
    assert list(run.steps["step"]) == [1, 2, 3, 4, 5] and len(run.epochs) == 1 and len(run.evals) == 2
    with sqlite3.connect(path) as db:  # the status was written, not only shown
        assert db.execute("SELECT status FROM runs").fetchone()[0] == "interrupted"


# -- the command line and exports -------------------------------------------------------------------


@pytest.fixture()
def stored(tmp_path):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        run_id = new_run(store, name="cli")
        steps = [step_row(s, grad_norm=0.5) if s % 2 else step_row(s) for s in range(1, 11)]
        store.append_rows(run_id, steps=steps, evals=[{"step": 0, "val_acc": 0.1, "val_loss": NAN}, {"step": 10, "val_acc": 0.9, "val_loss": 0.3}],
                          epochs=[{"epoch": 1, "step": 5, "running_acc": 0.5}, {"epoch": 2, "step": 10, "running_acc": 0.8}])  # fmt: skip
        store.finish_run(run_id, "finished", summary={"best_val_acc": 0.9})
        return path, store.load_run(run_id)




def test_runs_list_and_show(stored, cli):
    path, run = stored
    code, out, _ = cli(["runs", "list", "--store", str(path), "--json"])
    assert code == 0
    [listed] = json.loads(out)
    assert (listed["id"], listed["status"], listed["steps"], listed["epochs"], listed["val_acc"]) == (run.id, "finished", 10, 2, 0.9)
    code, out, _ = cli(["runs", "list", "--store", str(path)])
    assert code == 0 and "cli" in out and "finished" in out
    code, out, _ = cli(["runs", "list", "--store", str(path), "--kind", "study-trial", "--json"])
    assert json.loads(out) == []

    code, out, _ = cli(["runs", "show", str(run.id), "--store", str(path), "--json"])
    shown = json.loads(out)
    assert code == 0 and shown["config"] == run.config and shown["summary"] == {"best_val_acc": 0.9}
    assert shown["evals"][0] == {"step": 0, "val_acc": 0.1, "val_loss": None} and len(shown["steps"]) == 10
    code, out, _ = cli(["runs", "show", str(run.id), "--store", str(path)])
    assert code == 0 and "running_acc" in out and "best_val_acc" in out


def cli_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchlab", *args], cwd=cwd, env=ENV, capture_output=True, text=True)


def test_cli_bad_input_exits_2_with_one_line(stored, tmp_path):
    path, run = stored
    result = cli_subprocess("runs", "show", "999", "--store", str(path), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: no run 999 in") and result.stderr.count("\n") == 1

    missing = tmp_path / "nowhere.db"
    for args in (["list"], ["show", "1"], ["export", "1", "--format", "csv", "--out", str(tmp_path / "e")]):
        result = cli_subprocess("runs", *args, "--store", str(missing), cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("error: no store at")
        assert result.stderr.count("\n") == 1
    assert not missing.exists() and not (tmp_path / "batchlab.db").exists()

    result = cli_subprocess("runs", "export", str(run.id), "--format", "xls", "--out", "x", "--store", str(path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown export format")
