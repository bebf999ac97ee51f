"""An adaptive batch size: the rule, its evidence against brute force, and a run that equals the
scheduled run of the same decisions."""

from __future__ import annotations

import json
import math

import pytest
import torch

import batchlab as bl
from batchlab.adaptive import adaptive_betas, grown
from batchlab.callbacks import Checkpoint
from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError
from batchlab.events import Callback
from batchlab.loop import fit, plan_run
from batchlab.store import RunStore

N = 256


def regression(n=N, noise=1.0) -> Dataset:
    """y = x·w* + noise: a problem whose gradient noise is large next to its gradient near the optimum."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n + 64, 8, generator=g, dtype=torch.float64)
    y = X @ torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1) + noise * torch.randn(n + 64, 1, generator=g,
                                                                                            dtype=torch.float64)
    return Dataset("reg", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=None)


def linear() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 1).double()


@pytest.mark.parametrize(("batch", "signal", "largest", "after"), [
    (16, 31.9, 1024, 16), (16, 32, 1024, 32), (16, 63.9, 1024, 32), (16, 64, 1024, 64), (16, 1e9, 256, 256),
    (16, math.nan, 1024, 16), (16, math.inf, 100, 64), (16, 10, 1024, 16),
])
def test_the_rule_grows_by_powers_of_two_to_the_signal_and_never_shrinks(batch, signal, largest, after):
    assert grown(batch, signal, largest) == after


def test_adams_beta2_keeps_its_half_life_in_samples():
    config = TrainConfig(batch_size="adaptive:start=16,max=256", optimizer="adam", betas=(0.9, 0.99))
    for batch in (16, 32, 128):
        beta1, beta2 = adaptive_betas(config, batch)
        assert beta1 == 0.9
        assert batch * math.log(0.5) / math.log(beta2) == pytest.approx(16 * math.log(0.5) / math.log(0.99), rel=1e-12)
    fixed = TrainConfig(batch_size="adaptive:start=16,max=256,beta2_half_life=false", optimizer="adam")
    assert adaptive_betas(fixed, 128) == fixed.betas


def brute_force_b_simple(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """tr(Σ)/‖G‖² over the whole set, one backward pass per sample (Σ with 1/(N−1))."""
    grads = []
    for i in range(X.shape[0]):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(X[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    G = torch.stack(grads)  # (N, P)
    mean = G.mean(0)
    return float(((G - mean) ** 2).sum() / (len(G) - 1) / (mean @ mean))


class Weights(Callback):
    """Keeps the weights at every evaluation (to recompute the evidence independently)."""

    def __init__(self):
        self.at = {}

    def on_evaluation(self, event):
        self.at[event.clock.step] = {k: v.clone() for k, v in event.model.state_dict().items()}


def test_b_simple_evidence_equals_brute_force_and_decides_the_batch():
    ds, weights = regression(), Weights()
    config = TrainConfig(batch_size="adaptive:start=4,max=128,signal=b_simple", epochs=4, lr=0.02, compile="off")
    run = fit(linear(), ds, config, callbacks=[weights], progress=False)
    batch = 4
    for row in run.evals.itertuples():  # the start and each epoch's end (the last too: a resume goes on from it)
        if batch == 128:  # at its largest: nothing measured
            assert math.isnan(row.adaptive_signal)
            continue
        model = linear()
        model.load_state_dict(weights.at[row.step])
        expected = brute_force_b_simple(model, *ds.train)
        assert row.adaptive_signal == pytest.approx(expected, rel=1e-9)
        batch = grown(batch, expected, 128)
        assert row.adaptive_batch_size == batch
    assert batch > 4  # it grew: the signal said so
    assert run.steps.batch_size.max() == batch


@pytest.mark.parametrize("eval_every", ["epoch", 7])
@pytest.mark.parametrize("signal", ["b_simple", "local_cbs"])
def test_an_adaptive_run_equals_the_scheduled_run_of_its_decisions(signal, eval_every):
    """Decisions at epoch ends and mid-epoch (eval_every=7): replaying them as a schedule, with the
    lr scaled linearly from start (SGD's rule), gives the same rows bit for bit."""
    ds = regression()
    options = dict(epochs=4, lr=0.02, momentum=0.5, compile="off", eval_every=eval_every, seed=3)
    run = fit(linear(), ds, TrainConfig(batch_size=f"adaptive:start=4,max=64,signal={signal},seeds=2", **options),
              progress=False)
    sizes = run.steps.batch_size.tolist()
    changes = [(0, 4)]
    for row in run.evals.dropna(subset=["adaptive_batch_size"]).itertuples():
        if row.adaptive_batch_size != changes[-1][1]:
            changes = [c for c in changes if c[0] < row.samples_seen] + [(int(row.samples_seen),
                                                                         int(row.adaptive_batch_size))]
    assert len(changes) > 1, "the test needs a run whose batch grows"
    replay = fit(linear(), ds, TrainConfig(batch_size=changes, lr_scaling="linear", reference_batch_size=4, **options),
                 progress=False)
    assert replay.steps.batch_size.tolist() == sizes
    assert replay.steps.lr.tolist() == run.steps.lr.tolist()
    assert replay.steps.batch_loss.tolist() == run.steps.batch_loss.tolist()
    assert len(run.steps) == run.clock.total_steps  # the run's length was re-planned as it grew


def test_adam_runs_with_the_moved_beta2():
    ds, seen = regression(), {}

    class Betas(Callback):
        def on_run_start(self, event):
            self.optimizer = event.optimizer

        def on_epoch_end(self, event):
            seen[event.clock.batch_size] = self.optimizer.param_groups[0]["betas"]

    config = TrainConfig(batch_size="adaptive:start=4,max=64,signal=b_simple", optimizer="adam", lr=0.01, epochs=3,
                         betas=(0.9, 0.99), compile="off")
    fit(linear(), ds, config, callbacks=[Betas()], progress=False)
    assert any(b > 4 for b in seen)
    for batch, betas in seen.items():
        assert betas == pytest.approx(adaptive_betas(config, batch), rel=1e-15)


def test_a_resumed_adaptive_run_keeps_its_decisions(tmp_path):
    ds = regression()
    config = TrainConfig(batch_size="adaptive:start=4,max=64,signal=b_simple", epochs=4, lr=0.02, compile="off")
    whole = fit(linear(), ds, config, progress=False)
    fit(linear(), ds, config.replace(epochs=2), callbacks=[Checkpoint(tmp_path / "c.pt")], progress=False)
    rest = fit(linear(), ds, config, resume_from=tmp_path / "c.pt", progress=False)
    assert rest.steps.batch_size.tolist() == whole.steps.batch_size.tolist()
    assert rest.steps.batch_loss.tolist() == whole.steps.batch_loss.tolist()


def test_the_accounting_line_says_it_adapts():
    clock = plan_run(regression(), TrainConfig(batch_size="adaptive:start=4,max=1024", epochs=2))
    assert clock.describe() == ("256 samples, batch 4, adaptive up to 256 by the local critical batch size; "
                                "2 epochs = at most 128 steps")


@pytest.mark.parametrize(("options", "words"), [
    ({"lr_scaling": "linear"}, "own lr_rule"), ({"schedule": "cosine"}, "constant or step"),
    ({"batch_size": "adaptive:start=64,max=8"}, "must be at least start"),
    ({"batch_size": "adaptive:start"}, "adaptive:start=16,max=1024"),
])
def test_bad_adaptive_settings_are_one_line(options, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{"batch_size": "adaptive", **options})
    assert words in str(error.value) and "\n" not in str(error.value)


def test_replicas_refuse_it_in_one_line():
    with pytest.raises(ConfigError, match="fit_replicas trains at one batch size; an adaptive batch size"):
        bl.fit_replicas(lambda seed: linear(), regression(), [TrainConfig(batch_size="adaptive")])


def test_the_command_line_stores_each_decision_with_its_evidence(tmp_path, cli):
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--dataset", "blobs", "--model", "mlp:hidden=16", "--epochs", "3", "--batch-size",
                            "adaptive:start=8,max=128,signal=b_simple", "--store", str(store), "--json"])
    assert status == 0, err
    assert "500 samples, batch 8, adaptive up to 128 by the noise scale B_simple; 3 epochs = at most" in err
    figure = tmp_path / f"batchlab-adaptive-{json.loads(out)['run_id']}.png"
    assert json.loads(out)["figure"] == str(figure) and figure.stat().st_size > 10_000
    assert f"; figure: {figure}" in err and "batch 8 -> " in err
    with RunStore(store) as runs:
        stored = runs.load_run(json.loads(out)["run_id"])
    decided = stored.evals.dropna(subset=["adaptive_signal"])
    assert set(decided.columns) >= {"adaptive_signal", "adaptive_batch_size"}
    # A decision at every evaluation until the batch is at its largest (then nothing is measured).
    reached = list(decided.adaptive_batch_size).index(128) + 1 if 128 in set(decided.adaptive_batch_size) else 4
    assert len(decided) == reached and list(decided.step) == list(stored.evals.step[:reached])
    assert stored.config["batch_size"]["signal"] == "b_simple"
    status, _, err = cli(["report", str(stored.id), "--store", str(store), "--out", str(tmp_path / "r.html")])
    assert status == 0 and "The adaptive batch size: the batch in force" in (tmp_path / "r.html").read_text()
    last_epoch = stored.steps[stored.steps.epoch == 3]
    at_epoch_2 = stored.evals.step.iloc[2]  # the decision in force in epoch 3 was made at epoch 2's end, or before
    assert last_epoch.batch_size.max() == decided[decided.step <= at_epoch_2].adaptive_batch_size.iloc[-1]


def test_the_sampler_grows_your_loops_batch_from_the_tracked_noise_scale():
    from torch.utils.data import DataLoader, TensorDataset

    ds = regression()
    X, y = ds.train
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected_batches, lrs = [], []
    with bl.track(model, optimizer, probes=["noise_scale"], n_train=N) as run:
        sampler = bl.AdaptiveBatchSampler(N, start=4, max=64, run=run, optimizer=optimizer)
        loader = DataLoader(TensorDataset(X, y), batch_sampler=sampler)
        batch, lr = 4, 0.01
        for _ in range(4):
            measured = run.steps["noise_scale"].dropna() if "noise_scale" in run.steps else []
            after = grown(batch, float(measured.iloc[-1]) if len(measured) else math.nan, 64)
            lr, batch = lr * after / batch, after  # SGD: the linear rule
            for xb, yb in loader:
                expected_batches.append(batch)
                lrs.append(optimizer.param_groups[0]["lr"])
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, batch_size=len(xb))
                optimizer.step()
            run.end_epoch()
    sizes = run.steps.batch_size.tolist()
    assert max(sizes) > 4, "the test needs a run whose batch grows"
    assert [min(b, s) for b, s in zip(expected_batches, sizes)] == sizes  # each batch as decided (a last one short)
    assert lrs == pytest.approx([0.01 * b / 4 for b in expected_batches], rel=1e-12)
    assert [d["batch_size"] for d in sampler.decisions][-1] == batch


def test_the_sampler_grows_a_lightning_runs_batch_from_its_callback():
    """Lightning trains from a DataLoader whose batch_sampler reads the Lightning callback's noise
    scale: the batches Lightning's own training_step saw grow as the rule says, and the optimizer
    Lightning made follows with the linear rule."""
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from batchlab.integrations.lightning import BatchlabCallback

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.seen = linear(), []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((len(x), self.trainer.optimizers[0].param_groups[0]["lr"]))
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    X, y = regression().train
    callback = BatchlabCallback(probes=["noise_scale"])
    sampler = bl.AdaptiveBatchSampler(N, start=4, max=64, run=callback, optimizer="run")
    module = Regressor()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, DataLoader(TensorDataset(X, y), batch_sampler=sampler))
    decided = [d["batch_size"] for d in sampler.decisions]
    assert max(decided) > 4, "the test needs a run whose batch grows"
    sizes = [size for size, _ in module.seen]
    assert sizes == callback.steps.batch_size.tolist()  # the callback recorded the batches Lightning trained on
    for decision, following in zip(sampler.decisions, _epochs(sizes, N)):
        assert max(following) == decision["batch_size"]
    assert [lr for _, lr in module.seen] == pytest.approx([0.01 * max(e) / 4 for e in _epochs(sizes, N)
                                                           for _ in e], rel=1e-12)


def _epochs(sizes: list[int], n: int) -> list[list[int]]:
    """Consecutive batch sizes grouped into epochs of n samples."""
    epochs, current = [], []
    for size in sizes:
        current.append(size)
        if sum(current) == n:
            epochs.append(current)
            current = []
    return epochs


def test_nothing_is_measured_once_the_batch_is_at_its_largest():
    config = TrainConfig(batch_size="adaptive:start=4,max=8,signal=b_simple", epochs=5, lr=0.02, compile="off")
    run = fit(linear(), regression(), config, progress=False)
    decided = run.evals.dropna(subset=["adaptive_signal"])
    assert decided.adaptive_batch_size.tolist()[-1] == 8 and len(decided) < len(run.evals)
    assert (decided.adaptive_batch_size.iloc[:-1] < 8).all()  # the decision that reached 8 was the last


def test_each_local_cbs_decision_stores_the_samples_its_branches_took(monkeypatch):
    """Counted independently: every branch's training samples, as local_cbs trains them."""
    import batchlab.critical_batch as critical_batch

    counted, train_branch = [], critical_batch.train_branch
    monkeypatch.setattr(critical_batch, "train_branch",
                        lambda *args, **kw: counted.append(int(args[4].numel())) or train_branch(*args, **kw))
    config = TrainConfig(batch_size="adaptive:start=4,max=16,seeds=2", epochs=2, lr=0.02, compile="off")
    run = fit(linear(), regression(), config, progress=False)
    decided = run.evals.dropna(subset=["adaptive_signal"])
    assert len(decided) >= 1 and decided.adaptive_samples.sum() == sum(counted) > 0
