"""Every Python example of docs/integrations.md runs as written, and stores its run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before any import of keras, as the example does

import pytest

from batchlab.store import RunStore

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module", autouse=True)
def fresh_keras_session():
    """Keras caches its global dtype policy at the first layer made; clear it afterwards, so that a
    later ``set_floatx`` (the float64 equivalence tests) takes effect."""
    yield
    try:
        import keras
    except ImportError:
        return
    keras.utils.clear_session()


def test_the_doc_has_the_three_examples():
    assert len(BLOCKS) == 3
    assert "bl.track(" in BLOCKS[0] and "integrations.lightning" in BLOCKS[1] and "integrations.keras" in BLOCKS[2]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["own-loop", "lightning", "keras"])
def test_example_runs_and_batchlab_explain_reads_its_run(index, tmp_path, monkeypatch, cli, capsys):
    pytest.importorskip({1: "lightning", 2: "keras"}.get(index, "torch"))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), namespace)
    capsys.readouterr()  # the example's own prints
    with RunStore(tmp_path / "batchlab.db") as store:
        runs = store.list_runs()
        stored = store.load_run(int(runs["id"].iloc[0]))
    assert runs["status"].tolist() == ["finished"] and runs["epochs"].iloc[0] >= 3
    # The doc says `batchlab explain --run <id>` explains the example's run: it does, in one go.
    status, out, err = cli(["explain", "--run", str(stored.id), "--store", "batchlab.db", "--json", "--out", "figs"])
    assert status == 0, err
    explained = json.loads(out)
    assert explained["steps_per_epoch"] == 16 and len(explained["boundaries"]["loss"]) == stored.epochs.shape[0] - 1
    if index == 2:  # Keras' own History holds the running mean at each epoch's end
        history = namespace["model"].history.history["loss"]
        ends = [b["running_end"] for b in explained["boundaries"]["loss"]]
        assert ends == pytest.approx(history[: len(ends)], rel=1e-5)
