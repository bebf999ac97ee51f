"""`batchlab advise` and `advise_batch_size`: the ramp follows the measurements, the prediction is the
stated model's arithmetic, the command's JSON is what the store holds, and bad input is one line."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from batchlab.critical_batch import advise_batch_size
from batchlab.errors import DataError
from batchlab.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "blobs", "--model", "mlp:hidden=16", "--batch-size", "8", "--epochs", "2", "--factors", "1,2,4",
        "--branch-seeds", "2", "--branch-samples", "64", "--optimizer", "sgd", "--lr", "0.05", "--quiet"]


def _evals(local_cbs, upper, steps=(0, 250, 500, 750, 1000), batch=16) -> pd.DataFrame:
    return pd.DataFrame({"step": list(steps), "samples_seen": [s * batch for s in steps],
                         "local_cbs": local_cbs, "local_cbs_upper": upper, "b_simple_at_branch": [100.0] * len(steps)})


def test_the_ramp_never_exceeds_a_later_measurement_and_the_prediction_is_the_models_arithmetic():
    evals = _evals([32.0, 16, 64, 128, 128], [64, 32, 128, 256, math.inf])
    advice = advise_batch_size(evals, 16, 1e-3, "adam")
    assert [(r["from_samples"], r["to_samples"], r["batch_size"]) for r in advice.ramp] == [
        (0, 8000, 16), (8000, 12000, 64), (12000, None, 128)]
    assert [r["lr"] for r in advice.ramp] == pytest.approx([1e-3, 2e-3, 1e-3 * math.sqrt(8)])
    # Each range of 250 steps at B = 16 with B_crit its start's local CBS: 250·(1 + Bc/B')/(1 + Bc/16) steps at B'.
    ranges = [(32, 16), (16, 16), (64, 64), (128, 128)]  # (B_crit, B')
    steps = [250 * (1 + c / b) / (1 + c / 16) for c, b in ranges]
    assert advice.run_steps == 1000 and advice.run_samples == 16000
    assert advice.predicted_steps == pytest.approx(sum(steps))
    assert advice.predicted_samples == pytest.approx(sum(s * b for s, (_, b) in zip(steps, ranges)))
    assert "estimate" in advice.text and "≥ 128 (none worse)" in advice.text


def test_a_constant_batch_and_sgds_linear_rule():
    advice = advise_batch_size(_evals([64.0, 64, 64], [128.0] * 3, steps=(0, 10, 20)), 16, 0.1, "sgd")
    assert advice.ramp == [{"from_samples": 0, "to_samples": None, "batch_size": 64, "lr": pytest.approx(0.4)}]
    assert advice.text.startswith("Use batch 64 with lr 0.4")
    keep = advise_batch_size(_evals([16.0, 16], [32.0, 32], steps=(0, 10)), 16, 0.1, "sgd")
    assert keep.ramp[0]["batch_size"] == 16 and keep.text.startswith("Keep batch 16")
    assert keep.predicted_steps == keep.run_steps == 10
    # A short last batch (500 = 62·8 + 4 samples in 63 steps): keeping the batch keeps the samples.
    short = pd.DataFrame({"step": [0, 63], "samples_seen": [0, 500], "local_cbs": [8.0, 8], "local_cbs_upper": [16.0, 16],
                          "b_simple_at_branch": [50.0, 50]})
    same = advise_batch_size(short, 8, 1e-3, "adam")
    assert same.predicted_steps == same.run_steps == 63 and same.predicted_samples == same.run_samples == 500


def test_no_measurement_is_refused():
    with pytest.raises(DataError, match="no local critical batch size"):
        advise_batch_size(_evals([math.nan] * 2, [math.nan] * 2, steps=(0, 10)), 16, 0.1, "sgd")


def test_advise_end_to_end_json_matches_the_store_and_the_figure_is_written(cli, tmp_path):
    store, out = tmp_path / "runs.db", tmp_path / "figures"
    status, stdout, err = cli(["advise", *TINY, "--store", str(store), "--out", str(out), "--json"])
    assert status == 0, err
    result = json.loads(stdout)
    assert {"run_id", "figure", "batch_size", "lr", "lr_rule", "ramp", "measurements", "prediction", "text"} <= set(result)
    assert result["batch_size"] == 8 and result["lr"] == 0.05 and result["lr_rule"] == "linear"  # SGD
    with RunStore(store, create=False) as runs:
        run = runs.load_run(result["run_id"])
    assert run.status == "finished" and run.kind == "advise"
    stored = run.evals.dropna(subset=["local_cbs"])
    assert list(stored.step) == [0, run.evals.step.iloc[1], run.evals.step.iloc[2]]  # the start and each epoch end
    measured = pd.DataFrame(result["measurements"])
    assert list(measured.step) == list(stored.step)
    assert list(measured.local_cbs) == list(stored.local_cbs)
    # The store's JSON convention: +inf (no tested batch was worse) is the string "Infinity".
    assert [float(v) for v in measured.local_cbs_upper] == list(stored.local_cbs_upper)
    assert list(measured.b_simple) == pytest.approx(list(stored.b_simple_at_branch), rel=1e-12)
    assert "noise_scale" in run.steps  # the probe ran beside the branches
    later_minimum = [min(measured.local_cbs[i:]) for i in range(len(measured))]
    assert result["ramp"][0]["batch_size"] == later_minimum[0]
    for r in result["ramp"]:
        assert r["lr"] == pytest.approx(result["lr"] * r["batch_size"] / 8)
    prediction = result["prediction"]
    assert prediction["estimate"] is True and "S_min" in prediction["model"]
    assert prediction["extra_samples"] == pytest.approx(prediction["samples"] - prediction["run_samples"])
    figure = out / f"batchlab-advise-{result['run_id']}.png"
    assert result["figure"] == str(figure) and figure.stat().st_size > 10_000

    # `batchlab report` of the stored run says the same: the advice's paragraph, its table and figure.
    status, _, err = cli(["report", str(result["run_id"]), "--store", str(store), "--out", str(tmp_path / "r.html")])
    assert status == 0, err
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Which batch size" in html and "local critical batch size over training" in html
    assert html.count("data:image/png;base64") >= 2
    from batchlab.report import escape

    assert escape(result["text"]) in html


@pytest.mark.parametrize("flags, says", [
    (["--factors", "1,2,128"], "exceeds the 500 training samples"),
    (["--factors", "2,4"], "must include 1"),
    (["--factors", "1,two"], "--factors"),
    (["--branch-samples", "20"], "samples must be a positive multiple"),
    (["--branch-seeds", "1"], "--branch-seeds"),
    (["--every", "0"], "--every"),
])
def test_bad_input_is_one_line_and_stores_nothing(cli, tmp_path, flags, says):
    store = tmp_path / "runs.db"
    status, stdout, err = cli(["advise", *TINY, *flags, "--store", str(store), "--out", str(tmp_path / "f")])
    assert status == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not store.exists() and not (tmp_path / "f").exists()


def test_the_figure_reads_well_with_user_text_shown_as_written():
    from test_figures_readable import problems

    from batchlab.plots.advise import advise_figure

    advice = advise_batch_size(_evals([32.0, 16, 64, 128, 128], [64, 32, 128, 256, math.inf]), 16, 1e-3, "adam")
    fig = advise_figure(advice, title="run 7: data/a$x^2$b_very_long_name_of_a_csv_file.csv, mlp:hidden=128x128, "
                                      "batch 16, with a title long enough to need wrapping")
    assert problems(fig) == []
    title = fig.axes[0].title
    assert not title.get_parse_math() and "$x^2$" in title.get_text()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["16", "32", "64", "128", "256"]


def test_the_documented_commands_parse():
    """Each `batchlab advise` line of docs/advise.md is a command advise accepts (parsed, not run)."""
    import shlex
    from pathlib import Path

    from batchlab.cli import cli as group

    doc = (Path(__file__).resolve().parents[1] / "docs" / "advise.md").read_text(encoding="utf-8")
    block = doc.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("batchlab advise")]
    assert len(lines) == 4
    for line in lines:
        args = shlex.split(line)[2:]
        group.commands["advise"].make_context("advise", args)
