"""The run store's commands: `batchlab runs list|show|export` and `batchlab report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .app import (check_out_file, check_out_folder, cli, console, json_option, out_option, print_json, runs_group, shown,
                  store_option, store_path, whole)  # fmt: skip


def _run_id_argument() -> click.Argument:
    return click.Argument(["run_id"], type=whole(1), metavar="RUN_ID")


@runs_group.command("list", params=[
    click.Option(["--kind"], default=None, help="Only runs of this kind (fit, explain, replica, study-trial)."),
    click.Option(["--group"], type=whole(1), default=None, help="Only runs of this group (a study or ensemble)."),
    click.Option(["--status"], type=click.Choice(["running", "finished", "stopped", "diverged", "interrupted", "failed"]),
                 default=None, help="Only runs with this status."),
    store_option(),
    json_option(),
])  # fmt: skip
def runs_list(kind: str | None, group: int | None, status: str | None, store: Path | None, as_json: bool) -> None:
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
        console().print(f"no runs in {shown(path)}")
        return
    table = _runs_table(f"runs in {path}")
    headers = {"batch_size": "B", "group": "grp"}
    columns = [c for c in runs.columns if c not in ("train_loss", "train_acc")]  # in --json
    for column in columns:
        table.add_column(shown(headers.get(column, column)),
                         justify="right" if column in _RUNS_NUMERIC_COLUMNS else "left")
    for record in records(runs):
        table.add_row(*(_runs_cell(column, record[column]) for column in columns))
    console().print(table)


@runs_group.command("show", params=[_run_id_argument(), store_option(), json_option()])
def runs_show(run_id: int, store: Path | None, as_json: bool) -> None:
    """Show one run (RUN_ID from `batchlab runs list`): config, provenance, summary and its epoch table."""
    from ..store import RunStore

    with RunStore(store_path(store), create=False) as run_store:
        run = run_store.load_run(run_id)
    if as_json:
        print_json(run.to_dict())
        return
    from rich.text import Text

    out = console()
    name = f" {run.name!r}" if run.name else ""
    group = f", group {run.group_id}" if run.group_id is not None else ""
    out.print(Text.assemble((shown(f"run {run.id}{name}"), "bold"), f": {shown(run.kind)}, ",
                            _runs_status(run.status), shown(f"{group}, started {run.started_at}, "
                                                             f"ended {run.ended_at or '-'}")))  # fmt: skip
    if run.message:
        out.print(f"message: {shown(run.message)}")
    for title, values in (("spec", run.spec), ("config", run.config), ("provenance", run.provenance),
                          ("summary", run.summary)):  # fmt: skip
        if values:
            table = _runs_table(title, show_header=False)
            table.add_column("field")
            table.add_column("value")
            for key, value in values.items():
                table.add_row(shown(key), _runs_cell(key, value))
            out.print(table)
    out.print(f"{len(run.steps)} step rows, {len(run.evals)} evaluation rows, {len(run.epochs)} epoch rows")
    if not run.epochs.empty:
        table = _runs_table("epochs")
        for column in run.epochs.columns:
            table.add_column(shown(column), justify="right")
        for record in run.epochs.to_dict(orient="records"):
            table.add_row(*(_runs_cell(column, value) for column, value in record.items()))
        out.print(table)


@runs_group.command("export", params=[
    click.Argument(["ident"], metavar="ID"),
    click.Option(["--format", "fmt"], required=True,
                 help="csv, parquet or tensorboard write a directory; json one file; mlflow logs to --tracking-uri."),
    click.Option(["--out"], type=click.Path(path_type=Path), default=None,
                 help="Where to write: a directory, or a file for json."),
    click.Option(["--tracking-uri"], default=None,
                 help="mlflow: the tracking server or folder (http://..., sqlite:///mlflow.db, file:./mlruns)."),
    store_option(),
    json_option(),
])  # fmt: skip
def runs_export(ident: str, fmt: str, out: Path | None, tracking_uri: str | None, store: Path | None,
                as_json: bool) -> None:
    """Export runs' tables (and config and provenance) of ID: a run (3) or a group (group:N), or log them to MLflow."""
    from ..errors import ConfigError
    from ..report import parse_report_id, report_group
    from ..store import RunStore, check_format, export_mlflow, export_runs

    check_format(fmt)  # checked before the store is read
    kind, number = parse_report_id(ident)
    if (fmt == "mlflow") != (tracking_uri is not None) or (fmt != "mlflow" and out is None):
        raise ConfigError("give --out for a file export, or --format mlflow with --tracking-uri")
    if out is not None:
        _check_export_out(out, fmt)
    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        ids = [number] if kind == "run" else run_store.group_runs(report_group(run_store, ident)["id"])
        runs = [run_store.load_run(i) for i in ids]
    if fmt == "mlflow":
        written = export_mlflow(runs, tracking_uri, store_path=path, artifacts=_run_report)
    else:
        written = export_runs(runs, out, fmt)
    if as_json:
        print_json({kind: number, "runs": ids, "format": fmt, "files": [str(p) for p in written]})
    else:
        what = f"run {number}" if kind == "run" else f"{len(ids)} runs of group {number}"
        click.echo(shown(f"{what} exported as {fmt}: " + ", ".join(str(p) for p in written)))


def _run_report(run, folder: Path) -> list[Path]:
    """The run's HTML report, written into ``folder`` (attached to its MLflow run)."""
    from ..report import run_report, write_report

    return [write_report(run_report(run), folder / f"run-{run.id}.html")]


def _check_export_out(out: Path, fmt: str) -> None:
    """The export's --out is checked before the store is read: a file for json, else a folder."""

    if fmt == "json":
        check_out_file(out)
    else:
        check_out_folder(out)


_RUNS_NUMERIC_COLUMNS = {"id", "group", "batch_size", "lr", "epochs", "steps", "train_loss", "train_acc",
                         "val_loss", "val_acc", "duration"}  # fmt: skip
_RUNS_STATUS_STYLES = {"running": "cyan", "finished": "green", "stopped": "yellow", "diverged": "red", "interrupted": "magenta", "failed": "red"}


def _runs_table(title: str, show_header: bool = True) -> "rich.table.Table":  # noqa: F821
    from rich.table import Table

    return Table(title=shown(title), title_justify="left", show_header=show_header, header_style="bold")


def _runs_status(status: str) -> "rich.text.Text":  # noqa: F821
    from rich.text import Text

    return Text(shown(status), style=_RUNS_STATUS_STYLES.get(status, ""))


def _runs_cell(column: str, value: Any) -> "str | rich.text.Text":  # noqa: F821
    """A value as shown in a table: floats to 4 significant digits, times and durations short."""
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
    if column == "batch_size" and isinstance(value, (dict, list)):  # a schedule, or an adaptive batch size
        from ..config import batch_size_text

        return shown(batch_size_text(value))
    if isinstance(value, (dict, list)):
        return shown(json.dumps(value, default=str))
    return shown(value)


@cli.command("report", params=[
    click.Argument(["ident"], metavar="ID"),
    out_option("The HTML file to write. Default: beside the store, <store>-run-3.html.", folder=False),
    store_option(),
    json_option(),
])  # fmt: skip
def report(ident: str, out: Path | None, store: Path | None, as_json: bool) -> None:
    """Write a self-contained HTML report of ID: a run (3), or a group of runs (group:N or study:N)."""
    from ..report import build_report, default_report_path, parse_report_id, write_report
    from ..store import RunStore

    parse_report_id(ident)  # a malformed id fails before the store is opened
    check_out_file(out)
    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        page = build_report(run_store, ident)
    written = write_report(page, out or default_report_path(path, page))
    if as_json:
        print_json({"report": str(written)})
    else:
        click.echo(shown(f"report written to {written}"))
