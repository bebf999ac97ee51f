"""One set of defaults and one help style: the command line reads its defaults from the config
models, shared flags have one name and one default, and user strings are printed as text."""

from __future__ import annotations

import click
import pytest

from batchlab.cli import cli
from batchlab.cli.app import shown
from batchlab.cli.train import given, spec_from_options
from batchlab.config import RunSpec, StudyConfig, TrainConfig

TINY = ["--dataset", "blobs", "--model", "mlp:hidden=4", "--epochs", "1", "--quiet"]


def _leaves(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _leaves(command, (*path, name))
        else:
            yield (*path, name), command


def _context(name: str, args: list[str]) -> click.Context:
    """The parsed flags of ``batchlab NAME ARGS``, as the command would see them (not run)."""
    root = click.Context(cli, info_name="batchlab", **cli.context_settings)
    return cli.commands[name].make_context(name, list(args), parent=root)


def test_fit_without_flags_plans_what_the_api_plans():
    from batchlab.data import load_dataset
    from batchlab.loop import plan_run

    spec = spec_from_options(given(_context("fit", [])))
    assert spec == RunSpec() and spec.train == TrainConfig()
    blobs = load_dataset("blobs")
    assert plan_run(blobs, spec.train) == plan_run(blobs, TrainConfig())


def test_study_without_flags_plans_the_trials_of_the_default_study_config():
    from batchlab.cli.study import study_config_from_options
    from batchlab.study import initial_groups, load_dataset_for, plan_study

    from_cli = study_config_from_options(given(_context("study", [])))
    api = StudyConfig()
    assert from_cli.train.momentum == api.train.momentum == 0.9  # the default study's own train table
    dataset = load_dataset_for(api)
    plans = plan_study(from_cli, dataset), plan_study(api, dataset)
    assert plans[0].study_id == plans[1].study_id
    groups = [initial_groups(plan) for plan in plans]
    assert groups[0] == groups[1] and len(groups[0]) > 3
    trials = [[plan.train_config(g.batch_size, lr, seed) for g in gs for lr in g.lrs for seed in g.seeds]
              for plan, gs in zip(plans, groups)]  # fmt: skip
    assert trials[0] == trials[1]


def test_a_training_flag_changes_only_its_own_field_of_the_study_train_table():
    from batchlab.cli.study import study_config_from_options

    config = study_config_from_options(given(_context("study", ["--nesterov"])))
    assert config.train.nesterov and config.train.momentum == StudyConfig().train.momentum


def test_training_flags_show_the_models_defaults():
    fit_defaults, study_defaults = TrainConfig(), StudyConfig().train
    for name, expected in (("fit", fit_defaults), ("study", study_defaults)):
        for option in cli.commands[name].params:
            study_field = name == "study" and option.name in StudyConfig.model_fields  # --epochs, --max-steps
            if option.name in TrainConfig.model_fields and option.name != "epochs" and not study_field:
                value = getattr(expected, option.name)
                assert option.default == (value if option.metavar is None else str(value)), (name, option.name)


def test_shared_flags_have_one_name_and_one_default():
    seen: dict[str, tuple] = {}
    for path, command in _leaves(cli):
        for option in command.params:
            if isinstance(option, click.Option):
                assert "--train-batch-size" not in option.opts
                if option.name in ("threads", "store", "as_json", "quiet", "allow_import"):
                    key = (tuple(option.opts), option.default)
                    assert seen.setdefault(option.name, key) == key, (path, option.name)
    assert set(seen) == {"threads", "store", "as_json", "quiet", "allow_import"}


def test_help_everywhere_without_empty_defaults(cli_runner):
    for path, _ in [((), cli), *_leaves(cli)]:
        for flag in ("-h", "--help"):
            status, out, err = cli_runner([*path, flag])
            assert status == 0 and out.startswith("Usage: batchlab") and not err, (path, err)
            assert "[default: None]" not in out and "default: )" not in out
    status, out, _ = cli_runner(["--version"])
    assert status == 0 and out.startswith("batchlab ")
    assert cli_runner(["-V"])[1] == out


@pytest.fixture
def cli_runner(cli):
    return cli


def test_shown_makes_control_characters_visible():
    assert shown("a\x1b[2Jb\n\x07\x9b") == "a\\x1b[2Jb\\x0a\\x07\\x9b"
    assert shown("[/] [bold]x[/bold] ü ‖") == "[/] [bold]x[/bold] ü ‖"  # markup is not ours to strip: consoles ignore it


def test_names_are_printed_as_text(tmp_path, cli):
    store = str(tmp_path / "s.db")
    evil = ["[/]", "\x1b[2J\x1b]0;owned\x07[red]x"]
    for name in evil:
        status, _, err = cli(["fit", *TINY, "--name", name, "--store", store])
        assert status == 0, err
    for args in (["runs", "list"], ["runs", "show", "1"], ["runs", "show", "2"]):
        status, out, err = cli([*args, "--store", store])
        assert status == 0 and "Traceback" not in err, err
        assert "\x1b" not in out and "\x07" not in out
    status, out, _ = cli(["runs", "show", "1", "--store", store])
    assert "'[/]'" in out
    status, out, _ = cli(["runs", "show", "2", "--store", store])
    assert "\\x1b[2J\\x1b]0;owned\\x07[red]x" in out


def test_say_keeps_its_own_line_breaks_and_escapes_the_rest(capsys):
    from batchlab.cli.app import say

    say("first line\nsecond \x1b[2J line")
    assert capsys.readouterr().out == "first line\nsecond \\x1b[2J line\n"
