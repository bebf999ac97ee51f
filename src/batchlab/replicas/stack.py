"""The stacked replicas: their tensors along a leading dimension, calling one skeleton with them, and
dropout masks drawn outside vmap."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..config import TrainConfig
from ..errors import ConfigError
from ..optim import init_stacked_state


# --- dropout masks drawn outside vmap -------------------------------------------------------------


class FedDropout(nn.Module):
    """``nn.Dropout`` whose scaled mask is given (buffer ``mask``) instead of drawn.

    Torch's global RNG cannot serve R replicas inside vmap. The masks are drawn outside, per
    replica, with the exact call ``F.dropout`` makes on the CPU (``bernoulli_(1-p)`` then
    ``div_(1-p)``), and multiplied in here as ``F.dropout`` does.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.mask  # (b, *shape) * (b, *shape)


@dataclass(frozen=True)
class DropoutSite:
    """One dropout layer: its mask's name for functional_call, its rate and per-sample shape."""

    key: str
    p: float
    shape: tuple[int, ...]


def _feed_dropout(skeleton: nn.Module, example_model: nn.Module, x: torch.Tensor) -> list[DropoutSite]:
    """Replace every ``nn.Dropout`` of ``skeleton`` by `FedDropout`; return the sites in call order."""
    names = [name for name, m in skeleton.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    unsupported = [n for n in names if type(skeleton.get_submodule(n)) is not nn.Dropout]
    if unsupported:
        kind = type(skeleton.get_submodule(unsupported[0])).__name__
        raise ConfigError(f"replicas support nn.Dropout only, the model has {kind} at {unsupported[0]!r}; "
                          "train this model with fit")
    calls: list[tuple[str, tuple[int, ...]]] = []
    probe = copy.deepcopy(example_model)
    hooks = [probe.get_submodule(n).register_forward_hook(
        lambda m, inputs, out, n=n: calls.append((n, tuple(inputs[0].shape[1:])))) for n in names]
    probe.train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe(x)
    for hook in hooks:
        hook.remove()
    if sorted(n for n, _ in calls) != sorted(names):
        raise ConfigError("replicas need every dropout layer called exactly once per forward pass; "
                          "train this model with fit")
    sites = []
    for name, shape in calls:
        p = skeleton.get_submodule(name).p
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, FedDropout(p))
        sites.append(DropoutSite(f"{name}.mask", p, shape))
    return sites


def draw_masks(sites: Sequence[DropoutSite], generators: Sequence[torch.Generator], batch: int,
               device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Each replica's dropout masks for one step, drawn from its own generator in forward order.

    ``dtype`` is the activations' dtype: ``F.dropout`` draws and scales its mask in that dtype, so
    a float32 mask would round 1/(1-p) differently from a float64 run's.

    Returns:
        ``{site.key: (R, batch, *site.shape)}`` scaled masks (0 or 1/(1-p)).
    """
    masks = {}
    for site in sites:
        keep = 1.0 - site.p
        mask = torch.empty((len(generators), batch, *site.shape), device=device, dtype=dtype)  # (R, b, *shape)
        if keep == 0.0:
            mask.zero_()
        else:
            for row, generator in zip(mask, generators):
                row.bernoulli_(keep, generator=generator)
            mask.div_(keep)
        masks[site.key] = mask
    return masks


# --- calling the skeleton with given tensors ------------------------------------------------------


class _TensorSlots:
    """Calls a module with given tensors in place of named parameters and buffers, cheaply.

    ``torch.func.functional_call`` re-resolves every name, checks for tied weights and flattens
    pytrees on every call: about 0.3 ms per step here, where the whole update of a small model
    takes less. The skeleton is private to the pass, so its slots (module, name) are resolved once
    and each call assigns the tensors into them and puts the originals back. A model with tied
    weights keeps ``functional_call``, which unties them.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module, self.names = module, list(names)
        shared = (len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.named_parameters()))
                  or len(list(module.named_buffers(remove_duplicate=False))) != len(list(module.named_buffers())))
        self.slots: list[dict[str, Any]] | None = None
        self.keys: list[str] = []
        if not shared:
            self.slots, self.keys = [], []
            for name in self.names:
                parent, _, leaf = name.rpartition(".")
                owner = module.get_submodule(parent) if parent else module
                self.slots.append(owner._parameters if leaf in owner._parameters else owner._buffers)
                self.keys.append(leaf)

    def __call__(self, tensors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return functional_call(self.module, dict(zip(self.names, tensors)), (x,))
        originals = [slot[key] for slot, key in zip(self.slots, self.keys)]
        try:
            for slot, key, tensor in zip(self.slots, self.keys, tensors):
                slot[key] = tensor
            return self.module(x)
        finally:
            for slot, key, tensor in zip(self.slots, self.keys, originals):
                slot[key] = tensor


# --- the stacked state ---------------------------------------------------------------------------


def _per_replica_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each replica's global L2 norm over a list of stacked tensors (R, ...) -> (R,).

    The same reduction as `batchlab.probes.global_norm`: the norm of the per-tensor norms.
    """
    norms = [torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors]  # each (R,)
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


class _Stack:
    """The active replicas' weights, buffers and optimizer state, stacked along dimension 0."""

    def __init__(self, models: Sequence[nn.Module], config: TrainConfig, probes: Sequence[str], device):
        self.param_names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        with torch.no_grad():
            self.params = [torch.stack([m.get_parameter(n).detach() for m in models]).to(device).requires_grad_()
                           for n in self.param_names]  # each (R, *shape), a leaf
            self.buffers = [torch.stack([m.get_buffer(n) for m in models]).to(device) for n in self.buffer_names]
        self.optimizer_state = init_stacked_state(config.optimizer, self.params)
        self.initial = [p.detach().clone() for p in self.params] if "dist_from_init" in probes else None
        self.previous = [p.detach().clone() for p in self.params] if "update_norm" in probes else None
        self.hyper: dict[str, np.ndarray] = {}

    def relayout(self, gradients: Sequence[torch.Tensor]) -> None:
        """Store every parameter (and its optimizer state) in the memory layout of its gradient.

        Under vmap a linear layer's weight gradient comes out transposed, (R, in, out) in memory.
        Weights stored the same way make the update's elementwise passes run on aligned strides
        (measured: the SGD update 2-3x faster at R=64) and the forward's batched matmul read the
        weight without a transpose.
        """
        with torch.no_grad():
            self.params = [torch.empty_like(g).copy_(p).requires_grad_() for p, g in zip(self.params, gradients)]
        self.optimizer_state = {k: [torch.empty_like(p).copy_(t) for p, t in zip(self.params, v)]
                                for k, v in self.optimizer_state.items()}
        for name in ("initial", "previous"):
            if getattr(self, name) is not None:
                setattr(self, name, [torch.empty_like(p).copy_(t) for p, t in zip(self.params, getattr(self, name))])

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every replica but ``rows`` (positions in the stack), keeping each tensor's layout."""
        index = torch.tensor(list(rows), device=self.params[0].device)

        def select(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t[: len(rows)]).copy_(t.index_select(0, index))

        with torch.no_grad():
            self.params = [select(p.detach()).requires_grad_() for p in self.params]
            self.buffers = [select(b) for b in self.buffers]
            self.optimizer_state = {k: [select(t) for t in v] for k, v in self.optimizer_state.items()}
            if self.initial is not None:
                self.initial = [select(t) for t in self.initial]
            if self.previous is not None:
                self.previous = [select(t) for t in self.previous]
        self.hyper = {k: v[list(rows)] for k, v in self.hyper.items()}

    def attach(self, model: nn.Module, row: int) -> None:
        """Make ``model``'s parameters and buffers views of stack row ``row`` (live weights)."""
        with torch.no_grad():
            for name, stacked in zip(self.param_names, self.params):
                model.get_parameter(name).data = stacked.detach()[row]
            for name, stacked in zip(self.buffer_names, self.buffers):
                model.get_buffer(name).data = stacked[row]

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Give ``model`` its own copy of its weights (before the stack changes)."""
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.data = tensor.data.clone()



# --- training ------------------------------------------------------------------------------------
