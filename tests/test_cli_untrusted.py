"""Nothing untrusted runs without consent, and a failed study can still be looked at."""

from __future__ import annotations

import sys
import textwrap

TINY = ["--dataset", "blobs", "--epochs", "1", "--quiet"]
FACTORY = textwrap.dedent('''
    import pathlib
    import torch.nn as nn

    pathlib.Path(__file__).with_name("imported").write_text("the module ran")  # an import side effect

    def make(dataset):
        return nn.Sequential(nn.Flatten(), nn.Linear(dataset.train[0].shape[1], dataset.n_classes))
''')


def test_a_model_import_needs_allow_import(tmp_path, cli, monkeypatch):
    (tmp_path / "user_pkg").mkdir()
    (tmp_path / "user_pkg" / "__init__.py").write_text("")
    (tmp_path / "user_pkg" / "models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    store = tmp_path / "s.db"
    run_file = tmp_path / "run.toml"
    run_file.write_text('model = "user_pkg.models:make"\n[dataset]\nname = "blobs"\n[train]\nepochs = 1\n')
    for args in (["--model", "user_pkg.models:make", *TINY], ["--config", str(run_file), "--quiet"]):
        for command in ("fit", "explain"):
            status, out, err = cli([command, *args, "--store", str(store)])
            assert status == 2 and "--allow-import" in err and err.count("\n") == 1, err
    status, out, err = cli(["study", "--model", "user_pkg.models:make", "--store", str(store)])
    assert status == 2 and "--allow-import" in err
    assert not (tmp_path / "user_pkg" / "imported").exists() and not store.exists()  # nothing was imported or written
    status, out, err = cli(["fit", "--model", "user_pkg.models:make", *TINY, "--allow-import", "--store", str(store)])
    assert status == 0, err
    assert (tmp_path / "user_pkg" / "imported").exists()
    for name in ("user_pkg.models", "user_pkg"):
        sys.modules.pop(name, None)


def test_report_of_a_study_where_no_batch_size_reached_the_target(tmp_path, cli):
    store = str(tmp_path / "s.db")
    status, out, err = cli(["study", "--dataset", "blobs", "--model", "mlp:hidden=4", "--batch-sizes", "8,full",
                            "--lrs", "0.001", "--seeds", "1", "--max-steps", "3", "--target", "val_acc>=0.99",
                            "--no-noise-scale", "--quiet", "--store", store, "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 0 and "no batch size reached" in out.lower(), err
    status, out, err = cli(["report", "study:1", "--store", store, "--out", str(tmp_path / "r.html")])
    assert status == 0 and not err, err
    assert "study" in (tmp_path / "r.html").read_text()
