"""Analysis: a pure step from the trials' stored summaries to the study's answer.

Best learning rate per batch size (median steps-to-target over seeds, `batchlab.study.ranking`)
and how much better it was than its neighbours, what it took to reach the target there (median,
spread, and an exact interval for the median over seeds named with its true confidence), the fit
S = S_min (1 + B_crit/B) of McCandlish et al. 2018 with its uncertainty and quality
(`batchlab.study.scaling`), the regimes of Shallue et al. 2019, the generalization gap (Keskar et
al. 2017) and a recommendation, or, when the data cannot support one or a group failed, the
sentence that says so and what to change. Nothing here trains, stores or draws: tables and
numbers in, tables and numbers out; the bootstrap is seeded, so the same stored trials
always give the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..store.codec import plain
from .plan import LR_GROUP, NOISE_GROUP
from .ranking import best_lr, lr_table, median_steps
from .scaling import (
    BOOTSTRAP_SEED,
    ScalingFit,
    bootstrap_fit,
    bootstrap_steps,
    efficiency,
    fit_scaling,
    fitted_band,
    interval_label,
    median_interval,
    regime,
)


def trials_table(summaries: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The trial summaries as a table; JSON nulls (stored NaN) back to NaN."""
    rows = [{k: (math.nan if v is None else v) for k, v in s.items()} for s in summaries]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["group", "kind", "round", "batch_size", "batch_size_value", "lr", "seed", "status"])
    return table.sort_values(["batch_size_value", "kind", "lr", "seed"], kind="stable").reset_index(drop=True)


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per batch size: the best lr and what it took to reach the target (median, spread).

    The best lr has the fewest median steps-to-target over seeds (not reached counts as never);
    the ``*_lo``/``*_hi`` columns are the smallest and largest value over the seeds that reached
    it at that lr. ``gen_gap`` is the median over those seeds of train − val accuracy at the end
    of the trial (at the target with ``stop_at_target``). ``noise_scale`` is B_simple at the
    target (last measurement before it). ``scaling_efficiency`` is −Δlog S/Δlog B from the
    previous batch size: 1 when doubling B halves the steps, 0 when it saves none. ``lr_margin``
    is `lr_margin`: how many times more steps the best lr's nearest rival took (at least that
    many when ``lr_margin_is_bound``: the rival was pruned).
    """
    search = trials[trials["kind"] == LR_GROUP]
    noise = trials[trials["kind"] == NOISE_GROUP] if "kind" in trials else trials.iloc[0:0]
    rows = []
    for value, at_b in search.groupby("batch_size_value", sort=True):
        table = lr_table(at_b)
        best = best_lr(table)
        lrs = sorted(set(at_b["lr"]))
        row: dict[str, Any] = {"batch_size": at_b["batch_size"].iloc[0], "batch_size_value": int(value),
                               "best_lr": best if best is not None else math.nan,
                               "lr_margin": lr_margin(table, best),
                               "lr_margin_is_bound": lr_margin_is_bound(table, best), "lrs_tried": len(lrs),
                               "lr_at_edge": best is not None and len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                               "diverged": int((at_b["status"] == "diverged").sum()), "trials": len(at_b)}  # fmt: skip
        chosen = at_b[at_b["lr"] == best] if best is not None else at_b.iloc[0:0]
        row["reached"] = f"{int((chosen['status'] == 'reached').sum())}/{len(chosen)}" if best is not None else f"0/{len(at_b)}"
        for quantity in ("steps", "epochs", "samples", "seconds"):
            column = chosen[f"{quantity}_to_target"] if best is not None else pd.Series(dtype=float)
            median = median_steps(column) if len(column) else math.inf
            row[f"{quantity}_to_target"] = median if math.isfinite(median) else math.nan
            row[f"{quantity}_lo"] = float(column.min()) if column.notna().any() else math.nan
            row[f"{quantity}_hi"] = float(column.max()) if column.notna().any() else math.nan
        shared = chosen["seconds_shared"] if "seconds_shared" in chosen else pd.Series(dtype=bool)
        row["seconds_shared"] = bool(shared.fillna(False).astype(bool).any())  # timed while groups shared cores
        gaps = chosen["gen_gap"].dropna() if best is not None else pd.Series(dtype=float)
        row["gen_gap"] = float(gaps.median()) if len(gaps) else math.nan
        row["gen_gap_lo"] = float(gaps.min()) if len(gaps) else math.nan
        row["gen_gap_hi"] = float(gaps.max()) if len(gaps) else math.nan
        measured = noise[noise["batch_size_value"] == value]["noise_scale"] if len(noise) else chosen["noise_scale"]
        measured = measured.dropna() if "noise_scale" in trials else pd.Series(dtype=float)
        row["noise_scale"] = float(measured.median()) if len(measured) else math.nan
        for metric in ("final_val_acc", "final_val_loss"):
            if metric in chosen and chosen[metric].notna().any():
                row[metric] = float(chosen[metric].median())
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    logs_b, logs_s = np.log(summary["batch_size_value"].to_numpy(float)), np.log(summary["steps_to_target"].to_numpy(float))
    efficiency = [math.nan] + [float(-(logs_s[i] - logs_s[i - 1]) / (logs_b[i] - logs_b[i - 1]))
                               for i in range(1, len(summary))]
    summary["scaling_efficiency"] = efficiency
    return summary




def lr_margin(table: pd.DataFrame, best: float | None) -> float:
    """How much better the best lr was than its neighbours in the grid tried.

    The fewer median steps-to-target of the lrs just below and above the best one, divided by the
    best one's: 1.5 means the nearest rival needed 50% more steps; inf when neither neighbour
    reached the target; NaN with no neighbour (one lr tried) or no best. A neighbour that was
    pruned counts with the step it had trained to without reaching the target, so the margin is
    then a lower bound (`lr_margin_is_bound`).
    """
    if best is None or len(table) < 2:
        return math.nan
    ordered, i = _neighbourhood(table, best)
    column = "median_steps_at_least" if "median_steps_at_least" in ordered else "median_steps"
    neighbours = ordered.loc[[j for j in (i - 1, i + 1) if 0 <= j < len(ordered)], column]
    return float(neighbours.min() / ordered.loc[i, "median_steps"])


def lr_margin_is_bound(table: pd.DataFrame, best: float | None) -> bool:
    """Whether `lr_margin` is a lower bound: the nearest rival was pruned before it could finish."""
    if best is None or len(table) < 2 or "median_steps_at_least" not in table:
        return False
    ordered, i = _neighbourhood(table, best)
    neighbours = ordered.loc[[j for j in (i - 1, i + 1) if 0 <= j < len(ordered)]]
    nearest = neighbours.loc[neighbours["median_steps_at_least"].idxmin()]
    return bool(nearest["median_steps_at_least"] != nearest["median_steps"])


def _neighbourhood(table: pd.DataFrame, best: float) -> tuple[pd.DataFrame, int]:
    ordered = table.sort_values("lr").reset_index(drop=True)
    return ordered, int(ordered.index[ordered["lr"] == best][0])


def best_lr_cells(trials: pd.DataFrame, summary: pd.DataFrame) -> list[np.ndarray]:
    """Per batch size, the steps-to-target of its best lr's seeds as a (1, K) array (NaN: not reached).

    The bootstrap resamples the seeds at the chosen lr only. Re-choosing the lr in every replicate
    would need every other lr's full results, which pruning rightly never computes (a pruned lr
    cannot be the best on these seeds); how clearly the lr won is reported as ``lr_margin``.
    """
    search = trials[trials["kind"] == LR_GROUP]
    cells = []
    for value, best in zip(summary["batch_size_value"], summary["best_lr"]):
        at_best = search[(search["batch_size_value"] == value) & np.isclose(search["lr"].astype(float), float(best))]
        row = at_best.sort_values("seed")["steps_to_target"].to_numpy(dtype=float) if math.isfinite(float(best)) else []
        cells.append(np.asarray(row if len(row) else [np.nan], dtype=float)[None, :])  # (1, K)
    return cells


def with_intervals(summary: pd.DataFrame, trials: pd.DataFrame, fit: ScalingFit) -> tuple[pd.DataFrame, ScalingFit]:
    """The intervals: steps-to-target per batch size, B_crit and S_min, the fitted band.

    Adds ``steps_ci_lo``/``steps_ci_hi``, the exact order-statistic interval for the median over
    the ``steps_ci_seeds`` seeds at the best lr (`median_interval`; inf at the top when too few
    seeds reached the target), with its true confidence ``steps_ci_level`` (75% for 3 seeds: their
    range; `steps_interval_label` names it); ``fit_residual`` (log S − log S_fit); and the fitted
    curve with its 95% bootstrap band at each batch size (``steps_fit``, ``steps_fit_lo``,
    ``steps_fit_hi``). The bootstrap over seeds and batch sizes also gives B_crit's and S_min's
    95% intervals (their coverage is checked by simulation in tests/test_study_coverage.py).
    """
    summary = summary.copy()
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    values = summary["batch_size_value"].to_numpy(dtype=float)
    cells = best_lr_cells(trials, summary)
    bounds = [median_interval(np.where(np.isfinite(cell[0]), cell[0], np.inf)) for cell in cells]
    summary["steps_ci_lo"], summary["steps_ci_hi"], summary["steps_ci_level"] = (list(column) for column in zip(*bounds))
    summary["steps_ci_seeds"] = [cell.shape[1] if np.isfinite(cell).any() else 0 for cell in cells]
    replicates = bootstrap_steps(cells, rng)  # (R, n)
    fit, kept = bootstrap_fit(fit, values, replicates, rng)
    band = fitted_band(fit, kept, values, points=len(values)) if len(values) > 1 else {}
    if band:
        summary["steps_fit"] = fit.steps_at(values)
        summary["fit_residual"] = np.log(summary["steps_to_target"].to_numpy(float)) - np.log(summary["steps_fit"])
        at = lambda column: np.exp(np.interp(np.log(values), np.log(band["batch_size_value"]), np.log(band[column])))  # noqa: E731
        summary["steps_fit_lo"], summary["steps_fit_hi"] = at("steps_fit_lo"), at("steps_fit_hi")
    return summary, fit


def steps_interval_label(row: Any) -> str:
    """The name of one batch size's steps interval (a summary row): "75% CI, range of 3 seeds"."""
    return interval_label(float(row["steps_ci_level"]), int(row["steps_ci_seeds"]))


def _steps_interval_words(row: Any) -> str:
    """"75% CI, range of 3 seeds: 68–86", or the label alone when one seed gives no interval."""
    if not row["steps_ci_level"] > 0:
        return steps_interval_label(row)
    return f"{steps_interval_label(row)}: {_fmt(row['steps_ci_lo'])}–{_fmt(row['steps_ci_hi'])}"


def mark_regimes(summary: pd.DataFrame, fit: ScalingFit) -> pd.DataFrame:
    """Add ``regime``, decided for every batch size by `batchlab.study.scaling.regime`.

    Its efficiency comes from the fit (B_crit/(B + B_crit)) when there is one, else from the
    measured ``scaling_efficiency``; batch sizes that did not reach the target get "".
    """
    summary = summary.copy()
    if summary.empty:
        return summary
    local = efficiency(summary["batch_size_value"].to_numpy(float), fit, summary["scaling_efficiency"].to_numpy(float))
    regimes = [regime(float(e)) for e in local]
    summary["regime"] = [r if math.isfinite(s) else "" for r, s in zip(regimes, summary["steps_to_target"])]
    return summary


def no_gain_from(reached: pd.DataFrame) -> Any:
    """The smallest batch size from which every larger one that reached the target is in the no-gain regime."""
    start = None
    for batch_size, name in zip(reached["batch_size"], reached["regime"]):
        if name == "no gain":
            start = batch_size if start is None else start
        else:
            start = None
    return start


def failure_sentence(failed: Mapping[str, str]) -> str | None:
    """The recommendation's sentence when groups failed (their training raised): which, and why.

    A failed group's trials are missing, not slow, so no batch size is recommended from the rest
    and the step budget is not blamed. None when nothing failed.
    """
    if not failed:
        return None
    named = [f"{_group_words(key)}: {' '.join(str(error).split()).rstrip('.')}" for key, error in sorted(failed.items())]
    shown = "; ".join(named[:3]) + (f"; and {len(named) - 3} more" if len(named) > 3 else "")
    groups = "1 group" if len(named) == 1 else f"{len(named)} groups"
    return (f"The study is incomplete: {groups} failed ({shown}), so no batch size is recommended; "
            "mend the cause and rerun the same command, which retries the failed groups only.")


def _group_words(key: str) -> str:
    """``lrs:B=64:lrs=...:seeds=...`` as "the lr search at B = 64" (the key's own text if not that shape)."""
    kind, _, rest = key.partition(":")
    batch = rest.partition(":")[0].removeprefix("B=")
    what = {LR_GROUP: "the lr search", NOISE_GROUP: "the noise-scale trial"}.get(kind)
    return f"{what} at B = {batch}" if what and rest.startswith("B=") else key


def unsupported(summary: pd.DataFrame, fit: ScalingFit, target: str, failed: Mapping[str, str] | None = None) -> str | None:
    """Why the data cannot support a recommendation, and what to change; None when they can.

    In order: a group failed (`failure_sentence`); fewer than 3 batch sizes reached the target; a
    best lr at the edge of the lrs tried (after all extensions); a B_crit interval that spans every
    batch size measured; no bend in the curve (B_crit outside the batch sizes measured).
    """
    failure = failure_sentence(failed or {})
    if failure is not None:
        return failure
    reached = summary[summary["steps_to_target"].notna()] if not summary.empty else summary
    if reached.empty:
        return (f"No batch size reached {target} within the budget; raise the budget (epochs, max_steps), "
                "widen the learning rates or ease the target.")
    sizes = ", ".join(map(str, reached["batch_size"]))
    if len(reached) < 3:
        return (f"Only {len(reached)} batch sizes reached {target} (B = {sizes}), too few to find the critical "
                "batch size; raise the budget (max_steps), widen the learning rates or ease the target.")
    edge = reached[reached["lr_at_edge"].astype(bool)]["batch_size"].tolist()
    if edge:
        return (f"The best learning rate of B = {', '.join(map(str, edge))} lies at the edge of the rates tried, so "
                "a better one may lie beyond; widen the grid (lr_grid_size, lr_extensions or lrs) and run again.")
    smallest, largest = reached["batch_size"].iloc[0], reached["batch_size"].iloc[-1]
    values = reached["batch_size_value"].to_numpy(float)
    if fit.ok and fit.b_crit_lo <= values.min() and fit.b_crit_hi >= values.max():
        return (f"The critical batch size is not resolved: its 95% bootstrap interval ({_fmt(fit.b_crit_lo)} to "
                f"{_fmt(fit.b_crit_hi)}) spans every batch size measured; run more seeds or choose a target "
                "every batch size reaches more steadily.")
    if fit.ok and fit.at_edge and fit.b_crit > values.max():
        return (f"Steps fall in proportion to 1/B up to the largest batch measured (B = {largest}), so the "
                "critical batch size lies beyond it; add larger batch sizes.")
    if fit.ok and fit.at_edge:
        return (f"No batch size saves steps over the smallest one measured (B = {smallest}), so the critical "
                "batch size lies below it; add smaller batch sizes.")
    return None


@dataclass(frozen=True)
class Recommendation:
    """A batch size and learning rate to use, the numbers behind them, and the sentence that says so.

    The choice balances steps against samples: among the batch sizes that reached the target, the
    one with the smallest product (S/S_min)·(E/E_min) on the fitted curve, i.e. the one nearest
    B_crit, where both are 2× their minimum (McCandlish et al. 2018). The ratios quoted are
    measured ones. ``no_gain_above`` is the smallest batch size from which every larger one is in
    the no-gain regime (the summary's ``regime``). When the data cannot support a choice
    (`unsupported`), ``text`` says so and what to change, and ``batch_size`` is None.
    """

    text: str
    batch_size: int | str | None = None
    lr: float = math.nan
    steps: float = math.nan
    epochs: float = math.nan
    samples: float = math.nan
    seconds: float = math.nan
    steps_ratio: float = math.nan
    samples_ratio: float = math.nan
    no_gain_above: int | str | None = None
    fastest_batch_size: int | str | None = None
    fastest_seconds: float = math.nan
    supported: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "∞" if value > 0 else "?"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def regime_words(reached: pd.DataFrame) -> str:
    """What the regimes say about larger batches, in words derived from the ``regime`` column only."""
    start = no_gain_from(reached)
    largest = reached["batch_size"].iloc[-1]
    if start is None:
        return f"even the largest batch (B = {largest}, {reached['regime'].iloc[-1]}) still saves steps"
    if start == reached["batch_size"].iloc[0]:
        return "every batch size measured is in the no-gain regime"
    return f"batches of {start} and above are in the no-gain regime: they buy no fewer steps"


def recommend(summary: pd.DataFrame, fit: ScalingFit, target: str,
              failed: Mapping[str, str] | None = None) -> Recommendation:
    """The recommendation (see `Recommendation`) from the summary (with ``regime``) and the fit.

    Args:
        failed: group key -> error of the groups whose training raised; any makes it unsupported.
    """
    reason = unsupported(summary, fit, target, failed)
    if reason is not None or not fit.ok:
        return Recommendation(reason or f"No recommendation: {fit.message}.")
    reached = summary[summary["steps_to_target"].notna()]
    s_min, e_min = reached["steps_to_target"].min(), reached["samples_to_target"].min()
    b = reached["batch_size_value"].astype(float)
    best = reached.loc[((1 + fit.b_crit / b) * (1 + b / fit.b_crit)).idxmin()]  # the B nearest B_crit
    # Seconds measured while groups shared the cores say more about the sharing than the batch size.
    timed = reached[~reached["seconds_shared"].astype(bool)] if "seconds_shared" in reached else reached
    comparable = len(timed) == len(reached) and timed["seconds_to_target"].notna().any()
    fastest = timed.loc[timed["seconds_to_target"].idxmin()] if comparable else None
    text = (f"B = {best['batch_size']}, lr = {best['best_lr']:.3g}: reaches {target} in {_fmt(best['steps_to_target'])} "
            f"steps ({_steps_interval_words(best)}; "
            f"{best['epochs_to_target']:.3g} epochs, {_fmt(best['samples_to_target'])} samples), "
            f"{best['steps_to_target'] / s_min:.1f}× the fewest steps and {best['samples_to_target'] / e_min:.1f}× "
            f"the fewest samples of any batch size; {regime_words(reached)}. "
            f"Critical batch size B_crit = {_fmt(fit.b_crit)} (95% bootstrap CI {_fmt(fit.b_crit_lo)}–{_fmt(fit.b_crit_hi)}; "
            f"± {_fmt(fit.b_crit_err)} by the delta method), S_min = {_fmt(fit.s_min)} steps, "
            f"E_min = {_fmt(fit.e_min)} samples; the fit explains R² = {fit.r2:.2f} of log S")
    if math.isfinite(fit.b_simple):
        text += f"; noise scale B_simple ≈ {_fmt(fit.b_simple)} near the target"
    if fastest is not None:
        text += f". Fastest here: B = {fastest['batch_size']} ({fastest['seconds_to_target']:.3g} s of training)"
    elif len(timed) < len(reached):
        text += ". Seconds were measured while groups shared the cores, so no batch size is called fastest"
    return Recommendation(
        text=text + ".", batch_size=plain(best["batch_size"]), lr=float(best["best_lr"]),
        steps=float(best["steps_to_target"]), epochs=float(best["epochs_to_target"]),
        samples=float(best["samples_to_target"]), seconds=float(best["seconds_to_target"]),
        steps_ratio=float(best["steps_to_target"] / s_min), samples_ratio=float(best["samples_to_target"] / e_min),
        no_gain_above=plain(no_gain_from(reached)),
        fastest_batch_size=plain(fastest["batch_size"]) if fastest is not None else None,
        fastest_seconds=float(fastest["seconds_to_target"]) if fastest is not None else math.nan, supported=True,
    )


@dataclass(frozen=True)
class Analysis:
    summary: pd.DataFrame
    fit: ScalingFit
    recommendation: Recommendation


def analyse(trials: pd.DataFrame, target: str, failed: Mapping[str, str] | None = None) -> Analysis:
    """Summary, fit with its intervals, regimes and recommendation from the trials' summaries alone.

    Args:
        failed: group key -> error of the study's failed groups (their trials are missing); the
            recommendation then names them instead of recommending from the rest.
    """
    summary = summarize(trials)
    if summary.empty:
        return Analysis(summary, ScalingFit(message="no trials"), recommend(summary, ScalingFit(), target, failed))
    measured = summary.loc[summary["batch_size_value"] >= 2, "noise_scale"].dropna()
    fit = fit_scaling(summary["batch_size_value"], summary["steps_to_target"],
                      float(measured.median()) if len(measured) else math.nan)
    summary, fit = with_intervals(summary, trials, fit)
    summary = mark_regimes(summary, fit)
    return Analysis(summary, fit, recommend(summary, fit, target, failed))
