"""The MLflow export as docs/tracking.md and `runs export --help` show it: each documented tracking
URI works with what the `[mlflow]` extra installs, or ends in one `error:` line saying what to do."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "tracking.md").read_text(encoding="utf-8")
DOCUMENTED_URIS = re.findall(r"--tracking-uri (\S+)", DOC)

pytest.importorskip("mlflow", reason="the MLflow export needs the [mlflow] extra")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store with one short finished run."""
    import batchlab as bl
    from batchlab.store import recorder

    folder = tmp_path_factory.mktemp("mlflow-store")
    ds = bl.load_dataset("blobs")
    rec = recorder(folder / "b.db", name="short", kind="fit")
    bl.fit(bl.build_model("mlp", ds, seed=0), ds, bl.TrainConfig(batch_size=64, epochs=1), callbacks=[rec])
    return folder / "b.db", rec.run_id


def export(cli, stored, uri: str) -> tuple[int, str, str]:
    path, run_id = stored
    return cli(["runs", "export", str(run_id), "--format", "mlflow", "--tracking-uri", uri, "--store", str(path),
                "--json"])


def test_the_doc_shows_a_database_a_folder_and_a_server():
    assert {uri.split(":")[0] for uri in DOCUMENTED_URIS} == {"http", "sqlite", "file"}


def test_the_extra_brings_what_the_documented_database_store_needs():
    # mlflow-skinny registers its sqlite store only when sqlalchemy is importable, and migrates
    # the database with alembic: the extra must name both, and the test extra must install them.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("mlflow", "test"):
        names = {re.split(r"[<>=!\[ ;]", requirement)[0].lower() for requirement in extras[extra]}
        assert {"sqlalchemy", "alembic"} <= names, extra


def test_a_database_uri_without_sqlalchemy_is_one_line_naming_the_extra(stored, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as after `pip install mlflow-skinny` alone
    status, out, err = export(cli, stored, "sqlite:///mlflow.db")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "pip install 'batchlab[mlflow]'" in err and "sqlalchemy" in err


def test_a_folder_without_mlflows_opt_in_is_one_line_naming_it(stored, cli, tmp_path, monkeypatch):
    import mlflow

    if int(mlflow.__version__.split(".")[0]) < 3:
        pytest.skip("MLflow 2 keeps folders without an opt-in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    status, out, err = export(cli, stored, "file:./mlruns")
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err and "sqlite:///mlflow.db" in err


def logged_losses(uri: str, mlflow_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(mlflow_id, "batch_loss")
    return sorted((m.step, m.value) for m in history)


def stored_losses(stored) -> list[tuple[int, float]]:
    from batchlab.store import RunStore

    path, run_id = stored
    with RunStore(path, create=False) as store:
        steps = store.load_run(run_id).steps
    return [(int(s), float(v)) for s, v in zip(steps["step"], steps["batch_loss"])]


def assert_same_curve(logged, stored_curve) -> None:
    assert [step for step, _ in logged] == [step for step, _ in stored_curve]
    assert [value for _, value in logged] == pytest.approx([value for _, value in stored_curve], rel=1e-6)


def test_the_documented_folder_command_exports_the_runs_losses(stored, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    status, out, err = export(cli, stored, "file:./mlruns")
    assert status == 0, err
    [mlflow_id] = json.loads(out)["files"]
    assert_same_curve(logged_losses("file:./mlruns", mlflow_id), stored_losses(stored))


@pytest.mark.slow  # MLflow creates and migrates its tables in a new database: tens of seconds here
def test_the_documented_database_command_exports_the_runs_losses(stored, cli, tmp_path, monkeypatch):
    pytest.importorskip("sqlalchemy", reason="installed by the [mlflow] extra")
    monkeypatch.chdir(tmp_path)
    status, out, err = export(cli, stored, "sqlite:///mlflow.db")
    assert status == 0, err
    [mlflow_id] = json.loads(out)["files"]
    assert_same_curve(logged_losses("sqlite:///mlflow.db", mlflow_id), stored_losses(stored))


def test_a_server_that_does_not_answer_is_one_line_from_the_connect_check(stored, cli):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:  # a port that is free once closed
        port = probe.getsockname()[1]
    status, out, err = export(cli, stored, f"http://127.0.0.1:{port}")
    # batchlab's own connect check answers (MLflow's client would retry for minutes, then raise its own error)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: no MLflow tracking server answers at http://127.0.0.1:{port}")
