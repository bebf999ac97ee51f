"""Exports of stored runs: csv, parquet, json, tensorboard (files) and mlflow (a tracking server).

Every file export is built in a temporary folder beside its destination and moved into place at
the end, so a failed export (a missing optional package, a full disk) leaves nothing behind, and
exporting again replaces the previous export instead of adding to it. Exported files and folders
get the permissions of any file the user makes (0666/0777 less the umask), not the private ones
of the temporary folder and file they are built in.

Tables carry ``run_id``, ``group_id`` and the run's key hyperparameters (`KEY_HPARAMS`) in front of
the row's own columns, so exports of several runs concatenate into one tidy table::

    pd.concat([pd.read_csv(f"run{i}/steps.csv") for i in (3, 4)])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..errors import StoreError
from .codec import dumps
from .db import ROW_KEYS, StoredRun, spec_name

FILE_FORMATS = ("csv", "parquet", "json", "tensorboard")
EXPORT_FORMATS = (*FILE_FORMATS, "mlflow")
# Hyperparameters put beside every exported row. In the steps table the row's own ``batch_size``
# (the last batch of an epoch may be smaller) and ``lr`` (the schedule's value) are kept.
KEY_HPARAMS = ("dataset", "model", "optimizer", "batch_size", "lr", "momentum", "weight_decay", "seed")
_NEEDS = {"parquet": "pyarrow", "tensorboard": "tensorboard"}


def export_run(run: StoredRun, path: str | Path, fmt: str) -> list[Path]:
    """Write one run's tables and description; returns the files written.

    Formats:
        ``csv``, ``parquet``: ``path`` is a directory (made if its parent exists) that receives
            ``steps.<ext>``, ``evals.<ext>``, ``epochs.<ext>`` (each with ``run_id``, ``group_id``
            and `KEY_HPARAMS` first) and ``run.json`` (config, provenance, summary, ...). CSV
            writes NaN as an empty field.
        ``json``: ``path`` is one file, the document of `StoredRun.to_dict` (NaN as null, ±inf as
            ``"Infinity"``/``"-Infinity"``).
        ``tensorboard``: ``path`` is a log directory; the run goes to ``path/run-<id>/`` in the
            layout of `batchlab.store.tensorboard`.
    """
    return export_runs([run], path, fmt)


def export_runs(runs: Sequence[StoredRun], path: str | Path, fmt: str) -> list[Path]:
    """Write several runs (a group, a study) into one export; returns the files written.

    As `export_run`, except that the tables hold every run's rows one after the other, and the
    descriptions go to ``runs.json`` (a list) when there is more than one run. The json format
    writes a list of documents.
    """
    check_format(fmt)
    if fmt == "mlflow":
        raise StoreError("the mlflow export goes to a tracking server: use `export_mlflow` (--tracking-uri)")
    _require(fmt)
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"cannot write the export to {path}: directory {path.parent} does not exist")
    if fmt == "json":
        if path.is_dir():
            raise StoreError(f"{path} is a directory; the json export writes one file")
        documents = [run.to_dict() for run in runs]
        text = dumps(documents[0] if len(documents) == 1 else documents, indent=2) + "\n"
        return [_write_file_atomically(path, text)]
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file; the csv, parquet and tensorboard exports write a directory")
    return _write_folder_atomically(path, lambda folder: _write(runs, folder, fmt))


def check_format(fmt: str) -> None:
    """A `StoreError` unless ``fmt`` is one of `EXPORT_FORMATS` (checked before any work)."""
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def tidy_table(runs: Sequence[StoredRun], table: str) -> pd.DataFrame:
    """One table (``steps``, ``evals``, ``epochs``) of several runs, with ``run_id``, ``group_id``
    and `KEY_HPARAMS` in front of each row's own columns."""
    frames = []
    for run in runs:
        rows = getattr(run, table)
        context = {"run_id": run.id, "group_id": run.group_id, **_key_hparams(run)}
        front = {k: v for k, v in context.items() if k not in rows.columns}
        frame = rows.copy()
        for position, (column, value) in enumerate(front.items()):
            frame.insert(position, column, pd.Series([value] * len(frame), dtype=_dtype(value), index=frame.index))
        frames.append(frame)
    tidy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "group_id" in tidy:
        tidy["group_id"] = tidy["group_id"].astype("Int64")  # a whole number, or empty for a lone run
    return tidy


def _key_hparams(run: StoredRun) -> dict:
    values = {"dataset": spec_name(run.spec.get("dataset")), "model": spec_name(run.spec.get("model"))}
    return {key: values.get(key, run.config.get(key)) for key in KEY_HPARAMS}


def _dtype(value) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "Int64"
    return None if value is not None else "object"


def _write(runs: Sequence[StoredRun], folder: Path, fmt: str) -> list[str]:
    """Write the export into ``folder`` (a fresh temporary one); returns the names written there."""
    if fmt == "tensorboard":
        from .tensorboard import export_tensorboard

        return [str(p.relative_to(folder)) for p in export_tensorboard(runs, folder)]
    names = []
    for table in ROW_KEYS:
        frame, name = tidy_table(runs, table), f"{table}.{fmt}"
        if fmt == "csv":
            frame.to_csv(folder / name, index=False)
        else:
            frame.to_parquet(folder / name, index=False)
        names.append(name)
    metas = [run.meta() for run in runs]
    name = "run.json" if len(metas) == 1 else "runs.json"
    (folder / name).write_text(dumps(metas[0] if len(metas) == 1 else metas, indent=2) + "\n", encoding="utf-8")
    return [*names, name]


def _write_folder_atomically(path: Path, write: Callable[[Path], list[str]]) -> list[Path]:
    """Run ``write`` on a temporary folder beside ``path``, then move what it wrote into ``path``.

    An entry of ``path`` that the export also writes is replaced whole (a sub-folder too, so an
    exported run never mixes old and new files); other entries are left alone.
    """
    try:
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".export"))
    except OSError as error:
        raise StoreError(f"cannot write the export to {path}: {error.strerror or error}") from None
    try:
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes it 0700; it becomes the export folder
        names = write(temporary)
        if not path.exists():
            os.rename(temporary, path)
        else:
            for entry in sorted(temporary.iterdir()):
                _replace(entry, path / entry.name)
        return [path / name for name in names]
    except OSError as error:
        raise StoreError(f"cannot write the export to {path}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def _write_file_atomically(path: Path, text: str) -> Path:
    temporary = None
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".export")
        temporary = Path(name)
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes it 0600; it becomes the export file
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
        return path
    except OSError as error:
        raise StoreError(f"cannot write the export to {path}: {error.strerror or error}") from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set
    it, and setting it twice would briefly leave other threads' new files with the wrong one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _require(fmt: str) -> None:
    module = _NEEDS.get(fmt)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise StoreError(f"{fmt} export needs {module}; install it with `pip install 'batchlab[export]'`") from None
