"""Ranking the learning rates of one batch size: median steps-to-target over seeds, the best lr.

One owner for "which lr is best": the plan extends a grid from it, the trials prune with it and the
analysis reports it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def median_steps(values: pd.Series) -> float:
    """Median over seeds with not-reached as +inf: finite only when at least half the seeds reached."""
    return float(np.median(values.fillna(np.inf).to_numpy(dtype=float)))


def lr_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per learning rate of a batch size's lr search: median steps over seeds, counts."""
    rows = []
    for lr, at_lr in trials.groupby("lr", sort=True):
        reached = at_lr["steps_to_target"].dropna()
        rows.append({"lr": float(lr), "trials": len(at_lr), "reached": int((at_lr["status"] == "reached").sum()),
                     "diverged": int((at_lr["status"] == "diverged").sum()),
                     "median_steps": median_steps(at_lr["steps_to_target"]),
                     "median_steps_at_least": median_steps(_at_least(at_lr)),
                     "mean_reached_steps": float(reached.mean()) if len(reached) else math.inf})  # fmt: skip
    return pd.DataFrame(rows)


def _at_least(trials: pd.DataFrame) -> pd.Series:
    """Steps-to-target, or a lower bound where a trial was pruned: it had not reached the target
    by ``pruned_at_step`` (its lr could no longer be the best); never reached stays NaN."""
    if "pruned_at_step" not in trials:
        return trials["steps_to_target"]
    return trials["steps_to_target"].fillna(trials["pruned_at_step"])


def best_lr(table: pd.DataFrame) -> float | None:
    """Fewest median steps; ties broken by the mean over reached seeds, then the smaller lr."""
    finite = table[np.isfinite(table["median_steps"])]
    if finite.empty:
        return None
    ranked = finite.sort_values(["median_steps", "mean_reached_steps", "lr"], kind="stable")
    return float(ranked.iloc[0]["lr"])
