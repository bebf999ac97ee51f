"""``fit_replicas`` with the compiled stacked step gives the runs of the eager stacked pass (the oracle).

float64; a model with batch norm and dropout; replicas differing in seed, learning rate and
momentum (per-replica tensor inputs of one graph); probes every other step, so the pass alternates
eager (measured) and compiled steps through one optimizer state. One graph is compiled.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.compiled import choose

from test_compiled_fit import B, N, TOLERANCE, dataset, numbers

R = 3


def model(seed: int) -> torch.nn.Module:
    return bl.build_model("mlp", dataset(), seed=seed, hidden=[16], dropout=0.25, batch_norm=True).double()


def train(compile: str) -> bl.ReplicaRuns:
    configs = [bl.TrainConfig(batch_size=B, epochs=2, optimizer="sgd", lr=0.05 * (r + 1), momentum=0.5 + 0.2 * r,
                              eval_every=4, probe_every=2, seed=r, compile=compile) for r in range(R)]
    return bl.fit_replicas(model, dataset(), configs, probes=["update_norm", "dist_from_init"], progress=False)


@pytest.fixture(scope="module")
def runs():
    steps: list = []

    class Seen(choose.StackedStep):  # remembered, to check the pass ran compiled
        def __init__(self, *args):
            super().__init__(*args)
            steps.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(choose, "StackedStep", Seen)
        eager, compiled = train("off"), train("on")
    assert len(steps) == 1 and steps[0].fallback_reason is None
    assert list(steps[0].compiled) == [((R, B, 8), (R, B))]
    return eager, compiled


@pytest.mark.parametrize("table", ["steps", "evals", "epochs"])
def test_compiled_replicas_have_the_eager_tables(runs, table):
    eager, compiled = runs
    for replica in range(R):
        e, c = (numbers(getattr(run[replica], table)) for run in (eager, compiled))
        assert len(c) == len(e) > 0
        pd.testing.assert_frame_equal(c, e, check_exact=False, rtol=0, atol=TOLERANCE)


def test_compiled_replicas_learned_and_were_probed(runs):
    _, compiled = runs
    for run in compiled:
        steps = run.steps
        assert steps["update_norm"].notna().sum() == len(steps) // 2 == N // B
        assert steps["batch_loss"].iloc[-3:].mean() < steps["batch_loss"].iloc[:3].mean()
