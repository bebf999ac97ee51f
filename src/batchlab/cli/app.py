"""The command line's frame: the click group, the options every command shares, output helpers, `main`.

Every command takes ``--store`` and ``--json``. Bad input exits with status 2 and one line
``error: ...`` on stderr; nothing is written to the store before the input has been validated,
and output paths are checked before any work starts. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import click

from .. import __version__
from ..errors import BatchlabError

DEFAULT_STORE = "batchlab.db"
# The largest whole number SQLite, torch seeds and numpy hold: run ids, seeds and counts stay below it.
MAX_INT = 2**63 - 1
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def _require_command(ctx: click.Context) -> None:
    """A bare group is a usage error that names its commands (not a wall of help, not exit 0)."""
    if ctx.invoked_subcommand is None:
        assert isinstance(ctx.command, click.Group)
        commands = ", ".join(ctx.command.list_commands(ctx))
        raise click.UsageError(f"'{ctx.command_path}' needs a command: one of {commands}", ctx)


@click.group("batchlab", invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="batchlab", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Train by mini-batches with exact metrics; measure how batch size, lr and epochs shape training."""
    _require_command(ctx)


@cli.group("runs", invoke_without_command=True)
@click.pass_context
def runs_group(ctx: click.Context) -> None:
    """The run store: list, show and export runs."""
    _require_command(ctx)


# --- options every command shares: one name, one default, one help text ---------------------------


class FiniteFloat(click.ParamType):
    """A float that is finite (no inf, nan or overflow to inf such as 1e999)."""

    name = "number"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class WholeNumber(click.ParamType):
    """A whole number from ``minimum`` up to 2**63 - 1 (the largest SQLite, torch and numpy hold);
    with ``optional``, also ``none`` (no value, e.g. no step budget)."""

    name = "integer"

    def __init__(self, minimum: int = 0, optional: bool = False):
        self.minimum, self.optional = minimum, optional
        self.name = "integer|none" if optional else "integer"  # the metavar click shows

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif self.optional and (value is None or str(value).strip().lower() == "none"):
            return None
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        if not self.minimum <= number <= MAX_INT:
            self.fail(f"{number} is out of range; give a whole number from {self.minimum} to 2**63-1", param, ctx)
        return number


def whole(minimum: int = 0, optional: bool = False) -> WholeNumber:
    """A whole number from ``minimum`` up to 2**63 - 1 (or ``none`` when optional)."""
    return WholeNumber(minimum, optional)


def store_option() -> click.Option:
    return click.Option(["--store"], type=click.Path(path_type=Path, dir_okay=False), default=None,
                        help="Run store (SQLite). Default: $BATCHLAB_STORE or ./batchlab.db.")  # fmt: skip


def json_option(text: str = "Print a machine-readable summary on stdout.") -> click.Option:
    return click.Option(["--json", "as_json"], is_flag=True, default=False, show_default=False, help=text)


def quiet_option() -> click.Option:
    return click.Option(["--quiet", "-q"], is_flag=True, default=False, show_default=False,
                        help="No progress display or tables.")  # fmt: skip


def threads_option() -> click.Option:
    return click.Option(["--threads"], type=whole(1), default=1,
                        help="Torch CPU threads (1 is fastest for small models on a shared machine).")  # fmt: skip


def allow_import_option() -> click.Option:
    return click.Option(["--allow-import"], is_flag=True, default=False, show_default=False,
                        help="Allow a model given as package.module:function (imports and runs that module).")


def out_option(text: str, *, folder: bool = True) -> click.Option:
    """--out: a folder (created if missing) or, with ``folder=False``, a file."""
    kind = click.Path(path_type=Path, file_okay=not folder, dir_okay=folder)
    return click.Option(["--out"], type=kind, default=None, help=text)


def store_path(store: Optional[Path]) -> Path:
    """The store to use: --store, else $BATCHLAB_STORE, else batchlab.db in the working directory."""
    return Path(store or os.environ.get("BATCHLAB_STORE") or DEFAULT_STORE)


def check_store_folder(store: Path) -> None:
    """A store that will be written must have an existing, writable folder (checked before training)."""
    folder = store.parent
    if not folder.is_dir():
        raise BatchlabError(f"the store's folder {shown(folder)} does not exist; create it or pass another --store")
    if store.is_dir():
        raise BatchlabError(f"--store {shown(store)} is a directory; give a file such as {shown(store / DEFAULT_STORE)}")
    if not os.access(folder, os.W_OK):
        raise BatchlabError(f"the store's folder {shown(folder)} is not writable; pass another --store")


def check_out_folder(out: Optional[Path], flag: str = "--out") -> None:
    """An output folder must be creatable and writable: checked before any work starts."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise BatchlabError(f"{flag} {shown(out)} is a file; give a folder (it is created if missing)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise BatchlabError(f"{flag} {shown(out)} cannot be created: {shown(existing)} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BatchlabError(f"{flag} {shown(out)} is not writable ({shown(existing)}); pass another {flag}")


def check_out_file(out: Optional[Path]) -> None:
    """An --out file must be in an existing, writable folder and not be a folder itself."""
    if out is None:
        return
    if out.is_dir():
        raise BatchlabError(f"--out {shown(out)} is a directory; give a file name")
    if not out.parent.is_dir():
        raise BatchlabError(f"--out {shown(out)}: the folder {shown(out.parent)} does not exist; create it first")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise BatchlabError(f"--out {shown(out)} is not writable; pass another --out")


# --- output --------------------------------------------------------------------------------------

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def shown(value: Any) -> str:
    """Any value as text that is safe to print: control characters (escape sequences, newlines,
    backspaces) become visible ``\\xNN`` escapes so a stored name cannot drive the terminal.

    Rich output is printed with markup off (see `console`), so brackets need no escaping.
    """
    return str(value).translate(_CONTROL)


def console(stream=None) -> "rich.console.Console":  # noqa: F821
    """A rich console that never reads markup from text, and is not cut to 80 columns when piped."""
    from rich.console import Console

    stream = stream or sys.stdout
    return Console(file=stream, markup=False, highlight=False, emoji=False,
                   width=None if stream.isatty() else 200)  # fmt: skip


def print_json(value: Any) -> None:
    """Print a JSON document on stdout (NaN becomes null, ±inf "Infinity", as JSON has neither)."""
    from ..store.codec import dumps

    print(dumps(value, indent=2))


def show_progress(quiet: bool = False) -> bool:
    """Whether a command draws progress: as the library decides it (`batchlab.callbacks.progress_wanted`:
    stderr is a terminal, not under CI), and never under --quiet."""
    from ..callbacks import progress_wanted

    return not quiet and progress_wanted()


def say(message: str, quiet: bool = False, as_json: bool = False) -> None:
    """Human-readable output: stdout normally, stderr when stdout carries JSON, nothing with --quiet.

    ``message`` is made safe with `shown` line by line (its own line breaks stay); build it from user
    strings freely.
    """
    if not quiet:
        click.echo("\n".join(shown(line) for line in str(message).split("\n")), err=as_json)


def cell(value: Any) -> str:
    """A number or string as a table cell: floats to 4 decimals (4 significant digits when large)."""
    if isinstance(value, float):
        return "nan" if value != value else (f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}")
    return shown(value)


def print_rich(renderable: Any, as_json: bool = False) -> None:
    """Print a rich table (on stderr when stdout carries JSON), markup off."""
    console(sys.stderr if as_json else sys.stdout).print(renderable)


def write_default_report(store: Path, ident: str | int) -> Path:
    """Write the HTML report of a stored run or group beside the store; return its path."""
    from ..report import build_report, default_report_path, write_report
    from ..store import RunStore

    with RunStore(store, create=False) as run_store:
        page = build_report(run_store, ident)
    return write_report(page, default_report_path(store, page))


# --- the entry point -----------------------------------------------------------------------------


class _Interrupted:
    """Remembers a Ctrl-C even when the training loop catches it to store the run as interrupted."""

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command; bad input is one line on stderr and exit status 2, Ctrl-C 130."""
    _Interrupted.seen = False
    previous = signal.getsignal(signal.SIGINT)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, _Interrupted.handler)
    try:
        status = cli.main(args=argv, prog_name="batchlab", standalone_mode=False)
    except BatchlabError as error:
        _fail(str(error))
    except click.UsageError as error:  # unknown flags, bad values, missing arguments and commands
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        _fail(f"{error.format_message()}{hint}")
    except click.ClickException as error:
        _fail(error.format_message())
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", status=130)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    if _Interrupted.seen:
        _fail("interrupted", status=130)
    if isinstance(status, int) and status:
        sys.exit(status)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {shown(' '.join(message.split()))}", file=sys.stderr)
    sys.exit(status)
