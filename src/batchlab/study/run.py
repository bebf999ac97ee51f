"""Run: plan -> execute (stored group by group) -> analyse; storage and resume.

Each group's trials are stored in one transaction as soon as the group ends. The groups still to
run are a pure function of the stored trials (`next_groups`), so running the same study again
(same config) skips the stored groups: a study killed at any moment resumes and ends with the
results of an uninterrupted one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import StudyConfig, check_import_allowed
from ..store.codec import normalized
from .adaptive import adaptive_row
from .analysis import Recommendation, ScalingFit, analyse, trials_table
from .plan import ADAPTIVE_GROUP, GroupPlan, StudyPlan, groups_left_at_most, load_dataset_for, next_groups, plan_study
from .trials import TrialRecord, train_group

TRIAL_KIND = "study-trial"
STUDY_KIND = "study"


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
        failed: the groups whose training raised, with the error; the study went on without them,
            and its recommendation names them instead of recommending from the rest (a failed
            adaptive run is named here only: the analysis does not read the adaptive runs).
        adaptive: the adaptive row (`batchlab.study.adaptive.adaptive_row`): one row, set beside
            the summary, or an empty table when the study has no adaptive run.
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
    failed: dict[str, str] = field(default_factory=dict)  # group key -> error (a rerun retries them)
    adaptive: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def study_id(self) -> str:
        return self.plan.study_id

    def to_dict(self) -> dict[str, Any]:
        """The summary table, fit and recommendation as plain values (what ``--json`` prints)."""
        return {"study_id": self.study_id, "group_id": self.group_id, "store": str(self.store) if self.store else None,
                "dataset": self.plan.dataset_name, "n_train": self.plan.n_train, "target": str(self.plan.target),
                "trials": len(self.trials), "groups_run": self.groups_run, "groups_resumed": self.groups_resumed,
                "summary": self.summary.to_dict(orient="records"), "fit": self.fit.as_dict(),
                "recommendation": self.recommendation.as_dict(), "failed_groups": self.failed,
                "adaptive": self.adaptive.to_dict(orient="records")[0] if len(self.adaptive) else None}  # fmt: skip


@dataclass(frozen=True)
class StudyProgress:
    """What a progress display needs after each stored group."""

    groups_done: int  # stored or failed, by this call or found stored
    groups_known: int  # done + at most what remains (`groups_left_at_most`): it never grows
    trials_done: int
    group: GroupPlan | None
    elapsed: float


def _store_group(store, group_id: int, plan: StudyPlan, records: Sequence[TrialRecord]) -> None:
    runs = []
    for record in records:
        config = record.config.model_dump(mode="json")
        spec = {"dataset": plan.dataset_name, "model": plan.config.model, "study_id": plan.study_id,
                "group": record.group.key, "target": str(plan.target), "clock": record.clock}
        runs.append({"name": f"B={record.group.batch_size} lr={record.config.lr:g} seed={record.config.seed}",
                     "kind": TRIAL_KIND, "config": config, "spec": spec, "provenance": record.provenance,
                     "status": record.status, "summary": record.summary, "message": record.message,
                     "started_at": record.started_at, "ended_at": record.ended_at,
                     "steps": record.steps, "evals": record.evals, "epochs": record.epochs})  # fmt: skip
    store.record_runs(group_id, runs)


def _stored_summaries(store, group_id: int) -> list[dict[str, Any]]:
    """The study's stored trial summaries, each (group, lr, seed) once: if two drivers ever stored
    one group (a holder thought dead came back), the first copy counts."""
    seen, out = set(), []
    for run in store.group_run_summaries(group_id, TRIAL_KIND):
        summary = run["summary"]
        key = (summary.get("group"), summary.get("lr"), summary.get("seed"))
        if key not in seen:
            seen.add(key)
            out.append(summary)
    return out


# -- claims: several drivers, one study ----------------------------------------------------------

CLAIMS_SCHEMA = """CREATE TABLE IF NOT EXISTS study_claims (
    study_id TEXT NOT NULL,
    group_key TEXT NOT NULL,
    status TEXT NOT NULL,
    holder TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    group_id INTEGER,
    PRIMARY KEY (study_id, group_key)
)"""
STUDY_KEY = "<study>"  # the claim row that names the study's group in the store
LEASE_SECONDS = 60.0  # a claim whose heartbeat is older than this is taken over


class GroupClaims:
    """Claims on a study's groups in the store, so several drivers share one study without duplicates.

    Like Optuna's RDB storage for trials: a driver claims a group before training it (a row
    ``running`` with its holder id and a heartbeat), a background thread renews the heartbeats of its
    claims, and a claim whose heartbeat is older than the lease belongs to a dead driver and is taken
    over. Finished groups are ``done``; a group whose training raised is ``failed`` with its error,
    and the next run of the study (another holder) claims it again. Every change is one
    ``BEGIN IMMEDIATE`` transaction, so two drivers never both win a claim.

    Args:
        store: the `RunStore` (its file holds the ``study_claims`` table).
        study_id: the study's identity (`study_id`).
        lease: seconds without a heartbeat after which a claim is taken over.
    """

    def __init__(self, store, study_id: str, lease: float = LEASE_SECONDS):
        self.store, self.study_id, self.lease = store, study_id, lease
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        with store.transaction() as db:
            db.execute(CLAIMS_SCHEMA)

    def open_group(self, create: Callable[[], int], find: Callable[[], int | None]) -> int:
        """The study's group id in the store: found, or created by exactly one driver."""
        while True:
            with self.store.transaction() as db:
                row = db.execute("SELECT status, holder, heartbeat, group_id FROM study_claims "
                                 "WHERE study_id = ? AND group_key = ?", (self.study_id, STUDY_KEY)).fetchone()
                if row is not None and row[0] == "open":
                    return int(row[3])
                opener = row is None or time.time() - row[2] > self.lease  # nobody, or a dead opener
                if opener:
                    db.execute("INSERT OR REPLACE INTO study_claims VALUES (?, ?, 'opening', ?, ?, 1, NULL, NULL)",
                               (self.study_id, STUDY_KEY, self.holder, time.time()))
            if not opener:
                time.sleep(0.05)  # another driver is creating it right now
                continue
            group_id = find() or create()  # a study stored before claims existed is found, not re-made
            with self.store.transaction() as db:
                db.execute("UPDATE study_claims SET status = 'open', group_id = ? WHERE study_id = ? AND group_key = ?",
                           (group_id, self.study_id, STUDY_KEY))
            return group_id

    def claim(self, key: str) -> bool:
        """Take group ``key`` if nobody holds it, its holder is dead, or it failed in an earlier run."""
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute("SELECT status, holder, heartbeat FROM study_claims WHERE study_id = ? AND group_key = ?",
                             (self.study_id, key)).fetchone()
            if row is None:
                db.execute("INSERT INTO study_claims VALUES (?, ?, 'running', ?, ?, 1, NULL, NULL)",
                           (self.study_id, key, self.holder, now))
                return True
            status, holder, heartbeat = row
            free = (status == "failed" and holder != self.holder
                    or status == "running" and holder != self.holder
                    and (now - heartbeat > self.lease or _holder_died(holder)))
            if free:
                db.execute("UPDATE study_claims SET status = 'running', holder = ?, heartbeat = ?, "
                           "attempts = attempts + 1, error = NULL WHERE study_id = ? AND group_key = ?",
                           (self.holder, now, self.study_id, key))
            return free

    def finish(self, key: str, error: str | None = None) -> None:
        """Mark a held group ``done``, or ``failed`` with its error."""
        with self.store.transaction() as db:
            db.execute("UPDATE study_claims SET status = ?, error = ?, heartbeat = ? "
                       "WHERE study_id = ? AND group_key = ? AND holder = ?",
                       ("failed" if error else "done", error, time.time(), self.study_id, key, self.holder))

    def held_by_others(self) -> int:
        """Groups that live drivers other than this one are training now."""
        with self.store.transaction() as db:
            (count,) = db.execute("SELECT count(*) FROM study_claims WHERE study_id = ? AND group_key != ? "
                                  "AND status = 'running' AND holder != ? AND heartbeat >= ?",
                                  (self.study_id, STUDY_KEY, self.holder, time.time() - self.lease)).fetchone()
        return int(count)

    def failures(self) -> dict[str, str]:
        """Group key -> error of the study's failed groups."""
        with self.store.transaction() as db:
            rows = db.execute("SELECT group_key, error FROM study_claims WHERE study_id = ? AND status = 'failed'",
                              (self.study_id,)).fetchall()
        return {key: error for key, error in rows}

    def heartbeat(self) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE study_claims SET heartbeat = ? WHERE study_id = ? AND holder = ? AND status = 'running'",
                       (time.time(), self.study_id, self.holder))

    def __enter__(self) -> "GroupClaims":
        def beat() -> None:
            while not self._stop.wait(self.lease / 4):
                self.heartbeat()

        self._beating = threading.Thread(target=beat, name="study-claims-heartbeat", daemon=True)
        self._beating.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()


def _holder_died(holder: str) -> bool:
    """A holder on this host whose process is gone died (killed, crashed): no need to wait out its lease."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _open_study_group(store, plan: StudyPlan, claims: GroupClaims) -> int:
    def find() -> int | None:
        for group in store.find_groups(STUDY_KIND):
            if group["config"].get("study_id") == plan.study_id:
                return group["id"]
        return None

    def create() -> int:
        return store.create_group(STUDY_KIND, plan.config.name,
                                  {"study_id": plan.study_id, "config": plan.config.model_dump(mode="json")})

    return claims.open_group(create, find)


def _costliest_first(plan: StudyPlan, groups: Sequence[GroupPlan]) -> list[GroupPlan]:
    """Longest groups first (steps × trials), so the last group to end starts early."""
    return sorted(groups, key=lambda g: -plan.total_steps(g.batch_size_value) * g.n_trials)


def run_study(
    config: StudyConfig,
    *,
    store: Any = None,
    executor: Any = None,
    vectorized: bool = True,
    prune: bool = True,
    on_progress: Callable[[StudyProgress], None] | None = None,
    lease: float = LEASE_SECONDS,
    allow_import: bool = False,
) -> Study:
    """Run a batch-size study: plan, train group by group (storing each), analyse.

    Args:
        config: the `StudyConfig`.
        store: a `RunStore` or a path. Each group's trials are stored in one transaction as soon as
            the group ends; running the same study again (same config) skips the stored groups,
            so a killed study resumes and ends with the results of an uninterrupted one. Several
            drivers on one store share the work: each group is claimed first (`GroupClaims`).
        executor: where groups run: an executor (`batchlab.study.executors`) or its name,
            ``processes`` (default: one process per core), ``in-process`` or ``ray``.
        vectorized: train a group's replicas in one `fit_replicas` pass (else one `fit` each).
        prune: stop the trials of a learning rate that can no longer be the best at its batch size
            (`batchlab.study.pruning`); the answer is the same, with less work. Off, or with
            ``stop_at_target=False``, every trial trains to its target or its budget.
        on_progress: called after every group with a `StudyProgress`.
        lease: seconds without a heartbeat after which another driver takes a group over.
        allow_import: accept a ``package.module:function`` model: importing it runs its code, in
            this process and in every worker (on the command line: ``--allow-import``).

    Returns:
        A `Study` with ``.summary``, ``.trials``, ``.fit``, ``.recommendation`` and ``.failed``.

    Example:
        >>> study = bl.run_study(bl.StudyConfig(dataset="blobs", batch_sizes=[1, 4, 16, 64, 256, "full"],
        ...                                     seeds=5, target="val_acc>=0.8"), store="batchlab.db")
        >>> print(study.recommendation.text)
    """
    from ..checks import check_argument
    from ..store import RunStore
    from .executors import make_executor

    check_argument("run_study", "config", config, StudyConfig)
    check_import_allowed(config.model, allow_import, "run_study")

    started = time.perf_counter()
    dataset = load_dataset_for(config)
    plan = plan_study(config, dataset, vectorized=vectorized, prune=prune, allow_import=allow_import)
    owns_executor = executor is None or isinstance(executor, str)
    executor = make_executor(executor or "processes") if owns_executor else executor
    owns_store = store is not None and not isinstance(store, RunStore)
    run_store = RunStore(store) if owns_store else store
    try:
        driver = _Driver(plan, dataset, executor, run_store, lease, on_progress, started)
        return driver.run(config)
    finally:
        if owns_executor:
            executor.close()
        if owns_store:
            run_store.close()


class _Driver:
    """One `run_study` call: its claims, what it stored, and the loop plan -> execute -> store."""

    def __init__(self, plan: StudyPlan, dataset, executor, store, lease: float, on_progress, started: float):
        self.plan, self.dataset, self.executor, self.store = plan, dataset, executor, store
        self.on_progress, self.started = on_progress, started
        self.claims = GroupClaims(store, plan.study_id, lease) if store is not None else None
        self.group_id = _open_study_group(store, plan, self.claims) if store is not None else None
        self.summaries: list[dict[str, Any]] = self._stored()
        self.resumed = len({s["group"] for s in self.summaries})
        self.records: list[TrialRecord] = []
        self.failed: dict[str, str] = {}  # group key -> error, this call's failures
        self.groups_run = 0

    def _stored(self) -> list[dict[str, Any]]:
        return _stored_summaries(self.store, self.group_id) if self.store is not None else []

    def run(self, config: StudyConfig) -> Study:
        with self.claims or _no_claims():
            self._progress(None)
            while True:
                pending = [g for g in next_groups(self.plan, trials_table(self.summaries)) if g.key not in self.failed]
                if not pending:
                    break
                ran = self._run_wave(_costliest_first(self.plan, pending))
                self.summaries = self._stored() if self.store is not None else self.summaries
                if not ran:  # every pending group is held by another live driver: wait for its results
                    time.sleep(min(1.0, self.claims.lease / 10) if self.claims else 0)
        return self._finish(config)

    def _claimed(self, groups: Sequence[GroupPlan]):
        """The groups this driver wins, claimed one at a time as the executor asks for the next."""
        for group in groups:
            if self.claims is None or self.claims.claim(group.key):
                yield group

    def _run_wave(self, pending: list[GroupPlan]) -> int:
        ran = 0
        for group, outcome in self.executor.run(train_group, self.plan, self._claimed(pending), self.dataset):
            ran += 1
            if isinstance(outcome, list):
                self._store(group, outcome)
            else:
                self.failed[group.key] = outcome.message
                if self.claims is not None:
                    self.claims.finish(group.key, error=outcome.message)
            self._progress(group)
        return ran

    def _progress(self, group: GroupPlan | None) -> None:
        """Tell the progress display: groups done of a total that is an upper bound and never grows."""
        if self.on_progress is None:
            return
        done = self.resumed + self.groups_run + len(self.failed)
        left = groups_left_at_most(self.plan, trials_table(self.summaries), self.failed)
        self.on_progress(StudyProgress(done, done + left, len(self.summaries), group, time.perf_counter() - self.started))

    def _store(self, group: GroupPlan, records: list[TrialRecord]) -> None:
        for record in records:  # seconds of groups that ran side by side are not comparable timings
            record.summary["seconds_shared"] = bool(self.executor.shares_cores)
        if self.store is not None:
            _store_group(self.store, self.group_id, self.plan, records)
            self.claims.finish(group.key)
        # Read back from the store after each wave; until then the progress bound needs them too.
        self.summaries += [normalized(r.summary) for r in records]
        self.records += records
        self.groups_run += 1

    def _finish(self, config: StudyConfig) -> Study:
        trials = trials_table(self.summaries)
        failed = self.claims.failures() if self.store is not None else dict(self.failed)
        # The adaptive runs are set beside the analysis, never in it: their failures do not block it.
        grid_failed = {k: e for k, e in failed.items() if not k.startswith(f"{ADAPTIVE_GROUP}:")}
        analysis = analyse(trials, str(self.plan.target), grid_failed)
        adaptive = adaptive_row(self.plan, trials)
        if self.store is not None:  # a study with a failed group is not finished: a rerun retries it
            self.store.finish_group(self.group_id, "failed" if failed else "finished", summary={
                "summary": analysis.summary.to_dict(orient="records"), "fit": analysis.fit.as_dict(),
                "recommendation": analysis.recommendation.as_dict(), "failed_groups": failed,
                "adaptive": adaptive.to_dict(orient="records")})
        return Study(config, self.plan, analysis.summary, trials, analysis.fit, analysis.recommendation,
                     Path(self.store.path) if self.store is not None else None, self.group_id, self.groups_run,
                     self.resumed, time.perf_counter() - self.started, self.records, failed, adaptive)


class _no_claims:
    def __enter__(self):
        return None

    def __exit__(self, *exc: object) -> None:
        return None
