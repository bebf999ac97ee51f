"""The gradient noise scale's estimators (McCandlish et al. 2018, App. A.1) and their moving averages.

Unbiased ‖G‖² and tr(Σ) from squared gradient norms at two batch sizes (`two_batch_estimates`), from
per-sample squared norms (`estimates_from_norms`), or from per-sample gradients
(`per_sample_estimates`); each step's raw estimates are folded into bias-corrected moving averages
(`NoiseState`, `advance`), whose ratio is B_simple. Every probe of the noise scale (`noise_scale`,
`noise_scale_exact`, the ranks' `RankNoiseScale`, `bl.track`'s micro-batches) computes its numbers here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import ProbeContext


@dataclass(frozen=True)
class NoiseState:
    """Moving averages of the noise-scale ingredients (McCandlish et al. 2018, App. A.1).

    ``grad_sq_avg``/``trace_cov_avg`` are exponential moving averages started at 0; dividing by
    ``1 − β^count`` removes their bias towards 0 (as gpt-neox does). ``pending`` carries what the
    ``forward`` point computed to the ``backward`` point of the same step. The averages are
    Python floats: the step's few scalars are read once (one synchronisation), and the estimator's
    arithmetic costs no tensor operations.
    """

    grad_sq_avg: float = 0.0
    trace_cov_avg: float = 0.0
    count: int = 0
    pending: Any = None


def population_size(ctx: ProbeContext) -> float:
    """N of the finite-population correction; infinite (no correction) when the data is unknown."""
    n = getattr(ctx.dataset, "n_train", None)
    return float(n) if n else float("inf")


def advance(state: NoiseState, grad_sq: float, trace_cov: float, beta: float, suffix: str) -> tuple[NoiseState, dict[str, float]]:
    """Fold one step's raw estimates into the moving averages; the step-table values."""
    state, (values,) = advance_all(state, [(grad_sq, trace_cov)], beta, suffix)
    return state, values


def advance_all(state: NoiseState, estimates: Sequence[tuple[float, float]], beta: float,
                suffix: str) -> tuple[NoiseState, list[dict[str, float]]]:
    """Fold steps' raw estimates ``(grad_sq, trace_cov)``, in step order, into the moving averages;
    each step's table values. The averages are carried as floats and the state is made once."""
    grad_sq_avg, trace_cov_avg, count = state.grad_sq_avg, state.trace_cov_avg, state.count
    columns, rows = noise_columns(suffix), []
    for grad_sq, trace_cov in estimates:
        grad_sq_avg = beta * grad_sq_avg + (1 - beta) * grad_sq
        trace_cov_avg = beta * trace_cov_avg + (1 - beta) * trace_cov
        count += 1
        correction = 1 - beta**count  # bias correction of an average started at 0
        smoothed_grad_sq, smoothed_trace = grad_sq_avg / correction, trace_cov_avg / correction
        # A ratio with a non-positive ‖G‖² estimate means nothing (early, noisy steps): NaN, not a sign flip.
        noise = smoothed_trace / smoothed_grad_sq if smoothed_grad_sq > 0 else math.nan
        rows.append(dict(zip(columns, (smoothed_grad_sq, smoothed_trace, noise, grad_sq, trace_cov))))
    return NoiseState(grad_sq_avg, trace_cov_avg, count), rows


@functools.lru_cache(maxsize=None)
def noise_columns(suffix: str) -> tuple[str, ...]:
    """The step-table columns of a noise-scale estimate, in `advance`'s order (made once per suffix)."""
    return (f"grad_sq{suffix}", f"trace_cov{suffix}", f"noise_scale{suffix}", f"grad_sq{suffix}_raw",
            f"trace_cov{suffix}_raw")


def unmeasured(suffix: str) -> dict[str, float]:
    """NaN for every noise-scale column, for a batch that cannot give an estimate."""
    names = ("grad_sq", "trace_cov", "noise_scale", "grad_sq_raw", "trace_cov_raw")
    return {name.replace("_raw", f"{suffix}_raw") if name.endswith("_raw") else f"{name}{suffix}": math.nan for name in names}


def estimates_from_norms(batch: int, per_sample_sq: float, big_sq: float, n_train: float) -> tuple[float, float]:
    """Unbiased ‖G‖² and tr(Σ) of one step from Σ_i ‖g_i‖²/B² over its B samples and ‖g_B‖²: the
    estimates of `per_sample_estimates` from squared norms alone, without the per-sample gradients.

    `two_batch_estimates` with b = 1, its B one-sample estimates averaged (they are linear in
    ‖g_i‖²): tr(Σ) = (mean ‖g_i‖² − ‖g_B‖²)/(1 − 1/B), ‖G‖² = (B‖g_B‖² − mean ‖g_i‖²)/(B − 1) + tr(Σ)/N.
    """
    mean_sq = per_sample_sq * batch  # the mean of ‖g_i‖² over the batch
    trace_cov = (mean_sq - big_sq) / (1.0 - 1.0 / batch)
    grad_sq = (batch * big_sq - mean_sq) / (batch - 1) + trace_cov / n_train
    return grad_sq, trace_cov


def part_sizes(batch_size: int, parts: int) -> list[int]:
    """Split B samples into ``parts`` consecutive parts whose sizes differ by at most one."""
    base, extra = divmod(batch_size, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def two_batch_estimates(
    small_sq: Sequence[torch.Tensor], small_sizes: Sequence[int], big_sq: torch.Tensor, big_size: int, n_train: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased ‖G‖² and tr(Σ) from squared gradient norms at two batch sizes (McCandlish et al. 2018, A.1).

    With b < B, the paper's estimators are

        tr(Σ) ≈ (‖g_b‖² − ‖g_B‖²) / (1/b − 1/B),   ‖G‖² ≈ (B‖g_B‖² − b‖g_b‖²) / (B − b).

    For batches drawn without replacement from N samples, E‖g_b‖² = ‖G‖² + tr(Σ)(1/b − 1/N)
    with Σ = (1/(N−1)) Σ_i (g_i − G)(g_i − G)ᵀ, so the first is unbiased for that tr(Σ) and the
    second has mean ‖G‖² − tr(Σ)/N; we add the tr(Σ) estimate divided by N to remove that bias
    (it vanishes as N → ∞, the paper's i.i.d. setting). Each small part gives one estimate; the
    parts' estimates are averaged.

    Args:
        small_sq: ‖g_b‖² of each part of the batch (gradients of the part's mean loss).
        small_sizes: each part's size b.
        big_sq: ‖g_B‖² of the whole batch's mean loss.
        big_size: B.
        n_train: N, the training-set size (``inf`` for no finite-population correction).

    Returns:
        ``(grad_sq, trace_cov)``, floats (or 0-d tensors if given tensors).
    """
    traces = [(sq - big_sq) / (1.0 / b - 1.0 / big_size) for sq, b in zip(small_sq, small_sizes)]
    grad_sqs = [(big_size * big_sq - b * sq) / (big_size - b) for sq, b in zip(small_sq, small_sizes)]
    trace_cov = sum(traces) / len(traces)
    grad_sq = sum(grad_sqs) / len(grad_sqs) + trace_cov / n_train
    return grad_sq, trace_cov


def per_sample_estimates(per_sample: torch.Tensor, n_train: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased ‖G‖² and tr(Σ) from a batch's per-sample gradients (B, P), drawn without replacement.

    tr(Σ) ≈ Σ_i ‖g_i − ḡ‖²/(B−1) (the sample variance, unbiased for Σ normalised by 1/(N−1)
    under sampling without replacement), and ‖G‖² ≈ ‖ḡ‖² − tr(Σ)(1/B − 1/N), since
    E‖ḡ‖² = ‖G‖² + tr(Σ)(1/B − 1/N).
    """
    per_sample = per_sample.double()
    batch = per_sample.shape[0]
    mean = per_sample.mean(dim=0)  # (P,)
    trace_cov = (per_sample - mean).square().sum() / (batch - 1)
    grad_sq = mean.square().sum() - trace_cov * (1.0 / batch - 1.0 / n_train)
    return grad_sq, trace_cov
