"""Optimizers, learning-rate schedules, batch-size scaling rules and the stacked replica updates.

The package re-exports the names other modules import from ``batchlab.optim``.
"""

from .schedules import (
    build_optimizer,
    init_stacked_state,
    lr_at,
    scaled_lr,
    scaling_factor,
    set_lr,
    stacked_update,
    warmup_steps,
)

__all__ = [
    "build_optimizer",
    "init_stacked_state",
    "lr_at",
    "scaled_lr",
    "scaling_factor",
    "set_lr",
    "stacked_update",
    "warmup_steps",
]
