"""Training from flags: `batchlab fit` and `batchlab datasets`.

The TrainConfig fields are the flags; they are generated from the model so they cannot drift."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import BatchlabError
from .app import EXTRA_COMMANDS, JsonOption, StoreOption, _cell, _say, app, print_json, print_rich, store_path


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
    from ..config import TrainConfig

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
    from ..config import TrainConfig, make_run_spec, read_toml

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
    from ..data import load_dataset
    from ..loop import check_model, plan_run, resolve_device
    from ..models import model_from_spec
    from ..probes import make_probe

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


def _fit_command(**options: Any) -> None:
    """Train one model and store the run."""
    import torch

    from ..loop import fit
    from ..store import recorder

    torch.set_num_threads(max(1, options["threads"]))
    quiet, as_json = options["quiet"], options["as_json"]
    spec = spec_from_options(options)
    dataset, model, clock = prepare_run(spec)
    store = store_path(options["store"])
    if not store.parent.exists():
        raise BatchlabError(f"the store's folder {store.parent} does not exist; create it or pass another --store")
    _say(f"{dataset.name}: {clock.describe()}", quiet, as_json)
    rec = recorder(store, name=spec.name, kind="fit", spec=spec.model_dump(mode="json", exclude={"train"}))
    callbacks = [rec]
    if options["tensorboard"] is not None:  # live TensorBoard files in DIR/run-<id>/
        from ..store import TensorBoard

        callbacks.append(TensorBoard(options["tensorboard"], run_name=lambda: f"run-{rec.run_id}"))
    run = fit(model, dataset, spec.train, probes=spec.probes, callbacks=callbacks,
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
    params=[*RUN_OPTIONS, *_train_options(),
            click.Option(["--tensorboard"], type=click.Path(path_type=Path), default=None,
                         help="Write TensorBoard files to this folder while training (DIR/run-<id>/).")],
    help="Train one model by mini-batches, print the epoch table and store the run.",
)
EXTRA_COMMANDS.append(fit_command)


@app.command()
def datasets(
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
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
        table.add_row(*(str(row[c]) for c in rows[0]))
    print_rich(table, False)
