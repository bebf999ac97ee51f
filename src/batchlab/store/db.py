"""The run store: every run's config, provenance, status and rows, in one SQLite file.

A run is one row of ``runs`` (config, spec, provenance, summary, status, start and end times) and
its rows in three tables, ``steps`` (one per update, keyed by ``step``), ``evals`` (one per
full-pass evaluation, keyed by ``step``; step 0 is the initial one) and ``epochs`` (one per epoch,
keyed by ``epoch``). A row's columns vary between runs and within a run (probes measure only on
some steps), so each row is stored as a JSON object beside its integer key. JSON has no NaN or
infinity: NaN is stored as ``null`` and ±inf as the strings ``"Infinity"``/``"-Infinity"``, and
both come back as floats.

Runs that belong together (the replicas of an ensemble, the trials of a study) share a group.

The store is written in WAL mode and one transaction per epoch, so a process killed at any moment
leaves a store that opens, with every completed epoch's rows. A run left ``running`` by a process
that no longer exists is shown ``interrupted`` when runs are listed or loaded, and marked so when
the store is open for writing.

A store file may come from anyone, so it is read as untrusted input. A store opened for reading
(``create=False``) is opened with SQLite's ``query_only`` (and ``mode=ro`` where the user may not
write it) and never written, not even the status of an interrupted run. A store whose schema holds
an object batchlab did not make (a trigger, a view, a table) is refused before its tables are read,
so no SQL of the file's author ever runs. Every stored value is checked as it is decoded: a
malformed one is a one-line `StoreError`.

Example::

    with RunStore("batchlab.db") as store:
        run = store.load_run(3)
        run.epochs[["epoch", "running_acc", "train_acc"]]
"""

from __future__ import annotations

import math
import os
import re
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import StoreError
from .codec import (Malformed, NotANumber, decode_row, dumps, encode_row, frame, load_object, loads, records,
                    short_repr)  # fmt: skip

SCHEMA_VERSION = 1
RUN_STATUSES = ("running", "finished", "stopped", "diverged", "interrupted", "failed")
END_STATUSES = RUN_STATUSES[1:]

# The integer key of each row table.
ROW_KEYS = {"steps": "step", "evals": "step", "epochs": "epoch"}

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    summary TEXT,
    created_at TEXT NOT NULL,
    ended_at TEXT
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    group_id INTEGER REFERENCES groups(id) ON DELETE SET NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    spec TEXT NOT NULL,
    provenance TEXT NOT NULL,
    summary TEXT,
    message TEXT,
    host TEXT,            -- the writing process, to tell a live run from an interrupted one
    pid INTEGER,
    pid_started TEXT,     -- that process's start time (Linux), so a reused pid is not mistaken
    started_at TEXT NOT NULL,
    ended_at TEXT
);
CREATE INDEX runs_group ON runs(group_id);
CREATE TABLE steps (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX steps_run ON steps(run_id, step);
CREATE TABLE evals (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX evals_run ON evals(run_id, step);
CREATE TABLE epochs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX epochs_run ON epochs(run_id, epoch);
"""

# Every object of a store's schema, as (type, name): those of `_SCHEMA`, SQLite's own for them, and
# the study's claims table (made by `batchlab.study.run` in the same file). A store holding anything
# else is refused: a trigger or view would run its author's SQL when batchlab reads or writes.
_OBJECTS = frozenset(
    {(kind.lower(), name) for kind, name in re.findall(r"CREATE (TABLE|INDEX) (\w+)", _SCHEMA)}
    | {("table", "sqlite_sequence"), ("table", "study_claims"), ("index", "sqlite_autoindex_study_claims_1")}
)
# The largest id SQLite holds (a 64-bit signed integer).
MAX_ID = 2**63 - 1

# Columns of `RunStore.list_runs`, in order.
LIST_COLUMNS = [
    "id", "name", "kind", "group", "status", "dataset", "model", "batch_size", "lr", "epochs",
    "steps", "train_loss", "train_acc", "val_loss", "val_acc", "started", "duration",
]  # fmt: skip
_FINAL_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
_WHOLE_NUMBER_COLUMNS = ("id", "group", "batch_size", "epochs", "steps")


@dataclass(frozen=True)
class StoredRun:
    """One run as stored: its description and its three tables.

    ``steps`` is sorted by ``step``, ``evals`` by ``step`` (step 0 first), ``epochs`` by
    ``epoch``; each has the key column first and NaN where a row lacks a column.
    """

    id: int
    name: str | None
    kind: str
    group_id: int | None
    status: str
    config: dict[str, Any]
    spec: dict[str, Any]
    provenance: dict[str, Any]
    summary: dict[str, Any]
    message: str | None
    started_at: str
    ended_at: str | None
    steps: pd.DataFrame = field(repr=False)
    evals: pd.DataFrame = field(repr=False)
    epochs: pd.DataFrame = field(repr=False)

    def meta(self) -> dict[str, Any]:
        """Everything but the tables, as plain values."""
        names = ("id", "name", "kind", "group_id", "status", "config", "spec", "provenance",
                 "summary", "message", "started_at", "ended_at")  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """The run as one JSON-ready document: `meta` plus the tables as lists of records."""
        tables = {name: records(getattr(self, name)) for name in ROW_KEYS}
        return {**self.meta(), **tables}


class RunStore:
    """A SQLite file of runs and groups. Use as a context manager, or call `close`.

    Args:
        path: the database file. Its directory must exist.
        create: make the file if it does not exist; with ``False`` a missing file is a
            `StoreError` and nothing is created (for commands that only read).
        read_only: open the file for reading only (SQLite's ``query_only``, and ``mode=ro`` where
            the user may not write it): nothing is ever written, and a store in a folder or file
            the user cannot write is readable.
            By default a store opened with ``create=False`` is read-only.

    One process writes at a time (SQLite's rule); within a process the store may be shared
    between threads, as every operation holds a lock.
    """

    def __init__(self, path: str | Path, *, create: bool = True, read_only: bool | None = None):
        self.path = Path(path)
        self.read_only = (not create) if read_only is None else read_only
        self._lock = threading.RLock()
        if create and not self.read_only and not self.path.exists():
            _create(self.path)
        self._db = _connect(self.path, self.read_only)
        try:
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _check_schema(self) -> None:
        """Refuse a SQLite file that is not a batchlab store, one from a newer batchlab, or one whose
        schema holds objects batchlab did not make (checked before any of its tables is read)."""
        try:
            objects = self._db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
            versions = None
            if {("table", "schema_version"), ("table", "runs")} <= {(kind, name) for kind, name, _ in objects}:
                versions = [r[0] for r in self._db.execute("SELECT version FROM schema_version")]
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a batchlab store ({error}); pass another --store") from None
        if not versions:
            raise StoreError(f"{self.path} is a SQLite database but not a batchlab store; pass another --store")
        bad = next((v for v in versions if type(v) is not int), None)
        if bad is not None:
            raise StoreError(f"{self.path} has a malformed store schema version {short_repr(bad)}, not a whole "
                             "number; the file is damaged or was not written by batchlab")  # fmt: skip
        if max(versions) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer batchlab (store schema {max(versions)}, this one reads "
                f"{SCHEMA_VERSION}); upgrade batchlab"
            )
        _check_objects(self.path, objects)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite errors become one-line StoreErrors."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                raise StoreError(f"cannot write to the store {self.path}: {error}") from None

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction on the store's connection, for tables that other modules keep in the
        same file (the study's group claims, `batchlab.study.run`); SQLite errors become StoreErrors."""
        return self._transaction()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                raise StoreError(f"cannot read the store {self.path}: {error}") from None

    def _malformed(self, what: str, error: Malformed | str) -> StoreError:
        """The one-line error for a stored value that batchlab cannot have written."""
        return StoreError(f"cannot read the store {self.path}: {what} {error}; the store is damaged "
                          "or was not written by batchlab")  # fmt: skip

    def _object(self, text: Any, what: str) -> dict[str, Any]:
        """A stored JSON object (config, spec, provenance, summary), checked; {} for NULL."""
        try:
            return load_object(text)
        except Malformed as error:
            raise self._malformed(what, error) from None

    def _row(self, text: Any, table: str, owner: str) -> dict[str, Any]:
        """One stored row of ``table`` decoded to numbers, checked."""
        try:
            return decode_row(text, ROW_KEYS[table])
        except Malformed as error:
            raise self._malformed(f"{owner}'s {table} row", error) from None

    def _text(self, value: Any, what: str, *, optional: bool = True, choices: Iterable[str] | None = None) -> Any:
        """A stored text column (name, kind, status, message), checked: text, or NULL where ``optional``."""
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices is not None else "text"
            raise self._malformed(what, f"is {short_repr(value)}, not {expected}")
        return value

    def _id(self, value: Any, what: str, *, optional: bool = True) -> int | None:
        """A stored id or count column, checked: a whole number, or NULL where ``optional``."""
        if (value is None and optional) or type(value) is int:
            return value
        raise self._malformed(what, f"is {short_repr(value)}, not a whole number")

    def _time(self, value: Any, what: str) -> str:
        """A stored time column (ISO 8601), checked; returned as stored."""
        try:
            _parse_time(value)
        except (TypeError, ValueError):
            raise self._malformed(what, f"is {short_repr(value)}, not an ISO 8601 time") from None
        return value

    # -- groups --------------------------------------------------------------------------------

    def create_group(self, kind: str, name: str | None, config: Mapping[str, Any]) -> int:
        """Open a group of runs (``replica``, ``study``, ...) with status ``running``; returns its id."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO groups (kind, name, config, status, created_at) VALUES (?, ?, ?, 'running', ?)",
                (kind, name, dumps(config), _now()),
            )
            return int(cursor.lastrowid)

    def finish_group(self, group_id: int, status: str = "finished", *, summary: Mapping[str, Any] | None = None) -> None:
        """Close a group with an end status (finished, stopped, interrupted, ...) and a summary."""
        _check_status(status)
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE groups SET status = ?, summary = ?, ended_at = ? WHERE id = ?",
                (status, dumps(summary or {}), _now(), group_id),
            )
            if cursor.rowcount == 0:
                raise StoreError(f"no group {group_id} in {self.path}")

    def get_group(self, group_id: int) -> dict[str, Any]:
        """A group's id, kind, name, config, status, summary, created_at and ended_at."""
        _check_id(group_id, "group")
        rows = self._query(
            "SELECT id, kind, name, config, status, summary, created_at, ended_at FROM groups WHERE id = ?",
            (group_id,),
        )
        if not rows:
            raise StoreError(f"no group {group_id} in {self.path}")
        gid, kind, name, config, status, summary, created, ended = rows[0]
        what = f"group {gid}'s"
        return {"id": gid, "kind": self._text(kind, f"{what} kind", optional=False),
                "name": self._text(name, f"{what} name"), "config": self._object(config, f"{what} config"),
                "status": self._text(status, f"{what} status", optional=False, choices=RUN_STATUSES),
                "summary": self._object(summary, f"{what} summary"),
                "created_at": self._time(created, f"{what} created_at"),
                "ended_at": None if ended is None else self._time(ended, f"{what} ended_at")}  # fmt: skip

    def group_runs(self, group_id: int) -> list[int]:
        """The ids of a group's runs, in the order they began."""
        return [r[0] for r in self._query("SELECT id FROM runs WHERE group_id = ? ORDER BY id", (group_id,))]

    def find_groups(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every group (of one ``kind`` if given) as `get_group` describes it, oldest first."""
        sql = "SELECT id FROM groups" + (" WHERE kind = ?" if kind is not None else "") + " ORDER BY id"
        return [self.get_group(r[0]) for r in self._query(sql, (kind,) if kind is not None else ())]

    def group_run_summaries(self, group_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        """A group's runs without their tables: id, name, kind, status, config, spec, summary, message.

        Cheap where `load_run` is not: no step, evaluation or epoch row is read.
        """
        sql = ("SELECT id, name, kind, status, config, spec, summary, message FROM runs WHERE group_id = ?"
               + (" AND kind = ?" if kind is not None else "") + " ORDER BY id")
        params = (group_id, kind) if kind is not None else (group_id,)
        return [{"id": rid, "name": self._text(name, f"run {rid}'s name"),
                 "kind": self._text(kind_, f"run {rid}'s kind", optional=False),
                 "status": self._text(status, f"run {rid}'s status", optional=False, choices=RUN_STATUSES),
                 "config": self._object(config, f"run {rid}'s config"), "spec": self._object(spec, f"run {rid}'s spec"),
                 "summary": self._object(summary, f"run {rid}'s summary"),
                 "message": self._text(message, f"run {rid}'s message")}
                for rid, name, kind_, status, config, spec, summary, message in self._query(sql, params)]  # fmt: skip

    def record_runs(self, group_id: int | None, runs: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store several finished runs with all their rows in ONE transaction: all of them or none.

        For work whose unit is a set of runs (a study's group of replicas): a process killed at any
        moment leaves either the whole set or nothing of it. Each run maps ``name``, ``kind``,
        ``config``, ``spec``, ``provenance``, ``status`` (an end status), ``summary``, ``message``,
        ``started_at``, ``ended_at`` and the row lists ``steps``, ``evals``, ``epochs``.

        Returns:
            The new runs' ids, in order.
        """
        prepared = []
        for run in runs:
            _check_status(run["status"])
            tables = {}
            for table in ROW_KEYS:
                try:
                    tables[table] = [encode_row(row, ROW_KEYS[table]) for row in run.get(table, ())]
                except NotANumber as error:
                    raise StoreError(f"cannot store a row of {table}: {error}") from None
            prepared.append((run, tables))
        ids = []
        with self._transaction() as db:
            for run, tables in prepared:
                cursor = db.execute(
                    "INSERT INTO runs (name, kind, group_id, status, config, spec, provenance, summary, message, "
                    "host, pid, pid_started, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.get("name"), run["kind"], group_id, run["status"], dumps(run.get("config", {})),
                     dumps(run.get("spec", {})), dumps(run.get("provenance", {})), dumps(run.get("summary", {})),
                     run.get("message"), socket.gethostname(), os.getpid(), _process_started(os.getpid()),
                     run.get("started_at") or _now(), run.get("ended_at") or _now()),
                )  # fmt: skip
                run_id = int(cursor.lastrowid)
                for table, rows in tables.items():
                    if rows:
                        db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", [(run_id, *row) for row in rows])
                ids.append(run_id)
        return ids

    # -- writing runs --------------------------------------------------------------------------

    def begin_run(
        self,
        *,
        name: str | None,
        kind: str,
        config: Mapping[str, Any],
        spec: Mapping[str, Any],
        provenance: Mapping[str, Any],
        group_id: int | None = None,
    ) -> int:
        """Record a new run with status ``running``; returns its id.

        The calling process's host and pid are recorded too: while that process lives the run is
        running, and once it is gone without `finish_run` the run is ``interrupted``.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (name, kind, group_id, status, config, spec, provenance, host, pid, "
                "pid_started, started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (name, kind, group_id, dumps(config), dumps(spec), dumps(provenance),
                 socket.gethostname(), os.getpid(), _process_started(os.getpid()), _now()),
            )  # fmt: skip
            return int(cursor.lastrowid)

    def append_rows(
        self,
        run_id: int,
        *,
        steps: Iterable[Mapping[str, float]] = (),
        evals: Iterable[Mapping[str, float]] = (),
        epochs: Iterable[Mapping[str, float]] = (),
    ) -> None:
        """Append step, evaluation and epoch rows to a run, all in one transaction.

        Each row maps column names to numbers (int, float, NaN, numpy or 0-d torch scalars) and
        must hold its key, ``step`` for steps and evals, ``epoch`` for epochs. A row that breaks
        this is a `StoreError` and nothing is written.
        """
        batches = {}
        for table, rows in (("steps", steps), ("evals", evals), ("epochs", epochs)):
            try:
                batches[table] = [(run_id, *encode_row(row, ROW_KEYS[table])) for row in rows]
            except NotANumber as error:
                raise StoreError(f"cannot store a row of {table}: {error}") from None
        with self._transaction() as db:
            self._check_run(db, run_id)
            for table, values in batches.items():
                if values:
                    db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", values)

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        summary: Mapping[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        """End a run: ``finished``, ``stopped`` (by a callback), ``diverged`` or ``interrupted``.

        The summary is stored as JSON: NaN comes back as None, ±inf as "Infinity"/"-Infinity".
        """
        _check_status(status)
        with self._transaction() as db:
            self._check_run(db, run_id)
            db.execute(
                "UPDATE runs SET status = ?, summary = ?, message = ?, ended_at = ? WHERE id = ?",
                (status, dumps(summary or {}), message, _now(), run_id),
            )

    def delete_run(self, run_id: int) -> None:
        """Remove a run and its rows."""
        with self._transaction() as db:
            self._check_run(db, run_id)
            for table in ROW_KEYS:  # explicit, so it holds even where foreign keys are off
                db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def _check_run(self, db: sqlite3.Connection, run_id: int) -> None:
        if db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise StoreError(f"no run {run_id} in {self.path}; `batchlab runs list` shows the runs")

    # -- reading runs --------------------------------------------------------------------------

    def mark_interrupted(self) -> list[int]:
        """Mark as ``interrupted`` the runs left running by a process of this host that is gone.

        Returns the ids of those runs. A store open read-only is never written: the runs are
        returned (and shown interrupted by `list_runs` and `load_run`) but stay as stored.
        """
        host = socket.gethostname()
        rows = self._query("SELECT id, pid, pid_started FROM runs WHERE status = 'running' AND host = ?", (host,))
        gone = [run_id for run_id, pid, started in rows if not self._alive(run_id, pid, started)]
        if gone and not self.read_only:
            try:
                with self._transaction() as db:
                    db.executemany(
                        "UPDATE runs SET status = 'interrupted', ended_at = coalesce(ended_at, ?), "
                        "message = coalesce(message, ?) WHERE id = ? AND status = 'running'",
                        [(_now(), _INTERRUPTED_MESSAGE, run_id) for run_id in gone],
                    )
            except StoreError:
                pass  # a file the user cannot write: the status is still corrected in what we show
        return gone

    def _alive(self, run_id: int, pid: Any, started: Any) -> bool:
        """Whether the process that writes a running run lives; its stored pid and start are checked."""
        if pid is not None and (type(pid) is not int or not 0 < pid < 2**31):  # os.kill takes a C int
            raise self._malformed(f"run {run_id}'s pid", f"is {short_repr(pid)}, not a process id")
        self._text(started, f"run {run_id}'s pid_started")
        return _process_alive(pid, started)

    def list_runs(
        self, *, kind: str | None = None, group: int | None = None, status: str | None = None
    ) -> pd.DataFrame:
        """One row per run, newest last, with the columns of ``LIST_COLUMNS``.

        ``epochs`` counts completed epochs, ``steps`` is the last step recorded, and the
        ``train_*``/``val_*`` columns are the last evaluation's values (NaN if there is none);
        ``duration`` is in seconds (NaN while running).
        """
        gone = set(self.mark_interrupted())
        where, params = [], []
        for column, value in (("kind", kind), ("group_id", group), ("status", status)):
            if value is not None:
                where.append(f"r.{column} = ?")
                params.append(value)
        sql = (
            "SELECT r.id, r.name, r.kind, r.group_id, r.status, r.config, r.spec, r.started_at, r.ended_at, "
            "(SELECT max(step) FROM steps s WHERE s.run_id = r.id), "
            "(SELECT count(*) FROM epochs e WHERE e.run_id = r.id), "
            "(SELECT data FROM evals v WHERE v.run_id = r.id ORDER BY step DESC, rowid DESC LIMIT 1), "
            "(SELECT data FROM epochs e WHERE e.run_id = r.id ORDER BY epoch DESC, rowid DESC LIMIT 1) "
            "FROM runs r" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.id"
        )
        listed = []
        for (run_id, name, kind_, group_id, status_, config, spec, started, ended,
             last_step, n_epochs, last_eval, last_epoch) in self._query(sql, tuple(params)):  # fmt: skip
            what = f"run {run_id}"
            config, spec = self._object(config, f"{what}'s config"), self._object(spec, f"{what}'s spec")
            final = {**self._row(last_epoch, "epochs", what), **self._row(last_eval, "evals", what)}
            listed.append({
                "id": run_id, "name": self._text(name, f"{what}'s name"),
                "kind": self._text(kind_, f"{what}'s kind", optional=False),
                "group": self._id(group_id, f"{what}'s group_id"),
                "status": "interrupted" if run_id in gone else self._text(
                    status_, f"{what}'s status", optional=False, choices=RUN_STATUSES),
                "dataset": spec_name(spec.get("dataset")), "model": spec_name(spec.get("model")),
                "batch_size": config.get("batch_size"), "lr": config.get("lr"),
                "epochs": n_epochs, "steps": self._id(last_step, f"{what}'s last step") or 0,
                **{m: _float(final.get(m)) for m in _FINAL_METRICS},
                "started": self._time(started, f"{what}'s started_at"),
                "duration": _duration(started, None if ended is None else self._time(ended, f"{what}'s ended_at")),
            })  # fmt: skip
        table = pd.DataFrame.from_records(listed, columns=LIST_COLUMNS)
        for column in _WHOLE_NUMBER_COLUMNS:  # ints stay ints where some are missing (no group)
            if pd.api.types.is_numeric_dtype(table[column]) and _whole(table[column]):
                table[column] = table[column].astype("Int64")
        return table

    def load_run(self, run_id: int) -> StoredRun:
        """A run with its tables; an unknown id is a `StoreError`, and so is a malformed stored value."""
        run_id = _check_id(run_id, "run")
        gone = self.mark_interrupted()
        rows = self._query(
            "SELECT id, name, kind, group_id, status, config, spec, provenance, summary, message, "
            "started_at, ended_at FROM runs WHERE id = ?",
            (run_id,),
        )
        if not rows:
            raise StoreError(f"no run {run_id} in {self.path}; `batchlab runs list` shows the runs")
        rid, name, kind, group_id, status, config, spec, provenance, summary, message, started, ended = rows[0]
        what = f"run {rid}"
        status = self._text(status, f"{what}'s status", optional=False, choices=RUN_STATUSES)
        message = self._text(message, f"{what}'s message")
        if rid in gone:  # shown as `mark_interrupted` would have stored it (a read-only store is not written)
            status, message = "interrupted", message or _INTERRUPTED_MESSAGE
        tables = {table: self._table(rid, table) for table in ROW_KEYS}
        return StoredRun(
            id=rid, name=self._text(name, f"{what}'s name"), kind=self._text(kind, f"{what}'s kind", optional=False),
            group_id=self._id(group_id, f"{what}'s group_id"), status=status,
            config=self._object(config, f"{what}'s config"), spec=self._object(spec, f"{what}'s spec"),
            provenance=self._object(provenance, f"{what}'s provenance"),
            summary=self._object(summary, f"{what}'s summary"), message=message,
            started_at=self._time(started, f"{what}'s started_at"),
            ended_at=None if ended is None else self._time(ended, f"{what}'s ended_at"), **tables,
        )  # fmt: skip

    def _table(self, run_id: int, table: str) -> pd.DataFrame:
        key = ROW_KEYS[table]
        # One JSON array built by SQLite, parsed once: far faster than a parse per row. A stored row
        # is any text, so the parsed rows are checked against the stored keys (a second array, from
        # the same scan), one for one: a row that is not one JSON object cannot pass for others.
        text, keys = self._query(
            f"SELECT '[' || coalesce(group_concat(data, ','), '') || ']', "
            f"'[' || coalesce(group_concat(quote({key}), ','), '') || ']' FROM "
            f"(SELECT data, {key} FROM {table} WHERE run_id = ? ORDER BY {key}, rowid)",
            (run_id,),
        )[0]
        what = f"run {run_id}'s {table} table"
        try:
            rows = frame(_json_array(text), key)
            keys = _json_array(keys)
        except Malformed as error:
            raise self._malformed(what, error) from None
        if rows[key].tolist() != keys:
            raise self._malformed(what, f"has rows whose {key!r} differs from the stored {key} column "
                                  "(or a row that is not one JSON object)")  # fmt: skip
        return rows


# -- helpers -----------------------------------------------------------------------------------

_SQLITE_HEADER = b"SQLite format 3\x00"


def _create(path: Path) -> None:
    """Make a new, empty store at ``path``, atomically: another process sees all of it or nothing.

    The schema is written into a temporary file beside ``path`` which is then linked into place, so
    an existing file is never written into (if one appears meanwhile, it is left to `_connect`).
    """
    if not path.parent.is_dir():
        raise StoreError(
            f"cannot create a store at {path}: directory {path.parent} does not exist; "
            "create it or pass another --store"
        )
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
        os.close(handle)
    except OSError as error:
        raise StoreError(f"cannot create a store at {path}: {error.strerror or error}; pass another --store") from None
    temporary = Path(name)
    try:
        db = sqlite3.connect(temporary, isolation_level=None)
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            db.execute("PRAGMA journal_mode=WAL")  # kept in the file: every later connection uses WAL
        finally:
            db.close()
        _link_new(temporary, path)
    except (OSError, sqlite3.Error) as error:
        raise StoreError(f"cannot create a store at {path}: {error}; pass another --store") from None
    finally:
        for leftover in (temporary, Path(f"{temporary}-wal"), Path(f"{temporary}-shm")):
            leftover.unlink(missing_ok=True)


def _link_new(source: Path, path: Path) -> None:
    """Give ``source`` the name ``path`` unless ``path`` exists (then someone else made it)."""
    try:
        os.link(source, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: a plain rename, after a last check
        if not path.exists():
            os.rename(source, path)


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """Open an existing store file; anything that is not a SQLite database is refused unread by SQLite.

    Every connection has ``trusted_schema`` off (the file's schema may call no function with side
    effects); a read-only one has ``query_only`` on, so it cannot write (`_connect_read_only`).
    """
    if not path.exists():
        raise StoreError(f"no store at {path}; train a run with `batchlab fit` first or pass --store")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a store; pass a file path to --store")
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        raise StoreError(f"cannot read the store {path}: {error.strerror or error}") from None
    if not header:
        raise StoreError(f"{path} is an empty file, not a batchlab store; pass another --store")
    if header != _SQLITE_HEADER:
        raise StoreError(f"{path} is not a batchlab store (not a SQLite database); pass another --store")
    if read_only:
        return _connect_read_only(path)
    try:
        db = _open(path, "mode=rw")
        db.execute("PRAGMA foreign_keys = ON")
        # WAL + NORMAL: each committed transaction survives a killed process.
        db.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a batchlab store ({error}); pass another --store") from None
    return db


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open a store that will only be read; ``query_only`` makes every write statement fail.

    Where the user may write the file and its folder it is opened as usual, so that closing it
    leaves no ``-wal``/``-shm`` file behind. Elsewhere it is opened ``mode=ro``: a reader of a
    WAL-mode file shares the ``-shm`` index beside it, which it cannot create in a folder it may not
    write; then, when no ``-wal`` log is left unmerged (the file holds every committed transaction),
    the file is read as ``immutable``, without the index or locks.
    """
    try:
        if _writable(path) and _writable(path.parent):
            return _probe(_open(path, "mode=rw", query_only=True))
        return _probe(_open(path, "mode=ro", query_only=True))
    except sqlite3.OperationalError as error:
        wal = Path(f"{path}-wal")
        if getattr(error, "sqlite_errorcode", None) not in _NO_SHARED_INDEX:
            raise StoreError(f"{path} is not a batchlab store ({error}); pass another --store") from None
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(f"cannot read the store {path}: its folder is not writable and its log {wal.name} "
                             "holds transactions not yet merged; open it once where it can be written, or copy "
                             "the store with its -wal file to a writable folder") from None  # fmt: skip
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a batchlab store ({error}); pass another --store") from None
    try:
        return _probe(_open(path, "mode=ro&immutable=1", query_only=True))
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a batchlab store ({error}); pass another --store") from None


def _writable(path: Path) -> bool:
    """Whether this process (its effective user, where the platform tells) may write ``path``."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0), effective_ids=effective)


# SQLite's answers when a reader cannot make the -shm index: SQLITE_READONLY_DIRECTORY, SQLITE_CANTOPEN,
# SQLITE_READONLY_CANTINIT.
_NO_SHARED_INDEX = (1544, 14, 1288)


def _open(path: Path, mode: str, *, query_only: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=30.0, isolation_level=None,
                         check_same_thread=False)  # fmt: skip
    try:
        db.execute("PRAGMA trusted_schema = OFF")
        if query_only:
            db.execute("PRAGMA query_only = ON")
    except BaseException:
        db.close()
        raise
    return db


def _probe(db: sqlite3.Connection) -> sqlite3.Connection:
    """The connection, after a first read (SQLite opens the file, and its WAL index, lazily)."""
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _check_objects(path: Path, objects: Iterable[tuple[Any, Any, Any]]) -> None:
    """Refuse a schema holding an object that batchlab did not make (`_OBJECTS`), naming it."""
    for kind, name, sql in objects:
        plain_table = kind != "table" or sql is None or str(sql).lstrip().upper().startswith("CREATE TABLE")
        if (kind, name) not in _OBJECTS or not plain_table:
            raise StoreError(f"{path} holds a {kind} {short_repr(name)} that batchlab did not make; batchlab opens "
                             "only stores whose schema it wrote, so pass another --store")  # fmt: skip


def _check_id(value: Any, what: str) -> int:
    """A run or group id as asked for: a whole number SQLite can hold, else a one-line StoreError."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StoreError(f"{what} id {short_repr(value)} is not a whole number") from None
    if not 0 <= number <= MAX_ID:
        raise StoreError(f"no {what} {number}: {what} ids are whole numbers from 1 to 2**63-1")
    return number


def _json_array(text: Any) -> list[Any]:
    """The parsed JSON array of a table's rows (see `RunStore._table`)."""
    rows = loads(text)
    if not isinstance(rows, list):
        raise Malformed("is not a list of JSON objects")
    return rows




def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_INTERRUPTED_MESSAGE = "the training process ended without finishing the run"


def _parse_time(iso: str) -> datetime:
    """A stored time; one without a UTC offset (batchlab always writes one) is taken as UTC."""
    if not isinstance(iso, str):
        raise TypeError(f"a time is text, not {type(iso).__name__}")
    moment = datetime.fromisoformat(iso)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def timestamp(iso: str) -> float:
    """Seconds since the Unix epoch of a stored time (``started_at``, ``ended_at``).

    Raises:
        StoreError: ``iso`` is not an ISO 8601 time.
    """
    try:
        return _parse_time(iso).timestamp()
    except (TypeError, ValueError, OverflowError):
        raise StoreError(f"stored time {short_repr(iso)} is not an ISO 8601 time; the store is damaged") from None


def _duration(started: str | None, ended: str | None) -> float:
    if not started or not ended:
        return math.nan
    return (_parse_time(ended) - _parse_time(started)).total_seconds()


def _check_status(status: str) -> None:
    if status not in END_STATUSES:
        raise StoreError(f"unknown run status {status!r}; choose one of {', '.join(END_STATUSES)}")


def _process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5)


def _process_alive(pid: int | None, started: str | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped
            return False
    except (OSError, IndexError):
        pass
    now_started = _process_started(pid)
    return started is None or now_started is None or now_started == started



def spec_name(value: Any) -> str | None:
    """The name in a run spec's ``dataset`` or ``model`` entry (a name, or a mapping with ``name``)."""
    if isinstance(value, Mapping):
        value = value.get("name")
    return None if value is None else str(value)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _whole(column: pd.Series) -> bool:
    """Whether every present value of a numeric column is a whole number."""
    present = column.dropna()
    return bool(((present % 1) == 0).all())
