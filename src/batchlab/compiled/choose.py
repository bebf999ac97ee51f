"""Whether a run compiles its step: ``TrainConfig(compile="auto"|"on"|"off")`` decided once, at start.

``off`` trains eagerly. ``on`` compiles. ``auto`` compiles when the steps that would run compiled
save more time than compiling the run's batch shapes costs (`should_compile`, measured constants),
so a short run never pays the compile time.

Probes look at the live graph, the gradients and the weights between forward, backward and update;
a compiled step has no such points. The steps a probe measures (every ``probe_every``-th) therefore
run eagerly, through the same optimizer state (the compiled step keeps it in torch.optim's
format), and the others run compiled. When probes measure every step nothing would run compiled,
and the run trains eagerly. Each of these decisions is said in one line on the
``batchlab.compiled`` logger, once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..optim.transforms import Chain
from .policy import should_chunk, should_compile, should_compile_stacked
from .stacked import StackedStep
from .step import CHUNK, CompiledStep
from .updates import CompileUnsupported

log = logging.getLogger("batchlab.compiled")
_SAID: set[str] = set()  # lines already said in this process (a study repeats its runs' decisions)


def say_once(line: str) -> None:
    """Log ``line`` as a warning the first time this process says it."""
    if line not in _SAID:
        _SAID.add(line)
        log.warning(line)


def fit_step(mode: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mean_loss_fn: Callable,
             classification: bool, train: tuple[torch.Tensor, torch.Tensor], sizes: Sequence[int],
             steps: int, probe_every: int | None) -> CompiledStep | None:
    """The compiled step a run uses for its unmeasured steps, or None to train eagerly.

    Args:
        mode: the config's ``compile``: ``auto``, ``on`` or ``off``.
        model, optimizer, mean_loss_fn, classification: as the eager step takes them.
        train: the training inputs and targets (their per-sample shapes and dtypes key the graphs).
        sizes: the run's distinct batch sizes (`batchlab.schedule.sizes_used`).
        steps: the updates left to train.
        probe_every: probes measure every this many steps (those run eagerly); None without probes.

    Returns:
        A `CompiledStep`, or None when the mode, the policy, the probes or the optimizer say eager.
    """
    compiled_steps = _unmeasured(mode, steps, probe_every)
    if compiled_steps is None:
        return None
    try:
        step = CompiledStep(model, optimizer, mean_loss_fn, classification)
    except CompileUnsupported as error:
        if mode == "on":
            say_once(f"compile: {error}; this run trains eagerly")
        return None
    X, y = train
    batches = [((b, *X.shape[1:]), X.dtype, (b, *y.shape[1:]), y.dtype) for b in sizes]
    if mode == "auto" and not should_compile(compiled_steps, sizes[0], shapes=len(sizes),
                                             compiled_before=step.compiled_before(batches)):
        return None
    chunk = ((CHUNK, *batches[0][0]), X.dtype, (CHUNK, *batches[0][2]), y.dtype)
    if mode == "auto" and step.chunk_reason is None and not should_chunk(
            compiled_steps, sizes[0], compiled_before=step.compiled_before([chunk], chunked=True)):
        step.chunk_reason = "auto: the run is too short to repay compiling several steps per graph"
    if probe_every is not None:
        say_once(f"compile: the steps probes measure (every {probe_every}) run eagerly, the others compiled")
    return step


def _unmeasured(mode: str, steps: int, probe_every: int | None) -> int | None:
    """The steps that would run compiled, or None when none would (``off``, or probes on every step)."""
    if mode == "off":
        return None
    if probe_every == 1:
        if mode == "on":
            say_once("compile: probes measure every step and need the eager step's graph and gradients; "
                     "this run trains eagerly (set probe_every > 1 to compile the steps between)")
        return None
    return steps - (-(-steps // probe_every) if probe_every else 0)


def replicas_step(mode: str, skeleton: torch.nn.Module, names: Sequence[str], chain: Chain, loss_fn: Callable,
                  classification: bool, shapes: Sequence[tuple[tuple, tuple]], dtype: torch.dtype,
                  device: torch.device, steps: int, probe_every: int | None) -> StackedStep | None:
    """The compiled stacked step of a replicas' pass for its unmeasured steps, or None to stay eager.

    Args:
        mode: the configs' ``compile``.
        skeleton, names, chain, loss_fn, classification: as `StackedStep` takes them.
        shapes: the distinct ``((R, b, *x), (R, b, *y))`` batch shapes the pass trains on.
        dtype, device: of the inputs.
        steps: the stacked updates left.
        probe_every: probes measure every this many steps (those run eagerly); None without probes.
    """
    compiled_steps = _unmeasured(mode, steps, probe_every)
    if compiled_steps is None:
        return None
    step = StackedStep(skeleton, names, chain, loss_fn, classification)
    replicas, batch = shapes[0][0][:2]
    if mode == "auto" and not should_compile_stacked(
            compiled_steps, replicas, batch, shapes=len(shapes),
            compiled_before=step.compiled_before(shapes, dtype, device.type)):
        return None
    if probe_every is not None:
        say_once(f"compile: the steps probes measure (every {probe_every}) run eagerly, the others compiled")
    return step
