"""Probes: measurements of training dynamics taken inside the step.

A probe is an ``init``/``measure`` pair over its own explicit state (optax-style): ``init`` sees the
model before training and returns the state (``dist_from_init`` keeps θ₀ there); ``measure`` gets
the state and the step's context and returns the new state and a dict of values for the step
table. Each probe measures at one point of the step:

- ``"forward"``: the batch's per-sample losses with their graph alive, before the backward pass;
- ``"backward"``: the gradients of the batch's mean loss are in ``p.grad``, weights not yet updated;
- ``"update"``: the optimizer has stepped; weights are θ_t.

A probe that needs two points of the same step (``noise_scale`` needs the live graph *and* the
full-batch gradient) declares ``points`` (in step order) instead of ``point``; its ``measure`` is
then called at each of them with the keyword ``point=``. Values stay tensors until `ProbeSet.collect`
turns them into floats, so a probe never forces a device synchronisation by itself.

The loop calls the probes only every ``config.probe_every`` steps; stateful estimates (the noise
scale's moving averages) advance once per measured step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Protocol

import torch

from .errors import ConfigError

Point = Literal["forward", "backward", "update"]
POINTS: tuple[Point, ...] = ("forward", "backward", "update")


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may look at: the live model and its parameters, the data, the config.

    ``param_views`` are flat views of the parameters, made once: they
    follow the optimizer's in-place updates, so ``torch.cat(ctx.param_views)`` is θ_t as one
    vector in one operation (a probe's state keeps plain tensors, never these views, so that it
    survives a checkpoint). ``scratch`` holds per-run objects that are not state (forward hooks).
    """

    model: torch.nn.Module
    params: tuple[torch.nn.Parameter, ...]
    dataset: Any
    config: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def param_views(self) -> tuple[torch.Tensor, ...]:
        """Each parameter's flat view (`flat_view`), made on first use."""
        return tuple(flat_view(p) for p in self.params)

    def flat_params(self) -> torch.Tensor:
        """θ_t, all parameters as one (P,) vector (a copy, not synchronised)."""
        return torch.cat(self.param_views)  # (P,)


class Probe(Protocol):
    name: str
    point: Point

    def init(self, ctx: ProbeContext) -> Any: ...

    def measure(self, state: Any, ctx: ProbeContext, losses: torch.Tensor | None) -> tuple[Any, dict[str, Any]]: ...


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """A (numel,) view of a tensor's elements (in memory order), sharing its storage.

    Dense tensors in any memory layout (contiguous, channels-last) have one; the view follows
    in-place updates of the tensor, which a ``reshape`` copy would not.
    """
    tensor = tensor.detach()
    if tensor.is_contiguous():
        return tensor.view(-1)
    dims = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d))
    expected = 1
    for d in dims:  # dense and non-overlapping: strides are the running products of the sizes
        if tensor.size(d) > 1 and tensor.stride(d) != expected:
            raise ConfigError(f"probes need dense parameters; one has shape {tuple(tensor.shape)} and strides "
                              f"{tensor.stride()}; make it contiguous with p.data = p.data.contiguous()")
        expected *= tensor.size(d)
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


# --- norms over lists of tensors ------------------------------------------------------------------


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t ‖t‖₂² over all elements of all tensors, as a 0-d float64 tensor (not synchronised).

    The per-tensor norms come from one fused ``torch._foreach_norm`` call; accumulating their
    squares in float64 keeps differences of nearly equal squared norms (the noise-scale
    estimators subtract them) meaningful.
    """
    norms = torch._foreach_norm(list(tensors))
    return torch.stack(norms).double().square().sum()


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_n)‖₂ over all elements of all tensors (a 0-d tensor, not synchronised)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def _grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


# --- grad_norm, dist_from_init, update_norm ---------------------------------------------------------


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
        # One concatenation and one norm: on the CPU, fewer operations than a norm per tensor.
        flat = torch.cat([p.grad.reshape(-1) for p in ctx.params if p.grad is not None])  # (P,)
        return state, {"grad_norm": torch.linalg.vector_norm(flat)}


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


# --- the gradient noise scale --------------------------------------------------------------------


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


def _n_train(ctx: ProbeContext) -> float:
    """N of the finite-population correction; infinite (no correction) when the data is unknown."""
    n = getattr(ctx.dataset, "n_train", None)
    return float(n) if n else float("inf")


def _advance(state: NoiseState, grad_sq: float, trace_cov: float, beta: float, suffix: str) -> tuple[NoiseState, dict[str, float]]:
    """Fold one step's raw estimates into the moving averages; the step-table values."""
    grad_sq_avg = beta * state.grad_sq_avg + (1 - beta) * grad_sq
    trace_cov_avg = beta * state.trace_cov_avg + (1 - beta) * trace_cov
    count = state.count + 1
    correction = 1 - beta**count  # bias correction of an average started at 0
    smoothed_grad_sq, smoothed_trace = grad_sq_avg / correction, trace_cov_avg / correction
    # A ratio with a non-positive ‖G‖² estimate means nothing (early, noisy steps): NaN, not a sign flip.
    noise = smoothed_trace / smoothed_grad_sq if smoothed_grad_sq > 0 else math.nan
    values = {
        f"grad_sq{suffix}": smoothed_grad_sq,
        f"trace_cov{suffix}": smoothed_trace,
        f"noise_scale{suffix}": noise,
        f"grad_sq{suffix}_raw": grad_sq,
        f"trace_cov{suffix}_raw": trace_cov,
    }
    return NoiseState(grad_sq_avg, trace_cov_avg, count), values


def _unmeasured(suffix: str) -> dict[str, float]:
    """NaN for every noise-scale column, for a batch that cannot give an estimate."""
    names = ("grad_sq", "trace_cov", "noise_scale", "grad_sq_raw", "trace_cov_raw")
    return {name.replace("_raw", f"{suffix}_raw") if name.endswith("_raw") else f"{name}{suffix}": math.nan for name in names}


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


@dataclass(frozen=True)
class NoiseScale:
    """``noise_scale``: B_simple = tr(Σ)/‖G‖², the simple gradient noise scale (McCandlish et al. 2018).

    "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), §2.2 and App. A.1. G is the
    gradient of the mean loss over the N training samples and Σ the covariance of the per-sample
    gradients, normalised by 1/(N−1) (see `two_batch_estimates` for why that normalisation makes
    the estimators exact for batches drawn without replacement).

    The estimate uses two batch sizes from one step with no extra forward pass: at the
    ``forward`` point the batch's per-sample losses still hold their graph, and the gradients of
    the first ``parts − 1`` parts' mean losses come from ``torch.autograd.grad(...,
    retain_graph=True)``; at the ``backward`` point the loop's full-batch gradient g_B is in
    ``p.grad`` and the last part's gradient follows from it, since g_B = Σ_k (b_k/B) g_k. Each raw
    estimate is folded into an exponential moving average (β, with bias correction, as gpt-neox
    does) and the ratio is taken of the averages.

    Step-table columns: ``grad_sq``, ``trace_cov``, ``noise_scale`` (smoothed) and
    ``grad_sq_raw``, ``trace_cov_raw`` (this step's unbiased estimates). Batches of one sample
    give NaN. The estimate is unbiased when each part of a batch is a uniformly random subset of
    the training set (``shuffle=True``). Cost: ``parts − 1`` extra backward passes per measured step.

    Args:
        beta: the moving averages' decay.
        parts: how many parts the batch is split into (≥ 2); the small batch size is B/parts.
    """

    name: str = "noise_scale"
    points: tuple[Point, ...] = ("forward", "backward")
    beta: float = 0.99
    parts: int = 2

    def __post_init__(self) -> None:
        if self.parts < 2:
            raise ConfigError(f"noise_scale needs parts >= 2 to have two batch sizes, got {self.parts}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"noise_scale beta must be in [0, 1), got {self.beta}")

    def init(self, ctx: ProbeContext) -> NoiseState:
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses, point: Point = "backward"):
        if point == "forward":
            return replace(state, pending=self._part_gradients(ctx, losses)), {}
        pending, state = state.pending, replace(state, pending=None)
        if pending is None:  # a batch too small to split
            return state, _unmeasured("")
        sizes, parts = pending  # parts: the first K−1 parts' gradients of their summed losses, b_k g_k
        batch = sum(sizes)
        full = _grads(ctx.params)  # g_B, the gradient of the batch's mean loss
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
        grad_sq, trace_cov = two_batch_estimates(small_sq, sizes, big_sq, batch, _n_train(ctx))
        return _advance(state, grad_sq, trace_cov, self.beta, "")

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

    def init(self, ctx: ProbeContext) -> NoiseState:
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses):
        if losses.numel() < 2:  # one sample has no spread
            return state, _unmeasured("_exact")
        per_sample = per_sample_gradients_from_losses(losses, ctx.params)  # (B, P)
        grad_sq, trace_cov = torch.stack(per_sample_estimates(per_sample, _n_train(ctx))).tolist()
        return _advance(state, grad_sq, trace_cov, self.beta, "_exact")


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


def probe_points(probe: Probe) -> tuple[tuple[Point, ...], bool]:
    """Where a probe measures, and whether it takes the ``point=`` keyword (it declares ``points``)."""
    points = getattr(probe, "points", None)
    if points is not None:
        return tuple(points), True
    return (probe.point,), False


class ProbeSet:
    """The probes of one run, with their states, called by `train_step` at their points."""

    def __init__(self, probes: Sequence[Probe], ctx: ProbeContext):
        self.probes = list(probes)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"probes {names} name one probe twice; give each probe once")
        self.ctx = ctx
        self.states = [p.init(ctx) for p in self.probes]
        self.pending: dict[str, Any] = {}
        self.names = tuple(names)
        self.active = bool(self.probes)
        # Per point, the probes measuring there: (index, probe, takes point=), precomputed for the hot path.
        self._at: dict[Point, list[tuple[int, Probe, bool]]] = {point: [] for point in POINTS}
        for i, probe in enumerate(self.probes):
            points, keyword = probe_points(probe)
            for point in points:
                if point not in self._at:
                    raise ConfigError(f"probe {probe.name!r} measures at {point!r}; points are {', '.join(POINTS)}")
                self._at[point].append((i, probe, keyword))
        # Only probes measuring at "forward" need per-sample losses; otherwise the loop uses the fused mean.
        self.wants_losses = bool(self._at["forward"])

    @classmethod
    def create(cls, specs, model, dataset, config, loss_fn, state=None) -> "ProbeSet":
        probes = [make_probe(s) for s in specs]
        ctx = ProbeContext(model, tuple(p for p in model.parameters() if p.requires_grad), dataset, config, loss_fn)
        return cls(probes, ctx)

    def _measure(self, point: Point, losses: torch.Tensor | None = None) -> None:
        for i, probe, keyword in self._at[point]:
            if keyword:
                self.states[i], values = probe.measure(self.states[i], self.ctx, losses, point=point)
            else:
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
