"""The ``noise_scale`` and ``noise_scale_exact`` probes: B_simple = tr(Σ)/‖G‖² while training."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import LOSS_SCALE, DeferredRead, Point, ProbeContext
from .estimators import (
    NoiseState,
    advance,
    advance_all,
    estimates_from_norms,
    noise_columns,
    part_sizes,
    per_sample_estimates,
    population_size,
    two_batch_estimates,
    unmeasured,
)
from .norms import global_norm, gradients_or_zeros
from .taps import GhostTaps, LinearTaps, noise_taps

# A step measured with deferred reads keeps its (2L, B) per-sample terms (`LinearTaps.take_terms`)
# until the driver reads (every 64 steps in `bl.track`): kept when they hold at most this many
# numbers (64 steps of them then hold at most 64 MiB in float32); larger runs read each step's
# number as it comes.
DEFER_TERMS_NUMEL = 1 << 18


@dataclass(frozen=True)
class NoiseScale:
    """``noise_scale``: B_simple = tr(Σ)/‖G‖², the simple gradient noise scale (McCandlish et al. 2018).

    "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), §2.2 and App. A.1. G is the
    gradient of the mean loss over the N training samples and Σ the covariance of the per-sample
    gradients, normalised by 1/(N−1) (see `two_batch_estimates` for why that normalisation makes
    the estimators exact for batches drawn without replacement).

    The estimate uses two batch sizes from one step with no extra forward pass, by one of two
    methods, both unbiased for the same ‖G‖² and tr(Σ):

    - ``"per_sample"`` (b = 1), for models whose every trained parameter belongs to a layer whose
      per-sample gradient norm can be read off the loop's own backward pass, with no extra backward
      pass: nn.Linear stacks (`LinearTaps`, Goodfellow 2015: three ops a step), and nn.Linear on
      any shape, nn.Conv1d/2d/3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm and nn.RMSNorm in any
      nesting (`GhostTaps`, ghost norms, Li et al. 2022). With the B samples as B parts of size 1,
      `two_batch_estimates` is then exactly the per-sample estimator of `per_sample_estimates`.
    - ``"parts"`` (b = B/parts), for any model: at the ``forward`` point the batch's per-sample
      losses still hold their graph, and the gradients of the first ``parts − 1`` parts' mean
      losses come from ``torch.autograd.grad(..., retain_graph=True)``; at the ``backward``
      point the loop's full-batch gradient g_B is in ``p.grad`` and the last part's gradient
      follows from it, since g_B = Σ_k (b_k/B) g_k. Cost: ``parts − 1`` extra backward passes.

    ``method="auto"`` (the default) takes ``"per_sample"`` where the model allows it and
    ``"parts"`` otherwise (batch norm, which mixes a batch's samples; another layer kind; a
    parameter used directly in a forward; `untapped` names them). A layer that runs twice for one
    loss is seen at its first measured step, and the probe then stops measuring the run (NaN, one
    warning). Each raw estimate is folded into
    an exponential moving average (β, with bias correction, as gpt-neox does) and the ratio is
    taken of the averages.

    Step-table columns: ``grad_sq``, ``trace_cov``, ``noise_scale`` (smoothed) and
    ``grad_sq_raw``, ``trace_cov_raw`` (this step's unbiased estimates). Batches of one sample
    give NaN. The estimate is unbiased when each part of a batch is a uniformly random subset of
    the training set (``shuffle=True``).

    Args:
        beta: the moving averages' decay.
        parts: how many parts the batch is split into (≥ 2) by the ``"parts"`` method; the small
            batch size is B/parts.
        method: ``"auto"`` or ``"parts"`` (always the general method).
    """

    name: str = "noise_scale"
    points: tuple[Point, ...] = ("forward", "backward")
    beta: float = 0.99
    parts: int = 2
    method: Literal["auto", "parts"] = "auto"

    @property
    def columns(self) -> tuple[str, ...]:
        return noise_columns("")

    def __post_init__(self) -> None:
        if self.method not in ("auto", "parts"):
            raise ConfigError(f"noise_scale method must be 'auto' or 'parts', got {self.method!r}")
        if self.parts < 2:
            raise ConfigError(f"noise_scale needs parts >= 2 to have two batch sizes, got {self.parts}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"noise_scale beta must be in [0, 1), got {self.beta}")

    def init(self, ctx: ProbeContext) -> NoiseState:
        key = f"linear_taps:{self.name}"
        if self.method == "auto" and key not in ctx.scratch:
            # Hooks are per run (the context), never state: a checkpoint holds only the averages.
            ctx.scratch[key], ctx.scratch[f"untapped:{self.name}"] = noise_taps(ctx)
        return NoiseState()

    def points_for(self, ctx: ProbeContext) -> tuple[Point, ...]:
        """Where this run measures. With the taps and every step measured: only after backward
        (the loop then keeps its fused mean loss, and the hooks keep every step's output
        gradients); with the taps and ``probe_every > 1``: after forward too, to keep the output
        gradients of measured steps only; without the taps: at the live graph, for its parts."""
        taps = self._taps(ctx)
        if taps is not None and getattr(ctx.config, "probe_every", 1) == 1:
            return ("backward",)
        if taps is not None:
            taps.every_step = False
        return self.points

    def measure(self, state: NoiseState, ctx: ProbeContext, losses, point: Point = "backward"):
        taps = self._taps(ctx)
        if point == "forward":
            if taps is not None:
                taps.arm()
                return state, {}
            return NoiseState(state.grad_sq_avg, state.trace_cov_avg, state.count, self._part_gradients(ctx, losses)), {}
        if taps is not None:
            return self._per_sample(state, ctx, taps)
        pending, state = state.pending, NoiseState(state.grad_sq_avg, state.trace_cov_avg, state.count)
        if pending is None:  # a batch too small to split
            return state, unmeasured("")
        sizes, parts = pending  # parts: the first K−1 parts' gradients of their summed losses, b_k g_k
        batch = sum(sizes)
        full = gradients_or_zeros(ctx.params)  # g_B, the gradient of the batch's mean loss
        # The last part's summed-loss gradient: b_K g_K = B g_B − Σ_{k<K} b_k g_k.
        last = torch._foreach_mul(full, float(batch))
        for part in parts:
            torch._foreach_sub_(last, part)
        # Every squared norm in one fused call and one read: ‖g_B‖², ‖b_k g_k‖² for k = 1..K.
        groups = [full, *parts, last]
        norms = torch.stack(torch._foreach_norm([t for group in groups for t in group])).double()
        squares = norms.square().view(len(groups), len(full)).sum(dim=1).tolist()
        big_sq = squares[0]
        small_sq = [sq / size**2 for sq, size in zip(squares[1:], sizes)]
        grad_sq, trace_cov = two_batch_estimates(small_sq, sizes, big_sq, batch, population_size(ctx))
        return advance(state, grad_sq, trace_cov, self.beta, "")

    def _taps(self, ctx: ProbeContext) -> LinearTaps | GhostTaps | None:
        return ctx.scratch.get(f"linear_taps:{self.name}") if self.method == "auto" else None

    def untapped(self, ctx: ProbeContext) -> str:
        """Why this run has no per-sample taps (the parameters no measured layer kind covers); ""
        when it has them or was not made."""
        return ctx.scratch.get(f"untapped:{self.name}", "")

    def _per_sample(self, state: NoiseState, ctx: ProbeContext, taps: LinearTaps | GhostTaps):
        """The estimates from Σ_i ‖g_i‖² (the taps) and ‖g_B‖² (``p.grad``): B parts of one sample."""
        terms = taps.take_terms()
        if terms is None or terms.shape[-1] < 2:  # no training forward pass tapped; one sample has no spread
            return state, unmeasured("")
        batch = terms.shape[-1]
        grads = [p.grad for p in ctx.params if p.grad is not None]
        if taps.defer_reads is None:  # decided at the first step: whether 64 steps' terms stay small
            taps.defer_reads = taps.may_defer and terms.numel() <= DEFER_TERMS_NUMEL
        scale = ctx.scratch.get(LOSS_SCALE, 1.0)
        if taps.defer_reads:
            # The per-sample terms and the norm now (five ops); the reductions and the one read for
            # many steps at once, in `settle`.
            return state, {self.name: DeferredRead(batch, terms, global_norm(grads), scale)}
        # Σ_i ‖g_i‖² / B² and ‖g_B‖ in one read; float32 sums, float64 from here.
        per_sample_sq, norm = taps.squares_now(terms, grads)
        grad_sq, trace_cov = estimates_from_norms(batch, per_sample_sq / scale**2, norm * norm, population_size(ctx))
        return advance(state, grad_sq, trace_cov, self.beta, "")

    def settle(self, state: NoiseState, ctx: ProbeContext, reads: Sequence["DeferredRead"]):
        """The estimates of steps measured with deferred reads, in step order, from one read.

        Returns:
            The state after the last of them, and each step's values.
        """
        taps = self._taps(ctx)
        # (2, S): Σ_i ‖g_i‖²/B² and ‖g_B‖² of each step, float64, in one read.
        per_sample_sq, big_sq = torch.stack([taps.squares_of_terms([read.terms for read in reads]).double(),
                                             torch.stack([read.norm for read in reads]).double().square()]).tolist()
        n_train = population_size(ctx)
        estimates = [estimates_from_norms(read.batch, sq / read.loss_scale**2, norm_sq, n_train)
                     for read, sq, norm_sq in zip(reads, per_sample_sq, big_sq)]
        return advance_all(state, estimates, self.beta, "")

    def _part_gradients(self, ctx: ProbeContext, losses: torch.Tensor):
        """The sizes, and the gradients of the first K−1 parts' summed losses (graph retained for the loop)."""
        batch = losses.numel()
        if batch < self.parts:
            return None
        sizes = part_sizes(batch, self.parts)
        parts, start = [], 0
        for size in sizes[:-1]:
            selector = _part_selector(batch, start, size, losses.dtype, losses.device)  # (B,): 1 on the part
            grads = torch.autograd.grad(losses, ctx.params, grad_outputs=selector, retain_graph=True, allow_unused=True)
            parts.append([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ctx.params)])
            start += size
        return sizes, parts


@functools.lru_cache(maxsize=64)
def _part_selector(batch: int, start: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B,) with 1 on samples start..start+size−1: the part's summed loss as a backward seed (cached)."""
    selector = torch.zeros(batch, dtype=dtype, device=device)
    selector[start:start + size] = 1.0
    return selector


def per_sample_gradients_from_losses(losses: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The (B, P) matrix of per-sample gradients ∇θ loss_i, from per-sample losses with a live graph.

    One backward per sample through the graph the loop built, so samples keep their dropout masks
    and batch-norm coupling; the graph is retained for the loop's own backward pass. (A single
    vectorised backward, ``is_grads_batched=True``, gives the same rows but measured about 4×
    slower on the CPU for an MLP at B = 32.)
    """
    batch = losses.numel()
    rows = []
    for i in range(batch):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)  # (B, P)


@dataclass(frozen=True)
class NoiseScaleExact:
    """``noise_scale_exact``: B_simple = tr(Σ)/‖G‖² from the batch's per-sample gradients.

    The same quantity as `NoiseScale` (McCandlish et al. 2018), estimated from every sample's
    gradient in the batch (`per_sample_estimates`) instead of two batch sizes: lower variance,
    at the cost of a (B, P) matrix and B backward passes per measured step, so meant for
    small models (or a large ``probe_every``). Smoothed the same way (β, bias-corrected); columns ``grad_sq_exact``,
    ``trace_cov_exact``, ``noise_scale_exact`` and their ``*_raw`` per-step values.
    """

    name: str = "noise_scale_exact"
    point: Point = "forward"
    beta: float = 0.99

    @property
    def columns(self) -> tuple[str, ...]:
        return noise_columns("_exact")

    def init(self, ctx: ProbeContext) -> NoiseState:
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses):
        if losses.numel() < 2:  # one sample has no spread
            return state, unmeasured("_exact")
        per_sample = per_sample_gradients_from_losses(losses, ctx.params)  # (B, P)
        grad_sq, trace_cov = torch.stack(per_sample_estimates(per_sample, population_size(ctx))).tolist()
        return advance(state, grad_sq, trace_cov, self.beta, "_exact")
