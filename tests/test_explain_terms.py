"""`batchlab explain`: the jump's terms, each against an independent computation by hand.

The by-hand side never calls the code under test: it draws the loop's orders with its own
generator, scores samples with copies of the model taken at every evaluation, and trains branches
with plain torch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.events import Callback
from batchlab.explain import (
    TERMS,
    BoundaryBranches,
    counterfactual_variants,
    explain_callbacks,
    explain_config,
    explain_run,
    explain_tables,
    sawtooth_profile,
    train_variant,  # fmt: skip
    variant_numbers,
)
from batchlab.loop import fit
from batchlab.store import RunStore


def toy(n=160, n_val=60, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return Dataset("toy", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=3)


def net(seed=0, dropout=0.0, hidden=32) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                   torch.nn.Linear(hidden, 3))


class Snapshots(Callback):
    """A copy of the model at every evaluation: the oracle's weights."""

    def __init__(self):
        self.models = {}

    def on_evaluation(self, event):
        self.models[event.clock.step] = copy.deepcopy(event.model)


def hand_orders(n, seed, epochs):
    generator = torch.Generator().manual_seed(seed)  # the loop's data generator, drawn by hand
    return [torch.randperm(n, generator=generator) for _ in range(epochs)]


def losses_of(model, X, y, train_mode=False):
    model = copy.deepcopy(model).train(train_mode)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(X), y, reduction="none").double()


def dense_run(dropout=0.0, epochs=3, batch_size=16, **config):
    """A run evaluated after every step, with a copy of the model at each evaluation."""
    dataset = toy()
    cfg = TrainConfig(batch_size=batch_size, epochs=epochs, lr=0.1, momentum=0.9, eval_every=1, compile="off",
                      **config)
    snapshots = Snapshots()
    run = fit(net(dropout=dropout), dataset, cfg, callbacks=[*explain_callbacks(dataset, cfg, window=3), snapshots],
              progress=False)
    return run, snapshots.models, dataset, cfg


@pytest.fixture(scope="module")
def dense():
    return dense_run()


def test_the_loops_batches_are_the_orders_drawn_by_hand():
    dataset = toy()
    cfg = TrainConfig(batch_size=16, epochs=2, lr=1e-9, compile="off")  # the weights barely move
    model = net()
    start = copy.deepcopy(model)
    run = fit(model, dataset, cfg, progress=False)
    X, y = dataset.train
    orders = hand_orders(160, 0, 2)
    per_sample = losses_of(start, X, y, train_mode=True)
    expected = [per_sample[order[i:i + 16]].mean().item() for order in orders for i in range(0, 160, 16)]
    assert np.allclose(run.steps["batch_loss"], expected, rtol=1e-5)


def test_seen_and_unseen_losses_are_those_of_the_samples_themselves(dense):
    run, models, dataset, _ = dense
    X, y = dataset.train
    orders = hand_orders(160, 0, 3)
    checked = 0
    for row in run.evals.to_dict("records"):
        step = int(row["step"])
        epoch, in_epoch = (step - 1) // 10 + 1, (step - 1) % 10 + 1  # 10 steps per epoch
        if step == 0 or in_epoch == 10:
            continue  # at an epoch's start or end one side is empty
        seen = orders[epoch - 1][:in_epoch * 16]
        unseen = orders[epoch - 1][in_epoch * 16:]
        losses = losses_of(models[step], X, y)  # no dropout: train mode is eval mode
        assert row["train_mode_seen_loss"] == pytest.approx(losses[seen].mean().item(), rel=1e-6)
        assert row["train_mode_unseen_loss"] == pytest.approx(losses[unseen].mean().item(), rel=1e-6)
        checked += 1
    assert checked == 3 * 9


def test_reexposure_term_recomputed_from_per_sample_losses(dense):
    run, models, dataset, _ = dense
    X, y = dataset.train
    orders = hand_orders(160, 0, 3)
    result = explain_run(run, "loss", window=3)
    for b in result.boundaries["loss"]:
        def offset(epoch, k):  # batch k (1-based) of epoch: unseen mean minus the whole pass, at its weights
            step = (epoch - 1) * 10 + k - 1
            losses = losses_of(models[step], X, y)
            unseen = orders[epoch - 1][(k - 1) * 16:]
            return (losses[unseen].mean() - losses.mean()).item()

        old = np.mean([offset(b.epoch, k) for k in range(1, 11)])
        new = np.mean([offset(b.epoch + 1, k) for k in range(1, 4)])
        assert b.reexposure_term == pytest.approx(new - old, abs=1e-9)
    assert all(b.reexposure_term < 0 for b in result.boundaries["loss"])  # seen samples fit better


def test_the_terms_add_up_to_the_jump_and_each_is_the_formula(dense):
    run, _, _, _ = dense
    evals = run.evals.set_index("step")
    for metric in ("loss", "acc"):
        for b in explain_run(run, metric, window=3).boundaries[metric]:
            end = b.step
            steps = run.steps.set_index("step")
            assert b.jump == pytest.approx(steps.at[end + 3, f"running_{metric}"] - steps.at[end, f"running_{metric}"])
            total = sum(getattr(b, t) for t in TERMS) + b.unexplained
            assert total == pytest.approx(b.jump, abs=1e-12)
            true = evals[f"train_{metric}"]
            old = [true[s - 1] for s in range(end - 9, end + 1)]  # batch s is taken at weights s - 1
            assert b.averaging_term == pytest.approx(true[end] - np.mean(old))
            window = [true[s - 1] for s in range(end + 1, end + 4)]
            assert b.progress_term == pytest.approx(np.mean(window) - true[end])  # SGD, constant lr
            assert b.schedule_term == 0 and b.optimizer_state_term == 0
            assert b.train_mode_term == pytest.approx(0, abs=1e-9)  # no dropout, no batch norm


def test_eval_mode_running_mean_by_hand():
    run, models, dataset, _ = dense_run(dropout=0.4, epochs=2)
    X, y = dataset.train
    orders = hand_orders(160, 0, 2)
    for epoch in (1, 2):
        batches = orders[epoch - 1].split(16)
        values = [losses_of(models[(epoch - 1) * 10 + k], X[i], y[i]).mean().item() for k, i in enumerate(batches)]
        end = epoch * 10
        assert run.evals.set_index("step").at[end, "eval_mode_running_loss"] == pytest.approx(np.mean(values))
    b = explain_run(run, "loss", window=3).boundaries["loss"][0]
    assert math.isfinite(b.eval_mode_jump)


def test_the_callbacks_leave_the_run_as_it_was():
    dataset = toy()
    cfg = explain_config(TrainConfig(batch_size=16, epochs=3, optimizer="adam", lr=0.01, schedule="step",
                                     step_epochs=1, gamma=0.5, compile="off"), 160)
    with_them = fit(net(dropout=0.3), dataset, cfg, callbacks=explain_callbacks(dataset, cfg), progress=False)
    without = fit(net(dropout=0.3), dataset, cfg, progress=False)
    columns = [c for c in without.steps.columns if c != "seconds"]
    pd.testing.assert_frame_equal(with_them.steps[columns], without.steps[columns])
    for (name, a), (_, b) in zip(with_them.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), name


class BoundaryCopy(Callback):
    """The model and optimizer at the first boundary, copied together (their parameters stay linked)."""

    def on_run_start(self, event):
        self.optimizer = event.optimizer

    def on_evaluation(self, event):
        if event.clock.step == 10:
            self.copy = copy.deepcopy((event.model, self.optimizer))


def test_schedule_and_optimizer_state_terms_are_branches_trained_by_hand():
    dataset = toy()
    X, y = dataset.train
    cfg = TrainConfig(batch_size=16, epochs=2, optimizer="adam", lr=0.01, betas=(0.9, 0.95), schedule="step",
                      step_epochs=1, gamma=0.1, eval_every=1, compile="off")
    at_boundary = BoundaryCopy()
    run = fit(net(), dataset, cfg, callbacks=[at_boundary, BoundaryBranches(dataset, cfg, window=4)], progress=False)
    batches = hand_orders(160, 0, 2)[1].split(16)[:3]

    def progress(lr, freeze):
        model, optimizer = copy.deepcopy(at_boundary.copy)
        values = [losses_of(model, X, y).mean().item()]
        for index in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr
            kept = {id(p): {k: v.clone() for k, v in s.items() if k in ("exp_avg_sq", "step")}
                    for p, s in optimizer.state.items()}
            loss = torch.nn.functional.cross_entropy(model(X[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if freeze:
                for p, s in optimizer.state.items():
                    for k, v in kept[id(p)].items():
                        s[k].copy_(v)
            values.append(losses_of(model, X, y).mean().item())
        return np.mean(values) - values[0]

    row = run.evals.set_index("step").loc[10]
    assert row["schedule_loss"] == pytest.approx(progress(0.001, False) - progress(0.01, False), rel=1e-4)
    assert row["optimizer_state_loss"] == pytest.approx(progress(0.01, False) - progress(0.01, True), rel=1e-4)
    assert row["schedule_loss"] > 0  # a tenth of the rate makes less progress over the window
    b = explain_run(run, "loss").boundaries["loss"][0]
    assert b.window == 4 and b.schedule_term == row["schedule_loss"]


def test_variant_trains_exactly_as_fit_does():
    dataset = toy()
    cfg = TrainConfig(batch_size=16, epochs=2, lr=0.1, momentum=0.9, compile="off")
    model = net(dropout=0.3)
    steps = train_variant(model, dataset, cfg)
    run = fit(model, dataset, cfg, progress=False)
    for column in ("batch_loss", "batch_acc", "running_loss", "running_acc", "samples_seen"):
        assert np.array_equal(steps[column].to_numpy(), run.steps[column].to_numpy()), column


def test_with_replacement_draws_samples_independently():
    dataset = toy()
    cfg = TrainConfig(batch_size=16, epochs=3, lr=1e-9, compile="off")
    X, y = dataset.train
    per_sample = losses_of(net(), X, y, train_mode=True)
    steps = train_variant(net(), dataset, cfg, replacement=True)
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([torch.randint(160, (160,), generator=generator) for _ in range(3)])
    expected = [per_sample[i].mean().item() for i in draws.split(16)]
    assert np.allclose(steps["batch_loss"], expected, rtol=1e-5)
    assert len(set(draws[:160].tolist())) < 160  # some samples twice in an "epoch", some not at all


def test_sawtooth_measures_a_planted_saw_and_ignores_a_trend():
    S, epochs = 40, 6
    step = np.arange(1, S * epochs + 1)
    position = (step - 1) % S
    trend = 2.0 - 0.004 * step + 2e-6 * step**2
    saw = 0.1 * position / (S - 1)  # rises by 0.1 through each epoch, drops at its end
    for values, expected in ((trend, 0.0), (trend + saw, -0.1 * S / (S - 1))):
        steps = pd.DataFrame({"step": step, "epoch": (step - 1) // S + 1, "batch_size": 8, "batch_loss": values,
                              "running_loss": values})  # running values are irrelevant here
        _, sawtooth, _ = variant_numbers(steps, 4)
        assert sawtooth["loss"] == pytest.approx(expected, abs=1e-9)
    profile = sawtooth_profile(trend + saw, S, bins=4)
    assert profile[0] < profile[1] < profile[2] < profile[3]


def test_variants_name_what_they_change():
    sgd = counterfactual_variants(TrainConfig(optimizer="sgd", momentum=0.9))
    assert [v.name for v in sgd] == ["with replacement", "adam", "adam, beta2=0.95"]
    adam = counterfactual_variants(TrainConfig(optimizer="adam", betas=(0.9, 0.95), schedule="cosine"))
    assert [v.name for v in adam] == ["with replacement", "sgd", "adam, beta2=0.999", "constant lr"]
    assert adam[-1].config.schedule == "constant" and adam[2].config.betas == (0.9, 0.999)


def test_a_track_run_names_the_terms_it_cannot_give(tmp_path):
    dataset = toy()
    X, y = dataset.train
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with bl.track(model, optimizer, store=tmp_path / "runs.db", eval_every=2, eval_data={"train": (X, y)},
                  loss_fn=loss_fn) as tracker:
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            for index in torch.randperm(160, generator=generator).split(16):
                out = model(X[index])
                loss = loss_fn(out, y[index])
                optimizer.zero_grad()
                loss.backward()
                tracker.step(loss, outputs=out, targets=y[index])
                optimizer.step()
            tracker.end_epoch()
    with RunStore(tmp_path / "runs.db") as store:
        stored = store.load_run(1)
    result = explain_run(stored, "loss")
    assert set(result.missing) == {"train_mode_term", "reexposure_term", "optimizer_state_term"}
    assert all("a track run cannot record it" in how for how in result.missing.values())
    for b in result.boundaries["loss"]:
        assert math.isnan(b.train_mode_term) and math.isnan(b.reexposure_term)
        assert b.schedule_term == 0  # the logged lr did not change
        assert math.isfinite(b.averaging_term) and math.isfinite(b.sawtooth)
        assert b.averaging_term + b.progress_term + b.unexplained == pytest.approx(b.jump)
    assert "did not record train mode and re-exposure and the optimizer's state" in result.paragraph


def test_a_keras_run_is_told_what_would_record_each_missing_term(dense):
    run = dense[0]
    evals = run.evals[[c for c in run.evals.columns if not c.startswith(("train_mode", "schedule", "optimizer"))]]
    result = explain_tables(run.steps, evals, "acc", source="keras")
    assert "TrainModePass" in result.missing["train_mode_term"]
    assert "sample order" in result.missing["reexposure_term"]
    assert "a keras run cannot record it" in result.missing["optimizer_state_term"]


def test_the_command_trains_counterfactuals_and_reports_every_term(tmp_path, cli):
    import json

    store = tmp_path / "runs.db"
    args = ["explain", "--dataset", "blobs", "--model", "mlp:hidden=16,dropout=0.2", "--epochs", "3", "--batch-size",
            "50", "--lr", "0.1", "--store", str(store), "--json"]
    status, out, err = cli(args)
    assert status == 0, err
    result = json.loads(out)
    assert [c["name"] for c in result["counterfactuals"]] == ["with replacement", "adam", "adam, beta2=0.95"]
    with RunStore(store) as runs:
        stored = explain_run(runs.load_run(1))
    assert result["boundaries"]["acc"] == stored.to_dict()["boundaries"]["acc"]
    status, out, err = cli(["explain", "--run", "1", "--store", str(store), "--window", "2"])
    assert status == 0, err
    assert "jump after 2 batches" in out and "counterfactual runs" not in out


@pytest.mark.slow
def test_the_adam_sawtooth_on_mnist1d_vanishes_with_replacement():
    """Liu & Ma 2025 on MNIST-1D: with Adam the batch loss drops at every epoch start beyond its
    trend; drawn with replacement it does not. Bands: about 6 and 1.5 standard errors."""
    torch.set_num_threads(1)
    dataset = bl.load_dataset("mnist1d")
    model = bl.build_model("mlp", dataset, seed=0, hidden=[256, 256])
    config = TrainConfig(batch_size=32, epochs=12, optimizer="adam", lr=0.001)
    shuffled = variant_numbers(train_variant(model, dataset, config), 15)
    replaced = variant_numbers(train_variant(model, dataset, config, replacement=True), 15)
    error = shuffled[2]["loss"]
    assert -0.15 < shuffled[1]["loss"] < -5 * error  # a drop at each epoch's start
    assert abs(replaced[1]["loss"]) < 3 * replaced[2]["loss"]  # none beyond the draw of the batches


def test_the_figure_with_terms_and_sawtooth_reads_well(dense):
    from test_figures_readable import problems

    from batchlab.explain import counterfactual_runs
    from batchlab.plots.explain import explain_figure

    run, _, dataset, cfg = dense
    result = explain_run(run, "acc", window=3)
    result = result.with_counterfactuals(counterfactual_runs(net(), dataset, cfg.replace(epochs=4), 3))
    fig = explain_figure(run.steps, run.evals, result, title="Why the running mean jumps: run 1, toy, B=16")
    assert len(fig.axes) == 4
    assert problems(fig) == []
    bars = fig.axes[2]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1 to 2", "2 to 3"]
