"""The steps/batch-size law S = S_min (1 + B_crit/B), its uncertainty, and the regimes it implies.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.11) model the steps
to a target as S = S_min (1 + B_crit/B): doubling B halves the steps while B ≪ B_crit and saves
almost none once B ≫ B_crit. This module fits that curve to the measured steps-to-target, gives
B_crit and S_min with two kinds of uncertainty, and names the regime of every batch size
(Shallue et al. 2019):

* the delta-method standard error from the fit's covariance (assumes the model and Gaussian
  residuals on log S; it understates the spread when a few noisy seeds decide each point);
* a percentile bootstrap over seeds and batch sizes (`bootstrap_steps`, `bootstrap_fit`): each
  replicate resamples the seeds of every (batch size, lr) cell, re-picks the best lr, then
  resamples the batch sizes and refits. It is seeded, so the analysis stays a pure function of the
  stored results.

The steps to the target at one batch size get an exact, distribution-free interval for the
median over seeds (`median_interval`): with K seeds its confidence is fixed by K alone, 75% for
three (their range), and it is labelled with that level (`interval_label`), not with a 95% it
cannot have. The bootstrap intervals of B_crit, S_min and the fitted band are checked against
their stated 95% by simulation from the model itself (tests/test_study_coverage.py).

The fit profiles out S_min: for a fixed B_crit, log S_min is the mean of log S − log(1 + B_crit/B),
so the only search is over log B_crit, on a grid (vectorized over bootstrap replicates) refined
by a bounded scalar minimisation. A B_crit at the grid's edge means the data show no bend: all
perfect scaling (B_crit above every B measured) or no gain at all (below every B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERFECT_EFFICIENCY, NO_GAIN_EFFICIENCY = 0.8, 0.2  # -dlogS/dlogB thresholds of the regimes
REGIMES = ("perfect scaling", "diminishing returns", "no gain")
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0  # the analysis is a pure function of the stored results: a fixed seed
GRID_DECADES = 3  # the B_crit grid reaches this many decades beyond the measured batch sizes
GRID_POINTS = 600


@dataclass(frozen=True)
class ScalingFit:
    """S = S_min (1 + B_crit/B) fitted to the steps-to-target curve (McCandlish et al. 2018, eq. 2.11).

    Since E = S·B, the same two numbers give E = E_min (1 + B/B_crit) with E_min = S_min·B_crit
    (eq. 2.12). The ``*_err`` are one standard error by the delta method from the fit's
    covariance; ``*_lo``/``*_hi`` the 95% bootstrap interval over seeds and batch sizes (NaN until
    `with_intervals`). ``r2`` is the share of the variance of log S the curve explains.
    ``b_simple`` is the gradient noise scale measured near the target (median over batch sizes),
    for comparison: the paper predicts B_crit ≈ B_noise, with B_simple a proxy for B_noise.
    ``at_edge`` is true when B_crit sits at the edge of its search range (no bend in the data).
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
    r2: float = math.nan
    at_edge: bool = False
    b_crit_lo: float = math.nan
    b_crit_hi: float = math.nan
    s_min_lo: float = math.nan
    s_min_hi: float = math.nan
    bootstrap_samples: int = 0

    @property
    def ok(self) -> bool:
        return math.isfinite(self.b_crit)

    def steps_at(self, batch_size: np.ndarray | float) -> np.ndarray:
        """The fitted steps S_min (1 + B_crit/B) at the given batch sizes."""
        return self.s_min * (1 + self.b_crit / np.asarray(batch_size, dtype=float))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def b_crit_grid(batch_sizes: np.ndarray) -> np.ndarray:
    """Candidate log B_crit values: from GRID_DECADES below the smallest B to as many above the largest."""
    low = math.log(batch_sizes.min()) - GRID_DECADES * math.log(10)
    high = math.log(batch_sizes.max()) + GRID_DECADES * math.log(10)
    return np.linspace(low, high, GRID_POINTS)


def profile_fit(log_b: np.ndarray, log_s: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Least squares of log S on log S_min + log(1 + B_crit/B), on a grid of log B_crit, many fits at once.

    Args:
        log_b: (n,) log batch sizes.
        log_s: (R, n) log steps of R data sets (a bootstrap's replicates; non-finite where missing).
        weights: (R, n) how often each point counts (0 leaves it out).
        grid: (G,) candidate log B_crit.

    Returns:
        ``(index, log_s_min, sse)``: per replicate (R,) the best grid index, log S_min there and the
        sum of squared residuals.
    """
    shape = np.log1p(np.exp(grid[:, None] - log_b[None, :]))  # (G, n): log(1 + B_crit/B)
    w = np.where(np.isfinite(log_s), weights, 0.0)  # (R, n)
    y = np.where(w > 0, log_s, 0.0)  # (R, n)
    total = w.sum(axis=1, keepdims=True)  # (R, 1)
    mean_gap = ((w * y).sum(1, keepdims=True) - w @ shape.T) / total  # (R, G): log S_min at each B_crit
    sse = (w * y**2).sum(1, keepdims=True) - 2 * (w * y) @ shape.T + w @ (shape**2).T - total * mean_gap**2
    index = np.argmin(sse, axis=1)  # (R,)
    rows = np.arange(len(index))
    return index, mean_gap[rows, index], sse[rows, index]


def fit_scaling(batch_sizes: Sequence[float], steps: Sequence[float], b_simple: float = math.nan) -> ScalingFit:
    """Fit S = S_min + E_min/B (i.e. S_min (1 + B_crit/B)) by least squares on log S.

    Log residuals weigh every batch size alike (S spans orders of magnitude). The grid of
    `profile_fit` finds the basin, a bounded scalar search refines log B_crit, and the standard
    errors of S_min, E_min and B_crit follow from the covariance of (log S_min, log E_min),
    s²(JᵀJ)⁻¹, by the delta method.

    Args:
        batch_sizes: B of each point (``full`` as N).
        steps: steps-to-target at each B; non-finite points are left out.
        b_simple: the measured noise scale, carried into the result.

    Returns:
        A `ScalingFit`; NaN with a ``message`` when fewer than 3 points reached the target.
    """
    from scipy.optimize import minimize_scalar

    B, S = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    keep = np.isfinite(S) & (S > 0) & np.isfinite(B) & (B > 0)
    B, S = B[keep], S[keep]
    if len(np.unique(B)) < 3:
        return ScalingFit(b_simple=b_simple, n_points=len(B),
                          message=f"{len(B)} batch sizes reached the target; the fit needs at least 3")
    log_b, log_s = np.log(B), np.log(S)
    grid = b_crit_grid(B)
    index, _, _ = profile_fit(log_b, log_s[None, :], np.ones((1, len(B))), grid)
    at_edge = int(index[0]) in (0, len(grid) - 1)
    low, high = grid[max(index[0] - 1, 0)], grid[min(index[0] + 1, len(grid) - 1)]

    def sse(log_b_crit: float) -> float:
        shape = np.log1p(np.exp(log_b_crit - log_b))
        return float(np.sum((log_s - shape - np.mean(log_s - shape)) ** 2))

    log_b_crit = float(minimize_scalar(sse, bounds=(low, high), method="bounded", options={"xatol": 1e-10}).x)
    shape = np.log1p(np.exp(log_b_crit - log_b))
    log_s_min = float(np.mean(log_s - shape))
    s_min, b_crit = math.exp(log_s_min), math.exp(log_b_crit)
    residuals = log_s - log_s_min - shape
    total = float(np.sum((log_s - log_s.mean()) ** 2))
    r2 = 1 - float(np.sum(residuals**2)) / total if total > 0 else math.nan
    cov = _covariance(B, s_min, s_min * b_crit, residuals)
    var_log_b = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    err = lambda value, var: value * math.sqrt(var) if np.isfinite(var) and var >= 0 else math.nan  # noqa: E731
    return ScalingFit(s_min, err(s_min, cov[0, 0]), s_min * b_crit, err(s_min * b_crit, cov[1, 1]), b_crit,
                      err(b_crit, var_log_b), b_simple, len(B), r2=r2, at_edge=at_edge)


def _covariance(B: np.ndarray, s_min: float, e_min: float, residuals: np.ndarray) -> np.ndarray:
    """Covariance of (log S_min, log E_min): s²(JᵀJ)⁻¹ with J the Jacobian of the log-model (as curve_fit)."""
    dof = len(B) - 2
    fitted = s_min + e_min / B  # (n,)
    jacobian = np.column_stack([s_min / fitted, (e_min / B) / fitted])  # (n, 2): d log S / d(log S_min, log E_min)
    if dof <= 0:
        return np.full((2, 2), np.inf)
    try:
        return float(np.sum(residuals**2)) / dof * np.linalg.inv(jacobian.T @ jacobian)
    except np.linalg.LinAlgError:
        return np.full((2, 2), np.inf)


def bootstrap_steps(cells: Sequence[np.ndarray], rng: np.random.Generator, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """Steps-to-target at each batch size's best lr, over bootstrap resamples of the seeds.

    Each replicate draws the seeds of a batch size with replacement (the same draw for all its
    lrs, since a seed fixes initialisation and data order at every lr), takes the median over
    them per lr (not reached = never) and keeps the fewest: the lr choice is redone every time.

    Args:
        cells: per batch size, an (L, K) array of steps-to-target, lrs × seeds, NaN where not reached.
        rng: the generator (seeded by the caller).
        samples: number of replicates R.

    Returns:
        (R, n) steps-to-target; inf where no lr reached the target in that replicate.
    """
    out = np.empty((samples, len(cells)))
    for j, cell in enumerate(cells):
        steps = np.where(np.isfinite(cell), cell, np.inf)  # (L, K)
        draws = rng.integers(0, steps.shape[1], size=(samples, steps.shape[1]))  # (R, K)
        medians = np.median(steps[:, draws], axis=2)  # (L, R)
        out[:, j] = medians.min(axis=0)
    return out


def bootstrap_fit(fit: ScalingFit, batch_sizes: np.ndarray, replicate_steps: np.ndarray,
                  rng: np.random.Generator) -> tuple[ScalingFit, np.ndarray]:
    """Bootstrap intervals for B_crit and S_min, over seeds (the replicates given) and batch sizes.

    Every replicate of `bootstrap_steps` is refitted with its batch sizes resampled with
    replacement (multinomial weights); replicates with fewer than 3 distinct batch sizes that
    reached the target are dropped and counted out.

    Args:
        fit: the fit of the measured data.
        batch_sizes: (n,) the batch sizes (``full`` as N).
        replicate_steps: (R, n) from `bootstrap_steps`.
        rng: the generator.

    Returns:
        The fit with ``b_crit_lo/hi``, ``s_min_lo/hi`` and ``bootstrap_samples``, and the (R', 2)
        replicates (S_min, B_crit) kept, for the band around the fitted curve.
    """
    n_rep, n = replicate_steps.shape
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_rep).astype(float)  # (R, n)
    log_s = np.log(replicate_steps)  # inf where not reached: left out by profile_fit
    usable = ((weights > 0) & np.isfinite(log_s)).sum(axis=1) >= 3
    if not fit.ok or not usable.any():
        return fit, np.empty((0, 2))
    grid = b_crit_grid(batch_sizes)
    index, log_s_min, _ = profile_fit(np.log(batch_sizes), log_s[usable], weights[usable], grid)
    kept = np.column_stack([np.exp(log_s_min), np.exp(grid[index])])  # (R', 2)
    (s_lo, s_hi), (b_lo, b_hi) = interval(kept[:, 0]), interval(kept[:, 1])
    # Replicates lie on the grid, the estimate between its points: widen by half a grid step and
    # keep the estimate inside, or exact data would give an interval beside its own estimate.
    half_step = math.exp((grid[1] - grid[0]) / 2)
    bounds = {"b_crit_lo": min(float(b_lo) / half_step, fit.b_crit), "b_crit_hi": max(float(b_hi) * half_step, fit.b_crit),
              "s_min_lo": min(float(s_lo), fit.s_min), "s_min_hi": max(float(s_hi), fit.s_min)}
    return _replace(fit, **bounds, bootstrap_samples=int(usable.sum())), kept


def median_rank(count: int, confidence: float = CONFIDENCE) -> tuple[int, float]:
    """The order statistics whose interval covers the median of ``count`` seeds, and its confidence.

    [x_(k), x_(n+1−k)] of n independent draws covers the population median with probability at
    least 1 − 2·P(Bin(n, ½) ≤ k − 1), for any distribution (exactly that much for a continuous
    one): the interval misses only when k or fewer draws fall on one side. The widest k that
    keeps ``confidence`` is taken; when even the range (k = 1) falls short, the range is taken
    with the level it has: 75% for 3 seeds, 87.5% for 4, 93.75% for 5, 96.9% for 6.

    Args:
        count: the number of seeds n.
        confidence: the level wanted.

    Returns:
        ``(k, level)``: the rank and the interval's exact confidence (0 for fewer than 2 seeds).
    """
    from scipy.stats import binom

    rank, level = 1, (1 - 2 * 0.5**count if count >= 2 else 0.0)
    for k in range(2, (count + 1) // 2 + 1):
        wider = float(1 - 2 * binom.cdf(k - 1, count, 0.5))
        if wider < confidence:
            break
        rank, level = k, wider
    return rank, level


def median_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The exact order-statistic interval for the median of ``values`` (`median_rank`).

    Args:
        values: (K,) one value per seed; +inf where a seed never got there (it sorts last, so the
            upper end is inf once too few seeds got there).

    Returns:
        ``(lo, hi, level)``; NaN bounds with level 0 for fewer than 2 values.
    """
    ordered = np.sort(np.asarray(values, dtype=float))  # (K,)
    rank, level = median_rank(len(ordered), confidence)
    if len(ordered) < 2:
        return math.nan, math.nan, 0.0
    return float(ordered[rank - 1]), float(ordered[len(ordered) - rank]), level


def interval_label(level: float, count: int) -> str:
    """How an order-statistic interval of ``count`` seeds is named: its true level, and "range"
    when it is the smallest to the largest seed ("75% CI, range of 3 seeds")."""
    if count < 2 or not math.isfinite(level) or level <= 0:
        return "one seed: no interval"
    percent = f"{math.floor(level * 1000) / 10:g}%"  # rounded down: never claims more than it has
    return f"{percent} CI, range of {count} seeds" if median_rank(count)[0] == 1 else f"{percent} CI"


def interval(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The central CONFIDENCE percentile interval over axis 0 (nearest rank, so inf stays inf, not NaN)."""
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(replicates, [tail, 100 - tail], axis=0, method="nearest")
    return lo, hi


def fitted_band(fit: ScalingFit, replicates: np.ndarray, batch_sizes: np.ndarray, points: int = 60) -> dict[str, list]:
    """The fitted curve and its pointwise 95% bootstrap band on a log grid over the batch sizes.

    Returns:
        Columns ``batch_size_value``, ``steps_fit``, ``steps_fit_lo``, ``steps_fit_hi`` (lists).
    """
    if not fit.ok:
        return {}
    grid = np.geomspace(batch_sizes.min(), batch_sizes.max(), points)  # (P,)
    curve = fit.steps_at(grid)
    if len(replicates):
        curves = replicates[:, :1] * (1 + replicates[:, 1:] / grid[None, :])  # (R', P)
        lo, hi = interval(curves)
    else:
        lo = hi = np.full(points, np.nan)
    return {"batch_size_value": grid.tolist(), "steps_fit": curve.tolist(), "steps_fit_lo": lo.tolist(),
            "steps_fit_hi": hi.tolist()}


def _replace(fit: ScalingFit, **changes: Any) -> ScalingFit:
    return ScalingFit(**{**fit.as_dict(), **changes})


def efficiency(batch_sizes: np.ndarray, fit: ScalingFit, measured: np.ndarray) -> np.ndarray:
    """The local scaling efficiency −dlog S/dlog B at each batch size.

    From the fit it is B_crit/(B + B_crit) (1 while B ≪ B_crit, 0 when B ≫ B_crit); without a fit,
    the ``measured`` efficiency between neighbouring batch sizes.
    """
    if fit.ok:
        return fit.b_crit / (np.asarray(batch_sizes, dtype=float) + fit.b_crit)
    return np.asarray(measured, dtype=float)


def regime(scaling_efficiency: float) -> str:
    """The regime of one batch size (Shallue et al. 2019) from its local scaling efficiency.

    ≥ 0.8 (B ≤ B_crit/4 on the fit) is *perfect scaling*, ≤ 0.2 (B ≥ 4 B_crit) *no gain*, in
    between *diminishing returns*; "" when unknown. The one place a regime is decided: the summary's
    ``regime`` column and the recommendation's words both come from it.
    """
    if not math.isfinite(scaling_efficiency):
        return ""
    if scaling_efficiency >= PERFECT_EFFICIENCY:
        return "perfect scaling"
    if scaling_efficiency <= NO_GAIN_EFFICIENCY:
        return "no gain"
    return "diminishing returns"
