"""`batchlab gradnorm` and `batchlab distance`: the gradient-norm and distance-from-init experiments."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import BatchlabError
from .app import JsonOption, StoreOption, _cell, app, print_json, print_rich, store_path


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

    from ..data import load_dataset
    from ..models import model_from_spec

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
    from ..config import make_train_config
    from ..gradnorm import check_batch_sizes, default_batch_sizes, gradnorm_experiment
    from ..plots import save_figure
    from ..plots.gradnorm import gradnorm_figure, loss_conventions_figure
    from ..store import RunStore, recorder

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
    from ..config import make_train_config
    from ..gradnorm import check_batch_sizes, distance_experiment
    from ..plots import save_figure
    from ..plots.gradnorm import distance_figure
    from ..store import RunStore, recorder

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
