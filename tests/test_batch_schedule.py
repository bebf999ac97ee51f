"""The batch size as a schedule of (samples seen -> B): parsing, accounting, and training that equals
a hand-written float64 loop; resuming, and branching from a checkpoint at another batch size."""

from __future__ import annotations

import json

import pytest
import torch

from batchlab.callbacks import Checkpoint
from batchlab.config import TrainConfig, format_schedule
from batchlab.data import Dataset
from batchlab.errors import ConfigError
from batchlab.loop import fit, plan_run
from batchlab.schedule import epoch_batch_sizes, plan_steps, resolve, sizes_used
from batchlab.store import RunStore

N = 100


def dataset(n=N, n_val=30) -> Dataset:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n + n_val, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.7).long()
    return Dataset("toy", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=3)


def model(seed=0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()


# --- the config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("8,150:16,300:32", ((0, 8), (150, 16), (300, 32))),
    ([(0, 8), (150, "full")], ((0, 8), (150, "full"))),
    ([[0, 8], [150, 16]], ((0, 8), (150, 16))),
    ("8", 8), ([(0, 8)], 8), ("8,100:8", 8),  # one batch size, however written
    ("8,100:8,200:16", ((0, 8), (200, 16))),  # a change to the same B is no change
])
def test_parsing(given, expected):
    config = TrainConfig(batch_size=given)
    assert config.batch_size == expected
    assert TrainConfig(**config.model_dump(mode="json")) == config  # JSON (the store, checkpoints) round-trips
    assert TrainConfig(batch_size=format_schedule(config.batch_size)) == config  # so does the command line's form


@pytest.mark.parametrize(("given", "words"), [
    ("8,16", "SAMPLES:B"), ("8,100:0", "whole number >= 1"), ("8,200:16,100:32", "must increase"),
    ([(10, 8)], "starts at 0"), ([(0, 8, 1)], "(samples seen, batch size)"), ("8,-5:16", "whole number >= 0"),
])
def test_bad_schedules_are_one_line(given, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(batch_size=given)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_epoch_counted_lr_schedules_are_refused_with_a_schedule():
    for options in ({"warmup_epochs": 0.5}, {"schedule": "sgdr"}):
        with pytest.raises(ConfigError, match="warmup_steps"):
            TrainConfig(batch_size="8,100:16", **options)


def test_a_batch_larger_than_the_data_is_refused_whenever_it_comes():
    with pytest.raises(ConfigError, match="batch_size 128 is larger than the training set"):
        plan_run(dataset(), TrainConfig(batch_size="8,150:128"))


# --- accounting -------------------------------------------------------------------------------------


def walk(schedule, n, drop_last, epochs=None, max_steps=None):
    """Batch sizes of a whole run, by brute force: one sample at a time."""
    def at(seen):
        return [b for s, b in schedule if s <= seen][-1]
    run, seen, epoch = [], 0, 0
    while (epochs is None or epoch < epochs) and (max_steps is None or sum(map(len, run)) < max_steps):
        epoch, used, sizes = epoch + 1, 0, []
        while used < n:
            b = at(seen + used)
            take = min(b, n - used)
            if take < b and drop_last:
                break
            sizes.append(take)
            used += take
        run.append(sizes)
        seen += used
    return run


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("schedule", "epochs", "max_steps"), [
    (((0, 8), (150, 16), (300, 32)), 5, None), (((0, 7), (130, 30)), 4, None), (((0, 8), (150, 100)), None, 23),
    (((0, 3),), 3, None), (((0, 8), (900, 16)), 12, 40),
])
def test_plan_agrees_with_a_sample_by_sample_walk(schedule, epochs, max_steps, drop_last):
    epochs_run = walk(schedule, N, drop_last, epochs, max_steps)
    total = sum(len(sizes) for sizes in epochs_run)
    if max_steps is not None:
        total = min(total, max_steps)
    assert plan_steps(schedule, N, drop_last, epochs, max_steps) == (total, len(epochs_run), len(epochs_run[0]))
    seen = 0
    for sizes in epochs_run:
        assert epoch_batch_sizes(schedule, N, seen, drop_last) == sizes
        seen += sum(sizes)
    flat = [b for sizes in epochs_run for b in sizes][:total]
    assert sizes_used(schedule, N, drop_last, total) == list(dict.fromkeys(flat))


def test_accounting_line_and_step_rows_show_each_batch():
    config = TrainConfig(batch_size="8,150:16,300:32", epochs=4, compile="off")
    clock = plan_run(dataset(), config)
    assert clock.describe() == "100 samples, batch 8 -> 16 at 150 samples -> 32 at 300 samples; 4 epochs = 34 steps"
    run = fit(model(), dataset(), config, progress=False)
    expected = [b for sizes in walk(resolve(config.batch_size, N), N, False, 4) for b in sizes]
    assert run.steps.batch_size.tolist() == expected
    assert run.steps.samples_seen.tolist() == list(torch.tensor(expected).cumsum(0))
    assert run.epochs.samples_seen.tolist() == [100, 200, 300, 400]


# --- training equals a hand-written loop -------------------------------------------------------------


def hand_loop(config: TrainConfig, ds: Dataset, net: torch.nn.Module) -> tuple[list, list, torch.nn.Module]:
    """The run written out: epochs of randperm from the seed's generator, batches by `walk`, the lr
    linear in the B in force (B_ref 8) times gamma every ``step_epochs`` epochs, torch's SGD."""
    X, y = ds.train
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    losses, lrs, seen = [], [], 0
    for epoch, sizes in enumerate(walk(config.batch_size, N, config.drop_last, config.epochs)):
        order, at = torch.randperm(N, generator=g), 0
        for b in sizes:
            in_force = [size for start, size in config.batch_size if start <= seen][-1]
            lr = config.lr * in_force / 8 * config.gamma ** (epoch // config.step_epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[order[at:at + b]]), y[order[at:at + b]])
            loss.backward()
            opt.step()
            at, seen = at + b, seen + b
            losses.append(loss.item())
            lrs.append(lr)
    return losses, lrs, net


SCHEDULED = dict(batch_size="8,150:16,300:40", epochs=5, lr=0.05, lr_scaling="linear", reference_batch_size=8,
                 momentum=0.9, schedule="step", step_epochs=2, gamma=0.5, seed=4)


@pytest.mark.parametrize("drop_last", [False, True])
def test_scheduled_fit_equals_a_hand_written_loop(drop_last):
    config = TrainConfig(**SCHEDULED, drop_last=drop_last, compile="off")
    run = fit(model(), dataset(), config, progress=False)
    losses, lrs, net = hand_loop(config, dataset(), model())
    assert run.steps.lr.tolist() == pytest.approx(lrs, rel=1e-15)
    assert run.steps.batch_loss.tolist() == pytest.approx(losses, abs=1e-9)
    assert len(set(run.steps.batch_size)) >= 3  # the schedule was exercised, short batches included


def test_scheduled_running_mean_is_sample_weighted_within_each_epoch():
    run = fit(model(), dataset(), TrainConfig(**SCHEDULED, compile="off"), progress=False)
    for _, rows in run.steps.groupby("epoch"):
        weights = rows.batch_size / rows.batch_size.sum()
        assert rows.running_loss.iloc[-1] == pytest.approx((rows.batch_loss * weights).sum(), abs=1e-12)


def test_scheduled_compiled_fit_equals_eager(monkeypatch):
    from batchlab.compiled.step import CompiledStep

    chunks, steps = [], CompiledStep.steps
    monkeypatch.setattr(CompiledStep, "steps",
                        lambda self, xs, *rest: chunks.append(xs.shape[:2]) or steps(self, xs, *rest))
    eager = fit(model(), dataset(), TrainConfig(**SCHEDULED, compile="off"), progress=False)
    compiled = fit(model(), dataset(), TrainConfig(**SCHEDULED, compile="on"), progress=False)
    assert len({b for _, b in chunks}) >= 2  # several steps per graph, at more than one batch size
    assert compiled.steps.batch_size.tolist() == eager.steps.batch_size.tolist()
    assert compiled.steps.batch_loss.tolist() == pytest.approx(eager.steps.batch_loss.tolist(), abs=1e-9)
    assert compiled.evals.val_loss.tolist() == pytest.approx(eager.evals.val_loss.tolist(), abs=1e-9)


# --- resuming and branching -------------------------------------------------------------------------


def test_a_scheduled_run_resumes_to_the_same_numbers(tmp_path):
    config = TrainConfig(**SCHEDULED, compile="off")
    whole = fit(model(), dataset(), config, progress=False)
    first = fit(model(), dataset(), config.replace(epochs=2), callbacks=[Checkpoint(tmp_path / "c.pt")],
                progress=False)
    assert first.clock.samples_seen == 200
    rest = fit(model(), dataset(), config, resume_from=tmp_path / "c.pt", progress=False)
    assert rest.steps.batch_size.tolist() == whole.steps.batch_size.tolist()
    assert rest.steps.batch_loss.tolist() == whole.steps.batch_loss.tolist()  # bit-identical on the CPU


def test_a_checkpoint_branches_at_another_batch_size_and_lr(tmp_path):
    """A run at B = 10 checkpointed after 2 epochs continues at B = 20 and twice the lr: the same as
    a hand-written continuation of its weights and optimizer state on the next epochs' orders."""
    base = TrainConfig(batch_size=10, epochs=2, lr=0.05, momentum=0.9, seed=2, compile="off")
    fit(model(), dataset(), base, callbacks=[Checkpoint(tmp_path / "c.pt")], progress=False)
    branch = base.replace(batch_size=[(0, 10), (200, 20)], lr=0.1, epochs=4)
    resumed = fit(model(), dataset(), branch, resume_from=tmp_path / "c.pt", progress=False)
    assert resumed.steps.batch_size.tolist() == [10] * 20 + [20] * 10 and set(resumed.steps.lr[20:]) == {0.1}

    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    net = model()
    net.load_state_dict(blob["model"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(blob["optimizer"])
    g = torch.Generator()
    g.set_state(blob["generator"])
    X, y = dataset().train
    losses = []
    for _ in range(2):
        order = torch.randperm(N, generator=g)
        for index in order.split(20):
            for group in opt.param_groups:
                group["lr"] = 0.1
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[index]), y[index])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert resumed.steps.batch_loss.tolist()[20:] == pytest.approx(losses, abs=1e-12)


@pytest.mark.parametrize(("change", "words"), [
    ({"batch_size": 20, "epochs": 4}, "batch sizes before the checkpoint's 200 samples differ"),
    ({"momentum": 0.5}, "it differs in momentum"),
])
def test_a_resume_that_rewrites_the_past_is_refused(tmp_path, change, words):
    base = TrainConfig(batch_size=10, epochs=2, lr=0.05, momentum=0.9, compile="off")
    fit(model(), dataset(), base, callbacks=[Checkpoint(tmp_path / "c.pt")], progress=False)
    with pytest.raises(ConfigError) as error:
        fit(model(), dataset(), base.replace(**change), resume_from=tmp_path / "c.pt", progress=False)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_and_toml_take_a_schedule(tmp_path, cli):
    store = tmp_path / "runs.db"
    status, out, err = cli(["fit", "--dataset", "blobs", "--model", "mlp:hidden=16", "--epochs", "3",
                            "--batch-size", "32,600:64", "--lr-scaling", "linear", "--store", str(store), "--json"])
    assert status == 0, err
    assert "500 samples, batch 32 -> 64 at 600 samples; 3 epochs = 34 steps" in err
    with RunStore(store) as runs:
        stored = runs.load_run(json.loads(out)["run_id"])
    assert stored.config["batch_size"] == [[0, 32], [600, 64]]
    assert stored.steps.batch_size.tolist() == [32] * 15 + [20] + [32] * 4 + [64] * 5 + [52] + [64] * 7 + [52]
    status, out, err = cli(["runs", "list", "--store", str(store)])
    assert status == 0 and "32,600:64" in out  # as the command line wrote it
    status, _, err = cli(["report", str(stored.id), "--store", str(store), "--out", str(tmp_path / "r.html")])
    assert status == 0, err
    assert "B=32,600:64" in (tmp_path / "r.html").read_text()
    config = tmp_path / "run.toml"
    config.write_text('[dataset]\nname = "blobs"\n[train]\nbatch_size = [[0, 32], [600, 64]]\nepochs = 3\n')
    status, out, err = cli(["fit", "--config", str(config), "--store", str(store), "--json"])
    assert status == 0 and "batch 32 -> 64 at 600 samples" in err
    status, out, err = cli(["fit", "--dataset", "blobs", "--batch-size", "32,64", "--store", str(store)])
    assert status == 2 and err.strip().startswith("error:") and "SAMPLES:B" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("batch_size", ["8,150:16", "adaptive:start=8,max=32"])
def test_explain_refuses_a_batch_that_changes_in_one_line(tmp_path, cli, batch_size):
    status, _, err = cli(["explain", "--dataset", "blobs", "--batch-size", batch_size, "--epochs", "2",
                          "--store", str(tmp_path / "s.db"), "--out", str(tmp_path)])
    assert status == 2 and "batchlab explain trains at one batch size" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("compile", ["off", "on"])
def test_replicas_of_a_scheduled_run_equal_fit(compile, monkeypatch):
    """Two lrs and two seeds stacked, under one schedule: each replica's tables equal its own fit."""
    from batchlab.replicas import fit_replicas

    # Batch sizes that divide N: no short batches, so the compiled stack meets three shapes only.
    base = {**SCHEDULED, "batch_size": "10,200:20,300:50", "compile": compile}
    configs = [TrainConfig(**{**base, "lr": lr, "seed": seed}) for lr in (0.05, 0.02) for seed in (4, 5)]
    runs = fit_replicas(lambda seed: model(seed), dataset(), configs, progress=False)
    for config, run in zip(configs, runs):
        alone = fit(model(config.seed), dataset(), config.replace(compile="off"), progress=False)
        assert run.steps.batch_size.tolist() == alone.steps.batch_size.tolist()
        assert run.steps.lr.tolist() == pytest.approx(alone.steps.lr.tolist(), rel=1e-15)
        assert run.steps.batch_loss.tolist() == pytest.approx(alone.steps.batch_loss.tolist(), abs=1e-9)
        assert run.evals.val_loss.tolist() == pytest.approx(alone.evals.val_loss.tolist(), abs=1e-9)
        assert run.epochs.samples_seen.tolist() == alone.epochs.samples_seen.tolist()


def test_the_accounting_line_under_data_parallelism_names_the_per_rank_batch():
    from batchlab.cli.train import rank_batches

    assert rank_batches(25, 2, "gloo") == "; global batch = 25 per rank × 2 ranks (gloo)"
    assert rank_batches(((0, 12), (600, 20)), 2, "gloo") == "; global batches = 12,600:20 per rank × 2 ranks (gloo)"
    assert rank_batches("full", 4, "nccl") == "; the full batch split over 4 ranks (nccl)"
