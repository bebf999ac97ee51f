"""Configs: one-line errors from the constructors, finite numbers, the limits they accept are
trainable, UTF-8 files, and model imports only on request."""

from __future__ import annotations

import codecs

import pytest

import batchlab as bl
from batchlab.config import TrainConfig, load_run_spec, load_study_config, read_toml
from batchlab.errors import ConfigError


def test_constructor_raises_one_config_error_line_naming_the_field():
    with pytest.raises(ConfigError) as info:
        bl.TrainConfig(batch_size=32.5)
    assert str(info.value) == "invalid training config: batch_size: must be a whole number >= 1 or 'full', got 32.5"
    assert isinstance(info.value, ValueError)  # what pydantic's ValidationError was, so old handlers still work
    assert info.value.__suppress_context__  # no pydantic traceback chained below it


def test_several_bad_fields_are_all_named_on_one_line():
    with pytest.raises(ConfigError) as info:
        bl.StudyConfig(batch_sizes=[0], seeds=[1, 1], train={"gamma": float("inf")})
    message = str(info.value)
    assert "\n" not in message
    for field in ("batch_sizes:", "seeds:", "train.gamma:"):
        assert field in message, message


def test_union_fields_give_one_message_per_field():
    """pydantic reports each member of a union (int | 'full') separately; the line names the field once."""
    with pytest.raises(ConfigError) as info:
        bl.TrainConfig(eval_every=[3])
    assert str(info.value).count("eval_every") == 1, str(info.value)


def test_valid_values_are_unchanged():
    assert bl.TrainConfig(batch_size=32.0).batch_size == 32
    assert bl.TrainConfig(batch_size="64", eval_every="10").eval_every == 10
    assert bl.TrainConfig(batch_size="full").batch_size == "full"
    assert bl.StudyConfig(batch_sizes=[1, "4", "full"], lrs=0.1).lrs == (0.1,)
    assert bl.RunSpec(train={"lr": 0.5}).train.lr == 0.5


# The largest (or most extreme) value each number may take: the config accepts it, and training
# with it must not crash on an overflow either (it may diverge, which is a result, not a crash).
LIMITS = [
    {"seed": 2**63 - 1}, {"warmup_epochs": 1e9}, {"warmup_steps": 2**63 - 1}, {"epochs": 2**63 - 1},
    {"schedule": "sgdr", "sgdr_mult": 1000, "sgdr_epochs": 2**63 - 1}, {"schedule": "step", "gamma": 1.0, "step_epochs": 1},
    {"schedule": "step", "gamma": 1e-300, "step_epochs": 1}, {"eval_every": 2**63 - 1, "eval_batch_size": 2**63 - 1},
    {"probe_every": 2**63 - 1}, {"lr": 1e12, "weight_decay": 1e12, "momentum": 0.999999},
    {"schedule": "cosine", "lr": 1e-300, "min_lr": 1e12}, {"lr": 1e12, "lr_scaling": "linear", "reference_batch_size": 1},
    {"optimizer": "adam", "lr": 1e12, "betas": (0.999999, 0.999999)}, {"reference_batch_size": 2**63 - 1, "lr_scaling": "sqrt"},
]


@pytest.mark.parametrize("values", LIMITS, ids=lambda v: ",".join(v))
def test_accepted_limits_train_without_overflow(values):
    ds = bl.load_dataset("blobs")
    config = bl.TrainConfig(max_steps=3, batch_size=256, **values)
    run = bl.fit(bl.build_model("logreg", ds, seed=0), ds, config, probes=["grad_norm"], progress=False)
    assert run.status in ("finished", "diverged")
    assert len(run.steps) == 3


# --- files -------------------------------------------------------------------------------------------

TOML = '# Größe of the batch\nmodel = "mlp"\n[train]\nbatch_size = 8\n'


@pytest.mark.parametrize("encoding, words", [
    ("latin-1", "not UTF-8 text (byte 0xf6 on line 1)"),
    ("utf-16", "it is UTF-16 text, not UTF-8"),
    ("utf-32", "it is UTF-32 text, not UTF-8"),
])
def test_files_in_other_encodings_are_one_line(tmp_path, encoding, words):
    path = tmp_path / "run.toml"
    path.write_bytes(TOML.encode(encoding))
    with pytest.raises(ConfigError) as info:
        load_run_spec(path)
    assert str(info.value) == f"cannot read config file {path}: {words}; save it as UTF-8"


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(codecs.BOM_UTF8 + TOML.encode())
    assert read_toml(path)["train"] == {"batch_size": 8}
    assert load_run_spec(path).train.batch_size == 8


def test_csv_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(codecs.BOM_UTF8 + "größe,label\n1,0\n2,1\n3,0\n4,1\n".encode())
    ds = bl.load_dataset(path, target="label")
    assert ds.n_train == 4 and ds.input_shape == (1,)


# --- imports on request -------------------------------------------------------------------------------


def test_model_in_toml_is_imported_only_on_request(tmp_path, monkeypatch):
    (tmp_path / "trap.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_file, study_file = tmp_path / "run.toml", tmp_path / "study.toml"
    run_file.write_text('model = "trap.sub:net"\n')
    study_file.write_text('model = "trap.sub:net"\n')
    for load, path in ((load_run_spec, run_file), (load_study_config, study_file)):
        with pytest.raises(ConfigError, match="allow_import=True"):
            load(path)
        assert load(path, allow_import=True).model == "trap.sub:net"  # reading it still imports nothing
    assert not (tmp_path / "ran").exists()


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig().replace(lr=float("nan"))


# --- one loader for the command line and the Python API ------------------------------------------------

RUN_FILE = '''name = "from-file"
model = "mlp:hidden=8"
probes = ["dist_from_init"]
[dataset]
name = "blobs"
val_fraction = 0.2
[train]
batch_size = 8
lr = 0.05
momentum = 0.9
epochs = 3
'''


def _flags(command: str, args: list[str]) -> dict:
    """The flags ``batchlab COMMAND ARGS`` was given, as the command sees them (parsed, not run)."""
    import click

    from batchlab.cli import cli
    from batchlab.cli.train import given

    # Under the root's context, as when run: click keeps the first help option names it meets (-h).
    root = click.Context(cli, info_name="batchlab", **cli.context_settings)
    return given(cli.commands[command].make_context(command, list(args), parent=root))


def test_the_cli_reads_a_run_file_through_load_run_spec(tmp_path):
    import tomllib

    from batchlab.cli.train import spec_from_options
    from batchlab.config import RunSpec

    path = tmp_path / "run.toml"
    path.write_text(RUN_FILE)
    written = RunSpec(**tomllib.loads(RUN_FILE))  # the file alone, built without any loader
    assert spec_from_options(_flags("fit", ["--config", str(path)])) == load_run_spec(path) == written

    flags = ["--config", str(path), "--lr", "0.2", "--dataset", "moons", "--probes", "grad_norm,noise_scale"]
    from_cli = spec_from_options(_flags("fit", flags))
    from_api = load_run_spec(path, overrides={"train": {"lr": 0.2}, "dataset": {"name": "moons"},
                                              "probes": ["grad_norm", "noise_scale"]})
    assert from_cli.model_dump() == from_api.model_dump()
    # The flag wins; the rest of the file's tables stays, field by field.
    assert from_api.train == written.train.replace(lr=0.2)
    assert from_api.dataset == written.dataset.model_copy(update={"name": "moons"})
    assert (from_api.name, from_api.model, from_api.probes) == ("from-file", "mlp:hidden=8", ("grad_norm", "noise_scale"))


def test_a_commands_defaults_apply_only_without_a_file(tmp_path):
    from batchlab.cli.train import run_values, spec_from_options

    path = tmp_path / "run.toml"
    path.write_text(RUN_FILE)
    defaults = {"dataset": "moons", "batch_size": 64, "lr": 0.3}
    alone = load_run_spec(overrides=run_values({"lr": 0.1}), defaults=run_values(defaults))
    assert (alone.dataset.name, alone.train.batch_size, alone.train.lr) == ("moons", 64, 0.1)
    assert spec_from_options(_flags("fit", ["--lr", "0.1"]), defaults=defaults) == alone
    with_file = spec_from_options(_flags("fit", ["--config", str(path)]), defaults=defaults)
    assert with_file == load_run_spec(path, defaults=run_values(defaults)) == load_run_spec(path)


@pytest.mark.parametrize("text", ['train = 3\n', 'dataset = "blobs"\n'])
def test_a_run_file_whose_tables_are_values_is_one_line_in_both(tmp_path, cli, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_spec(path, overrides={"train": {"lr": 0.1}})
    assert str(info.value) == "in the config file, [train] and [dataset] must be tables"
    status, _out, err = cli(["fit", "--config", str(path), "--lr", "0.1", "--store", str(tmp_path / "s.db")])
    assert (status, err) == (2, f"error: {info.value}\n")


STUDY_FILE = '''seeds = 2
batch_sizes = [4, "full"]
target = "val_acc>=0.7"
[dataset]
name = "moons"
[train]
optimizer = "sgd"
weight_decay = 0.001
'''


def test_the_cli_reads_a_study_file_through_load_study_config(tmp_path):
    from batchlab.cli.study import study_config_from_options
    from batchlab.config import StudyConfig
    from batchlab.study import preset_values

    path = tmp_path / "study.toml"
    path.write_text(STUDY_FILE)
    default_momentum = StudyConfig().train.momentum
    alone = load_study_config(path)
    # The default study's train table stays under a file's [train]: its momentum, not TrainConfig's 0.
    assert alone.train.momentum == default_momentum == 0.9
    assert (alone.train.optimizer, alone.train.weight_decay, alone.seeds, alone.dataset.name) == ("sgd", 0.001, 2, "moons")
    assert study_config_from_options(_flags("study", ["--config", str(path)])) == alone

    flags = ["--preset", "mnist1d", "--config", str(path), "--seeds", "0,5", "--nesterov", "--dataset", "blobs"]
    from_cli = study_config_from_options(_flags("study", flags))
    from_api = load_study_config(path, preset=preset_values("mnist1d"),
                                 overrides={"seeds": [0, 5], "dataset": "blobs", "train": {"nesterov": True}})
    assert from_cli.model_dump() == from_api.model_dump()
    preset = preset_values("mnist1d")
    assert from_api.seeds == (0, 5) and from_api.dataset.name == "blobs"  # the flags win
    assert from_api.target == "val_acc>=0.7" and from_api.batch_sizes == (4, "full")  # the file over the preset
    assert from_api.max_steps == preset["max_steps"] and from_api.lr_rule == preset["lr_rule"]  # the preset's own
    assert from_api.train == alone.train.replace(nesterov=True)


def test_a_study_file_whose_train_is_a_value_is_one_line_in_both(tmp_path, cli):
    path = tmp_path / "study.toml"
    path.write_text('train = "sgd"\n')
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert str(info.value) == "in the config file, [train] must be a table"
    status, _out, err = cli(["study", "--config", str(path), "--store", str(tmp_path / "s.db")])
    assert (status, err) == (2, f"error: {info.value}\n")
