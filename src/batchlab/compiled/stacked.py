"""The replicas' stacked step as one compiled graph: R models' forward, backward and update.

`StackedStep` compiles what the replicas' eager pass does per step — a vmapped forward of the
skeleton over stacked weights (R, *shape), each replica's mean batch loss, the gradients of their
sum, the stacked optimizer update — into one graph. Per-replica learning rates (and momenta or
weight decays when they differ) are (R,) tensor inputs, so a schedule, a learning-rate grid or a
new set of replicas of the same architecture reuses the graph; one graph is compiled per distinct
(R, B) shape and kept for the process (and across processes by torch's compile cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, vmap

from ..errors import error_line
from ..optim.transforms import Chain, State, signature
from ..record import StepNumbers
from .step import compiled_already, compiled_copy, log


def stacked_train_step(skeleton: torch.nn.Module, names: tuple[str, ...], params: list[torch.Tensor],
                       extras: list[torch.Tensor], state: State, chain: Chain,
                       lr: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, loss_fn: Callable,
                       classification: bool) -> StepNumbers:
    """One update of R stacked replicas, in place.

    Args:
        skeleton: one replica's module, called with each replica's tensors in turn (under vmap).
        names: the names of ``params`` then ``extras`` in the skeleton.
        params: stacked parameters (R, *shape), leaves requiring grad.
        extras: stacked buffers and dropout masks (R, ...), passed to the forward as they are.
        state: the chain's stacked state (each tensor (R, *shape); ``step`` ()).
        chain: the optimizer (`batchlab.optim.stacked_chain`): shared hyperparameters as floats,
            differing ones as (R,) tensors.
        lr: (R,) float64, each replica's learning rate at this step.
        xb, yb: (R, b, *shape) and (R, b): each replica's batch.
        loss_fn: per-sample loss ``f(output, y) -> (n,)``.
        classification: whether to count correct samples.

    Returns:
        (R,) mean batch losses and (R,) correct counts (the losses again for regression).
    """
    def forward(tensors, x):
        return functional_call(skeleton, dict(zip(names, tensors)), (x,))

    output = vmap(forward, in_dims=(0, 0))((*params, *extras), xb)  # (R, b, K)
    n, b = output.shape[:2]
    # The loss outside vmap on (R·b, K) rows, as the eager replicas compute it.
    losses = loss_fn(output.reshape(n * b, *output.shape[2:]), yb.reshape(n * b, *yb.shape[2:])).reshape(n, b)
    loss = losses.mean(dim=1)  # (R,)
    grads = torch.autograd.grad(loss.sum(), params)  # each replica: the gradient of its own mean loss
    with torch.no_grad():
        chain.step(params, list(grads), state, lr)
    correct = (output.detach().argmax(dim=2) == yb).sum(dim=1) if classification else loss.detach()
    return StepNumbers(loss.detach(), correct)


class StackedStep:
    """``step(params, extras, state, lr, xb, yb)``: `stacked_train_step` compiled once per shape.

    Falls back to the same function run eagerly, with one line saying why, when the skeleton
    cannot be captured.
    """

    def __init__(self, skeleton: torch.nn.Module, names: Sequence[str], chain: Chain, loss_fn: Callable,
                 classification: bool):
        self.skeleton, self.names, self.chain = skeleton, tuple(names), chain
        self.loss_fn, self.classification = loss_fn, classification
        self.key = (repr(skeleton), self.names, signature(chain), classification, loss_fn)
        self.compiled: dict[tuple, Callable] = {}
        self.fallback_reason: str | None = None

    def _key(self, x_shape: tuple, y_shape: tuple, dtype: torch.dtype, device_type: str) -> tuple:
        return (*self.key, (tuple(x_shape), tuple(y_shape)), dtype, device_type)

    def compiled_before(self, shapes: Sequence[tuple[tuple, tuple]], dtype: torch.dtype, device_type: str) -> bool:
        """Whether this process already compiled a graph for every (xb shape, yb shape): then compiling is free."""
        return all(compiled_already(self._key(x, y, dtype, device_type)) for x, y in shapes)

    def __call__(self, params: list[torch.Tensor], extras: list[torch.Tensor], state: State,
                 lr: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> StepNumbers:
        """One update of every replica; ``params``, ``extras`` (buffers) and ``state`` change in place."""
        args = (self.skeleton, self.names, params, extras, state, self.chain, lr, xb, yb, self.loss_fn,
                self.classification)
        if self.fallback_reason is not None:
            return stacked_train_step(*args)
        shape = (tuple(xb.shape), tuple(yb.shape))
        fn = self.compiled.get(shape)
        if fn is not None:
            try:
                return fn(*args)
            except torch._dynamo.exc.Unsupported:
                pass  # a guard failed; retrace with the flag below
        fn = compiled_copy(stacked_train_step, self._key(*shape, xb.dtype, xb.device.type), xb.device)
        try:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                out = fn(*args)
        except Exception as error:  # noqa: BLE001 -- any compiler failure means: train eagerly
            self.fallback_reason = error_line(error)
            log.warning("compile: %s; these replicas train eagerly", self.fallback_reason)
            return stacked_train_step(*args)
        self.compiled[shape] = fn
        return out
