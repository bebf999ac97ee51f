"""Training from flags: `batchlab fit` and `batchlab datasets`.

The TrainConfig fields are the flags, generated from the model with its defaults, so neither the
names nor the defaults can drift from the Python API."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, Iterable

import click
from click.core import ParameterSource

from .app import (FiniteFloat, allow_import_option, cell, check_out_folder, check_store_folder, cli, json_option,
                  print_json, print_rich, quiet_option, say, show_progress, shown, store_option, store_path, threads_option,
                  whole)  # fmt: skip


TRAIN_HELP = {  # TrainConfig field -> help text
    "batch_size": "Samples per update, 'full' for batch gradient descent, or a schedule by samples seen: "
                  "32,20000:64 (B 32, then 64 from 20000 samples on; the lr follows --lr-scaling).",
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
    "compile": "Run each update as one compiled graph: on, off, or auto (when the run repays the compile time).",
}


def train_options(base: Any = None, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[click.Option]:
    """One flag per TrainConfig field, typed from the model, its default shown from ``base``.

    Args:
        base: the TrainConfig whose values are the defaults shown (default: ``TrainConfig()``); a
            command that trains differently by design (explain's demonstration run) passes its own.
        only: the fields to make flags of (default: all).
        exclude: fields left out (those the command decides itself).

    Returns:
        click Options whose names are the field names.
    """
    from ..config import TrainConfig

    base = base if base is not None else TrainConfig()
    options = []
    for name, field in TrainConfig.model_fields.items():
        if (only is not None and name not in only) or name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(base, name)
        if name == "epochs" and base.max_steps is None and "epochs" not in base.model_fields_set:
            default = None  # "10 when --max-steps is not given", as the help says
        options.append(field_option(name, flag, field.annotation, default, TRAIN_HELP.get(name, "")))
    return options


def field_option(name: str, flag: str, annotation: Any, default: Any, help_text: str) -> click.Option:
    """A click Option for one config field: a flag pair for bools, choices for literals, checked numbers.

    Fields of other types (unions such as "a number or 'full'") are text, converted and validated by
    the config model itself with one-line errors; `TEXT_METAVARS` says what they hold.
    """
    if annotation is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=default, help=help_text)
    kwargs: dict[str, Any] = {"default": default, "help": help_text}
    args = typing.get_args(annotation)
    if annotation is int or set(args) == {int, type(None)}:
        kwargs["type"] = whole(0, optional=type(None) in args)
    elif annotation is float:
        kwargs["type"] = FiniteFloat()
    elif typing.get_origin(annotation) is typing.Literal:
        kwargs["type"] = click.Choice(args)
    elif name == "betas":
        kwargs["type"] = (FiniteFloat(), FiniteFloat())
    else:
        kwargs["type"] = str
        kwargs["metavar"] = TEXT_METAVARS.get(name, "TEXT")
        kwargs["default"] = default if default is None or isinstance(default, str) else str(default)
    return click.Option([flag, name], **kwargs)


# What a text flag holds; the corpus of bad inputs (tests/test_cli_corpus.py) reads numbers into those
# that hold numbers. INTS: comma-separated whole numbers; NUMBERS: comma-separated numbers.
TEXT_METAVARS = {"batch_size": "B|full|B,SAMPLES:B", "eval_every": "K|epoch", "batch_sizes": "INTS|full",
                 "lrs": "auto|NUMBERS", "seeds": "N|INTS", "target": "METRIC>=VALUE"}  # fmt: skip


def given(ctx: click.Context) -> dict[str, Any]:
    """The options given on the command line (or by environment), not those left at their default."""
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name: value for name, value in ctx.params.items() if ctx.get_parameter_source(name) in sources}


def run_options() -> list[click.Option]:
    """The flags of a run besides its TrainConfig: data, model, probes, name, and the shared ones."""
    from ..config import DatasetSpec, RunSpec

    spec, data = RunSpec(), DatasetSpec()
    return [
        click.Option(["--config", "config_file"], type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="A TOML run file ([dataset], [train], model, probes); flags given override it."),
        click.Option(["--dataset"], default=spec.dataset.name, help="Built-in dataset name or a .npz/.csv file."),
        click.Option(["--target"], default=None, help="Label column of a CSV dataset."),
        click.Option(["--val-fraction"], type=FiniteFloat(), default=None,
                     help="Hold out this fraction of train for validation (default: the dataset's own split)."),
        click.Option(["--split-seed"], type=whole(0), default=data.split_seed, help="Seed of the validation split."),
        click.Option(["--standardize/--no-standardize"], default=data.standardize,
                     help="Standardize with train statistics."),
        click.Option(["--model"], default=spec.model,
                     help="NAME[:opt=val,...] (e.g. mlp:hidden=100x100,dropout=0.1), or package.module:function "
                          "with --allow-import."),
        allow_import_option(),
        click.Option(["--probes"], default=None,
                     help="Comma-separated probes: grad_norm, noise_scale, dist_from_init, update_norm."),
        click.Option(["--name"], default=None, help="A name for the run in the store."),
        threads_option(),
        quiet_option(),
        store_option(),
        json_option(),
    ]  # fmt: skip


def rank_batches(batch_size, world_size: int, backend: str) -> str:
    """The accounting line's note under data parallelism: the line counts global batches, and
    ``--batch-size`` is per rank (``; global batch = 25 per rank × 2 ranks (gloo)``)."""
    from ..config import format_schedule, is_schedule

    if batch_size == "full":
        return f"; the full batch split over {world_size} ranks ({backend})"
    kind = "batches" if is_schedule(batch_size) else "batch"
    return f"; global {kind} = {format_schedule(batch_size)} per rank × {world_size} ranks ({backend})"


def spec_from_options(options: dict[str, Any], defaults: dict[str, Any] | None = None):
    """A validated RunSpec from a --config file, or ``defaults``, and the flags given (flags win),
    read by `batchlab.config.load_run_spec` as the Python API reads a file.

    Args:
        options: the flags given on the command line (see `given`), by field name.
        defaults: flags used when no --config file is given (a command's own defaults).
    """
    from ..config import load_run_spec

    return load_run_spec(options.get("config_file"), overrides=run_values(options),
                         defaults=run_values(defaults or {}), allow_import=bool(options.get("allow_import")),
                         source=IMPORT_SOURCE)


DATASET_FLAGS = ("target", "val_fraction", "split_seed", "standardize")  # --dataset is the table's name


def run_values(options: dict[str, Any]) -> dict[str, Any]:
    """Flags as a run file's values: TrainConfig's into ``train``, the data's into ``dataset``,
    ``--probes`` split at commas; flags left out (None) are left out.

    Args:
        options: flags by field name (``{"lr": 0.1, "dataset": "moons", "probes": "grad_norm"}``).

    Returns:
        Values in `RunSpec`'s shape (``{"train": {"lr": 0.1}, "dataset": {"name": "moons"}, ...}``).
    """
    from ..config import TrainConfig

    options = {key: value for key, value in options.items() if value is not None}
    dataset = {key: options[key] for key in DATASET_FLAGS if key in options}
    if "dataset" in options:
        dataset["name"] = options["dataset"]
    values: dict[str, Any] = {"train": {k: options[k] for k in TrainConfig.model_fields if k in options},
                              "dataset": dataset}
    values.update({key: options[key] for key in ("model", "name") if key in options})
    if "probes" in options:
        values["probes"] = [p.strip() for p in options["probes"].split(",") if p.strip()]
    return values


def prepare_run(spec, allow_import: bool = False):
    """Load the data, build the model and validate the run — everything that can fail on bad input.

    Nothing touches the store before this returns. The model import was allowed or refused when the
    spec was read (`spec_from_options`).
    """
    from ..data import load_dataset
    from ..loop import check_model, plan_batch_norm, plan_run, resolve_device
    from ..models import model_from_spec
    from ..probes import make_probe

    device = resolve_device(spec.train.device)
    d = spec.dataset
    dataset = load_dataset(d.name, target=d.target, val_fraction=d.val_fraction, split_seed=d.split_seed,
                           standardize=d.standardize, device=device)
    plan_run(dataset, spec.train)  # a run that cannot be planned is refused before the model is built
    model = model_from_spec(spec.model, dataset, seed=spec.train.seed, allow_import=allow_import)
    check_model(model.to(device), dataset)
    train, _ = plan_batch_norm(model, dataset.n_train, spec.train)  # a batch of one with batch norm fails here
    for probe in spec.probes:
        make_probe(probe)
    return dataset, model, plan_run(dataset, train)


def epoch_table(epochs, title: str = "epochs"):
    """The epoch table as a rich Table (the columns a person reads first)."""
    from rich.table import Table

    table = Table(title=shown(title))
    columns = [c for c in epochs.columns if c in ("epoch", "step", "seconds") or c.endswith(("_loss", "_acc"))]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in epochs.to_dict("records"):
        table.add_row(*(cell(row[c]) for c in columns))
    return table


def _fit_command(**options: Any) -> None:
    """Train one model and store the run (data-parallel under torchrun, or launched with --nproc)."""
    import torch

    from .. import distributed
    from ..errors import BatchlabError
    from ..loop import fit, plan_batch_norm
    from ..store import recorder

    if options["nproc"] is not None and not distributed.launched():
        _launch_ranks(options)
    torch.set_num_threads(options["threads"])
    quiet, as_json = options["quiet"], options["as_json"]
    spec = spec_from_options(given(click.get_current_context()))
    dataset, model, clock = prepare_run(spec, options["allow_import"])
    ranks = distributed.start(spec.train.device) if distributed.launched() else None
    world_size = ranks.world_size if ranks is not None else 1
    train, batch_norm_note = plan_batch_norm(model, dataset.n_train, spec.train, world_size)
    if ranks is not None:  # only rank 0 prints and records
        clock = distributed.plan_global(dataset, train, world_size)[1]
        quiet, as_json = quiet or not ranks.is_main, as_json and ranks.is_main
    store = store_path(options["store"])
    check_store_folder(store)
    check_out_folder(options["tensorboard"], "--tensorboard")
    ranks_note = rank_batches(spec.train.batch_size, ranks.world_size, ranks.backend) if ranks is not None else ""
    say(f"{dataset.name}: {clock.describe()}{ranks_note}" + (f"; {batch_norm_note}" if batch_norm_note else ""),
        quiet, as_json)
    rec = recorder(store, name=spec.name, kind="fit", spec=spec.model_dump(mode="json", exclude={"train"}))
    callbacks = [rec] if ranks is None or ranks.is_main else []
    if options["tensorboard"] is not None and callbacks:  # live TensorBoard files in DIR/run-<id>/
        from ..store import TensorBoard

        callbacks.append(TensorBoard(options["tensorboard"], run_name=lambda: f"run-{rec.run_id}", spec=rec.spec))
    try:
        run = (distributed.fit if ranks is not None else fit)(
            model, dataset, train, probes=spec.probes, callbacks=callbacks,
            progress=show_progress(quiet))
    except (BatchlabError, KeyboardInterrupt) as error:
        if ranks is not None and not ranks.is_main:  # rank 0 says it, once for all ranks
            raise SystemExit(130 if isinstance(error, KeyboardInterrupt) else 2) from None
        raise
    finally:
        distributed.stop()
    if not quiet:
        print_rich(epoch_table(run.epochs, title=f"run {rec.run_id}: {dataset.name}, {spec.model}"), as_json)
    say(f"{run.status}: run {rec.run_id} stored in {store}" + (f" ({run.message})" if run.message else ""),
        quiet, as_json)
    figure = _adaptive_outputs(run, train, store.parent / f"batchlab-adaptive-{rec.run_id}.png",
                               f"run {rec.run_id}: {dataset.name}, {spec.model}", quiet, as_json)
    if as_json:
        print_json({"run_id": rec.run_id, "store": str(store), **run.summary,
                    **({"figure": str(figure)} if figure is not None else {})})
    if run.status == "diverged" and not as_json:
        say(f"warning: {run.message}", as_json=True)


def _adaptive_outputs(run, train, path: Path, title: str, quiet: bool, as_json: bool) -> Path | None:
    """For a run whose batch adapted: one line with the batches it went through and where, and its
    figure (the batch in force, each decision's evidence, the lr) beside the store. None otherwise."""
    from ..config import Adaptive
    from ..events import describe_changes

    if not isinstance(train.batch_size, Adaptive) or "adaptive_signal" not in run.evals:
        return None
    from ..plots.adaptive import adaptive_figure

    changes = run.clock.changes or ((0, run.clock.batch_size),)
    path.parent.mkdir(parents=True, exist_ok=True)
    adaptive_figure(run.steps, run.evals, signal=train.batch_size.signal, title=title).savefig(path, dpi=150)
    start = ((0, train.batch_size.start),)  # from the start batch, a decision at step 0 included
    say(f"{describe_changes(start + tuple(c for c in changes if c != start[0]), run.clock.n_train)}; figure: {path}",
        quiet, as_json)
    return path


def _launch_ranks(options: dict[str, Any]) -> None:
    """`fit --nproc N`: check the input once, then run the same command in N ranks (torchrun) and exit."""
    from .. import distributed
    from ..loop import plan_batch_norm

    nproc = options["nproc"]
    spec = spec_from_options(given(click.get_current_context()))
    distributed.check_nproc(nproc, spec.train.device)
    dataset, model, _ = prepare_run(spec, options["allow_import"])
    train, _ = plan_batch_norm(model, dataset.n_train, spec.train, nproc)  # bad input fails here, once
    distributed.plan_global(dataset, train, nproc)
    for probe in spec.probes:
        distributed.rank_probe(probe, world_size=nproc)
    check_store_folder(store_path(options["store"]))
    sys.exit(distributed.launch(["fit", *_flags(given(click.get_current_context()), skip=("nproc",))],
                                nproc))


def _flags(options: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that give ``options`` again (for the ranks that --nproc launches)."""
    flags: list[str] = []
    for param in fit_command.params:
        if param.name in skip or param.name not in options or not isinstance(param, click.Option):
            continue
        value = options[param.name]
        if param.is_flag and not param.secondary_opts:
            flags += [param.opts[0]] if value else []
        elif param.secondary_opts:
            flags.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, tuple):
            flags += [param.opts[0], *map(str, value)]
        elif value is not None:
            flags += [param.opts[0], str(value)]
    return flags


# Who names the model in the one-line refusal of a model import without --allow-import.
IMPORT_SOURCE = "the run (--model or its config file)"


def check_import_allowed(model: str, allow_import: bool) -> None:
    """Refuse a ``package.module:function`` model (importing it runs its code) unless --allow-import."""
    from ..config import check_import_allowed as check

    check(model, allow_import, IMPORT_SOURCE)


fit_command = click.Command(
    "fit",
    callback=_fit_command,
    params=[*run_options(), *train_options(),
            click.Option(["--tensorboard"], type=click.Path(path_type=Path, file_okay=False), default=None,
                         help="Write TensorBoard files to this folder while training (DIR/run-<id>/)."),
            click.Option(["--nproc"], type=whole(1), default=None,
                         help="Train data-parallel over N processes on this machine (as torchrun); "
                              "--batch-size is per process.")],
    help="Train one model by mini-batches, print the epoch table and store the run.",
)
cli.add_command(fit_command)


@cli.command("datasets", params=[json_option()])
def datasets(as_json: bool) -> None:
    """List the built-in datasets, their sizes and where they come from."""
    from rich.table import Table

    from ..data import list_datasets

    rows = list_datasets()
    if as_json:
        print_json(rows)
        return
    table = Table(title="built-in datasets (a .npz or .csv path works too)")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(shown(row[c]) for c in rows[0]))
    print_rich(table)
