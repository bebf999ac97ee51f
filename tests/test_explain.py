"""`batchlab explain`: the train-mode pass, every number per boundary, the paragraph, the command."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError, DataError
from batchlab.events import AddMetrics, Callback
from batchlab.explain import TrainModePass, dense_eval_every, explain_config, explain_run, explain_tables
from batchlab.loop import fit
from batchlab.store import RunStore, recorder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy(n=160, n_val=60, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return Dataset("toy", (X[:n], y[:n]), (X[n:], y[n:]), None, n_classes=3)


def net(seed=0, dropout=0.3, batch_norm=False) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(6, 32)]
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(32))
        layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 3)]
        return torch.nn.Sequential(*layers)


def explain_fit(batch_size=8, epochs=4, dropout=0.3, batch_norm=False, callbacks=(), train_mode=True, **config):
    dataset = toy()
    cfg = explain_config(TrainConfig(batch_size=batch_size, epochs=epochs, lr=0.1, momentum=0.9, **config),
                         dataset.n_train)
    extra = [TrainModePass(dataset, cfg)] if train_mode else []
    return fit(net(dropout=dropout, batch_norm=batch_norm), dataset, cfg, callbacks=[*extra, *callbacks],
               progress=False)


@pytest.fixture(scope="module")
def run():
    return explain_fit()


def curve_at(evals: pd.DataFrame, column: str, last_step: int) -> pd.Series:
    """The evaluated curve at every step 0..last_step, by pandas' index interpolation (linear in steps)."""
    series = evals.set_index("step")[column]
    return series.reindex(range(last_step + 1)).interpolate(method="index")


# -- the loop extension point and the train-mode pass ------------------------------------------


class AddsMetrics(Callback):
    def on_evaluation(self, event):
        return AddMetrics({"double_val_loss": 2 * event.metrics["val_loss"], "train_loss": -1.0})


def test_add_metrics_join_the_evaluation_rows_and_the_store(tmp_path):
    rec = recorder(tmp_path / "runs.db")
    run = explain_fit(epochs=2, train_mode=False, callbacks=[AddsMetrics(), rec])
    assert np.allclose(run.evals["double_val_loss"], 2 * run.evals["val_loss"])
    assert (run.evals["train_loss"] > 0).all()  # a callback cannot overwrite what the loop measured
    assert np.allclose(run.epochs["double_val_loss"], 2 * run.epochs["val_loss"])
    with RunStore(tmp_path / "runs.db") as store:
        stored = store.load_run(rec.run_id)
    assert np.allclose(stored.evals["double_val_loss"], 2 * stored.evals["val_loss"])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_train_mode_pass_leaves_the_run_unchanged(batch_norm):
    with_pass = explain_fit(epochs=2, batch_norm=batch_norm)
    without = explain_fit(epochs=2, batch_norm=batch_norm, train_mode=False)
    steps_columns = [c for c in without.steps.columns if c != "seconds"]
    pd.testing.assert_frame_equal(with_pass.steps[steps_columns], without.steps[steps_columns])
    eval_columns = [c for c in without.evals.columns if c != "seconds"]
    pd.testing.assert_frame_equal(with_pass.evals[eval_columns], without.evals[eval_columns])
    for (name, a), (_, b) in zip(with_pass.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert with_pass.evals["train_mode_loss"].notna().all()


def test_train_mode_pass_without_dropout_or_batch_norm_is_the_eval_pass():
    run = explain_fit(epochs=2, dropout=0.0)
    assert np.allclose(run.evals["train_mode_loss"], run.evals["train_loss"], rtol=1e-6)
    assert np.array_equal(run.evals["train_mode_acc"], run.evals["train_acc"])


def test_train_mode_pass_with_batch_norm_uses_batch_statistics():
    run = explain_fit(batch_size="full", epochs=3, dropout=0.0, batch_norm=True)
    model = copy.deepcopy(run.model).train()  # oracle: one forward of the whole set in train mode
    X, y = toy().train
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(X), y).item()
    assert run.evals["train_mode_loss"].iloc[-1] == pytest.approx(loss, rel=1e-5)
    assert run.evals["train_mode_loss"].iloc[-1] != pytest.approx(run.evals["train_loss"].iloc[-1], rel=1e-3)


def test_dense_evaluation_gives_at_least_20_points_per_epoch():
    assert dense_eval_every(125) == 5 and dense_eval_every(125, 20) == 6 and dense_eval_every(10) == 1
    for batch_size in (2, 4, 40):
        run = explain_fit(batch_size=batch_size, epochs=2, train_mode=False)
        spe = run.clock.steps_per_epoch
        per_epoch = [((run.evals["step"] > e * spe - spe) & (run.evals["step"] <= e * spe)).sum() for e in (1, 2)]
        assert min(per_epoch) >= min(20, spe)
        assert explain_run(run).evals_per_epoch == min(per_epoch)
    assert explain_config(TrainConfig(batch_size=2, eval_every=1), 160).eval_every == 1  # denser is kept


# -- every number against an independent computation -------------------------------------------


@pytest.mark.parametrize("metric", ["acc", "loss"])
def test_each_number_matches_a_computation_by_hand(run, metric):
    result = explain_tables(run.steps, run.evals, metric)
    steps, evals = run.steps, run.evals
    last = int(steps["step"].max())
    true = curve_at(evals, f"train_{metric}", last)
    mode = curve_at(evals, f"train_mode_{metric}", last)
    by_epoch = steps.groupby("epoch")
    assert [b.epoch for b in result.boundaries[metric]] == [1, 2, 3]
    for b in result.boundaries[metric]:
        old, new = by_epoch.get_group(b.epoch), by_epoch.get_group(b.epoch + 1)
        end = int(old["step"].iloc[-1])
        assert b.step == end
        assert b.running_end == old[f"running_{metric}"].iloc[-1]
        assert b.running_start == new[f"running_{metric}"].iloc[0] == new[f"batch_{metric}"].iloc[0]
        running_end, running_start = old[f"running_{metric}"].iloc[-1], new[f"running_{metric}"].iloc[0]
        assert b.running_jump == pytest.approx(running_start - running_end)
        assert b.true_end == evals.loc[evals["step"] == end, f"train_{metric}"].item()
        true_end = evals.loc[evals["step"] == end, f"train_{metric}"].item()
        nxt = evals[evals["step"] > end].iloc[0]
        by_hand = b.true_end + (nxt[f"train_{metric}"] - b.true_end) / (nxt["step"] - end)
        assert b.true_start == pytest.approx(by_hand) == pytest.approx(true[end + 1])
        assert b.true_change == pytest.approx(by_hand - true_end)
        # typical change: slopes of evaluation intervals inside either epoch, not the one after `end`
        pairs = pd.DataFrame({"a": evals["step"].iloc[:-1].to_numpy(), "b": evals["step"].iloc[1:].to_numpy(),
                              "d": np.diff(evals[f"train_{metric}"].to_numpy())})
        first, stop = int(old["step"].iloc[0]) - 1, int(new["step"].iloc[-1])
        inside = pairs[(pairs.a >= first) & (pairs.b <= stop) & (pairs.a != end)]
        assert b.typical_change == pytest.approx((inside.d / (inside.b - inside.a)).median())
        weights = old["batch_size"].to_numpy()
        taken_at = old["step"].to_numpy() - 1  # batch value of step s: weights after s - 1 updates
        true_mean = np.sum(true[taken_at].to_numpy() * weights) / weights.sum()
        mode_mean = np.sum(mode[taken_at].to_numpy() * weights) / weights.sum()
        mode_end = evals.loc[evals["step"] == end, f"train_mode_{metric}"].item()
        assert b.true_epoch_mean == pytest.approx(true_mean)
        assert b.train_mode_epoch_mean == pytest.approx(mode_mean)
        assert b.lag == pytest.approx(true_end - running_end)
        assert b.running_minus_true_mean == pytest.approx(running_end - true_mean)
        assert b.train_mode_end == mode_end
        assert b.train_mode_part == pytest.approx(true_end - mode_end)
        assert b.averaging_part == pytest.approx(mode_end - mode_mean)
        assert b.remainder_part == pytest.approx(mode_mean - running_end)
        noise = new[f"batch_{metric}"].diff().std(ddof=0) / math.sqrt(2)
        assert b.batch_noise == pytest.approx(noise)


def test_the_running_mean_is_close_to_the_train_mode_epoch_mean(run):
    # The running mean averages samples of the train-mode curve over the epoch: what is left is noise.
    for b in explain_run(run).boundaries["acc"]:
        # A mean of 20 batches of noise, plus one sample's worth of accuracy quantisation.
        steps_per_epoch, n_train = run.clock.steps_per_epoch, run.clock.n_train
        assert abs(b.remainder_part) < 4 * b.batch_noise / math.sqrt(steps_per_epoch) + 1 / n_train


def test_the_jump_vanishes_when_the_running_mean_is_the_true_curve(run):
    steps = run.steps.copy()
    true = curve_at(run.evals, "train_acc", int(steps["step"].max()))
    steps["running_acc"] = true[steps["step"]].to_numpy()
    original = explain_tables(run.steps, run.evals).boundaries["acc"]
    replaced = explain_tables(steps, run.evals).boundaries["acc"]
    spread = np.abs(np.diff(run.evals["train_acc"]) / np.diff(run.evals["step"])).max()
    for after in replaced:
        assert abs(after.running_jump) <= spread + 1e-12  # one step's worth, like any step inside an epoch
    assert any(abs(before.running_jump) > spread for before in original)  # the real log does jump


def test_batch_gradient_descent_has_no_jump_to_explain():
    run = explain_fit(batch_size="full", epochs=4)
    assert (run.steps["running_acc"] == run.steps["batch_acc"]).all()
    result = explain_run(run)
    assert result.batch_gd and result.steps_per_epoch == 1
    assert "batch gradient descent" in result.paragraph and "no epoch-boundary jump" in result.paragraph
    assert all(math.isnan(b.typical_change) for b in result.boundaries["acc"])


# -- the paragraph -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["acc", "loss"])
def test_paragraph_states_this_runs_numbers(run, metric):
    result = explain_run(run, metric)
    first = result.boundaries[metric][0]
    for value in (first.running_end, first.running_start, first.true_end, first.train_mode_epoch_mean):
        assert f"{value:.3f}" in result.paragraph
    assert f"{first.running_jump:+.3f}" in result.paragraph
    assert ("accuracy" if metric == "acc" else "loss") in result.paragraph
    assert f"Over all {len(result.boundaries[metric])} boundaries" in result.paragraph


def test_paragraph_without_train_mode_column_speaks_of_the_true_curve():
    result = explain_run(explain_fit(epochs=3, train_mode=False))
    assert not result.has_train_mode
    assert "train-mode curve" not in result.paragraph and "mean of the true curve" in result.paragraph


def test_runs_the_numbers_cannot_be_taken_from_are_one_line_errors(run):
    sparse = run.evals[run.evals["step"].isin(run.epochs["step"].tolist() + [0])]
    with pytest.raises(DataError, match="dense evaluation"):
        explain_tables(run.steps, sparse)
    with pytest.raises(DataError, match="no evaluation at its start or end"):
        explain_tables(run.steps, run.evals[run.evals["step"] != 20])
    with pytest.raises(ConfigError, match="metric"):
        explain_tables(run.steps, run.evals, "f1")


# -- the store and the command line ----------------------------------------------------------------


ADVICE = {  # what each kind of run is told to add, in the terms of what recorded it
    "keras": ["Keras BatchlabCallback(..., eval_every=1, eval_data={'train': (X, y)})"],
    "track": ["bl.track(..., eval_every=1, eval_data={'train': (X, y)}, loss_fn=...)",
              "Lightning BatchlabCallback(..., eval_every=1"],
    "fit": ["run `batchlab explain`, or `batchlab fit --eval-every 1`"],
    "study-trial": ["a study evaluates its trials sparsely"],
}


@pytest.mark.parametrize("kind", list(ADVICE))
@pytest.mark.parametrize("eval_train", [False, True], ids=["no-train-pass", "sparse"])
def test_a_stored_run_explain_cannot_read_gets_advice_for_what_recorded_it(kind, eval_train, tmp_path, cli):
    store = tmp_path / "runs.db"
    rec = recorder(store, kind=kind)
    fit(net(), toy(), TrainConfig(batch_size=8, epochs=2, lr=0.1, eval_train=eval_train), callbacks=[rec],
        progress=False)  # 20 steps per epoch, evaluated at epoch ends only: explain would want every step
    status, out, err = cli(["explain", "--run", str(rec.run_id), "--store", str(store)])
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ("dense evaluation" if eval_train else "no full-pass acc on the training set") in err
    for advice in ADVICE[kind]:
        assert advice in err
    others = [advice for other, advices in ADVICE.items() if other != kind for advice in advices]
    assert not any(advice in err for advice in others)  # no advice meant for another tool


def test_a_run_that_ended_before_its_first_step_is_one_line(run):
    with pytest.raises(DataError, match="no steps to explain"):
        explain_tables(run.steps.iloc[:0], run.evals)


def test_stored_run_gives_the_same_numbers_as_the_run_in_memory(tmp_path):
    rec = recorder(tmp_path / "runs.db", kind="explain")
    in_memory = explain_fit(epochs=3, callbacks=[rec])
    with RunStore(tmp_path / "runs.db") as store:
        stored = store.load_run(rec.run_id)
    assert stored.kind == "explain"
    for metric in ("acc", "loss"):
        assert explain_run(stored, metric).to_dict() == explain_run(in_memory, metric).to_dict()




def test_command_prints_the_paragraph_writes_the_figure_and_reads_it_back(tmp_path, cli):
    store = tmp_path / "runs.db"
    args = ["explain", "--dataset", "blobs", "--model", "mlp:hidden=16,dropout=0.2", "--epochs", "3",
            "--batch-size", "50", "--lr", "0.1", "--store", str(store)]
    status, out, err = cli(args)
    assert status == 0, err
    assert "At the end of epoch 1 (step 10)" in out and "every 1 steps" in out
    for suffix in ("png", "svg"):
        assert (tmp_path / f"batchlab-explain-1.{suffix}").stat().st_size > 1000
    report = tmp_path / "runs-run-1.html"  # the HTML report, beside the store by default
    assert f"report: {report}" in out and "At the end of epoch 1" in report.read_text()
    status, out, err = cli([*args[:1], "--run", "1", "--store", str(store), "--json", "--out",
                                str(tmp_path / "figs")])
    assert status == 0, err
    stored = json.loads(out)
    assert stored["run_id"] == 1 and stored["figures"] == [str(tmp_path / "figs" / f"batchlab-explain-1.{s}")
                                                          for s in ("png", "svg")]
    with RunStore(store) as runs:
        run = runs.load_run(1)
    assert run.kind == "explain" and run.config["eval_every"] == 1
    expected = explain_run(run).to_dict()
    assert stored["paragraph"] == expected["paragraph"]
    first = expected["boundaries"]["acc"][0]
    assert stored["boundaries"]["acc"][0]["running_jump"] == pytest.approx(first["running_jump"])


def shown_default(value, name: str) -> str:
    """How click's help shows ``value`` as the default of the flag of field ``name``."""
    if isinstance(value, bool):
        return name.replace("_", "-") if value else "no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def test_explain_help_shows_the_defaults_it_trains_with(tmp_path, cli):
    import re

    import click

    from batchlab.cli import cli as batchlab_cli
    from batchlab.cli.explain import explain_command
    from batchlab.data import load_dataset
    from batchlab.schedule import steps_per_epoch

    root = click.Context(batchlab_cli, info_name="batchlab", **batchlab_cli.context_settings)  # as --help shows
    context = click.Context(explain_command, info_name="explain", parent=root)
    helps = {option.name: option.get_help_record(context)[1] for option in explain_command.params
             if isinstance(option, click.Option) and option.name in TrainConfig.model_fields}
    status, out, err = cli(["explain", "--dataset", "blobs", "--model", "mlp:hidden=4", "--quiet",
                            "--store", str(tmp_path / "s.db"), "--out", str(tmp_path)])
    assert status == 0, err
    with RunStore(tmp_path / "s.db") as store:
        trained = store.load_run(1).config  # the TrainConfig the run was trained with, no flag given
    assert trained["eval_train"] and "eval_train" not in helps  # always on: no flag that does nothing
    assert "10" not in helps["epochs"] and trained["epochs"] == 6  # not fit's "10 unless --max-steps"
    spe = steps_per_epoch(load_dataset("blobs").n_train, trained["batch_size"], False)
    assert trained["eval_every"] == max(1, spe // 25)
    assert helps["eval_every"].endswith("[default: (steps per epoch // 25, at least 1)]")
    compared = 0
    for name, text in helps.items():
        default = re.search(r"\[default: (.*)\]$", text)
        if name != "eval_every" and default is not None:
            assert default.group(1) == shown_default(trained[name], name), name
            compared += 1
    assert compared >= len(helps) - 3  # every flag shows its default but eval_every, max_steps (None)


@pytest.mark.parametrize(("args", "expected"), [
    (["--run", "7"], "no run 7"),
    (["--run", "x"], "--run"),
    (["--run", "1", "--epochs", "3"], "takes no training flags"),
    (["--metric", "f1"], "--metric"),
])
def test_bad_input_is_one_line(tmp_path, cli, args, expected):
    store = tmp_path / "runs.db"
    RunStore(store).close()
    status, out, err = cli(["explain", "--store", str(store), *args])
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
