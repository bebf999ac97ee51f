"""`batchlab gradnorm` and `batchlab distance`: the gradient-norm and distance-from-init experiments."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import BatchlabError
from .app import (MAX_INT, allow_import_option, cell, check_out_folder, check_store_folder, cli, json_option, out_option, print_json,
                  print_rich, say, show_progress, shown, store_option, store_path, threads_option, whole)  # fmt: skip
from .train import check_import_allowed, train_options


def _int_list(text: str, flag: str, minimum: int = 0) -> list[int]:
    """Comma-separated whole numbers, each from ``minimum`` up to 2**63 - 1."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BatchlabError(f"{flag} {text!r} must be whole numbers separated by commas, e.g. 2,30") from None
    if not numbers or not all(minimum <= n <= MAX_INT for n in numbers):
        raise BatchlabError(f"{flag} {text!r} must be one or more whole numbers >= {minimum}, e.g. 2,30")
    return numbers


def _float_list(text: str, flag: str) -> list[float]:
    """Comma-separated finite numbers > 0 (learning rates)."""
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BatchlabError(f"{flag} {text!r} must be numbers separated by commas, e.g. 0.01,0.1") from None
    if not numbers or not all(0 < n < math.inf for n in numbers):
        raise BatchlabError(f"{flag} {text!r} must be one or more finite numbers > 0, e.g. 0.01,0.1")
    return numbers


def _experiment_setup(dataset_name: str, model_spec: str, seed: int, threads: int, allow_import: bool):
    """Load the data and check the model spec before anything touches the store."""
    import torch

    from ..data import load_dataset
    from ..models import model_from_spec

    check_import_allowed(model_spec, allow_import)
    torch.set_num_threads(threads)
    dataset = load_dataset(dataset_name)
    model_from_spec(model_spec, dataset, seed=seed, allow_import=allow_import)  # fails here, on bad input
    return dataset, (lambda: model_from_spec(model_spec, dataset, seed=seed, allow_import=allow_import))


def _out_dir(out: Path | None, store: Path, kind: str, group_id: int) -> Path:
    """--out, or ``<store stem>-<kind>-<group>/`` beside the store."""
    return out if out is not None else store.with_name(f"{store.stem}-{kind}-{group_id}")


def _numbers_table(frame, columns: dict[str, str], title: str):
    from rich.table import Table

    table = Table(title=shown(title))
    for header in columns.values():
        table.add_column(header, justify="right", no_wrap=True)
    for row in frame.to_dict("records"):
        table.add_row(*(cell(row[c]) for c in columns))
    return table


def _experiment_options(kind: str) -> list[click.Option]:
    """The flags gradnorm and distance share with each other and with `batchlab fit`."""
    from ..config import RunSpec

    spec = RunSpec()
    return [
        click.Option(["--dataset"], default=spec.dataset.name, help="Built-in dataset name or a .npz/.csv file."),
        click.Option(["--model"], default=spec.model,
                     help="NAME[:opt=val,...], e.g. mlp:hidden=100x100; package.module:function with --allow-import."),
        allow_import_option(),
        out_option(f"Folder for the tables (CSV) and figures. Default: beside the store, <store>-{kind}-<group>."),
        threads_option(),
        store_option(),
        json_option(),
    ]  # fmt: skip


def _gradnorm_training():
    """How gradnorm trains between measurements (Shen 2018's setting: SGD, lr 0.05)."""
    from ..config import make_train_config

    return make_train_config({"lr": 0.05})


@cli.command("gradnorm", params=[
    click.Option(["--at"], default="2,30", metavar="INTS", help="Epochs after which to measure (0: the initial weights)."),
    click.Option(["--batch-sizes"], default=None, metavar="INTS", help="Batch sizes to measure. Default: 1,2,4,... up to N."),
    click.Option(["--trials"], type=whole(2), default=1000, help="Random batches per batch size."),
    *_experiment_options("gradnorm"),
    *train_options(_gradnorm_training(), only=("batch_size", "optimizer", "lr", "momentum", "seed")),
])  # fmt: skip
def gradnorm(dataset: str, model: str, allow_import: bool, at: str, batch_sizes: str | None, trials: int,
             batch_size: str, optimizer: str, lr: float, momentum: float, seed: int, out: Path | None,
             threads: int, store: Path | None, as_json: bool) -> None:  # fmt: skip
    """Gradient norm vs batch size over many random batches at chosen points of training (Shen 2018).

    Trains the model, and after each epoch in --at measures ‖g_B‖ for the batch's mean loss and
    its summed loss over --trials random batches per batch size, with the theory
    E‖g_B‖² = ‖G‖² + tr(Σ)/B from exact per-sample gradients. Stores the training run and the
    table in a group of the store; writes the table and the figures (PNG and SVG).
    """
    from ..config import make_train_config
    from ..gradnorm import check_batch_sizes, default_batch_sizes, gradnorm_experiment
    from ..plots import save_figure
    from ..plots.gradnorm import gradnorm_figure, loss_conventions_figure
    from ..store import RunStore, recorder

    points = _int_list(at, "--at")
    requested = _int_list(batch_sizes, "--batch-sizes", minimum=1) if batch_sizes else None
    config = make_train_config({"batch_size": batch_size, "optimizer": optimizer, "lr": lr, "momentum": momentum,
                                "seed": seed, "epochs": max(max(points), 1)})  # fmt: skip
    path = store_path(store)
    check_store_folder(path)
    check_out_folder(out)
    data, make_model = _experiment_setup(dataset, model, seed, threads, allow_import)
    sizes = check_batch_sizes(requested or default_batch_sizes(data.n_train), data.n_train)
    settings = {"dataset": dataset, "model": model, "at": points, "batch_sizes": sizes, "trials": trials,
                "train": config.model_dump(mode="json")}  # fmt: skip
    with RunStore(path) as run_store:
        group = run_store.create_group("gradnorm", f"gradnorm {dataset} {model}", settings)
        rec = recorder(run_store, name=f"gradnorm training {model}", kind="gradnorm-training", group_id=group,
                       spec={"dataset": dataset, "model": model})  # fmt: skip
        try:
            result = gradnorm_experiment(make_model(), data, config, at_epochs=points, batch_sizes=sizes, trials=trials,
                                         seed=seed, callbacks=[rec] if max(points) > 0 else [], progress=show_progress())  # fmt: skip
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
        say(f"{point}: ‖G‖² = {s.grad_sq:.4g}, tr(Σ) = {s.trace_cov:.4g}, B_simple = tr(Σ)/‖G‖² = {s.noise_scale:.4g}")
    say(f"stored as group {group} in {path}")
    for file in [folder / "gradnorm.csv", *figures]:
        say(f"wrote {file}")


def _distance_training():
    """How every distance run trains, besides its batch size and lr (20 epochs: the same samples seen)."""
    from ..config import make_train_config

    return make_train_config({"epochs": 20})


@cli.command("distance", params=[
    click.Option(["--batch-sizes"], default="16,64,256,1024", metavar="INTS", help="Batch sizes to train with."),
    click.Option(["--lrs"], default="0.01,0.1", metavar="NUMBERS", help="Learning rates to train with."),
    *_experiment_options("distance"),
    *train_options(_distance_training(), only=("epochs", "optimizer", "seed")),
])  # fmt: skip
def distance(dataset: str, model: str, allow_import: bool, batch_sizes: str, lrs: str, epochs: int,
             optimizer: str, seed: int, out: Path | None, threads: int, store: Path | None, as_json: bool) -> None:
    """Distance from the initial weights ‖θ_t − θ_0‖ for batch sizes × learning rates (Shen 2018).

    Every run starts from the same weights and sees the same number of samples; the figure shows
    the distance over training and at the end. Runs are stored as one group.
    """
    from ..config import make_train_config
    from ..gradnorm import check_batch_sizes, distance_experiment
    from ..plots import save_figure
    from ..plots.gradnorm import distance_figure
    from ..store import RunStore, recorder

    requested = _int_list(batch_sizes, "--batch-sizes", minimum=1)
    rates = _float_list(lrs, "--lrs")
    config = make_train_config({"epochs": epochs, "optimizer": optimizer, "seed": seed, "lr": max(rates)})
    path = store_path(store)
    check_store_folder(path)
    check_out_folder(out)
    data, make_model = _experiment_setup(dataset, model, seed, threads, allow_import)
    sizes = check_batch_sizes(requested, data.n_train)
    settings = {"dataset": dataset, "model": model, "batch_sizes": sizes, "lrs": rates, "train": config.model_dump(mode="json")}
    with RunStore(path) as run_store:
        group = run_store.create_group("distance", f"distance {dataset} {model}", settings)

        def callbacks_for(size: int, lr: float):
            return [recorder(run_store, name=f"distance B={size} lr={lr:g}", kind="distance", group_id=group,
                             spec={"dataset": dataset, "model": model, "probes": ["dist_from_init"]})]  # fmt: skip

        try:
            result = distance_experiment(make_model, data, config, batch_sizes=sizes, lrs=rates,
                                         callbacks_for=callbacks_for, progress=show_progress())  # fmt: skip
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
    say(f"stored as group {group} in {path}")
    for file in files:
        say(f"wrote {file}")
