"""batchlab: train by mini-batches with exact metrics, and measure how batch size shapes training.

    import batchlab as bl
    ds = bl.load_dataset("mnist1d")
    model = bl.build_model("mlp", ds, hidden=[100, 100], seed=0)
    run = bl.fit(model, ds, bl.TrainConfig(batch_size=32, epochs=20, lr=0.05, momentum=0.9))
    run.steps, run.epochs

Names are imported on first use, so ``import batchlab`` stays fast and does not load torch or
matplotlib. Type checkers read the same names from the ``TYPE_CHECKING`` imports below, with their
real signatures (the package ships ``py.typed``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names as _EXPORTS and _SUBMODULES; a test keeps the three lists equal
    from . import (
        callbacks, config, data, events, explain, gradnorm, loop, metrics, models, optim, plots, probes,
        record, replicas, report, store, study, tracking,
    )
    from .callbacks import Checkpoint, EarlyStopping
    from .critical_batch import LocalCBS
    from .adaptive import AdaptiveBatchSampler
    from .config import Adaptive, DatasetSpec, RunSpec, StudyConfig, TrainConfig
    from .data import Dataset, from_arrays, list_datasets, load_dataset
    from .replicas import fit_replicas
    from .errors import ArgumentError, BatchlabError, ConfigError, DataError, ModelError, StoreError
    from .events import Callback
    from .loop import fit
    from .critical_batch import local_cbs
    from .record import Run
    from .models import build_model, list_models
    from .store import RunStore, TensorBoard, recorder
    from .study import run_study
    from .tracking import track

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "config",
    "Adaptive": "config",
    "AdaptiveBatchSampler": "adaptive",
    "RunSpec": "config",
    "DatasetSpec": "config",
    "StudyConfig": "config",
    "ArgumentError": "errors",
    "BatchlabError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ModelError": "errors",
    "StoreError": "errors",
    "Dataset": "data",
    "load_dataset": "data",
    "from_arrays": "data",
    "list_datasets": "data",
    "build_model": "models",
    "list_models": "models",
    "fit": "loop",
    "local_cbs": "critical_batch",
    "Run": "record",
    "Callback": "events",
    "EarlyStopping": "callbacks",
    "Checkpoint": "callbacks",
    "LocalCBS": "critical_batch",
    "RunStore": "store",
    "recorder": "store",
    "TensorBoard": "store",
    "fit_replicas": "replicas",
    "track": "tracking",
    "run_study": "study",
}
_SUBMODULES = {"plots", "probes", "metrics", "optim", "data", "models", "loop", "store", "report", "explain",
               "gradnorm", "replicas", "record", "tracking", "study", "events", "callbacks", "config"}

# Written out (not computed) so that type checkers know the public names.
__all__ = [
    "Adaptive", "AdaptiveBatchSampler", "ArgumentError", "BatchlabError", "Callback", "Checkpoint", "ConfigError",
    "DataError", "Dataset", "DatasetSpec",
    "EarlyStopping", "LocalCBS", "ModelError", "Run", "RunSpec", "RunStore", "StoreError", "StudyConfig", "TensorBoard",
    "TrainConfig",
    "build_model", "fit", "fit_replicas", "from_arrays", "list_datasets", "list_models", "load_dataset", "local_cbs",
    "recorder", "run_study", "track", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + sorted(_SUBMODULES)
