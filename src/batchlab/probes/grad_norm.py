"""The ``grad_norm`` probe: the norm of the batch gradient."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Point, ProbeContext
from .norms import global_norm


@dataclass(frozen=True)
class GradNorm:
    """``grad_norm``: ‖g_B‖₂, the L2 norm of the gradient of the batch's mean loss over all parameters.

    Measured at the ``backward`` point from ``p.grad`` (parameters without a gradient count as 0),
    before any clipping or weight decay the optimizer applies.
    """

    name: str = "grad_norm"
    point: Point = "backward"

    def init(self, ctx: ProbeContext) -> None:
        return None

    def measure(self, state, ctx, losses):
        return state, {"grad_norm": global_norm([p.grad for p in ctx.params if p.grad is not None])}
