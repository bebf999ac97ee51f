"""`batchlab study`: the batch-size study."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from .app import (MAX_INT, FiniteFloat, allow_import_option, check_out_folder, check_store_folder, cli, json_option,
                  out_option, print_json, whole, print_rich, quiet_option, say, show_progress, shown, store_option, store_path, threads_option)  # fmt: skip
from .train import IMPORT_SOURCE, field_option, given, train_options


STUDY_FLAGS = {  # StudyConfig field -> (flag, help)
    "batch_sizes": ("--batch-sizes", "Comma-separated batch sizes, 'full' for B=N, or 'auto': powers of two up to N, and full."),
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
    from ..config import STUDY_OWNED_TRAIN_FIELDS, StudyConfig

    default = StudyConfig()
    options = [
        click.Option(["--config", "config_file"], type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="A TOML study file (StudyConfig keys, tables [dataset] and [train]); flags given override it."),
        click.Option(["--preset"], default=None, help="A preset study: blobs-batch-size (Brownlee 2020) or mnist1d."),
        click.Option(["--dataset"], default=default.dataset.name, help="Built-in dataset name or a .npz/.csv file."),
        click.Option(["--model"], default=default.model,
                     help="NAME[:opt=val,...], e.g. mlp:hidden=50,init=keras; package.module:function with --allow-import."),
        allow_import_option(),
        click.Option(["--name"], default=None, help="A name for the study in the store."),
        *(field_option(field, flag, StudyConfig.model_fields[field].annotation, _shown_default(getattr(default, field)),
                       text) for field, (flag, text) in STUDY_FLAGS.items()),
        click.Option(["--stop-at-target/--no-stop-at-target"], default=default.stop_at_target,
                     help="End each trial at its target, or train the whole budget."),
        click.Option(["--noise-scale/--no-noise-scale"], default=default.noise_scale,
                     help="Measure the gradient noise scale."),
        click.Option(["--adaptive"], is_flag=False, flag_value="adaptive", default=None, metavar="[SETTINGS]",
                     help="Also train one run per seed whose batch grows by itself (from the smallest batch size "
                          "to the largest, lr: the best at the smallest), reported beside the fixed ones; "
                          "settings as --batch-size adaptive takes them: --adaptive signal=b_simple,seeds=2."),
        click.Option(["--replicas/--no-replicas"], default=True,
                     help="Train each group as vectorized replicas (else one fit after another)."),
        click.Option(["--executor"], type=click.Choice(["processes", "in-process", "ray"]), default="processes",
                     help="Where the groups train: processes (local, one per core), in-process, or ray."),
        click.Option(["--workers"], default="auto", help="Processes for --executor processes; auto = cores."),
        click.Option(["--prune/--no-prune"], default=True,
                     help="Stop learning rates that can no longer be the best (same answer, less work)."),
        click.Option(["--ray-address"], default=None, help="Ray cluster address (ray://host:10001, auto); default a local one."),
        click.Option(["--cpus-per-group"], type=FiniteFloat(), default=1.0, help="Ray: CPUs per group."),
        click.Option(["--gpus-per-group"], type=FiniteFloat(), default=0.0,
                     help="Ray: GPUs per group; fractions let groups share a GPU."),
        click.Option(["--max-failures"], type=whole(0), default=3, help="Ray: retries of a crashed worker."),
        out_option("Folder for figures and the report. Default: beside the store."),
        threads_option(),
        quiet_option(),
        store_option(),
        json_option("Print the summary and recommendation as JSON."),
    ]  # fmt: skip
    # The training flags of `batchlab fit`, with the study's defaults, but not what the study decides.
    owned = {*STUDY_OWNED_TRAIN_FIELDS, "reference_batch_size"}
    return options + train_options(default.train, exclude=owned)


def _shown_default(value: Any) -> Any:
    """A StudyConfig default as its flag shows it: lists comma-separated."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def study_config_from_options(options: dict[str, Any]):
    """A validated StudyConfig from StudyConfig's defaults, --preset, --config, then the flags given,
    read by `batchlab.config.load_study_config` as the Python API reads a file.

    Each overrides the last, the ``train`` table field by field.

    Args:
        options: the flags given on the command line (see `given`), by field name.
    """
    from ..config import load_study_config
    from ..study import preset_values

    preset = preset_values(options["preset"]) if options.get("preset") else None
    return load_study_config(options.get("config_file"), preset=preset, overrides=study_values(options),
                             allow_import=bool(options.get("allow_import")), source=IMPORT_SOURCE)


def study_values(options: dict[str, Any]) -> dict[str, Any]:
    """Flags as a study file's values: the training flags into ``train``, the grid's lists and
    numbers parsed; flags not given are left out.

    Args:
        options: flags by field name (``{"seeds": "0,1", "nesterov": True}``).

    Returns:
        Values in `StudyConfig`'s shape (``{"seeds": [0, 1], "train": {"nesterov": True}}``).
    """
    from ..config import STUDY_OWNED_TRAIN_FIELDS, TrainConfig

    # --epochs, --max-steps and --seeds are the study's budget and seeds, never a trial's train table.
    owned = {*STUDY_OWNED_TRAIN_FIELDS, "reference_batch_size"}
    values: dict[str, Any] = {"train": {k: options[k] for k in TrainConfig.model_fields
                                        if k not in owned and options.get(k) is not None}}
    for key in ("dataset", "model", "name", "stop_at_target", "noise_scale"):
        if options.get(key) is not None:
            values[key] = options[key]
    if options.get("adaptive") is not None:
        values["adaptive"] = _adaptive_value(options["adaptive"])
    for field in STUDY_FLAGS:
        if field not in options:
            continue
        text = options[field]
        if field == "batch_sizes":
            values[field] = None if text.strip() == "auto" else _split_list(text)
        elif not isinstance(text, str):  # typed flags: already converted and checked
            values[field] = text
        elif field == "lrs":
            values[field] = text if text.strip() == "auto" else _study_numbers(field, _split_list(text))
        elif field == "seeds":
            seeds = _study_numbers(field, _split_list(text), int)
            values[field] = seeds if "," in text else seeds[0]
        else:
            values[field] = text
    return values


def _adaptive_value(text: str) -> str:
    """``--adaptive`` alone, or with settings (``signal=b_simple,seeds=2``, or as --batch-size takes
    them, ``adaptive:signal=b_simple``), as StudyConfig's ``adaptive`` reads them."""
    text = text.strip()
    return text if text == "adaptive" or text.startswith("adaptive:") else f"adaptive:{text}"


def _study_numbers(field: str, items: list[str], kind=float) -> list:
    from ..errors import ConfigError

    try:
        numbers = [kind(item) for item in items]
    except ValueError:
        raise ConfigError(f"--{field.replace('_', '-')} takes one or more numbers separated by commas, got {','.join(items)!r}") from None
    if not numbers or not all(math.isfinite(n) and abs(n) <= MAX_INT for n in numbers):
        raise ConfigError(f"--{field.replace('_', '-')} takes one or more finite numbers separated by commas, got {','.join(items)!r}")
    return numbers


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
        from ..study.plan import ADAPTIVE_GROUP

        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("groups", total=update.groups_known, last="")
        group = update.group
        last = "" if group is None else (
            f"last: adaptive run, seed {group.seeds[0]}" if group.kind == ADAPTIVE_GROUP
            else f"last: {group.kind} B={group.batch_size} ({len(group.lrs)} lr × {len(group.seeds)} seeds)")
        self.progress.update(self.task, completed=update.groups_done, total=update.groups_known, last=last)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


STUDY_COLUMNS = {"batch_size": "B", "best_lr": "best lr", "reached": "reached", "steps_to_target": "steps",
                 "epochs_to_target": "epochs", "samples_to_target": "samples", "seconds_to_target": "seconds",
                 "gen_gap": "gen gap", "noise_scale": "B_simple", "regime": "regime"}  # fmt: skip
# The adaptive row's own columns, shown only when the study has one (the fixed rows leave them empty).
ADAPTIVE_COLUMNS = {"batches": "batches", "measurement_samples": "measurement samples"}


def _study_table(summary, title: str, adaptive=None):
    from rich.table import Table

    from ..study.adaptive import beside

    table = Table(title=shown(title))
    has_adaptive = adaptive is not None and len(adaptive) > 0
    columns = {k: v for k, v in STUDY_COLUMNS.items() if k in summary}
    if has_adaptive:
        columns.update(ADAPTIVE_COLUMNS)
    for header in columns.values():
        table.add_column(header, justify="left" if header in ("regime", "batches") else "right", no_wrap=True)
    rows = beside(summary, adaptive).to_dict("records")
    for i, row in enumerate(rows):
        if has_adaptive and i == len(rows) - 1:
            table.add_section()  # the adaptive row is set beside the grid, not in it
        table.add_row(*(_study_cell(c, row.get(c, math.nan)) for c in columns))
    return table


def _study_cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if column in ("steps_to_target", "samples_to_target", "measurement_samples"):
            return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
        return f"{value:.3g}"
    return shown(value)


def _study_command(**options: Any) -> None:
    """Run (or resume) a batch-size study, print its summary and recommendation, write its figures."""
    import torch

    from ..study import make_executor
    from ..study import brownlee_comparison, run_study, write_study_outputs

    torch.set_num_threads(options["threads"])
    quiet, as_json = options["quiet"], options["as_json"]
    config = study_config_from_options(given(click.get_current_context()))
    executor = make_executor(options["executor"], **_executor_options(options))
    store = store_path(options["store"])
    check_store_folder(store)
    check_out_folder(options["out"])
    display = _StudyDisplay() if show_progress(quiet) else None
    try:
        study = run_study(config, store=store, executor=executor, vectorized=options["replicas"],
                          prune=options["prune"], on_progress=display, allow_import=options["allow_import"])
    finally:
        executor.close()
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
        _exit_if_failed(study)
        return
    if not quiet:
        title = (f"study {study.group_id}: {study.plan.dataset_name}, {config.model}, target {study.plan.target} "
                 f"({len(study.trials)} trials; {study.groups_run} groups run, {study.groups_resumed} resumed)")
        print_rich(_study_table(study.summary, title, study.adaptive), False)
        if comparison is not None:
            print_rich(_brownlee_table(comparison), False)
    say(f"recommendation: {study.recommendation.text}")
    if len(study.adaptive):
        from ..study.adaptive import row_sentence

        say(f"adaptive: {row_sentence(study.adaptive.iloc[0], str(study.plan.target))}")
    fit = study.fit
    if fit.ok:
        say(f"fit S = S_min(1 + B_crit/B): S_min = {fit.s_min:.4g} ± {fit.s_min_err:.2g} steps, "
              f"B_crit = {fit.b_crit:.4g} ± {fit.b_crit_err:.2g}, E_min = {fit.e_min:.4g} samples")
    elif fit.message:
        say(f"fit: {fit.message}")
    say(f"stored as group {study.group_id} in {store}")
    if not quiet:
        for file in files:
            say(f"wrote {file}")
    _exit_if_failed(study)


def _exit_if_failed(study) -> None:
    """A study with a failed group is incomplete: each failure on stderr (even with --quiet or
    --json), then exit status 1, so that scripts do not take its answer for a finished one."""
    if not study.failed:
        return
    for key, error in study.failed.items():
        click.echo(shown(f"failed: {key}: {' '.join(str(error).split())} (rerun the command to retry it)"), err=True)
    click.get_current_context().exit(1)


def _executor_options(options: dict[str, Any]) -> dict[str, Any]:
    if options["executor"] == "processes":
        return {"workers": options["workers"]}
    if options["executor"] == "ray":
        return {"address": options["ray_address"], "cpus_per_group": options["cpus_per_group"],
                "gpus_per_group": options["gpus_per_group"], "max_failures": options["max_failures"]}
    return {}


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
cli.add_command(study_command)
