"""Probes: measurements of training dynamics taken inside the step.

A probe is an ``init``/``measure`` pair over its own explicit state (optax-style): ``init`` sees the
model before training and returns the state (``dist_from_init`` keeps θ₀ there); ``measure`` gets
the state and the step's context and returns the new state and a dict of values for the step
table. Each probe measures at one point of the step:

- ``"forward"``: the batch's per-sample losses with their graph alive, before the backward pass;
- ``"backward"``: the gradients of the batch's mean loss are in ``p.grad``, weights not yet updated;
- ``"update"``: the optimizer has stepped; weights are θ_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch

from .errors import ConfigError

Point = Literal["forward", "backward", "update"]


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may look at: the live model and its parameters, the data, the config."""

    model: torch.nn.Module
    params: tuple[torch.nn.Parameter, ...]
    dataset: Any
    config: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Probe(Protocol):
    name: str
    point: Point

    def init(self, ctx: ProbeContext) -> Any: ...

    def measure(self, state: Any, ctx: ProbeContext, losses: torch.Tensor | None) -> tuple[Any, dict[str, Any]]: ...


def global_norm(tensors) -> torch.Tensor:
    """‖(t_1, ..., t_n)‖₂ over all elements of all tensors (a 0-d tensor, not synchronised)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


@dataclass(frozen=True)
class GradNorm:
    """``grad_norm``: ‖g_B‖₂, the L2 norm of the gradient of the batch's mean loss over all parameters."""

    name: str = "grad_norm"
    point: Point = "backward"

    def init(self, ctx: ProbeContext) -> None:
        return None

    def measure(self, state, ctx, losses):
        grads = [p.grad for p in ctx.params if p.grad is not None]
        return state, {"grad_norm": global_norm(grads)}


@dataclass(frozen=True)
class DistFromInit:
    """``dist_from_init``: ‖θ_t − θ_0‖₂ over all parameters, θ_0 the weights when training began."""

    name: str = "dist_from_init"
    point: Point = "update"

    def init(self, ctx: ProbeContext) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in ctx.params)

    def measure(self, state, ctx, losses):
        return state, {"dist_from_init": global_norm([p.detach() - p0 for p, p0 in zip(ctx.params, state)])}


@dataclass(frozen=True)
class UpdateNorm:
    """``update_norm``: ‖θ_t − θ_{t−1}‖₂, the size of the step just taken.

    Its state is θ_{t−1}, refreshed at every step; the measurement is exact only when the probe
    measures every step (``probe_every=1``); otherwise it spans the steps since the last one.
    """

    name: str = "update_norm"
    point: Point = "update"

    def init(self, ctx: ProbeContext) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in ctx.params)

    def measure(self, state, ctx, losses):
        norm = global_norm([p.detach() - q for p, q in zip(ctx.params, state)])
        return tuple(p.detach().clone() for p in ctx.params), {"update_norm": norm}


PROBES: dict[str, Callable[[], Probe]] = {
    "grad_norm": GradNorm,
    "dist_from_init": DistFromInit,
    "update_norm": UpdateNorm,
}


def make_probe(spec: str | Probe) -> Probe:
    """A probe from its name (``batchlab.probes.PROBES``) or a probe object as is."""
    if not isinstance(spec, str):
        return spec
    if spec not in PROBES:
        raise ConfigError(f"unknown probe {spec!r}; choose from {', '.join(sorted(PROBES))}")
    return PROBES[spec]()


class ProbeSet:
    """The probes of one run, with their states, called by `train_step` at their points."""

    def __init__(self, probes: Sequence[Probe], ctx: ProbeContext):
        self.probes = list(probes)
        self.ctx = ctx
        self.states = [p.init(ctx) for p in self.probes]
        self.pending: dict[str, Any] = {}
        self.names = tuple(p.name for p in self.probes)
        self.active = bool(self.probes)

    @classmethod
    def create(cls, specs, model, dataset, config, loss_fn, state=None) -> "ProbeSet":
        probes = [make_probe(s) for s in specs]
        ctx = ProbeContext(model, tuple(p for p in model.parameters() if p.requires_grad), dataset, config, loss_fn)
        return cls(probes, ctx)

    def _measure(self, point: Point, losses: torch.Tensor | None = None) -> None:
        for i, probe in enumerate(self.probes):
            if probe.point == point:
                self.states[i], values = probe.measure(self.states[i], self.ctx, losses)
                self.pending.update(values)

    def after_forward(self, losses: torch.Tensor) -> None:
        self._measure("forward", losses)

    def after_backward(self) -> None:
        self._measure("backward")

    def after_update(self) -> None:
        self._measure("update")

    def collect(self) -> dict[str, float]:
        """The values measured this step, as floats (this is where tensors are synchronised)."""
        values = {k: float(v) for k, v in self.pending.items()}
        self.pending.clear()
        return values
