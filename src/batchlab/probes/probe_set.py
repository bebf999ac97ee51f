"""The probes of one run: the registry of probe names, and `ProbeSet`, which makes them, calls them at
their points, keeps their states, and turns a failing probe into NaN columns and one warning."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError, error_line
from .base import (
    LOSS_SCALE,
    POINTS,
    DeferredRead,
    Point,
    Probe,
    ProbeContext,
    ProbeWarning,
)
from .distances import DistFromInit, UpdateNorm
from .grad_norm import GradNorm
from .noise_scale import NoiseScale, NoiseScaleExact
from .taps import GhostTaps, LinearTaps

PROBES: dict[str, Callable[[], Probe]] = {
    "grad_norm": GradNorm,
    "dist_from_init": DistFromInit,
    "update_norm": UpdateNorm,
    "noise_scale": NoiseScale,
    "noise_scale_exact": NoiseScaleExact,
}


def make_probe(spec: str | Probe) -> Probe:
    """A probe from its name (``batchlab.probes.PROBES``) or a probe object as is."""
    if not isinstance(spec, str):
        return spec
    if spec not in PROBES:
        raise ConfigError(f"unknown probe {spec!r}; choose from {', '.join(sorted(PROBES))}")
    return PROBES[spec]()


def probe_points(probe: Probe, ctx: ProbeContext | None = None) -> tuple[tuple[Point, ...], bool]:
    """Where a probe measures, and whether it takes the ``point=`` keyword (it declares ``points``).

    A probe with ``points`` may narrow them for a run by a ``points_for(ctx)`` method, called
    after its ``init`` (``noise_scale`` needs the live graph only for models it cannot tap).
    """
    points_for = getattr(probe, "points_for", None)
    if points_for is not None and ctx is not None:
        return tuple(points_for(ctx)), True
    points = getattr(probe, "points", None)
    if points is not None:
        return tuple(points), True
    return (probe.point,), False


def probe_columns(probe: Probe) -> tuple[str, ...]:
    """The step-table columns a probe fills: its ``columns`` where it declares them, else its name."""
    return tuple(getattr(probe, "columns", (probe.name,)))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside batchlab and torch (for a warning raised from a
    hook inside the user's forward pass or optimizer step: the line of the user's loop)."""
    batchlab = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inside = (batchlab, os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2  # 1 is the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class ProbeSet:
    """The probes of one run, with their states, called by `train_step` at their points.

    A measurement never stops the training it watches: a probe that raises while it is made or
    measures (a model it cannot handle, a shape it did not expect) is dropped from the run with one
    `ProbeWarning`; its columns are NaN at every measured step from then on, and ``failures`` says
    why (the run's message carries it). Probes that measure together across ranks (``collective``)
    are the exception: their errors propagate, so that no rank waits for one that gave up.
    """

    def __init__(self, probes: Sequence[Probe], ctx: ProbeContext, defer_reads: bool = False):
        self.probes = list(probes)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"probes {names} name one probe twice; give each probe once")
        self.ctx = ctx
        self.failures: dict[str, str] = {}  # probe name -> why it could not measure
        self._unmeasured: dict[str, float] = {}  # NaN for the columns of the probes that failed
        self.states = [self._init(i, probe) for i, probe in enumerate(self.probes)]
        self.pending: dict[str, Any] = {}
        self.names = tuple(names)
        self.active = bool(self.probes)
        # Per point, the probes measuring there: (index, probe, takes point=), precomputed for the hot path.
        self._at: dict[Point, list[tuple[int, Probe, bool]]] = {point: [] for point in POINTS}
        for i, probe in enumerate(self.probes):
            if probe.name in self.failures:
                continue
            points, keyword = self._points(i, probe)
            for point in points:
                if point not in self._at:
                    raise ConfigError(f"probe {probe.name!r} measures at {point!r}; points are {', '.join(POINTS)}")
                self._at[point].append((i, probe, keyword))
        # Only probes measuring at "forward" need per-sample losses; otherwise the loop uses the fused mean.
        self.wants_losses = bool(self._at["forward"])
        for taps in ctx.scratch.values():
            if isinstance(taps, (LinearTaps, GhostTaps)):
                taps.graph_shared = self.wants_losses
                taps.may_defer = defer_reads

    def _init(self, index: int, probe: Probe) -> Any:
        try:
            return probe.init(self.ctx)
        except Exception as error:
            if getattr(probe, "collective", False):
                raise
            self.fail(index, error)
            return None

    def _points(self, index: int, probe: Probe) -> tuple[tuple[Point, ...], bool]:
        try:
            return probe_points(probe, self.ctx)
        except Exception as error:
            if getattr(probe, "collective", False):
                raise
            self.fail(index, error)
            return (), False

    def fail(self, index: int, why: BaseException | str) -> None:
        """Drop probe ``index`` from the run: one warning, NaN in its columns from now on.

        Args:
            index: the probe's place in ``probes``.
            why: the error it raised, or a sentence saying why it cannot measure.
        """
        probe = self.probes[index]
        if probe.name in self.failures:
            return
        reason = why if isinstance(why, str) else error_line(why)
        self.failures[probe.name] = reason
        # New lists, not edited ones: `_measure` may be iterating over the old list of this point.
        self._at = {point: [entry for entry in entries if entry[0] != index]
                    for point, entries in getattr(self, "_at", {}).items()}
        self.wants_losses = bool(self._at.get("forward"))
        self._unmeasured.update(dict.fromkeys(probe_columns(probe), math.nan))
        warnings.warn(f"{probe.name} cannot measure this run ({reason}); its columns are NaN and training goes on",
                      ProbeWarning, stacklevel=_outside_stacklevel())

    @classmethod
    def create(cls, specs, model, dataset, config, loss_fn, state=None, defer_reads: bool = False) -> "ProbeSet":
        """The probe set of a run.

        Args:
            defer_reads: the driver reads many steps' values at once (`take`, then `settle` before
                reading): probes that can may then give a `DeferredRead` for a step, and read it
                with others in `settle`.
        """
        probes = [make_probe(s) for s in specs]
        ctx = ProbeContext(model, tuple(p for p in model.parameters() if p.requires_grad), dataset, config, loss_fn)
        return cls(probes, ctx, defer_reads)

    def _measure(self, point: Point, losses: torch.Tensor | None = None) -> None:
        for i, probe, keyword in self._at[point]:
            try:
                if keyword:
                    self.states[i], values = probe.measure(self.states[i], self.ctx, losses, point=point)
                else:
                    self.states[i], values = probe.measure(self.states[i], self.ctx, losses)
            except Exception as error:  # a measurement never stops the training (see the class)
                if getattr(probe, "collective", False):
                    raise
                self.fail(i, error)
                continue
            self.pending.update(values)

    def after_forward(self, losses: torch.Tensor) -> None:
        self._measure("forward", losses)

    def after_backward(self, loss_scale: float = 1.0) -> None:
        """Measure after the backward pass; ``loss_scale``: what the loss was multiplied by before it
        (an AMP GradScaler's scale), the parameters' gradients already unscaled."""
        self.ctx.scratch[LOSS_SCALE] = loss_scale
        self._measure("backward")

    def after_update(self) -> None:
        self._measure("update")

    def saved_states(self) -> list[Any]:
        """The probes' states as tensors and plain containers, for a checkpoint that
        ``torch.load(weights_only=True)`` reads: a dataclass state becomes the dict of its fields."""
        return [_plain_state(state) for state in self.states]

    def load_saved_states(self, saved: Sequence[Any]) -> None:
        """Continue from `saved_states`; each dataclass state is rebuilt as the type ``init`` gave."""
        if len(saved) != len(self.states):
            raise ConfigError(f"the checkpoint holds {len(saved)} probe states but this run has {len(self.states)} "
                              "probes; resume with the same probes")
        self.states = [type(current)(**state) if dataclasses.is_dataclass(current) and isinstance(state, dict)
                       else state for current, state in zip(self.states, saved)]

    def collect(self) -> dict[str, float]:
        """The values measured this step, as floats (this is where tensors are synchronised); NaN for
        the probes that failed."""
        values = {k: float(v) for k, v in self.pending.items()}
        self.pending.clear()
        if self._unmeasured:
            values.update(self._unmeasured)
        return values

    def take(self) -> dict[str, Any]:
        """The values measured this step as the probes gave them (0-d tensors not read back yet,
        `DeferredRead` entries), for a driver that reads many steps' values at once (`settle`); NaN
        for the probes that failed."""
        values, self.pending = self.pending, {}
        if self._unmeasured:
            values.update(self._unmeasured)
        return values

    def settle(self, steps: Sequence[dict[str, Any]]) -> None:
        """Replace, in place and in step order, each `DeferredRead` among the steps' `take` values
        by the values it stands for, at its place among the columns; the probes' states advance.
        A probe whose reads fail gives NaN for them (and is dropped, as in `_measure`)."""
        for i, probe in enumerate(self.probes):
            deferred = [values for values in steps if isinstance(values.get(probe.name), DeferredRead)]
            if not deferred:
                continue
            try:
                self.states[i], results = probe.settle(self.states[i], self.ctx,
                                                       [values[probe.name] for values in deferred])
            except Exception as error:
                if getattr(probe, "collective", False):
                    raise
                self.fail(i, error)
                results = [dict.fromkeys(probe_columns(probe), math.nan) for _ in deferred]
            for values, result in zip(deferred, results):
                if next(reversed(values)) == probe.name:  # the last column (a run's only probe): no reordering
                    del values[probe.name]
                    values.update(result)
                    continue
                columns = list(values.items())
                at = next(k for k, (name, _) in enumerate(columns) if name == probe.name)
                values.clear()
                values.update(columns[:at])
                values.update(result)
                values.update(columns[at + 1:])


def _plain_state(state: Any) -> Any:
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return state
