"""The store's recorder: a callback that writes the run it watches, one transaction per epoch."""

from __future__ import annotations

import os
import platform
import socket
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..events import Callback, EpochEnd, Request, RunEnd, RunStart
from .codec import NotANumber, encode_row, number
from .db import RunStore

if TYPE_CHECKING:
    import torch


_CLOCK_FIELDS = ("n_train", "batch_size", "steps_per_epoch", "total_steps", "epochs")


class RunRecorder(Callback):
    """A callback that records a training run into a store, one transaction per epoch.

    Made by `recorder`. ``run_id`` is set when the run starts. Rows the store cannot hold (a
    missing key, a value that is not a number) are left out with a warning rather than stopping
    training; errors of the store itself (disk full, locked) propagate as `StoreError`.
    """

    def __init__(
        self,
        store: RunStore | str | Path,
        *,
        name: str | None = None,
        kind: str = "fit",
        spec: Mapping[str, Any] | None = None,
        group_id: int | None = None,
        provenance: Mapping[str, Any] | None = None,
    ):
        self._owns_store = not isinstance(store, RunStore)
        self._store_arg = store
        self.store: RunStore | None = store if isinstance(store, RunStore) else None
        self.name, self.kind, self.group_id = name, kind, group_id
        self.spec = dict(spec or {})
        self.extra_provenance = dict(provenance or {})
        self.run_id: int | None = None

    def on_run_start(self, event: RunStart) -> Request:
        if self.store is None:
            self.store = RunStore(self._store_arg)
        config = event.config.model_dump(mode="json")
        spec = {
            "dataset": event.dataset,
            "model": type(event.model).__name__,
            "probes": list(event.probes),
            "n_parameters": sum(p.numel() for p in event.model.parameters()),
            "clock": {k: getattr(event.clock, k) for k in _CLOCK_FIELDS},
            **self.spec,
        }
        provenance = {**collect_provenance(config, event.model), **self.extra_provenance}
        self.run_id = self.store.begin_run(
            name=self.name, kind=self.kind, config=config, spec=spec, provenance=provenance, group_id=self.group_id
        )
        return None

    def on_epoch_end(self, event: EpochEnd) -> Request:
        self._append(event.steps, event.evals, (event.row,))
        return None

    def on_run_end(self, event: RunEnd) -> Request:
        if self.run_id is None or self.store is None:
            return None
        self._append(event.steps, event.evals, ())
        self.store.finish_run(self.run_id, event.status, summary=dict(event.summary), message=event.message)
        if self._owns_store:
            self.store.close()
            self.store = None
        return None

    def _append(self, steps, evals, epochs) -> None:
        if self.run_id is None or self.store is None:
            return
        self.store.append_rows(
            self.run_id,
            steps=_usable_rows(steps, "step", "steps"),
            evals=_usable_rows(evals, "step", "evals"),
            epochs=_usable_rows(epochs, "epoch", "epochs"),
        )


def recorder(
    store: RunStore | str | Path,
    *,
    name: str | None = None,
    kind: str = "fit",
    spec: Mapping[str, Any] | None = None,
    group_id: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> RunRecorder:
    """A callback that records the run it watches into ``store``.

    Args:
        store: an open `RunStore`, or a path (opened at run start, closed at run end).
        name: the run's name, shown by ``batchlab runs list``.
        kind: ``fit``, ``explain``, ``replica``, ``study-trial``, ...
        spec: what the run was given (dataset, model and its options, probes); it overrides the
            dataset name, model class name and probes taken from the `RunStart` event.
        group_id: the group (from `RunStore.create_group`) the run belongs to.
        provenance: entries to add to the automatic provenance (`collect_provenance`).

    Example::

        rec = recorder(RunStore("batchlab.db"), name="baseline", spec={"model": "mlp"})
        fit(model, ds, cfg, callbacks=[rec]); print(rec.run_id)
    """
    return RunRecorder(store, name=name, kind=kind, spec=spec, group_id=group_id, provenance=provenance)


def collect_provenance(config: Mapping[str, Any] | None = None, model: "torch.nn.Module | None" = None) -> dict[str, Any]:
    """Where and with what a run was made: versions, host, process, device, seed and command line."""
    import torch

    from .. import __version__

    device = (config or {}).get("device")
    if model is not None:
        first = next(iter(model.parameters()), None)
        device = str(first.device) if first is not None else device
    info = {
        "batchlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "device": device,
        "seed": (config or {}).get("seed"),
    }
    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _usable_rows(rows: Iterable[Mapping[str, Any]], key: str, table: str) -> list[dict[str, Any]]:
    """The rows the store can hold: bad values are dropped, rows without a key are skipped."""
    usable = []
    for row in rows:
        clean = {}
        for name, value in dict(row).items():
            try:
                clean[name] = number(name, value)
            except NotANumber as error:
                warnings.warn(f"not recorded in {table}: {error}", RuntimeWarning, stacklevel=3)
        try:
            encode_row(clean, key)
        except (TypeError, ValueError) as error:
            warnings.warn(f"a row of {table} was not recorded: {error}", RuntimeWarning, stacklevel=3)
            continue
        usable.append(clean)
    return usable

