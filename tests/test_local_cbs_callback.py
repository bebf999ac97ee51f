"""bl.LocalCBS: the callback measures what `bl.local_cbs` measures by hand at the same weights, lands
its columns in the run's rows, and leaves the run itself exactly as it is without it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.critical_batch import local_cbs
from batchlab.metrics import mean_loss_function
from batchlab.optim import build_optimizer, scaled_lr

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = ["local_cbs", "local_cbs_upper", "b_simple_at_branch"]
SETTINGS = dict(factors=(1, 2, 4), seeds=2, samples=64, eval_samples=200, noise_samples=100)


def _config(**overrides) -> bl.TrainConfig:
    return bl.TrainConfig(**{"batch_size": 16, "epochs": 3, "optimizer": "adam", "lr": 3e-3, "compile": "off",
                             **overrides})


def _fit(callbacks=(), probes=("noise_scale",), **overrides) -> bl.Run:
    ds = bl.load_dataset("blobs")
    model = bl.build_model("mlp", ds, seed=0, hidden=[32], dropout=0.2)  # dropout: the run's RNG matters
    return bl.fit(model, ds, _config(**overrides), probes=list(probes), callbacks=list(callbacks), progress=False)


def test_training_is_unaffected_and_columns_land_where_due():
    plain = _fit()
    steps_per_epoch = plain.clock.steps_per_epoch
    callback = bl.LocalCBS(every=2 * steps_per_epoch, **SETTINGS)
    measured = _fit([callback])
    assert measured.status == plain.status == "finished"
    for table in ("steps", "evals"):
        ours, theirs = getattr(measured, table), getattr(plain, table)
        assert set(ours.columns) - set(theirs.columns) == set(COLUMNS)
        pd.testing.assert_frame_equal(ours[theirs.columns].drop(columns="seconds"), theirs.drop(columns="seconds"))
    for ours, theirs in zip(measured.model.parameters(), plain.model.parameters()):
        assert torch.equal(ours, theirs)
    # Due at step 0 and at the first evaluation at or after 2 epochs' steps; the others have no value.
    evals = measured.evals.set_index("step")
    due = [0, 2 * steps_per_epoch]
    assert evals.loc[due, COLUMNS].notna().all().all()
    assert evals.drop(index=due)[COLUMNS].isna().all().all()
    assert [step for step, _ in callback.results] == due
    for step, result in callback.results:
        assert evals.loc[step, "local_cbs"] == result.local_cbs
        assert evals.loc[step, "b_simple_at_branch"] == result.b_simple


def test_a_row_equals_local_cbs_by_hand_on_a_checkpoint_of_the_same_step(tmp_path):
    callback = bl.LocalCBS(every=None, at_start=False, **SETTINGS)
    path = tmp_path / "end.pt"
    run = _fit([callback, bl.Checkpoint(path, every=2)], epochs=2)  # saved at the last epoch's end
    ds = bl.load_dataset("blobs")
    model = bl.build_model("mlp", ds, seed=0, hidden=[32], dropout=0.2)
    blob = torch.load(path, weights_only=True)
    model.load_state_dict(blob["model"])
    config = _config(epochs=2)
    optimizer = build_optimizer(model.parameters(), config, scaled_lr(config, 16))
    optimizer.load_state_dict(blob["optimizer"])
    by_hand = local_cbs(model, optimizer, mean_loss_function("auto", ds.task), ds.train, 16, **SETTINGS)
    row = run.evals.iloc[-1]
    assert row.step == run.clock.step and callback.results[-1][0] == row.step
    assert row.local_cbs == by_hand.local_cbs
    assert row.local_cbs_upper == (math.inf if by_hand.interval[1] is None else by_hand.interval[1])
    assert row.b_simple_at_branch == pytest.approx(by_hand.b_simple, rel=1e-10)
    ours = callback.results[-1][1]
    np.testing.assert_allclose(ours.table.loss, by_hand.table.loss, rtol=1e-10)
    assert list(ours.tests.verdict) == list(by_hand.tests.verdict)


def test_a_failed_measurement_is_nan_with_one_warning_and_training_goes_on():
    callback = bl.LocalCBS(factors=(1, 64), seeds=2)  # 64 × 16 exceeds blobs' 500 training samples
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _fit([callback], probes=())
    ours = [w for w in caught if "LocalCBS" in str(w.message)]
    assert len(ours) == 1 and "exceeds the 500 training samples" in str(ours[0].message)
    assert run.status == "finished" and len(run.evals) == 4
    assert run.evals[COLUMNS].isna().all().all()


@pytest.mark.parametrize("settings", [dict(every=0), dict(every=2.5), dict(seeds=1), dict(factors=(2, 4)),
                                      dict(lr_rule="cubic"), dict(alpha=1.5), dict(samples=0), dict(samples="64"),
                                      dict(eval_samples=2.5), dict(noise_samples=1)])
def test_bad_settings_are_refused_when_made(settings):
    with pytest.raises(bl.ConfigError):
        bl.LocalCBS(**settings)


def test_the_documented_example_runs_as_written():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "advise.md").read_text(encoding="utf-8")
    code = doc.split("## Along a run", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/advise.md", "exec"), namespace)
    run, measure = namespace["run"], namespace["measure"]
    measured = run.evals.dropna(subset=COLUMNS)
    assert list(measured.step) == list(run.evals.step) == [step for step, _ in measure.results]  # start, each epoch
    assert all(measured.local_cbs <= measured.local_cbs_upper) and set(measured.local_cbs) <= {16, 32, 64, 128, 256}
