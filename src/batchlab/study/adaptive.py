"""The adaptive row of a study: one run per seed whose batch grows by itself, beside the fixed batch sizes.

With ``StudyConfig(adaptive=True)`` (``batchlab study --adaptive``) the study trains, for each seed,
one `batchlab.fit` run with an `Adaptive` batch size (`batchlab.adaptive`) to the same target, the
target checked at the same evaluation points as every trial's (`evaluation_steps` of the longest
run the budget allows: the whole of it at the start batch). Its settings:

- ``start`` and ``max``: the grid's smallest and largest batch sizes, unless given;
- the lr at ``start``: the best lr the study found at that batch size (its learning-rate search,
  extensions included, is complete first), so the run starts as well tuned as the fixed batch size
  it starts from; as it grows the lr follows the adaptive rule (linear for SGD, square root
  otherwise). Where ``start`` is not in the grid, or none of its lrs reached the target, the
  study's reference lr moved to ``start`` by its ``lr_rule`` (the auto grid's centre there).

Each run is a group of its own (kind ``adaptive``, so an executor trains the seeds side by side),
stored with the study's trials: a killed study resumes without retraining them. The group key holds
the settings and the lr; a study's identity leaves ``adaptive`` out, so adding it to a stored study
trains the adaptive runs only.

The row (`adaptive_row`) is a pure function of the stored trial summaries, with the fixed rows'
conventions: medians over seeds (a seed that did not reach the target counting as never), the
spread over the seeds that reached, the order-statistic interval of the median steps. Beside them
what only an adaptive run has: the batches it went through, and the samples its measurements took
(`measurement_samples`) in a column of their own. The analysis (fit, regimes, recommendation)
never reads it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..config import Adaptive, StudyConfig, TrainConfig
from ..data import Dataset
from .plan import (
    ADAPTIVE_GROUP,
    LR_GROUP,
    GroupPlan,
    StudyPlan,
    evaluation_steps,
    lr_centre_index,
    lr_from_index,
)
from .ranking import best_lr, lr_table, median_steps
from .scaling import interval_label, median_interval

# -- settings and plan ---------------------------------------------------------------------------


def resolve_adaptive(config: StudyConfig, batch_sizes: Sequence[int], n_train: int) -> Adaptive | None:
    """The study's `Adaptive` settings made concrete: ``start`` and ``max`` from the grid unless given.

    Args:
        config: the study config.
        batch_sizes: the grid's batch sizes as numbers (``full`` as N).
        n_train: the training-set size.

    Returns:
        The settings, or None when the study has no adaptive run.

    Raises:
        ConfigError: settings that contradict each other or the data, in one line.
    """
    from ..errors import ConfigError

    if config.adaptive is False:
        return None
    given = config.adaptive if isinstance(config.adaptive, Adaptive) else Adaptive()
    values = given.model_dump(include=set(given.model_fields_set))
    values.setdefault("start", min(batch_sizes))
    values.setdefault("max", max(batch_sizes))
    try:
        settings = Adaptive(**values)
    except ConfigError as error:
        raise ConfigError(f"the study's {str(error).removeprefix('invalid ')}; start and max default to the grid's "
                          f"smallest and largest batch sizes ({min(batch_sizes)} and {max(batch_sizes)})") from None
    if settings.start > n_train:
        raise ConfigError(f"adaptive: start {settings.start} is larger than the training set ({n_train} samples); "
                          f"give a start <= {n_train}")
    return settings


def settings_text(settings: Adaptive) -> str:
    """``start=16,max=1024,signal=local_cbs``, and every other setting that is not its default."""
    default = Adaptive()
    text = [f"start={settings.start}", f"max={settings.max}", f"signal={settings.signal}"]
    text += [f"{name}={getattr(settings, name)}" for name in ("every", "lr_rule", "seeds", "beta2_half_life")
             if getattr(settings, name) != getattr(default, name)]
    return ",".join(text)


def train_config(plan: StudyPlan, lr: float, seed: int) -> TrainConfig:
    """An adaptive run's TrainConfig: the study's ``train`` table, its budget and evaluations, the
    `Adaptive` batch size, the lr at ``start`` and the seed."""
    return plan.train_config(plan.adaptive.start, lr, seed).replace(batch_size=plan.adaptive)


def start_lr(plan: StudyPlan, trials: pd.DataFrame, pending: Sequence[GroupPlan] = ()) -> tuple[float, str] | None:
    """The lr at ``start`` and where it comes from; None while the start batch size's lr search is
    pending (in ``pending``, or not stored yet).

    Returns:
        ``(lr, source)``: the best lr at ``start`` ("best lr at B=16"), else the reference lr moved
        to ``start`` by the study's ``lr_rule``.
    """
    config, start = plan.config, plan.adaptive.start
    grid = {plan.value_of(b): b for b in plan.batch_sizes}
    if start in grid:
        if any(g.kind == LR_GROUP and g.batch_size_value == start for g in pending):
            return None
        at_start = trials[(trials["kind"] == LR_GROUP) & (trials["batch_size_value"] == start)] if len(trials) else trials
        if at_start.empty:
            return None
        best = best_lr(lr_table(at_start))
        if best is not None:
            return best, f"best lr at B={grid[start]}"
    lr = lr_from_index(config, lr_centre_index(config, start))
    why = "not in the grid" if start not in grid else "no lr reached the target there"
    return lr, (f"reference lr {config.reference_lr:g} at B={config.reference_batch_size} moved to B={start} by the "
                f"{config.lr_rule} rule ({why})")


def group_for(plan: StudyPlan, lr: float, seed: int) -> GroupPlan:
    """The group of one seed's adaptive run (its key names the settings and the lr)."""
    return GroupPlan(ADAPTIVE_GROUP, ADAPTIVE_GROUP, plan.adaptive.start, (lr,), (seed,),
                     detail=settings_text(plan.adaptive))


def adaptive_groups(plan: StudyPlan, trials: pd.DataFrame, pending: Sequence[GroupPlan],
                    done: Collection[str]) -> list[GroupPlan]:
    """The adaptive runs still to train: one group per seed, once the lr at ``start`` is known."""
    if plan.adaptive is None:
        return []
    chosen = start_lr(plan, trials, pending)
    if chosen is None:
        return []
    groups = [group_for(plan, chosen[0], seed) for seed in plan.config.seed_list]
    return [g for g in groups if g.key not in done]


def runs_left(plan: StudyPlan, trials: pd.DataFrame, skipped: Collection[str] = ()) -> int:
    """At most how many adaptive runs remain: the seeds without a stored run of these settings, less
    those that failed in this call (`groups_left_at_most` adds it; each stored run lowers it by one)."""
    if plan.adaptive is None:
        return 0
    ours = of_settings(trials, plan.adaptive)
    stored = set(ours["seed"]) if len(ours) else set()
    failed = [k for k in skipped if k.startswith(f"{ADAPTIVE_GROUP}:") and k.endswith(f":{settings_text(plan.adaptive)}")]
    return max(0, len([s for s in plan.config.seed_list if s not in stored]) - len(failed))


def of_settings(trials: pd.DataFrame, settings: Adaptive) -> pd.DataFrame:
    """The stored adaptive trials of these settings (a study may hold runs of others)."""
    if trials.empty or "adaptive_settings" not in trials:
        return trials.iloc[0:0]
    return trials[(trials["kind"] == ADAPTIVE_GROUP) & (trials["adaptive_settings"] == settings_text(settings))]


# -- one run -------------------------------------------------------------------------------------


def train_adaptive(plan: StudyPlan, group: GroupPlan, dataset: Dataset) -> list:
    """Train one seed's adaptive run to the target, checked at the study's evaluation points.

    Returns:
        One `TrialRecord`, its summary with the adaptive columns (`run_columns`).
    """
    from ..loop import fit
    from .trials import GroupEvaluator, TargetWatcher, _now, _record

    (lr,), (seed,) = group.lrs, group.seeds
    config = train_config(plan, lr, seed)
    # Every evaluation point a run of this budget can reach: the most steps are at the start batch.
    schedule = evaluation_steps(plan.total_steps(plan.adaptive.start), plan.config.resolution)
    evaluator = GroupEvaluator(dataset, config, splits=(plan.target.metric.split("_")[0],))
    watcher = TargetWatcher(plan.target, schedule, evaluator, 0, plan.config.stop_at_target)
    started = _now()
    run = fit(plan.build_model(dataset, seed), dataset, config, callbacks=[watcher], progress=False)
    record = _record(plan, group, run, watcher, started, _now())
    record.summary.update(run_columns(plan.adaptive, record.steps, record.evals, record.summary, dataset.n_train))
    return [record]


def run_columns(settings: Adaptive, steps: Sequence[Mapping], evals: Sequence[Mapping], summary: Mapping[str, Any],
                n_train: int) -> dict[str, Any]:
    """An adaptive run's own summary columns, up to its target (to its end when it did not reach it).

    ``epochs_to_target`` and ``epochs`` are passes over the data (samples / N): the steps of an
    epoch change with the batch. ``batch_size_first``/``batch_size_last``: the batch of its first
    step and the largest it trained at; ``decisions``: its decisions; ``measurement_samples``:
    what they cost (`measurement_samples`); ``samples_with_measurements``: both together.
    """
    reached = summary.get("steps_to_target")
    until = float(reached) if reached is not None and math.isfinite(reached) else math.inf
    trained = [row for row in steps if row["step"] <= until]
    decided = decisions(evals, until)
    cost = measurement_samples(settings, decided, n_train)
    samples_end = float(trained[-1]["samples_seen"]) if trained else 0.0
    to_target = float(summary.get("samples_to_target", math.nan))
    return {
        "adaptive_settings": settings_text(settings),
        "epochs_to_target": to_target / n_train, "epochs": samples_end / n_train,
        "batch_size_first": int(trained[0]["batch_size"]) if trained else settings.start,
        "batch_size_last": int(max(row["batch_size"] for row in trained)) if trained else settings.start,
        "decisions": len(decided), "measurement_samples": cost,
        "samples_with_measurements": to_target + cost,
    }  # fmt: skip


def decisions(evals: Sequence[Mapping], before: float = math.inf) -> list[Mapping]:
    """The evaluation rows that hold a decision (``adaptive_batch_size``) at steps before ``before``.

    A decision at the step the target was reached could not have helped reach it (the run stops
    there), so it is not counted.
    """
    rows = [row for row in evals if row["step"] < before and _finite(row.get("adaptive_batch_size"))]
    return sorted(rows, key=lambda row: row["step"])


def measurement_samples(settings: Adaptive, decided: Sequence[Mapping], n_train: int) -> int:
    """The training samples the decisions' measurements took, from their stored evidence.

    Each decision measured at the batch in force before it (``start``, then each decision's
    ``adaptive_batch_size``), costing `decision_samples`; one that measured nothing or failed (NaN
    ``adaptive_signal``) is not counted. Evaluation passes (the branches' losses) are not counted,
    as the study's target checks are not counted for any row.
    """
    batch, total = settings.start, 0
    for row in decided:
        if _finite(row.get("adaptive_signal")):
            total += decision_samples(settings, batch, n_train)
        batch = int(row["adaptive_batch_size"])
    return total


def decision_samples(settings: Adaptive, batch: int, n_train: int) -> int:
    """The training samples of one decision's local-CBS branches at ``batch``: ``seeds`` branches at
    each factor k with k·B <= N (`batchlab.adaptive.FACTORS`), each trained on `local_cbs`'s default
    number of samples. A ``b_simple`` decision trains no branch (its per-sample gradients, of at
    most 512 samples, are not training samples): 0."""
    from ..adaptive import FACTORS
    from ..critical_batch import (
        _branch_samples,  # local_cbs's own default budget: one owner of it
    )

    if settings.signal != "local_cbs":
        return 0
    factors = [k for k in FACTORS if k * batch <= n_train]
    if len(factors) < 2:
        return 0
    return settings.seeds * len(factors) * _branch_samples(None, factors, batch)


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


# -- the row -------------------------------------------------------------------------------------


ROW_QUANTITIES = ("steps", "epochs", "samples", "seconds")


def adaptive_row(plan: StudyPlan, trials: pd.DataFrame) -> pd.DataFrame:
    """The adaptive row: one row, or an empty table when the study has no adaptive run stored.

    Columns as the summary's (`batchlab.study.summarize`) where they mean the same:
    ``batch_size`` ("adaptive"), ``best_lr`` (the lr at start), ``reached``, ``trials``,
    ``{steps,epochs,samples,seconds}_to_target`` (median over seeds, a seed that did not reach counting
    as never) with ``*_lo``/``*_hi`` (the spread over the seeds that reached), ``steps_ci_lo``/
    ``steps_ci_hi``/``steps_ci_level``/``steps_ci_seeds`` (`median_interval`), ``seconds_shared``;
    and its own: ``signal``, ``start``, ``max``, ``lr_source``, ``batch_size_first`` (the smallest
    first batch over seeds), ``batch_size_last_lo``/``_hi`` (the largest batch each seed trained at
    before its target, smallest and largest over seeds), ``decisions`` (median),
    ``measurement_samples`` (median, with ``_lo``/``_hi``) and ``samples_with_measurements``
    (median, as samples).
    """
    if plan.adaptive is None:
        return pd.DataFrame()
    runs = of_settings(trials, plan.adaptive).sort_values("seed")
    if runs.empty:
        return pd.DataFrame()
    chosen = start_lr(plan, trials)
    reached = runs["status"] == "reached"
    row: dict[str, Any] = {"batch_size": ADAPTIVE_GROUP, "signal": plan.adaptive.signal, "start": plan.adaptive.start,
                           "max": plan.adaptive.max, "best_lr": float(runs["lr"].iloc[0]),
                           "lr_source": chosen[1] if chosen is not None else "",
                           "reached": f"{int(reached.sum())}/{len(runs)}", "trials": len(runs),
                           "diverged": int((runs["status"] == "diverged").sum())}  # fmt: skip
    for quantity in (*ROW_QUANTITIES, "samples_with_measurements"):
        column = runs["samples_with_measurements" if quantity == "samples_with_measurements" else f"{quantity}_to_target"]
        name = quantity if quantity == "samples_with_measurements" else f"{quantity}_to_target"
        median = median_steps(column.where(reached))
        row[name] = median if math.isfinite(median) else math.nan
        if quantity in ROW_QUANTITIES:
            row[f"{quantity}_lo"] = float(column[reached].min()) if reached.any() else math.nan
            row[f"{quantity}_hi"] = float(column[reached].max()) if reached.any() else math.nan
    steps = np.where(reached, runs["steps_to_target"].to_numpy(float), np.inf)
    row["steps_ci_lo"], row["steps_ci_hi"], row["steps_ci_level"] = median_interval(steps)
    row["steps_ci_seeds"] = len(runs) if reached.any() else 0
    row["seconds_shared"] = bool(runs["seconds_shared"].fillna(False).astype(bool).any()) if "seconds_shared" in runs else False
    row["batch_size_first"] = int(runs["batch_size_first"].min())
    row["batch_size_last_lo"], row["batch_size_last_hi"] = int(runs["batch_size_last"].min()), int(runs["batch_size_last"].max())
    row["decisions"] = float(runs["decisions"].median())
    cost = runs["measurement_samples"].astype(float)
    row["measurement_samples"], row["measurement_samples_lo"], row["measurement_samples_hi"] = (
        float(cost.median()), float(cost.min()), float(cost.max()))
    return pd.DataFrame([row])


def batches_text(row: Mapping[str, Any]) -> str:
    """The batches an adaptive row went through: ``16→256``; ``16→64–256`` when the seeds ended at
    different batches (the smallest and largest); ``16`` when it never grew."""
    first, lo, hi = int(row["batch_size_first"]), int(row["batch_size_last_lo"]), int(row["batch_size_last_hi"])
    if first == lo == hi:
        return str(first)
    return f"{first}→{lo}" + (f"–{hi}" if hi != lo else "")


def beside(summary: pd.DataFrame, adaptive: pd.DataFrame | None) -> pd.DataFrame:
    """The summary with the adaptive row last (the summary itself when there is none): what the
    tables and ``summary.csv`` show. The row adds its own columns; the fixed rows leave them empty."""
    if adaptive is None or adaptive.empty:
        return summary
    shown = adaptive.assign(batches=batches_text(adaptive.iloc[0]))
    return pd.concat([summary, shown], ignore_index=True, sort=False)


def row_sentence(row: Mapping[str, Any], target: str) -> str:
    """The adaptive row in one sentence: settings, lr, what it took to the target, what it measured."""
    signal = "the local critical batch size" if row["signal"] == "local_cbs" else "the noise scale B_simple"
    head = (f"Adaptive batch size ({int(row['start'])} up to {int(row['max'])}, by {signal}; lr {row['best_lr']:.3g} "
            f"at the start, the {row['lr_source']}): ")
    steps = row["steps_to_target"]
    if not _finite(steps):
        return head + (f"reached {target} in {row['reached']} seeds, too few for a median; it went through batches "
                       f"{batches_text(row)} and its measurements took {_count(row['measurement_samples'])} samples "
                       "(median over seeds).")
    label = interval_label(float(row["steps_ci_level"]), int(row["steps_ci_seeds"]))
    interval = f"{label}: {_count(row['steps_ci_lo'])}–{_count(row['steps_ci_hi'])}" if row["steps_ci_level"] > 0 else label
    return head + (f"reached {target} in {_count(steps)} steps ({interval}) and {_count(row['samples_to_target'])} "
                   f"samples of training, going through batches {batches_text(row)}; its measurements took "
                   f"{_count(row['measurement_samples'])} samples more ({_count(row['samples_with_measurements'])} in "
                   "all; medians over seeds). Set beside the fixed batch sizes: the fit and the recommendation do not "
                   "use it.")


def _count(value: Any) -> str:
    number = float(value)
    if not math.isfinite(number):
        return "∞" if number > 0 else "?"
    return f"{number:,.0f}" if number >= 100 or number == int(number) else f"{number:.3g}"
