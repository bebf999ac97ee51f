"""TensorBoard: the live callback and the export of stored runs, with one layout for both.

Layout of one run's folder (``<log dir>/<run>/``), the one Keras and Lightning users know: one
sub-folder per view of the data, so the ``loss`` and ``acc`` charts overlay them::

    <run>/            hparams (config, dataset, model), lr, probes/grad_norm, probes/noise_scale, ...
    <run>/batch/      loss, acc         the update's own batch (train mode, before the step)
    <run>/running/    loss, acc         the running mean since the epoch began (Keras' progress bar)
    <run>/train/      loss, acc         full passes over the training set (eval mode)
    <run>/val/, <run>/test/   loss, acc on held-out data

The x axis is always ``step``. Bookkeeping columns (``epoch``, ``samples_seen``, ``batch_size``,
``seconds``) are not charted, nor is the epoch table (its values are the step and evaluation rows
at each epoch's last step). A study trial also gets ``steps_to_target`` in its run folder, so a
study opens in TensorBoard's HParams table with steps-to-target as the metric.

Example::

    run = bl.fit(model, ds, cfg, callbacks=[bl.TensorBoard("tb", run_name="baseline")])
    # tensorboard --logdir tb
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import StoreError
from ..events import Callback, EpochEnd, Evaluation, Request, RunEnd, RunStart, StepEnd
from .db import StoredRun, spec_name, timestamp

# Columns that say where a row is, not what was measured: never charted.
BOOKKEEPING = frozenset({"step", "epoch", "samples_seen", "batch_size", "seconds"})
_STEP_VIEWS = ("batch", "running")  # batch_loss -> batch/loss
_EVAL_VIEWS = ("train_mode", "train", "val", "test")  # longest first: train_mode_acc is not train/mode_acc
TARGET_METRIC = "steps_to_target"


@dataclass(frozen=True)
class Point:
    """One scalar as TensorBoard holds it: folder within the run, tag, step, value, wall time (s)."""

    folder: str
    tag: str
    step: int
    value: float
    wall_time: float


def chart_of(table: str, column: str) -> tuple[str, str] | None:
    """Where a column of the ``steps`` or ``evals`` table is charted: (folder, tag), or None.

    Args:
        table: ``steps`` (one row per update) or ``evals`` (one row per full-pass evaluation).
        column: the row's column, e.g. ``running_acc``, ``val_loss``, ``grad_norm``.

    Returns:
        ``("running", "acc")``, ``("val", "loss")``, ``("", "probes/grad_norm")``, ``("", "lr")``;
        None for bookkeeping columns and for the epoch table.
    """
    if column in BOOKKEEPING or table not in ("steps", "evals"):
        return None
    views = _STEP_VIEWS if table == "steps" else _EVAL_VIEWS
    for view in views:
        if column.startswith(view + "_"):
            return view, column[len(view) + 1 :]
    if table == "steps":
        return ("", "lr") if column == "lr" else ("", f"probes/{column}")
    return "", column  # a metric a callback added to the evaluation (events.AddMetrics)


def row_points(table: str, row: Mapping[str, float], wall_time: float) -> Iterator[Point]:
    """The charted points of one step or evaluation row (NaN values are not points)."""
    step = int(row["step"])
    for column, value in row.items():
        where = chart_of(table, column)
        if where is not None and value is not None and not math.isnan(value):
            yield Point(where[0], where[1], step, float(value), wall_time)


def run_points(run: StoredRun) -> list[Point]:
    """Every charted point of a stored run; wall time = the run's start + the row's ``seconds``.

    ``seconds`` is training time (evaluations are not counted), so the wall times of a stored run
    are its start time plus the training time up to each row.
    """
    started = timestamp(run.started_at)
    points: list[Point] = []
    for table in ("steps", "evals"):
        for row in getattr(run, table).to_dict(orient="records"):
            seconds = row.get("seconds")
            wall = started + (0.0 if seconds is None or math.isnan(seconds) else float(seconds))
            points += row_points(table, row, wall)
    return points


def run_hparams(config: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """The HParams of a run from its config and spec (what the store keeps): the one source of the
    live callback's and the export's hyperparameters, so both name the model as the store does."""
    extra = {"target": spec.get("target")} if spec.get("target") else None
    return hparams_of(config, spec.get("dataset"), spec.get("model"), extra)


def hparams_of(config: Mapping[str, Any], dataset: Any, model: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The hyperparameters shown in the HParams table: the config's values, dataset and model.

    Lists become their text (TensorBoard's hparams hold numbers, booleans and strings); None is left out.
    """
    values: dict[str, Any] = {"dataset": spec_name(dataset), "model": spec_name(model)}
    for key, value in {**config, **(extra or {})}.items():
        if isinstance(value, (bool, int, float, str)):
            values[key] = value
        elif isinstance(value, (list, tuple)):
            values[key] = str(list(value))
    return {k: v for k, v in values.items() if v is not None}


def export_tensorboard(runs: Iterable[StoredRun], folder: Path) -> list[Path]:
    """Write each run into ``folder/run-<id>/`` (see the module's layout); returns the files.

    File names and contents depend only on the stored run, so exporting again gives the same bytes.
    """
    written = []
    for run in runs:
        root = folder / f"run-{run.id}"
        started = timestamp(run.started_at)
        name = f"events.out.tfevents.{int(started)}.batchlab-run-{run.id}"
        files: dict[str, EventFile] = {}
        try:
            files[""] = EventFile(root / name, started)
            files[""].hparams(run_hparams(run.config, run.spec), started)
            for point in run_points(run):
                if point.folder not in files:
                    files[point.folder] = EventFile(root / point.folder / name, started)
                files[point.folder].scalar(point.tag, point.value, point.step, point.wall_time)
            reached = run.summary.get(TARGET_METRIC)
            if isinstance(reached, (int, float)) and math.isfinite(reached):
                end = timestamp(run.ended_at) if run.ended_at else started
                files[""].scalar(TARGET_METRIC, float(reached), int(reached), end)
            files[""].session_end(run.status, timestamp(run.ended_at) if run.ended_at else started)
        finally:
            for file in files.values():
                file.close()
        written += [file.path for file in files.values()]
    return written


class TensorBoard(Callback):
    """Write the run to TensorBoard while it trains, with real wall times.

    Step rows are written at every step, evaluations as they happen; the files are flushed at every
    evaluation and epoch end, so ``tensorboard --logdir LOG_DIR`` shows the run as it trains. The
    layout is this module's: ``loss``/``acc`` charts with one line per view (batch, running,
    train, val), probes under ``probes/``, and the config in the HParams table.

    Args:
        log_dir: the folder TensorBoard is pointed at (made if missing).
        run_name: the run's sub-folder; a callable is called when the run starts (so it can name
            the run after the store's run id). None writes into ``log_dir`` itself, as Keras does.
        spec: what the run was given, as for `batchlab.store.recorder`: its ``dataset``, ``model``
            (a name such as ``mlp``, or a mapping with one) and ``target`` override the dataset
            name and model class name of the run-start event, so the HParams table names the
            model as the store does. Pass the recorder's ``spec`` when both watch a run.

    Example::

        bl.fit(model, ds, cfg, callbacks=[bl.TensorBoard("tb", run_name="lr0.1")])
    """

    def __init__(self, log_dir: str | Path, run_name: str | Callable[[], str] | None = None, *,
                 spec: Mapping[str, Any] | None = None):  # fmt: skip
        _require_tensorboard()
        self.log_dir = Path(log_dir)
        try:  # checked now, before any training
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot write TensorBoard files to {self.log_dir}: {error.strerror or error}") from None
        self.run_name = run_name
        self.spec = dict(spec or {})
        self.root: Path | None = None
        self._files: dict[str, EventFile] = {}

    def on_run_start(self, event: RunStart) -> Request:
        self.close()
        name = self.run_name() if callable(self.run_name) else self.run_name
        self.root = self.log_dir / name if name else self.log_dir
        now = time.time()
        config = event.config.model_dump(mode="json")
        # merged as the recorder merges them, so the store and these files name the same model
        spec = {"dataset": event.dataset, "model": type(event.model).__name__, **self.spec}
        self._file("").hparams(run_hparams(config, spec), now)
        self._files[""].flush()
        return None

    def on_step_end(self, event: StepEnd) -> Request:
        self._write("steps", event.row)
        return None

    def on_evaluation(self, event: Evaluation) -> Request:
        clock = event.clock
        self._write("evals", {"step": clock.step, **event.metrics})
        self.flush()
        return None

    def on_epoch_end(self, event: EpochEnd) -> Request:
        self.flush()
        return None

    def on_run_end(self, event: RunEnd) -> Request:
        if self.root is not None and "" in self._files:
            self._files[""].session_end(event.status, time.time())
        self.close()
        return None

    def flush(self) -> None:
        for file in self._files.values():
            file.flush()

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files = {}

    def _write(self, table: str, row: Mapping[str, float]) -> None:
        if self.root is None:
            return
        now = time.time()
        for point in row_points(table, row, now):
            self._file(point.folder).scalar(point.tag, point.value, point.step, now)

    def _file(self, folder: str) -> "EventFile":
        if folder not in self._files:
            assert self.root is not None
            now = time.time()
            name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.batchlab"
            try:
                self._files[folder] = EventFile(self.root / folder / name, now)
            except OSError as error:
                raise StoreError(f"cannot write TensorBoard files to {self.root}: {error.strerror or error}") from None
        return self._files[folder]


class EventFile:
    """One TensorBoard event file: the records TensorBoard reads (scalars, hparams summaries)."""

    def __init__(self, path: Path, wall_time: float):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: BinaryIO = open(path, "wb")
        self._records = RecordWriter(self._handle)
        self._write(Event(wall_time=wall_time, file_version="brain.Event:2"))

    def scalar(self, tag: str, value: float, step: int, wall_time: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        self._summary(summary, step, wall_time)

    def hparams(self, values: Mapping[str, Any], wall_time: float) -> None:
        """The session-start record of TensorBoard's HParams plugin: this run's hyperparameters."""
        from tensorboard.plugins.hparams import plugin_data_pb2

        info = plugin_data_pb2.SessionStartInfo(start_time_secs=wall_time)
        for name, value in values.items():
            if isinstance(value, bool):  # before int: True is an int too
                info.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                info.hparams[name].number_value = value
            else:
                info.hparams[name].string_value = str(value)
        self._plugin_record("session_start_info", plugin_data_pb2.HParamsPluginData(session_start_info=info), wall_time)

    def session_end(self, status: str, wall_time: float) -> None:
        """The session-end record of the HParams plugin: how the run ended."""
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        code = {"finished": api_pb2.STATUS_SUCCESS, "stopped": api_pb2.STATUS_SUCCESS,
                "running": api_pb2.STATUS_RUNNING}.get(status, api_pb2.STATUS_FAILURE)  # fmt: skip
        info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=wall_time)
        self._plugin_record("session_end_info", plugin_data_pb2.HParamsPluginData(session_end_info=info), wall_time)

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def _plugin_record(self, field: str, data: Any, wall_time: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata

        tag = {"session_start_info": metadata.SESSION_START_INFO_TAG, "session_end_info": metadata.SESSION_END_INFO_TAG}[field]
        value = Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
        self._summary(Summary(value=[value]), 0, wall_time)

    def _summary(self, summary: Any, step: int, wall_time: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._write(Event(wall_time=wall_time, step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise StoreError("TensorBoard files need tensorboard; install it with `pip install 'batchlab[export]'`") from None
