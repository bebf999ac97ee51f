"""Probes: measurements of training dynamics taken inside the step, as ``init``/``measure`` pairs.

Modules: `base` (the probe protocol: points, `ProbeContext`, deferred reads), `probe_set` (the
registry of names and `ProbeSet`, which runs a run's probes), `grad_norm`, `distances`
(``dist_from_init``, ``update_norm``), `noise_scale` (``noise_scale``, ``noise_scale_exact``),
`ranks` (the noise scale under DDP), `estimators` (the noise scale's unbiased estimators and moving
averages), `taps` (per-sample gradient norms off the loop's backward pass), `per_sample` (those
norms for any nesting of Linear, Conv, Embedding and normalisation layers), `norms` (norms over lists
of tensors).
"""

from .base import (
    LOSS_SCALE,
    POINTS,
    DeferredRead,
    Point,
    Probe,
    ProbeContext,
    ProbeWarning,
    flat_view,
)
from .distances import DistFromInit, UpdateNorm
from .estimators import (
    NoiseState,
    part_sizes,
    per_sample_estimates,
    two_batch_estimates,
)
from .grad_norm import GradNorm
from .noise_scale import NoiseScale, NoiseScaleExact, per_sample_gradients_from_losses
from .norms import global_norm, squared_norm
from .probe_set import PROBES, ProbeSet, make_probe, probe_columns, probe_points
from .ranks import RankGradients, RankNoiseScale
from .taps import GhostTaps, LinearTaps, per_sample_linear_layers

__all__ = [
    "LOSS_SCALE", "POINTS", "PROBES", "DeferredRead", "DistFromInit", "GhostTaps", "GradNorm", "LinearTaps",
    "NoiseScale", "NoiseScaleExact", "NoiseState", "Point", "Probe", "ProbeContext", "ProbeSet", "ProbeWarning",
    "RankGradients", "RankNoiseScale", "UpdateNorm", "flat_view", "global_norm", "make_probe", "part_sizes",
    "per_sample_estimates", "per_sample_gradients_from_losses", "per_sample_linear_layers", "probe_columns",
    "probe_points", "squared_norm", "two_batch_estimates",
]  # fmt: skip
