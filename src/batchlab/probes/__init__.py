"""Probes: measurements of training dynamics taken inside the step.

A probe is an ``init``/``measure`` pair over its own explicit state (optax-style): ``init`` sees the
model before training and returns the state (``dist_from_init`` keeps θ₀ there); ``measure`` gets
the state and the step's context and returns the new state and a dict of values for the step
table. Each probe measures at one point of the step:

- ``"forward"``: the batch's per-sample losses with their graph alive, before the backward pass;
- ``"backward"``: the gradients of the batch's mean loss are in ``p.grad``, weights not yet updated;
- ``"update"``: the optimizer has stepped; weights are θ_t.

A probe that needs two points of the same step (``noise_scale``'s half-batch method needs the
live graph *and* the full-batch gradient) declares ``points`` (in step order) instead of
``point``; its ``measure`` is then called at each of them with the keyword ``point=``, and it may
narrow them for a run by a ``points_for(ctx)`` method. Values stay tensors until `ProbeSet.collect`
turns them into floats, so a probe never forces a device synchronisation by itself.

The loop calls the probes only every ``config.probe_every`` steps; stateful estimates (the noise
scale's moving averages) advance once per measured step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
from torch._utils import _flatten_dense_tensors

from ..errors import ConfigError, error_line
from .per_sample import LayerCoverage, LayerTaps, per_sample_layers, remove_hooks

Point = Literal["forward", "backward", "update"]
POINTS: tuple[Point, ...] = ("forward", "backward", "update")


class ProbeWarning(RuntimeWarning):
    """A probe could not measure a run: its columns are NaN from then on, and training goes on."""


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
    """‖(t_1, ..., t_n)‖₂ over all elements of all tensors (a 0-d tensor, not synchronised).

    One flat copy and one norm: on the CPU a small model's step pays more for an operation's
    dispatch than for its arithmetic, and ``torch._foreach_norm`` runs one norm per tensor there.
    (``_flatten_dense_tensors`` is the one-call concatenation DDP's buckets use.)
    """
    return torch.linalg.vector_norm(_flatten_dense_tensors(list(tensors)))


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
        return state, {"grad_norm": global_norm([p.grad for p in ctx.params if p.grad is not None])}


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
    state, (values,) = _advance_all(state, [(grad_sq, trace_cov)], beta, suffix)
    return state, values


def _advance_all(state: NoiseState, estimates: Sequence[tuple[float, float]], beta: float,
                 suffix: str) -> tuple[NoiseState, list[dict[str, float]]]:
    """Fold steps' raw estimates ``(grad_sq, trace_cov)``, in step order, into the moving averages;
    each step's table values. The averages are carried as floats and the state is made once."""
    grad_sq_avg, trace_cov_avg, count = state.grad_sq_avg, state.trace_cov_avg, state.count
    columns, rows = _noise_columns(suffix), []
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
def _noise_columns(suffix: str) -> tuple[str, ...]:
    """The step-table columns of a noise-scale estimate, in `_advance`'s order (made once per suffix)."""
    return (f"grad_sq{suffix}", f"trace_cov{suffix}", f"noise_scale{suffix}", f"grad_sq{suffix}_raw",
            f"trace_cov{suffix}_raw")


def _unmeasured(suffix: str) -> dict[str, float]:
    """NaN for every noise-scale column, for a batch that cannot give an estimate."""
    names = ("grad_sq", "trace_cov", "noise_scale", "grad_sq_raw", "trace_cov_raw")
    return {name.replace("_raw", f"{suffix}_raw") if name.endswith("_raw") else f"{name}{suffix}": math.nan for name in names}


def _estimates_from_norms(batch: int, per_sample_sq: float, big_sq: float, n_train: float) -> tuple[float, float]:
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


# --- per-sample gradient norms of nn.Linear layers ------------------------------------------------

# Modules that map each sample on its own (no parameters, no coupling across the batch). A model
# made only of these and nn.Linear layers has per-sample gradients separable layer by layer.
_PER_SAMPLE_MODULES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Identity, torch.nn.Dropout, torch.nn.AlphaDropout,
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU, torch.nn.CELU, torch.nn.GELU,
    torch.nn.SiLU, torch.nn.Mish, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Softplus, torch.nn.Softsign,
    torch.nn.Hardtanh, torch.nn.Hardsigmoid, torch.nn.Hardswish, torch.nn.Tanhshrink, torch.nn.LogSigmoid,
)  # fmt: skip


def _sequence(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The leaf modules an nn.Sequential tree runs, in order (the module itself if not Sequential)."""
    if isinstance(module, torch.nn.Sequential):
        return [leaf for child in module for leaf in _sequence(child)]
    return [module]


def per_sample_linear_layers(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                             input_dims: int | None) -> list[tuple[torch.nn.Linear, bool, bool]] | None:
    """The model's nn.Linear layers as ``(layer, weight trained, bias trained)`` when per-sample
    gradient norms can be read from them; ``None`` when they cannot.

    They can when the model is an nn.Sequential tree that runs each of its modules once, every
    module is an nn.Linear or a per-sample map (activations and dropout, not in place;
    ``Flatten``/``Unflatten`` away from the batch dimension), every linear layer gets a
    (B, features) input (followed from ``input_dims``, the dimensions of a batch of inputs), and
    every trained parameter is the weight or bias of one linear layer. Anything else
    (convolutions, batch norm, custom modules, shared weights) returns ``None``.
    """
    if input_dims is None:
        return None
    leaves = _sequence(model)
    if len({id(m) for m in leaves}) != len(leaves):
        return None  # a module run twice
    layers, dims = [], input_dims
    for module in leaves:
        if isinstance(module, torch.nn.Linear):
            if dims != 2:
                return None  # per-sample outer products need (B, features) inputs
            layers.append(module)
        elif isinstance(module, torch.nn.Flatten):
            start, end = (d % dims for d in (module.start_dim, module.end_dim))
            if start == 0:
                return None
            dims -= end - start
        elif isinstance(module, torch.nn.Unflatten):
            if module.dim % dims == 0:
                return None
            dims += len(module.unflattened_size) - 1
        elif not isinstance(module, _PER_SAMPLE_MODULES) or getattr(module, "inplace", False):
            return None
    trained = {id(p) for p in params}
    owned = [id(t) for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    if not layers or not trained <= set(owned):
        return None
    return [(layer, id(layer.weight) in trained, layer.bias is not None and id(layer.bias) in trained) for layer in layers]


# A step measured with deferred reads keeps its (2L, B) per-sample terms (`LinearTaps.take_terms`)
# until the driver reads (every 64 steps in `bl.track`): kept when they hold at most this many
# numbers (64 steps of them then hold at most 64 MiB in float32); larger runs read each step's
# number as it comes.
DEFER_TERMS_NUMEL = 1 << 18


@dataclass(slots=True)
class DeferredRead:
    """A step's per-sample ingredients kept as tensors, replaced by its values in `ProbeSet.settle`:
    the batch size, `LinearTaps.take_terms`, the batch gradient's norm ‖g_B‖ (0-d), and the loss
    scale its output gradients carry (`LOSS_SCALE`)."""

    batch: int
    terms: torch.Tensor
    norm: torch.Tensor
    loss_scale: float = 1.0


# ``ctx.scratch`` key: the factor the step's loss was multiplied by before its backward pass (an AMP
# GradScaler's scale), set by `ProbeSet.after_backward`. The output gradients the taps read carry
# it; ``p.grad`` has been unscaled by then.
LOSS_SCALE = "loss_scale"


class LinearTaps:
    """Forward hooks on a model's nn.Linear layers keeping, from the latest forward pass with a
    graph, each layer's input a (B, in) and the gradient reaching its output z (B, out).

    A per-sample gradient of a Linear layer is an outer product (Goodfellow 2015, "Efficient
    per-example gradient computations", arXiv 1510.01799): for z_i = W a_i + b and loss ℓ_i,
    ∇_W ℓ_i = δ_i a_iᵀ and ∇_b ℓ_i = δ_i with δ_i = ∂ℓ_i/∂z_i, so ‖∇_W ℓ_i‖² = ‖δ_i‖²‖a_i‖².
    The rows of z's gradient in the loop's backward pass of the batch's mean loss are δ_i/B:
    no extra backward pass. The hooks are removed when the taps are garbage (the run is over).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[tuple[torch.nn.Linear, bool, bool]]):
        count = len(layers)
        self.inputs: list[Any] = [None] * count
        self.outputs: list[Any] = [None] * count
        # Every squared row norm by one product: (2L, Σout + Σin) @ (Σout + Σin, B) gives ‖δ_il‖²
        # in row l and ‖a_il‖²·[weight trained] + [bias trained] in row L + l.
        widths = [layer.out_features for layer, _, _ in layers] + [layer.in_features for layer, _, _ in layers]
        device, dtype = layers[0][0].weight.device, layers[0][0].weight.dtype
        self.sums = torch.zeros(2 * count, sum(widths), device=device, dtype=dtype)  # (2L, Σout + Σin)
        trained = [1.0] * count + [float(w) for _, w, _ in layers]
        column = 0
        for row, width in enumerate(widths):
            self.sums[row, column:column + width] = trained[row]
            column += width
        bias = [0.0] * count + [float(b) for _, _, b in layers]
        self.bias_terms = torch.tensor(bias, device=device, dtype=dtype).unsqueeze(1)  # (2L, 1)
        self.deltas: list[Any] = [None] * count
        # Whether every forward pass keeps its output gradients (when every step is measured), or
        # only those `arm` is called for; and whether probes at the "forward" point run backward
        # passes of their own through the step's graph (a retained z.grad would sum theirs with
        # the loop's). Both set by the ProbeSet.
        self.every_step = True
        # Whether the driver reads many steps at once (`ProbeSet` made with ``defer_reads``), and,
        # decided at the first measured step, whether this run's steps keep their terms until then.
        self.may_defer = False
        self.defer_reads: bool | None = None
        self.graph_shared = False
        inputs, outputs, deltas, taps = self.inputs, self.outputs, self.deltas, weakref.ref(self)
        self._keepers = []

        def recorder(index: int):
            def keep(grad):  # the last backward pass through z wins: the loop's, after any probe's
                deltas[index] = grad

            def record(module, args, output):
                if output.requires_grad:  # a training forward pass, not an evaluation under no_grad
                    # The input without its graph: the products made of it are not to be recorded.
                    inputs[index], outputs[index], deltas[index] = args[0].detach(), output, None
                    live = taps()
                    if live is None or not live.every_step:
                        return
                    if live.graph_shared:
                        output.register_hook(keep)
                    else:
                        output.retain_grad()  # kept by autograd itself, cheaper than a Python hook
            self._keepers.append(keep)
            return record

        handles = [layer.register_forward_hook(recorder(l)) for l, (layer, _, _) in enumerate(layers)]
        weakref.finalize(self, remove_hooks, handles)

    def arm(self) -> None:
        """After a forward pass the hooks only recorded: keep its output gradients."""
        for z, keep in zip(self.outputs, self._keepers):
            if z is not None:
                z.register_hook(keep)

    def take_rows(self) -> torch.Tensor:
        """The latest backward pass's δ_i/B and a_i as one (B, Σout + Σin) tensor, layer after layer
        (of the batch's mean loss); the taps are emptied."""
        count = len(self.inputs)
        # A layer the loss does not reach gets no gradient: its per-sample gradients are 0.
        deltas = self.deltas if None not in self.deltas else [
            d if d is not None else z.grad if z.grad is not None else z.new_zeros(z.shape)
            for d, z in zip(self.deltas, self.outputs)]
        parts = deltas + self.inputs
        self.inputs[:] = self.outputs[:] = self.deltas[:] = [None] * count  # drop the batch's tensors
        # The inputs are kept detached and the output gradients carry no graph: no grad mode to set.
        return torch.cat(parts, dim=1)  # (B, Σout + Σin)

    def take_terms(self) -> torch.Tensor | None:
        """The latest backward pass's per-sample terms as one (2L, B) tensor: ‖δ_il‖²/B² in row l and
        ‖a_il‖²·[weight trained] + [bias trained] in row L + l; None when no training forward pass
        was tapped. The taps are emptied.

        Σ_i Σ_l of row l times row L + l is Σ_i ‖∇ ℓ_i‖²/B² over the layers' trained parameters.
        """
        if self.inputs[0] is None:
            self.inputs[:] = self.outputs[:] = self.deltas[:] = [None] * len(self.inputs)
            return None
        rows = self.take_rows()
        return torch.addmm(self.bias_terms, self.sums, rows.mul_(rows).T)  # three ops, whatever L

    def squares_now(self, terms: torch.Tensor, grads: Sequence[torch.Tensor]) -> list[float]:
        """Σ_i Σ_l ‖∇ ℓ_i‖²/B² over the batch's samples and the layers' trained parameters, from one
        step's `take_terms`, and the norm of ``grads`` (the batch gradient's tensors), in one read.

        Returns:
            ``[Σ_i ‖g_i‖²/B², ‖g_B‖]`` (the norm, not squared), float32 sums.
        """
        # Each op here costs a small model's step more in dispatch than in arithmetic: they are few.
        squares = terms.view(2, -1)  # (2, L·B)
        # Σ_i Σ_l ‖δ_il‖²/B² · (‖a_il‖² + 1): the first L rows against the last L.
        return torch.stack([torch.vdot(*squares), global_norm(grads)]).tolist()

    @torch.no_grad()
    def squares_of_terms(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """`per_sample_squares`' first number for many batches' kept `take_terms`, in order: (S,).

        Consecutive batches of one size are stacked and reduced together: a driver that reads many
        steps at once pays a few ops per read, not per step.
        """
        count, out, start = len(self.inputs), [], 0
        while start < len(kept):
            end = start + 1
            while end < len(kept) and kept[end].shape == kept[start].shape:
                end += 1
            stacked = torch.stack(kept[start:end])  # (S, 2L, B)
            out.append(stacked.view(end - start, 2, count, -1).prod(dim=1).sum(dim=(1, 2)))
            start = end
        return torch.cat(out)


class GhostTaps:
    """The noise scale's taps for models beyond nn.Linear stacks: per-sample gradient squared norms of
    every layer `batchlab.probes.per_sample.per_sample_layers` covers (Linear on any shape, Conv1d/2d/3d,
    Embedding, LayerNorm, GroupNorm, RMSNorm; any nesting), read off the loop's own backward pass
    (`batchlab.probes.per_sample.LayerTaps`: ghost norms, Li et al. 2022). The same interface as
    `LinearTaps` for `NoiseScale`: a step's terms are its (1, B) per-sample Σ_l ‖∇ℓ_i‖²/B².

    Every forward pass with a graph is recorded (a hook call per layer; the arithmetic happens in
    `take_terms`, on measured steps only), so `arm` has nothing to do.
    """

    def __init__(self, coverage: LayerCoverage):
        self.taps = LayerTaps(coverage)
        self.every_step, self.may_defer, self.graph_shared = True, False, False
        self.defer_reads: bool | None = None

    def arm(self) -> None:
        """Nothing: every forward pass is recorded."""

    def take_terms(self) -> torch.Tensor | None:
        """The latest backward pass's per-sample Σ_l ‖∇ℓ_i‖²/B² as (1, B); None when no training
        forward pass and backward pass were tapped. Raises `per_sample.TapError` for a layer that
        ran twice for one loss (the probe then stops measuring the run)."""
        if not self.taps.pending:
            self.taps.take_nothing()
            return None
        return self.taps.take().unsqueeze(0)

    def squares_now(self, terms: torch.Tensor, grads: Sequence[torch.Tensor]) -> list[float]:
        """``[Σ_i ‖g_i‖²/B², ‖g_B‖]`` from one step's `take_terms` and the batch gradient, in one read."""
        return torch.stack([terms.sum().double(), global_norm(grads).double()]).tolist()

    @torch.no_grad()
    def squares_of_terms(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """`squares_now`'s first number for many steps' kept `take_terms`, in order: (S,)."""
        return torch.stack([terms.sum() for terms in kept])


def _noise_taps(ctx: "ProbeContext") -> tuple[LinearTaps | GhostTaps | None, str]:
    """The taps the noise scale reads per-sample gradient norms from, and why there are none.

    Returns:
        `LinearTaps` for an nn.Sequential stack of nn.Linear layers and per-sample maps (the
        fastest: three ops a step, whatever the depth); `GhostTaps` for any other model whose every
        trained parameter belongs to a layer kind `per_sample_layers` measures, with no batch norm;
        else None, with the uncovered parameters named.
    """
    train = getattr(ctx.dataset, "train", None)
    dims = train[0].dim() if train is not None and train[0] is not None else None
    layers = per_sample_linear_layers(ctx.model, ctx.params, dims)
    if layers is not None:
        return LinearTaps(ctx.model, layers), ""
    coverage = per_sample_layers(ctx.model, ctx.params)
    if coverage.complete and coverage.layers:
        return GhostTaps(coverage), ""
    if coverage.mixing:
        return None, f"{', '.join(coverage.mixing)} mix the samples of a batch (batch norm)"
    return None, coverage.describe() or "the model has no trained parameters"


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
        return _noise_columns("")

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
            ctx.scratch[key], ctx.scratch[f"untapped:{self.name}"] = _noise_taps(ctx)
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
            return state, _unmeasured("")
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
        grad_sq, trace_cov = _estimates_from_norms(batch, per_sample_sq / scale**2, norm * norm, _n_train(ctx))
        return _advance(state, grad_sq, trace_cov, self.beta, "")

    def settle(self, state: NoiseState, ctx: ProbeContext, reads: Sequence["DeferredRead"]):
        """The estimates of steps measured with deferred reads, in step order, from one read.

        Returns:
            The state after the last of them, and each step's values.
        """
        taps = self._taps(ctx)
        # (2, S): Σ_i ‖g_i‖²/B² and ‖g_B‖² of each step, float64, in one read.
        per_sample_sq, big_sq = torch.stack([taps.squares_of_terms([read.terms for read in reads]).double(),
                                             torch.stack([read.norm for read in reads]).double().square()]).tolist()
        n_train = _n_train(ctx)
        estimates = [_estimates_from_norms(read.batch, sq / read.loss_scale**2, norm_sq, n_train)
                     for read, sq, norm_sq in zip(reads, per_sample_sq, big_sq)]
        return _advance_all(state, estimates, self.beta, "")

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

    @property
    def columns(self) -> tuple[str, ...]:
        return _noise_columns("_exact")

    def init(self, ctx: ProbeContext) -> NoiseState:
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses):
        if losses.numel() < 2:  # one sample has no spread
            return state, _unmeasured("_exact")
        per_sample = per_sample_gradients_from_losses(losses, ctx.params)  # (B, P)
        grad_sq, trace_cov = torch.stack(per_sample_estimates(per_sample, _n_train(ctx))).tolist()
        return _advance(state, grad_sq, trace_cov, self.beta, "_exact")


# --- the noise scale from data-parallel ranks ------------------------------------------------------


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
        return _noise_columns("")

    def init(self, ctx: ProbeContext) -> NoiseState:
        if self.gradients is None:
            raise ConfigError("the noise scale from ranks needs a data-parallel run (batchlab.distributed)")
        return NoiseState()

    def measure(self, state: NoiseState, ctx: ProbeContext, losses):
        import torch.distributed as dist

        ranks = self.gradients
        b, big, world = ranks.local_size, ranks.global_size, dist.get_world_size(ranks.group)
        local_sq = ranks.take()
        big_sq = squared_norm(_grads(ctx.params))  # ‖g_B‖², the same on every rank
        # (trace_cov, grad_sq without the N-correction, 1) from this rank, or zeros: summed over ranks.
        share = torch.zeros(3, dtype=torch.float64, device=big_sq.device)
        if local_sq is not None and 0 < b < big:
            small_sq = local_sq * (big / (world * b)) ** 2  # ‖g_r‖²: the local gradient was (N b_r/B) g_r
            grad_sq, trace_cov = two_batch_estimates([small_sq], [b], big_sq, big, math.inf)
            share = torch.stack([trace_cov, grad_sq, torch.ones((), dtype=torch.float64, device=big_sq.device)])
        dist.all_reduce(share, group=ranks.group)
        trace_sum, grad_sq_sum, count = share.tolist()
        if count == 0:
            return state, _unmeasured("")
        trace_cov = trace_sum / count
        grad_sq = grad_sq_sum / count + trace_cov / _n_train(ctx)
        return _advance(state, grad_sq, trace_cov, self.beta, "")


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
