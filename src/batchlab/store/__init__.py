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
- `export`: csv, parquet, json exports of stored runs, and the dispatch to the two below;
- `tensorboard`: the live `TensorBoard` callback and the tensorboard export, one layout;
- `mlflow`: the export to an MLflow tracking server.

Example::

    with RunStore("batchlab.db") as store:
        run = store.load_run(3)
        run.epochs[["epoch", "running_acc", "train_acc"]]
"""

from __future__ import annotations

from .codec import json_ready
from .db import END_STATUSES, LIST_COLUMNS, ROW_KEYS, RUN_STATUSES, SCHEMA_VERSION, RunStore, StoredRun
from .export import EXPORT_FORMATS, FILE_FORMATS, KEY_HPARAMS, check_format, export_run, export_runs, tidy_table
from .mlflow import export_mlflow
from .recorder import RunRecorder, collect_provenance, recorder
from .tensorboard import TensorBoard

__all__ = [
    "END_STATUSES", "EXPORT_FORMATS", "FILE_FORMATS", "KEY_HPARAMS", "LIST_COLUMNS", "ROW_KEYS", "RUN_STATUSES",
    "SCHEMA_VERSION", "RunRecorder", "RunStore", "StoredRun", "TensorBoard", "check_format", "collect_provenance",
    "export_mlflow", "export_run", "export_runs", "json_ready", "recorder", "tidy_table",
]  # fmt: skip
