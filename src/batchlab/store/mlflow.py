"""The MLflow export: stored runs logged to an MLflow tracking server or folder (extra ``[mlflow]``).

Each batchlab run becomes one MLflow run: the config, dataset and model as params; every charted
column of the step and evaluation tables as a metric with its step and timestamp (the run's start
plus the row's training ``seconds``, as in the TensorBoard export); the summary's numbers as
metrics at the last step; status, start and end times; and any files given (the HTML report) as
artifacts. Exporting a run again replaces its earlier export in the same experiment, found by
the tags ``batchlab.store`` and ``batchlab.run_id``.

Example::

    export_mlflow([store.load_run(3)], "file:./mlruns", store_path="batchlab.db")
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import StoreError
from .codec import dumps
from .db import StoredRun, spec_name, timestamp
from .tensorboard import BOOKKEEPING

_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "running": "RUNNING"}  # else FAILED
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
CONNECT_TIMEOUT = 10.0  # seconds for a tracking server to accept a connection
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy tracking stores


def export_mlflow(
    runs: Sequence[StoredRun],
    tracking_uri: str,
    *,
    experiment: str = "batchlab",
    store_path: str | Path | None = None,
    artifacts: Callable[[StoredRun, Path], Iterable[Path]] | None = None,
) -> list[str]:
    """Log stored runs to MLflow; returns the MLflow run ids, in order.

    Args:
        runs: the runs (one, or a group's).
        tracking_uri: where MLflow keeps runs: ``http://host:5000``, ``sqlite:///mlflow.db`` (needs
            sqlalchemy and alembic, which the ``[mlflow]`` extra installs), ``file:./mlruns`` (MLflow 3
            keeps a folder only with ``MLFLOW_ALLOW_FILE_STORE=true`` set).
        experiment: the MLflow experiment (made if missing).
        store_path: the batchlab store the runs come from, kept as a tag so a later export of the
            same run replaces this one.
        artifacts: makes the files to attach to a run (e.g. its HTML report): called with the run
            and a scratch folder to write them in, removed afterwards.

    Raises:
        StoreError: mlflow (or, for a database URI, sqlalchemy) is not installed, or the tracking
            store refused (one line). A run that fails half-way is deleted again.
    """
    source = str(Path(store_path).resolve()) if store_path is not None else ""
    try:
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        return [_log_run(client, experiment_id, run, source, artifacts) for run in runs]
    except StoreError:
        raise
    except Exception as error:  # MlflowException, connection errors: one line for the user
        raise StoreError(_refusal(tracking_uri, error)) from None


def mlflow_metrics(run: StoredRun) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp in ms, step) of every finite value of the step and evaluation rows.

    Keys are the row's column names (``batch_loss``, ``running_acc``, ``val_loss``, ``grad_norm``);
    bookkeeping columns are left out.
    """
    started = timestamp(run.started_at)
    metrics = []
    for table in ("steps", "evals"):
        for row in getattr(run, table).to_dict(orient="records"):
            seconds = row.get("seconds")
            stamp = int(round(1000 * (started + (0.0 if seconds is None or math.isnan(seconds) else seconds))))
            for column, value in row.items():
                if column not in BOOKKEEPING and value is not None and math.isfinite(value):
                    metrics.append((column, float(value), stamp, int(row["step"])))
    return metrics


def mlflow_params(run: StoredRun) -> dict[str, str]:
    """The run's config, dataset and model as MLflow params (text; lists and mappings as JSON)."""
    values: dict[str, Any] = {"dataset": spec_name(run.spec.get("dataset")), "model": spec_name(run.spec.get("model")),
                              **run.config}  # fmt: skip
    return {k: (v if isinstance(v, str) else dumps(v)) for k, v in values.items() if v is not None}


def _log_run(client, experiment_id: str, run: StoredRun, source: str, artifacts) -> str:
    from mlflow.entities import Metric, Param

    _delete_earlier(client, experiment_id, run, source)
    tags = {"mlflow.runName": run.name or f"run-{run.id}", "batchlab.run_id": str(run.id), "batchlab.store": source,
            "batchlab.kind": run.kind, "batchlab.status": run.status}  # fmt: skip
    if run.group_id is not None:
        tags["batchlab.group_id"] = str(run.group_id)
    created = client.create_run(experiment_id, start_time=_ms(run.started_at), tags=tags)
    run_id = created.info.run_id
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in mlflow_params(run).items()])
        last_step = int(run.steps["step"].max()) if not run.steps.empty else 0
        end = _ms(run.ended_at) if run.ended_at else _ms(run.started_at)
        metrics = [Metric(k, v, t, s) for k, v, t, s in mlflow_metrics(run)]
        metrics += [Metric(f"summary.{k}", float(v), end, last_step) for k, v in run.summary.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]  # fmt: skip
        for start in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + _BATCH])
        if artifacts is not None:
            with tempfile.TemporaryDirectory(prefix="batchlab-mlflow-") as scratch:
                for path in artifacts(run, Path(scratch)):
                    client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=_STATUS.get(run.status, "FAILED"), end_time=end)
    except BaseException:
        client.delete_run(run_id)  # nothing half-exported stays visible
        raise
    return run_id


def _delete_earlier(client, experiment_id: str, run: StoredRun, source: str) -> None:
    query = f"tags.`batchlab.run_id` = '{run.id}' and tags.`batchlab.store` = '{source}'"
    for earlier in client.search_runs([experiment_id], filter_string=query):
        client.delete_run(earlier.info.run_id)


def _client(tracking_uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise StoreError("the mlflow export needs mlflow; install it with `pip install 'batchlab[mlflow]'`") from None
    scheme = urlparse(tracking_uri).scheme.partition("+")[0]  # postgresql+psycopg2 -> postgresql
    if scheme in ("http", "https"):
        _check_server(tracking_uri)
    # mlflow-skinny registers its database stores only when sqlalchemy can be imported; without it
    # MlflowClient fails deep inside with a model-registry error that names neither package.
    if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise StoreError(f"MLflow's {scheme} store needs sqlalchemy and alembic, which mlflow-skinny lacks; install "
                         "them with `pip install 'batchlab[mlflow]'`, or export to a tracking server (http://...)")
    return MlflowClient(tracking_uri=tracking_uri)


def _check_server(tracking_uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a server URI where nothing accepts a connection within ``timeout`` seconds.

    MLflow's client retries such a server with growing pauses for about four minutes.
    """
    import socket

    parsed = urlparse(tracking_uri)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or f"nothing answered within {timeout:g} s"
        raise StoreError(f"no MLflow tracking server answers at {tracking_uri} ({reason}); "
                         "start it (`mlflow server`), or check the URI") from None


def _refusal(tracking_uri: str, error: Exception) -> str:
    """MLflow's error as one line; its refusal of a folder store as the remedy itself."""
    message = " ".join(str(error).split())
    if "MLFLOW_ALLOW_FILE_STORE" in message:  # MLflow 3: folders are kept only on request
        return (f"MLflow refuses the folder store {tracking_uri} unless MLFLOW_ALLOW_FILE_STORE=true is set; "
                "set it, or export to sqlite:///mlflow.db")
    return f"cannot export to MLflow at {tracking_uri}: {message[:300]}"


def _ms(iso: str) -> int:
    return int(round(1000 * timestamp(iso)))
