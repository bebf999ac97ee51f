"""The probe protocol: measurements of training dynamics taken inside the step.

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
scale's moving averages) advance once per measured step. A driver that reads many steps at once
may get a `DeferredRead` for a step, which `ProbeSet.settle` replaces by its values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ..errors import ConfigError

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
