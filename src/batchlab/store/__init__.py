"""The run store: every run's config, provenance, status and rows, in one SQLite file.

A run is one row of ``runs`` (config, spec, provenance, summary, status, start and end times) and
its rows in three tables, ``steps`` (one per update, keyed by ``step``), ``evals`` (one per
full-pass evaluation, keyed by ``step``; step 0 is the initial one) and ``epochs`` (one per epoch,
keyed by ``epoch``). Runs that belong together (the replicas of an ensemble, the trials of a study)
share a group.

The package, from the foundation up:

- `codec`: numbers and JSON (NaN as null, ±inf as "Infinity"), for the store and every export;
- `db`: `RunStore`, the SQLite file, and `StoredRun`, a run read back;
- `recorder`: the callback that writes a training run into a store;
- `export`: csv, parquet, json, tensorboard and mlflow exports of stored runs.

Example::

    with RunStore("batchlab.db") as store:
        run = store.load_run(3)
        run.epochs[["epoch", "running_acc", "train_acc"]]
"""

from __future__ import annotations

from .codec import json_ready
from .db import END_STATUSES, LIST_COLUMNS, ROW_KEYS, RUN_STATUSES, SCHEMA_VERSION, RunStore, StoredRun
from .export import EXPORT_FORMATS, export_run
from .recorder import RunRecorder, collect_provenance, recorder

__all__ = [
    "END_STATUSES", "EXPORT_FORMATS", "LIST_COLUMNS", "ROW_KEYS", "RUN_STATUSES", "SCHEMA_VERSION",
    "RunRecorder", "RunStore", "StoredRun", "collect_provenance", "export_run", "json_ready", "recorder",
]  # fmt: skip
