"""`batchlab fit` and `batchlab datasets`: flags, TOML, JSON output, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from batchlab.store import RunStore




def test_fit_stores_the_run_and_prints_json(tmp_path, cli):
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--dataset", "blobs", "--model", "mlp:hidden=16", "--epochs", "2",
                                "--batch-size", "50", "--lr", "0.1", "--store", str(store), "--json"])
    assert status == 0, err
    summary = json.loads(out)
    assert summary["status"] == "finished" and summary["steps"] == 20 and summary["steps_per_epoch"] == 10
    assert "500 samples, batch 50 -> 10 steps/epoch, 2 epochs = 20 steps" in err
    with RunStore(store) as runs:
        stored = runs.load_run(summary["run_id"])
    assert stored.status == "finished"
    assert stored.config["batch_size"] == 50 and stored.config["lr"] == 0.1
    assert len(stored.steps) == 20 and len(stored.epochs) == 2
    assert stored.epochs["val_acc"].iloc[-1] == pytest.approx(summary["final_val_acc"])


def test_fit_from_toml_with_flag_override(tmp_path, cli):
    config = tmp_path / "run.toml"
    config.write_text('model = "logreg"\nname = "from-toml"\n[dataset]\nname = "moons"\n'
                      '[train]\nbatch_size = 70\nepochs = 3\nlr = 0.5\n')
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--config", str(config), "--epochs", "1", "--store", str(store), "--json"])
    assert status == 0, err
    summary = json.loads(out)
    assert summary["epochs"] == 1 and summary["batch_size"] == 70 and summary["dataset"] == "moons"
    with RunStore(store) as runs:
        assert runs.load_run(summary["run_id"]).name == "from-toml"


def test_same_seed_same_numbers_across_processes(tmp_path):
    """Two separate processes (other hash seeds) train to the very same numbers."""
    args = [sys.executable, "-m", "batchlab", "fit", "--dataset", "blobs", "--epochs", "2", "--batch-size", "16",
            "--model", "mlp:hidden=8,dropout=0.2", "--store", str(tmp_path / "a.db"), "--json", "--quiet"]
    summaries = []
    for hash_seed in ("1", "2"):
        done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert done.returncode == 0, done.stderr
        summaries.append(json.loads(done.stdout))
    first, second = summaries
    for key in ("final_train_loss", "final_train_acc", "final_val_loss", "final_val_acc"):
        assert first[key] == second[key], key


def _bad_files(tmp_path):
    labels = tmp_path / "labels.npz"
    np.savez(labels, X=np.zeros((10, 2)), y=np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0]))
    nan = tmp_path / "nan.npz"
    X = np.ones((10, 2))
    X[3, 1] = np.nan
    np.savez(nan, X=X, y=np.zeros(10, dtype=int))
    toml = tmp_path / "bad.toml"
    toml.write_text("[train\nbatch_size = 3\n")
    unknown_field = tmp_path / "unknown.toml"
    unknown_field.write_text("[train]\nbatch_sise = 3\n")
    return labels, nan, toml, unknown_field


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--model", "transformer"], "transformer"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "5000", "--dataset", "blobs"], "larger than the training set"),
    (["--lr", "0"], "lr"),
    (["--lr", "-0.1"], "lr"),
    (["--optimizer", "sgdd"], "optimizer"),
    (["--epochs", "two"], "epochs"),
    (["--probes", "magic"], "unknown probe"),
    (["--dataset", "missing.csv", "--target", "y"], "missing.csv"),
    (["--frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_line_and_stores_nothing(tmp_path, cli, args, expected):
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--store", str(store), "--quiet", *args])
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not store.exists()


def test_bad_files_are_one_line_errors(tmp_path, cli):
    labels, nan, toml, unknown_field = _bad_files(tmp_path)
    store = tmp_path / "runs.db"
    for args, expected in [
        (["--dataset", str(labels)], "-1"),
        (["--dataset", str(nan)], "NaN"),
        (["--config", str(toml)], "malformed TOML"),
        (["--config", str(unknown_field)], "batch_sise"),
        (["--config", str(tmp_path / "absent.toml")], "cannot read config file"),
    ]:
        status, _, err = cli(["fit", "--store", str(store), "--quiet", *args])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert expected in err, (args, err)
    assert not store.exists()


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "batchlab", "fit", "--lr", "-1", "--store", str(tmp_path / "s.db")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_diverged_run_is_stored_as_diverged(tmp_path, cli):
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--dataset", "blobs", "--lr", "1e8", "--momentum", "0.9", "--batch-size", "4",
                                "--epochs", "3", "--store", str(store), "--json"])
    assert status == 0
    summary = json.loads(out)
    assert summary["status"] == "diverged"
    with sqlite3.connect(store) as db:
        assert db.execute("select status from runs").fetchall() == [("diverged",)]


def test_datasets_lists_the_builtins(cli):
    status, out, err = cli(["datasets", "--json"])
    assert status == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert {"blobs", "moons", "circles", "digits", "mnist1d"} <= set(rows)
    assert rows["mnist1d"]["n_train"] == 4000 and rows["blobs"]["n_train"] == 500
