"""User strings (run, group and study names, dataset paths, titles) are shown as text in figures
and reports: matplotlib never reads them as mathtext, HTML never as markup."""

from __future__ import annotations

import html
import io

import pytest
import torch
from matplotlib.figure import Figure

from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.loop import fit
from batchlab.plots import as_plain_text, compare_runs, learning_curves, probe_traces, views_overlay
from batchlab.report import build_report
from batchlab.store import RunStore, recorder

MATH = r"$\undefinedcmd$ and $x_{$"  # matplotlib: ParseFatalException on the first, a parse error on the second
MARKUP = "</script><b>bold</b> & co"


def _draw(fig: Figure) -> None:
    for fmt in ("png", "svg"):
        fig.savefig(io.BytesIO(), format=fmt)


def test_as_plain_text_makes_a_mathtext_title_drawable():
    fig = Figure()
    fig.subplots().set_title(r"$\undefinedcmd$")
    with pytest.raises(ValueError):  # matplotlib's own behaviour, the failure this guards against
        _draw(fig)
    _draw(as_plain_text(fig))
    assert fig.axes[0].get_title() == r"$\undefinedcmd$"


@pytest.fixture(scope="module")
def store_file(tmp_path_factory):
    """A store whose run, group and study are all named with mathtext and markup."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("text") / "lab.db"
    ds = load_dataset("blobs")
    with RunStore(path) as store:
        group = store.create_group("study", MATH, {"target": "val_acc>=0.5", "dataset": MATH})
        for batch_size in (50, 100):
            rec = recorder(store, name=f"{MATH} {MARKUP} B={batch_size}", spec={"dataset": MATH, "model": MARKUP},
                           group_id=group)
            fit(torch.nn.Linear(2, 3), ds, TrainConfig(batch_size=batch_size, epochs=2), probes=["grad_norm"],
                callbacks=[rec], progress=False)
        table = [{"batch_size": b, "best_lr": 0.01, "steps_to_target": s, "samples_to_target": b * s,
                  "seconds_to_target": 0.1, "gen_gap": 0.01} for b, s in ((50, 20.0), (100, 10.0))]
        store.finish_group(group, summary={"table": table, "recommendation": MARKUP})
    return path


@pytest.mark.parametrize("ident", ["1", "2", "study:1"])
def test_reports_of_runs_and_studies_named_with_mathtext_and_markup(store_file, ident):
    with RunStore(store_file) as store:
        report = build_report(store, ident)
    assert report.html.count("<img ") >= 2  # the figures were drawn
    assert MARKUP not in report.html and "<b>bold</b>" not in report.html
    assert html.escape(MATH) in report.html or html.escape(MARKUP) in report.html


def test_every_figure_function_shows_titles_as_written(store_file):
    with RunStore(store_file) as store:
        runs = [store.load_run(1), store.load_run(2)]
    figures = [learning_curves(runs[0], "acc", title=MATH), views_overlay(runs[0], title=MATH),
               compare_runs(runs, title=MATH), probe_traces(runs[0], title=MATH)]
    for fig in figures:
        _draw(fig)
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        assert any(MATH in text for text in texts), texts
