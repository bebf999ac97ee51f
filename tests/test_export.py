"""Exports read back by their own readers (pandas, TensorBoard's EventAccumulator, MLflow's client)
and compared with the store, point by point; the live TensorBoard callback against the run it watched."""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import batchlab as bl
from batchlab.errors import StoreError
from batchlab.events import Callback
from batchlab.store import KEY_HPARAMS, RunStore, TensorBoard, export_run, export_runs, recorder

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hparams_metadata  # noqa: E402

BOOKKEEPING = {"step", "epoch", "samples_seen", "batch_size", "seconds"}
# Where each stored column is expected in TensorBoard: (run sub-folder, tag). Written out here,
# independently of the exporter, as what a Keras or Lightning user expects to see.
EXPECTED_CHART = {
    ("steps", "batch_loss"): ("batch", "loss"), ("steps", "batch_acc"): ("batch", "acc"),
    ("steps", "running_loss"): ("running", "loss"), ("steps", "running_acc"): ("running", "acc"),
    ("steps", "lr"): ("", "lr"), ("steps", "grad_norm"): ("", "probes/grad_norm"),
    ("steps", "dist_from_init"): ("", "probes/dist_from_init"),
    ("evals", "train_loss"): ("train", "loss"), ("evals", "train_acc"): ("train", "acc"),
    ("evals", "val_loss"): ("val", "loss"), ("evals", "val_acc"): ("val", "acc"),
}  # fmt: skip


class EpochFileCheck(Callback):
    """Reads the live files at every epoch end: what TensorBoard would show at that moment."""

    def __init__(self, live: TensorBoard):
        self.live, self.seen = live, []

    def on_epoch_end(self, event):
        scalars = read_scalars(self.live.root)
        self.seen.append((event.clock.step, len(scalars.get(("batch", "loss"), []))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real run, stored and written live to TensorBoard."""
    folder = tmp_path_factory.mktemp("trained")
    ds = bl.load_dataset("blobs")
    model = bl.build_model("mlp", ds, seed=0)
    rec = recorder(folder / "s.db", name="tb")
    live = TensorBoard(folder / "live", run_name=lambda: f"run-{rec.run_id}")
    check = EpochFileCheck(live)
    cfg = bl.TrainConfig(batch_size=64, epochs=3, lr=0.1, momentum=0.9, seed=0, eval_every=5)
    bl.fit(model, ds, cfg, probes=["grad_norm", "dist_from_init"], callbacks=[rec, live, check])
    with RunStore(folder / "s.db") as store:
        run = store.load_run(rec.run_id)
    return folder, run, live, check


def read_scalars(root: Path) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(sub-folder, tag) -> [(step, value, wall time)] of every event file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        if not any("tfevents" in f for f in files):
            continue
        accumulator = EventAccumulator(folder, size_guidance={SCALARS: 0})
        accumulator.Reload()
        sub = os.path.relpath(folder, root)
        for tag in accumulator.Tags()["scalars"]:
            out[("" if sub == "." else sub, tag)] = [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
    return out


def expected_points(run) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """The same points computed from the store: wall time = start + the row's training seconds."""
    started = datetime.fromisoformat(run.started_at).timestamp()
    out: dict = {}
    for table in ("steps", "evals"):
        frame = getattr(run, table)
        for column in frame.columns:
            if column in BOOKKEEPING:
                continue
            assert (table, column) in EXPECTED_CHART, f"{table}.{column} has no expected chart"
            points = [(int(s), float(np.float32(v)), started + float(t))
                      for s, v, t in zip(frame["step"], frame[column], frame["seconds"]) if not math.isnan(v)]  # fmt: skip
            out[EXPECTED_CHART[(table, column)]] = points
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_export_round_trips_every_point_and_is_idempotent(trained, tmp_path, cli):
    folder, run, _, _ = trained
    out = tmp_path / "tb"
    for attempt in range(2):  # the second export replaces the first: same files, no doubled points
        code, _, err = cli(["runs", "export", str(run.id), "--format", "tensorboard", "--out", str(out),
                            "--store", str(folder / "s.db")])  # fmt: skip
        assert code == 0, err
        if attempt == 0:
            first = snapshot(out)
    assert snapshot(out) == first and [p.name for p in out.iterdir()] == [f"run-{run.id}"]

    read, expected = read_scalars(out / f"run-{run.id}"), expected_points(run)
    assert set(read) == set(expected)  # no epoch/samples_seen/seconds charts, nothing missing
    for chart, points in expected.items():
        got = read[chart]
        assert [p[0] for p in got] == [p[0] for p in points], chart
        assert [p[1] for p in got] == [p[1] for p in points], chart  # float32, as TensorBoard keeps them
        assert np.allclose([p[2] for p in got], [p[2] for p in points], rtol=0, atol=1e-6), chart
    walls = [p[2] for p in read[("batch", "loss")]]
    assert walls[-1] - walls[0] == pytest.approx(run.steps["seconds"].iloc[-1] - run.steps["seconds"].iloc[0], abs=1e-5)
    assert walls[-1] > walls[0]


def session_hparams(root: Path) -> dict:
    accumulator = EventAccumulator(str(root))
    accumulator.Reload()
    content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {k: (v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
                else v.bool_value) for k, v in info.hparams.items()}  # fmt: skip


def test_every_run_has_its_hyperparameters(trained, tmp_path):
    _, run, live, _ = trained
    export_run(run, tmp_path / "tb", "tensorboard")
    for root in (tmp_path / "tb" / f"run-{run.id}", live.root):
        hparams = session_hparams(root)
        assert (hparams["lr"], hparams["batch_size"], hparams["momentum"]) == (0.1, 64, 0.9)
        assert (hparams["optimizer"], hparams["dataset"]) == ("sgd", "blobs") and hparams["model"]
        assert hparams["betas"] == str(run.config["betas"])


def test_live_tensorboard_writes_while_training_with_real_wall_times(trained):
    _, run, live, check = trained
    # at each epoch end the files already hold every step so far (flushed)
    assert check.seen == [(step, step) for step in run.epochs["step"]]
    read = read_scalars(live.root)
    started = datetime.fromisoformat(run.started_at).timestamp()
    ended = datetime.fromisoformat(run.ended_at).timestamp()
    for chart, points in expected_points(run).items():
        got = read[chart]
        assert [(s, v) for s, v, _ in got] == [(s, v) for s, v, _ in points], chart
        walls = [w for _, _, w in got]
        assert walls == sorted(walls) and started - 1 <= walls[0] and walls[-1] <= ended + 1, chart
    assert set(read) == set(expected_points(run))


def test_a_study_opens_in_the_hparams_table_with_steps_to_target(tmp_path, cli):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        group = store.create_group("study", "bs", {})
        trials = [{"name": f"B={b}", "kind": "study-trial", "config": {"batch_size": b, "lr": 0.1, "seed": 0},
                   "spec": {"dataset": "blobs", "model": "mlp", "target": "val_acc>=0.9"}, "status": "finished",
                   "summary": {"steps_to_target": reached}, "started_at": "2025-01-01T00:00:00+00:00",
                   "ended_at": "2025-01-01T00:00:05+00:00",
                   "steps": [{"step": s, "batch_loss": 1 / s, "seconds": 0.1 * s} for s in range(1, 21)],
                   "evals": [{"step": 20, "val_acc": 0.95, "seconds": 2.0}]}
                  for b, reached in ((8, 12), (64, math.nan))]  # fmt: skip
        ids = store.record_runs(group, trials)
    code, _, err = cli(["runs", "export", f"study:{group}", "--format", "tensorboard", "--out", str(tmp_path / "tb"),
                        "--store", str(path)])  # fmt: skip
    assert code == 0, err
    for run_id, batch_size, reached in zip(ids, (8, 64), (12, None)):
        root = tmp_path / "tb" / f"run-{run_id}"
        hparams = session_hparams(root)
        assert hparams["batch_size"] == batch_size and hparams["target"] == "val_acc>=0.9"
        scalars = read_scalars(root)
        assert scalars.get(("", "steps_to_target"), [(None, None, None)])[0][:2] == ((12, 12.0) if reached else (None, None))
        assert [v for _, v, _ in scalars[("val", "acc")]] == [pytest.approx(0.95)]


def test_live_tensorboard_rejects_an_unusable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot write TensorBoard files"):
        TensorBoard(tmp_path / "file" / "tb")


def test_fit_tensorboard_flag_writes_the_run(tmp_path, cli):
    code, out, err = cli(["fit", "--dataset", "blobs", "--epochs", "1", "--quiet", "--json", "--store",
                          str(tmp_path / "s.db"), "--tensorboard", str(tmp_path / "tb")])  # fmt: skip
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    with RunStore(tmp_path / "s.db") as store:
        run = store.load_run(run_id)
    read = read_scalars(tmp_path / "tb" / f"run-{run_id}")
    assert [v for _, v, _ in read[("running", "loss")]] == [float(np.float32(v)) for v in run.steps["running_loss"]]


# -- tables ---------------------------------------------------------------------------------------


@pytest.fixture()
def two_runs(tmp_path):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        group = store.create_group("replica", "g", {})
        ids = []
        for group_id, lr in ((group, 0.1), (None, 0.2)):
            run_id = store.begin_run(name=f"lr{lr}", kind="fit", group_id=group_id, provenance={},
                                     config={"batch_size": 4, "lr": lr, "optimizer": "sgd", "momentum": 0.0,
                                             "weight_decay": 0.0, "seed": 1},
                                     spec={"dataset": "blobs", "model": {"name": "mlp"}})  # fmt: skip
            store.append_rows(run_id, steps=[{"step": s, "lr": lr, "batch_size": 4 - (s == 3), "batch_loss": s * lr}
                                             for s in (1, 2, 3)],
                              evals=[{"step": 0, "val_loss": math.nan}, {"step": 3, "val_loss": 0.5}],
                              epochs=[{"epoch": 1, "step": 3}])  # fmt: skip
            store.finish_run(run_id, "finished")
            ids.append(run_id)
        runs = [store.load_run(i) for i in ids]
    return path, group, runs


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_exports_concatenate_into_one_tidy_table(two_runs, tmp_path, fmt, cli):
    path, group, runs = two_runs
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    for run in runs:
        code, _, err = cli(["runs", "export", str(run.id), "--format", fmt, "--out", str(tmp_path / f"e{run.id}"),
                            "--store", str(path)])  # fmt: skip
        assert code == 0, err
    for table in ("steps", "evals", "epochs"):
        tidy = pd.concat([read(tmp_path / f"e{run.id}" / f"{table}.{fmt}") for run in runs], ignore_index=True)
        context = ["run_id", "group_id", *(k for k in KEY_HPARAMS if k not in getattr(runs[0], table).columns)]
        assert list(tidy.columns[: len(context)]) == context
        for run in runs:
            mine = tidy[tidy["run_id"] == run.id]
            own = mine.drop(columns=context).dropna(axis=1, how="all").reset_index(drop=True)
            pd.testing.assert_frame_equal(own, getattr(run, table), check_dtype=False)
            assert set(mine["dataset"]) == {"blobs"} and set(mine["model"]) == {"mlp"} and set(mine["seed"]) == {1}
            group_ids = mine["group_id"].tolist()
            assert all(g == run.group_id for g in group_ids) if run.group_id else all(pd.isna(g) for g in group_ids)
    steps = read(tmp_path / f"e{runs[0].id}" / f"steps.{fmt}")
    assert steps["batch_size"].tolist() == [4, 4, 3]  # the row's own batch size, not the config's
    assert json.loads((tmp_path / f"e{runs[0].id}" / "run.json").read_text())["config"] == runs[0].config


def test_a_group_exports_as_one_table(two_runs, tmp_path, cli):
    path, group, runs = two_runs
    code, _, err = cli(["runs", "export", f"group:{group}", "--format", "csv", "--out", str(tmp_path / "g"),
                        "--store", str(path)])  # fmt: skip
    assert code == 0, err
    steps = pd.read_csv(tmp_path / "g" / "steps.csv")
    assert steps["run_id"].tolist() == [runs[0].id] * 3  # only the grouped run
    assert [m["id"] for m in [json.loads((tmp_path / "g" / "run.json").read_text())]] == [runs[0].id]


def test_json_export_reads_back_equal(two_runs, tmp_path):
    _, _, runs = two_runs
    [written] = export_run(runs[0], tmp_path / "run.json", "json")
    document = json.loads(written.read_text())
    assert document["config"] == runs[0].config and document["evals"][0]["val_loss"] is None
    for table in ("steps", "evals", "epochs"):
        pd.testing.assert_frame_equal(pd.DataFrame.from_records(document[table]).astype(float),
                                      getattr(runs[0], table).astype(float))  # fmt: skip
    [both] = export_runs(runs, tmp_path / "both.json", "json")
    assert [d["id"] for d in json.loads(both.read_text())] == [r.id for r in runs]


# -- failures leave nothing behind ------------------------------------------------------------------


@pytest.mark.parametrize("fmt,module", [("parquet", "pyarrow"), ("tensorboard", "tensorboard")])
def test_a_missing_optional_package_leaves_nothing(two_runs, tmp_path, monkeypatch, fmt, module):
    _, _, runs = two_runs
    before = sorted(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(StoreError, match=f"needs {module}; install it"):
        export_run(runs[0], tmp_path / "out", fmt)
    assert sorted(tmp_path.iterdir()) == before


def test_a_failure_while_writing_leaves_nothing_and_keeps_the_earlier_export(two_runs, tmp_path, monkeypatch):
    _, _, runs = two_runs
    export_run(runs[0], tmp_path / "out", "csv")
    earlier = snapshot(tmp_path / "out")
    before = sorted(tmp_path.iterdir())
    calls = []

    def fail_second(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kw)

    original = pd.DataFrame.to_csv
    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_second)
    with pytest.raises(StoreError, match="No space left on device"):
        export_run(runs[1], tmp_path / "out", "csv")
    assert sorted(tmp_path.iterdir()) == before and snapshot(tmp_path / "out") == earlier


def test_bad_destinations_fail_in_one_line(two_runs, tmp_path):
    _, _, runs = two_runs
    (tmp_path / "file").write_text("x")
    for path, fmt, message in ((tmp_path / "no" / "dir", "csv", "does not exist"),
                               (tmp_path / "file", "csv", "is a file"),
                               (tmp_path / "no" / "run.json", "json", "does not exist"),
                               (tmp_path, "json", "is a directory"),
                               (tmp_path / "x", "xls", "unknown export format 'xls'")):  # fmt: skip
        with pytest.raises(StoreError, match=message) as error:
            export_run(runs[0], path, fmt)
        assert "\n" not in str(error.value)


# -- MLflow ---------------------------------------------------------------------------------------


def test_mlflow_export_reads_back_through_mlflows_client(trained, tmp_path, monkeypatch, cli):
    pytest.importorskip("mlflow", reason="the MLflow export needs the [mlflow] extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a folder
    folder, run, _, _ = trained
    uri = (tmp_path / "mlruns").resolve().as_uri()
    for _ in range(2):  # again: replaces the first export
        code, out, err = cli(["runs", "export", str(run.id), "--format", "mlflow", "--tracking-uri", uri,
                              "--store", str(folder / "s.db"), "--json"])  # fmt: skip
        assert code == 0, err
    [mlflow_id] = json.loads(out)["files"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("batchlab")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == mlflow_id and logged.info.status == "FINISHED"
    assert logged.data.params["lr"] == "0.1" and logged.data.params["batch_size"] == "64"
    assert logged.data.params["dataset"] == "blobs" and logged.data.tags["batchlab.run_id"] == str(run.id)
    started = datetime.fromisoformat(run.started_at).timestamp()
    for table, column in (("steps", "batch_loss"), ("steps", "grad_norm"), ("evals", "val_acc")):
        frame = getattr(run, table).dropna(subset=[column])
        history = sorted(client.get_metric_history(mlflow_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == frame["step"].tolist()
        assert [m.value for m in history] == pytest.approx(frame[column].tolist(), rel=1e-12)
        assert [m.timestamp for m in history] == [int(round(1000 * (started + s))) for s in frame["seconds"]]
    assert logged.info.start_time == int(round(1000 * started))
    assert [a.path for a in client.list_artifacts(mlflow_id)] == [f"run-{run.id}.html"]


def test_mlflow_missing_is_one_line(two_runs, monkeypatch, tmp_path):
    _, _, runs = two_runs
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    from batchlab.store import export_mlflow

    with pytest.raises(StoreError, match=r"needs mlflow; install it with `pip install 'batchlab\[mlflow\]'`"):
        export_mlflow(runs, (tmp_path / "m").as_uri())
    assert not (tmp_path / "m").exists()


def test_live_tensorboard_names_the_model_as_the_store_does(tmp_path, cli):
    code, out, err = cli(["fit", "--dataset", "blobs", "--model", "mlp", "--epochs", "1", "--quiet", "--json",
                          "--store", str(tmp_path / "s.db"), "--tensorboard", str(tmp_path / "live")])  # fmt: skip
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    with RunStore(tmp_path / "s.db") as store:
        run = store.load_run(run_id)
    export_run(run, tmp_path / "exported", "tensorboard")
    live = session_hparams(tmp_path / "live" / f"run-{run_id}")
    stored_model = run.spec["model"]["name"] if isinstance(run.spec["model"], dict) else run.spec["model"]
    assert live["model"] == stored_model == "mlp"  # not the module's class, Sequential
    assert live == session_hparams(tmp_path / "exported" / f"run-{run_id}")  # one set of hparams, both ways


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exports_get_the_users_umask(two_runs, tmp_path, umask):
    _, _, runs = two_runs
    previous = os.umask(umask)
    try:
        written = export_runs(runs, tmp_path / "csv", "csv") + export_runs(runs, tmp_path / "tb", "tensorboard")
        written += export_runs(runs, tmp_path / "runs.json", "json")
        written += export_runs(runs, tmp_path / "runs.json", "json")  # replacing an export: a new file too
    finally:
        os.umask(previous)
    folders = {tmp_path / "csv", tmp_path / "tb", *(p.parent for p in written if p.parent != tmp_path)}
    for folder in folders:
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, (folder, oct(folder.stat().st_mode))
    for file in written:
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, (file, oct(file.stat().st_mode))
