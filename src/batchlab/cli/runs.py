"""The run store's commands: `batchlab runs list|show|export` and `batchlab report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .app import JsonOption, StoreOption, app, print_json, runs_app, store_path


KindOption = Annotated[Optional[str], typer.Option("--kind", help="Only runs of this kind (fit, explain, replica, study-trial).")]
GroupOption = Annotated[Optional[int], typer.Option("--group", help="Only runs of this group (a study or ensemble).")]
StatusOption = Annotated[Optional[str], typer.Option("--status", help="Only runs with this status.")]


@runs_app.command("list")
def runs_list(
    store: StoreOption = None,
    as_json: JsonOption = False,
    kind: KindOption = None,
    group: GroupOption = None,
    status: StatusOption = None,
) -> None:
    """List the stored runs: status, data, model, batch size, lr, progress and final metrics."""
    from ..store import RunStore
    from ..store.codec import records

    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        runs = run_store.list_runs(kind=kind, group=group, status=status)
    if as_json:
        print_json(records(runs))
        return
    if runs.empty:
        print(f"no runs in {path}")
        return
    table = _runs_table(f"runs in {path}")
    headers = {"batch_size": "B", "group": "grp"}
    shown = [c for c in runs.columns if c not in ("train_loss", "train_acc")]  # in --json
    for column in shown:
        table.add_column(headers.get(column, column), justify="right" if column in _RUNS_NUMERIC_COLUMNS else "left")
    for record in records(runs):
        table.add_row(*(_runs_cell(column, record[column]) for column in shown))
    _runs_console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run's id (see `batchlab runs list`).")],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: config, provenance, summary and its epoch table."""
    from ..store import RunStore

    with RunStore(store_path(store), create=False) as run_store:
        run = run_store.load_run(run_id)
    if as_json:
        print_json(run.to_dict())
        return
    console = _runs_console()
    name = f" {run.name!r}" if run.name else ""
    group = f", group {run.group_id}" if run.group_id is not None else ""
    console.print(f"[bold]run {run.id}{name}[/bold]: {run.kind}, {_runs_status(run.status)}{group}, "
                  f"started {run.started_at}, ended {run.ended_at or '-'}")  # fmt: skip
    if run.message:
        console.print(f"message: {run.message}")
    for title, values in (("spec", run.spec), ("config", run.config), ("provenance", run.provenance),
                          ("summary", run.summary)):  # fmt: skip
        if values:
            table = _runs_table(title, show_header=False)
            table.add_column("field")
            table.add_column("value")
            for key, value in values.items():
                table.add_row(str(key), _runs_cell(key, value))
            console.print(table)
    console.print(f"{len(run.steps)} step rows, {len(run.evals)} evaluation rows, {len(run.epochs)} epoch rows")
    if not run.epochs.empty:
        table = _runs_table("epochs")
        for column in run.epochs.columns:
            table.add_column(column, justify="right")
        for record in run.epochs.to_dict(orient="records"):
            table.add_row(*(_runs_cell(column, value) for column, value in record.items()))
        console.print(table)


@runs_app.command("export")
def runs_export(
    ident: Annotated[str, typer.Argument(metavar="ID", help="A run id (3), or group:N / study:N for all runs of a group.")],
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or tensorboard (a directory); json (one file); mlflow (--tracking-uri).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write: a directory, or a file for json.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="mlflow: the tracking server or folder (http://..., sqlite:///mlflow.db, file:./mlruns).")] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export runs' step, evaluation and epoch tables (and config and provenance), or log them to MLflow."""
    from ..errors import ConfigError
    from ..report import parse_report_id
    from ..store import RunStore, check_format, export_mlflow, export_runs

    check_format(fmt)  # checked before the store is read
    kind, number = parse_report_id(ident)
    if (fmt == "mlflow") != (tracking_uri is not None) or (fmt != "mlflow" and out is None):
        raise ConfigError("give --out for a file export, or --format mlflow with --tracking-uri")
    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        ids = [number] if kind == "run" else run_store.group_runs(run_store.get_group(number)["id"])
        runs = [run_store.load_run(i) for i in ids]
    if fmt == "mlflow":
        written = export_mlflow(runs, tracking_uri, store_path=path, artifacts=_run_report)
    else:
        written = export_runs(runs, out, fmt)
    if as_json:
        print_json({kind: number, "runs": ids, "format": fmt, "files": [str(p) for p in written]})
    else:
        what = f"run {number}" if kind == "run" else f"{len(ids)} runs of group {number}"
        print(f"{what} exported as {fmt}: " + ", ".join(str(p) for p in written))


def _run_report(run, folder: Path) -> list[Path]:
    """The run's HTML report, written into ``folder`` (attached to its MLflow run)."""
    from ..report import run_report, write_report

    return [write_report(run_report(run), folder / f"run-{run.id}.html")]


_RUNS_NUMERIC_COLUMNS = {"id", "group", "batch_size", "lr", "epochs", "steps", "train_loss", "train_acc",
                         "val_loss", "val_acc", "duration"}  # fmt: skip
_RUNS_STATUS_STYLES = {"running": "cyan", "finished": "green", "stopped": "yellow", "diverged": "red", "interrupted": "magenta"}


def _runs_console() -> "rich.console.Console":  # noqa: F821
    from rich.console import Console

    # Piped output is not cut to 80 columns: tables keep every column readable.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _runs_table(title: str, show_header: bool = True) -> "rich.table.Table":  # noqa: F821
    from rich.table import Table

    return Table(title=title, title_justify="left", show_header=show_header, header_style="bold")


def _runs_status(status: str) -> str:
    style = _RUNS_STATUS_STYLES.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _runs_cell(column: str, value: Any) -> str:
    """A value as shown in a table: floats to 4 significant digits, times and durations short."""
    from rich.markup import escape

    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if column == "status":
        return _runs_status(str(value))
    if column == "started" and isinstance(value, str):
        return value[:16].replace("T", " ")
    if column == "duration":
        minutes, seconds = divmod(float(value), 60)
        return f"{int(minutes)}m {seconds:04.1f}s" if minutes else f"{seconds:.1f}s"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return escape(json.dumps(value, default=str))
    return escape(str(value))


@app.command()
def report(
    ident: Annotated[str, typer.Argument(metavar="ID", help="A run id (3), or group:N / study:N for a group of runs.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="The HTML file to write. Default: beside the store, <store>-run-3.html.")] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a self-contained HTML report of a run, a group of replicas or a study."""
    from ..report import build_report, default_report_path, parse_report_id, write_report
    from ..store import RunStore

    parse_report_id(ident)  # a malformed id fails before the store is opened
    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        page = build_report(run_store, ident)
    written = write_report(page, out or default_report_path(path, page))
    if as_json:
        print_json({"report": str(written)})
    else:
        print(f"report written to {written}")
