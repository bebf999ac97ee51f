"""batchlab: train by mini-batches with exact metrics, and measure how batch size shapes training.

    import batchlab as bl
    ds = bl.load_dataset("mnist1d")
    model = bl.build_model("mlp", ds, hidden=[100, 100], seed=0)
    run = bl.fit(model, ds, bl.TrainConfig(batch_size=32, epochs=20, lr=0.05, momentum=0.9))
    run.steps, run.epochs

Names are imported on first use, so ``import batchlab`` stays fast and does not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "config",
    "RunSpec": "config",
    "DatasetSpec": "config",
    "StudyConfig": "config",
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
    "Run": "loop",
    "Callback": "events",
    "EarlyStopping": "callbacks",
    "Checkpoint": "callbacks",
    "RunStore": "store",
    "recorder": "store",
    "TensorBoard": "store",
    "fit_replicas": "replicas",
    "track": "tracking",
    "run_study": "study",
}
_SUBMODULES = {"plots", "probes", "metrics", "optim", "data", "models", "loop", "store", "report", "explain",
               "gradnorm", "ensemble", "replicas", "record", "tracking", "study", "events", "callbacks", "config"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + sorted(_SUBMODULES)
