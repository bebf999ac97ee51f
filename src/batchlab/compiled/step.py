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

Between two points where something looks at the run (`batchlab.looks`), the steps run as one
graph: a loop over the stretch's batches (`train_scan`, torch's ``scan``: one graph per batch shape
for any number of steps), or, for a model with buffers or randomness, which a loop's body cannot
hold, `CHUNK` steps unrolled (`train_steps`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import error_line
from ..optim.transforms import Chain, State, functional_lists, signature
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
SMALL_BATCH = 1  # at most this batch size, matrix products are fused (`small_batch_options`)


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


def train_scan(model: torch.nn.Module, names: tuple[str, ...], params: list[torch.Tensor], state: State,
               chain: Chain, lrs: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, mean_loss_fn: Callable,
               classification: bool) -> StepNumbers:
    """``len(xs)`` consecutive steps as one loop (torch's ``scan``): one graph whatever their number.

    `train_steps` unrolls its steps, so its graph, and its compile time, grow with their number.
    Here the step is the body of a loop over the batches (JAX's ``lax.scan``): the weights and the
    optimizer's state are carried from one step to the next, and a graph compiled for a dynamic
    number of steps trains any stretch of the run between two looks. The body is a pure function
    (``torch.func.grad`` of the loss at the carried weights), so the model may hold no state its
    forward changes (batch norm's running statistics) and draw no random numbers (dropout): see
    `scannable`. The new weights and state are copied into ``params`` and ``state`` at the end.

    Args:
        names: the parameters' names in ``model`` (``named_parameters``), in the order of ``params``.
        lrs: (K,) float64, each step's learning rate.
        xs, ys: (K, B, *shape) and (K, B) or (K, B, *target_shape), the K batches in order.
        The others: as `train_step`.

    Returns:
        Each step's mean loss and correct count, (K,) each, at the weights before its update.
    """
    from torch._higher_order_ops.scan import scan

    def loss_of(weights: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
        output = torch.func.functional_call(model, dict(zip(names, weights)), (xb,))
        loss = mean_loss_fn(output, yb)
        return loss, (loss.detach(), output.detach())

    def body(carry, batch):
        weights, optimizer_state = carry
        xb, yb, lr = batch
        grads, (loss, output) = torch.func.grad(loss_of, has_aux=True)(weights, xb, yb)
        # The carry is the loop's input, never written: the update puts new tensors into new lists.
        weights = list(weights)
        optimizer_state = {name: list(tensors) for name, tensors in optimizer_state.items()}
        with functional_lists():
            chain.step(weights, list(grads), optimizer_state, lr)
        correct = (output.argmax(dim=1) == yb).sum() if classification else torch.zeros((), dtype=torch.int64)
        return (weights, optimizer_state), (loss, correct)

    (weights, optimizer_state), (losses, corrects) = scan(
        body, ([p.detach() for p in params], {name: list(tensors) for name, tensors in state.items()}), (xs, ys, lrs))
    with torch.no_grad():
        torch._foreach_copy_(params, weights)
        for name, tensors in state.items():
            torch._foreach_copy_(tensors, optimizer_state[name])
    return StepNumbers(losses, corrects if classification else None)


def scannable(model: torch.nn.Module, names: tuple[str, ...] | None, xb: torch.Tensor) -> str | None:
    """Why ``model``'s steps cannot be the body of `train_scan`, or None when they can.

    The body must be a pure function of the carried weights: the model may keep no buffers (batch
    norm's running statistics change in its forward) and draw no random numbers (dropout, in any
    form: one forward pass in train mode on ``xb`` is watched for torch's random operations, with
    the RNG's state put back afterwards).

    Args:
        names: the optimizer's parameters' names in ``model``; None when one is not the model's.
    """
    if names is None:
        return "the optimizer holds a tensor that is not one of the model's parameters"
    if any(True for _ in model.buffers()):
        return "the model keeps buffers (batch norm's running statistics)"
    from torch.utils._python_dispatch import TorchDispatchMode

    class RandomOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch.Tag.nondeterministic_seeded in func.tags:
                self.found.append(str(func))
            return func(*args, **(kwargs or {}))

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(xb.device) if xb.device.type == "cuda" else None
    try:
        with torch.no_grad(), RandomOps() as watch:
            model(xb)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, xb.device)
    return f"the model draws random numbers ({watch.found[0]})" if watch.found else None


def compiler_options(device: torch.device) -> dict[str, Any]:
    """Inductor's options: torch's RNG calls for dropout; CUDA graphs ("reduce-overhead") on a GPU."""
    return {"fallback_random": True, "triton.cudagraphs": device.type == "cuda", "cpp_wrapper": device.type == "cpu"}


_COMPILED: dict[tuple, Callable] = {}


def compiled_already(key: tuple) -> bool:
    """Whether `compiled_copy` has made the graph of ``key`` in this process (reusing it costs nothing)."""
    return key in _COMPILED


def small_batch_options(batch_size: int) -> dict[str, Any]:
    """Inductor's options for a step at ``batch_size``: at a batch of one, its matrix products (each a
    matrix-vector or an outer product) are written as elementwise products and sums, which inductor
    fuses into its own loops instead of calling a BLAS routine per product, most of such a step's
    time (inductor's ``decompose_mm_pass``; its size limits are set while compiling,
    `fused_matrix_products`)."""
    if batch_size > SMALL_BATCH:
        return {}
    return {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


@contextlib.contextmanager
def fused_matrix_products(batch_size: int):
    """While a step at ``batch_size`` compiles: inductor's ``decompose_mm_pass`` takes every matrix
    product of a batch of one, whatever the layers' widths (its own CPU limits, a first dimension of
    1 and others up to 2048, leave the outer products of the weights' gradients to BLAS). A torch
    without these limits compiles as it would."""
    if batch_size > SMALL_BATCH:
        yield
        return
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as limits
        saved = limits.cpu_max_first_dimension_decomposition, limits.cpu_max_other_dimension_decomposition
    except (ImportError, AttributeError):
        yield
        return
    limits.cpu_max_first_dimension_decomposition = limits.cpu_max_other_dimension_decomposition = 1 << 30
    try:
        yield
    finally:
        limits.cpu_max_first_dimension_decomposition, limits.cpu_max_other_dimension_decomposition = saved


def compiled_copy(function: Callable, key: tuple, device: torch.device,
                  options: dict[str, Any] | None = None) -> Callable:
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
        fn = torch.compile(fresh, fullgraph=True, dynamic=False, options={**compiler_options(device), **(options or {})})
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
        self.chunks: dict[tuple, Callable] = {}  # (K, *batch shape) -> compiled `train_steps`; batch shape -> `train_scan`
        self.fallback_reason: str | None = None
        named = {id(p): name for name, p in model.named_parameters()}
        self.names = tuple(named[id(p)] for p in self.params) if all(id(p) in named for p in self.params) else None
        self.scan_reason: str | None = None  # why `train_scan` cannot run this model; None: it can
        self._scan_decided = False  # `scannable` asked, at the first several-step call
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

    def chunk_length(self, count: int) -> int:
        """How many of ``count`` consecutive steps (of one batch size) to run as one graph: all of them
        with `train_scan`, else `CHUNK` (the unrolled graph's length) when there are as many; 1: one
        step alone."""
        if not self.chunked or count < 2:
            return 1
        if self.scan_reason is None:  # the loop, or not yet known: `steps` decides at this call
            return count
        return CHUNK if count >= CHUNK else 1

    def steps(self, xs: torch.Tensor, ys: torch.Tensor, lrs: torch.Tensor) -> StepNumbers | None:
        """K consecutive steps on the batches ``xs[k], ys[k]`` as one compiled graph: the loop of
        `train_scan` (any K from 2, one graph per batch shape) where the model allows it, else the
        unrolled `train_steps` (K = `CHUNK`).

        Returns:
            (K,) losses and correct counts; None when the graph cannot be compiled or this K needs
            another length (`chunk_length`); the loop then takes these steps one at a time (a
            compiler failure is said once, and `chunked` is then False).
        """
        if not self.chunked:
            return None
        if not self._scan_decided:
            self._scan_decided = True
            self.scan_reason = scannable(self.model, self.names, xs[0])
            if self.scan_reason is not None:
                log.info("compile: %s; %d steps per graph", self.scan_reason, CHUNK)
        if self.scan_reason is None:
            return self._scan(xs, ys, lrs)
        if xs.shape[0] != CHUNK:
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

    def _scan(self, xs: torch.Tensor, ys: torch.Tensor, lrs: torch.Tensor) -> StepNumbers | None:
        """`train_scan` over the K batches, compiled once per batch shape for any K >= 2."""
        args = (self.model, self.names, self.params, self.state, self.chain, lrs, xs, ys, self.mean_loss_fn,
                self.classification)
        fn = self.chunks.get(xs.shape[1:])
        if fn is not None:
            try:
                return self._outputs(fn(*args))
            except torch._dynamo.exc.Unsupported:
                pass  # a guard failed: retrace below
        for tensor in (xs, ys, lrs):  # one graph for every number of steps
            torch._dynamo.mark_dynamic(tensor, 0)
        key = ("scan", *self._key(xs.shape[1:], xs.dtype, ys.shape[1:], ys.dtype))
        fn = compiled_copy(train_scan, key, self.device, options=small_batch_options(xs.shape[1]))
        try:
            with fused_matrix_products(xs.shape[1]):
                out = fn(*args)
        except Exception as error:  # noqa: BLE001 -- any compiler failure: the unrolled graph instead
            self.scan_reason = error_line(error)
            log.info("compile: %s; %d steps per graph", self.scan_reason, CHUNK)
            return None
        self.chunks[xs.shape[1:]] = fn
        return self._outputs(out)

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
        if not chunked:
            return all(compiled_already(self._key(*batch)) for batch in batches)
        return all(compiled_already(("steps", *self._key(x, x_dtype, y, y_dtype)))  # unrolled, or the loop at B
                   or compiled_already(("scan", *self._key(x[1:], x_dtype, y[1:], y_dtype)))
                   for x, x_dtype, y, y_dtype in batches)

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
