"""`batchlab advise`: which batch size (or ramp) to train with, from the local critical batch size
measured along one run."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import click

from .app import (check_out_folder, check_store_folder, cli, out_option, print_json, print_rich, say,
                  show_progress, shown, store_path, whole)  # fmt: skip
from .experiments import _int_list
from .train import given, prepare_run, run_options, spec_from_options, train_options

# Without flags: a run of well under a minute on a laptop CPU whose local critical batch size grows.
ADVISE_DEFAULTS = {"dataset": "mnist1d", "model": "mlp:hidden=128x128", "batch_size": 16, "epochs": 4,
                   "optimizer": "adam", "lr": 1e-3}  # fmt: skip


def _advise_command(**options: Any) -> None:
    """Train one run with the noise-scale probe and `LocalCBS`, store it, and print the advice."""
    import torch

    from ..critical_batch import advise_batch_size
    from ..loop import fit
    from ..optim import scaled_lr
    from ..store import recorder

    torch.set_num_threads(options["threads"])
    quiet, as_json = options["quiet"], options["as_json"]
    spec = spec_from_options(given(click.get_current_context()), defaults=ADVISE_DEFAULTS)
    if "noise_scale" not in spec.probes:
        spec = spec.model_copy(update={"probes": (*spec.probes, "noise_scale")})
    dataset, model, clock = prepare_run(spec, options["allow_import"])
    measure = _local_cbs_callback(options, clock.batch_size, clock.n_train)
    store = store_path(options["store"])
    check_store_folder(store)
    check_out_folder(options["out"])
    say(f"{dataset.name}: {clock.describe()}; local critical batch size at {_when(options['every'])}", quiet, as_json)
    rec = recorder(store, name=spec.name, kind="advise", spec=spec.model_dump(mode="json", exclude={"train"}))
    run = fit(model, dataset, spec.train, probes=spec.probes, callbacks=[measure, rec],
              progress=show_progress(quiet))
    say(f"{run.status}: run {rec.run_id} stored in {store}" + (f" ({run.message})" if run.message else ""),
        quiet, as_json)
    advice = advise_batch_size(run.evals, clock.batch_size, scaled_lr(spec.train, clock.batch_size),
                               spec.train.optimizer)
    figure = _draw(advice, Path(options["out"] or store.parent), rec.run_id,
                   f"run {rec.run_id}: {dataset.name}, {spec.model}, batch {clock.batch_size}")
    if not quiet:
        print_rich(_points_table(advice, f"run {rec.run_id}: local critical batch size"), as_json)
    say(textwrap.fill(advice.text, width=100), as_json=as_json)
    say(f"figure: {figure}", quiet, as_json)
    if as_json:
        print_json(_as_json(advice, rec.run_id, store, figure))


def _local_cbs_callback(options: dict[str, Any], batch_size: int, n_train: int):
    """The `LocalCBS` of the flags, checked against the data before anything is stored."""
    from ..critical_batch import LocalCBS
    from ..critical_batch import _branch_samples
    from ..errors import DataError

    factors = _int_list(options["factors"], "--factors", minimum=1)
    measure = LocalCBS(options["every"], factors=tuple(factors), seeds=options["branch_seeds"],
                       samples=options["branch_samples"])
    largest = max(factors) * batch_size
    if largest > n_train:
        raise DataError(f"--factors: the largest branch batch {max(factors)}×{batch_size} = {largest} exceeds the "
                        f"{n_train} training samples; lower --batch-size or --factors")
    _branch_samples(options["branch_samples"], sorted(factors), batch_size)  # a bad --branch-samples fails here
    return measure


def _when(every: int | None) -> str:
    return "the start and every evaluation" if every is None else f"the start and the first evaluation every {every} steps"


def _draw(advice, folder: Path, run_id: int, title: str) -> Path:
    from ..plots.advise import advise_figure

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"batchlab-advise-{run_id}.png"
    advise_figure(advice, title=title).savefig(path, dpi=150)
    return path


def _points_table(advice, title: str):
    """One row per measurement: where, the local CBS interval, B_simple, the batch recommended from there."""
    import math

    from rich.table import Table

    table = Table(title=shown(title))
    for header in ("step", "samples seen", "local CBS", "first worse", "B_simple"):
        table.add_column(header, justify="right", no_wrap=True)
    for p in advice.points.itertuples():
        worse = f"{int(p.local_cbs_upper)}" if math.isfinite(p.local_cbs_upper) else "none tested"
        table.add_row(str(p.step), str(p.samples_seen), str(p.local_cbs), worse, f"{p.b_simple:.3g}")
    return table


def _as_json(advice, run_id: int, store: Path, figure: Path) -> dict[str, Any]:
    from ..critical_batch import PREDICTION_MODEL

    return {"run_id": run_id, "store": str(store), "figure": str(figure), "batch_size": advice.batch_size,
            "lr": advice.lr, "lr_rule": advice.lr_rule, "ramp": advice.ramp,
            "measurements": advice.points.to_dict("records"),
            "prediction": {"model": PREDICTION_MODEL, "estimate": True, "run_steps": advice.run_steps,
                           "run_samples": advice.run_samples, "steps": advice.predicted_steps,
                           "samples": advice.predicted_samples,
                           "extra_samples": advice.predicted_samples - advice.run_samples},
            "text": advice.text}


def _advise_options() -> list:
    from ..config import make_train_config

    options = run_options()
    for option in options:  # advise's own defaults for the data and the model
        if option.name in ADVISE_DEFAULTS:
            option.default = ADVISE_DEFAULTS[option.name]
    base = make_train_config({k: v for k, v in ADVISE_DEFAULTS.items() if k not in ("dataset", "model")})
    return [
        *options,
        click.Option(["--every"], type=whole(1, optional=True), default=None,
                     help="Measure at the first evaluation every K steps (default: at every evaluation, i.e. each "
                          "epoch's end), besides the start."),
        click.Option(["--factors"], default="1,2,4,8,16", metavar="INTS",
                     help="Branch at these multiples of the batch size (1, the reference, included)."),
        click.Option(["--branch-seeds"], type=whole(2), default=3, help="Seeds per branch (the paired test's sample)."),
        click.Option(["--branch-samples"], type=whole(1, optional=True), default=None,
                     help="Training samples per branch, a multiple of every branch batch (default: 8 steps of the "
                          "largest)."),
        out_option("Folder for the figure (PNG). Default: the store's folder."),
        *train_options(base),
    ]


advise_command = click.Command(
    "advise",
    callback=_advise_command,
    params=_advise_options(),
    help="Recommend a batch size (or a ramp) and its learning rate: train one run measuring the local critical "
         "batch size along it (Merrill et al. 2025) and B_simple, store it, print the measurements, the advice and "
         "its predicted saving, and draw the figure. Without flags it trains a run of well under a minute.",
)  # fmt: skip
cli.add_command(advise_command)
