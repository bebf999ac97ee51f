"""`batchlab explain`: the epoch-boundary jump, shown and measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .app import (
    cell,
    check_out_folder,
    check_store_folder,
    cli,
    out_option,
    print_json,
    print_rich,
    say,
    show_progress,
    shown,  # fmt: skip
    store_path,
    whole,
    write_default_report,
)
from .train import given, prepare_run, run_options, spec_from_options, train_options

# Without flags: a run that finishes in about a minute on a laptop CPU and shows a clear jump.
# These are explain's defaults (shown by --help); with --config, the file's values apply instead.
EXPLAIN_DEFAULTS = {"dataset": "mnist1d", "model": "mlp:hidden=256x256,dropout=0.3", "batch_size": 32,
                    "epochs": 6, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9}  # fmt: skip
_EXPLAIN_TRAINING_FLAGS = ("config_file", "dataset", "target", "val_fraction", "split_seed", "standardize", "model",
                           "probes", "name")  # fmt: skip


def _explain_command(**options: Any) -> None:
    """Train with dense evaluation (or read a stored run), then measure and draw the epoch-boundary jump."""
    import textwrap

    import torch

    from ..explain import counterfactual_runs, explain_run
    from ..plots import save_figure
    from ..plots.explain import explain_figure

    torch.set_num_threads(options["threads"])
    quiet, as_json, metric = options["quiet"], options["as_json"], options["metric"]
    store = store_path(options["store"])
    check_out_folder(options["out"])
    counterfactuals = ()
    if options["run_id"] is not None:
        run, run_id, what = _explain_stored(given(click.get_current_context()), store)
        explanation = explain_run(run, metric, options["window"])
    else:
        run, run_id, what, start = _explain_train(options, store, metric)
        explanation = explain_run(run, metric, options["window"])
        if options["counterfactuals"]:
            say("counterfactual runs: " + ", ".join(v.name for v in start["variants"]), quiet, as_json)
            counterfactuals = counterfactual_runs(start["model"], start["dataset"], run.config, explanation.window,
                                                  start["variants"])
            explanation = explanation.with_counterfactuals(counterfactuals)
    folder = Path(options["out"] or store.parent)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"batchlab-explain-{run_id}"
    fig = explain_figure(run.steps, run.evals, explanation, title=f"Why the running mean jumps: run {run_id}, {what}")
    files = [str(p) for p in save_figure(fig, base)]
    if not quiet:
        print_rich(_boundary_table(explanation, f"run {run_id}: the jump after {explanation.window} batches of each "
                                                f"new epoch, and its terms ({metric})"), as_json)
        if counterfactuals:
            print_rich(_counterfactual_table(explanation), as_json)
        for term, how in explanation.missing.items():
            say(f"not measured: {term} (needs {how})", quiet, as_json)
    say(textwrap.fill(explanation.paragraph, width=100), quiet, as_json)
    say("figure: " + ", ".join(files), quiet, as_json)
    report = write_default_report(store, run_id)
    say(f"report: {report}", quiet, as_json)
    if as_json:
        print_json({"run_id": run_id, "store": str(store), "figures": files, "report": str(report),
                    **explanation.to_dict()})


def _explain_stored(options: dict[str, Any], store: Path):
    """The stored run of --run, after checking no training flag was given with it.

    Args:
        options: the flags given on the command line.
    """
    from ..config import TrainConfig
    from ..errors import ConfigError
    from ..store import RunStore

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
    """Train as `fit` does, with dense evaluation and the explain callbacks; store it as kind "explain".

    Returns:
        The run, its id, a description, and what the counterfactual runs start from (a copy of the
        initial model, the dataset, the variants).
    """
    import copy

    from ..errors import ConfigError
    from ..explain import (
        counterfactual_variants,
        explain_callbacks,
        explain_config,
        jump_window,
    )
    from ..loop import fit
    from ..store import recorder

    spec = spec_from_options(given(click.get_current_context()), defaults=EXPLAIN_DEFAULTS)
    dataset, model, clock = prepare_run(spec, options["allow_import"])
    if metric == "acc" and dataset.n_classes is None:
        raise ConfigError(f"{dataset.name} is a regression task and has no accuracy; use --metric loss")
    config = explain_config(spec.train, dataset.n_train)
    spec = spec.model_copy(update={"train": config})
    check_store_folder(store)
    quiet, as_json = options["quiet"], options["as_json"]
    say(f"{dataset.name}: {clock.describe()}; full-pass evaluation every {config.eval_every} steps", quiet, as_json)
    window = options["window"] or jump_window(clock.steps_per_epoch, config.eval_every)
    rec = recorder(store, name=spec.name, kind="explain", spec=spec.model_dump(mode="json", exclude={"train"}))
    start = {"model": copy.deepcopy(model), "dataset": dataset, "variants": counterfactual_variants(config)}
    run = fit(model, dataset, config, probes=spec.probes, callbacks=[*explain_callbacks(dataset, config, window), rec],
              progress=show_progress(quiet))
    say(f"{run.status}: run {rec.run_id} stored in {store}" + (f" ({run.message})" if run.message else ""),
         quiet, as_json)
    return run, rec.run_id, f"{spec.dataset.name}, {spec.model}, B={clock.batch_size}", start


def _boundary_table(explanation, title: str):
    """The jump at each boundary for the explained metric and its terms, as a rich Table."""
    from rich.table import Table

    columns = {"epoch": "epoch", "running_end": "running\nat end", "running_window": "running\nafter w",
               "jump": "jump", "averaging_term": "averaging", "train_mode_term": "train\nmode",
               "reexposure_term": "re-\nexposure", "schedule_term": "schedule", "optimizer_state_term": "optimizer\nstate",
               "progress_term": "progress", "unexplained": "unex-\nplained", "unexplained_noise": "± draw",
               "sawtooth": "per-batch\nsawtooth"}  # fmt: skip
    table = Table(title=shown(title), caption="artifacts: averaging, train mode, re-exposure; real: schedule, "
                                              "optimizer state, progress; n/a: not measured")
    for header in columns.values():
        table.add_column(header, justify="right", no_wrap=True)
    for row in explanation.table().to_dict("records"):
        table.add_row(*(cell(row[c]) for c in columns))
    return table


def _counterfactual_table(explanation):
    """The counterfactual runs: what changed, the term they back, their jump and sawtooth."""
    from rich.table import Table

    metric = explanation.metric
    bounds = explanation.boundaries[metric]
    loss_bounds = explanation.boundaries.get("loss", ())
    table = Table(title=shown("counterfactual runs: the same length, initial weights and seed, one thing changed"))
    for header in ("run", "backs", f"jump ({metric})", "sawtooth (loss)", "± draw"):  # seconds: in --json only
        table.add_column(header, justify="left" if header in ("run", "backs") else "right", no_wrap=True)
    as_trained = [sum(b.jump for b in bounds) / len(bounds),
                  sum(b.sawtooth for b in loss_bounds) / len(loss_bounds) if loss_bounds else float("nan"),
                  (sum(b.sawtooth_noise**2 for b in loss_bounds) ** 0.5 / len(loss_bounds)) if loss_bounds
                  else float("nan")]  # fmt: skip
    table.add_row("as trained", "", *(cell(v) for v in as_trained))
    for run in explanation.counterfactuals:
        table.add_row(shown(run.name), run.backs.removesuffix("_term").replace("_", " "), cell(run.jump[metric]),
                      cell(run.sawtooth.get("loss", float("nan"))),
                      cell(run.sawtooth_noise.get("loss", float("nan"))))  # fmt: skip
    return table


def _explain_defaults_config():
    """The TrainConfig explain trains with when no flag is given (its flags show these defaults)."""
    from ..config import TrainConfig, make_train_config

    return make_train_config({k: v for k, v in EXPLAIN_DEFAULTS.items() if k in TrainConfig.model_fields})


# The training flags whose meaning differs for explain, in explain's words: epochs has a default of
# its own (fit's "10 unless --max-steps" does not apply), and evaluation is dense unless asked denser.
_EXPLAIN_HELP = {
    "epochs": "Passes over the training set (with --max-steps, whichever ends first).",
    "eval_every": "Full-pass evaluation at most K steps apart (a larger K, or 'epoch', is made denser: "
                  "explain needs the true curve inside each epoch).",
}


def _explain_train_options() -> list:
    """The TrainConfig flags with explain's defaults, and help that states what explain does."""
    from ..explain import DEFAULT_EVALS_PER_EPOCH

    options = train_options(_explain_defaults_config(), exclude=("eval_train",))  # always on: it explains
    for option in options:
        option.help = _EXPLAIN_HELP.get(option.name, option.help)
        if option.name == "eval_every":  # what explain_config decides for a run that does not say
            option.show_default = f"steps per epoch // {DEFAULT_EVALS_PER_EPOCH}, at least 1"
    return options


def _explain_options() -> list:
    options = run_options()
    for option in options:  # explain's own defaults for the data and the model
        if option.name in EXPLAIN_DEFAULTS:
            option.default = EXPLAIN_DEFAULTS[option.name]
    return [
        *options,
        click.Option(["--run", "run_id"], type=whole(1), default=None,
                     help="Explain this stored run instead of training (see `batchlab runs list`)."),
        out_option("Folder for the figure (PNG and SVG). Default: the store's folder."),
        click.Option(["--metric"], type=click.Choice(["acc", "loss"]), default="acc",
                     help="The metric the paragraph explains (the numbers cover both)."),
        click.Option(["--window"], type=whole(1), default=None,
                     help="Read the jump after this many batches of each new epoch.  [default: the first multiple of "
                          "the evaluation interval that reaches a tenth of an epoch]"),
        click.Option(["--counterfactuals/--no-counterfactuals"], default=True, show_default=True,
                     help="Also train the counterfactual runs (with replacement, another optimizer, another beta2, "
                          "a constant lr when scheduled); not with --run."),
        *_explain_train_options(),
    ]


explain_command = click.Command(
    "explain",
    callback=_explain_command,
    params=_explain_options(),
    help="Show why the training metric jumps at epoch boundaries: train with dense evaluation (or read "
         "--run ID), print the numbers per boundary and a paragraph, and draw the figure. Without flags it "
         "trains a demonstration run of about a minute (the defaults below).",
)  # fmt: skip
cli.add_command(explain_command)
