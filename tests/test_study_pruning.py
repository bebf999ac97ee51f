"""Pruning: a learning rate that can no longer be the best stops, and the answer does not change."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.config import make_study_config
from batchlab.study import LR_GROUP, best_lr, lr_table, run_study
from batchlab.study.pruning import LrPruner

# --- the pruner against brute force ------------------------------------------------------------

steps_or_never = st.one_of(st.integers(1, 40), st.just(math.inf))


def _simulate(steps: np.ndarray, best_before: float = math.inf) -> set[float]:
    """Every trial evaluated at every step in lockstep, as a replica pass does; the lrs pruned."""
    n_lrs, n_seeds = steps.shape
    lrs = [float(i) for i in range(n_lrs) for _ in range(n_seeds)]
    truth = steps.reshape(-1)  # (n_lrs·n_seeds,) lrs outer, seeds inner
    pruner, stopped = LrPruner(lrs, best_before), set()
    for step in range(1, 42):
        for key in range(len(lrs)):
            if key in stopped:
                continue
            if truth[key] == step:
                pruner.evaluated(key, step, reached=True)
                stopped.add(key)
            elif step == 41:  # the budget ends
                pruner.ended_without_target(key)
            else:
                pruner.evaluated(key, step, reached=False)
                if pruner.should_stop(key):
                    stopped.add(key)
    return pruner.pruned


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(lambda lrs: st.integers(1, 4).flatmap(
    lambda seeds: st.lists(st.lists(steps_or_never, min_size=seeds, max_size=seeds), min_size=lrs, max_size=lrs))))
def test_pruned_lrs_are_strictly_worse_than_the_brute_force_best(grid):
    steps = np.array(grid, dtype=float)  # (lrs, seeds)
    medians = np.median(steps, axis=1)  # the analysis' median: not reached = +inf
    pruned = _simulate(steps)
    best = float(medians.min())
    for lr in pruned:
        assert medians[int(lr)] > best  # never the best, never tied with it
    # With the trials' outcomes as a table, the analysis picks the same lr with or without them.
    table = pd.DataFrame([{"lr": float(i), "seed": s, "steps_to_target": v if math.isfinite(v) else math.nan,
                           "status": "reached" if math.isfinite(v) else "not_reached"}
                          for i, row in enumerate(grid) for s, v in enumerate(row)])
    kept = table[~table["lr"].isin(pruned)]
    assert best_lr(lr_table(table)) == best_lr(lr_table(kept))


def test_an_lr_whose_seeds_are_all_slower_than_the_best_median_is_pruned():
    steps = np.array([[5, 6, 7], [30, 31, 32], [math.inf, math.inf, math.inf]])
    assert _simulate(steps) == {1.0, 2.0}
    assert _simulate(steps, best_before=4) == {0.0, 1.0, 2.0}  # an earlier round's best at this B


# --- end to end: the same answer with and without pruning --------------------------------------

GRIDS = {
    "fixed lrs": dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[8, 64, "full"], lrs=[0.02, 0.05, 0.2, 0.8],
                      seeds=3, target="val_acc>=0.75", max_steps=300, noise_scale=False),
    "auto lrs, extended, noise scale": dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[4, 32, 256],
                                            lrs="auto", lr_grid_size=3, reference_lr=0.05, seeds=3,
                                            target="val_acc>=0.75", max_steps=300, noise_scale=True),
}  # fmt: skip
ANSWER_COLUMNS = ["batch_size", "best_lr", "reached", "regime", "noise_scale", "gen_gap", "final_val_acc",
                  *(f"{q}_{s}" for q in ("steps", "epochs", "samples") for s in ("to_target", "lo", "hi"))]


def answer(study) -> dict:
    """What the study answers: the summary's answer columns, the fit, the recommendation (no seconds)."""
    recommendation = study.recommendation.as_dict()
    for timed in ("seconds", "fastest_batch_size", "fastest_seconds"):
        recommendation.pop(timed)
    recommendation["text"] = recommendation["text"].split(" Fastest here")[0]
    return {"summary": study.summary[ANSWER_COLUMNS].reset_index(drop=True), "fit": study.fit.as_dict(),
            "recommendation": recommendation}


@pytest.mark.parametrize("grid", GRIDS, ids=list(GRIDS))
def test_pruning_gives_the_answer_of_the_study_without_it(grid):
    torch.set_num_threads(1)
    config = make_study_config(GRIDS[grid])
    whole, pruned = run_study(config, prune=False), run_study(config, prune=True)
    assert (whole.trials["status"] != "pruned").all()
    stopped = pruned.trials[pruned.trials["status"] == "pruned"]
    assert len(stopped) > 0 and pruned.trials["steps"].sum() < whole.trials["steps"].sum()
    assert (stopped["pruned_at_step"] == stopped["steps"]).all()  # the step it stopped at
    assert (stopped["kind"] == LR_GROUP).all()
    a, b = answer(whole), answer(pruned)
    pd.testing.assert_frame_equal(a["summary"], b["summary"])
    assert pd.Series(a["fit"]).equals(pd.Series(b["fit"]))  # NaN (no B_simple) equals NaN
    assert a["recommendation"] == b["recommendation"]
