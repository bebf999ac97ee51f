"""Per-sample gradient squared norms of any model's measurable layers, read beside the weight gradient.

The gradient noise scale (McCandlish et al. 2018) needs Σ_i ‖∇ℓ_i‖² every measured step. Forming each
sample's gradient costs B times the memory of the model; the norms alone do not need it. For a layer
that maps each sample's positions t (tokens, pixels) on their own, with input a_t and output gradient
δ_t = ∂ℓ_i/∂z_t, the per-sample weight gradient is a sum of outer products Σ_t δ_t a_tᵀ, so

    ‖∇_W ℓ_i‖² = Σ_{t,s} (δ_t·δ_s)(a_t·a_s)                      (the "ghost norm")

is read from the inputs and the output gradients that the ordinary backward pass already has: no
per-sample gradient is formed unless that is cheaper (Goodfellow 2015, "Efficient per-example gradient
computations", arXiv 1510.01799, for T = 1; Li et al. 2022, "Large language models can be strong
differentially private learners", arXiv 2110.05679, §4, for sequences; the same trick as Opacus'
ghost clipping). Convolutions are linear layers over the unfolded input (Rochette et al. 2019,
"Efficient per-example gradient computations in convolutional neural networks", arXiv 1912.06015;
Opacus' unfold-based convolution grad sampler).

Two pieces:

- `per_sample_layers` walks a model and returns the layers whose norms can be read
  (`TappedLayer`) and, precisely, the trained parameters no layer covers (`UncoveredParameter`:
  batch norm, a parameter used directly in a forward, a parameter shared by two modules, ...), so
  that the caller can name them and measure another way.
- `LayerTaps` hooks those layers: each forward pass with a graph records every tapped layer's input
  and keeps the gradient reaching its output in the caller's own backward pass; `LayerTaps.take`
  returns the (B,) per-sample squared norms and empties the taps.

Samples are along dimension 0 of every tapped layer's input (a ``batch_first=False`` sequence model
gives per-position, not per-sample, numbers; `LayerTaps.take` refuses inputs whose first dimensions
disagree).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchlabError

__all__ = ["LayerCoverage", "LayerTaps", "TapError", "TappedLayer", "UncoveredParameter", "per_sample_layers"]


class TapError(BatchlabError, RuntimeError):
    """The taps cannot give per-sample norms for this step (a layer ran twice, no backward pass reached
    them, samples that disagree across layers); the message says which layers and why."""


# --- which parameters the taps cover ---------------------------------------------------------------


@dataclass(frozen=True)
class TappedLayer:
    """A layer whose per-sample gradient norms `LayerTaps` reads.

    Attributes:
        name: the module's qualified name in the model (``""`` for the model itself).
        module: the layer.
        weight: whether its weight is trained (then included in the norms).
        bias: whether its bias is trained (then included in the norms).
    """

    name: str
    module: nn.Module = field(compare=False, repr=False)
    weight: bool
    bias: bool


@dataclass(frozen=True)
class UncoveredParameter:
    """A trained parameter that no tapped layer covers.

    Attributes:
        name: its qualified name in the model (``"features.1.weight"``), or ``"<param N>"`` for the
            N-th of ``params`` when the model does not hold it.
        parameter: the parameter.
        reason: one phrase saying why its per-sample norms are not read.
    """

    name: str
    parameter: torch.Tensor = field(compare=False, repr=False)
    reason: str


@dataclass(frozen=True)
class LayerCoverage:
    """What `per_sample_layers` found: the tapped layers, and the trained parameters none covers.

    Attributes:
        layers: the layers to tap, in the model's module order.
        uncovered: the trained parameters left out, in the model's parameter order.
        mixing: the names of the modules that mix the samples of a batch in training mode (batch
            norm, with or without parameters). The gradient reaching a layer whose output feeds
            one holds every sample's loss in every row, so the taps of the layers before it do not
            give per-sample norms; those after it still do. The model's module order does not say
            which come before, so a caller wanting per-sample norms treats any of these as a reason
            to measure another way.
    """

    layers: tuple[TappedLayer, ...]
    uncovered: tuple[UncoveredParameter, ...]
    mixing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether the tapped layers cover every trained parameter and no module mixes the samples."""
        return not self.uncovered and not self.mixing

    def describe(self) -> str:
        """The uncovered parameters as one line, ``"bn.weight, bn.bias (BatchNorm1d mixes ...)"``,
        parameters with the same reason grouped; ``""`` when coverage is complete."""
        by_reason: dict[str, list[str]] = {}
        for item in self.uncovered:
            by_reason.setdefault(item.reason, []).append(item.name)
        return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


def per_sample_layers(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> LayerCoverage:
    """The layers of ``model`` whose per-sample gradient norms can be read, and the trained parameters
    that none of them covers.

    A parameter is covered when it is the weight or bias of exactly one module, that module is one
    of the measured kinds (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm,
    nn.RMSNorm) running its own ``forward`` (a subclass that overrides it is not measured), and
    nothing forbids it: an nn.Embedding with ``scale_grad_by_freq`` mixes the samples' counts, and
    the projections inside an nn.MultiheadAttention are used by their parent directly. Any nesting
    is walked (Sequential trees, nn.Module subclasses with functional activations, a
    LightningModule). A module registered at two places is tapped once; whether it runs twice in one
    forward pass is seen by the taps (`LayerTaps.take` raises `TapError`), not here.

    Args:
        model: the model.
        params: the trained parameters (an optimizer's); those with ``requires_grad`` False are
            dropped. Default: every parameter of ``model`` that requires a gradient.

    Returns:
        The `LayerCoverage`: layers to hand to `LayerTaps`, the uncovered trained parameters, each
        with its reason, and the modules that mix the samples (batch norm).
    """
    candidates = model.parameters() if params is None else params
    trained = list({id(p): p for p in candidates if p.requires_grad}.values())  # each once, in order
    names: dict[int, str] = {}
    for name, held in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(held), name)  # a shared parameter under its first name
    owners = _parameter_owners(model)
    reasons = _module_reasons(model)
    covered: dict[int, set[str]] = {}  # id(module) -> the local names of its covered parameters
    uncovered = []
    for index, p in enumerate(trained):
        holders = owners.get(id(p), [])
        reason = _uncovered_reason(p, holders, reasons)
        if reason is None:
            covered.setdefault(id(holders[0][1]), set()).add(holders[0][2])
        else:
            uncovered.append(UncoveredParameter(names.get(id(p), f"<param {index}>"), p, reason))
    layers = tuple(TappedLayer(name, module, "weight" in covered[id(module)], "bias" in covered[id(module)])
                   for name, module in model.named_modules() if id(module) in covered)
    mixing = tuple(name for name, module in model.named_modules() if isinstance(module, _MIXING))
    return LayerCoverage(layers, tuple(uncovered), mixing)


def _uncovered_reason(p: torch.Tensor, holders: list[tuple[str, nn.Module, str]],
                      reasons: dict[int, str | None]) -> str | None:
    """Why a trained parameter held by ``holders`` is not covered; None when it is."""
    if not holders:
        return "not a parameter of the model"
    if len({id(module) for _, module, _ in holders}) > 1:
        return "shared by modules " + " and ".join(f"'{name}'" for name, _, _ in holders)
    if isinstance(p, nn.parameter.UninitializedParameter):
        return "not initialised yet (a lazy module before its first forward pass)"
    return reasons[id(holders[0][1])]


# Modules whose training-mode output for one sample depends on the other samples of the batch.
_MIXING = (nn.modules.batchnorm._BatchNorm,)


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every distinct module holding it directly, as (module name, module, local name)."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():  # each module once, under its first name
        for local, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, module, local))
    return owners


def _module_reasons(model: nn.Module) -> dict[int, str | None]:
    """id(module) -> why its parameters' per-sample norms are not read, or None when they are."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    reasons: dict[int, str | None] = {}
    for name, module in model.named_modules():
        parent = next((a for a in attention if name.startswith(a + ".") or (a == "" and name)), None)
        if parent is not None:
            reasons[id(module)] = f"used directly by its parent MultiheadAttention '{parent}'"
        else:
            reasons[id(module)] = _kind_reason(module, name)
    return reasons


def _kind_reason(module: nn.Module, name: str) -> str | None:
    """Why a module's own parameters are not measured, from its kind; None when they are."""
    kind = _kind_of(module)
    label = type(module).__name__
    if kind is None:
        if isinstance(module, _MIXING):
            return f"{label} normalises over the batch, which mixes the samples' gradients"
        where = f"module '{name}'" if name else "the model"
        return f"{label} ({where}) is not a layer kind whose per-sample norms are read"
    if type(module).forward is not kind.forward:
        return f"{label} overrides {kind.__name__}.forward"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "an Embedding with scale_grad_by_freq scales by the whole batch's id counts"
    return None


# --- the per-sample squared norms of each layer kind -----------------------------------------------
#
# Each function gets the layer, its recorded input x and the gradient g reaching its output in the
# backward pass, and returns (B,) squared norms of the trained parameters' per-sample gradients. The
# gradient is whatever was backpropagated: for the batch's mean loss its rows are δ_i/B, so the
# result is ‖∇ℓ_i‖²/B².

# `_outer_squares` costs B·G·T²·(O + I) multiplications and B·G·T² numbers by the Gram trick,
# B·G·T·O·I multiplications and B·G·O·I numbers by forming the per-sample gradients.
def _gram_is_cheaper(positions: int, outputs: int, inputs: int) -> bool:
    """Whether Σ_{t,s}(δ_t·δ_s)(a_t·a_s) costs fewer multiplications than forming Σ_t δ_t a_tᵀ."""
    return positions * (outputs + inputs) < outputs * inputs


def _outer_squares(deltas: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """‖Σ_t δ_t a_tᵀ‖² summed over groups, per sample (Goodfellow 2015; Li et al. 2022 §4).

    Args:
        deltas: δ, (B, G, T, O): output gradients of G independent groups at T positions.
        inputs: a, (B, G, T, I): the matching inputs.

    Returns:
        (B,): Σ_g ‖Σ_t δ_gt a_gtᵀ‖²_F, by ‖δ‖²‖a‖² when T = 1, else by the Gram trick
        Σ_{t,s}(δ_t·δ_s)(a_t·a_s) or by forming the (B, G, O, I) gradients, whichever is cheaper.
    """
    positions, outputs, width = deltas.shape[2], deltas.shape[3], inputs.shape[3]
    if positions == 1:
        return (deltas.square().sum(-1) * inputs.square().sum(-1)).sum((1, 2))
    if _gram_is_cheaper(positions, outputs, width):
        return ((deltas @ deltas.mT) * (inputs @ inputs.mT)).sum((1, 2, 3))  # (B, G, T, T) each
    return (deltas.mT @ inputs).square().sum((1, 2, 3))  # (B, G, O, I)


def _linear_squares(layer: TappedLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.Linear on (B, in) or (B, *, in): z_t = W a_t + b, ∇_W ℓ_i = Σ_t δ_t a_tᵀ, ∇_b ℓ_i = Σ_t δ_t."""
    _require_batched(layer, x, 2)
    if x.dim() == 2:  # the common (B, in) case in few ops: ‖δ_i‖² (‖a_i‖²·[W trained] + [b trained])
        squares = g.square().sum(-1)  # (B,)
        if not layer.weight:
            return squares
        inputs = x.square().sum(-1)
        return squares.mul_(inputs.add_(1.0) if layer.bias else inputs)
    batch = x.shape[0]
    deltas = g.reshape(batch, 1, -1, g.shape[-1])  # (B, 1, T, out)
    total = _zeros(batch, g)
    if layer.weight:
        total += _outer_squares(deltas, x.reshape(batch, 1, -1, x.shape[-1]))
    if layer.bias:
        total += deltas.sum(2).square().sum((1, 2))
    return total


def _conv_squares(layer: TappedLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.ConvNd: a linear layer per group over the unfolded input (Rochette et al. 2019; Opacus).

    With U(x) the (B, C_in·K, L) patches of the input (`_unfold`) and δ the (B, C_out, L) output
    gradient, group k's per-sample weight gradient is δ_k U_k(x)ᵀ, the bias gradient Σ_l δ_l.
    """
    conv = cast(nn.modules.conv._ConvNd, layer.module)
    _require_batched(layer, x, len(conv.kernel_size) + 2)
    batch, groups = x.shape[0], conv.groups
    deltas = g.reshape(batch, groups, conv.out_channels // groups, -1)  # (B, G, C_out/G, L)
    total = _zeros(batch, g)
    if layer.weight:
        patches = _unfold(conv, x)  # (B, C_in·K, L)
        patches = patches.view(batch, groups, -1, patches.shape[-1])  # (B, G, C_in/G·K, L)
        total += _outer_squares(deltas.mT, patches.mT)
    if layer.bias:
        total += deltas.sum(-1).square().sum((1, 2))
    return total


def _unfold(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The patches each output position of ``conv`` sees: (B, C_in·K, L), channels then kernel offsets
    (the order of ``conv.weight.view(C_out, -1)``), for any stride, padding, dilation and padding mode."""
    padding = conv._reversed_padding_repeated_twice  # what the layer's own forward pads (F.pad order)
    if any(padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, padding, mode=mode)
    spatial = len(conv.kernel_size)
    for dim, (size, stride, dilation) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + dim, dilation * (size - 1) + 1, stride)  # appends a window dimension
        if dilation > 1:
            x = x[..., ::dilation]
    # (B, C, L_1..L_n, K_1..K_n) -> (B, C, K_1..K_n, L_1..L_n)
    order = (0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
    return x.permute(order).reshape(x.shape[0], x.shape[1] * math.prod(conv.kernel_size), -1)


# Up to this many ids per sample, an Embedding's norms use the (B, T, T) Gram of its rows; beyond,
# one sort of the (sample, id) pairs and a segment sum (O(B·T·D), but a device synchronisation).
EMBEDDING_GRAM_MAX_IDS = 64


def _embedding_squares(layer: TappedLayer, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.Embedding: ∇_W ℓ_i puts Σ_{t: id_t = v} δ_t in row v, so
    ‖∇_W ℓ_i‖² = Σ_{t,s} [id_t = id_s] δ_t·δ_s; positions holding ``padding_idx`` get no gradient."""
    _require_batched(layer, ids, 1)
    batch, width = ids.shape[0], g.shape[-1]
    ids = ids.reshape(batch, -1)  # (B, T)
    deltas = g.reshape(batch, -1, width)  # (B, T, D)
    embedding = cast(nn.Embedding, layer.module)
    if embedding.padding_idx is not None:
        deltas = deltas * (ids != embedding.padding_idx).unsqueeze(-1)
    if ids.shape[1] == 1:
        return deltas.square().sum((1, 2))
    if ids.shape[1] <= EMBEDDING_GRAM_MAX_IDS:
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, T, T)
        return ((deltas @ deltas.mT) * same).sum((1, 2))
    return _segment_squares(ids, deltas, embedding.num_embeddings)


def _segment_squares(ids: torch.Tensor, deltas: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """Σ_v ‖Σ_{t: id_t = v} δ_t‖² per sample, by summing the rows of each (sample, id) pair."""
    batch, width = deltas.shape[0], deltas.shape[-1]
    keys = ids + vocabulary * torch.arange(batch, device=ids.device).unsqueeze(1)  # (B, T): one per pair
    pairs, which = torch.unique(keys.flatten(), return_inverse=True)
    rows = deltas.new_zeros(pairs.shape[0], width).index_add_(0, which, deltas.reshape(-1, width))
    return _zeros(batch, deltas).index_add_(0, pairs // vocabulary, rows.square().sum(-1))


def _norm_squares(layer: TappedLayer, normalised: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """An elementwise affine y_t = w ⊙ x̂_t + b, with g and x̂ as (B, T, *affine dims):
    ∇_w ℓ_i = Σ_t δ_t ⊙ x̂_t and ∇_b ℓ_i = Σ_t δ_t, t over every position that shares w and b.
    ``normalised`` is None when the weight is not trained."""
    batch = g.shape[0]
    total = _zeros(batch, g)
    if normalised is not None:
        total += (g * normalised).sum(1).square().flatten(1).sum(1)
    if layer.bias:
        total += g.sum(1).square().flatten(1).sum(1)
    return total


def _layer_norm_squares(layer: TappedLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm: x̂ = (x − mean)/√(var + ε) over the normalised dims (var biased), y = w ⊙ x̂ + b."""
    norm = cast(nn.LayerNorm, layer.module)
    shape = tuple(norm.normalized_shape)
    _require_batched(layer, x, len(shape) + 1)
    dims = tuple(range(-len(shape), 0))
    normalised = None
    if layer.weight:
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        normalised = ((x - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape[0], -1, *shape)
    return _norm_squares(layer, normalised, g.reshape(g.shape[0], -1, *shape))


def _rms_norm_squares(layer: TappedLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.RMSNorm: x̂ = x/√(mean(x²) + ε) over the normalised dims (ε defaults to the dtype's eps), y = w ⊙ x̂."""
    norm = cast(Any, layer.module)  # nn.RMSNorm, absent from older torch
    shape = tuple(norm.normalized_shape)
    _require_batched(layer, x, len(shape) + 1)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    dims = tuple(range(-len(shape), 0))
    normalised = (x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)).reshape(x.shape[0], -1, *shape)
    return _norm_squares(layer, normalised, g.reshape(g.shape[0], -1, *shape))


def _group_norm_squares(layer: TappedLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm on (B, C, *): x̂ normalised within each sample's channel groups, y_c = w_c x̂_c + b_c."""
    norm = cast(nn.GroupNorm, layer.module)
    _require_batched(layer, x, 2)
    batch, channels = x.shape[0], x.shape[1]
    normalised = None
    if layer.weight:
        grouped = x.reshape(batch, norm.num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=-1, correction=0, keepdim=True)
        normalised = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(batch, channels, -1).mT  # (B, L, C)
    return _norm_squares(layer, normalised, g.reshape(batch, channels, -1).mT)


# The measured kinds, each with its norms; a subclass is measured when it keeps the kind's forward.
_SQUARES: dict[type[nn.Module], Callable[[TappedLayer, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Linear: _linear_squares, nn.Conv1d: _conv_squares, nn.Conv2d: _conv_squares, nn.Conv3d: _conv_squares,
    nn.Embedding: _embedding_squares, nn.LayerNorm: _layer_norm_squares, nn.GroupNorm: _group_norm_squares,
}  # fmt: skip
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _SQUARES[nn.RMSNorm] = _rms_norm_squares


def _kind_of(module: nn.Module) -> type[nn.Module] | None:
    """The measured kind ``module`` is an instance of, or None."""
    return next((kind for kind in _SQUARES if isinstance(module, kind)), None)


def _require_batched(layer: TappedLayer, x: torch.Tensor, dims: int) -> None:
    if x.dim() < dims:
        raise TapError(f"layer '{layer.name}' got an input of shape {tuple(x.shape)} without a batch dimension; "
                       f"per-sample norms need samples along dimension 0")


def _zeros(batch: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(batch)


# --- the taps --------------------------------------------------------------------------------------


class _Record:
    """One training forward pass of a layer: its input (detached) and, once the backward pass reaches
    it, the gradient of its output."""

    __slots__ = ("input", "grad")

    def __init__(self, x: torch.Tensor):
        self.input: torch.Tensor = x
        self.grad: torch.Tensor | None = None


class _Slot:
    """A tapped layer's latest record, and whether an earlier call's output reached a backward pass
    after a later call was recorded (the layer ran twice for one loss)."""

    __slots__ = ("layer", "squares", "record", "repeated")

    def __init__(self, layer: TappedLayer):
        self.layer = layer
        self.squares = _SQUARES[cast(type[nn.Module], _kind_of(layer.module))]  # the layer kind's norms
        self.record: _Record | None = None
        self.repeated = False


class _Switch:
    __slots__ = ("active",)

    def __init__(self):
        self.active = True


class LayerTaps:
    """Forward hooks on tapped layers giving per-sample gradient squared norms from the caller's own
    backward pass (ghost norms: Goodfellow 2015; Li et al. 2022; Rochette et al. 2019 for convolutions).

    Each forward pass with a graph (not one under ``torch.no_grad`` or ``torch.inference_mode``, nor
    while `active` is False) records every tapped layer's input, detached, and hooks the layer's
    output so that the gradient reaching it in the next backward pass is kept: no extra backward
    pass, no per-sample gradient formed unless that is cheaper. When the backward pass is the
    batch's mean loss, the gradient's rows are δ_i/B, and `take` returns Σ_params ‖∇ℓ_i/B‖² per
    sample i (the convention of ``probes.LinearTaps.take_terms``, summed over its rows). A backward
    pass of a loss multiplied by s (an AMP GradScaler's scale) gives s² times that.

    A later forward pass replaces the record; a second backward pass through the same graph replaces
    the kept gradient (the last one wins). A layer that runs twice for one loss (a module called
    twice, or two forward passes summed into one loss) has per-sample gradients that are sums over
    its calls: its earlier call's gradient arriving after the later call was recorded marks it in
    `repeated`, and `take` refuses the step. Activation checkpointing (``torch.utils.checkpoint``,
    reentrant or not) is not a second call: a forward pass recomputed inside the backward pass is
    recorded only when the layer holds no record awaiting its gradient.

    The hooks are removed by `close`, on leaving a ``with`` block, or when the taps are garbage.

    Args:
        layers: a `LayerCoverage` (its ``layers`` are tapped) or the `TappedLayer`\\ s to tap.

    Example:
        >>> coverage = per_sample_layers(model)
        >>> taps = LayerTaps(coverage)
        >>> loss = loss_fn(model(x), y)           # mean over the batch
        >>> loss.backward()
        >>> squares = taps.take()                  # (B,): Σ_params ‖∇ℓ_i‖²/B²
    """

    def __init__(self, layers: LayerCoverage | Sequence[TappedLayer]):
        self.layers: tuple[TappedLayer, ...] = tuple(layers.layers if isinstance(layers, LayerCoverage) else layers)
        self._slots = [_Slot(layer) for layer in self.layers]
        self._switch = _Switch()
        # The hooks hold the slots and the switch, never the taps: the taps can be garbage.
        handles = [slot.layer.module.register_forward_hook(_recorder(slot, self._switch), with_kwargs=True)
                   for slot in self._slots]
        self._finalizer = weakref.finalize(self, remove_hooks, handles)

    @property
    def active(self) -> bool:
        """Whether forward passes are recorded (a caller measuring every k-th step switches the
        others off, which then cost one attribute read per tapped layer)."""
        return self._switch.active

    @active.setter
    def active(self, value: bool) -> None:
        self._switch.active = bool(value)

    @property
    def pending(self) -> bool:
        """Whether a backward pass has reached a tapped layer since its forward pass was recorded (or a
        layer ran twice): `take` then has something to return or to refuse."""
        return any(slot.repeated or (slot.record is not None and slot.record.grad is not None) for slot in self._slots)

    def take_nothing(self) -> None:
        """Empty the taps without reading them (a step that is not measured)."""
        for slot in self._slots:
            slot.record, slot.repeated = None, False

    @property
    def repeated(self) -> tuple[str, ...]:
        """The names of the tapped layers seen running twice for one loss since the last `take`."""
        return tuple(slot.layer.name for slot in self._slots if slot.repeated)

    def take(self, batch_size: int | None = None) -> torch.Tensor:
        """The per-sample squared gradient norms of the latest backward pass, summed over the tapped
        layers' trained parameters; the taps are emptied.

        For the batch's mean loss L = (1/B) Σ_i ℓ_i, entry i is Σ_l ‖∇_{θ_l} ℓ_i‖²/B² over the tapped
        parameters θ_l. A layer the backward pass did not reach (or that did not run) adds 0.

        Args:
            batch_size: the batch's size B, checked against the recorded inputs when given.

        Returns:
            (B,) tensor on the layers' device, in float64 if the layers computed in float64, else
            float32 (float16 and bfloat16 records are summed in float32).

        Raises:
            TapError: a layer ran twice for one loss (`repeated`), no backward pass reached any
                tapped layer since its forward pass, or the layers' first dimensions (or
                ``batch_size``) disagree.
        """
        records = [(slot, slot.record) for slot in self._slots if slot.record is not None]
        repeated = self.repeated
        for slot in self._slots:  # drop the batch's tensors whatever happens next
            slot.record, slot.repeated = None, False
        if repeated:
            raise TapError(f"layers {', '.join(repr(n) for n in repeated)} ran more than once for one loss (a "
                           f"module called twice, or two forward passes in one loss); their per-sample norms "
                           f"are not read")
        reached = [(slot, r) for slot, r in records if r.grad is not None]
        if not reached:
            raise TapError("no backward pass reached the tapped layers since their forward pass with a graph; "
                           "call take() after loss.backward()")
        _check_batch(reached, batch_size)
        with torch.no_grad():
            parts = [_squares_of(slot, record) for slot, record in reached]
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
            return torch.stack([p.to(dtype) for p in parts]).sum(0) if len(parts) > 1 else parts[0].to(dtype)

    def close(self) -> None:
        """Remove the hooks (idempotent); the taps record nothing more."""
        self._finalizer()
        for slot in self._slots:
            slot.record = None

    def __enter__(self) -> LayerTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recorder(slot: _Slot, switch: _Switch):
    """The forward hook of one tapped layer."""

    def record(module, args, kwargs, output):
        if not switch.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # not recording, or an evaluation pass without a graph
        if _in_backward() and slot.record is not None and slot.record.grad is None:
            return  # activation checkpointing recomputing a forward pass whose record awaits its gradient
        x = args[0] if args else kwargs["input"]
        current = _Record(x.detach())  # without its graph: nothing made of it is recorded
        slot.record = current

        def keep(grad):
            if slot.record is current:
                current.grad = grad  # the last backward pass through this output wins
            else:
                slot.repeated = True  # an earlier call's output reached a backward pass after a later call

        output.register_hook(keep)  # a hook sees the gradient of this output even if it is later modified in place

    return record


def _in_backward() -> bool:
    """Whether a backward pass is running (a forward pass now is activation checkpointing's recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def remove_hooks(handles) -> None:
    """Remove hook ``handles`` (run by a finalizer when the taps holding them are garbage)."""
    for handle in handles:
        handle.remove()


def _check_batch(reached: list[tuple[_Slot, _Record]], batch_size: int | None) -> None:
    sizes = {slot.layer.name: record.input.shape[0] if record.input.dim() else None for slot, record in reached}
    expected = {batch_size} if batch_size is not None else set(sizes.values())
    if len(expected) > 1 or any(size not in expected for size in sizes.values()):
        shown = ", ".join(f"'{name}': {size}" for name, size in sizes.items())
        want = f" (batch size {batch_size})" if batch_size is not None else ""
        raise TapError(f"the tapped layers' inputs disagree on the number of samples along dimension 0{want}: "
                       f"{shown}; per-sample norms need every layer's samples along dimension 0")


def _squares_of(slot: _Slot, record: _Record) -> torch.Tensor:
    """One layer's (B,) squared norms; half-precision records (AMP) are computed in float32."""
    x, g = record.input, cast(torch.Tensor, record.grad)
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return slot.squares(slot.layer, x, g)
