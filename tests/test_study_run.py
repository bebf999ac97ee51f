"""How a study run reports itself: a failed group named as the failure (and exit status 1), stored
trial statuses true to what the study asked, a progress total that never moves backwards, and
`study --help` defaults that are the real ones."""

from __future__ import annotations

import json

import pytest
import torch

from batchlab.config import StudyConfig, make_study_config
from batchlab.store import RunStore
from batchlab.study import run_study
from batchlab.study import run as study_run


def tiny_config(**changes) -> StudyConfig:
    values = dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[8, 64, "full"], lrs=[0.05, 0.2, 1e4],
                  seeds=2, target="val_acc>=0.75", max_steps=150, noise_scale=False)
    values.update(changes)
    return make_study_config(values)


@pytest.fixture
def group_at_64_raises(monkeypatch):
    """Training the groups of B = 64 raises, as a model that runs out of memory there would."""
    real = study_run.train_group

    def train_group(plan, group, dataset, **options):
        if group.batch_size == 64:
            raise RuntimeError("CUDA out of memory at B=64")
        return real(plan, group, dataset, **options)

    monkeypatch.setattr(study_run, "train_group", train_group)


def test_a_failed_group_is_named_by_the_recommendation_not_blamed_on_the_budget(tmp_path, group_at_64_raises):
    torch.set_num_threads(1)
    study = run_study(tiny_config(), store=tmp_path / "s.db", executor="in-process")
    (key,) = study.failed
    assert key.startswith("lrs:B=64:") and study.failed[key] == "RuntimeError: CUDA out of memory at B=64"
    rec = study.recommendation
    assert not rec.supported and rec.batch_size is None
    assert "1 group failed" in rec.text and "the lr search at B = 64" in rec.text and "out of memory" in rec.text
    assert "budget" not in rec.text and "max_steps" not in rec.text and "rerun" in rec.text
    assert list(study.summary["batch_size"]) == [8, "full"]  # the others trained and are reported
    with RunStore(tmp_path / "s.db") as store:
        group = store.get_group(study.group_id)
        assert group["status"] == "failed" and group["summary"]["failed_groups"] == study.failed


def test_a_diverged_lr_is_not_a_failure(tmp_path):
    torch.set_num_threads(1)
    study = run_study(tiny_config(batch_sizes=[8]), executor="in-process")
    assert study.failed == {} and (study.trials["status"] == "diverged").any()
    assert "failed" not in study.recommendation.text


def _cli(argv, capsys):
    from batchlab.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_study_with_a_failed_group_exits_1_and_names_it(tmp_path, capsys, monkeypatch, group_at_64_raises):
    import batchlab.report

    monkeypatch.setattr(batchlab.report, "write_study_outputs", lambda study, folder: [])  # figures: tested elsewhere
    argv = ["study", "--dataset", "blobs", "--model", "mlp:hidden=16", "--batch-sizes", "8,64,full", "--lrs", "0.05,0.2",
            "--seeds", "1", "--max-steps", "100", "--target", "val_acc>=0.7", "--no-noise-scale",
            "--executor", "in-process", "--store", str(tmp_path / "s.db"), "--quiet"]
    code, out, err = _cli(argv, capsys)
    assert code == 1, err
    assert "recommendation: The study is incomplete: 1 group failed" in out
    assert "failed: lrs:B=64:" in err and "RuntimeError: CUDA out of memory at B=64" in err and "Traceback" not in err
    code, out, err = _cli([*argv, "--json"], capsys)  # rerun: retries the failed group only, which fails again
    assert code == 1 and "failed: lrs:B=64:" in err
    result = json.loads(out)  # the answer is still printed, whole
    assert result["groups_run"] == 0 and result["groups_resumed"] == 2
    assert [k.split(":")[1] for k in result["failed_groups"]] == ["B=64"]
    assert "1 group failed" in result["recommendation"]["text"]


# --- the statuses stored for `runs list` ---------------------------------------------------------


def test_stored_trial_statuses_say_how_each_trial_ended(tmp_path):
    """Reached its target or ran its budget: finished; cut short by pruning: stopped; NaN: diverged."""
    torch.set_num_threads(1)
    study = run_study(tiny_config(lrs=[0.002, 0.05, 0.2, 1e4]), store=tmp_path / "s.db", executor="in-process")
    expected = {"reached": "finished", "not_reached": "finished", "pruned": "stopped", "diverged": "diverged"}
    with RunStore(tmp_path / "s.db") as store:
        runs = store.group_run_summaries(study.group_id, "study-trial")
        listed = store.list_runs(group=study.group_id)
    seen = {run["summary"]["status"] for run in runs}
    assert {"reached", "diverged"} <= seen and len(seen) >= 3, seen  # more than one way to end is checked
    for run in runs:
        trial = run["summary"]
        assert run["status"] == expected[trial["status"]], (trial["status"], run["status"], run["message"])
        if trial["status"] == "reached":
            assert run["message"].startswith("target val_acc>=0.75 reached at step ")
            assert run["message"].endswith(f" {trial['steps_to_target']:g}")
        if trial["status"] == "not_reached":
            assert "not reached" in run["message"]
        if trial["status"] == "pruned":
            assert run["message"].startswith("pruned at step")
    assert sorted(listed["status"]) == sorted(run["status"] for run in runs)  # what `runs list` shows


# --- progress ----------------------------------------------------------------------------------


def test_progress_never_moves_backwards_when_groups_are_added(tmp_path):
    """Noise groups (and lr extensions) are planned only once a batch size's search ends: the total
    is an upper bound from the start, and done/total only grows, reaching 1 at the end."""
    torch.set_num_threads(1)
    updates = []
    config = tiny_config(batch_sizes=[64, "full"], seeds=1, lrs="auto", reference_lr=0.2, lr_grid_size=2,
                         lr_extensions=1, noise_scale=True)
    study = run_study(config, store=tmp_path / "s.db", executor="in-process", on_progress=updates.append)
    assert updates[0].group is None and updates[0].groups_done == 0
    fractions = [u.groups_done / u.groups_known for u in updates]
    totals = [u.groups_known for u in updates]
    assert fractions == sorted(fractions) and totals == sorted(totals, reverse=True), list(zip(fractions, totals))
    ran = len(set(study.trials["group"]))
    assert updates[-1].groups_done == updates[-1].groups_known == ran == study.groups_run
    assert totals[0] == 2 * (1 + 1 + 1)  # per batch size: its grid, one extension, its noise group
    assert any(k == "noise" for k in study.trials["kind"])


# --- help ------------------------------------------------------------------------------------


def test_study_help_shows_the_true_defaults():
    from click.testing import CliRunner

    from batchlab.cli import cli
    from batchlab.cli.study import STUDY_FLAGS, study_command

    default = StudyConfig()
    text = " ".join(CliRunner().invoke(cli, ["study", "--help"], terminal_width=200).output.split())
    assert "[default: 16,32,64,128,256,512,1024]" in text
    assert default.batch_sizes == (16, 32, 64, 128, 256, 512, 1024)
    for option in study_command.params:  # a help text never names a default of its own
        assert "(default" not in (option.help or ""), option.help
    by_flag = {o.opts[0]: o for o in study_command.params}
    for field, (flag, _) in STUDY_FLAGS.items():
        value = getattr(default, field)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        assert str(by_flag[flag].default) == str(shown), flag
