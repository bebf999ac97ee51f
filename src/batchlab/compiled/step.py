"""One training step as one compiled graph: forward, backward, update and the batch's numbers.

For the small models batchlab studies, an eager step on the CPU is mostly dispatch overhead
(~10 µs per operation, dozens of operations per step). `CompiledStep` traces the whole step —
forward, ``torch.autograd.grad``, the optimizer update (a `batchlab.optim.Chain`) and the
batch's mean loss and correct count — into one graph with ``torch.compile(fullgraph=True)``:
inductor's C++ kernels on the CPU, CUDA graphs on a GPU. The weights, buffers (batch norm's
running statistics) and optimizer state are mutated in place, so the model and the torch
optimizer hold the trained state at every moment, as after an eager step.

Dropout draws its masks through torch's own RNG calls (inductor's ``fallback_random``), so a
seeded compiled run uses the same masks as the eager run. Shapes are static: one graph per
distinct batch shape (a short last batch is a second one); a dynamic batch dimension was measured
2-4x slower per step (docs/compile.md). A model the compiler cannot capture trains eagerly, with
one line saying why.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import error_line
from ..optim.transforms import Chain, State, signature
from ..record import StepNumbers
from .updates import optimizer_as_chain

log = logging.getLogger("batchlab.compiled")


def train_step(model: torch.nn.Module, params: list[torch.Tensor], state: State,
               chain: Chain, lr: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
               mean_loss_fn: Callable, classification: bool) -> StepNumbers:
    """Forward, backward and one optimizer update of ``model`` on one batch, in place.

    The plain function that `CompiledStep` compiles (and calls as it is when it falls back).

    Args:
        model: in train mode; its forward may update buffers (batch norm) as in eager training.
        params: the parameters the optimizer updates (its one parameter group).
        state: the optimizer's state in torch.optim's format (`batchlab.optim.torch_state`).
        chain: the optimizer as a chain (`batchlab.optim.chain_of`).
        lr: () float64, this step's learning rate.
        xb, yb: the batch, (B, *shape) and (B,) or (B, *target_shape).
        mean_loss_fn: ``f(output, yb) -> ()`` the batch's mean loss.
        classification: whether to count correct samples.

    Returns:
        The batch's mean loss and correct count, at the weights before the update.
    """
    output = model(xb)  # (B, K)
    loss = mean_loss_fn(output, yb)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        chain.step(params, list(grads), state, lr)
    correct = (output.detach().argmax(dim=1) == yb).sum() if classification else None
    return StepNumbers(loss.detach(), correct)


# Consecutive steps one CPU graph runs (`train_steps`): a compiled call costs ~80 µs of guards and
# wrappers whatever it computes, most of a small model's compiled step; four steps per call cut it
# to a quarter. Measured at B=32 (MLP 40-100-100-10, one thread): 175 µs per step one at a time,
# 96 µs four at a time, 105 µs eight at a time; compiling four took 13 s cold, one 7 s.
CHUNK = 4


def train_steps(model: torch.nn.Module, params: list[torch.Tensor], state: State,
                chain: Chain, lrs: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                mean_loss_fn: Callable, classification: bool) -> StepNumbers:
    """``len(xs)`` consecutive `train_step` calls, one per batch (unrolled into one graph when compiled).

    Args:
        lrs: (K,) float64, each step's learning rate.
        xs, ys: (K, B, *shape) and (K, B) or (K, B, *target_shape), the K batches in order.

    Returns:
        Each step's mean loss and correct count, (K,) each, at the weights before its update.
    """
    losses, corrects = [], []
    for k in range(xs.shape[0]):
        numbers = train_step(model, params, state, chain, lrs[k], xs[k], ys[k], mean_loss_fn, classification)
        losses.append(numbers.loss)
        corrects.append(numbers.correct)
    return StepNumbers(torch.stack(losses), torch.stack(corrects) if classification else None)


def compiler_options(device: torch.device) -> dict[str, Any]:
    """Inductor's options: torch's RNG calls for dropout; CUDA graphs ("reduce-overhead") on a GPU."""
    return {"fallback_random": True, "triton.cudagraphs": device.type == "cuda", "cpp_wrapper": device.type == "cpu"}


_COMPILED: dict[tuple, Callable] = {}


def compiled_already(key: tuple) -> bool:
    """Whether `compiled_copy` has made the graph of ``key`` in this process (reusing it costs nothing)."""
    return key in _COMPILED


def compiled_copy(function: Callable, key: tuple, device: torch.device) -> Callable:
    """``torch.compile(function)`` for one (model architecture, optimizer, batch shape) ``key``.

    Dynamo keeps its graphs per code object, at most ``recompile_limit`` (8) of them before it
    silently runs eagerly. A private copy of the function's code per key keeps every shape of a
    study compiled, and a second model of the same architecture reuses the graph (its tensors are
    inputs, not constants): a study compiles once per shape, not once per run.
    """
    fn = _COMPILED.get(key)
    if fn is None:
        separate_cache_per_kernel_set()
        fresh = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
        fn = torch.compile(fresh, fullgraph=True, dynamic=False, options=compiler_options(device))
        _COMPILED[key] = fn
    return fn


def separate_cache_per_kernel_set() -> None:
    """Keep inductor's on-disk kernels apart for a process that sets ``ATEN_CPU_CAPABILITY``.

    Torch's compile cache (``TORCHINDUCTOR_CACHE_DIR``, shared by every process of a user) does not
    key its entries by that setting, and a kernel compiled on the CPU's own vector width, loaded by
    a process running on another kernel set, computes wrong numbers (torch 2.13: a float64 step
    compiled on AVX-512, then loaded under ``ATEN_CPU_CAPABILITY=default``, gives losses below zero).
    Such a process gets a cache folder of its own, named after the setting, unless the user chose
    a folder. (Importing ``torch._dynamo`` writes torch's default folder into the same variable:
    that one is not a choice. Torch reads the variable at each use, so the change holds from the
    next compilation on.)
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{capability.lower()}"


class CompiledStep:
    """``step(xb, yb) -> StepNumbers``: `train_step` compiled, falling back to eager when it cannot be.

    Example:
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        >>> step = CompiledStep(model, optimizer, torch.nn.functional.cross_entropy, classification=True)
        >>> step.set_lr(0.05)
        >>> loss, correct = step(X[:32], y[:32])

    Attributes:
        fallback_reason: ``None`` while compiled; else why the step runs eagerly.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mean_loss_fn: Callable,
                 classification: bool):
        """Read the optimizer as a chain and create its state in torch.optim's format.

        Raises:
            CompileUnsupported: an optimizer or option no chain reproduces.
        """
        self.model, self.mean_loss_fn, self.classification = model, mean_loss_fn, classification
        self.chain, self.state = optimizer_as_chain(optimizer)
        self.params = list(optimizer.param_groups[0]["params"])
        self.device = self.params[0].device
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float64, device=self.device)
        self.cuda_graphs = self.device.type == "cuda"
        if self.cuda_graphs:  # inputs a CUDA graph may mutate in place must keep their addresses
            for tensor in (self.lr, *(t for ts in self.state.values() for t in ts)):
                torch._dynamo.mark_static_address(tensor)
        self.architecture = repr(model)
        self.compiled: dict[tuple, Callable] = {}  # batch shape -> compiled step
        self.chunks: dict[tuple, Callable] = {}  # (K, *batch shape) -> compiled `train_steps`
        self.fallback_reason: str | None = None
        # Several steps per graph on the CPU; on a GPU CUDA graphs already remove the launch overhead.
        self.chunk_reason: str | None = None if self.device.type == "cpu" else "CUDA graphs"

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (a tensor input: a new value does not recompile)."""
        self.lr.fill_(lr)

    @property
    def mode(self) -> str:
        return "eager" if self.fallback_reason else "compiled"

    def _args(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple:
        return (self.model, self.params, self.state, self.chain, self.lr, xb, yb, self.mean_loss_fn,
                self.classification)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> StepNumbers:
        """One step on the batch ``(xb, yb)``; the model and optimizer state change in place."""
        if self.fallback_reason is None:
            fn = self.compiled.get(xb.shape)
            if fn is not None:
                try:
                    return self._outputs(fn(*self._args(xb, yb)))
                except torch._dynamo.exc.Unsupported:
                    pass  # a guard failed (e.g. the model's train/eval mode) and the retrace needs the flag below
            return self._compile_and_call(xb, yb)
        return train_step(*self._args(xb, yb))

    @property
    def chunked(self) -> bool:
        """Whether `steps` runs several steps per graph (else the loop calls one step at a time)."""
        return self.fallback_reason is None and self.chunk_reason is None

    def steps(self, xs: torch.Tensor, ys: torch.Tensor, lrs: torch.Tensor) -> StepNumbers | None:
        """K consecutive steps on the batches ``xs[k], ys[k]`` as one compiled graph (`train_steps`).

        Returns:
            (K,) losses and correct counts; None when the K-step graph cannot be compiled (said once;
            `chunked` is then False and the loop takes its steps one at a time).
        """
        if not self.chunked:
            return None
        fn = self.chunks.get(xs.shape)
        if fn is not None:
            try:
                return fn(*self._chunk_args(xs, ys, lrs))
            except torch._dynamo.exc.Unsupported:
                pass  # a guard failed: retrace below, with the flag tracing needs
        key = ("steps", *self._key(xs.shape, xs.dtype, ys.shape, ys.dtype))
        fn = compiled_copy(train_steps, key, self.device)
        try:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                out = fn(*self._chunk_args(xs, ys, lrs))
        except Exception as error:  # noqa: BLE001 -- any compiler failure means: one step at a time
            self.chunk_reason = error_line(error)
            log.warning("compile: %s; this model's steps compile one at a time", self.chunk_reason)
            return None
        self.chunks[xs.shape] = fn
        return out

    def _chunk_args(self, xs: torch.Tensor, ys: torch.Tensor, lrs: torch.Tensor) -> tuple:
        return (self.model, self.params, self.state, self.chain, lrs, xs, ys, self.mean_loss_fn, self.classification)

    def _key(self, x_shape: tuple, x_dtype: torch.dtype, y_shape: tuple, y_dtype: torch.dtype) -> tuple:
        """What a graph is specialised on: architecture, optimizer, batch shapes, dtypes, device, loss."""
        return (self.architecture, signature(self.chain), tuple(x_shape), x_dtype, tuple(y_shape), y_dtype,
                self.device.type, self.classification, self.mean_loss_fn)

    def compiled_before(self, batches: Sequence[tuple[tuple, torch.dtype, tuple, torch.dtype]],
                        chunked: bool = False) -> bool:
        """Whether this process already compiled a graph for every ``(x shape, x dtype, y shape, y dtype)``
        (a study's earlier run of the same architecture, optimizer and batch size): compiling is then free.
        ``chunked``: the shapes are (K, B, ...) of the several-steps graph."""
        prefix = ("steps",) if chunked else ()
        return all(compiled_already((*prefix, *self._key(*batch))) for batch in batches)

    def _compile_and_call(self, xb: torch.Tensor, yb: torch.Tensor) -> StepNumbers:
        key = self._key(xb.shape, xb.dtype, yb.shape, yb.dtype)
        fn = compiled_copy(train_step, key, self.device)
        try:
            # Dynamo traces torch.autograd.grad only when asked; the flag matters while tracing only.
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                out = fn(*self._args(xb, yb))
        except Exception as error:  # noqa: BLE001 -- any compiler failure means: train eagerly
            self.fallback_reason = error_line(error)
            log.warning("compile: %s; this model trains eagerly", self.fallback_reason)
            return train_step(*self._args(xb, yb))
        self.compiled[xb.shape] = fn
        return self._outputs(out)

    def _outputs(self, out: StepNumbers) -> StepNumbers:
        if not self.cuda_graphs:
            return out
        # A CUDA graph's outputs are overwritten by its next replay; the loop keeps them longer.
        return StepNumbers(out.loss.clone(), None if out.correct is None else out.correct.clone())
