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
that no longer exists is shown, and marked, ``interrupted`` when runs are listed or loaded.

Example::

    with RunStore("batchlab.db") as store:
        run = store.load_run(3)
        run.epochs[["epoch", "running_acc", "train_acc"]]
"""

from __future__ import annotations

import json
import math
import os
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
from .codec import NotANumber, decode_row, dumps, encode_row, frame, loads, records

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

    One process writes at a time (SQLite's rule); within a process the store may be shared
    between threads, as every operation holds a lock.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        self._lock = threading.RLock()
        if create and not self.path.exists():
            _create(self.path)
        self._db = _connect(self.path)
        try:
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _check_schema(self) -> None:
        """Refuse a SQLite file that is not a batchlab store, or one from a newer batchlab."""
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = None
            if {"schema_version", "runs"} <= tables:
                (version,) = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a batchlab store ({error}); pass another --store") from None
        if version is None:
            raise StoreError(f"{self.path} is a SQLite database but not a batchlab store; pass another --store")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer batchlab (store schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade batchlab"
            )

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
        rows = self._query(
            "SELECT id, kind, name, config, status, summary, created_at, ended_at FROM groups WHERE id = ?",
            (group_id,),
        )
        if not rows:
            raise StoreError(f"no group {group_id} in {self.path}")
        gid, kind, name, config, status, summary, created, ended = rows[0]
        return {"id": gid, "kind": kind, "name": name, "config": loads(config), "status": status,
                "summary": loads(summary) or {}, "created_at": created, "ended_at": ended}  # fmt: skip

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
        return [{"id": rid, "name": name, "kind": kind_, "status": status, "config": loads(config) or {},
                 "spec": loads(spec) or {}, "summary": loads(summary) or {}, "message": message}
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

        Returns the ids marked. A store that cannot be written (read-only file) is left as is.
        """
        host = socket.gethostname()
        rows = self._query("SELECT id, pid, pid_started FROM runs WHERE status = 'running' AND host = ?", (host,))
        gone = [run_id for run_id, pid, started in rows if not _process_alive(pid, started)]
        if gone:
            try:
                with self._transaction() as db:
                    db.executemany(
                        "UPDATE runs SET status = 'interrupted', ended_at = coalesce(ended_at, ?), "
                        "message = coalesce(message, 'the training process ended without finishing the run') "
                        "WHERE id = ? AND status = 'running'",
                        [(_now(), run_id) for run_id in gone],
                    )
            except StoreError:
                pass  # read-only store: the status is still corrected in what we show
        return gone

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
            config, spec = loads(config) or {}, loads(spec) or {}
            final = {**decode_row(last_epoch), **decode_row(last_eval)}
            listed.append({
                "id": run_id, "name": name, "kind": kind_, "group": group_id,
                "status": "interrupted" if run_id in gone else status_,
                "dataset": spec_name(spec.get("dataset")), "model": spec_name(spec.get("model")),
                "batch_size": config.get("batch_size"), "lr": config.get("lr"),
                "epochs": n_epochs, "steps": last_step or 0,
                **{m: _float(final.get(m)) for m in _FINAL_METRICS},
                "started": started, "duration": _duration(started, ended),
            })  # fmt: skip
        table = pd.DataFrame.from_records(listed, columns=LIST_COLUMNS)
        for column in _WHOLE_NUMBER_COLUMNS:  # ints stay ints where some are missing (no group)
            if pd.api.types.is_numeric_dtype(table[column]) and _whole(table[column]):
                table[column] = table[column].astype("Int64")
        return table

    def load_run(self, run_id: int) -> StoredRun:
        """A run with its tables; an unknown id is a `StoreError`."""
        self.mark_interrupted()
        rows = self._query(
            "SELECT id, name, kind, group_id, status, config, spec, provenance, summary, message, "
            "started_at, ended_at FROM runs WHERE id = ?",
            (int(run_id),),
        )
        if not rows:
            raise StoreError(f"no run {run_id} in {self.path}; `batchlab runs list` shows the runs")
        rid, name, kind, group_id, status, config, spec, provenance, summary, message, started, ended = rows[0]
        tables = {table: self._table(rid, table) for table in ROW_KEYS}
        return StoredRun(
            id=rid, name=name, kind=kind, group_id=group_id, status=status,
            config=loads(config) or {}, spec=loads(spec) or {}, provenance=loads(provenance) or {},
            summary=loads(summary) or {}, message=message, started_at=started, ended_at=ended, **tables,
        )  # fmt: skip

    def _table(self, run_id: int, table: str) -> pd.DataFrame:
        key = ROW_KEYS[table]
        # One JSON array built by SQLite, parsed once: far faster than a parse per row.
        (text,) = self._query(
            f"SELECT '[' || coalesce(group_concat(data, ','), '') || ']' FROM "
            f"(SELECT data FROM {table} WHERE run_id = ? ORDER BY {key}, rowid)",
            (run_id,),
        )[0]
        return frame(json.loads(text), key)



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


def _connect(path: Path) -> sqlite3.Connection:
    """Open an existing store file; anything that is not a SQLite database is refused unread by SQLite."""
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
    try:
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=30.0,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip
        db.execute("PRAGMA foreign_keys = ON")
        # WAL + NORMAL: each committed transaction survives a killed process.
        db.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not a batchlab store ({error}); pass another --store") from None
    return db


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def timestamp(iso: str) -> float:
    """Seconds since the Unix epoch of a stored time (``started_at``, ``ended_at``)."""
    return datetime.fromisoformat(iso).timestamp()


def _duration(started: str | None, ended: str | None) -> float:
    if not started or not ended:
        return math.nan
    return (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()


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
