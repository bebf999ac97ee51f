"""When compiling the step repays itself: ``compile="auto"``.

Compiling costs seconds once; it saves a fraction of a millisecond on every step. The constants
below were measured with ``python benchmarks/overhead.py --repeats 5 --batch-sizes 1,32,1024
--skip keras,lightning,plain+log`` (torch 2.13 CPU, one thread, MLP 40-100-100-10 on MNIST-1D, SGD,
the machine otherwise idle; ``plain`` against ``plain+compile``, one step per graph):

=====  ==================  =====================  ===================  =======================
B      eager s/epoch       compiled s/epoch       saving per step      compile, cold
=====  ==================  =====================  ===================  =======================
1      1.185 (4000 steps)  0.405                  0.195 ms             ~7 s (+5 s for a process's first)
32     0.046 (125 steps)   0.021                  0.20 ms              ~7 s
1024   0.0101 (4 steps)    0.0062                 0.98 ms              6.8 s
=====  ==================  =====================  ===================  =======================

"Cold" is a process whose on-disk compile cache is empty (the first run on a machine); "warm" one
that finds the graph in torch's cache. The policy assumes cold, so ``auto`` never makes a short run
slower; a graph already compiled in this process (a study's later runs) costs nothing.
"""

from __future__ import annotations

import math

# (batch size, seconds saved per step) measured, interpolated linearly in log2(B) between them
SAVING_PER_STEP = ((1, 0.195e-3), (32, 0.20e-3), (1024, 0.98e-3))
COMPILE_SECONDS_PER_SHAPE = 10.0  # cold cache, rounded up from ~7 s (about 5 s more for a process's first graph)
# R=64, B=32 (``python benchmarks/replicas.py --replicas 64 --batch-sizes 32 --compile on|off``):
# the compiled stacked step saves ~2 ms per step over the eager stacked one, 0.16 of 64 single
# steps' saving: the eager pass has already removed most of the per-replica dispatch.
STACKED_SAVING_SHARE = 0.16
STACKED_COMPILE_FACTOR = 2.5  # a stacked (vmapped) graph compiled cold in ~25 s, vs ~10 s for one model's


def saving_per_step(batch_size: int) -> float:
    """Seconds a compiled step saves over an eager one at ``batch_size`` (measured; see module doc)."""
    return _interpolated(SAVING_PER_STEP, batch_size)


def _interpolated(points: tuple[tuple[int, float], ...], batch_size: int) -> float:
    """A saving measured at a few batch sizes, at ``batch_size``: linear in log2(B) between them."""
    if batch_size <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if batch_size <= b1:
            w = (math.log2(batch_size) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return s0 + w * (s1 - s0)
    return points[-1][1]  # beyond the measurement: no more than the largest saving measured


def should_compile(total_steps: int, batch_size: int, shapes: int = 1, compiled_before: bool = False) -> bool:
    """Whether compiling the step pays for itself over a run: steps × saving ≥ compile time.

    Args:
        total_steps: the run's updates.
        batch_size: samples per update.
        shapes: distinct batch shapes to compile (2 when the epoch ends with a short batch).
        compiled_before: the graphs are already compiled in this process (cost 0).

    Returns:
        True when the measured saving over ``total_steps`` covers the cold compile time. At B=32
        that is about 50,000 steps (400 epochs of 4000 samples); at B=1024 about 10,000.

    Example:
        >>> should_compile(total_steps=1000, batch_size=32)
        False
        >>> should_compile(total_steps=60_000, batch_size=32)
        True
    """
    if compiled_before:
        return True
    return total_steps * saving_per_step(batch_size) >= shapes * COMPILE_SECONDS_PER_SHAPE


# CHUNK steps per graph (`batchlab.compiled.step.train_steps`) against one step per graph, B=32: 96 vs
# 175 µs per step, compiled in 13 s cold. The saving is the compiled call's fixed cost, the same at
# any small batch; at B=1024 a step's arithmetic dwarfs it (taken as no saving there).
CHUNK_SAVING_PER_STEP = ((1, 80e-6), (32, 80e-6), (1024, 0.0))
CHUNK_COMPILE_SECONDS = 15.0


def should_chunk(total_steps: int, batch_size: int, compiled_before: bool = False) -> bool:
    """Whether ``compile="auto"`` also compiles the several-steps graph: its saving over one step per
    graph, over the run's steps, covers its own cold compile time (about 190,000 steps at B=32).

    Args:
        total_steps: the steps that would run compiled.
        batch_size: samples per update.
        compiled_before: the graph is already compiled in this process (cost 0).
    """
    if compiled_before:
        return True
    return total_steps * _interpolated(CHUNK_SAVING_PER_STEP, batch_size) >= CHUNK_COMPILE_SECONDS


def should_compile_stacked(total_steps: int, replicas: int, batch_size: int, shapes: int = 1,
                           compiled_before: bool = False) -> bool:
    """`should_compile` for R stacked replicas: a stacked step saves about R single steps' worth of work.

    The saving is taken as ``STACKED_SAVING_SHARE`` × R × `saving_per_step` (measured at R=64, B=32;
    see docs/compile.md), and a stacked graph is assumed to cost ``STACKED_COMPILE_FACTOR`` times a
    single step's compile.

    Args:
        total_steps: the pass's stacked updates.
        replicas: R, the replicas in the stack.
        batch_size: samples per replica and update.
        shapes: distinct (R, B) shapes to compile.
        compiled_before: the graphs are already compiled in this process (cost 0).
    """
    if compiled_before:
        return True
    saving = STACKED_SAVING_SHARE * replicas * saving_per_step(batch_size)
    return total_steps * saving >= shapes * STACKED_COMPILE_FACTOR * COMPILE_SECONDS_PER_SHAPE
