"""Run: plan -> execute (stored group by group) -> analyse; storage and resume.

Each group's trials are stored in one transaction as soon as the group ends. The groups still to
run are a pure function of the stored trials (`next_groups`), so running the same study again
(same config) skips the stored groups: a study killed at any moment resumes and ends with the
results of an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import StudyConfig
from ..store.codec import normalized
from .analysis import Recommendation, ScalingFit, analyse, trials_table
from .plan import GroupPlan, StudyPlan, load_dataset_for, next_groups, plan_study
from .trials import TrialRecord, train_group

TRIAL_KIND = "study-trial"
STUDY_KIND = "study"
STOP_AFTER_ENV = "BATCHLAB_STUDY_KILL_AFTER_GROUPS"  # kill -9 the process after storing this many groups


@dataclass
class Study:
    """The result of `run_study`.

    Attributes:
        summary: one row per batch size (`summarize`, plus ``regime``).
        trials: one row per trial (`trial_summary`).
        fit: the `ScalingFit` (S_min, E_min, B_crit ± err, B_simple).
        recommendation: a `Recommendation` (``.text`` and its numbers).
        group_id: the study's group in the store (None without a store).
        groups_run, groups_resumed: groups trained by this call, and found already stored.
    """

    config: StudyConfig
    plan: StudyPlan
    summary: pd.DataFrame
    trials: pd.DataFrame
    fit: ScalingFit
    recommendation: Recommendation
    store: Path | None = None
    group_id: int | None = None
    groups_run: int = 0
    groups_resumed: int = 0
    seconds: float = 0.0
    records: list[TrialRecord] = field(default_factory=list, repr=False)

    @property
    def study_id(self) -> str:
        return self.plan.study_id

    def to_dict(self) -> dict[str, Any]:
        """The summary table, fit and recommendation as plain values (what ``--json`` prints)."""
        return {"study_id": self.study_id, "group_id": self.group_id, "store": str(self.store) if self.store else None,
                "dataset": self.plan.dataset_name, "n_train": self.plan.n_train, "target": str(self.plan.target),
                "trials": len(self.trials), "groups_run": self.groups_run, "groups_resumed": self.groups_resumed,
                "summary": self.summary.to_dict(orient="records"), "fit": self.fit.as_dict(),
                "recommendation": self.recommendation.as_dict()}  # fmt: skip


@dataclass(frozen=True)
class StudyProgress:
    """What a progress display needs after each stored group."""

    groups_done: int
    groups_known: int  # done + pending now (extensions may add more)
    trials_done: int
    group: GroupPlan | None
    elapsed: float


def _store_group(store, group_id: int, plan: StudyPlan, records: Sequence[TrialRecord]) -> None:
    from ..store import collect_provenance

    runs = []
    for record in records:
        config = record.config.model_dump(mode="json")
        spec = {"dataset": plan.dataset_name, "model": plan.config.model, "study_id": plan.study_id,
                "group": record.group.key, "target": str(plan.target), "clock": record.clock}
        runs.append({"name": f"B={record.group.batch_size} lr={record.config.lr:g} seed={record.config.seed}",
                     "kind": TRIAL_KIND, "config": config, "spec": spec, "provenance": collect_provenance(config),
                     "status": record.status, "summary": record.summary, "message": record.message,
                     "started_at": record.started_at, "ended_at": record.ended_at,
                     "steps": record.steps, "evals": record.evals, "epochs": record.epochs})  # fmt: skip
    store.record_runs(group_id, runs)


def _open_study_group(store, plan: StudyPlan) -> int:
    for group in store.find_groups(STUDY_KIND):
        if group["config"].get("study_id") == plan.study_id:
            return group["id"]
    return store.create_group(STUDY_KIND, plan.config.name,
                              {"study_id": plan.study_id, "config": plan.config.model_dump(mode="json")})


def run_study(
    config: StudyConfig,
    *,
    store: Any = None,
    executor: Any = None,
    vectorized: bool = True,
    on_progress: Callable[[StudyProgress], None] | None = None,
) -> Study:
    """Run a batch-size study: plan, train group by group (storing each), analyse.

    Args:
        config: the `StudyConfig`.
        store: a `RunStore` or a path. Each group's trials are stored in one transaction as soon as
            the group ends; running the same study again (same config) skips the stored groups,
            so a killed study resumes and ends with the results of an uninterrupted one.
        executor: where groups run (`batchlab.study.executors`); default in this process.
        vectorized: train a group's replicas in one `fit_replicas` pass (else one `fit` each).
        on_progress: called after every group with a `StudyProgress`.

    Returns:
        A `Study` with ``.summary``, ``.trials``, ``.fit`` and ``.recommendation``.

    Example:
        >>> study = bl.run_study(bl.StudyConfig(dataset="blobs", batch_sizes=[1, 4, 16, 64, 256, "full"],
        ...                                     seeds=5, target="val_acc>=0.8"), store="batchlab.db")
        >>> print(study.recommendation.text)
    """
    from ..checks import check_argument
    from ..store import RunStore
    from .executors import InProcessExecutor

    check_argument("run_study", "config", config, StudyConfig)

    started = time.perf_counter()
    dataset = load_dataset_for(config)
    plan = plan_study(config, dataset, vectorized=vectorized)
    executor = executor or InProcessExecutor()
    owns_store = store is not None and not isinstance(store, RunStore)
    run_store = RunStore(store) if owns_store else store
    try:
        group_id, summaries = None, []
        if run_store is not None:
            group_id = _open_study_group(run_store, plan)
            summaries = [r["summary"] for r in run_store.group_run_summaries(group_id, TRIAL_KIND)]
        resumed = len({s["group"] for s in summaries})
        groups_run, records = 0, []
        kill_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        while True:
            pending = next_groups(plan, trials_table(summaries))
            if not pending:
                break
            for done_now, (group, group_records) in enumerate(executor.run(train_group, plan, pending, dataset), start=1):
                if run_store is not None:
                    _store_group(run_store, group_id, plan, group_records)
                summaries += [normalized(r.summary) for r in group_records]  # as stored
                records += group_records
                groups_run += 1
                if kill_after and groups_run >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after a stored group
                if on_progress is not None:
                    done = resumed + groups_run
                    on_progress(StudyProgress(done, done + len(pending) - done_now, len(summaries), group,
                                              time.perf_counter() - started))
        trials = trials_table(summaries)
        analysis = analyse(trials, str(plan.target))
        if run_store is not None:
            run_store.finish_group(group_id, "finished", summary={
                "summary": analysis.summary.to_dict(orient="records"), "fit": analysis.fit.as_dict(),
                "recommendation": analysis.recommendation.as_dict()})
        return Study(config, plan, analysis.summary, trials, analysis.fit, analysis.recommendation,
                     Path(run_store.path) if run_store is not None else None, group_id, groups_run, resumed,
                     time.perf_counter() - started, records)
    finally:
        if owns_store:
            run_store.close()


