"""The noise scale of a data-parallel run, from each rank's local gradient against the all-reduced one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from .base import Point, ProbeContext
from .estimators import (
    NoiseState,
    advance,
    noise_columns,
    population_size,
    two_batch_estimates,
    unmeasured,
)
from .norms import gradients_or_zeros, squared_norm


class RankGradients:
    """Each rank's squared local gradient norm, read off DDP's all-reduce by a communication hook.

    Under ``DistributedDataParallel`` a rank's backward pass hands its local gradients to DDP bucket
    by bucket; `hook` (registered with ``ddp_model.register_comm_hook(rank_gradients, RankGradients.hook)``)
    adds each bucket's squared norm before the bucket is averaged across ranks, so ‖local gradient‖²
    costs one norm per bucket and no extra backward pass. The loop `arm`s it for measured steps
    with the rank's and the global batch size.
    """

    def __init__(self, group: Any = None):
        self.group = group  # the process group of the all-reduce (None: the default group)
        self.armed = False
        self.local_size = 0  # b_r, this rank's samples in the step
        self.global_size = 0  # B, the global batch
        self.squares: list[torch.Tensor] = []  # one 0-d float64 per bucket

    def arm(self, local_size: int, global_size: int) -> None:
        """The next backward pass is measured: rank batch ``local_size`` of a global ``global_size``."""
        self.armed, self.local_size, self.global_size, self.squares = True, local_size, global_size, []

    def take(self) -> torch.Tensor | None:
        """Σ over buckets of the local gradient's squared norm (0-d float64), and disarm."""
        squares, self.squares, self.armed = self.squares, [], False
        return torch.stack(squares).sum() if squares else None

    @staticmethod
    def hook(state, bucket):  # unannotated: DDP checks a hook's annotations against its own types
        """DDP communication hook: note the bucket's squared norm, then the ordinary averaging all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if state.armed:
            state.squares.append(squared_norm([bucket.buffer()]))  # before the all-reduce averages it
        return default_hooks.allreduce_hook(state.group, bucket)


@dataclass(frozen=True)
class RankNoiseScale:
    """``noise_scale`` in a data-parallel run: from the ranks' local gradients against the all-reduced one.

    McCandlish et al. 2018, App. A.1, with B_small = b_r (rank r's share of the global batch) and
    B_big = B (the global batch): each rank's local gradient g_r (the gradient of its samples' mean
    loss, from `RankGradients`) and the all-reduced g_B (``p.grad`` after backward) give

        tr(Σ) ≈ (‖g_r‖² − ‖g_B‖²) / (1/b_r − 1/B),   ‖G‖² ≈ (B‖g_B‖² − b_r‖g_r‖²) / (B − b_r),

    and the ranks' estimates are averaged (`two_batch_estimates`, finite-population correction
    included): one all-reduce of three scalars, no extra backward pass. The loop scales each
    rank's loss by N·(its summed loss)/B so that DDP's average is g_B; its local gradient is then
    (N b_r/B) g_r. A rank without samples in a step (a last batch smaller than the world) gives
    no estimate. Columns as `NoiseScale`'s; NaN with one rank (B_small = B_big).

    Args:
        beta: the moving averages' decay.
        gradients: the `RankGradients` whose hook is registered on the run's DDP model.
    """

    name: str = "noise_scale"
    point: Point = "backward"
    beta: float = 0.99
    gradients: RankGradients | None = field(default=None, compare=False, repr=False)
    # Every rank measures together (an all-reduce): a failure on one rank must fail the run on all,
    # not leave the others waiting in the collective.
    collective = True

    @property
    def columns(self) -> tuple[str, ...]:
        return noise_columns("")

    def init(self, ctx: ProbeContext) -> NoiseState:
        if self.gradients is None:
            raise ConfigError("the noise scale from ranks needs a data-parallel run (batchlab.distributed)")
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses):
        import torch.distributed as dist

        ranks = self.gradients
        b, big, world = ranks.local_size, ranks.global_size, dist.get_world_size(ranks.group)
        local_sq = ranks.take()
        big_sq = squared_norm(gradients_or_zeros(ctx.params))  # ‖g_B‖², the same on every rank
        # (trace_cov, grad_sq without the N-correction, 1) from this rank, or zeros: summed over ranks.
        share = torch.zeros(3, dtype=torch.float64, device=big_sq.device)
        if local_sq is not None and 0 < b < big:
            small_sq = local_sq * (big / (world * b)) ** 2  # ‖g_r‖²: the local gradient was (N b_r/B) g_r
            grad_sq, trace_cov = two_batch_estimates([small_sq], [b], big_sq, big, math.inf)
            share = torch.stack([trace_cov, grad_sq, torch.ones((), dtype=torch.float64, device=big_sq.device)])
        dist.all_reduce(share, group=ranks.group)
        trace_sum, grad_sq_sum, count = share.tolist()
        if count == 0:
            return state, unmeasured("")
        trace_cov = trace_sum / count
        grad_sq = grad_sq_sum / count + trace_cov / population_size(ctx)
        return advance(state, grad_sq, trace_cov, self.beta, "")
