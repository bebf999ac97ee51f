"""HTML reports: one self-contained file for a run, a group of runs, or a study.

A report holds the config and provenance, the summary tables, the figures (inline PNG, base64)
and, where there is one, the recommendation of a study or the ``explain`` paragraph of a run. It
has no scripts and no links to anything outside itself, so it opens from disk with no network.
All text that came from a user or a store (run names, dataset paths, config values, messages) is
escaped with `html.escape` before it enters the page.

Example::

    with RunStore("batchlab.db") as store:
        path = write_report(build_report(store, "3"), "run-3.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from matplotlib.figure import Figure

from . import __version__
from . import plots
from .errors import BatchlabError, ConfigError, StoreError, first_line
from .store import RunStore, StoredRun
from .store.db import MAX_ID
from .study.plan import NOISE_GROUP

if TYPE_CHECKING:
    from .study import Study

MAX_TABLE_ROWS = 200  # longer tables are cut, with a note, to keep the file small
EXPLAIN_KEYS = ("explain", "explanation")  # where an `explain` run keeps its paragraph in its summary


@dataclass(frozen=True)
class Report:
    """A rendered report: the page and the name it is saved under by default (``run-3``)."""

    title: str
    html: str
    stem: str


# -- building blocks ---------------------------------------------------------------------------


def escape(value: Any) -> str:
    """Any value as escaped HTML text; floats to 4 significant digits, NaN as an empty cell."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return html.escape(f"{value:.4g}")
    return html.escape(str(value), quote=True)


def figure_html(fig: Figure, caption: str) -> str:
    """A figure as an inline PNG (base64) with its caption, displayed at 96 dpi-equivalent size."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=plots.PNG_DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (round(v * 96) for v in fig.get_size_inches())
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'
    )


def mapping_table(values: Mapping[str, Any], caption: str | None = None) -> str:
    """A two-column key/value table; nested mappings and lists are written inline."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(_plain(v))}</td></tr>" for k, v in values.items())
    head = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="kv">{head}{rows}</table>'


def frame_table(frame: pd.DataFrame, caption: str | None = None, max_rows: int = MAX_TABLE_ROWS) -> str:
    """A DataFrame as an escaped HTML table (first ``max_rows`` rows, with a note when cut)."""
    shown = frame.head(max_rows)
    head = "".join(f"<th>{escape(c)}</th>" for c in shown.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_plain(v))}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    note = f"<p class='note'>first {max_rows} of {len(frame)} rows</p>" if len(frame) > max_rows else ""
    title = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<div class='scroll'><table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}"


def _plain(value: Any) -> Any:
    """Numpy scalars as Python numbers; containers as compact text."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(_plain(v)) for v in value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return int(value)
    return value


def section(title: str, *parts: str) -> str:
    """A titled section of already-escaped HTML parts."""
    return f"<section><h2>{escape(title)}</h2>{''.join(parts)}</section>"


def paragraph(text: str, css_class: str | None = None) -> str:
    """User text as paragraphs (blank lines separate them), escaped."""
    attr = f' class="{css_class}"' if css_class else ""
    blocks = [b.strip() for b in str(text).split("\n\n") if b.strip()]
    return "".join(f"<p{attr}>{escape(b)}</p>" for b in blocks)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-variant-numeric: tabular-nums; }
table.kv th, table.kv td { text-align: left; } thead th { background: #f4f4f4; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
details { margin: 0.5em 0; } details > summary { cursor: pointer; color: #345; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.recommendation, .explain { background: #f3f8ee; border-left: 4px solid #5a9a2a; padding: 0.6em 1em; }
.status-diverged, .status-interrupted { color: #b00; } .note { color: #666; font-size: 0.85em; }
"""


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole document: inline CSS, no scripts, nothing fetched from elsewhere."""
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class='meta'>{escape(subtitle)} · batchlab {escape(__version__)} · {made}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def _figures(makers: Sequence[tuple[str, Callable[[], Figure]]]) -> list[str]:
    """The figures that can be drawn from what the run has; a missing column leaves its figure out."""
    out = []
    for caption, make in makers:
        try:
            out.append(figure_html(make(), caption))
        except BatchlabError:
            continue
    return out


# -- a run -------------------------------------------------------------------------------------


def run_report(run: StoredRun, *, explain: str | None = None) -> Report:
    """The report of one stored run.

    Args:
        run: from `RunStore.load_run`.
        explain: the ``explain`` paragraph; by default the run's summary entry ``explain`` (or
            ``explanation``) when it has one.

    Returns:
        The `Report`: status, the explain paragraph, headline numbers, learning curves (accuracy
        and loss, train vs validation), the metric-views overlay, probe traces, the epoch table,
        then config, spec and provenance.
    """
    facts = plots.curves.run_facts(run)
    title = f"Run {run.id}" + (f": {run.name}" if run.name else "")
    explain = explain if explain is not None else next(
        (run.summary[k] for k in EXPLAIN_KEYS if isinstance(run.summary.get(k), str)), None
    )
    metric = "acc" if "val_acc" in run.evals or "train_acc" in run.evals else "loss"
    explanation = _explanation(run, metric)
    if explain is None and explanation is not None:
        explain = explanation.paragraph
    makers = []
    if explanation is not None:
        from .plots.explain import explain_figure

        makers.append(("The epoch-boundary jump: every metric view, dense full passes, epoch boundaries dotted",
                       lambda: explain_figure(run.steps, run.evals, explanation)))  # fmt: skip
    if "adaptive_signal" in run.evals and run.evals.adaptive_signal.notna().any():
        from .plots.adaptive import adaptive_figure, signal_of

        makers.append(("The adaptive batch size: the batch in force, each decision's measurement, and the lr",
                       lambda: adaptive_figure(run.steps, run.evals, signal=signal_of(run.config))))
    advice = _batch_advice(run)
    if advice is not None:
        from .plots.advise import advise_figure

        makers.append(("Which batch size: the local critical batch size over training, beside B_simple, and the "
                       "batch size recommended from it", lambda: advise_figure(advice)))
    makers += [
        (f"Learning curves ({metric}): train vs validation, full passes", lambda: plots.learning_curves(run, metric)),
        ("Learning curves (loss): train vs validation", lambda: plots.learning_curves(run, "loss")),
        ("Metric views: batch, running mean (Keras), full passes; dotted lines are epoch boundaries",
         lambda: plots.views_overlay(run, metric, "step")),
        ("Probe traces", lambda: plots.probe_traces(run, ("grad_norm", "noise_scale", "dist_from_init", "update_norm", "lr"))),
    ]  # fmt: skip
    if metric == "loss":
        makers = [m for m in makers if not m[0].startswith("Learning curves (loss)")]
    status = f"<p>Status: <b class='status-{escape(run.status)}'>{escape(run.status)}</b>"
    if isinstance(run.message, str) and run.message:
        status += f" — {escape(run.message)}"
    status += "</p>"
    parts = [section("Outcome", status, mapping_table(_headline(run), "headline numbers"))]
    if explain:
        parts.append(section("Why the training accuracy jumps at epoch boundaries", paragraph(explain, "explain")))
    if advice is not None:
        parts.append(section("Which batch size", paragraph(advice.text), frame_table(advice.points)))
    parts.append(section("Figures", *_figures(makers)))
    if not run.epochs.empty:
        parts.append(section("Epochs", frame_table(run.epochs)))
    parts.append(section("Configuration", mapping_table(run.config, "TrainConfig"), mapping_table(run.spec, "what it was given")))
    parts.append(section("Provenance", mapping_table(_provenance(run), None)))
    subtitle = f"{_spec_name(run.spec.get('dataset')) or '?'} · {facts.label} · {run.kind}"
    return Report(title, page(title, subtitle, parts), f"run-{run.id}")


def _explanation(run: StoredRun, metric: str):
    """`batchlab.explain.explain_run` of the run when its tables hold what it needs (dense evaluations)."""
    from .explain import explain_run

    try:
        return explain_run(run, metric)
    except BatchlabError:  # an ordinary run, evaluated only at epoch ends: nothing to explain
        return None


def _batch_advice(run: StoredRun):
    """`batchlab advise`'s advice from the run's stored local-CBS measurements (`batchlab.LocalCBS`),
    or None: no measurement, or a run whose config does not give one batch size and a torch optimizer."""
    from .config import TrainConfig, is_schedule
    from .critical_batch import RULE_BY_OPTIMIZER, advise_batch_size
    from .optim import scaled_lr

    if "local_cbs" not in run.evals or not run.evals.local_cbs.notna().any():
        return None
    try:
        config = TrainConfig(**run.config)
    except (BatchlabError, TypeError):  # a tracked run's config is what the user's loop said
        return None
    if is_schedule(config.batch_size) or config.optimizer not in RULE_BY_OPTIMIZER or run.steps.empty:
        return None  # the advice scales from one batch size
    batch = int(run.steps.batch_size.iloc[0])  # B, or N for "full"
    return advise_batch_size(run.evals, batch, scaled_lr(config, batch), config.optimizer)


def _headline(run: StoredRun) -> dict[str, Any]:
    keep = {k: v for k, v in run.summary.items() if k not in EXPLAIN_KEYS and k != "message"}
    return keep or {"steps": len(run.steps), "epochs": len(run.epochs)}


def _provenance(run: StoredRun) -> dict[str, Any]:
    return {"run id": run.id, "kind": run.kind, "group": run.group_id, "started": run.started_at,
            "ended": run.ended_at, **run.provenance}  # fmt: skip


# -- a group of runs, and a study --------------------------------------------------------------


def runs_table(runs: Sequence[StoredRun]) -> pd.DataFrame:
    """One row per run: id, name, dataset, batch size, lr, seed, status and the final full-pass metrics."""
    rows = []
    for run in runs:
        last = run.evals.iloc[-1] if not run.evals.empty else pd.Series(dtype=float)
        row = {"id": run.id, "name": run.name, "dataset": _spec_name(run.spec.get("dataset")),
               "batch_size": run.config.get("batch_size"),
               "lr": run.config.get("lr"), "seed": run.config.get("seed"), "status": run.status,
               "steps": int(run.steps["step"].max()) if not run.steps.empty else 0}  # fmt: skip
        for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
            row[column] = float(last[column]) if column in last else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _spec_name(value: Any) -> Any:
    """A spec entry's name: specs hold a name, or a mapping with one (``{"name": "mlp", ...}``)."""
    return value.get("name") if isinstance(value, Mapping) else value


def group_report(group: Mapping[str, Any], runs: Sequence[StoredRun]) -> Report:
    """The report of a group of runs (replicas, a sweep): every run on one axis, by batch size and lr.

    Args:
        group: from `RunStore.get_group`.
        runs: the group's runs, from `RunStore.load_run`.
    """
    title = f"Group {group['id']}" + (f": {group['name']}" if group.get("name") else "")
    parts = [section("Runs", frame_table(runs_table(runs)))]
    if runs:
        parts.append(section("Figures", *_figures(_comparison_makers(runs))))
    parts.append(section("Configuration", mapping_table(group.get("config") or {}, f"{group['kind']} config")))
    if group.get("summary"):
        parts.append(section("Summary", mapping_table(group["summary"])))
    parts.append(section("Provenance", mapping_table(_group_provenance(group, runs))))
    subtitle = f"{group['kind']} · {len(runs)} runs · {group['status']}"
    return Report(title, page(title, subtitle, parts), f"group-{group['id']}")


def _comparison_makers(runs: Sequence[StoredRun]):
    metric = "val_acc" if any("val_acc" in r.evals for r in runs) else "val_loss"
    makers = [
        (f"{metric} of every run vs epochs, coloured by batch size", lambda: plots.compare_runs(runs, metric, "epoch")),
        (f"{metric} vs steps (log scale): larger batches take fewer steps", lambda: plots.compare_runs(runs, metric, "step", logx=True)),
        ("Training loss (full pass) vs samples seen", lambda: plots.compare_runs(runs, "train_loss", "samples_seen")),
    ]  # fmt: skip
    if any("dist_from_init" in r.steps for r in runs):
        makers.append(("Distance from the initial weights vs samples seen",
                       lambda: plots.compare_runs(runs, "dist_from_init", "samples_seen")))
    return makers


def _group_provenance(group: Mapping[str, Any], runs: Sequence[StoredRun]) -> dict[str, Any]:
    first = runs[0].provenance if runs else {}
    keep = ("batchlab", "torch", "python", "platform", "hostname", "device", "device_name", "argv")
    return {"group id": group["id"], "kind": group["kind"], "created": group.get("created_at"),
            "ended": group.get("ended_at"), **{k: first[k] for k in keep if k in first}}  # fmt: skip


STUDY_KEY_COLUMNS = {"batch_size": "B", "best_lr": "best lr", "lr_margin": "lr margin", "reached": "reached",
                     "steps_to_target": "steps", "steps_ci": "steps interval", "samples_to_target": "samples",
                     "regime": "regime", "batches": "batches", "measurement_samples": "measurement samples"}  # fmt: skip


def study_key_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader needs first, narrow enough for the page: B, lr, steps with their interval
    (named by its true level where the summary says it: "75% CI, range of 3 seeds"), regime; with
    an adaptive row (last, `batchlab.study.adaptive.beside`) the batches it went through and the
    samples its measurements took, columns the fixed rows leave empty."""
    table = pd.DataFrame(index=summary.index)
    for column, header in STUDY_KEY_COLUMNS.items():
        if column == "steps_ci" and {"steps_ci_lo", "steps_ci_hi"} <= set(summary.columns):
            table[header] = [f"{_short(row['steps_ci_lo'])}–{_short(row['steps_ci_hi'])}{_interval_name(row)}"
                             for _, row in summary.iterrows()]
        elif column in summary:
            table[header] = summary[column]
    return table


def _interval_name(row: pd.Series) -> str:
    """" (75% CI, range of 3 seeds)" for a summary row that states its interval's level, else ""."""
    from .study.analysis import steps_interval_label

    try:
        return f" ({steps_interval_label(row)})"
    except (KeyError, TypeError, ValueError):  # a summary stored before intervals carried their level
        return ""


def _short(value: Any) -> str:
    """A bound of an interval, short: a missing one (NaN, or null as a stored summary holds it) is blank."""
    number = math.nan if value is None else float(value)
    return "∞" if math.isinf(number) else "" if math.isnan(number) else f"{number:,.0f}" if number >= 100 else f"{number:.3g}"


def details(summary_text: str, body: str) -> str:
    """A collapsed block (``<details>``): wide tables stay off the page until asked for."""
    return f"<details><summary>{escape(summary_text)}</summary>{body}</details>"


def study_report(
    group: Mapping[str, Any],
    runs: Sequence[StoredRun],
    summary: pd.DataFrame,
    *,
    s_min: float | None = None,
    b_crit: float | None = None,
    e_min: float | None = None,
    recommendation: str | Mapping[str, Any] | None = None,
    target: str | None = None,
    n_train: int | None = None,
    fit: Mapping[str, Any] | None = None,
    adaptive: pd.DataFrame | None = None,
) -> Report:
    """The report of a batch-size study.

    Args:
        group: the study's group (`RunStore.get_group`): its config is shown as the study config.
        runs: the study's trials.
        summary: one row per batch size, with the columns of `batchlab.plots.study`.
        s_min, b_crit, e_min: the fitted parameters of S = S_min(1 + B_crit/B) and E = E_min(1 + B/B_crit).
        recommendation: the study's advice, shown first: its text, or `Recommendation.as_dict()`
            (then the figures mark its batch size too).
        target: the target condition (``val_acc>=0.8``), for titles.
        n_train: the training-set size, the value of batch size ``full``.
        fit: the whole fit (`ScalingFit.as_dict`): its intervals, R² and B_simple are shown too.
        adaptive: the adaptive row (`batchlab.study.adaptive.adaptive_row`), or None: shown last in
            the summary, in a sentence of its own and in the steps-vs-samples figure.

    Returns:
        The `Report`: recommendation, the key columns of the summary (the rest collapsed), the fit
        with its uncertainty, the figures (steps-to-target with intervals and band, samples,
        seconds, best lr, gap, learning curves at each best lr over seeds, and steps vs samples
        with the adaptive run), the trials (collapsed), config and provenance.
    """
    from .study.adaptive import beside, row_sentence

    title = f"Study {group['id']}" + (f": {group['name']}" if group.get("name") else "")
    fit = dict(fit or {})
    fitted = {"S_min (steps)": s_min, "B_crit (samples)": b_crit, "E_min (samples)": e_min if e_min is not None
              else (s_min * b_crit if s_min is not None and b_crit is not None else None)}  # fmt: skip
    fitted.update(_fit_uncertainty(fit))
    parts = []
    advice = recommendation if isinstance(recommendation, Mapping) else None
    text = advice.get("text") if advice is not None else recommendation
    if text:
        parts.append(section("Recommendation", paragraph(str(text), "recommendation")))
    has_adaptive = adaptive is not None and len(adaptive) > 0
    shown = beside(summary, adaptive)
    parts.append(section("Summary by batch size", frame_table(study_key_table(shown)),
                         *([paragraph(row_sentence(adaptive.iloc[0], target or "the target"))] if has_adaptive else []),
                         details("all columns", frame_table(shown)),
                         mapping_table({k: v for k, v in fitted.items() if v is not None}, "fitted trade-off")))
    interval = _pair(fit.get("b_crit_lo"), fit.get("b_crit_hi"))
    figures = plots.study_figures(summary, s_min=s_min, b_crit=b_crit, e_min=e_min, n_train=n_train, target=target,
                                  b_crit_interval=interval, recommendation=advice,
                                  adaptive=adaptive if has_adaptive else None)
    captions = {
        "steps_to_target": "Steps to target vs batch size (log-log): medians with their intervals over seeds, perfect "
                           "scaling, the fitted curve and its bootstrap band",
        "samples_to_target": "Samples to target vs batch size, with E = E_min(1 + B/B_crit)",
        "seconds_to_target": "Training seconds to target vs batch size",
        "best_lr": "Best learning rate vs batch size, against the linear and square-root rules",
        "gen_gap": "Generalization gap (train − val accuracy) vs batch size",
        "steps_vs_samples": "Steps vs samples to target (log-log): the fixed batch sizes' trade-off, the fit, and "
                            "the adaptive run (open star: with the samples its measurements took)",
    }  # fmt: skip
    blocks = [figure_html(fig, captions[name]) for name, fig in figures.items()]
    by_batch = best_lr_runs(runs, summary)
    if by_batch and target:
        blocks += _figures([("Learning curves at each batch size's best lr: median over seeds, band: range over seeds",
                             lambda: _curves_figure(by_batch, target, n_train, advice))])
    parts.append(section("Figures", *blocks))
    parts.append(section("Trials", details(f"{len(runs)} trials", frame_table(runs_table(runs)))))
    parts.append(section("Configuration", mapping_table(group.get("config") or {}, "study config")))
    parts.append(section("Provenance", mapping_table(_group_provenance(group, runs))))
    subtitle = (f"study · {len(summary)} batch sizes" + (" and an adaptive run" if has_adaptive else "")
                + f" · {len(runs)} trials · {group['status']}")
    return Report(title, page(title, subtitle, parts), f"study-{group['id']}")


def _fit_uncertainty(fit: Mapping[str, Any]) -> dict[str, Any]:
    """The fit's intervals and quality as table rows (empty when the fit has none)."""
    rows: dict[str, Any] = {}
    if _pair(fit.get("b_crit_lo"), fit.get("b_crit_hi")):
        rows["B_crit 95% bootstrap CI"] = f"{_short(fit['b_crit_lo'])}–{_short(fit['b_crit_hi'])}"
    if _number(fit.get("b_crit_err")) is not None:
        rows["B_crit ± (delta method)"] = _number(fit["b_crit_err"])
    if _pair(fit.get("s_min_lo"), fit.get("s_min_hi")):
        rows["S_min 95% bootstrap CI"] = f"{_short(fit['s_min_lo'])}–{_short(fit['s_min_hi'])}"
    if _number(fit.get("r2")) is not None:
        rows["R² on log S"] = _number(fit["r2"])
    if _number(fit.get("b_simple")) is not None:
        rows["B_simple near the target"] = _number(fit["b_simple"])
    return rows


def _pair(lo: Any, hi: Any) -> tuple[float, float] | None:
    low, high = _number(lo), _number(hi)
    return (low, high) if low is not None and high is not None else None


def _curves_figure(by_batch: dict, target: str, n_train: int | None, advice: Mapping[str, Any] | None = None) -> Figure:
    from .config import parse_target

    condition = parse_target(target)
    return plots.best_lr_curves(by_batch, condition.metric, target=condition.value, target_text=target, n_train=n_train,
                                recommended=(advice or {}).get("batch_size"))


def best_lr_runs(runs: Sequence[StoredRun], summary: pd.DataFrame) -> dict[Any, list[StoredRun]]:
    """Per batch size, its learning-rate-search trials at its best lr (every seed): the curves to draw."""
    if "best_lr" not in summary or "batch_size" not in summary:
        return {}
    chosen: dict[Any, list[StoredRun]] = {}
    for batch_size, lr in zip(summary["batch_size"], summary["best_lr"]):
        if _number(lr) is None:  # no lr reached the target at this batch size: no best run to show
            continue
        at_best = [run for run in runs if str(run.config.get("batch_size")) == str(batch_size)
                   and run.config.get("lr") is not None and math.isclose(run.config["lr"], float(lr), rel_tol=1e-9)
                   and not str(run.spec.get("group", "")).startswith(NOISE_GROUP)]  # fmt: skip
        if at_best:
            chosen[batch_size] = at_best
    return chosen


# -- from the store ----------------------------------------------------------------------------


def parse_report_id(ident: str) -> tuple[str, int]:
    """``3`` -> ("run", 3); ``group:3`` / ``study:3`` -> ("group", 3) (`report_group` tells them apart)."""
    text = str(ident).strip()
    kind, _, number = text.rpartition(":")
    kind = kind or "run"
    if kind not in ("run", "group", "study") or not re.fullmatch(r"[0-9]+", number):
        raise ConfigError(f"cannot read report id {ident!r}; give a run id (3), or group:N / study:N for a group")
    if int(number) > MAX_ID:
        raise ConfigError(f"report id {ident!r} is out of range; ids are whole numbers from 1 to 2**63-1")
    return ("run" if kind == "run" else "group"), int(number)


def report_group(store: RunStore, ident: str | int) -> dict[str, Any]:
    """The group that ``group:N`` or ``study:N`` names, from `RunStore.get_group`.

    Raises:
        ConfigError: ``study:N`` names a group that is not a study (a gradnorm or replica group).
    """
    _, number = parse_report_id(str(ident))
    group = store.get_group(number)
    if str(ident).strip().startswith("study:") and group["kind"] != "study":
        raise ConfigError(f"group {number} is a {group['kind']} group, not a study; give group:{number}")
    return group


def build_report(store: RunStore, ident: str | int) -> Report:
    """The report of a run (``3``) or a group (``group:3``, ``study:3``) in the store.

    A group of kind ``study`` gets a study report when its summary holds ``table`` (or
    ``summary``): the per-batch-size records with the columns of `batchlab.plots.study`; and
    optionally ``s_min``, ``b_crit``, ``e_min`` (top level or under ``fit``), ``recommendation``,
    ``target`` and ``n_train`` (also read from the group's config). Any other group gets a group report.

    Raises:
        StoreError: the store holds a value of a kind the report cannot show (a damaged store, or
            one batchlab did not write), in one line.
    """
    try:
        return _build_report(store, ident)
    except BatchlabError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as error:
        # The store is untrusted input and a page is drawn from many of its values: one that slipped
        # past the checks is still one line, which names what went wrong.
        raise StoreError(f"cannot build the report of {ident} from {store.path}: a stored value has an unexpected "
                         f"kind ({type(error).__name__}: {first_line(error)[:120]}); the store may be damaged or not "
                         "written by batchlab") from None  # fmt: skip


def _build_report(store: RunStore, ident: str | int) -> Report:
    kind, number = parse_report_id(str(ident))
    if kind == "run":
        return run_report(_checked(store.load_run(number)))
    group = report_group(store, ident)
    runs = [_checked(store.load_run(i)) for i in store.group_runs(number)]
    records = group["summary"].get("table") or group["summary"].get("summary")
    if group["kind"] == "study" and isinstance(records, list) and records:
        if not all(isinstance(record, Mapping) for record in records):
            raise StoreError(f"group {number}'s summary table holds an entry that is not a record; the store "
                             "is damaged or was not written by batchlab")  # fmt: skip
        config = group.get("config") or {}
        # A study's group keeps its StudyConfig under "config" (the target is there), beside its id.
        nested = config.get("config") if isinstance(config.get("config"), Mapping) else {}
        info = {**nested, **config, **group["summary"], **(group["summary"].get("fit") or {})}
        return study_report(
            group, runs, pd.DataFrame.from_records(records),
            s_min=_number(info.get("s_min")), b_crit=_number(info.get("b_crit")), e_min=_number(info.get("e_min")),
            recommendation=info.get("recommendation") if isinstance(info.get("recommendation"), (str, Mapping)) else None,
            target=str(info["target"]) if info.get("target") else None, n_train=_n_train(info, runs),
            fit=group["summary"].get("fit") if isinstance(group["summary"].get("fit"), Mapping) else None,
            adaptive=_stored_adaptive(group["summary"].get("adaptive"), number),
        )  # fmt: skip
    return group_report(group, runs)


def _stored_adaptive(records: Any, group_id: int) -> pd.DataFrame | None:
    """A stored study's adaptive row (`batchlab.study.adaptive.adaptive_row`), or None without one."""
    if not records:
        return None
    if not isinstance(records, list) or not all(isinstance(record, Mapping) for record in records):
        raise StoreError(f"group {group_id}'s adaptive row is not a list of records; the store is damaged or was "
                         "not written by batchlab")
    return pd.DataFrame.from_records(records)


def _checked(run: StoredRun) -> StoredRun:
    """The run, after checking the stored values its report is drawn from: the config's batch size
    and lr, the spec's clock, the step table's epochs. A crafted value is a one-line StoreError."""
    def bad(what: str, value: Any, expected: str) -> StoreError:
        return StoreError(f"run {run.id}'s {what} is {value!r:.40}, not {expected}; the store is damaged "
                          "or was not written by batchlab")  # fmt: skip

    lr, batch_size, clock = run.config.get("lr"), run.config.get("batch_size"), run.spec.get("clock")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
        raise bad("lr", lr, "a number")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, str))):
        if not isinstance(batch_size, (list, dict)) or not _valid_batch_size(batch_size):
            raise bad("batch_size", batch_size, "a whole number, a name, a batch-size schedule or an adaptive one")
    if clock is not None and not isinstance(clock, Mapping):
        raise bad("clock", clock, "a mapping")
    for key in ("n_train", "steps_per_epoch"):
        value = (clock or {}).get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise bad(f"clock's {key}", value, "a whole number of at least 1")
    epochs = run.steps["epoch"].dropna().astype(float) if "epoch" in run.steps else pd.Series(dtype=float)
    wrong = epochs[epochs % 1 != 0]  # inf % 1 is NaN: not whole either
    if not wrong.empty:
        raise bad("step table's epoch", float(wrong.iloc[0]), "a whole number")
    return run


def _valid_batch_size(value: list | dict) -> bool:
    """Whether a stored schedule or adaptive batch size is one `TrainConfig` accepts."""
    from .config import TrainConfig

    try:
        TrainConfig(batch_size=value)
    except BatchlabError:
        return False
    return True


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _n_train(info: Mapping[str, Any], runs: Sequence[StoredRun]) -> int | None:
    """The training-set size of a study: its summary's or config's, else its first trial's clock's."""
    if info.get("n_train"):
        return _count(info["n_train"], "the study's n_train")
    for run in runs:
        clock = run.spec.get("clock")
        n = clock.get("n_train") if isinstance(clock, Mapping) else None
        if n:
            return _count(n, f"run {run.id}'s n_train")
    return None


def _count(value: Any, what: str) -> int:
    """A stored count, checked: a whole number of at least 1, else a one-line StoreError."""
    number = _number(value)
    if number is None or number < 1 or number != int(number):
        raise StoreError(f"{what} is {value!r:.40}, not a whole number; the store is damaged "
                         "or was not written by batchlab")  # fmt: skip
    return int(number)


def default_report_path(store_path: str | Path, report: Report) -> Path:
    """Where a report goes by default: beside the store, ``<store stem>-<run-3>.html``."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}-{report.stem}.html")


def write_report(report: Report, path: str | Path) -> Path:
    """Write the page (UTF-8); the directory must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write the report to {path}: directory {path.parent} does not exist")
    try:
        path.write_text(report.html, encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot write the report to {path}: {error.strerror or error}; pass another --out") from None
    return path


# -- a study's output folder -------------------------------------------------------------------


def write_study_outputs(study: Study, folder: str | Path, *, report: bool = True) -> list[Path]:
    """The study's figures (PNG + SVG), the summary and trials as CSV, and the HTML report.

    Figures: steps-, samples- and seconds-to-target, best lr and generalization gap vs batch size
    (`batchlab.plots.study`), and the learning curves of every batch size at its best lr, median
    over seeds with their range (`batchlab.plots.best_lr_curves`).
    """
    from .study.adaptive import beside

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    beside(study.summary, study.adaptive).to_csv(folder / "summary.csv", index=False)
    study.trials.to_csv(folder / "trials.csv", index=False)
    written += [folder / "summary.csv", folder / "trials.csv"]
    fit, n_train, target = study.fit, study.plan.n_train, str(study.plan.target)
    interval = (fit.b_crit_lo, fit.b_crit_hi) if fit.ok else None
    advice = study.recommendation.as_dict()
    figures = plots.study_figures(study.summary, s_min=fit.s_min if fit.ok else None,
                                  b_crit=fit.b_crit if fit.ok else None, n_train=n_train, target=target,
                                  b_crit_interval=interval, recommendation=advice,
                                  adaptive=study.adaptive if len(study.adaptive) else None)
    for name, figure in figures.items():
        written += plots.save_figure(figure, folder / name)
    if study.store is None:
        return written
    with RunStore(study.store, create=False) as store:
        runs = [store.load_run(run_id) for run_id in store.group_runs(study.group_id)]
        by_batch = best_lr_runs(runs, study.summary)
        if by_batch:
            written += plots.save_figure(_curves_figure(by_batch, target, n_train, advice), folder / "learning_curves")
        if report:
            written += _write_report(store, study, runs, folder)
    return written


def _write_report(store, study: Study, runs: Sequence[StoredRun], folder: Path) -> list[Path]:
    fit = study.fit
    built = study_report(store.get_group(study.group_id), runs, study.summary,
                         s_min=fit.s_min if fit.ok else None, b_crit=fit.b_crit if fit.ok else None,
                         e_min=fit.e_min if fit.ok else None, recommendation=study.recommendation.as_dict(),
                         target=str(study.plan.target), n_train=study.plan.n_train, fit=fit.as_dict(),
                         adaptive=study.adaptive)
    path = folder / "report.html"
    path.write_text(built.html, encoding="utf-8")
    return [path]
