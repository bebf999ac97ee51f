"""The measured results shown in docs/study.md, produced by running the studies.

Each section of docs/study.md between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` is
written by one function here from studies it runs (or resumes from the store):

* ``reseeding``: the default study with seeds 0,1,2 and with seeds 10,11,12, side by side;
* ``blobs-batch-size``: the Brownlee 2020 preset, 5 seeds, beside his numbers;
* ``mnist1d``: the MNIST-1D preset, B_crit with its interval beside B_simple.

Usage::

    python docs/study_results.py [SECTION ...] [--store PATH]

Studies are stored (``--store``, default ``docs-study.db`` in the working directory), so running
it again after an interruption resumes them.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


import batchlab as bl
from batchlab.config import make_study_config
from batchlab.study import Study, brownlee_comparison, preset_values, run_study

DOC = Path(__file__).with_name("study.md")
RESEEDS = ((0, 1, 2), (10, 11, 12))


def reseeded_studies(store: str | Path, seed_sets: Sequence[Sequence[int]] = RESEEDS) -> list[Study]:
    """The default study (``StudyConfig()``) once per set of seeds."""
    return [run_study(bl.StudyConfig(seeds=tuple(seeds)), store=store) for seeds in seed_sets]


def agree(first: Study, second: Study) -> tuple[bool, bool]:
    """Whether two runs of a study agree: B_crit intervals overlap; recommended B within a factor 2."""
    a, b = first.fit, second.fit
    overlap = max(a.b_crit_lo, b.b_crit_lo) <= min(a.b_crit_hi, b.b_crit_hi)
    ra, rb = (_value(s) for s in (first, second))
    return overlap, ra is not None and rb is not None and max(ra, rb) <= 2 * min(ra, rb)


def _value(study: Study) -> float | None:
    batch_size = study.recommendation.batch_size
    return None if batch_size is None else float(study.plan.value_of(batch_size))


def _num(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def summary_table(study: Study) -> str:
    """Steps-to-target per batch size with its interval, the best lr and its margin, the regime."""
    lines = ["| B | best lr | margin | steps (median) | 95% CI | fit | regime |", "|---:|---:|---:|---:|---|---:|---|"]
    for row in study.summary.to_dict("records"):
        bound = "≥" if row.get("lr_margin_is_bound") else ""
        lines.append(f"| {row['batch_size']} | {row['best_lr']:.3g} | {bound}{row['lr_margin']:.2f}× | "
                     f"{_num(row['steps_to_target'])} | {_num(row['steps_ci_lo'])}–{_num(row['steps_ci_hi'])} | "
                     f"{_num(row.get('steps_fit', math.nan))} | {row['regime']} |")
    return "\n".join(lines)


def fit_line(study: Study) -> str:
    fit = study.fit
    return (f"B_crit = {_num(fit.b_crit)} (95% CI {_num(fit.b_crit_lo)}–{_num(fit.b_crit_hi)}; ± {_num(fit.b_crit_err)} "
            f"delta method), S_min = {_num(fit.s_min)} steps (95% CI {_num(fit.s_min_lo)}–{_num(fit.s_min_hi)}), "
            f"R² = {fit.r2:.3f} on log S, B_simple ≈ {_num(fit.b_simple)}")


def reseeding_section(store: str | Path) -> str:
    """The default study with two sets of seeds, and whether they agree."""
    started = time.perf_counter()
    studies = reseeded_studies(store)
    seconds = time.perf_counter() - started
    overlap, within = agree(*studies)
    parts = []
    for seeds, study in zip(RESEEDS, studies):
        parts += [f"**Seeds {','.join(map(str, seeds))}** ({len(study.trials)} trials):", "",
                  summary_table(study), "", fit_line(study) + ".", "",
                  f"> {study.recommendation.text}", ""]
    parts.append(f"The two B_crit intervals {'overlap' if overlap else 'do not overlap'} and the recommended batch "
                 f"sizes are {'within' if within else 'not within'} a factor 2 of each other "
                 f"(both studies: {seconds:.0f} s of wall time on the shared CPU, including any resumed from the store).")
    return "\n".join(parts)


def blobs_section(store: str | Path) -> str:
    """Brownlee's preset with 5 seeds: our final accuracies (median and range) beside his."""
    config = make_study_config({**preset_values("blobs-batch-size"), "seeds": 5})
    study = run_study(config, store=store)
    table = brownlee_comparison(study)
    lines = ["| B | train acc (median, range) | val acc (median, range) | Brownlee train | Brownlee test |",
             "|---|---|---|---:|---:|"]
    for row in table.to_dict("records"):
        lines.append(f"| {row['batch_size']} | {row['train_acc']:.3f} ({row['train_acc_lo']:.3f}–{row['train_acc_hi']:.3f}) | "
                     f"{row['val_acc']:.3f} ({row['val_acc_lo']:.3f}–{row['val_acc_hi']:.3f}) | "
                     f"{row['brownlee_train_acc']:.3f} | {row['brownlee_test_acc']:.3f} |")
    return "\n".join(lines) + f"\n\n({len(study.trials)} trials, 5 seeds, final accuracies after 200 epochs.)"


def mnist1d_section(store: str | Path) -> str:
    """The MNIST-1D preset: B_crit with its interval beside the noise scale B_simple measured while training."""
    study = run_study(make_study_config(preset_values("mnist1d")), store=store)
    fit = study.fit
    inside = fit.b_crit_lo <= fit.b_simple <= fit.b_crit_hi
    return "\n".join([summary_table(study), "", fit_line(study) + ".", "",
                      f"B_simple (median over batch sizes, near the target) {'lies inside' if inside else 'lies outside'} "
                      "the bootstrap interval of B_crit.", "", f"> {study.recommendation.text}"])


SECTIONS: dict[str, Callable[[str | Path], str]] = {
    "reseeding": reseeding_section, "blobs-batch-size": blobs_section, "mnist1d": mnist1d_section,
}


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the block between the section's markers replaced by ``body``."""
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(\n<!-- /results:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/study.md has no markers for section {name!r}")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--store", default="docs-study.db")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for name in args.sections:
        body = SECTIONS[name](args.store)
        DOC.write_text(replace_section(DOC.read_text(encoding="utf-8"), name, body), encoding="utf-8")
        print(f"docs/study.md: section {name} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
