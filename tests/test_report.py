"""HTML reports: self-contained, every figure displayed in a real browser, user text escaped."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from batchlab.cli import main
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.errors import ConfigError
from batchlab.loop import fit
from batchlab.report import build_report, parse_report_id, write_report
from batchlab.store import RunStore, recorder

EVIL_NAME = "<script>alert(1)</script>"
EVIL_PATH = 'data/a&b<c>"d.csv'
EVIL_ARG = "<img src=x onerror=alert(2)>"


def train_into(store, *, name, batch_size, lr=0.1, group_id=None, probes=("grad_norm", "dist_from_init")):
    ds = load_dataset("blobs")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, ds.n_classes))
    rec = recorder(store, name=name, spec={"dataset": EVIL_PATH, "model": "mlp"}, group_id=group_id,
                   provenance={"argv": ["batchlab", "fit", EVIL_ARG]})  # fmt: skip
    fit(model, ds, TrainConfig(batch_size=batch_size, epochs=3, lr=lr), probes=list(probes), callbacks=[rec],
        progress=False)  # fmt: skip
    return rec.run_id


@pytest.fixture(scope="module")
def store_file(tmp_path_factory):
    """A store with one run, a group of two replicas and a study of two batch sizes."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("reports") / "lab.db"
    with RunStore(path) as store:
        train_into(store, name=EVIL_NAME, batch_size=50)
        group = store.create_group("replica", EVIL_NAME, {"note": EVIL_ARG})
        for seed_name in ("a", "b"):
            train_into(store, name=seed_name, batch_size=25, group_id=group)
        store.finish_group(group)
        study = store.create_group("study", "bs study", {"target": "val_acc>=0.5", "dataset": EVIL_PATH})
        for batch_size in (25, 100):
            train_into(store, name=f"B={batch_size}", batch_size=batch_size, group_id=study)
        table = [
            {"batch_size": 25, "best_lr": 0.1, "steps_to_target": 40.0, "steps_lo": 30.0, "steps_hi": 50.0,
             "samples_to_target": 1000.0, "seconds_to_target": 0.1, "gen_gap": 0.01},
            {"batch_size": 100, "best_lr": 0.1, "steps_to_target": 12.0, "steps_lo": 10.0, "steps_hi": 15.0,
             "samples_to_target": 1200.0, "seconds_to_target": 0.05, "gen_gap": 0.02},
        ]  # fmt: skip
        store.finish_group(study, summary={"table": table, "fit": {"s_min": 8.0, "b_crit": 30.0},
                                           "recommendation": f"Use B=100 {EVIL_ARG} & lr 0.1."})  # fmt: skip
    return path


IDS = ["1", "group:1", "study:2"]  # groups are numbered apart from runs


@pytest.fixture(scope="module")
def reports(store_file):
    with RunStore(store_file) as store:
        return {ident: build_report(store, ident) for ident in IDS}


def test_report_kinds_and_contents(reports):
    run, group, study = (reports[i] for i in IDS)
    assert run.stem == "run-1" and group.stem == "group-1" and study.stem == "study-2"
    assert "Study 2" in study.title and "Recommendation" in study.html and "S_min" in study.html
    for report, n_figures in ((run, 4), (group, 4), (study, 6)):
        # run: acc, loss, views overlay, probes; group: 3 comparisons + dist_from_init;
        # study: 5 study figures + the learning curves at each best lr (median over seeds)
        assert report.html.count("<img ") == n_figures, report.stem


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_is_self_contained_and_script_free(reports):
    for report in reports.values():
        parser = TagCollector()
        parser.feed(report.html)
        names = {tag for tag, _ in parser.tags}
        assert not names & {"script", "link", "iframe", "object", "embed"}, names
        references = [value for _, attrs in parser.tags for key, value in attrs.items() if key in ("src", "href")]
        assert references and all(value.startswith("data:image/png;base64,") for value in references)
        assert not any(key.startswith("on") for _, attrs in parser.tags for key in attrs)


def test_user_text_is_escaped(reports):
    for report in reports.values():
        assert "<script>alert" not in report.html
        assert "<img src=x" not in report.html
        assert 'a&b<c>"d.csv' not in report.html
        assert html.escape(EVIL_PATH) in report.html  # shown, escaped
    assert html.escape(EVIL_NAME) in reports["1"].html
    assert html.escape(EVIL_NAME) in reports["group:1"].html
    assert html.escape(EVIL_ARG) in reports["study:2"].html


def test_report_ids():
    assert parse_report_id("7") == ("run", 7)
    assert parse_report_id("group:3") == ("group", 3) == parse_report_id("study:3")
    for bad in ("x:1", "group:", "run:-1", ""):
        with pytest.raises(ConfigError, match="report id"):
            parse_report_id(bad)


def test_report_command_writes_beside_the_store(store_file, capsys):
    main(["report", "1", "--store", str(store_file), "--json"])
    path = json.loads(capsys.readouterr().out)["report"]
    assert path == str(store_file.with_name("lab-run-1.html"))
    assert "Run 1" in open(path, encoding="utf-8").read()
    out = store_file.with_name("chosen.html")
    main(["report", "1", "--store", str(store_file), "--out", str(out)])
    assert out.exists() and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "9", "--store", str(store_file)])
    assert exit_info.value.code == 2 and "no run 9" in capsys.readouterr().err


# -- in a real browser -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Test-only: injected into a copy of the report. Records every error event (script errors and
# resources that fail to load) and, once the page has loaded, each image's decoded and displayed size.
CHECK_SCRIPT = """<script>
var batchlabErrors = [];
window.addEventListener('error', function (e) {
  batchlabErrors.push(String(e.message || (e.target && e.target.tagName) || 'error'));
}, true);
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    var box = img.getBoundingClientRect();
    return [img.naturalWidth, img.naturalHeight, box.width, box.height];
  });
  var tables = Array.prototype.map.call(document.querySelectorAll('table'), function (t) {
    var box = t.getBoundingClientRect(), holder = t.parentElement.getBoundingClientRect();
    var shown = typeof t.checkVisibility === 'function' ? t.checkVisibility() : t.getClientRects().length > 0;
    return [box.width, Math.min(box.right, holder.right), shown];
  });
  var out = document.createElement('pre');
  out.id = 'batchlab-check';
  out.textContent = JSON.stringify({images: images, errors: batchlabErrors, tables: tables,
                                   viewport: document.documentElement.clientWidth});
  document.body.appendChild(out);
});
</script>"""


def render_in_chromium(page: str, tmp_path) -> dict:
    copy = tmp_path / "checked.html"
    copy.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1200,900",
        "--dump-dom", copy.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="batchlab-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"chromium gave no check result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("ident", IDS)
def test_report_renders_in_headless_chromium(reports, ident, tmp_path):
    page = reports[ident].html
    result = render_in_chromium(page, tmp_path)
    assert result["errors"] == []
    assert len(result["images"]) == page.count("<img ") > 0
    for natural_w, natural_h, shown_w, shown_h in result["images"]:
        assert natural_w > 0 and natural_h > 0, "an image did not decode"
        assert shown_w > 0 and shown_h > 0, "an image is not displayed"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_chromium_check_sees_a_broken_image(reports, tmp_path):
    """The browser check can fail: a corrupt image is reported with zero natural size and an error."""
    page = reports["1"].html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    result = render_in_chromium(page, tmp_path)
    assert result["images"][0][:2] == [0, 0]
    assert result["errors"] == ["IMG"]


def test_write_report_needs_an_existing_folder(reports, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(reports["1"], tmp_path / "missing" / "r.html")


def test_explain_paragraph_and_figure_for_a_densely_evaluated_run(tmp_path, reports):
    from batchlab.explain import explain_config, explain_run

    ds = load_dataset("blobs")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, ds.n_classes))
    with RunStore(tmp_path / "explain.db") as store:
        rec = recorder(store, name="why", kind="explain")
        fit(model, ds, explain_config(TrainConfig(batch_size=50, epochs=3, lr=0.1), ds.n_train), callbacks=[rec],
            progress=False)  # fmt: skip
        run = store.load_run(rec.run_id)
        page = build_report(store, str(rec.run_id)).html
    assert html.escape(explain_run(run).paragraph) in page
    assert "epoch-boundary jump" in page and page.count("<img ") == 5
    assert "Why the training" not in reports["1"].html  # evaluated only at epoch ends: nothing to explain


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_study_tables_fit_the_page_in_headless_chromium(store_file, tmp_path):
    """Every table shown fits the viewport (a wide one scrolls inside its container); the key table fits whole."""
    from batchlab.report import study_report
    from batchlab.study import analyse, trials_table

    rows = [{"group": f"lrs:B={b}", "kind": "lrs", "round": 0, "batch_size": b, "batch_size_value": b, "lr": lr,
             "seed": seed, "status": "reached", "steps_to_target": 4000 / b + 10 + seed * (1 + lr), "epochs_to_target": 1.0,
             "samples_to_target": (4000 / b + 10) * b, "seconds_to_target": 0.1, "gen_gap": 0.01, "noise_scale": 50.0,
             "final_val_acc": 0.6, "final_val_loss": 1.0}
            for b in (25, 100, 400) for lr in (0.05, 0.1, 0.2) for seed in range(3)]  # fmt: skip
    analysis = analyse(trials_table(rows), "val_acc>=0.5")
    assert len(analysis.summary.columns) > 25  # wider than any page
    with RunStore(store_file) as store:
        runs = [store.load_run(i) for i in store.group_runs(2)]
        page = study_report(store.get_group(2), runs, analysis.summary, recommendation=analysis.recommendation.text,
                            target="val_acc>=0.5", fit=analysis.fit.as_dict()).html  # fmt: skip
    result = render_in_chromium(page, tmp_path)
    shown = [t for t in result["tables"] if t[2]]
    assert shown and len(result["tables"]) > len(shown)  # the full summary and the trials are collapsed
    for width, right_edge, _ in shown:
        assert right_edge <= result["viewport"], "a table runs off the right edge of the page"
    key_width = shown[0][0]
    assert key_width <= result["viewport"]


def test_study_id_of_a_group_that_is_not_a_study_is_one_line(tmp_path, cli):
    path = tmp_path / "s.db"
    with RunStore(path) as store:
        group = store.create_group("gradnorm", "gradnorm blobs mlp", {"trials": 2})
        store.record_runs(group, [{"name": "B=4", "kind": "gradnorm", "config": {"batch_size": 4}, "status": "finished",
                                   "steps": [{"step": 1, "grad_norm": 0.5}]}])  # fmt: skip
        store.finish_group(group)
    for args in (["report", f"study:{group}", "--out", str(tmp_path / "r.html")],
                 ["runs", "export", f"study:{group}", "--format", "csv", "--out", str(tmp_path / "csv")]):  # fmt: skip
        code, out, err = cli([*args, "--store", str(path)])
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err == f"error: group {group} is a gradnorm group, not a study; give group:{group}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"]
    code, _, err = cli(["report", f"group:{group}", "--out", str(tmp_path / "r.html"), "--store", str(path)])
    assert code == 0 and "gradnorm" in (tmp_path / "r.html").read_text(), err


def test_report_ids_beyond_64_bits_fail_before_the_store_is_read():
    assert parse_report_id(str(2**63 - 1)) == ("run", 2**63 - 1)
    for bad in (str(2**63), f"group:{2**64}", "study:²"):
        with pytest.raises(ConfigError, match="report id") as error:
            parse_report_id(bad)
        assert "\n" not in str(error.value)
