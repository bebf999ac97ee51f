"""Presets: studies that reproduce published setups, and the published numbers to compare with."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import ConfigError
from .plan import LR_GROUP

if TYPE_CHECKING:
    from .run import Study

# Brownlee, "How to Control the Stability of Training Neural Networks With the Batch Size" (2020):
# final (train, test) accuracy after 200 epochs of SGD lr 0.01 momentum 0.9 on blobs; his test
# set is the last 500 samples, which is blobs' validation split here.
BROWNLEE_ACCURACY = {"full": (0.816, 0.830), 1: (0.612, 0.606), 32: (0.832, 0.812)}

PRESETS: dict[str, dict[str, Any]] = {
    "blobs-batch-size": {
        "name": "blobs-batch-size (Brownlee 2020)",
        "dataset": "blobs", "model": "mlp:hidden=50,init=keras", "batch_sizes": ["full", 1, 32], "lrs": [0.01],
        "seeds": 5, "target": "val_acc>=0.8", "epochs": 200, "max_steps": None, "stop_at_target": False,
        "train": {"optimizer": "sgd", "momentum": 0.9},
    },
    "mnist1d": {
        "name": "mnist1d steps-to-target",
        "dataset": "mnist1d", "model": "mlp", "batch_sizes": [8, 16, 32, 64, 128, 256, 512, 1024, 2048],
        "lrs": "auto", "lr_rule": "sqrt", "reference_lr": 0.1, "reference_batch_size": 64, "lr_grid_size": 5,
        "seeds": 3, "target": "val_acc>=0.5", "max_steps": 2500, "train": {"optimizer": "sgd", "momentum": 0.9},
    },
}  # fmt: skip


def preset_values(name: str) -> dict[str, Any]:
    """A preset's StudyConfig values (flags and a config file may override them)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))  # a deep copy


def brownlee_comparison(study: Study) -> pd.DataFrame:
    """Our final train/val accuracy beside Brownlee's published numbers.

    Returns:
        One row per batch size of his post: ``train_acc``/``val_acc`` (median over seeds) with
        their range over seeds (``*_lo``, ``*_hi``), ``seeds``, and his ``brownlee_train_acc``,
        ``brownlee_test_acc``.
    """
    trials = study.trials[study.trials["kind"] == LR_GROUP]
    rows = []
    for batch_size, (train, test) in BROWNLEE_ACCURACY.items():
        ours = trials[trials["batch_size"].astype(str) == str(batch_size)]
        if ours.empty:
            continue
        row: dict[str, Any] = {"batch_size": batch_size, "seeds": len(ours)}
        for name, column in (("train_acc", "final_train_acc"), ("val_acc", "final_val_acc")):
            row[name] = float(ours[column].median())
            row[f"{name}_lo"], row[f"{name}_hi"] = float(ours[column].min()), float(ours[column].max())
        rows.append({**row, "brownlee_train_acc": train, "brownlee_test_acc": test})
    return pd.DataFrame(rows)
