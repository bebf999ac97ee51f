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
