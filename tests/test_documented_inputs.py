"""What a user writes, as docs/inputs.md documents it: the example run and study files load through
the command line's own loaders with every key taken and train; own data as .npz and .csv; the zoo
table; the model factory example."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import batchlab as bl
from batchlab.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "inputs.md").read_text(encoding="utf-8")
FIT_TOML = ROOT / "docs" / "examples" / "fit.toml"
STUDY_TOML = ROOT / "docs" / "examples" / "study.toml"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def stored_run(store: Path):
    with RunStore(store, create=False) as runs:
        return runs.load_run(int(runs.list_runs()["id"].iloc[-1]))


# -- the example files ------------------------------------------------------------------------------


def test_the_page_shows_the_example_files_as_they_are_and_is_linked_from_the_readme():
    assert fenced("toml") == [FIT_TOML.read_text(), STUDY_TOML.read_text()]
    assert "(docs/inputs.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_key_of_the_run_file_reaches_the_run_spec_the_cli_builds():
    from batchlab.cli.train import spec_from_options

    written = tomllib.loads(FIT_TOML.read_text())
    spec = spec_from_options({"config_file": FIT_TOML})  # what `batchlab fit --config` builds
    assert (spec.name, spec.model, list(spec.probes)) == (written["name"], written["model"], written["probes"])
    for key, value in written["dataset"].items():
        assert getattr(spec.dataset, key) == value, key
    for key, value in written["train"].items():
        assert getattr(spec.train, key) == value, key


def test_the_run_file_trains_with_a_flag_overriding_it(tmp_path, cli):
    store = tmp_path / "s.db"
    status, out, err = cli(["fit", "--config", str(FIT_TOML), "--max-steps", "8", "--store", str(store), "--quiet"])
    assert status == 0, err
    run = stored_run(store)
    written = tomllib.loads(FIT_TOML.read_text())
    assert run.name == written["name"] and run.status == "finished" and len(run.steps) == 8
    assert {k: run.config[k] for k in written["train"]} == written["train"]
    assert {"grad_norm", "dist_from_init"} <= set(run.steps.columns)
    n_train = bl.load_dataset("mnist1d", val_fraction=0.2).n_train
    assert run.spec["clock"]["n_train"] == n_train == 3200  # 20% of mnist1d's 4000 held out


def test_every_key_of_the_study_file_reaches_the_study_config_the_cli_builds():
    from batchlab.cli.study import study_config_from_options

    written = tomllib.loads(STUDY_TOML.read_text())
    config = study_config_from_options({"config_file": STUDY_TOML})  # what `batchlab study --config` builds
    for key, value in written.items():
        if key == "dataset":
            assert config.dataset.name == value["name"]
        elif key == "train":
            assert {k: getattr(config.train, k) for k in value} == value
        else:
            got = getattr(config, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_the_study_file_runs_briefly(tmp_path, cli):
    store = tmp_path / "s.db"
    status, out, err = cli(["study", "--config", str(STUDY_TOML), "--batch-sizes", "16,full", "--lrs", "0.1",
                            "--seeds", "1", "--max-steps", "20", "--no-noise-scale", "--executor", "in-process",
                            "--store", str(store), "--json"])
    assert status == 0, err
    result = json.loads(out)
    assert result["trials"] == 2 and result["target"] == "val_acc>=0.8"  # the file's target, flags' grid
    with RunStore(store, create=False) as runs:
        listed = runs.list_runs()
    assert len(listed) == 2 and set(listed["model"]) == {"mlp:hidden=50"} and set(listed["dataset"]) == {"blobs"}


# -- own data -------------------------------------------------------------------------------------


def test_npz_with_the_documented_keys_trains_and_holds_its_splits(tmp_path, cli):
    g = np.random.default_rng(0)
    X, X_val = g.normal(size=(60, 3)).astype(np.float32), g.normal(size=(20, 3)).astype(np.float32)
    y, y_val = (X[:, 0] > 0).astype(np.int64), (X_val[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mydata.npz", X=X, y=y, X_val=X_val, y_val=y_val)  # as the page writes it
    ds = bl.load_dataset(str(tmp_path / "mydata.npz"))
    assert (ds.n_train, ds.n_classes, ds.input_shape, ds.val[0].shape[0]) == (60, 2, (3,), 20)
    assert torch.equal(ds.train[0], torch.from_numpy(X)) and torch.equal(ds.val[1], torch.from_numpy(y_val))
    status, _, err = cli(["fit", "--dataset", str(tmp_path / "mydata.npz"), "--model", "mlp:hidden=8", "--epochs",
                          "1", "--store", str(tmp_path / "s.db"), "--quiet"])
    assert status == 0, err
    assert "val_acc" in stored_run(tmp_path / "s.db").evals


def test_npz_with_float_targets_is_regression(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.savez(tmp_path / "r.npz", X=X, y=X.sum(1))
    ds = bl.load_dataset(str(tmp_path / "r.npz"))
    assert ds.n_classes is None and ds.train[1].shape == (6, 1)


def test_csv_with_target_maps_text_labels_in_sorted_order(tmp_path, cli):
    csv = tmp_path / "mydata.csv"
    lines = ["x1,x2,x3,label"] + [f"{i / 10},{(i % 3) / 2},{-i / 7},{'dog' if i % 2 else 'cat'}" for i in range(40)]
    csv.write_text("\n".join(lines) + "\n")
    ds = bl.load_dataset(str(csv), target="label")
    assert ds.n_classes == 2 and ds.input_shape == (3,)
    assert ds.train[1].tolist() == [i % 2 for i in range(40)]  # cat = 0, dog = 1
    status, out, err = cli(["fit", "--dataset", str(csv), "--model", "mlp:hidden=8", "--epochs", "1",
                            "--store", str(tmp_path / "s.db"), "--quiet"])
    assert status == 2 and err.count("\n") == 1 and "target" in err  # the label column must be named
    status, out, err = cli(["fit", "--dataset", str(csv), "--target", "label", "--val-fraction", "0.2",
                            "--standardize", "--model", "mlp:hidden=8", "--epochs", "1",
                            "--store", str(tmp_path / "s.db"), "--quiet"])
    assert status == 0, err
    assert stored_run(tmp_path / "s.db").spec["clock"]["n_train"] == 32


# -- models -----------------------------------------------------------------------------------------


def zoo_rows() -> dict[str, str]:
    """model name -> the options cell of the page's zoo table."""
    section = DOC.split("### The zoo", 1)[1].split("###", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| .*? \|$", section, flags=re.M)
    return dict(rows)


def test_the_zoo_table_lists_every_model_with_its_option_defaults():
    rows = zoo_rows()
    models = {m["name"]: m["options"] for m in bl.list_models()}
    assert sorted(rows) == sorted(models)
    for name, options in models.items():
        for key, default in options.items():
            shown = "x".join(map(str, default)) if isinstance(default, list) else str(default).lower()
            assert f"`{key}={shown}`" in rows[name], (name, key)
        if not options:
            assert rows[name] == "none"


def test_the_documented_factory_trains_from_the_command_line(tmp_path, cli, monkeypatch):
    [factory] = [block for block in fenced("python") if "def make(dataset" in block]
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "nets.py").write_text(factory)
    monkeypatch.syspath_prepend(str(tmp_path))  # the page's PYTHONPATH=.
    ds = bl.load_dataset("blobs")
    try:
        model = bl.build_model("mypkg.nets:make", ds, allow_import=True, width=128)
        assert model(ds.train[0][:5]).shape == (5, 3)
        assert sum(p.numel() for p in model.parameters()) == (2 * 128 + 128) + (128 * 3 + 3)
        args = ["fit", "--dataset", "blobs", "--model", "mypkg.nets:make", "--epochs", "1",
                "--store", str(tmp_path / "s.db"), "--quiet"]
        status, out, err = cli(args)
        assert status == 2 and "--allow-import" in err and err.count("\n") == 1
        status, out, err = cli([*args, "--allow-import"])
        assert status == 0, err
        assert stored_run(tmp_path / "s.db").spec["n_parameters"] == (2 * 64 + 64) + (64 * 3 + 3)  # width=64
    finally:
        for name in ("mypkg.nets", "mypkg"):
            sys.modules.pop(name, None)
