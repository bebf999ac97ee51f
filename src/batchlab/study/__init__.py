"""The batch-size study: which batch size and learning rate, and for how many epochs.

A study trains a grid of batch sizes × learning rates × seeds to a target (``val_acc>=0.8``)
within a budget and measures, for every trial, the steps, epochs, samples and seconds it took
(Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network Training").
Its modules follow the pipeline:

* `plan`: the grid as groups (one batch size with its learning rates × seeds), and what remains
  to run given the trials stored so far (`next_groups`, a pure function of them);
* `trials`: the execution of one group (`train_group`), vectorized replicas or one fit after
  another, each trial watched for its target at the study's evaluation points;
* `executors`: where groups run (in this process, or Ray), given the trial function;
* `analysis`: a pure step from the stored trial summaries to the summary, the fit
  S = S_min (1 + B_crit/B) with its intervals (`scaling`), the regimes and the recommendation
  (`ranking` picks the best lr);
* `run`: `run_study`, which plans, executes, stores group by group, resumes and analyses;
* `presets`: studies that reproduce published setups.

Figures, CSVs and the HTML report of a study are written by `batchlab.report.write_study_outputs`.
"""

from __future__ import annotations

from typing import Any

from .analysis import (Analysis, Recommendation, analyse, mark_regimes, recommend, steps_interval_label, summarize,
                       trials_table, unsupported)
from .scaling import NO_GAIN_EFFICIENCY, PERFECT_EFFICIENCY, ScalingFit, fit_scaling, regime
from .executors import InProcessExecutor, RayExecutor, make_executor, ray_available
from .plan import (
    LR_GROUP,
    NOISE_GROUP,
    GroupPlan,
    StudyPlan,
    evaluation_steps,
    initial_groups,
    load_dataset_for,
    lr_centre_index,
    lr_from_index,
    next_groups,
    plan_study,
    resolve_batch_sizes,
    study_id,
)
from .presets import BROWNLEE_ACCURACY, PRESETS, brownlee_comparison, preset_values
from .ranking import best_lr, lr_table, median_steps
from .run import STUDY_KIND, TRIAL_KIND, Study, StudyProgress, run_study
from .trials import GroupEvaluator, TargetWatcher, TrialRecord, train_group, trial_summary

__all__ = [
    "BROWNLEE_ACCURACY", "LR_GROUP", "NOISE_GROUP", "NO_GAIN_EFFICIENCY", "PERFECT_EFFICIENCY",
    "PRESETS", "STUDY_KIND", "TRIAL_KIND", "Analysis", "GroupEvaluator", "GroupPlan",
    "InProcessExecutor", "RayExecutor", "Recommendation", "ScalingFit", "Study", "StudyPlan", "StudyProgress",
    "TargetWatcher", "TrialRecord", "analyse", "best_lr", "brownlee_comparison", "evaluation_steps",
    "fit_scaling", "initial_groups", "load_dataset_for", "lr_centre_index", "lr_from_index", "lr_table",
    "make_executor", "mark_regimes", "median_steps", "next_groups", "plan_study", "preset_values",
    "ray_available", "recommend", "regime", "resolve_batch_sizes", "run_study", "steps_interval_label", "study_id",
    "summarize", "train_group",
    "trial_summary", "trials_table", "unsupported", "write_study_outputs",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    # The report side (figures, HTML) imports the study, so its writer is reached lazily.
    if name in ("write_study_outputs", "best_lr_runs"):
        from .. import report

        return getattr(report, name)
    raise AttributeError(f"module 'batchlab.study' has no attribute {name!r}")
