"""The study's answer: intervals by bootstrap against brute force, the fit's quality, the verdicts
when the data cannot support a recommendation, and regimes and words that agree on any fit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.study import LR_GROUP, analyse, fit_scaling, regime, trials_table
from batchlab.study.analysis import lr_margin, no_gain_from
from batchlab.study.plan import GroupPlan
from batchlab.study.ranking import lr_table
from batchlab.study.scaling import bootstrap_steps, efficiency

TARGET = "val_acc>=0.5"


def fake_trials(steps_by_b: dict[int, dict[float, list[float]]]) -> pd.DataFrame:
    """Trial summaries with the given steps-to-target: {B: {lr: [steps per seed]}} (NaN: not reached)."""
    rows = []
    for b, by_lr in steps_by_b.items():
        seeds = tuple(range(len(next(iter(by_lr.values())))))
        group = GroupPlan(LR_GROUP, b, b, tuple(by_lr), seeds)
        for lr, steps in by_lr.items():
            for seed, s in zip(seeds, steps):
                rows.append({"group": group.key, "kind": LR_GROUP, "round": 0, "batch_size": b, "batch_size_value": b,
                             "lr": lr, "seed": seed, "status": "reached" if math.isfinite(s) else "not_reached",
                             "steps_to_target": s, "epochs_to_target": s / 10, "samples_to_target": s * b,
                             "seconds_to_target": s / 100, "gen_gap": 0.01, "noise_scale": math.nan})  # fmt: skip
    return trials_table(rows)


def curve_trials(s_min, b_crit, sizes, seeds=5, noise=0.1, rng=None, lrs=(0.1,)):
    """Steps S_min (1 + B_crit/B) with lognormal noise over seeds; extra lrs take twice the steps (inside the grid)."""
    rng = rng or np.random.default_rng(0)
    middle = lrs[len(lrs) // 2]
    out = {}
    for b in sizes:
        truth = s_min * (1 + b_crit / b)
        out[b] = {lr: list(np.round(truth * (1 if lr == middle else 2) * rng.lognormal(0, noise, seeds)))
                  for lr in lrs}
    return fake_trials(out)


# --- the fit and its quality -----------------------------------------------------------------


def test_exact_curve_gives_r2_one_zero_residuals_and_a_point_interval():
    b = [16, 32, 64, 128, 256, 512, 1024]
    result = analyse(curve_trials(40, 100, b, seeds=3, noise=0.0), TARGET)
    fit, summary = result.fit, result.summary
    # steps are whole numbers: rounding moves the fit a little
    assert fit.b_crit == pytest.approx(100, rel=0.02) and fit.s_min == pytest.approx(40, rel=0.02)
    assert fit.r2 == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(summary["fit_residual"], 0, atol=0.02)
    np.testing.assert_allclose(summary["steps_fit"], 40 * (1 + 100 / np.array(b)), rtol=0.02)
    assert fit.b_crit_lo == pytest.approx(fit.b_crit, rel=0.1) and fit.b_crit_hi == pytest.approx(fit.b_crit, rel=0.1)
    assert (summary["steps_ci_lo"] == summary["steps_to_target"]).all()  # identical seeds: nothing to resample


def test_fit_is_least_squares_on_log_steps():
    """No (S_min, B_crit) nearby has a smaller sum of squared log residuals than the fit's."""
    rng = np.random.default_rng(3)
    b = np.array([8, 16, 32, 64, 128, 256, 512], dtype=float)
    steps = 50 * (1 + 60 / b) * rng.lognormal(0, 0.2, len(b))
    fit = fit_scaling(b, steps)
    sse = lambda s_min, b_crit: np.sum((np.log(steps) - np.log(s_min * (1 + b_crit / b))) ** 2)  # noqa: E731
    best = sse(fit.s_min, fit.b_crit)
    for ds, db in itertools.product([0.97, 1.0, 1.03], repeat=2):
        assert best <= sse(fit.s_min * ds, fit.b_crit * db) + 1e-12
    total = np.sum((np.log(steps) - np.log(steps).mean()) ** 2)
    assert fit.r2 == pytest.approx(1 - best / total)


# --- bootstrap against brute force -----------------------------------------------------------


def test_bootstrap_of_steps_matches_every_resample_of_three_seeds():
    """With K = 3 seeds there are 27 equally likely resamples: the bootstrap's frequencies match them."""
    cell = np.array([[10.0, 40.0, np.nan], [20.0, 25.0, 30.0]])  # 2 lrs × 3 seeds; the lr is re-chosen
    exact = {}
    for draw in itertools.product(range(3), repeat=3):
        s = np.where(np.isfinite(cell), cell, np.inf)[:, list(draw)]
        value = float(np.median(s, axis=1).min())
        exact[value] = exact.get(value, 0) + 1 / 27
    replicates = bootstrap_steps([cell], np.random.default_rng(1), samples=20000)[:, 0]
    values, counts = np.unique(replicates, return_counts=True)
    assert set(values) == set(exact)
    for value, count in zip(values, counts):
        assert count / 20000 == pytest.approx(exact[value], abs=0.015)


def test_b_crit_interval_covers_the_truth_under_seed_noise():
    truth, covered = 64.0, 0
    for k in range(20):
        rng = np.random.default_rng(100 + k)
        result = analyse(curve_trials(30, truth, [8, 16, 32, 64, 128, 256, 512, 1024], seeds=3, noise=0.25, rng=rng),
                         TARGET)  # fmt: skip
        fit = result.fit
        covered += fit.b_crit_lo <= truth <= fit.b_crit_hi
        assert fit.b_crit_lo <= fit.b_crit <= fit.b_crit_hi and fit.s_min_lo <= fit.s_min <= fit.s_min_hi
    assert covered >= 16  # a 95% interval; 20 draws


def test_steps_interval_is_the_spread_of_the_median_over_seeds():
    trials = fake_trials({b: {0.1: [100 / b * 64 + d for d in (-5, 0, 5, 60, 2)]} for b in (8, 32, 128)})
    summary = analyse(trials, TARGET).summary
    for row in summary.itertuples():
        seeds = trials[trials["batch_size_value"] == row.batch_size_value]["steps_to_target"].to_numpy()
        assert seeds.min() <= row.steps_ci_lo <= row.steps_to_target <= row.steps_ci_hi <= seeds.max()


def test_analysis_is_a_pure_function_of_the_trials():
    trials = curve_trials(30, 64, [8, 32, 128, 512], seeds=3, noise=0.3)
    a, b = analyse(trials, TARGET), analyse(trials.sample(frac=1, random_state=0), TARGET)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    assert a.fit == b.fit and a.recommendation == b.recommendation


# --- the lr per batch size ---------------------------------------------------------------------


def test_lr_margin_is_the_nearest_rivals_steps_over_the_best():
    table = lr_table(fake_trials({8: {0.05: [90, 95, 99], 0.1: [50, 55, 60], 0.2: [66, 70, 75], 0.4: [1, 1, 1]}}))
    assert lr_margin(table, 0.4) == pytest.approx(70 / 1)
    assert lr_margin(table, 0.1) == pytest.approx(70 / 55)  # 0.2 is nearer than 0.05
    assert math.isnan(lr_margin(table.iloc[:1], 0.05))
    never = lr_table(fake_trials({8: {0.1: [50, 55, 60], 0.2: [np.nan] * 3}}))
    assert lr_margin(never, 0.1) == math.inf


# --- when the data cannot support a conclusion ---------------------------------------------------


def one_sentence_without_recommendation(rec, *words):
    assert rec.batch_size is None and not rec.supported
    assert rec.text.endswith(".") and rec.text.count(". ") == 0, rec.text
    for word in words:
        assert word in rec.text, rec.text


def test_too_few_batch_sizes_reached():
    trials = fake_trials({8: {0.1: [50, 55, 60]}, 64: {0.1: [20, 21, 22]}, 512: {0.1: [np.nan] * 3}})
    one_sentence_without_recommendation(analyse(trials, TARGET).recommendation, "Only 2 batch sizes", "max_steps")


def test_best_lr_at_the_edge_is_not_recommended_from():
    trials = curve_trials(30, 64, [8, 32, 128, 512], lrs=(0.1, 0.2, 0.4))
    assert analyse(trials, TARGET).recommendation.supported  # best in the middle
    edge = trials[~((trials["batch_size_value"] == 32) & (trials["lr"] == 0.4))].copy()
    edge.loc[(edge["batch_size_value"] == 32) & (edge["lr"] == 0.1), "steps_to_target"] = 1.0
    one_sentence_without_recommendation(analyse(edge, TARGET).recommendation, "B = 32", "lr_grid_size")


def test_seed_noise_larger_than_the_bend_leaves_b_crit_unresolved():
    trials = curve_trials(30, 64, [16, 32, 64, 128, 256], seeds=3, noise=0.8, rng=np.random.default_rng(2))
    one_sentence_without_recommendation(analyse(trials, TARGET).recommendation, "not resolved", "more seeds")


def test_steps_that_do_not_fall_with_b_ask_for_smaller_batches():
    rng = np.random.default_rng(5)
    flat = fake_trials({b: {0.1: list(np.round(100 * rng.lognormal(0, 0.6, 3)))} for b in (8, 16, 32, 64, 128)})
    one_sentence_without_recommendation(analyse(flat, TARGET).recommendation, "smaller batch sizes")


def test_perfect_scaling_everywhere_asks_for_larger_batches():
    trials = fake_trials({b: {0.1: [4096 / b] * 3} for b in (8, 16, 32, 64, 128)})
    one_sentence_without_recommendation(analyse(trials, TARGET).recommendation, "larger batch sizes")


# --- regimes and recommendation agree by construction -----------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    s_min=st.floats(5, 500),
    b_crit=st.floats(0.5, 5000),
    first=st.integers(0, 6),
    count=st.integers(3, 9),
    noise=st.floats(0, 0.4),
    seed=st.integers(0, 2**16),
)
def test_regime_words_follow_the_regime_column_on_random_fits(s_min, b_crit, first, count, noise, seed):
    sizes = [2**k for k in range(first, first + count)]
    result = analyse(curve_trials(s_min, b_crit, sizes, seeds=3, noise=noise, rng=np.random.default_rng(seed)),
                     TARGET)  # fmt: skip
    summary, fit, rec = result.summary, result.fit, result.recommendation
    local = efficiency(summary["batch_size_value"].to_numpy(float), fit, summary["scaling_efficiency"].to_numpy(float))
    assert list(summary["regime"]) == [regime(float(e)) for e in local]  # one function decides
    if not rec.supported:
        assert rec.batch_size is None and "regime" not in rec.text
        return
    regimes = dict(zip(summary["batch_size"], summary["regime"]))
    tail = [regimes[b] for b in sizes if rec.no_gain_above is not None and b >= rec.no_gain_above]
    assert rec.no_gain_above == no_gain_from(summary)
    if rec.no_gain_above is None:
        assert regimes[sizes[-1]] != "no gain" and "still saves steps" in rec.text and "no-gain" not in rec.text
    else:
        assert tail and all(r == "no gain" for r in tail) and "still saves steps" not in rec.text
        below = [b for b in sizes if b < rec.no_gain_above]
        assert not below or regimes[below[-1]] != "no gain"
        assert f"batches of {rec.no_gain_above} and above" in rec.text or "every batch size" in rec.text
