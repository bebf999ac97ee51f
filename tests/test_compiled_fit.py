"""``bl.fit`` with a compiled step gives the tables of ``bl.fit`` run eagerly (the oracle).

Compared in float64 on every table (steps, evaluations, epochs: losses, accuracies, running means,
probes), for SGD with Nesterov momentum and for Adam, on a model with batch norm and dropout. The
probe measures every other step, so the run alternates eager (measured) and compiled steps through
one optimizer state. One tiny model and one batch shape per optimizer: two compilations in all.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.compiled import choose
from batchlab.data import Dataset

TOLERANCE = 1e-5  # the bound; float64 runs agree far closer
N, B = 96, 16  # 6 full batches per epoch: one compiled shape


def dataset() -> Dataset:
    generator = torch.Generator().manual_seed(3)

    def split(n):
        X = torch.randn(n, 8, generator=generator, dtype=torch.float64)
        return X, (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()  # 3 learnable classes

    return Dataset("tiny", split(N), split(32), split(32), n_classes=3)


def model() -> torch.nn.Module:
    return bl.build_model("mlp", dataset(), seed=5, hidden=[16], dropout=0.25, batch_norm=True).double()


CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine"),
    "adam": dict(optimizer="adam", lr=0.01, weight_decay=1e-3, warmup_steps=4),
}


def train(kind: str, compile: str) -> bl.Run:
    config = bl.TrainConfig(batch_size=B, epochs=3, eval_every=4, probe_every=2, seed=7, compile=compile,
                            **CONFIGS[kind])
    return bl.fit(model(), dataset(), config, probes=["grad_norm"], progress=False)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runs(request):
    steps: list = []

    class Seen(choose.CompiledStep):  # the compiled step, remembered to check it ran compiled
        def __init__(self, *args):
            super().__init__(*args)
            steps.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(choose, "CompiledStep", Seen)
        eager, compiled = train(request.param, "off"), train(request.param, "on")
    assert len(steps) == 1 and steps[0].fallback_reason is None and len(steps[0].compiled) == 1
    return eager, compiled


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    """The table's measured values (wall-clock columns are not results)."""
    return table.drop(columns=[c for c in table.columns if "seconds" in c]).astype(float)


@pytest.mark.parametrize("table", ["steps", "evals", "epochs"])
def test_compiled_fit_has_the_eager_tables(runs, table):
    eager, compiled = (numbers(getattr(run, table)) for run in runs)
    assert list(compiled.columns) == list(eager.columns)
    assert len(compiled) == len(eager) > 0
    pd.testing.assert_frame_equal(compiled, eager, check_exact=False, rtol=0, atol=TOLERANCE)


def test_both_kinds_of_step_ran(runs):
    eager, compiled = runs
    steps = compiled.steps
    assert steps["grad_norm"].notna().sum() == (len(steps) + 1) // 2  # measured steps: eager, probed
    assert steps["batch_loss"].iloc[-1] < steps["batch_loss"].iloc[:6].mean()  # it learned
    final = dict(compiled.model.state_dict())
    for name, tensor in eager.model.state_dict().items():  # batch-norm statistics included
        assert torch.allclose(final[name].double(), tensor.double(), rtol=0, atol=TOLERANCE), name


def test_auto_does_not_compile_a_short_run(monkeypatch):
    class Refused(choose.CompiledStep):
        def __call__(self, xb, yb):
            pytest.fail("auto compiled a run of 6 steps")

    monkeypatch.setattr(choose, "CompiledStep", Refused)
    run = bl.fit(model(), dataset(), bl.TrainConfig(batch_size=B, epochs=1, seed=7), progress=False)
    assert run.status == "finished" and len(run.steps) == N // B


def test_auto_compiles_a_run_that_repays_it(monkeypatch):
    calls = []

    class Counted(choose.CompiledStep):
        def __call__(self, xb, yb):
            calls.append(len(xb))
            return super().__call__(xb, yb)

    monkeypatch.setattr(choose, "CompiledStep", Counted)
    monkeypatch.setattr(choose, "should_compile", lambda steps, batch, shapes, compiled_before: steps >= 10)
    config = bl.TrainConfig(batch_size=B, epochs=2, seed=7, compile="auto", **CONFIGS["sgd"])
    run = bl.fit(model(), dataset(), config, progress=False)
    assert calls == [B] * 12 and len(run.steps) == 12


def test_every_step_probed_trains_eagerly_and_says_so(caplog):
    choose._SAID.clear()
    config = bl.TrainConfig(batch_size=B, max_steps=2, compile="on", **CONFIGS["sgd"])
    with caplog.at_level(logging.WARNING, logger="batchlab.compiled"):
        run = bl.fit(model(), dataset(), config, probes=["grad_norm"], progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "batchlab.compiled"]
    assert len(lines) == 1 and "trains eagerly" in lines[0]
    assert run.steps["grad_norm"].notna().all()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_several_steps_per_graph_give_the_eager_tables(kind):
    """Without probes, ``compile="on"`` runs up to CHUNK steps per graph: stopping before each
    evaluation (every 5 steps), before the short last batch (100 = 6·16 + 4), at epoch ends. Dropout
    masks, batch-norm statistics, the per-step schedule and the optimizer state must all match the
    eager run's, step by step."""
    steps: list = []

    class Seen(choose.CompiledStep):
        def __init__(self, *args):
            super().__init__(*args)
            steps.append(self)

    data = dataset()
    generator = torch.Generator().manual_seed(11)
    extra = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    data = Dataset("tiny", (torch.cat([data.train[0], extra]), torch.cat([data.train[1], (extra[:, 0] > 0).long()])),
                   data.val, data.test, n_classes=3)
    config = dict(batch_size=B, epochs=3, eval_every=5, seed=7, **CONFIGS[kind])
    eager = bl.fit(model(), data, bl.TrainConfig(compile="off", **config), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(choose, "CompiledStep", Seen)
        compiled = bl.fit(model(), data, bl.TrainConfig(compile="on", **config), progress=False)
    assert len(steps) == 1 and steps[0].chunk_reason is None and len(steps[0].chunks) == 1
    for table in ("steps", "evals", "epochs"):
        a, b = numbers(getattr(compiled, table)), numbers(getattr(eager, table))
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=TOLERANCE)
    final = dict(compiled.model.state_dict())
    for name, tensor in eager.model.state_dict().items():
        assert torch.allclose(final[name], tensor, rtol=0, atol=TOLERANCE), name
