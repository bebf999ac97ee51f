"""A received store is untrusted input: reading it never writes, runs none of its SQL, and every
malformed value is one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from batchlab.errors import StoreError
from batchlab.store import RunStore

NOBODY = 65534
# Every command that only reads a store; each takes --store after these arguments.
READ_COMMANDS = {
    "list": ["runs", "list"],
    "list --json": ["runs", "list", "--json"],
    "show": ["runs", "show", "1"],
    "show --json": ["runs", "show", "1", "--json"],
    "export json": ["runs", "export", "1", "--format", "json", "--out", "{out}/run.json"],
    "export csv": ["runs", "export", "1", "--format", "csv", "--out", "{out}/csv"],
    "report": ["report", "1", "--out", "{out}/r.html"],
    "report group": ["report", "group:1", "--out", "{out}/g.html"],
    "explain --run": ["explain", "--run", "1", "--quiet"],
}


def make_store(path: Path) -> Path:
    """A genuine store: a group, one finished run with step, evaluation and epoch rows."""
    with RunStore(path) as store:
        group = store.create_group("replica", "g", {"seeds": 1})
        run = store.begin_run(name="r", kind="fit", config={"batch_size": 4, "lr": 0.1},
                              spec={"dataset": "blobs", "model": "mlp"}, provenance={}, group_id=group)  # fmt: skip
        steps = [{"step": s, "epoch": 1 + (s - 1) // 2, "batch_loss": 1.0 / s, "running_loss": 1.0 / s} for s in range(1, 5)]
        store.append_rows(run, steps=steps, evals=[{"step": 0, "val_loss": 1.0}, {"step": 4, "val_loss": 0.5}],
                          epochs=[{"epoch": 1, "step": 2}, {"epoch": 2, "step": 4}])  # fmt: skip
        store.finish_run(run, "finished", summary={"final": 0.5})
        store.finish_group(group)
    return path


def edit(path: Path, *statements: str) -> None:
    """Change a store as its author could, with SQLite itself (the file is closed afterwards)."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def as_running_and_gone(path: Path) -> None:
    """Run 1 left `running` by a process of this host that no longer exists: what a read corrects."""
    edit(path, f"UPDATE runs SET status = 'running', ended_at = NULL, pid = NULL, host = '{socket.gethostname()}'")


def state(folder: Path) -> dict[str, bytes]:
    """What "nothing written" compares: every file of the folder with its bytes, an empty log left
    out (SQLite readers of a file they may not write leave an empty -wal/-shm pair)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not (p.name.endswith(("-wal", "-shm")) and p.stat().st_size in (0, 32768))}  # fmt: skip


def run_all(cli, store: Path, out: Path, commands=READ_COMMANDS) -> dict[str, tuple[int, str, str]]:
    return {name: cli([*(a.format(out=out) for a in args), "--store", str(store)]) for name, args in commands.items()}


def assert_one_line(result: tuple[int, str, str], name: str = "") -> str:
    code, out, err = result
    assert code == 2 and out == "", (name, code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    return err


# -- objects batchlab did not make ----------------------------------------------------------------

WIPE = "CREATE TRIGGER wipe AFTER UPDATE ON runs BEGIN DELETE FROM steps; DELETE FROM evals; DELETE FROM epochs; END"
FOREIGN_OBJECTS = {
    "trigger": (WIPE, "trigger 'wipe'"),
    "insert trigger": ("CREATE TRIGGER spy AFTER INSERT ON runs BEGIN DELETE FROM groups; END", "trigger 'spy'"),
    "view": ("CREATE VIEW latest AS SELECT * FROM runs", "view 'latest'"),
    "table": ("CREATE TABLE extra (x)", "table 'extra'"),
    "index": ("CREATE INDEX odd ON runs(name)", "index 'odd'"),
}


@pytest.mark.parametrize("kind", FOREIGN_OBJECTS)
def test_a_store_with_objects_batchlab_did_not_make_is_refused_unread(tmp_path, cli, kind):
    sql, named = FOREIGN_OBJECTS[kind]
    folder, out = tmp_path / "store", tmp_path / "out"
    folder.mkdir(), out.mkdir()
    path = make_store(folder / "s.db")
    as_running_and_gone(path)  # a read would mark it interrupted: the UPDATE that fires `wipe`
    edit(path, sql)
    before = state(folder)
    for name, result in run_all(cli, path, out).items():
        err = assert_one_line(result, name)
        assert named in err and "batchlab did not make" in err and str(path) in err, (name, err)
    assert state(folder) == before and list(out.iterdir()) == []
    with pytest.raises(StoreError, match=named):  # writing commands refuse it too: an INSERT trigger never fires
        RunStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM steps").fetchone() == (4,)


def test_reading_never_writes_not_even_an_interrupted_status(tmp_path, cli):
    path = make_store(tmp_path / "s.db")
    as_running_and_gone(path)
    before = state(tmp_path)
    code, out, err = cli(["runs", "list", "--json", "--store", str(path)])
    assert code == 0, err
    assert [r["status"] for r in json.loads(out)] == ["interrupted"]  # shown as it is
    code, out, err = cli(["runs", "show", "1", "--json", "--store", str(path)])
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "interrupted" and "ended without finishing" in shown["message"], err
    assert state(tmp_path) == before  # but not written
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status FROM runs").fetchone() == ("running",)
    with RunStore(path, create=False) as store:  # the Python API's read-only store cannot write at all
        assert store.read_only
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only"):
            store._db.execute("UPDATE runs SET name = 'x'")
    with RunStore(path) as store:  # a store open for writing marks it, as before
        assert store.mark_interrupted() == [1]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status FROM runs").fetchone() == ("interrupted",)


# -- malformed values -----------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
MALFORMED = {
    "config not json": ("UPDATE runs SET config = '{not json'", "run 1's config is not valid JSON"),
    "config a list": ("UPDATE runs SET config = '[1, 2]'", "run 1's config holds a JSON array, not an object"),
    "spec a string": ("UPDATE runs SET spec = '\"mlp\"'", "run 1's spec holds a JSON string"),
    "summary too deep": (f"UPDATE runs SET summary = '{DEEP}'", "run 1's summary is not valid JSON"),
    "provenance a blob": ("UPDATE runs SET provenance = x'00ff'", "run 1's provenance holds bytes data"),
    "bad date": ("UPDATE runs SET started_at = 'yesterday'", "run 1's started_at is 'yesterday', not an ISO 8601"),
    "date bytes": ("UPDATE runs SET ended_at = x'31'", "run 1's ended_at is b'1', not an ISO 8601"),
    "status": ("UPDATE runs SET status = 'exploded'", "run 1's status is 'exploded', not one of running"),
    "kind": ("UPDATE runs SET kind = x'00'", "run 1's kind is b'\\x00', not text"),
    "run's group id": ("UPDATE runs SET group_id = 'g'", "run 1's group_id is 'g', not a whole number"),
    "row not json": ("UPDATE steps SET data = 'nope' WHERE step = 4", "run 1's steps"),
    "row a number": ("UPDATE epochs SET data = '5' WHERE epoch = 2", "run 1's epochs"),
    "row value text": ("UPDATE evals SET data = '{\"step\": 4, \"val_loss\": \"low\"}' WHERE step = 4",
                       "'val_loss' holds 'low', not a number"),
    "row value bool": ("UPDATE evals SET data = '{\"step\": 4, \"val_loss\": true}' WHERE step = 4",
                       "'val_loss' holds True, not a number"),
    "row key lost": ("UPDATE epochs SET data = '{\"step\": 4}' WHERE epoch = 2", "whole-number 'epoch'"),
    "rows smuggled": ("UPDATE steps SET data = '{\"step\": 1}, {\"step\": 99}' WHERE step = 1", "run 1's steps table"),
    "row key text": ("UPDATE steps SET step = 'x' WHERE step = 1", "run 1's steps table"),
    "pid": (f"UPDATE runs SET status = 'running', host = '{socket.gethostname()}', pid = 99999999999999",
            "run 1's pid is 99999999999999, not a process id"),
    "group summary": ("UPDATE groups SET summary = '{'", "group 1's summary is not valid JSON"),
    "group date": ("UPDATE groups SET created_at = 'soon'", "group 1's created_at is 'soon'"),
    "schema version": ("UPDATE schema_version SET version = 'one'", "malformed store schema version 'one'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_every_malformed_value_is_one_line_and_nothing_is_written(tmp_path, cli, case):
    sql, message = MALFORMED[case]
    folder, out = tmp_path / "store", tmp_path / "out"
    folder.mkdir(), out.mkdir()
    path = make_store(folder / "s.db")
    edit(path, sql)
    before = state(folder)
    results = run_all(cli, path, out)
    for name, result in results.items():  # a command that does not read the value succeeds
        if result[0] != 0:
            assert_one_line(result, name)
            written = [a.format(out=out) for a in READ_COMMANDS[name] if "{out}" in a]
            assert not any(Path(w).exists() for w in written), (name, written)  # and writes nothing
    reader = "report group" if case.startswith("group") else "show --json"
    err = assert_one_line(results[reader], reader)
    assert message in err and str(path) in err, err
    assert state(folder) == before


WRONG_KINDS = {  # valid JSON of kinds batchlab never writes, in the values a report is drawn from
    "lr a list": ("UPDATE runs SET config = '{\"batch_size\": 4, \"lr\": [1]}'", "report", "run 1's lr is [1], not a number"),
    "clock text": ("UPDATE runs SET spec = '{\"clock\": \"x\"}'", "report group", "run 1's clock is 'x', not a mapping"),
    "n_train text": ("UPDATE runs SET spec = '{\"clock\": {\"n_train\": \"many\"}}'", "report",
                     "run 1's clock's n_train is 'many'"),
    "epoch infinite": ("UPDATE steps SET data = '{\"step\": 1, \"epoch\": \"Infinity\"}' WHERE step = 1", "report",
                       "run 1's step table's epoch is inf, not a whole number"),
    "study records": ("UPDATE groups SET kind = 'study', summary = '{\"table\": [1, 2]}'", "report group",
                      "group 1's summary table holds an entry that is not a record"),
    "study n_train": ("UPDATE groups SET kind = 'study', summary = '{\"table\": [{\"batch_size\": 4}], "
                      "\"n_train\": \"many\"}'", "report group", "the study's n_train is 'many'"),
    "study column": ("UPDATE groups SET kind = 'study', summary = '{\"table\": [{\"batch_size\": 4, "
                     "\"steps_to_target\": [1]}]}'", "report group", "a stored value has an unexpected kind"),
}  # fmt: skip


@pytest.mark.parametrize("case", WRONG_KINDS)
def test_values_of_the_wrong_kind_in_a_report_are_one_line(tmp_path, cli, case):
    sql, reader, message = WRONG_KINDS[case]
    path = make_store(tmp_path / "s.db")
    edit(path, sql)
    err = assert_one_line(run_all(cli, path, tmp_path, {reader: READ_COMMANDS[reader]})[reader], reader)
    assert message in err, err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "g.html").exists()


def test_a_malformed_value_is_a_store_error_in_python(tmp_path):
    path = make_store(tmp_path / "s.db")
    edit(path, "UPDATE runs SET config = '{'")
    with RunStore(path, create=False) as store:
        for read in (store.list_runs, lambda: store.load_run(1), lambda: store.group_run_summaries(1)):
            with pytest.raises(StoreError, match="run 1's config is not valid JSON") as error:
                read()
            assert "\n" not in str(error.value)


# -- ids beyond 64 bits ---------------------------------------------------------------------------

HUGE = str(2**64)


@pytest.mark.parametrize("args", [["report", HUGE], ["report", f"group:{HUGE}"], ["report", f"study:{HUGE}"],
                                  ["runs", "export", HUGE, "--format", "json", "--out", "{out}/x.json"],
                                  ["runs", "export", f"group:{HUGE}", "--format", "csv", "--out", "{out}/x"],
                                  ["runs", "show", HUGE], ["explain", "--run", HUGE]])  # fmt: skip
def test_ids_beyond_64_bits_are_one_line(tmp_path, cli, args):
    path = make_store(tmp_path / "s.db")
    err = assert_one_line(cli([*(a.format(out=tmp_path) for a in args), "--store", str(path)]))
    assert "2**63-1" in err or "out of range" in err, err
    with RunStore(path, create=False) as store:
        for read in (lambda: store.load_run(2**64), lambda: store.get_group(2**64)):
            with pytest.raises(StoreError, match="2\\*\\*63-1"):
                read()


# -- stores the user may not write ----------------------------------------------------------------


@contextmanager
def without_write_access(folder: Path, *, file_only: bool = False):
    """Read ``folder``'s store as a user who may not write it (or, with ``file_only``, only the
    store file): by permissions, or for root (who writes anywhere) as the user nobody."""
    store = folder / "s.db"
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (folder, store)}
        store.chmod(0o444)
        if not file_only:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(stat.S_IMODE(mode))
        return
    store.chmod(0o644)
    folder.chmod(0o755)
    if file_only:
        os.chown(folder, NOBODY, NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("file_only", [False, True], ids=["read-only folder", "read-only file"])
def test_a_store_the_user_cannot_write_is_readable(cli, file_only):
    import batchlab.report  # noqa: F401  (imported before the user changes: what the commands import lazily)
    import batchlab.store.export  # noqa: F401
    import rich.table  # noqa: F401

    base = Path(tempfile.mkdtemp(prefix="batchlab-ro-"))  # outside pytest's private tmp, so nobody can reach it
    try:
        base.chmod(0o755)
        folder, out = base / "store", base / "out"
        folder.mkdir(), out.mkdir()
        out.chmod(0o777)
        path = make_store(folder / "s.db")
        with without_write_access(folder, file_only=file_only):
            before = state(folder)
            results = run_all(cli, path, out, {k: v for k, v in READ_COMMANDS.items() if k != "explain --run"})
            after = state(folder)
        for name, (code, stdout, err) in results.items():
            assert code == 0 and not err, (name, err)
        assert json.loads(results["list --json"][1])[0]["id"] == 1
        assert json.loads(results["show --json"][1])["steps"][3]["batch_loss"] == 0.25
        assert json.loads((out / "run.json").read_text())["epochs"] == [{"epoch": 1, "step": 2}, {"epoch": 2, "step": 4}]
        assert after == before
    finally:
        for p in (base, *base.rglob("*")):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_folder_with_an_unmerged_log_is_one_line(tmp_path):
    """A writer killed before its log was merged: readable only where the log can be merged."""
    base = Path(tempfile.mkdtemp(prefix="batchlab-ro-"))
    try:
        base.chmod(0o755)
        folder = base / "store"
        folder.mkdir()
        path = make_store(folder / "s.db")
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("UPDATE runs SET name = 'renamed'")
        shutil.copy(path, tmp_path / "s.db"), shutil.copy(f"{path}-wal", tmp_path / "s.db-wal")
        writer.close()
        for name in ("s.db", "s.db-wal"):  # the files as the killed writer left them, without -shm
            shutil.copy(tmp_path / name, folder / name)
        (folder / "s.db-shm").unlink(missing_ok=True)
        with without_write_access(folder):
            with pytest.raises(StoreError, match="holds transactions not yet merged") as error:
                RunStore(path, create=False)
        assert "\n" not in str(error.value)
    finally:
        for p in (base, *base.rglob("*")):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
