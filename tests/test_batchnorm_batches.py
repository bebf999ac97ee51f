"""Batch norm meets a batch of one sample: refused before training, or the last batch of one dropped.

In train mode batch norm normalises by the batch's own variance, which one sample does not have
(torch raises inside the step). `plan_batch_norm` decides before any work: a batch size that gives
a process one sample is refused in one line; a last batch of an epoch that would give some process
fewer than 2 samples is dropped (``drop_last``), and the accounting line says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError
from batchlab.loop import fit, plan_batch_norm
from batchlab.store import RunStore


def toy(n: int = 65) -> Dataset:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n + 30, 4, generator=g)
    y = (X[:, 0] > 0).long()
    return Dataset("toy", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=2)


def batch_norm_mlp(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 2))


def test_batch_of_one_with_batch_norm_is_refused_before_training():
    model = batch_norm_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="batch norm, which needs at least 2 samples per batch"):
        fit(model, toy(), TrainConfig(batch_size=1, epochs=1), progress=False)
    for key, value in model.state_dict().items():  # nothing trained, not even batch norm's running statistics
        assert torch.equal(value, before[key]), key


def test_last_batch_of_one_is_dropped_as_drop_last_drops_it():
    """N = 65, B = 16: a last batch of 1 each epoch. The run equals the same run with drop_last=True."""
    config = TrainConfig(batch_size=16, epochs=2, lr=0.1, seed=3)
    run = fit(batch_norm_mlp(), toy(), config, progress=False)
    reference = fit(batch_norm_mlp(), toy(), config.model_copy(update={"drop_last": True}), progress=False)
    assert run.clock.steps_per_epoch == 65 // 16 == 4 and len(run.steps) == 8
    assert set(run.steps["batch_size"]) == {16} and run.config.drop_last
    for column in ("batch_loss", "running_loss", "running_acc"):
        np.testing.assert_array_equal(run.steps[column], reference.steps[column], err_msg=column)
    np.testing.assert_array_equal(run.evals["val_loss"], reference.evals["val_loss"])


@pytest.mark.parametrize(("n", "batch_size", "world", "drop"), [
    (65, 16, 1, True),    # 65 mod 16 = 1
    (66, 16, 1, False),   # a last batch of 2 is fine
    (64, 16, 1, False),   # no partial batch
    (49, 12, 2, True),    # global 24: a last batch of 1 leaves a rank empty
    (51, 12, 2, True),    # a last batch of 3 splits 2 + 1
    (52, 12, 2, False),   # 2 + 2
])
def test_which_last_batches_are_dropped(n, batch_size, world, drop):
    config, note = plan_batch_norm(batch_norm_mlp(), n, TrainConfig(batch_size=batch_size), world)
    assert config.drop_last is drop and (note is not None) is drop
    if drop:
        assert note.startswith(f"the last batch of {n % (batch_size * world)} sample")


def test_plans_without_batch_norm_or_with_drop_last_are_unchanged():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 2))
    config = TrainConfig(batch_size=1)
    assert plan_batch_norm(plain, 65, config) == (config, None)
    dropping = TrainConfig(batch_size=16, drop_last=True)
    assert plan_batch_norm(batch_norm_mlp(), 65, dropping) == (dropping, None)


@pytest.mark.parametrize(("n", "batch_size", "world"), [(65, 1, 1), (65, 1, 2), (3, "full", 2)])
def test_one_sample_per_process_is_refused(n, batch_size, world):
    with pytest.raises(ConfigError, match="gives a process 1 sample"):
        plan_batch_norm(batch_norm_mlp(), n, TrainConfig(batch_size=batch_size), world)


def test_cli_refuses_batch_norm_at_batch_one_in_one_line(tmp_path, cli):
    status, _, err = cli(["fit", "--dataset", "blobs", "--model", "mlp:hidden=8,batch_norm=true", "--batch-size", "1",
                          "--store", str(tmp_path / "x.db")])
    assert status == 2 and err.strip().splitlines() == [
        "error: the model has batch norm, which needs at least 2 samples per batch in training; batch_size 1 gives "
        "a process 1 sample: use a batch size of 2 or more per process, or a model without batch norm"]
    assert not (tmp_path / "x.db").exists()


def test_cli_states_the_dropped_last_batch_in_the_accounting_line(tmp_path, cli):
    """blobs has 500 training samples: at batch 499 the last batch has 1."""
    store = tmp_path / "s.db"
    status, out, err = cli(["fit", "--dataset", "blobs", "--model", "mlp:hidden=8,batch_norm=true",
                            "--batch-size", "499", "--epochs", "2", "--store", str(store)])
    assert status == 0, err
    assert ("blobs: 500 samples, batch 499 -> 1 steps/epoch, 2 epochs = 2 steps; the last batch of 1 sample is "
            "dropped each epoch (batch norm needs at least 2 samples)") in out
    with RunStore(store) as runs:
        stored = runs.load_run(1)
    assert stored.status == "finished" and stored.config["drop_last"] is True
    assert list(stored.steps["batch_size"]) == [499, 499]


def test_build_model_batch_norm_spec_trains_at_batch_two():
    ds = bl.load_dataset("blobs")
    model = bl.build_model("mlp", ds, hidden=[8], batch_norm=True)
    run = fit(model, ds, TrainConfig(batch_size=2, max_steps=5), progress=False)
    assert run.status == "finished" and len(run.steps) == 5
