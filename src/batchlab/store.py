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
import platform
import socket
import sqlite3
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .errors import StoreError
from .events import Callback, EpochEnd, Request, RunEnd, RunStart

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
RUN_STATUSES = ("running", "finished", "stopped", "diverged", "interrupted")
END_STATUSES = RUN_STATUSES[1:]
EXPORT_FORMATS = ("csv", "parquet", "json", "tensorboard")

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
        tables = {name: _records(getattr(self, name)) for name in ROW_KEYS}
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
        self._db = _connect(self.path, create=create)
        try:
            self._prepare()
        except BaseException:
            self._db.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError:
            raise StoreError(f"{self.path} is not a batchlab store (not a SQLite database); pass another --store") from None
        if not tables:
            self._db.execute("PRAGMA journal_mode=WAL")
            with self._transaction() as db:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    return  # another process made it meanwhile
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            return
        if "schema_version" not in tables or "runs" not in tables:
            raise StoreError(f"{self.path} is a SQLite database but not a batchlab store; pass another --store")
        (version,) = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        if version is None or version > SCHEMA_VERSION:
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
                (kind, name, _dumps(config), _now()),
            )
            return int(cursor.lastrowid)

    def finish_group(self, group_id: int, status: str = "finished", *, summary: Mapping[str, Any] | None = None) -> None:
        """Close a group with an end status (finished, stopped, interrupted, ...) and a summary."""
        _check_status(status)
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE groups SET status = ?, summary = ?, ended_at = ? WHERE id = ?",
                (status, _dumps(summary or {}), _now(), group_id),
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
        return {"id": gid, "kind": kind, "name": name, "config": _loads(config), "status": status,
                "summary": _loads(summary) or {}, "created_at": created, "ended_at": ended}  # fmt: skip

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
        return [{"id": rid, "name": name, "kind": kind_, "status": status, "config": _loads(config) or {},
                 "spec": _loads(spec) or {}, "summary": _loads(summary) or {}, "message": message}
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
                    tables[table] = [_encode_row(row, ROW_KEYS[table]) for row in run.get(table, ())]
                except _BadRow as error:
                    raise StoreError(f"cannot store a row of {table}: {error}") from None
            prepared.append((run, tables))
        ids = []
        with self._transaction() as db:
            for run, tables in prepared:
                cursor = db.execute(
                    "INSERT INTO runs (name, kind, group_id, status, config, spec, provenance, summary, message, "
                    "host, pid, pid_started, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.get("name"), run["kind"], group_id, run["status"], _dumps(run.get("config", {})),
                     _dumps(run.get("spec", {})), _dumps(run.get("provenance", {})), _dumps(run.get("summary", {})),
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
                (name, kind, group_id, _dumps(config), _dumps(spec), _dumps(provenance),
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
                batches[table] = [(run_id, *_encode_row(row, ROW_KEYS[table])) for row in rows]
            except _BadRow as error:
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
                (status, _dumps(summary or {}), message, _now(), run_id),
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
        records = []
        for (run_id, name, kind_, group_id, status_, config, spec, started, ended,
             last_step, n_epochs, last_eval, last_epoch) in self._query(sql, tuple(params)):  # fmt: skip
            config, spec = _loads(config) or {}, _loads(spec) or {}
            final = {**_loads_row(last_epoch), **_loads_row(last_eval)}
            records.append({
                "id": run_id, "name": name, "kind": kind_, "group": group_id,
                "status": "interrupted" if run_id in gone else status_,
                "dataset": _spec_name(spec.get("dataset")), "model": _spec_name(spec.get("model")),
                "batch_size": config.get("batch_size"), "lr": config.get("lr"),
                "epochs": n_epochs, "steps": last_step or 0,
                **{m: _float(final.get(m)) for m in _FINAL_METRICS},
                "started": started, "duration": _duration(started, ended),
            })  # fmt: skip
        return pd.DataFrame.from_records(records, columns=LIST_COLUMNS)

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
            config=_loads(config) or {}, spec=_loads(spec) or {}, provenance=_loads(provenance) or {},
            summary=_loads(summary) or {}, message=message, started_at=started, ended_at=ended, **tables,
        )  # fmt: skip

    def _table(self, run_id: int, table: str) -> pd.DataFrame:
        key = ROW_KEYS[table]
        # One JSON array built by SQLite, parsed once: far faster than a parse per row.
        (text,) = self._query(
            f"SELECT '[' || coalesce(group_concat(data, ','), '') || ']' FROM "
            f"(SELECT data FROM {table} WHERE run_id = ? ORDER BY {key}, rowid)",
            (run_id,),
        )[0]
        return _frame(json.loads(text), key)


# -- recording a training run ------------------------------------------------------------------


_CLOCK_FIELDS = ("n_train", "batch_size", "steps_per_epoch", "total_steps", "epochs")


class RunRecorder(Callback):
    """A callback that records a training run into a store, one transaction per epoch.

    Made by `recorder`. ``run_id`` is set when the run starts. Rows the store cannot hold (a
    missing key, a value that is not a number) are left out with a warning rather than stopping
    training; errors of the store itself (disk full, locked) propagate as `StoreError`.
    """

    def __init__(
        self,
        store: RunStore | str | Path,
        *,
        name: str | None = None,
        kind: str = "fit",
        spec: Mapping[str, Any] | None = None,
        group_id: int | None = None,
        provenance: Mapping[str, Any] | None = None,
    ):
        self._owns_store = not isinstance(store, RunStore)
        self._store_arg = store
        self.store: RunStore | None = store if isinstance(store, RunStore) else None
        self.name, self.kind, self.group_id = name, kind, group_id
        self.spec = dict(spec or {})
        self.extra_provenance = dict(provenance or {})
        self.run_id: int | None = None

    def on_run_start(self, event: RunStart) -> Request:
        if self.store is None:
            self.store = RunStore(self._store_arg)
        config = event.config.model_dump(mode="json")
        spec = {
            "dataset": event.dataset,
            "model": type(event.model).__name__,
            "probes": list(event.probes),
            "n_parameters": sum(p.numel() for p in event.model.parameters()),
            "clock": {k: getattr(event.clock, k) for k in _CLOCK_FIELDS},
            **self.spec,
        }
        provenance = {**collect_provenance(config, event.model), **self.extra_provenance}
        self.run_id = self.store.begin_run(
            name=self.name, kind=self.kind, config=config, spec=spec, provenance=provenance, group_id=self.group_id
        )
        return None

    def on_epoch_end(self, event: EpochEnd) -> Request:
        self._append(event.steps, event.evals, (event.row,))
        return None

    def on_run_end(self, event: RunEnd) -> Request:
        if self.run_id is None or self.store is None:
            return None
        self._append(event.steps, event.evals, ())
        self.store.finish_run(self.run_id, event.status, summary=dict(event.summary), message=event.message)
        if self._owns_store:
            self.store.close()
            self.store = None
        return None

    def _append(self, steps, evals, epochs) -> None:
        if self.run_id is None or self.store is None:
            return
        self.store.append_rows(
            self.run_id,
            steps=_usable_rows(steps, "step", "steps"),
            evals=_usable_rows(evals, "step", "evals"),
            epochs=_usable_rows(epochs, "epoch", "epochs"),
        )


def recorder(
    store: RunStore | str | Path,
    *,
    name: str | None = None,
    kind: str = "fit",
    spec: Mapping[str, Any] | None = None,
    group_id: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> RunRecorder:
    """A callback that records the run it watches into ``store``.

    Args:
        store: an open `RunStore`, or a path (opened at run start, closed at run end).
        name: the run's name, shown by ``batchlab runs list``.
        kind: ``fit``, ``explain``, ``replica``, ``study-trial``, ...
        spec: what the run was given (dataset, model and its options, probes); it overrides the
            dataset name, model class name and probes taken from the `RunStart` event.
        group_id: the group (from `RunStore.create_group`) the run belongs to.
        provenance: entries to add to the automatic provenance (`collect_provenance`).

    Example::

        rec = recorder(RunStore("batchlab.db"), name="baseline", spec={"model": "mlp"})
        fit(model, ds, cfg, callbacks=[rec]); print(rec.run_id)
    """
    return RunRecorder(store, name=name, kind=kind, spec=spec, group_id=group_id, provenance=provenance)


def collect_provenance(config: Mapping[str, Any] | None = None, model: "torch.nn.Module | None" = None) -> dict[str, Any]:
    """Where and with what a run was made: versions, host, process, device, seed and command line."""
    import torch

    from . import __version__

    device = (config or {}).get("device")
    if model is not None:
        first = next(iter(model.parameters()), None)
        device = str(first.device) if first is not None else device
    info = {
        "batchlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "device": device,
        "seed": (config or {}).get("seed"),
    }
    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


# -- export ------------------------------------------------------------------------------------


def export_run(run: StoredRun, path: str | Path, fmt: str) -> list[Path]:
    """Write a run's tables and description; returns the files written.

    Formats:
        ``csv``, ``parquet``: ``path`` is a directory (made if its parent exists) that receives
            ``steps.<ext>``, ``evals.<ext>``, ``epochs.<ext>`` and ``run.json`` (config,
            provenance, summary, ...). CSV writes NaN as an empty field.
        ``json``: ``path`` is one file, the document of `StoredRun.to_dict` (NaN as null, ±inf as
            ``"Infinity"``/``"-Infinity"``).
        ``tensorboard``: ``path`` is a log directory; every column of every table becomes a
            scalar plotted against ``step`` (tags ``steps/…``, ``evals/…``, ``epochs/…``).
    """
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    try:
        if fmt == "json":
            path.write_text(_dumps(run.to_dict(), indent=2) + "\n", encoding="utf-8")
            return [path]
        _make_dir(path)
        if fmt == "tensorboard":
            return _export_tensorboard(run, path)
        written = []
        for table in ROW_KEYS:
            frame, target = getattr(run, table), path / f"{table}.{fmt}"
            if fmt == "csv":
                frame.to_csv(target, index=False)
            else:
                _require("pyarrow", "parquet export")
                frame.to_parquet(target, index=False)
            written.append(target)
        (path / "run.json").write_text(_dumps(run.meta(), indent=2) + "\n", encoding="utf-8")
        return [*written, path / "run.json"]
    except OSError as error:
        raise StoreError(f"cannot write the export to {path}: {error.strerror or error}") from None


def _make_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file; the csv, parquet and tensorboard exports write a directory")
    if not path.parent.is_dir():
        raise StoreError(f"cannot write the export to {path}: directory {path.parent} does not exist")
    path.mkdir(exist_ok=True)


def _export_tensorboard(run: StoredRun, path: Path) -> list[Path]:
    _require("tensorboard", "tensorboard export")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(path))
    try:
        writer.add_text("config", f"```\n{_dumps(run.config, indent=2)}\n```")
        for table in ROW_KEYS:
            frame = run.__getattribute__(table)
            if frame.empty:
                continue
            x = frame["step"] if "step" in frame else frame[ROW_KEYS[table]]
            for column in frame.columns:
                if column in ("step", "epoch") and table != "epochs":
                    continue
                for at, value in zip(x, frame[column]):
                    if pd.notna(value) and pd.notna(at):
                        writer.add_scalar(f"{table}/{column}", float(value), int(at))
    finally:
        writer.close()
    return sorted(p for p in path.iterdir() if p.name.startswith("events."))


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise StoreError(f"{what} needs {module}; install it with `pip install 'batchlab[export]'`") from None


# -- helpers -----------------------------------------------------------------------------------


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if not path.exists():
        if not create:
            raise StoreError(f"no store at {path}; train a run with `batchlab fit` first or pass --store")
        if not path.parent.is_dir():
            raise StoreError(
                f"cannot create a store at {path}: directory {path.parent} does not exist; "
                "create it or pass another --store"
            )
    elif path.is_dir():
        raise StoreError(f"{path} is a directory, not a store; pass a file path to --store")
    mode = "rwc" if create else "rw"
    try:
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=30.0,
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


class _BadRow(ValueError):
    pass


def _number(name: str, value: Any) -> float | int:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        return _number(name, value.item())
    raise _BadRow(f"column {name!r} holds {type(value).__name__}, not a number")


_ROW_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(**kw) builds one per call
_PLAIN_NUMBERS = (float, int)


def _encode_row(row: Mapping[str, Any], key: str) -> tuple[int, str]:
    """(key value, JSON text) of one row; NaN as null, ±inf as "Infinity"/"-Infinity"."""
    if all(type(v) in _PLAIN_NUMBERS for v in row.values()):
        values = row
    else:
        values = {name: _number(name, value) for name, value in row.items()}
    at = values.get(key)
    if at is None or not (math.isfinite(at) and at == int(at)):
        raise _BadRow(f"it has no whole-number {key!r} column (got {at!r})")
    text = _ROW_ENCODER.encode(values)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(json_ready(values), separators=(",", ":"), allow_nan=False)
    return int(at), text


def _usable_rows(rows: Iterable[Mapping[str, Any]], key: str, table: str) -> list[dict[str, Any]]:
    """The rows the store can hold: bad values are dropped, rows without a key are skipped."""
    usable = []
    for row in rows:
        clean = {}
        for name, value in dict(row).items():
            try:
                clean[name] = _number(name, value)
            except _BadRow as error:
                warnings.warn(f"not recorded in {table}: {error}", RuntimeWarning, stacklevel=3)
        try:
            _encode_row(clean, key)
        except (_BadRow, TypeError, ValueError) as error:
            warnings.warn(f"a row of {table} was not recorded: {error}", RuntimeWarning, stacklevel=3)
            continue
        usable.append(clean)
    return usable


def json_ready(value: Any) -> Any:
    """Plain JSON values: NaN -> None, ±inf -> "Infinity"/"-Infinity", numpy/torch scalars unwrapped."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, (str, int, type(None))):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return json_ready(value.item())
    if hasattr(value, "tolist"):  # arrays, tensors
        return json_ready(value.tolist())
    return str(value)


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(json_ready(value), indent=indent, allow_nan=False)


def _decode(value: Any) -> Any:
    if value is None:
        return math.nan
    if value == "Infinity":
        return math.inf
    if value == "-Infinity":
        return -math.inf
    return value


def _loads(text: str | None) -> Any:
    """JSON text of a config, spec, provenance or summary back to values (NaN was stored as null)."""
    return None if text is None else json.loads(text)


def _loads_row(text: str | None) -> dict[str, Any]:
    """JSON text of one row back to numbers: null is NaN, "Infinity" is inf."""
    if text is None:
        return {}
    row = json.loads(text)
    if "null" in text or "Infinity" in text:
        row = {k: _decode(v) for k, v in row.items()}
    return row


def _frame(rows: list[dict[str, Any]], key: str) -> pd.DataFrame:
    """Decoded rows as a table, key column first; null back to NaN and "Infinity" back to inf."""
    if not rows:
        return pd.DataFrame({key: pd.Series(dtype="int64")})
    frame = pd.DataFrame.from_records(rows)
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):  # held "Infinity", or only nulls
            frame[column] = pd.to_numeric(frame[column].map(_decode), errors="coerce").astype(float)
    columns = [key, *(c for c in frame.columns if c != key)]
    return frame[columns].reset_index(drop=True)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows as dicts of plain Python numbers (NaN kept; `_json_safe` turns it into null)."""
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _spec_name(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("name")
    return None if value is None else str(value)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
