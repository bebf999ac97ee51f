"""Analysis: a pure step from the trials' stored summaries to the study's answer.

Best learning rate per batch size (median steps-to-target over seeds, `batchlab.study.ranking`),
what it took to reach the target there (median and spread over seeds), the fit
S = S_min (1 + B_crit/B) of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
eq. 2.11) with B_crit's uncertainty, the regimes of Shallue et al. 2019 ("Measuring the Effects of
Data Parallelism on Neural Network Training"), the generalization gap (Keskar et al. 2017) and a
recommendation. Nothing here trains, stores or draws: tables and numbers in, tables and numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..store.codec import plain
from .plan import LR_GROUP, NOISE_GROUP
from .ranking import best_lr, lr_table, median_steps

NO_GAIN_FACTOR = 1.25  # "no gain": no larger batch saves more than 1/1.25 = 20% of the steps
PERFECT_EFFICIENCY, NO_GAIN_EFFICIENCY = 0.8, 0.2  # -dlogS/dlogB thresholds of the regimes


def trials_table(summaries: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The trial summaries as a table; JSON nulls (stored NaN) back to NaN."""
    rows = [{k: (math.nan if v is None else v) for k, v in s.items()} for s in summaries]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["group", "kind", "round", "batch_size", "batch_size_value", "lr", "seed", "status"])
    return table.sort_values(["batch_size_value", "kind", "lr", "seed"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class ScalingFit:
    """S = S_min (1 + B_crit/B) fitted to the steps-to-target curve (McCandlish et al. 2018, eq. 2.11).

    Since E = S·B, the same two numbers give E = E_min (1 + B/B_crit) with E_min = S_min·B_crit
    (eq. 2.12); the ``*_err`` are one standard error from the fit's covariance. ``b_simple`` is
    the gradient noise scale measured near the target (median over batch sizes), for comparison:
    the paper predicts B_crit ≈ B_noise, with B_simple a proxy for B_noise.
    """

    s_min: float = math.nan
    s_min_err: float = math.nan
    e_min: float = math.nan
    e_min_err: float = math.nan
    b_crit: float = math.nan
    b_crit_err: float = math.nan
    b_simple: float = math.nan
    n_points: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.b_crit)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def fit_scaling(batch_sizes: Sequence[float], steps: Sequence[float], b_simple: float = math.nan) -> ScalingFit:
    """Fit S = S_min + E_min/B (i.e. S_min (1 + B_crit/B)) by least squares on log S.

    Log residuals weigh every batch size alike (S spans orders of magnitude). The parameters are
    log S_min and log E_min, so both stay positive; B_crit = E_min/S_min and its standard error
    follows from the covariance by the delta method.

    Args:
        batch_sizes: B of each point (``full`` as N).
        steps: steps-to-target at each B; non-finite points are left out.
        b_simple: the measured noise scale, carried into the result.

    Returns:
        A `ScalingFit`; NaN with a ``message`` when fewer than 3 points reached the target.
    """
    from scipy.optimize import curve_fit

    B, S = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    keep = np.isfinite(S) & (S > 0) & np.isfinite(B)
    B, S = B[keep], S[keep]
    if len(B) < 3:
        return ScalingFit(b_simple=b_simple, n_points=len(B),
                          message=f"{len(B)} batch sizes reached the target; the fit needs at least 3")

    def model(b, log_s_min, log_e_min):
        return np.log(np.exp(log_s_min) + np.exp(log_e_min) / b)

    start = (math.log(S.min()), math.log(max((S * B).min(), 1e-12)))
    try:
        params, cov = curve_fit(model, B, np.log(S), p0=start, bounds=([-50, -50], [50, 50]))
    except (RuntimeError, ValueError) as error:
        return ScalingFit(b_simple=b_simple, n_points=len(B), message=f"the fit did not converge: {error}")
    log_s, log_e = params
    s_min, e_min = math.exp(log_s), math.exp(log_e)
    b_crit = e_min / s_min
    var_log_b = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    err = lambda value, var: value * math.sqrt(var) if np.isfinite(var) and var >= 0 else math.nan  # noqa: E731
    return ScalingFit(s_min, err(s_min, cov[0, 0]), e_min, err(e_min, cov[1, 1]), b_crit, err(b_crit, var_log_b),
                      b_simple, len(B))


def _regime(efficiency: float) -> str:
    if not math.isfinite(efficiency):
        return ""
    if efficiency >= PERFECT_EFFICIENCY:
        return "perfect scaling"
    if efficiency <= NO_GAIN_EFFICIENCY:
        return "no gain"
    return "diminishing returns"


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per batch size: the best lr and what it took to reach the target (median, spread).

    The best lr has the fewest median steps-to-target over seeds (not reached counts as never);
    the ``*_lo``/``*_hi`` columns are the smallest and largest value over the seeds that reached
    it at that lr. ``gen_gap`` is the median over those seeds of train − val accuracy at the end
    of the trial (at the target with ``stop_at_target``). ``noise_scale`` is B_simple at the
    target (last measurement before it). ``scaling_efficiency`` is −Δlog S/Δlog B from the
    previous batch size: 1 when doubling B halves the steps, 0 when it saves none.
    """
    search = trials[trials["kind"] == LR_GROUP]
    noise = trials[trials["kind"] == NOISE_GROUP] if "kind" in trials else trials.iloc[0:0]
    rows = []
    for value, at_b in search.groupby("batch_size_value", sort=True):
        table = lr_table(at_b)
        best = best_lr(table)
        lrs = sorted(set(at_b["lr"]))
        row: dict[str, Any] = {"batch_size": at_b["batch_size"].iloc[0], "batch_size_value": int(value),
                               "best_lr": best if best is not None else math.nan, "lrs_tried": len(lrs),
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


def mark_regimes(summary: pd.DataFrame, fit: ScalingFit) -> pd.DataFrame:
    """Add ``regime``: perfect scaling, diminishing returns or no gain.

    From the fit, the local efficiency −dlog S/dlog B is B_crit/(B + B_crit): ≥ 0.8 (B ≤ B_crit/4)
    is perfect scaling, ≤ 0.2 (B ≥ 4 B_crit) no gain (Shallue et al. 2019's three regimes).
    Without a fit, the measured ``scaling_efficiency`` decides.
    """
    summary = summary.copy()
    if summary.empty:
        return summary
    if fit.ok:
        b = summary["batch_size_value"].to_numpy(float)
        efficiency = fit.b_crit / (b + fit.b_crit)
    else:
        efficiency = summary["scaling_efficiency"].to_numpy(float)
    regimes = [_regime(float(e)) for e in efficiency]
    summary["regime"] = [r if math.isfinite(s) else "" for r, s in zip(regimes, summary["steps_to_target"])]
    return summary


@dataclass(frozen=True)
class Recommendation:
    """A batch size and learning rate to use, the numbers behind them, and the sentence that says so.

    The choice balances steps against samples: among the batch sizes that reached the target, the
    one with the smallest product (S/S_min)·(E/E_min) on the fitted curve, i.e. the one nearest
    B_crit, where both are 2× their minimum (McCandlish et al. 2018); without a fit, the smallest
    product of the measured steps and samples relative to the fewest any batch size needed. The
    ratios quoted are measured ones.
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

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def recommend(summary: pd.DataFrame, fit: ScalingFit, target: str) -> Recommendation:
    """The recommendation (see `Recommendation`) from the summary and the fit."""
    reached = summary[summary["steps_to_target"].notna()] if not summary.empty else summary
    if reached.empty:
        return Recommendation(f"no batch size reached {target} within the budget; raise the budget "
                              "(epochs, max_steps), widen the learning rates or ease the target")
    s_min, e_min = reached["steps_to_target"].min(), reached["samples_to_target"].min()
    if fit.ok:  # the fitted trade-off is smoother than single measurements: pick the B nearest B_crit
        b = reached["batch_size_value"].astype(float)
        cost = (1 + fit.b_crit / b) * (1 + b / fit.b_crit)
    else:
        cost = (reached["steps_to_target"] / s_min) * (reached["samples_to_target"] / e_min)
    best = reached.loc[cost.idxmin()]
    steps = reached["steps_to_target"].to_numpy(float)
    no_gain = None
    for i in range(len(reached)):
        if all(steps[j] >= steps[i] / NO_GAIN_FACTOR for j in range(i + 1, len(reached))):
            no_gain = reached["batch_size"].iloc[i]
            break
    # Seconds measured while groups shared the cores say more about the sharing than the batch size.
    timed = reached[~reached["seconds_shared"]] if "seconds_shared" in reached else reached
    comparable = len(timed) == len(reached) and timed["seconds_to_target"].notna().any()
    fastest = timed.loc[timed["seconds_to_target"].idxmin()] if comparable else None
    b = best["batch_size"]
    text = (f"B = {b}, lr = {best['best_lr']:.3g}: reaches {target} in {_fmt(best['steps_to_target'])} steps "
            f"({best['epochs_to_target']:.3g} epochs, {_fmt(best['samples_to_target'])} samples), "
            f"{best['steps_to_target'] / s_min:.1f}× the minimum steps and "
            f"{best['samples_to_target'] / e_min:.1f}× the minimum samples")
    if no_gain is not None and no_gain != reached["batch_size"].iloc[-1]:
        text += f"; batches above ~{no_gain} buy no fewer steps"
    elif len(reached) > 1:
        text += f"; even the largest batch ({reached['batch_size'].iloc[-1]}) still saves steps"
    if fit.ok:
        text += (f". Critical batch size B_crit = {_fmt(fit.b_crit)} ± {_fmt(fit.b_crit_err)} "
                 f"(S_min = {_fmt(fit.s_min)} steps, E_min = {_fmt(fit.e_min)} samples)")
    if math.isfinite(fit.b_simple):
        text += f"; noise scale B_simple ≈ {_fmt(fit.b_simple)} near the target"
    if fastest is not None:
        text += f". Fastest here: B = {fastest['batch_size']} ({fastest['seconds_to_target']:.3g} s of training)"
    elif len(timed) < len(reached):
        text += ". Seconds were measured while groups shared the cores, so no batch size is called fastest"
    return Recommendation(
        text=text + ".", batch_size=plain(b), lr=float(best["best_lr"]), steps=float(best["steps_to_target"]),
        epochs=float(best["epochs_to_target"]), samples=float(best["samples_to_target"]),
        seconds=float(best["seconds_to_target"]), steps_ratio=float(best["steps_to_target"] / s_min),
        samples_ratio=float(best["samples_to_target"] / e_min), no_gain_above=plain(no_gain),
        fastest_batch_size=plain(fastest["batch_size"]) if fastest is not None else None,
        fastest_seconds=float(fastest["seconds_to_target"]) if fastest is not None else math.nan,
    )


@dataclass(frozen=True)
class Analysis:
    summary: pd.DataFrame
    fit: ScalingFit
    recommendation: Recommendation


def analyse(trials: pd.DataFrame, target: str) -> Analysis:
    """Summary, fit, regimes and recommendation from the trials' summaries alone."""
    summary = summarize(trials)
    if summary.empty:
        return Analysis(summary, ScalingFit(message="no trials"), recommend(summary, ScalingFit(), target))
    measured = summary.loc[summary["batch_size_value"] >= 2, "noise_scale"].dropna()
    fit = fit_scaling(summary["batch_size_value"], summary["steps_to_target"],
                      float(measured.median()) if len(measured) else math.nan)
    summary = mark_regimes(summary, fit)
    return Analysis(summary, fit, recommend(summary, fit, target))
