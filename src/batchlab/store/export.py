"""Exports of stored runs: csv, parquet, json and tensorboard."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import StoreError
from .codec import dumps
from .db import ROW_KEYS, StoredRun

EXPORT_FORMATS = ("csv", "parquet", "json", "tensorboard")


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
            path.write_text(dumps(run.to_dict(), indent=2) + "\n", encoding="utf-8")
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
        (path / "run.json").write_text(dumps(run.meta(), indent=2) + "\n", encoding="utf-8")
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
        writer.add_text("config", f"```\n{dumps(run.config, indent=2)}\n```")
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

