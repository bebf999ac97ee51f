"""Per-sample gradient norms for the noise scale, read off the loop's own backward pass.

`LinearTaps` for an nn.Sequential stack of nn.Linear layers and per-sample maps (three ops a step,
whatever the depth); `GhostTaps` over `per_sample.LayerTaps` for any other model whose trained
parameters all belong to layers `per_sample.per_sample_layers` measures; `noise_taps` picks one
for a run, or says why none fits.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .base import ProbeContext
from .norms import global_norm
from .per_sample import LayerCoverage, LayerTaps, per_sample_layers, remove_hooks

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


def noise_taps(ctx: "ProbeContext") -> tuple[LinearTaps | GhostTaps | None, str]:
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
