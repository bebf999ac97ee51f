"""The command line: a thin layer over the Python API.

Every command takes ``--store`` and ``--json``. Bad input exits with status 2 and one line
``error: ...`` on stderr; nothing is written to the store before the input has been validated.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from .errors import BatchlabError

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
    """Print a JSON document on stdout (NaN becomes null, as JSON has no NaN)."""
    print(json.dumps(_json_safe(value), indent=2, default=str))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn bad input into one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=False)
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
