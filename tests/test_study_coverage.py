"""Every interval the study prints covers what it names as often as its label says.

Simulations from known distributions: the steps interval of each batch size (an exact
order-statistic interval for the median over seeds, labelled with its own level), and the 95%
bootstrap intervals of B_crit, S_min and the fitted curve on data drawn from S = S_min (1 + B_crit/B)
with seed noise. The fast checks run in a few seconds; the wider sweep is marked slow.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batchlab.study import analyse, evaluation_steps
from batchlab.study.scaling import (
    CONFIDENCE,
    bootstrap_fit,
    bootstrap_steps,
    fit_scaling,
    fitted_band,
    interval_label,
    median_interval,
    median_rank,
)
from test_study_analysis import TARGET, fake_trials


# --- the steps interval: an exact interval for the median over seeds ------------------------------


@pytest.mark.parametrize("count", range(2, 13))
def test_median_interval_level_is_the_brute_force_probability(count):
    """Each seed falls below the median with probability 1/2: over all 2^n sign patterns, the
    interval [x_(k), x_(n+1-k)] covers it when at least k fall on each side."""
    rank, level = median_rank(count)
    covering = sum(min(sum(p), count - sum(p)) >= rank for p in itertools.product((0, 1), repeat=count))
    assert level == pytest.approx(covering / 2**count)
    # the widest interval that keeps 95%, or the range when none can
    assert level >= CONFIDENCE or rank == 1
    if rank > 1 or count >= 6:
        assert level >= CONFIDENCE
    narrower = sum(min(sum(p), count - sum(p)) >= rank + 1 for p in itertools.product((0, 1), repeat=count))
    assert rank == 1 or narrower / 2**count < CONFIDENCE


def test_three_seeds_are_named_as_their_range_at_75_percent():
    assert median_rank(3) == (1, 0.75)
    assert interval_label(0.75, 3) == "75% CI, range of 3 seeds"
    assert interval_label(median_rank(5)[1], 5) == "93.7% CI, range of 5 seeds"  # 93.75%, rounded down
    assert interval_label(median_rank(9)[1], 9) == "96% CI"  # x_(2)..x_(8): rounded down, never up
    assert interval_label(0.0, 1) == "one seed: no interval"


def _coverage(draws: np.ndarray, median: float) -> tuple[float, float]:
    """Share of (D, K) data sets whose `median_interval` covers ``median``, and the level it claims."""
    bounds = np.array([median_interval(row)[:2] for row in draws])  # (D, 2)
    level = median_interval(draws[0])[2]
    return float(np.mean((bounds[:, 0] <= median) & (median <= bounds[:, 1]))), level


@pytest.mark.parametrize("seeds", [3, 5, 9])
def test_steps_interval_covers_the_median_as_often_as_it_says(seeds):
    """Lognormal steps (median 200): coverage equals the stated level within Monte-Carlo error."""
    rng = np.random.default_rng(seeds)
    draws = 200 * rng.lognormal(0, 0.4, size=(4000, seeds))  # (D, K)
    covered, level = _coverage(draws, 200.0)
    assert covered == pytest.approx(level, abs=0.025)  # 4000 draws: sd <= 0.008


def test_steps_on_check_points_tie_and_still_cover_at_least_their_level():
    """Steps-to-target is the first evaluated step: seeds tie on check points (the '135-135' case).
    An interval of tied seeds is a point, and covers the median of the checked steps as often as
    it says (more, with ties), never less."""
    checks = np.array(evaluation_steps(1200, 0.05))
    rng = np.random.default_rng(7)
    crossings = 120 * rng.lognormal(0, 0.05, size=(4000, 3))  # (D, K) where the target first holds
    checked = checks[np.searchsorted(checks, np.ceil(crossings))]  # the first check at or after it
    population = checks[np.searchsorted(checks, np.ceil(120 * rng.lognormal(0, 0.05, 400_000)))]
    median = float(np.median(population))
    covered, level = _coverage(checked, median)
    assert level == 0.75 and covered >= level - 0.02
    assert np.mean(checked.min(axis=1) == checked.max(axis=1)) > 0.05  # ties happen, as in the docs


def test_the_analysis_labels_its_steps_interval_with_the_coverage_it_has():
    """Through `analyse`: 150 batch sizes of 3 lognormal seeds each; each steps interval covers its
    true median about 75% of the time, and says so in the summary and the recommendation."""
    rng = np.random.default_rng(11)
    sizes = [int(b) for b in np.unique(np.geomspace(8, 8192, 150).round())]
    truth = {b: 4000 * (1 + 500 / b) for b in sizes}
    trials = fake_trials({b: {0.1: list(truth[b] * rng.lognormal(0, 0.3, 3))} for b in sizes})
    result = analyse(trials, TARGET)
    summary = result.summary
    medians = summary["batch_size_value"].map(truth)
    covered = ((summary["steps_ci_lo"] <= medians) & (medians <= summary["steps_ci_hi"])).mean()
    assert (summary["steps_ci_level"] == 0.75).all() and (summary["steps_ci_seeds"] == 3).all()
    assert covered == pytest.approx(0.75, abs=0.1)  # ~140 batch sizes: sd 0.037
    for row in summary.itertuples():  # the range of the three seeds, exactly
        seeds = trials[trials["batch_size_value"] == row.batch_size_value]["steps_to_target"]
        assert (row.steps_ci_lo, row.steps_ci_hi) == (seeds.min(), seeds.max())
    text = result.recommendation.text
    assert result.recommendation.supported and "(75% CI, range of 3 seeds: " in text
    assert "95% CI" not in text and "95% bootstrap CI" in text  # B_crit's, checked below


# --- B_crit, S_min and the fitted band: 95% bootstrap intervals -------------------------------


def _bootstrap_coverage(sizes, s_min, b_crit, noise, seeds, datasets, start=0):
    """Coverage of the truth by the intervals `with_intervals` computes, on data from the model."""
    sizes = np.asarray(sizes, dtype=float)
    truth = s_min * (1 + b_crit / sizes)  # (n,)
    hits = {"b_crit": 0, "s_min": 0, "band": 0}
    for d in range(start, start + datasets):
        steps = truth[:, None] * np.random.default_rng(d).lognormal(0, noise, (len(sizes), seeds))  # (n, K)
        fit = fit_scaling(sizes, np.median(steps, axis=1))
        rng = np.random.default_rng(0)  # as the analysis: BOOTSTRAP_SEED
        fit, kept = bootstrap_fit(fit, sizes, bootstrap_steps([row[None, :] for row in steps], rng), rng)
        band = fitted_band(fit, kept, sizes, points=len(sizes))
        hits["b_crit"] += fit.b_crit_lo <= b_crit <= fit.b_crit_hi
        hits["s_min"] += fit.s_min_lo <= s_min <= fit.s_min_hi
        hits["band"] += np.mean((np.array(band["steps_fit_lo"]) <= truth) & (truth <= np.array(band["steps_fit_hi"])))
    return {name: count / datasets for name, count in hits.items()}


def test_b_crit_s_min_and_band_cover_the_true_curve_at_least_95_percent():
    """The default study's shape: 7 batch sizes around B_crit, 3 seeds, 25% seed noise."""
    coverage = _bootstrap_coverage([16, 32, 64, 128, 256, 512, 1024], 35.0, 300.0, 0.25, 3, datasets=60)
    assert min(coverage.values()) >= 0.93, coverage  # 60 data sets; measured 1.0 (conservative)


@pytest.mark.slow
@pytest.mark.parametrize("sizes, b_crit, noise, seeds", [
    ((16, 64, 256, 1024), 300.0, 0.2, 3),
    ((16, 32, 64, 128, 256), 64.0, 0.3, 3),
    ((8, 16, 32, 64, 128, 256, 512, 1024), 64.0, 0.25, 5),
    ((32, 64, 128, 256, 512, 1024, 2048), 300.0, 0.05, 3),
    ((16, 32, 64, 128, 256, 512, 1024), 300.0, 0.4, 3),
])  # fmt: skip
def test_bootstrap_intervals_keep_95_percent_across_designs(sizes, b_crit, noise, seeds):
    coverage = _bootstrap_coverage(sizes, 35.0, b_crit, noise, seeds, datasets=300)
    assert min(coverage.values()) >= CONFIDENCE - 0.02, coverage  # 300 data sets: sd 0.013 at 95%
