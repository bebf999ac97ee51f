"""Pruning: stop the trials of a learning rate that can no longer be the best at its batch size.

The best learning rate of a batch size has the fewest median steps-to-target over seeds
(`batchlab.study.ranking`; a seed that never reaches counts as +inf). While a group trains, every
trial's steps-to-target S lies in an interval known so far:

* reached at an evaluated step s: S = s;
* ended without reaching (budget, divergence): S = +inf;
* evaluated up to step t without reaching: t + 1 <= S <= +inf (not started: 1 <= S).

The median is non-decreasing in each of its arguments, so the median of the lower ends bounds an
lr's final median from below and the median of the upper ends bounds it from above. An lr whose
lower bound exceeds the smallest upper bound of any lr (or the best median of an earlier round at
this batch size) has a final median strictly larger than the best one's: it cannot be the best,
nor tie with it, so its trials stop. The best lr is never stopped (its lower bound never exceeds
its own final median, which no upper bound undercuts), so every number the analysis reports about
it is what the study without pruning reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class LrPruner:
    """Interval bounds on every trial's steps-to-target in one group, and the stop decision.

    Args:
        trial_lrs: the learning rate of each trial, indexed by the trial's key in the group.
        best_before: the best median steps-to-target found at this batch size before this group
            (an earlier round of its lr search), or +inf.
    """

    def __init__(self, trial_lrs: Sequence[float], best_before: float = math.inf):
        self.trial_lrs = list(trial_lrs)
        self.lower = np.ones(len(self.trial_lrs))  # (n_trials,) S >= lower
        self.upper = np.full(len(self.trial_lrs), math.inf)  # (n_trials,) S <= upper
        self.best_before = best_before
        self.pruned: set[float] = set()
        self.rows = {lr: np.array([k for k, value in enumerate(self.trial_lrs) if value == lr])
                     for lr in set(self.trial_lrs)}  # lr -> its trials' keys
        self.best_upper: float | None = None  # `_best_upper_median`, until an upper bound changes

    def evaluated(self, key: int, step: int, reached: bool) -> None:
        """Trial ``key`` was evaluated at ``step``: the target held there (first time) or not yet."""
        if reached:
            self.lower[key] = self.upper[key] = step
            self.best_upper = None
        else:
            self.lower[key] = max(self.lower[key], step + 1)

    def ended_without_target(self, key: int) -> None:
        """Trial ``key`` ended (budget or divergence) without reaching: S = +inf."""
        self.lower[key] = self.upper[key] = math.inf
        self.best_upper = None

    def should_stop(self, key: int) -> bool:
        """True when trial ``key``'s lr can no longer be the best (it is then pruned for good)."""
        lr = self.trial_lrs[key]
        if lr not in self.pruned and self._lower_median(lr) > self._best_upper_median():
            self.pruned.add(lr)
        return lr in self.pruned

    def _lower_median(self, lr: float) -> float:
        return float(np.median(self.lower[self.rows[lr]]))

    def _best_upper_median(self) -> float:
        # Upper bounds change only when a trial reaches or ends: computed again then, not at every check.
        if self.best_upper is None:
            uppers = [float(np.median(self.upper[rows])) for rows in self.rows.values()]
            self.best_upper = min([self.best_before, *uppers])
        return self.best_upper
