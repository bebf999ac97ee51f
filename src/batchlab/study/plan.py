"""Plan: a study's grid as groups, and what remains to run given the trials stored so far.

A *group* is one batch size with some learning rates × seeds, trained together. With
``lrs="auto"`` a batch size whose best learning rate lies at the edge of its grid gets an extra
group with further learning rates; with vectorized replicas and ``noise_scale``, one more group
measures the gradient noise scale at the best lr. What remains to run (`next_groups`) is a pure
function of the results stored so far, so a study killed at any moment and run again continues
where it stopped and ends with the same results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection
from dataclasses import dataclass

import pandas as pd

from ..config import Adaptive, StudyConfig, Target, TrainConfig
from ..data import Dataset
from ..errors import ConfigError
from ..schedule import steps_per_epoch
from .ranking import best_lr, lr_table

LR_GROUP = "lrs"  # a group searching learning rates at one batch size
NOISE_GROUP = "noise"  # one extra trial measuring the gradient noise scale at the best lr
ADAPTIVE_GROUP = "adaptive"  # one seed's run with an adaptive batch size (`batchlab.study.adaptive`)


@dataclass(frozen=True)
class GroupPlan:
    """One unit of work: a batch size with some learning rates × seeds, trained together.

    ``kind`` is ``lrs`` (the learning-rate search), ``noise`` (one trial at the best lr measuring
    the noise scale, where the vectorized replicas cannot) or ``adaptive`` (one seed's run with an
    adaptive batch size; ``batch_size`` is then ``"adaptive"``, ``batch_size_value`` its start and
    ``detail`` its settings). ``round`` 0 is the initial grid, 1, 2, ... its extensions.
    """

    kind: str
    batch_size: int | str
    batch_size_value: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    round: int = 0
    # The best median steps-to-target of earlier rounds at this B: lrs that cannot beat it stop
    # early (`LrPruner`). Derived from stored trials, so not part of the group's identity (key).
    best_before: float = math.inf
    detail: str = ""  # what else tells the group apart (an adaptive run's settings), part of its key

    @property
    def key(self) -> str:
        """A name that identifies the group within its study (stored with each of its trials)."""
        lrs = ",".join(f"{lr:g}" for lr in self.lrs)
        seeds = ",".join(map(str, self.seeds))
        return f"{self.kind}:B={self.batch_size}:lrs={lrs}:seeds={seeds}" + (f":{self.detail}" if self.detail else "")

    @property
    def n_trials(self) -> int:
        return len(self.lrs) * len(self.seeds)


@dataclass(frozen=True)
class StudyPlan:
    """A study's config made concrete for its dataset: batch sizes, budget, evaluation points."""

    config: StudyConfig
    study_id: str
    dataset_name: str
    n_train: int
    batch_sizes: tuple[int | str, ...]
    target: Target
    vectorized: bool = True
    prune: bool = True  # stop lrs that can no longer be the best (the answer is the same either way)
    # The caller's opt-in to a ``package.module:function`` model: every executor builds models with it.
    allow_import: bool = False
    # The adaptive runs' settings, start and max resolved from the grid (`batchlab.study.adaptive`); None: none.
    adaptive: Adaptive | None = None

    def build_model(self, dataset: Dataset, seed: int):
        """The study's model for ``dataset``, initialised with ``seed`` (`batchlab.models.model_from_spec`)."""
        from ..models import model_from_spec

        return model_from_spec(self.config.model, dataset, seed=seed, allow_import=self.allow_import)

    def value_of(self, batch_size: int | str) -> int:
        return self.n_train if batch_size == "full" else int(batch_size)

    def train_config(self, batch_size: int | str, lr: float, seed: int) -> TrainConfig:
        """The trial's TrainConfig: the study's ``train`` table with B, lr, seed and budget."""
        return self.config.train.replace(batch_size=batch_size, lr=lr, seed=seed, epochs=self.config.epochs,
                                         max_steps=self.config.max_steps, eval_every="epoch", lr_scaling="none")

    def total_steps(self, batch_size: int | str) -> int:
        """The budget in steps at this batch size (epochs and max_steps, whichever ends first)."""
        per_epoch = steps_per_epoch(self.n_train, self.value_of(batch_size), self.config.train.drop_last)
        budget = [self.config.epochs * per_epoch] if self.config.epochs else []
        if self.config.max_steps:
            budget.append(self.config.max_steps)
        return min(budget)


def study_id(config: StudyConfig) -> str:
    """The study's identity: a hash of everything in its config that can change its results."""
    # ``train.compile`` changes how fast, not what, a run computes: a study keeps its identity. The
    # adaptive runs change no trial of the grid (their group keys name their settings), so adding
    # them to a stored study trains them alone.
    canonical = json.dumps(config.model_dump(mode="json", exclude={"name": True, "adaptive": True, "train": {"compile"}}),
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resolve_batch_sizes(config: StudyConfig, n_train: int) -> tuple[int | str, ...]:
    """The study's batch sizes, smallest first: the given ones, or powers of two below N and ``full``.

    Raises:
        ConfigError: a batch size larger than the training set.
    """
    if config.batch_sizes is None:
        sizes: list[int | str] = [2**k for k in range(int(math.log2(n_train)) + 1) if 2**k < n_train]
        return (*sizes, "full")
    too_big = [b for b in config.batch_sizes if b != "full" and b > n_train]
    if too_big:
        raise ConfigError(f"batch size {too_big[0]} is larger than the training set ({n_train} samples); "
                          f"use batch sizes <= {n_train}, or 'full'")
    unique: dict[int, int | str] = {}
    for b in config.batch_sizes:
        unique.setdefault(n_train if b == "full" else int(b), b)  # B = N given twice: keep the first
    return tuple(unique[v] for v in sorted(unique))


def lr_from_index(config: StudyConfig, index: int) -> float:
    """The auto grid's learning rates lie on one lattice: reference_lr × factor^index (6 digits)."""
    return float(f"{config.reference_lr * config.lr_grid_factor ** index:.6g}")


def lr_centre_index(config: StudyConfig, batch_size_value: int) -> int:
    """The lattice index nearest the scaling rule's lr at B: linear (Goyal et al. 2017), sqrt (Hoffer et al. 2017)."""
    ratio = batch_size_value / config.reference_batch_size
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[config.lr_rule]
    return round(math.log(scale) / math.log(config.lr_grid_factor))


def _index_of(config: StudyConfig, lr: float) -> int:
    return round(math.log(lr / config.reference_lr) / math.log(config.lr_grid_factor))


def initial_groups(plan: StudyPlan) -> list[GroupPlan]:
    """Round 0: every batch size with its learning-rate grid and all seeds."""
    config, groups = plan.config, []
    for batch_size in plan.batch_sizes:
        value = plan.value_of(batch_size)
        if config.lrs == "auto":
            centre, n = lr_centre_index(config, value), config.lr_grid_size
            lrs = tuple(lr_from_index(config, k) for k in range(centre - (n - 1) // 2, centre + n // 2 + 1))
        else:
            lrs = tuple(sorted(config.lrs))
        groups.append(GroupPlan(LR_GROUP, batch_size, value, lrs, config.seed_list))
    return groups


def evaluation_steps(total_steps: int, resolution: float = 0.05) -> tuple[int, ...]:
    """Steps at which to evaluate so that steps-to-target is known to within ``resolution`` of itself.

    If the target first holds at step S* and the first evaluation at or after it is t_k (the
    previous one t_{k-1} < S*), the error t_k − S* is at most t_k − t_{k−1} − 1. Choosing
    t_k = max(t_{k−1} + 1, floor((t_{k−1} + 1)/(1 − r))) keeps it ≤ r·t_k: every step while steps
    are few (the first ~1/r steps), then geometrically spaced, ~ln(S)/r evaluations in all.

    Returns:
        Increasing steps from 1, the last one ``total_steps``.
    """
    steps, t = [], 1
    while t < total_steps:
        steps.append(t)
        t = max(t + 1, math.floor((t + 1) / (1 - resolution)))
    steps.append(total_steps)
    return tuple(steps)


def next_groups(plan: StudyPlan, trials: pd.DataFrame) -> list[GroupPlan]:
    """The groups still to run, given the trials stored so far: a pure function of them.

    Round 0 groups not yet run; for every batch size whose learning-rate search is complete, an
    extension when its best lr lies at the edge of the lrs tried (``lrs="auto"``, at most
    ``lr_extensions`` times), then, with vectorized replicas and ``noise_scale``, its noise group;
    with ``adaptive``, one adaptive run per seed once the lr at its start is known
    (`batchlab.study.adaptive.adaptive_groups`).
    """
    from .adaptive import adaptive_groups

    done = set(trials["group"]) if not trials.empty else set()
    pending = [g for g in initial_groups(plan) if g.key not in done]
    started = {g.batch_size for g in pending}
    for batch_size in plan.batch_sizes:
        if batch_size in started:
            continue
        at_b = trials[(trials["batch_size"] == batch_size) & (trials["kind"] == LR_GROUP)]
        extension = _extension(plan, batch_size, at_b)
        if extension is not None:
            if extension.key not in done:
                pending.append(extension)
            continue
        noise = _noise_group(plan, batch_size, at_b)
        if noise is not None and noise.key not in done:
            pending.append(noise)
    return pending + adaptive_groups(plan, trials, pending, done)


def groups_left_at_most(plan: StudyPlan, trials: pd.DataFrame, skipped: Collection[str] = ()) -> int:
    """At most how many groups remain to run, given the trials stored so far.

    Per batch size: its pending lr group of round r may still be followed by every extension up
    to ``lr_extensions`` and a noise group; a pending noise group is the last; a batch size whose
    pending group is ``skipped`` (it failed in this run) gets nothing more. Each group stored
    lowers the bound by at least one, so groups done + this bound never grows: a progress total
    known from the start that only ever shrinks towards the truth. The adaptive runs count one per
    seed not yet stored (`batchlab.study.adaptive.runs_left`), before they can be planned too.
    """
    from ..probes import PROBES
    from .adaptive import runs_left

    extensions = plan.config.lr_extensions if plan.config.lrs == "auto" else 0
    noise_on = plan.vectorized and plan.config.noise_scale and "noise_scale" in PROBES
    left = 0
    for group in next_groups(plan, trials):
        if group.key in skipped or group.kind == ADAPTIVE_GROUP:
            continue
        if group.kind == NOISE_GROUP:
            left += 1
        else:
            left += extensions - group.round + 1 + int(noise_on and group.batch_size_value >= 2)
    return left + runs_left(plan, trials, skipped)


def _extension(plan: StudyPlan, batch_size: int | str, trials: pd.DataFrame) -> GroupPlan | None:
    """The next learning rates to try at this B when its best lies at the edge of those tried."""
    config = plan.config
    if config.lrs != "auto" or trials.empty:
        return None
    rounds = int(trials["round"].max())
    lrs = sorted(set(trials["lr"]))
    table = lr_table(trials)
    if rounds >= config.lr_extensions:
        return None
    best = best_lr(table)
    top, bottom = lrs[-1], lrs[0]
    top_row, bottom_row = table.loc[table["lr"] == top].iloc[0], table.loc[table["lr"] == bottom].iloc[0]
    if best is not None:
        direction = +1 if best == top else -1 if best == bottom else 0
    elif table["diverged"].sum() > 0:  # nothing reached and some lrs diverge: the lrs are too large
        direction = -1 if bottom_row["reached"] == 0 else 0
    else:  # nothing reached, nothing diverged: the lrs are too small for the budget
        direction = +1 if top_row["reached"] == 0 else 0
    if direction == 0:
        return None
    n = max(1, config.lr_grid_size // 2)
    edge = _index_of(config, top if direction > 0 else bottom)
    new = tuple(sorted(lr_from_index(config, edge + direction * k) for k in range(1, n + 1)))
    best_before = float(table["median_steps"].min())
    return GroupPlan(LR_GROUP, batch_size, plan.value_of(batch_size), new, config.seed_list, rounds + 1, best_before)


def _noise_group(plan: StudyPlan, batch_size: int | str, trials: pd.DataFrame) -> GroupPlan | None:
    """One trial at the best lr (first seed) that measures noise_scale, where replicas cannot."""
    from ..probes import PROBES

    if not (plan.vectorized and plan.config.noise_scale and "noise_scale" in PROBES) or trials.empty:
        return None
    if plan.value_of(batch_size) < 2:  # a batch of one sample has no spread to measure
        return None
    best = best_lr(lr_table(trials))
    if best is None:
        return None
    return GroupPlan(NOISE_GROUP, batch_size, plan.value_of(batch_size), (best,), plan.config.seed_list[:1])


def plan_study(config: StudyConfig, dataset: Dataset, *, vectorized: bool = True, prune: bool = True,
               allow_import: bool = False) -> StudyPlan:
    """Check the study against its data and model before any training, and make it concrete.

    Args:
        allow_import: accept a ``package.module:function`` model (importing it runs its code).

    Raises:
        ConfigError, ModelError: a batch size larger than the data, a target metric the dataset
            cannot give, a model that does not fit the data.
    """
    from ..loop import check_model, plan_run
    from .adaptive import resolve_adaptive
    from .adaptive import train_config as adaptive_config

    target = config.parsed_target
    split = target.metric.split("_")[0]
    if split == "val" and dataset.val is None or split == "test" and dataset.test is None:
        raise ConfigError(f"target {target} needs a {split} split but dataset {dataset.name!r} has none; "
                          "use a train_* target or give the dataset a validation split (val_fraction)")
    if target.metric.endswith("_acc") and dataset.n_classes is None:
        raise ConfigError(f"target {target} needs accuracy but {dataset.name!r} is a regression dataset; use a *_loss target")
    if split == "train" and not config.train.eval_train:
        raise ConfigError(f"target {target} needs train metrics; remove eval_train=false from the train table")
    batch_sizes = resolve_batch_sizes(config, dataset.n_train)
    adaptive = resolve_adaptive(config, [dataset.n_train if b == "full" else int(b) for b in batch_sizes],
                                dataset.n_train)
    plan = StudyPlan(config, study_id(config), dataset.name, dataset.n_train, batch_sizes, target, vectorized, prune,
                     allow_import, adaptive)
    for batch_size in (batch_sizes[0], batch_sizes[-1]):
        plan_run(dataset, plan.train_config(batch_size, config.reference_lr, 0))
    if adaptive is not None:
        plan_run(dataset, adaptive_config(plan, config.reference_lr, 0))
    check_model(plan.build_model(dataset, 0).to(dataset.device), dataset)
    return plan


def load_dataset_for(config: StudyConfig, device: str | None = None) -> Dataset:
    """The study's dataset, as its ``[dataset]`` table describes it, on the train table's device."""
    from ..data import load_dataset
    from ..loop import resolve_device

    d = config.dataset
    return load_dataset(d.name, target=d.target, val_fraction=d.val_fraction, split_seed=d.split_seed,
                        standardize=d.standardize, device=resolve_device(device or config.train.device))
