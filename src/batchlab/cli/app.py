"""The command line's frame: the typer app, shared options and output helpers, and `main`.

Every command takes ``--store`` and ``--json``. Bad input exits with status 2 and one line
``error: ...`` on stderr; nothing is written to the store before the input has been validated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from ..errors import BatchlabError

app = typer.Typer(
    name="batchlab",
    help="Train by mini-batches with exact metrics; measure how batch size, lr and epochs shape training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="The run store: list, show and export runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

DEFAULT_STORE = "batchlab.db"

StoreOption = Annotated[
    Optional[Path],
    typer.Option("--store", help="Run store (SQLite). Default: $BATCHLAB_STORE or ./batchlab.db."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]


def store_path(store: Optional[Path]) -> Path:
    """The store to use: --store, else $BATCHLAB_STORE, else batchlab.db in the working directory."""
    return Path(store or os.environ.get("BATCHLAB_STORE") or DEFAULT_STORE)


def print_json(value: Any) -> None:
    """Print a JSON document on stdout (NaN becomes null, ±inf "Infinity", as JSON has neither)."""
    from ..store.codec import dumps

    print(dumps(value, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn bad input into one line on stderr and exit status 2."""
    command = typer.main.get_command(app)
    for extra in EXTRA_COMMANDS:
        command.add_command(extra)
    try:
        command.main(args=argv, prog_name="batchlab", standalone_mode=False)
    except BatchlabError as error:
        _fail(str(error))
    except click.exceptions.NoArgsIsHelpError as error:
        # click already printed help for a bare group; exit 0 as `--help` would... but signal misuse.
        sys.exit(2 if error.ctx and error.ctx.invoked_subcommand else 0)
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        _fail(f"{error.format_message()}{hint}")
    except click.exceptions.Exit as error:
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", status=130)
    except KeyboardInterrupt:
        _fail("interrupted", status=130)


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)



# Commands built directly with click (their flags are generated from the configs); `main` adds them.
EXTRA_COMMANDS: list[click.Command] = []


def _say(message: str, quiet: bool, as_json: bool) -> None:
    """Human-readable output: stdout normally, stderr when stdout carries JSON, nothing with --quiet."""
    if not quiet:
        click.echo(message, err=as_json)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else (f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}")
    return str(value)


def print_rich(renderable, as_json: bool) -> None:
    """Print a rich table; when the output is not a terminal, wide enough not to truncate columns."""
    from rich.console import Console

    stream = sys.stderr if as_json else sys.stdout
    Console(file=stream, width=None if stream.isatty() else 200).print(renderable)


def write_default_report(store: Path, ident: str | int) -> Path:
    """Write the HTML report of a stored run or group beside the store; return its path."""
    from ..report import build_report, default_report_path, write_report
    from ..store import RunStore

    with RunStore(store, create=False) as run_store:
        page = build_report(run_store, ident)
    return write_report(page, default_report_path(store, page))
