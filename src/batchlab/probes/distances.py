"""The ``dist_from_init`` and ``update_norm`` probes: how far the weights have moved, since the start and in a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Point, ProbeContext


@dataclass(frozen=True)
class DistFromInit:
    """``dist_from_init``: ‖θ_t − θ_0‖₂ over all parameters, θ_0 the weights when training began.

    θ_t are the weights after the step's update (the same weights as the step's ``train_*``
    evaluation). The state is θ_0 as one flat (P,) vector taken by ``init``; a measurement is
    two operations, the concatenation of the parameters' flat views and ``torch.dist``.
    """

    name: str = "dist_from_init"
    point: Point = "update"

    def init(self, ctx: ProbeContext) -> torch.Tensor:
        return ctx.flat_params()  # θ_0, (P,)

    def measure(self, state, ctx, losses):
        return state, {"dist_from_init": torch.dist(ctx.flat_params(), state)}


@dataclass(frozen=True)
class UpdateNorm:
    """``update_norm``: ‖θ_t − θ_{t−1}‖₂, the size of the step just taken.

    Exact at every measured step, also with ``probe_every > 1``: the probe copies θ_{t−1} at the
    ``backward`` point (weights not yet updated) into its flat (P,) buffer, concatenating in
    place, and measures the difference at the ``update`` point. For plain SGD without momentum
    or weight decay it equals lr·``grad_norm``.
    """

    name: str = "update_norm"
    points: tuple[Point, ...] = ("backward", "update")

    def init(self, ctx: ProbeContext) -> torch.Tensor:
        return ctx.flat_params()  # the buffer for θ_{t−1}, (P,)

    def measure(self, state, ctx, losses, point: Point = "update"):
        if point == "backward":
            torch.cat(ctx.param_views, out=state)  # the buffer now holds θ_{t−1}, no allocation
            return state, {}
        return state, {"update_norm": torch.dist(ctx.flat_params(), state)}
