"""`batchlab study`: the batch-size study."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import BatchlabError
from .app import EXTRA_COMMANDS, print_json, print_rich, store_path
from .train import _train_options


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
    from ..config import STUDY_OWNED_TRAIN_FIELDS

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
        click.Option(["--executor"], default="processes", show_default=True,
                     help="processes (local, one per core), in-process, or ray."),
        click.Option(["--workers"], default="auto", show_default=True, help="Processes for --executor processes; auto = cores."),
        click.Option(["--prune/--no-prune"], default=True, show_default=True,
                     help="Stop learning rates that can no longer be the best (same answer, less work)."),
        click.Option(["--ray-address"], default=None, help="Ray cluster address (ray://host:10001, auto); default a local one."),
        click.Option(["--cpus-per-group"], type=float, default=1.0, show_default=True, help="Ray: CPUs per group."),
        click.Option(["--gpus-per-group"], type=float, default=0.0, show_default=True,
                     help="Ray: GPUs per group; fractions let groups share a GPU."),
        click.Option(["--max-failures"], type=int, default=3, show_default=True, help="Ray: retries of a crashed worker."),
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
    from ..config import STUDY_OWNED_TRAIN_FIELDS, TrainConfig, make_study_config, read_toml
    from ..study import preset_values

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
    from ..errors import ConfigError

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

    from ..study import make_executor
    from ..study import brownlee_comparison, run_study, write_study_outputs

    torch.set_num_threads(max(1, options["threads"]))
    quiet, as_json = options["quiet"], options["as_json"]
    config = study_config_from_options(options)
    executor = make_executor(options["executor"], **_executor_options(options))
    store = store_path(options["store"])
    if not store.parent.exists():
        raise BatchlabError(f"the store's folder {store.parent} does not exist; create it or pass another --store")
    display = _StudyDisplay() if not quiet and sys.stderr.isatty() else None
    try:
        study = run_study(config, store=store, executor=executor, vectorized=options["replicas"],
                          prune=options["prune"], on_progress=display)
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
    for key, error in study.failed.items():
        print(f"failed: {key}: {error} (rerun the command to retry it)")
    print(f"stored as group {study.group_id} in {store}")
    if not quiet:
        for file in files:
            print(f"wrote {file}")


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
EXTRA_COMMANDS.append(study_command)
