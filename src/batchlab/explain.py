"""The epoch-boundary jump, measured: why the running mean leaps when a new epoch begins.

A Keras-style log shows the *running mean* of the batch metrics since the epoch began, each batch
value taken in train mode at the weights before its update, and reset when an epoch begins. At
the end of an epoch it averages the whole epoch, so it lags behind the model; the first value of
the next epoch is one batch at the current weights, so it leaps ahead. Nothing happens to the model
at the boundary except a new shuffle. This module shows that with numbers from a run:

- the running mean's *jump* across each boundary, and the true training metric's change across the
  same boundary (full pass in eval mode, interpolated from dense evaluation), next to the true
  metric's typical change per step inside an epoch;
- the running mean's *lag* at the end of each epoch (true metric minus running mean), and that the
  running mean is close to the true curve's mean over the epoch;
- the lag split into a *train-mode part* (dropout on, batch norm on batch statistics: eval-mode
  full pass minus train-mode full pass), an *averaging part* (train-mode curve at the epoch end
  minus its mean over the epoch) and the *remainder* (the epoch's batches are a finite sample of
  the train-mode curve, each scored just before the model trains on it).

The train-mode full pass is measured by `TrainModePass`, a callback that evaluates the training set
in train mode at every evaluation point without disturbing the run. Everything else is a pure
function of a run's step and evaluation tables (`explain_tables`), so a stored run is explained
exactly as the run in memory.

Example:
    >>> ds = bl.load_dataset("mnist1d")
    >>> config = explain_config(bl.TrainConfig(batch_size=32, epochs=5), ds.n_train)
    >>> run = bl.fit(model, ds, config, callbacks=[TrainModePass(ds, config)])
    >>> print(explain_run(run).paragraph)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import data as data_lib
from .config import TrainConfig
from .errors import ConfigError, DataError
from .events import AddMetrics, Callback, Evaluation, RunStart
from .metrics import loss_function, pass_totals

MIN_EVALS_PER_EPOCH = 20
DEFAULT_EVALS_PER_EPOCH = 25
METRICS = ("acc", "loss")
TRAIN_MODE_COLUMNS = ("train_mode_loss", "train_mode_acc")


# -- dense evaluation --------------------------------------------------------------------------


def dense_eval_every(steps_per_epoch: int, evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH) -> int:
    """The evaluation interval in steps that gives at least ``evals_per_epoch`` points per epoch.

    The loop evaluates at every multiple of ``k`` and at every epoch end, so an epoch of S steps
    holds at least floor(S / k) evaluation points; with ``k = floor(S / n)`` that is at least n.
    An epoch with fewer than n steps is evaluated at every step (k = 1).
    """
    if evals_per_epoch < 1:
        raise ConfigError(f"evals_per_epoch must be >= 1, got {evals_per_epoch}")
    return max(1, steps_per_epoch // evals_per_epoch)


def explain_config(config: TrainConfig, n_train: int, evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH) -> TrainConfig:
    """The config with dense evaluation on the training set: ``eval_every`` at most `dense_eval_every`.

    A denser ``eval_every`` already in the config is kept; a sparser one (or ``"epoch"``) is
    replaced. ``eval_train`` is switched on: the true training metric is what explains the jump.
    """
    batch_size = n_train if config.batch_size == "full" else min(config.batch_size, n_train)
    dense = dense_eval_every(data_lib.steps_per_epoch(n_train, batch_size, config.drop_last), evals_per_epoch)
    every = dense if config.eval_every == "epoch" else min(config.eval_every, dense)
    return config.replace(eval_every=every, eval_train=True)


class TrainModePass(Callback):
    """At every evaluation point, a full pass over the training set in *train mode*.

    This is the curve the batch values sample: each batch metric is computed in train mode (dropout
    on, batch norm on the batch's statistics). With batch norm the pass goes over the training set
    in batches of the run's batch size, in a random order, so batch norm sees batches like the
    training ones; its mean is the expected batch value at these weights. It returns ``train_mode_loss`` and
    ``train_mode_acc`` with `AddMetrics`, so they join the evaluation rows and the store.

    The run is left exactly as it was: gradients are off, every buffer (batch norm's running
    statistics and counters) is saved and restored, dropout masks come from a forked RNG seeded per
    evaluation, and the batch order from this callback's own generator. A run gives the same numbers
    with and without this callback.

    Args:
        dataset: the run's dataset (its training split is evaluated).
        config: the run's config (loss, seed, batch size, drop_last).
    """

    def __init__(self, dataset: data_lib.Dataset, config: TrainConfig):
        self.X, self.y = dataset.train
        self.classification = dataset.n_classes is not None
        self.loss_fn = loss_function(config.loss, dataset.task)
        self.seed = config.seed
        self.batch_size = dataset.n_train if config.batch_size == "full" else min(config.batch_size, dataset.n_train)
        self.drop_last = config.drop_last  # as in training: batch norm must not meet a batch of one
        self.eval_batch_size = config.eval_batch_size

    def _batches(self, model: torch.nn.Module, order: torch.Tensor) -> list[torch.Tensor]:
        """Batch norm's train-mode output depends on the batch: use the training batches' size (and
        drop_last). Dropout acts per sample, so without batch norm large chunks give the same
        expectation, faster."""
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return data_lib.batch_indices(order, self.batch_size, self.drop_last)
        return data_lib.batch_indices(order, max(self.batch_size, self.eval_batch_size), False)

    def on_run_start(self, event: RunStart) -> None:
        first = next(iter(event.model.parameters()), None)
        if first is not None and self.X.device != first.device:
            self.X, self.y = self.X.to(first.device), self.y.to(first.device)
        return None

    def on_evaluation(self, event: Evaluation) -> AddMetrics:
        loss, acc = self.measure(event.model, event.clock.step)
        values = {"train_mode_loss": loss}
        if self.classification:
            values["train_mode_acc"] = acc
        return AddMetrics(values)

    def measure(self, model: torch.nn.Module, step: int) -> tuple[float, float]:
        """Mean loss and accuracy over the training set in train mode; the model is left untouched."""
        device = self.X.device
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        # Seeded per evaluation point, so the pass is reproducible and independent of the run's stream.
        seed = (self.seed * 1_000_003 + step) % (2**63)
        order = torch.randperm(self.X.shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(seed)
                model.train()
                loss_sum, correct, n = pass_totals(model, self.X, self.y, self._batches(model, order), self.loss_fn,
                                                   self.classification)
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(saved[name])
            model.train(was_training)
        return loss_sum.item() / n, (correct.item() / n if self.classification else float("nan"))


# -- the numbers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boundary:
    """The numbers of one epoch boundary for one metric (``acc`` or ``loss``).

    Steps are the step table's: row ``s`` holds the batch value of update ``s``, computed at the
    weights after ``s - 1`` updates. ``step`` is the old epoch's last step; ``step + 1`` the new
    epoch's first.

    Attributes:
        epoch: the epoch that ends at this boundary.
        step: its last step.
        running_end: the running mean at ``step`` (what the log shows at the end of the epoch).
        running_start: the running mean at ``step + 1``: the new epoch's first batch value.
        running_jump: ``running_start - running_end``.
        true_end: the true training metric (full pass, eval mode) at ``step``, an evaluation point.
        true_start: the true metric at ``step + 1``, interpolated linearly in steps between the
            evaluation at ``step`` and the next one (``eval_every`` steps later at most).
        true_change: ``true_start - true_end``: how much the model changed across the boundary.
        typical_change: the true metric's median change per step inside the two epochs that meet
            here (over evaluation intervals that do not cross a boundary), the same number of steps
            as ``true_change`` spans; NaN when no such interval exists (batch gradient descent).
        lag: ``true_end - running_end``: how far behind the model the log is at the epoch end.
        true_epoch_mean: the true metric's mean over the epoch, at the weights each batch value was
            taken at (steps ``step - S`` to ``step - 1``, interpolated, weighted by batch size).
        running_minus_true_mean: ``running_end - true_epoch_mean``.
        train_mode_end: the train-mode full pass at ``step`` (NaN without `TrainModePass`).
        train_mode_epoch_mean: its mean over the epoch, like ``true_epoch_mean``.
        train_mode_part: ``true_end - train_mode_end``: the lag due to dropout/batch norm.
        averaging_part: ``train_mode_end - train_mode_epoch_mean``: the lag due to averaging an
            epoch during which the model improved.
        remainder_part: ``train_mode_epoch_mean - running_end``: the rest; the three parts add up to
            ``lag`` exactly. It holds the sampling noise of the epoch's batches, and a systematic
            part: each batch is scored just before the model trains on it (on samples last seen
            about an epoch ago), while a full pass also scores samples trained on moments ago.
        batch_noise: the spread of one batch value around the trend in the new epoch,
            std(successive differences) / sqrt(2): the noise in ``running_start``.
    """

    epoch: int
    step: int
    running_end: float
    running_start: float
    running_jump: float
    true_end: float
    true_start: float
    true_change: float
    typical_change: float
    lag: float
    true_epoch_mean: float
    running_minus_true_mean: float
    train_mode_end: float
    train_mode_epoch_mean: float
    train_mode_part: float
    averaging_part: float
    remainder_part: float
    batch_noise: float


@dataclass(frozen=True)
class Explanation:
    """Why the running mean jumps at the epoch boundaries of one run, in numbers and in words.

    Attributes:
        metric: the metric the paragraph is about, ``acc`` or ``loss``.
        batch_size: the batch size of the first step.
        steps_per_epoch: steps in a full epoch.
        epochs: epochs in the step table.
        evals_per_epoch: the fewest evaluation points in a full epoch (its end included).
        batch_gd: one step per epoch (batch gradient descent): the running mean is the batch value.
        has_train_mode: the evaluations include the train-mode full pass.
        boundaries: per metric (``acc``, ``loss`` as the task allows), one `Boundary` per boundary.
        paragraph: the answer for this run, in words, with its numbers.
    """

    metric: str
    batch_size: int
    steps_per_epoch: int
    epochs: int
    evals_per_epoch: int
    batch_gd: bool
    has_train_mode: bool
    boundaries: dict[str, tuple[Boundary, ...]]
    paragraph: str

    def table(self, metric: str | None = None) -> pd.DataFrame:
        """The boundaries of ``metric`` (default: the explained one) as a DataFrame, one row each."""
        return pd.DataFrame([asdict(b) for b in self.boundaries[metric or self.metric]])

    def to_dict(self) -> dict[str, Any]:
        """Every number and the paragraph, as plain values (NaN stays NaN)."""
        out = {k: v for k, v in asdict(self).items() if k != "boundaries"}
        out["boundaries"] = {m: [asdict(b) for b in bs] for m, bs in self.boundaries.items()}
        return out


def explain_run(run: Any, metric: str = "acc") -> Explanation:
    """`explain_tables` over a `Run` (in memory) or a `StoredRun` (from the store)."""
    return explain_tables(run.steps, run.evals, metric, source=run_source(run))


def run_source(run: Any) -> str:
    """What recorded a run, as the store's kinds name it: ``keras``, ``track`` (``bl.track`` and the
    Lightning callback), ``study-trial``, ``fit``, ... (a run in memory: from its config's type)."""
    from .tracking import TrackConfig

    kind = getattr(run, "kind", None)
    if isinstance(kind, str):
        return kind
    config = run.config
    framework = config.get("framework") if isinstance(config, dict) else getattr(config, "framework", None)
    return "keras" if framework == "keras" else "track" if isinstance(config, TrackConfig) else "fit"


def dense_evaluation_advice(source: str, steps_per_epoch: int | None = None) -> str:
    """How to record a run that explain can measure, in the terms of what recorded it.

    Args:
        source: what recorded the run (`run_source`).
        steps_per_epoch: the run's steps per epoch, to suggest an ``eval_every`` of about
            `DEFAULT_EVALS_PER_EPOCH` evaluations per epoch.
    """
    every = dense_eval_every(steps_per_epoch) if steps_per_epoch else "K"
    train = "eval_data={'train': (X, y)}"
    if source == "keras":
        return f"record it with the Keras BatchlabCallback(..., eval_every={every}, {train}) (docs/integrations.md)"
    if source == "track":
        return (f"record it with bl.track(..., eval_every={every}, {train}, loss_fn=...), or the Lightning "
                f"BatchlabCallback(..., eval_every={every}, {train}, loss_fn=...) (docs/integrations.md)")
    if source == "study-trial":
        return "a study evaluates its trials sparsely; train the trial's settings with `batchlab explain` instead"
    return f"run `batchlab explain`, or `batchlab fit --eval-every {every}` (with --eval-train, the default)"


def explain_tables(steps: pd.DataFrame, evals: pd.DataFrame, metric: str = "acc", *, source: str = "fit"
                   ) -> Explanation:
    """Measure the epoch-boundary jump of a run from its step and evaluation tables.

    Args:
        steps: one row per step with ``step, epoch, batch_size, batch_*, running_*``.
        evals: one row per evaluation with ``step`` and ``train_*`` (optionally ``train_mode_*``),
            at step 0, every epoch end and densely in between.
        metric: ``acc`` or ``loss``: the one the paragraph explains (both are measured).
        source: what recorded the run (`run_source`): an error's advice is given in its terms.

    Returns:
        An `Explanation`.

    Raises:
        DataError: tables without the columns or the evaluation points the numbers need.
        ConfigError: an unknown metric, or ``acc`` for a regression run.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use acc or loss")
    steps, evals = _check_tables(steps, evals, metric, source)
    per_epoch = steps.groupby("epoch")["step"].count()
    steps_per_epoch = int(per_epoch.max())
    full_epochs = [int(e) for e, n in per_epoch.items() if n == steps_per_epoch]
    metrics = [m for m in METRICS if f"running_{m}" in steps and f"train_{m}" in evals]
    boundaries = {m: tuple(_boundaries(steps, evals, m, steps_per_epoch)) for m in metrics}
    epoch_end_steps = steps.groupby("epoch")["step"].max()
    evals_per_epoch = min(
        int(((evals["step"] > epoch_end_steps[e] - steps_per_epoch) & (evals["step"] <= epoch_end_steps[e])).sum())
        for e in full_epochs
    )
    has_train_mode = all(f"train_mode_{m}" in evals and evals[f"train_mode_{m}"].notna().any() for m in metrics)
    result = Explanation(
        metric=metric,
        batch_size=int(steps["batch_size"].iloc[0]),
        steps_per_epoch=steps_per_epoch,
        epochs=int(steps["epoch"].max()),
        evals_per_epoch=evals_per_epoch,
        batch_gd=steps_per_epoch == 1,
        has_train_mode=has_train_mode,
        boundaries=boundaries,
        paragraph="",
    )
    return replace(result, paragraph=explanation_paragraph(result))


_NO_ACCURACY = {  # why a run of each source may have no accuracy
    "keras": "a regression task, or a model compiled without metrics=['accuracy']",
    "track": "a regression task, run.step without outputs and targets, or a Lightning training_step "
             "that returns no logits",
}


def _check_tables(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, source: str
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    if steps is None or steps.empty:
        raise DataError("the run has no steps to explain (it ended before its first update)")
    needed = {"step", "epoch", "batch_size", f"batch_{metric}", f"running_{metric}"}
    missing = sorted(needed - set(steps.columns))
    if metric == "acc" and missing == ["batch_acc", "running_acc"]:
        cause = _NO_ACCURACY.get(source, "a regression task")
        raise ConfigError(f"this run recorded no accuracy ({cause}); use --metric loss")
    if missing:
        raise DataError(f"the run's step table lacks {', '.join(missing)}; explain needs a run recorded by batchlab")
    steps = steps.sort_values("step").reset_index(drop=True)
    advice = dense_evaluation_advice(source, int(steps.groupby("epoch")["step"].count().max()))
    if evals is None or evals.empty or f"train_{metric}" not in evals or evals[f"train_{metric}"].isna().all():
        raise DataError(f"the run has no full-pass {metric} on the training set, which explain needs; {advice}")
    evals = evals[evals[f"train_{metric}"].notna()].sort_values("step").drop_duplicates("step", keep="last")
    ends = steps.groupby("epoch")["step"].max()
    starts = steps.groupby("epoch")["step"].min() - 1
    evaluated = set(evals["step"].astype(int))
    unbracketed = [int(e) for e in ends.index if int(ends[e]) not in evaluated or int(starts[e]) not in evaluated]
    if unbracketed:
        raise DataError(f"epoch {unbracketed[0]} has no evaluation at its start or end; explain needs one "
                        f"on the training set at every epoch end: {advice}")  # fmt: skip
    inside = evaluated - set(int(s) for s in ends) - {0}
    if not inside and int(steps.groupby("epoch")["step"].count().max()) > 1:
        raise DataError(f"the run has no evaluation inside its epochs; explain needs dense evaluation: {advice}")
    return steps, evals


def _boundaries(steps: pd.DataFrame, evals: pd.DataFrame, metric: str, steps_per_epoch: int) -> list[Boundary]:
    eval_steps = evals["step"].to_numpy(dtype=float)
    true = evals[f"train_{metric}"].to_numpy(dtype=float)
    mode_column = f"train_mode_{metric}"
    train_mode = evals[mode_column].to_numpy(dtype=float) if mode_column in evals else np.full_like(true, np.nan)

    def true_at(step):  # the true curve between evaluation points: linear in steps
        return np.interp(step, eval_steps, true)

    def mode_at(step):
        return np.interp(step, eval_steps, train_mode)

    running = steps.set_index("step")[f"running_{metric}"]
    batch = steps.set_index("step")[f"batch_{metric}"]
    out = []
    epochs = sorted(int(e) for e in steps["epoch"].unique())
    for epoch, following in zip(epochs, epochs[1:]):
        rows = steps[steps["epoch"] == epoch]
        if len(rows) != steps_per_epoch:
            continue  # a partial epoch (max_steps) has no boundary after it
        end = int(rows["step"].max())
        if end + 1 not in running.index:
            continue
        # Batch value of row s was taken at the weights after s - 1 updates.
        weight_steps = rows["step"].to_numpy(dtype=float) - 1
        weights = rows["batch_size"].to_numpy(dtype=float)
        true_mean = float(np.average(true_at(weight_steps), weights=weights))
        mode_mean = float(np.average(mode_at(weight_steps), weights=weights))
        true_end, mode_end = float(true_at(end)), float(mode_at(end))
        true_start = float(true_at(end + 1))
        running_end, running_start = float(running[end]), float(running[end + 1])
        new_batches = batch[steps.loc[steps["epoch"] == following, "step"]].to_numpy(dtype=float)
        out.append(Boundary(
            epoch=epoch,
            step=end,
            running_end=running_end,
            running_start=running_start,
            running_jump=running_start - running_end,
            true_end=true_end,
            true_start=true_start,
            true_change=true_start - true_end,
            typical_change=(_typical_change(eval_steps, true, steps, (epoch, following)) if steps_per_epoch > 1
                            else math.nan),  # batch gradient descent: no step inside an epoch
            lag=true_end - running_end,
            true_epoch_mean=true_mean,
            running_minus_true_mean=running_end - true_mean,
            train_mode_end=mode_end,
            train_mode_epoch_mean=mode_mean,
            train_mode_part=true_end - mode_end,
            averaging_part=mode_end - mode_mean,
            remainder_part=mode_mean - running_end,
            batch_noise=float(np.std(np.diff(new_batches)) / math.sqrt(2)) if len(new_batches) > 2 else math.nan,
        ))  # fmt: skip
    return out


def _typical_change(eval_steps: np.ndarray, true: np.ndarray, steps: pd.DataFrame, epochs: tuple[int, int]) -> float:
    """Median change per step of the true curve over evaluation intervals inside the given epochs.

    The interval that starts at the boundary between them is left out: it is the one
    ``true_change`` is measured on.
    """
    bounds = steps.groupby("epoch")["step"].agg(["min", "max"])
    boundary = int(bounds.at[epochs[0], "max"])
    slopes = []
    for epoch in epochs:
        first, last = int(bounds.at[epoch, "min"]) - 1, int(bounds.at[epoch, "max"])
        inside = (eval_steps >= first) & (eval_steps <= last)
        xs, ys = eval_steps[inside], true[inside]
        keep = xs[:-1] != boundary
        slopes.extend((np.diff(ys) / np.diff(xs))[keep])
    return float(np.median(slopes)) if slopes else math.nan


# -- the paragraph -----------------------------------------------------------------------------


def explanation_paragraph(result: Explanation) -> str:
    """The answer for this run in plain words; every number and every clause comes from ``result``."""
    metric = result.metric
    noun = "accuracy" if metric == "acc" else "loss"
    bounds = result.boundaries.get(metric, ())
    if result.batch_gd:
        return _batch_gd_paragraph(result, noun, bounds)
    if not bounds:
        return (f"This run has {result.epochs} epoch(s) and so no epoch boundary to explain; train for at least "
                "two epochs.")  # fmt: skip
    first = bounds[0]
    f = _fmt
    sentences = [
        f"At the end of epoch {first.epoch} (step {first.step}) the running mean of the training {noun}, "
        f"which Keras prints and stores in History, is {f(first.running_end)}; the first batch of epoch "
        f"{first.epoch + 1} brings it to {f(first.running_start)}, a jump of {f(first.running_jump, sign=True)}."
    ]
    sentences.append(_model_sentence(first, noun, result))
    sentences.append(_lag_sentence(first, noun, result))
    if result.has_train_mode:
        sentences.append(_parts_sentence(first, result.steps_per_epoch))
    noise = first.batch_noise
    if math.isfinite(noise) and abs(first.running_jump) < 2 * noise:
        sentences.append(
            f"Here the jump is within the noise of a single batch of {result.batch_size} samples "
            f"(±{f(noise)}), so it is smaller or larger at random from one boundary to the next; the lag "
            f"behind the true curve is the systematic part."
        )
    elif math.isfinite(noise):
        jumps = [b.running_jump for b in bounds]
        spread = (f"; here the jumps range from {f(min(jumps), sign=True)} to {f(max(jumps), sign=True)}"
                  if len(bounds) > 1 else "")  # fmt: skip
        sentences.append(
            f"The new epoch's first value is a single batch of {result.batch_size} samples, noisy by about "
            f"±{f(noise)}, so one jump can be much larger or smaller than another{spread}; on average they "
            f"follow the lag."
        )
    if len(bounds) > 1:
        jumps = np.array([b.running_jump for b in bounds])
        changes = np.array([b.true_change for b in bounds])
        lags = np.array([b.lag for b in bounds])
        sentences.append(
            f"Over all {len(bounds)} boundaries the running mean jumped by {f(jumps.mean(), sign=True)} on "
            f"average while the true {noun} changed by {f(changes.mean(), sign=True)}; the lag at the epoch "
            f"ends {_trend(lags)} from {f(lags[0], sign=True)} to {f(lags[-1], sign=True)}"
            + (", as the model learns more slowly." if _trend(lags) == "shrank" else ".")
        )
    return " ".join(sentences)


def _model_sentence(b: Boundary, noun: str, result: Explanation) -> str:
    f = _fmt
    text = (f"The model changed no more at the boundary than between any two steps: the true training {noun} "
            f"(a full pass over the training set in eval mode) went from {f(b.true_end)} to {f(b.true_start)} "
            f"over that step ({f(b.true_change, sign=True)})")  # fmt: skip
    if math.isfinite(b.typical_change):
        text += f", while inside an epoch it changes by {f(b.typical_change, sign=True)} per step (median)"
    if abs(b.running_jump) > 3 * abs(b.true_change):
        ratio = abs(b.running_jump) / abs(b.true_change) if b.true_change else math.inf
        text += (f"; the running mean's jump is {ratio:.0f} times that" if math.isfinite(ratio)
                 else "; the running mean's jump is all of the difference")  # fmt: skip
    else:
        text += "; here the running mean's jump is itself no larger than the model's change over one step"
    return text + "."


def _lag_sentence(b: Boundary, noun: str, result: Explanation) -> str:
    f = _fmt
    behind = "below" if b.lag > 0 else "above"
    text = (f"The running mean was behind because it averages the whole epoch: at the end of epoch {b.epoch} the "
            f"true {noun} was {f(b.true_end)}, and the running mean {f(abs(b.lag))} {behind} it.")  # fmt: skip
    if result.has_train_mode:
        text += (f" It is close to the mean over the epoch of the train-mode curve the batches sample "
                 f"({f(b.train_mode_epoch_mean)}, difference {f(b.running_end - b.train_mode_epoch_mean, sign=True)}); "
                 f"the eval-mode curve's epoch mean is {f(b.true_epoch_mean)} (difference "
                 f"{f(b.running_minus_true_mean, sign=True)}).")  # fmt: skip
    else:
        text += (f" It is close to the mean of the true curve over the epoch ({f(b.true_epoch_mean)}, "
                 f"difference {f(b.running_minus_true_mean, sign=True)}).")  # fmt: skip
    return text


def _parts_sentence(b: Boundary, steps_per_epoch: int) -> str:
    f = _fmt
    lag = abs(b.lag) if b.lag != 0 else math.nan
    mode_share, avg_share = abs(b.train_mode_part) / lag, abs(b.averaging_part) / lag
    text = (f"Of that gap of {f(b.lag, sign=True)}, {f(b.train_mode_part, sign=True)} is train mode (the batch "
            f"values are taken in train mode: dropout on, batch norm on batch statistics) and "
            f"{f(b.averaging_part, sign=True)} is averaging over an epoch in which the model improved.")  # fmt: skip
    if mode_share < 0.1:
        text += " Train mode plays almost no part here: dropout or batch norm, if any, barely moves this metric."
    elif mode_share > avg_share:
        text += (" Train mode is the larger part: batches scored in train mode would sit "
                 + ("below" if b.lag > 0 else "above") + " the eval-mode curve even without averaging.")  # fmt: skip
    else:
        text += " Averaging is the larger part."
    noise = b.batch_noise / math.sqrt(steps_per_epoch) if math.isfinite(b.batch_noise) else math.nan
    if not math.isfinite(noise) or abs(b.remainder_part) <= 2 * noise:
        text += (f" The remaining {f(b.remainder_part, sign=True)} is within the sampling noise of an epoch's "
                 f"batches (±{f(noise)}).")  # fmt: skip
    else:
        text += (f" The remaining {f(b.remainder_part, sign=True)} is more than the sampling noise of an epoch's "
                 f"batches (±{f(noise)}): each batch is scored just before the model trains on it, while a full "
                 f"pass also scores the samples it has just been trained on.")  # fmt: skip
    return text


def _batch_gd_paragraph(result: Explanation, noun: str, bounds: tuple[Boundary, ...]) -> str:
    f = _fmt
    text = (f"This run is batch gradient descent: every epoch is one step over all {result.batch_size} samples, so "
            f"the running mean is the batch value itself and there is no epoch-boundary jump to explain.")  # fmt: skip
    if bounds:
        changes = np.array([b.running_jump for b in bounds])
        true = np.array([b.true_change for b in bounds])
        text += (f" From one epoch to the next the logged {noun} changes by {f(changes.mean(), sign=True)} on "
                 f"average, one update's worth, and the true {noun} by {f(true.mean(), sign=True)}.")  # fmt: skip
        if result.has_train_mode:
            gaps = np.array([b.train_mode_part for b in bounds])
            text += (f" The logged value differs from the eval-mode full pass only by train mode and by being "
                     f"taken before the update (train-mode part {f(gaps.mean(), sign=True)} on average).")  # fmt: skip
    return text


def _trend(values: np.ndarray) -> str:
    first, last = abs(values[0]), abs(values[-1])
    if last < 0.8 * first:
        return "shrank"
    if last > 1.25 * first:
        return "grew"
    return "stayed about the same,"  # followed by "from a to b"


def _fmt(value: float, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    return text if abs(value) >= 0.0005 or value == 0 else (f"{value:+.1e}" if sign else f"{value:.1e}")
