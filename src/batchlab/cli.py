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


# -- the run store: batchlab runs list / show / export ------------------------------------------

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
    from .store import RunStore, json_ready

    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        runs = run_store.list_runs(kind=kind, group=group, status=status)
    if as_json:
        print_json(json_ready(runs.to_dict(orient="records")))
        return
    if runs.empty:
        print(f"no runs in {path}")
        return
    table = _runs_table(f"runs in {path}")
    headers = {"batch_size": "B", "group": "grp"}
    shown = [c for c in runs.columns if c not in ("train_loss", "train_acc")]  # in --json
    for column in shown:
        table.add_column(headers.get(column, column), justify="right" if column in _RUNS_NUMERIC_COLUMNS else "left")
    for record in runs.to_dict(orient="records"):
        table.add_row(*(_runs_cell(column, record[column]) for column in shown))
    _runs_console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run's id (see `batchlab runs list`).")],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: config, provenance, summary and its epoch table."""
    from .store import RunStore, json_ready

    with RunStore(store_path(store), create=False) as run_store:
        run = run_store.load_run(run_id)
    if as_json:
        print_json(json_ready(run.to_dict()))
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
    run_id: Annotated[int, typer.Argument(help="The run's id (see `batchlab runs list`).")],
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or tensorboard (a directory); json (one file).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write: a directory, or a file for json.")],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a run's step, evaluation and epoch tables (and its config and provenance)."""
    from .errors import StoreError
    from .store import EXPORT_FORMATS, RunStore, export_run

    if fmt not in EXPORT_FORMATS:  # checked before the store is read
        raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    with RunStore(store_path(store), create=False) as run_store:
        run = run_store.load_run(run_id)
    written = export_run(run, out, fmt)
    if as_json:
        print_json({"run": run.id, "format": fmt, "files": [str(p) for p in written]})
    else:
        print(f"run {run.id} exported as {fmt}: " + ", ".join(str(p) for p in written))


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


# ---------------------------------------------------------------------------------------------
# Training from flags: `batchlab fit` (and the commands that train like it, e.g. `explain`).
# The TrainConfig fields are the flags; they are generated from the model so they cannot drift.

TRAIN_HELP = {
    "batch_size": "Samples per update, or 'full' for batch gradient descent.",
    "epochs": "Passes over the training set (default 10 when --max-steps is not given).",
    "max_steps": "Stop after this many updates.",
    "optimizer": "sgd, adam, adamw or rmsprop.",
    "lr": "Base learning rate (before --lr-scaling and the schedule).",
    "momentum": "SGD/RMSprop momentum.",
    "nesterov": "Nesterov momentum (SGD).",
    "weight_decay": "L2 weight decay (decoupled for adamw).",
    "betas": "Adam's beta1 beta2.",
    "schedule": "constant, step, cosine or sgdr (cosine with warm restarts).",
    "step_epochs": "step schedule: epochs between decays.",
    "gamma": "step schedule: decay factor.",
    "sgdr_epochs": "sgdr: length of the first cycle in epochs.",
    "sgdr_mult": "sgdr: cycle length multiplier after each restart.",
    "min_lr": "cosine/sgdr: the lowest learning rate.",
    "warmup_steps": "Linear warm-up over this many steps.",
    "warmup_epochs": "Linear warm-up over this many epochs.",
    "lr_scaling": "none, linear (lr*B/B_ref) or sqrt (lr*sqrt(B/B_ref)).",
    "reference_batch_size": "B_ref for --lr-scaling.",
    "shuffle": "Draw a fresh random order every epoch.",
    "drop_last": "Drop the last partial batch of each epoch.",
    "seed": "Seed of initialisation, data order and dropout.",
    "device": "cpu, cuda or auto.",
    "eval_every": "Full-pass evaluation every K steps, or 'epoch'.",
    "eval_batch_size": "Batch size of full-pass evaluation.",
    "eval_train": "Evaluate on the whole training set at each evaluation point.",
    "probe_every": "Probes measure every K steps.",
    "loss": "auto, cross_entropy or mse.",
}


def _train_options() -> list[click.Option]:
    from .config import TrainConfig

    options = []
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = TRAIN_HELP.get(name, "") + f" [default: {field.default}]"
        if field.annotation is bool:
            options.append(click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text))
        elif name == "betas":
            options.append(click.Option([flag, name], type=(float, float), default=None, help=help_text))
        else:
            # Values are validated (and converted) by TrainConfig itself, with one-line errors.
            options.append(click.Option([flag, name], type=str, default=None, metavar="VALUE", help=help_text))
    return options


RUN_OPTIONS = [
    click.Option(["--config", "config_file"], type=click.Path(path_type=Path), default=None,
                 help="A TOML run file ([dataset], [train], model, probes); flags override it."),
    click.Option(["--dataset"], default=None, help="Built-in dataset name or a .npz/.csv file (default mnist1d)."),
    click.Option(["--target"], default=None, help="Label column of a CSV dataset."),
    click.Option(["--val-fraction"], type=str, default=None, help="Hold out this fraction of train for validation."),
    click.Option(["--split-seed"], type=str, default=None, help="Seed of the validation split."),
    click.Option(["--standardize/--no-standardize"], default=None, help="Standardize with train statistics."),
    click.Option(["--model"], default=None, help="NAME[:opt=val,...] (e.g. mlp:hidden=100x100,dropout=0.1) or package.module:function."),
    click.Option(["--probes"], default=None, help="Comma-separated probes: grad_norm, noise_scale, dist_from_init, update_norm."),
    click.Option(["--name"], default=None, help="A name for the run in the store."),
    click.Option(["--threads"], type=int, default=1, show_default=True,
                 help="Torch CPU threads (1 is fastest for small models on a shared machine)."),
    click.Option(["--quiet", "-q"], is_flag=True, help="No progress bar or tables."),
    click.Option(["--store"], type=click.Path(path_type=Path), default=None,
                 help="Run store (SQLite). Default: $BATCHLAB_STORE or ./batchlab.db."),
    click.Option(["--json", "as_json"], is_flag=True, help="Print a machine-readable summary on stdout."),
]


def spec_from_options(options: dict[str, Any]):
    """A validated RunSpec from a --config file and the flags given (flags win)."""
    from .config import TrainConfig, make_run_spec, read_toml

    values: dict[str, Any] = read_toml(options["config_file"]) if options.get("config_file") else {}
    if not isinstance(values.get("train", {}), dict) or not isinstance(values.get("dataset", {}), dict):
        raise BatchlabError("in the config file, [train] and [dataset] must be tables")
    train = dict(values.get("train", {}))
    train.update({k: options[k] for k in TrainConfig.model_fields if options.get(k) is not None})
    dataset = dict(values.get("dataset", {}))
    for key in ("target", "val_fraction", "split_seed", "standardize"):
        if options.get(key) is not None:
            dataset[key] = options[key]
    if options.get("dataset") is not None:
        dataset["name"] = options["dataset"]
    values.update(train=train, dataset=dataset)
    if options.get("model") is not None:
        values["model"] = options["model"]
    if options.get("probes") is not None:
        values["probes"] = [p.strip() for p in options["probes"].split(",") if p.strip()]
    if options.get("name") is not None:
        values["name"] = options["name"]
    return make_run_spec(values)


def prepare_run(spec):
    """Load the data, build the model and validate the run — everything that can fail on bad input.

    Nothing touches the store before this returns.
    """
    from .data import load_dataset
    from .loop import check_model, plan_run, resolve_device
    from .models import model_from_spec
    from .probes import make_probe

    device = resolve_device(spec.train.device)
    d = spec.dataset
    dataset = load_dataset(d.name, target=d.target, val_fraction=d.val_fraction, split_seed=d.split_seed,
                           standardize=d.standardize, device=device)
    clock = plan_run(dataset, spec.train)
    model = model_from_spec(spec.model, dataset, seed=spec.train.seed)
    check_model(model.to(device), dataset)
    for probe in spec.probes:
        make_probe(probe)
    return dataset, model, clock


def _say(message: str, quiet: bool, as_json: bool) -> None:
    """Human-readable output: stdout normally, stderr when stdout carries JSON, nothing with --quiet."""
    if not quiet:
        click.echo(message, err=as_json)


def epoch_table(epochs, title: str = "epochs"):
    """The epoch table as a rich Table (the columns a person reads first)."""
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in epochs.columns if c in ("epoch", "step", "seconds") or c.endswith(("_loss", "_acc"))]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in epochs.to_dict("records"):
        table.add_row(*(_cell(row[c]) for c in columns))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else (f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}")
    return str(value)


def print_rich(renderable, as_json: bool) -> None:
    """Print a rich table; when the output is not a terminal, wide enough not to truncate columns."""
    from rich.console import Console

    stream = sys.stderr if as_json else sys.stdout
    Console(file=stream, width=None if stream.isatty() else 200).print(renderable)


def _fit_command(**options: Any) -> None:
    """Train one model and store the run."""
    import torch

    from .loop import fit
    from .store import recorder

    torch.set_num_threads(max(1, options["threads"]))
    quiet, as_json = options["quiet"], options["as_json"]
    spec = spec_from_options(options)
    dataset, model, clock = prepare_run(spec)
    store = store_path(options["store"])
    if not store.parent.exists():
        raise BatchlabError(f"the store's folder {store.parent} does not exist; create it or pass another --store")
    _say(f"{dataset.name}: {clock.describe()}", quiet, as_json)
    rec = recorder(store, name=spec.name, kind="fit", spec=spec.model_dump(mode="json", exclude={"train"}))
    run = fit(model, dataset, spec.train, probes=spec.probes, callbacks=[rec],
              progress=not quiet and sys.stderr.isatty())
    if not quiet:
        print_rich(epoch_table(run.epochs, title=f"run {rec.run_id}: {dataset.name}, {spec.model}"), as_json)
    _say(f"{run.status}: run {rec.run_id} stored in {store}" + (f" ({run.message})" if run.message else ""),
         quiet, as_json)
    if as_json:
        print_json({"run_id": rec.run_id, "store": str(store), **run.summary})
    if run.status == "diverged" and not as_json:
        click.echo(f"warning: {run.message}", err=True)


fit_command = click.Command(
    "fit",
    callback=_fit_command,
    params=[*RUN_OPTIONS, *_train_options()],
    help="Train one model by mini-batches, print the epoch table and store the run.",
)
EXTRA_COMMANDS: list[click.Command] = [fit_command]


@app.command()
def datasets(
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the built-in datasets, their sizes and where they come from."""
    from rich.table import Table

    from .data import list_datasets

    rows = list_datasets()
    if as_json:
        print_json(rows)
        return
    table = Table(title="built-in datasets (a .npz or .csv path works too)")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) for c in rows[0]))
    print_rich(table, False)


@app.command()
def report(
    ident: Annotated[str, typer.Argument(metavar="ID", help="A run id (3), or group:N / study:N for a group of runs.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="The HTML file to write. Default: beside the store, <store>-run-3.html.")] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a self-contained HTML report of a run, a group of replicas or a study."""
    from .report import build_report, default_report_path, parse_report_id, write_report
    from .store import RunStore

    parse_report_id(ident)  # a malformed id fails before the store is opened
    path = store_path(store)
    with RunStore(path, create=False) as run_store:
        page = build_report(run_store, ident)
    written = write_report(page, out or default_report_path(path, page))
    if as_json:
        print_json({"report": str(written)})
    else:
        print(f"report written to {written}")


# ---------------------------------------------------------------------------------------------
# `batchlab explain`: the epoch-boundary jump, shown and measured (see batchlab.explain).

# Without flags: a run that finishes in about a minute on a laptop CPU and shows a clear jump.
EXPLAIN_DEFAULTS = {"dataset": "mnist1d", "model": "mlp:hidden=256x256,dropout=0.3", "batch_size": "32",
                    "epochs": "6", "optimizer": "sgd", "lr": "0.05", "momentum": "0.9"}  # fmt: skip
_EXPLAIN_TRAINING_FLAGS = ("config_file", "dataset", "target", "val_fraction", "split_seed", "standardize", "model",
                           "probes", "name")  # fmt: skip


def _explain_command(**options: Any) -> None:
    """Train with dense evaluation (or read a stored run), then measure and draw the epoch-boundary jump."""
    import textwrap

    import torch

    from .explain import explain_run
    from .plots import save_figure
    from .plots.explain import explain_figure

    torch.set_num_threads(max(1, options["threads"]))
    quiet, as_json, metric = options["quiet"], options["as_json"], options["metric"]
    store = store_path(options["store"])
    if options["run_id"] is not None:
        run, run_id, what = _explain_stored(options, store)
    else:
        run, run_id, what = _explain_train(options, store, metric)
    explanation = explain_run(run, metric)
    base = Path(options["out"] or store.parent) / f"batchlab-explain-{run_id}"
    fig = explain_figure(run.steps, run.evals, explanation, title=f"Why the running mean jumps: run {run_id}, {what}")
    files = [str(p) for p in save_figure(fig, base)]
    if not quiet:
        print_rich(_boundary_table(explanation, f"run {run_id}: epoch boundaries ({metric})"), as_json)
    _say(textwrap.fill(explanation.paragraph, width=100), quiet, as_json)
    _say("figure: " + ", ".join(files), quiet, as_json)
    report = write_default_report(store, run_id)
    _say(f"report: {report}", quiet, as_json)
    if as_json:
        print_json({"run_id": run_id, "store": str(store), "figures": files, "report": str(report),
                    **explanation.to_dict()})


def write_default_report(store: Path, ident: str | int) -> Path:
    """Write the HTML report of a stored run or group beside the store; return its path."""
    from .report import build_report, default_report_path, write_report
    from .store import RunStore

    with RunStore(store, create=False) as run_store:
        page = build_report(run_store, ident)
    return write_report(page, default_report_path(store, page))


def _explain_stored(options: dict[str, Any], store: Path):
    """The stored run of --run, after checking no training flag was given with it."""
    from .config import TrainConfig
    from .errors import ConfigError
    from .store import RunStore

    given = [k for k in (*_EXPLAIN_TRAINING_FLAGS, *TrainConfig.model_fields) if options.get(k) is not None]
    if given:
        flag = "--config" if given[0] == "config_file" else "--" + given[0].replace("_", "-")
        raise ConfigError(f"--run explains a stored run and takes no training flags (got {flag}); leave them out")
    with RunStore(store, create=False) as run_store:
        run = run_store.load_run(options["run_id"])
    spec = run.spec or {}
    dataset = spec.get("dataset", "?")
    dataset = dataset.get("name", "?") if isinstance(dataset, dict) else dataset
    what = f"{dataset}, {spec.get('model', '?')}, B={run.config.get('batch_size')}"
    return run, run.id, what


def _explain_train(options: dict[str, Any], store: Path, metric: str):
    """Train as `fit` does, with dense evaluation and the train-mode pass; store it as kind "explain"."""
    from .errors import ConfigError
    from .explain import TrainModePass, explain_config
    from .loop import fit
    from .store import recorder

    if not options.get("config_file"):
        for key, value in EXPLAIN_DEFAULTS.items():
            if options.get(key) is None:
                options[key] = value
    spec = spec_from_options(options)
    dataset, model, clock = prepare_run(spec)
    if metric == "acc" and dataset.n_classes is None:
        raise ConfigError(f"{dataset.name} is a regression task and has no accuracy; use --metric loss")
    config = explain_config(spec.train, dataset.n_train)
    spec = spec.model_copy(update={"train": config})
    if not store.parent.exists():
        raise BatchlabError(f"the store's folder {store.parent} does not exist; create it or pass another --store")
    quiet, as_json = options["quiet"], options["as_json"]
    _say(f"{dataset.name}: {clock.describe()}; full-pass evaluation every {config.eval_every} steps", quiet, as_json)
    rec = recorder(store, name=spec.name, kind="explain", spec=spec.model_dump(mode="json", exclude={"train"}))
    run = fit(model, dataset, config, probes=spec.probes, callbacks=[TrainModePass(dataset, config), rec],
              progress=not quiet and sys.stderr.isatty())
    _say(f"{run.status}: run {rec.run_id} stored in {store}" + (f" ({run.message})" if run.message else ""),
         quiet, as_json)
    return run, rec.run_id, f"{spec.dataset.name}, {spec.model}, B={clock.batch_size}"


def _boundary_table(explanation, title: str):
    """The numbers of each boundary for the explained metric, as a rich Table."""
    from rich.table import Table

    columns = {"epoch": "epoch", "step": "step", "running_end": "running\nat end", "running_start": "running\nnext",
               "running_jump": "jump", "true_change": "true\nchange", "typical_change": "typical\nper step",
               "lag": "lag", "true_epoch_mean": "true\nepoch mean", "train_mode_part": "train-mode\npart",
               "averaging_part": "averaging\npart", "remainder_part": "rest", "batch_noise": "batch\nnoise"}  # fmt: skip
    table = Table(title=title)
    for header in columns.values():
        table.add_column(header, justify="right", no_wrap=True)
    for row in explanation.table().to_dict("records"):
        table.add_row(*(_cell(row[c]) for c in columns))
    return table


explain_command = click.Command(
    "explain",
    callback=_explain_command,
    params=[
        *RUN_OPTIONS,
        click.Option(["--run", "run_id"], type=int, default=None,
                     help="Explain this stored run instead of training (see `batchlab runs list`)."),
        click.Option(["--out"], type=click.Path(path_type=Path), default=None,
                     help="Folder for the figure (PNG and SVG). Default: the store's folder."),
        click.Option(["--metric"], type=click.Choice(["acc", "loss"]), default="acc", show_default=True,
                     help="The metric the paragraph explains (the numbers cover both)."),
        *_train_options(),
    ],
    help="Show why the training metric jumps at epoch boundaries: train with dense evaluation (or read "
         "--run ID), print the numbers per boundary and a paragraph, and draw the figure. Without flags: "
         "mnist1d, mlp:hidden=256x256,dropout=0.3, batch 32, SGD lr 0.05 momentum 0.9, 6 epochs.",
)  # fmt: skip
EXTRA_COMMANDS.append(explain_command)


# ---------------------------------------------------------------------------------------------
# `batchlab gradnorm` and `batchlab distance`: the experiments of batchlab.gradnorm (Shen 2018).


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BatchlabError(f"{flag} {text!r} must be whole numbers separated by commas, e.g. 2,30") from None


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BatchlabError(f"{flag} {text!r} must be numbers separated by commas, e.g. 0.01,0.1") from None


def _experiment_setup(dataset_name: str, model_spec: str, seed: int, threads: int):
    """Load the data and check the model spec before anything touches the store."""
    import torch

    from .data import load_dataset
    from .models import model_from_spec

    torch.set_num_threads(max(1, threads))
    dataset = load_dataset(dataset_name)
    model_from_spec(model_spec, dataset, seed=seed)  # fails here, on bad input, not later
    return dataset, (lambda: model_from_spec(model_spec, dataset, seed=seed))


def _out_dir(out: Optional[Path], store: Path, kind: str, group_id: int) -> Path:
    """--out, or ``<store stem>-<kind>-<group>/`` beside the store."""
    return out if out is not None else store.with_name(f"{store.stem}-{kind}-{group_id}")


def _numbers_table(frame, columns: dict[str, str], title: str):
    from rich.table import Table

    table = Table(title=title)
    for header in columns.values():
        table.add_column(header, justify="right", no_wrap=True)
    for row in frame.to_dict("records"):
        table.add_row(*(_cell(row[c]) for c in columns))
    return table


@app.command()
def gradnorm(
    dataset: Annotated[str, typer.Option("--dataset", help="Built-in dataset or a .npz/.csv file.")] = "mnist1d",
    model: Annotated[str, typer.Option("--model", help="Model spec, e.g. mlp or mlp:hidden=100x100.")] = "mlp",
    at: Annotated[str, typer.Option("--at", help="Epochs after which to measure (0: the initial weights).")] = "2,30",
    batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", help="Batch sizes to measure. Default: 1,2,4,...,1024.")] = None,
    trials: Annotated[int, typer.Option("--trials", help="Random batches per batch size.")] = 1000,
    train_batch_size: Annotated[int, typer.Option("--train-batch-size", help="Batch size used for training.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", help="Optimizer used for training.")] = "sgd",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate used for training.")] = 0.05,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum used for training.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights, the data order and the trials.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the table (CSV) and figures. Default: beside the store.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")] = 2,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Gradient norm vs batch size over many random batches at chosen points of training (Shen 2018).

    Trains the model, and after each epoch in --at measures ‖g_B‖ for the batch's mean loss and
    its summed loss over --trials random batches per batch size, with the theory
    E‖g_B‖² = ‖G‖² + tr(Σ)/B from exact per-sample gradients. Stores the training run and the
    table in a group of the store; writes the table and the figures (PNG and SVG).
    """
    from .config import make_train_config
    from .gradnorm import check_batch_sizes, default_batch_sizes, gradnorm_experiment
    from .plots import save_figure
    from .plots.gradnorm import gradnorm_figure, loss_conventions_figure
    from .store import RunStore, recorder

    points = _int_list(at, "--at")
    data, make_model = _experiment_setup(dataset, model, seed, threads)
    sizes = check_batch_sizes(_int_list(batch_sizes, "--batch-sizes") if batch_sizes else default_batch_sizes(data.n_train), data.n_train)
    if trials < 2:
        raise BatchlabError(f"--trials {trials} must be at least 2 to give a standard deviation")
    config = make_train_config({"batch_size": train_batch_size, "optimizer": optimizer, "lr": lr, "momentum": momentum,
                                "seed": seed, "epochs": max(max(points, default=1), 1)})  # fmt: skip
    path = store_path(store)
    settings = {"dataset": dataset, "model": model, "at": points, "batch_sizes": sizes, "trials": trials,
                "train": config.model_dump(mode="json")}  # fmt: skip
    with RunStore(path) as run_store:
        group = run_store.create_group("gradnorm", f"gradnorm {dataset} {model}", settings)
        rec = recorder(run_store, name=f"gradnorm training {model}", kind="gradnorm-training", group_id=group,
                       spec={"dataset": dataset, "model": model})  # fmt: skip
        try:
            result = gradnorm_experiment(make_model(), data, config, at_epochs=points, batch_sizes=sizes, trials=trials,
                                         seed=seed, callbacks=[rec] if max(points) > 0 else [], progress=sys.stderr.isatty())  # fmt: skip
        except BaseException:
            run_store.finish_group(group, "interrupted")
            raise
        stats = {p: {"grad_sq": s.grad_sq, "trace_cov": s.trace_cov, "noise_scale": s.noise_scale, "n": s.n}
                 for p, s in result.stats.items()}  # fmt: skip
        run_store.finish_group(group, summary={"stats": stats, "table": result.table.to_dict("records")})
    folder = _out_dir(out, path, "gradnorm", group)
    folder.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(folder / "gradnorm.csv", index=False)
    figures = [*save_figure(gradnorm_figure(result.table), folder / "gradnorm"),
               *save_figure(loss_conventions_figure(result.table), folder / "gradnorm_conventions")]
    if as_json:
        print_json({"group_id": group, "store": str(path), "stats": stats, "table": result.table.to_dict("records"),
                    "files": [str(f) for f in [folder / "gradnorm.csv", *figures]]})  # fmt: skip
        return
    columns = {"point": "point", "batch_size": "B", "grad_norm_mean": "mean ‖g_B‖", "grad_norm_std": "std",
               "grad_norm_se": "s.e.", "sq_norm_mean": "mean ‖g_B‖²", "theory_sq_norm": "theory ‖g_B‖²",
               "sum_norm_mean": "mean ‖B·g_B‖", "sum_norm_std": "std "}  # fmt: skip
    print_rich(_numbers_table(result.table, columns, f"gradient norms, {trials} random batches per size (group {group})"), False)
    for point, s in result.stats.items():
        print(f"{point}: ‖G‖² = {s.grad_sq:.4g}, tr(Σ) = {s.trace_cov:.4g}, B_simple = tr(Σ)/‖G‖² = {s.noise_scale:.4g}")
    print(f"stored as group {group} in {path}")
    for file in [folder / "gradnorm.csv", *figures]:
        print(f"wrote {file}")


@app.command()
def distance(
    dataset: Annotated[str, typer.Option("--dataset", help="Built-in dataset or a .npz/.csv file.")] = "mnist1d",
    model: Annotated[str, typer.Option("--model", help="Model spec, e.g. mlp or mlp:hidden=100x100.")] = "mlp",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes to train with.")] = "16,64,256,1024",
    lrs: Annotated[str, typer.Option("--lrs", help="Learning rates to train with.")] = "0.01,0.1",
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per run (the same samples seen for every run).")] = 20,
    optimizer: Annotated[str, typer.Option("--optimizer", help="Optimizer.")] = "sgd",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial weights (shared by all runs) and data order.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the tables (CSV) and figure. Default: beside the store.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")] = 2,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Distance from the initial weights ‖θ_t − θ_0‖ for batch sizes × learning rates (Shen 2018).

    Every run starts from the same weights and sees the same number of samples; the figure shows
    the distance over training and at the end. Runs are stored as one group.
    """
    from .config import make_train_config
    from .gradnorm import check_batch_sizes, distance_experiment
    from .plots import save_figure
    from .plots.gradnorm import distance_figure
    from .store import RunStore, recorder

    data, make_model = _experiment_setup(dataset, model, seed, threads)
    sizes = check_batch_sizes(_int_list(batch_sizes, "--batch-sizes"), data.n_train)
    rates = _float_list(lrs, "--lrs")
    config = make_train_config({"epochs": epochs, "optimizer": optimizer, "seed": seed, "lr": max(rates, default=0.01)})
    path = store_path(store)
    settings = {"dataset": dataset, "model": model, "batch_sizes": sizes, "lrs": rates, "train": config.model_dump(mode="json")}
    with RunStore(path) as run_store:
        group = run_store.create_group("distance", f"distance {dataset} {model}", settings)

        def callbacks_for(size: int, lr: float):
            return [recorder(run_store, name=f"distance B={size} lr={lr:g}", kind="distance", group_id=group,
                             spec={"dataset": dataset, "model": model, "probes": ["dist_from_init"]})]  # fmt: skip

        try:
            result = distance_experiment(make_model, data, config, batch_sizes=sizes, lrs=rates,
                                         callbacks_for=callbacks_for, progress=sys.stderr.isatty())  # fmt: skip
        except BaseException:
            run_store.finish_group(group, "interrupted")
            raise
        run_store.finish_group(group, summary={"final": result.final.to_dict("records")})
    folder = _out_dir(out, path, "distance", group)
    folder.mkdir(parents=True, exist_ok=True)
    result.curves.to_csv(folder / "distance_curves.csv", index=False)
    result.final.to_csv(folder / "distance_final.csv", index=False)
    files = [folder / "distance_curves.csv", folder / "distance_final.csv",
             *save_figure(distance_figure(result.curves, result.final), folder / "distance")]
    if as_json:
        print_json({"group_id": group, "store": str(path), "final": result.final.to_dict("records"),
                    "files": [str(f) for f in files]})  # fmt: skip
        return
    columns = {"batch_size": "B", "lr": "lr", "steps": "steps", "samples_seen": "samples seen",
               "dist_from_init": "‖θ − θ₀‖", "final_train_loss": "train loss", "final_val_acc": "val acc"}
    columns = {k: v for k, v in columns.items() if k in result.final}
    print_rich(_numbers_table(result.final, columns, f"distance from the initial weights (group {group})"), False)
    print(f"stored as group {group} in {path}")
    for file in files:
        print(f"wrote {file}")


# ---------------------------------------------------------------------------------------------
# The batch-size study: `batchlab study`.

STUDY_FLAGS = {  # StudyConfig field -> (flag, help)
    "batch_sizes": ("--batch-sizes", "Comma-separated batch sizes, 'full' for B=N (default: powers of two up to N, and full)."),
    "lrs": ("--lrs", "'auto' (a grid around --lr-rule, extended at its edge) or comma-separated learning rates."),
    "lr_rule": ("--lr-rule", "How the auto grid's centre moves with B: sqrt, linear or none."),
    "reference_lr": ("--reference-lr", "The auto grid's lr at --reference-batch-size."),
    "reference_batch_size": ("--reference-batch-size", "B at which --reference-lr applies."),
    "lr_grid_size": ("--lr-grid-size", "Learning rates per batch size in the auto grid."),
    "lr_grid_factor": ("--lr-grid-factor", "Ratio of neighbouring learning rates in the auto grid."),
    "lr_extensions": ("--lr-extensions", "Times a batch size's auto grid may be extended."),
    "seeds": ("--seeds", "Number of seeds, or comma-separated seeds."),
    "target": ("--target", "The finish line, e.g. val_acc>=0.8 or train_loss<=0.05."),
    "epochs": ("--epochs", "Budget of every trial in epochs."),
    "max_steps": ("--max-steps", "Budget of every trial in steps (whichever ends first)."),
    "resolution": ("--resolution", "Steps-to-target is resolved to this fraction of itself."),
}  # fmt: skip


def _study_options() -> list[click.Option]:
    from .config import STUDY_OWNED_TRAIN_FIELDS

    options = [
        click.Option(["--config", "config_file"], type=click.Path(path_type=Path), default=None,
                     help="A TOML study file (StudyConfig keys, tables [dataset] and [train]); flags override it."),
        click.Option(["--preset"], default=None, help="blobs-batch-size (Brownlee 2020) or mnist1d."),
        click.Option(["--dataset"], default=None, help="Built-in dataset name or a .npz/.csv file (default blobs)."),
        click.Option(["--model"], default=None, help="NAME[:opt=val,...], e.g. mlp:hidden=50,init=keras."),
        click.Option(["--name"], default=None, help="A name for the study in the store."),
        *(click.Option([flag, field], type=str, default=None, metavar="VALUE", help=text)
          for field, (flag, text) in STUDY_FLAGS.items()),
        click.Option(["--stop-at-target/--no-stop-at-target"], default=None,
                     help="End each trial at its target (default) or train the whole budget."),
        click.Option(["--noise-scale/--no-noise-scale"], default=None, help="Measure the gradient noise scale."),
        click.Option(["--replicas/--no-replicas"], default=True, show_default=True,
                     help="Train each group as vectorized replicas (else one fit after another)."),
        click.Option(["--executor"], default="in-process", show_default=True, help="in-process or ray."),
        click.Option(["--out"], type=click.Path(path_type=Path), default=None,
                     help="Folder for figures and the report (default: beside the store)."),
        click.Option(["--threads"], type=int, default=1, show_default=True, help="Torch CPU threads."),
        click.Option(["--quiet", "-q"], is_flag=True, help="No progress display or tables."),
        click.Option(["--store"], type=click.Path(path_type=Path), default=None,
                     help="Run store (SQLite). Default: $BATCHLAB_STORE or ./batchlab.db."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the summary and recommendation as JSON."),
    ]
    # The training flags of `batchlab fit`, but for what the study decides (batch size, lr, seed, budget).
    owned = {*STUDY_OWNED_TRAIN_FIELDS, "reference_batch_size"}
    options += [o for o in _train_options() if o.name not in owned]
    return options


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def study_config_from_options(options: dict[str, Any]):
    """A validated StudyConfig from --preset, then --config, then the flags (each overriding the last)."""
    from .config import STUDY_OWNED_TRAIN_FIELDS, TrainConfig, make_study_config, read_toml
    from .study import preset_values

    values: dict[str, Any] = preset_values(options["preset"]) if options.get("preset") else {}
    if options.get("config_file"):
        from_file = read_toml(options["config_file"])
        train = {**values.get("train", {}), **from_file.get("train", {})}
        values.update(from_file)
        values["train"] = train
    train = dict(values.get("train", {}))
    owned = {*STUDY_OWNED_TRAIN_FIELDS, "reference_batch_size"}
    train.update({k: options[k] for k in TrainConfig.model_fields if k not in owned and options.get(k) is not None})
    values["train"] = train
    for key in ("dataset", "model", "name", "stop_at_target", "noise_scale"):
        if options.get(key) is not None:
            values[key] = options[key]
    for field in STUDY_FLAGS:
        text = options.get(field)
        if text is None:
            continue
        if field == "batch_sizes":
            values[field] = _split_list(text)
        elif field == "lrs":
            values[field] = text if text.strip() == "auto" else _study_numbers(field, _split_list(text))
        elif field == "seeds":
            values[field] = text if "," not in text else _study_numbers(field, _split_list(text), int)
        elif field in ("epochs", "max_steps") and text.strip().lower() in ("none", ""):
            values[field] = None
        else:
            values[field] = text
    return make_study_config(values)


def _study_numbers(field: str, items: list[str], kind=float) -> list:
    from .errors import ConfigError

    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ConfigError(f"--{field.replace('_', '-')} takes comma-separated numbers, got {','.join(items)!r}") from None


class _StudyDisplay:
    """A rich progress bar over the study's groups: done / known so far, elapsed, ETA."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("study groups"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                                 console=Console(stderr=True), transient=True)
        self.task = None

    def __call__(self, update) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("groups", total=update.groups_known, last="")
        group = update.group
        last = f"last: {group.kind} B={group.batch_size} ({len(group.lrs)} lr × {len(group.seeds)} seeds)" if group else ""
        self.progress.update(self.task, completed=update.groups_done, total=update.groups_known, last=last)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


STUDY_COLUMNS = {"batch_size": "B", "best_lr": "best lr", "reached": "reached", "steps_to_target": "steps",
                 "epochs_to_target": "epochs", "samples_to_target": "samples", "seconds_to_target": "seconds",
                 "gen_gap": "gen gap", "noise_scale": "B_simple", "regime": "regime"}  # fmt: skip


def _study_table(summary, title: str):
    from rich.table import Table

    table = Table(title=title)
    columns = {k: v for k, v in STUDY_COLUMNS.items() if k in summary}
    for header in columns.values():
        table.add_column(header, justify="left" if header == "regime" else "right", no_wrap=True)
    for row in summary.to_dict("records"):
        table.add_row(*(_study_cell(c, row[c]) for c in columns))
    return table


def _study_cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if column in ("steps_to_target", "samples_to_target"):
            return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value)


def _study_command(**options: Any) -> None:
    """Run (or resume) a batch-size study, print its summary and recommendation, write its figures."""
    import torch

    from .executors import make_executor
    from .study import brownlee_comparison, run_study, write_study_outputs

    torch.set_num_threads(max(1, options["threads"]))
    quiet, as_json = options["quiet"], options["as_json"]
    config = study_config_from_options(options)
    executor = make_executor(options["executor"])
    store = store_path(options["store"])
    if not store.parent.exists():
        raise BatchlabError(f"the store's folder {store.parent} does not exist; create it or pass another --store")
    display = _StudyDisplay() if not quiet and sys.stderr.isatty() else None
    try:
        study = run_study(config, store=store, executor=executor, vectorized=options["replicas"], on_progress=display)
    finally:
        if display is not None:
            display.close()
    folder = options["out"] or store.with_name(f"{store.stem}-study-{study.group_id}")
    files = write_study_outputs(study, folder)
    comparison = brownlee_comparison(study) if options.get("preset") == "blobs-batch-size" else None
    if as_json:
        out = study.to_dict()
        if comparison is not None:
            out["brownlee"] = comparison.to_dict(orient="records")
        print_json({**out, "files": [str(f) for f in files]})
        return
    if not quiet:
        title = (f"study {study.group_id}: {study.plan.dataset_name}, {config.model}, target {study.plan.target} "
                 f"({len(study.trials)} trials; {study.groups_run} groups run, {study.groups_resumed} resumed)")
        print_rich(_study_table(study.summary, title), False)
        if comparison is not None:
            print_rich(_brownlee_table(comparison), False)
    print(f"recommendation: {study.recommendation.text}")
    fit = study.fit
    if fit.ok:
        print(f"fit S = S_min(1 + B_crit/B): S_min = {fit.s_min:.4g} ± {fit.s_min_err:.2g} steps, "
              f"B_crit = {fit.b_crit:.4g} ± {fit.b_crit_err:.2g}, E_min = {fit.e_min:.4g} samples")
    elif fit.message:
        print(f"fit: {fit.message}")
    print(f"stored as group {study.group_id} in {store}")
    if not quiet:
        for file in files:
            print(f"wrote {file}")


def _brownlee_table(comparison):
    from rich.table import Table

    table = Table(title="final accuracy after 200 epochs: ours (median over seeds) vs Brownlee 2020")
    for header in ("B", "train acc", "val acc", "Brownlee train", "Brownlee test"):
        table.add_column(header, justify="right")
    for row in comparison.to_dict("records"):
        table.add_row(str(row["batch_size"]), f"{row['train_acc']:.3f}", f"{row['val_acc']:.3f}",
                      f"{row['brownlee_train_acc']:.3f}", f"{row['brownlee_test_acc']:.3f}")
    return table


study_command = click.Command(
    "study",
    callback=_study_command,
    params=_study_options(),
    help="The batch-size study: steps to a target across batch sizes with the lr tuned per batch size, "
         "the critical batch size, and a recommendation. Resumable: rerun the same command to continue.",
)
EXTRA_COMMANDS.append(study_command)
