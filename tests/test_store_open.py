"""Opening a store: anything that is not a batchlab store is one line, and is never written into."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from batchlab.errors import StoreError
from batchlab.store import RunStore


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry of a folder with its bytes (None for a directory): what "nothing written" compares."""
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(folder.iterdir())}


def garbled(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    db.execute("INSERT INTO contacts VALUES ('ada', '123')")
    db.commit()
    db.close()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def newer(path: Path) -> None:
    RunStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()


def directory(path: Path) -> None:
    path.mkdir()


NOT_OURS = {
    "garbled": (garbled, "not a batchlab store .not a SQLite database"),
    "foreign": (foreign, "is a SQLite database but not a batchlab store"),
    "empty": (empty, "is an empty file, not a batchlab store"),
    "newer": (newer, r"written by a newer batchlab \(store schema 99"),
    "directory": (directory, "is a directory, not a store"),
}


@pytest.mark.parametrize("kind", NOT_OURS)
@pytest.mark.parametrize("create", [True, False])
def test_a_file_that_is_not_a_store_is_refused_and_left_as_it_was(tmp_path, kind, create):
    make, message = NOT_OURS[kind]
    path = tmp_path / "s.db"
    make(path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=message) as error:
        RunStore(path, create=create)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert snapshot(tmp_path) == before  # no schema, no journal, no -wal/-shm beside it


@pytest.mark.parametrize("kind", NOT_OURS)
def test_commands_on_a_file_that_is_not_a_store_fail_in_one_line(tmp_path, kind, cli):
    make, message = NOT_OURS[kind]
    path = tmp_path / "s.db"
    make(path)
    before = snapshot(tmp_path)
    for args in (["runs", "list"], ["runs", "list", "--json"], ["runs", "show", "1"], ["report", "1"],
                 ["runs", "export", "1", "--format", "csv", "--out", str(tmp_path / "out")]):  # fmt: skip
        code, out, err = cli([*args, "--store", str(path)])
        assert code == 2 and out == "", (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_fit_into_an_empty_file_writes_nothing(tmp_path, cli):
    path = tmp_path / "s.db"
    path.write_bytes(b"")
    code, _, err = cli(["fit", "--dataset", "blobs", "--epochs", "1", "--store", str(path), "--quiet"])
    assert code == 2 and err.startswith("error: ") and "empty file" in err and err.count("\n") == 1
    assert path.read_bytes() == b"" and [p.name for p in tmp_path.iterdir()] == ["s.db"]


def test_unwritable_places_fail_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="directory .* does not exist"):
        RunStore(tmp_path / "file" / "s.db")
    with pytest.raises(StoreError, match="directory .* does not exist"):
        RunStore(tmp_path / "missing" / "s.db")
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, root included
        with pytest.raises(StoreError, match="cannot create a store at /proc/batchlab.db") as error:
            RunStore("/proc/batchlab.db")
        assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_reading_never_creates(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        RunStore(tmp_path / "absent.db", create=False)
    assert list(tmp_path.iterdir()) == []


def test_a_new_store_is_made_whole_in_wal_mode_and_reopens(tmp_path):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        assert store._query("PRAGMA journal_mode")[0][0] == "wal"
        assert store._query("SELECT version FROM schema_version") == [(1,)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    with RunStore(path, create=False) as store:
        assert store.list_runs().empty


def test_runs_list_json_prints_integers_as_integers(tmp_path, cli):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        group = store.create_group("study", "g", {})
        for group_id in (group, None):
            run = store.begin_run(name="r", kind="fit", config={"batch_size": 4, "lr": 0.1}, spec={}, provenance={},
                                  group_id=group_id)  # fmt: skip
            store.append_rows(run, steps=[{"step": 1, "epoch": 1}], epochs=[{"epoch": 1, "step": 1}])
            store.finish_run(run, "finished")
    code, out, _ = cli(["runs", "list", "--json", "--store", str(path)])
    assert code == 0
    listed = json.loads(out)
    assert [r["group"] for r in listed] == [group, None]
    for row in listed:
        for column in ("id", "batch_size", "epochs", "steps"):
            assert type(row[column]) is int, (column, row[column])
        assert type(row["lr"]) is float
    assert '"batch_size": 4,' in out and "4.0" not in out
    code, out, _ = cli(["runs", "list", "--store", str(path)])
    assert code == 0 and "<NA>" not in out and "nan" not in out.lower().replace("name", "")
