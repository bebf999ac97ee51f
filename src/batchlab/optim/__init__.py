"""Optimizers, learning-rate schedules, batch-size scaling rules, and optimizers as chains of transforms.

`schedules`: torch optimizers from a config, pure lr schedules, scaling rules. `transforms`:
optax-style transforms over explicit state and `chain`. `chains`: torch.optim's SGD, Adam, AdamW and
RMSprop as chains, for a config, for R stacked replicas, or from a live torch optimizer.
"""

from .chains import (
    UnsupportedOptimizer,
    adam,
    adamw,
    chain_of,
    config_chain,
    init_stacked_state,
    optimizer_chain,
    rmsprop,
    sgd,
    shared_or_per_replica,
    stacked_chain,
    torch_state,
)
from .schedules import (
    build_optimizer,
    lr_at,
    scaled_lr,
    scaling_factor,
    set_lr,
    warmup_steps,
)
from .transforms import (
    Chain,
    GradientTransformation,
    Hyperparameter,
    State,
    add_decayed_weights,
    apply_updates,
    chain,
    decoupled_weight_decay,
    scale_by_adam,
    scale_by_lr,
    scale_by_momentum,
    scale_by_rms,
    signature,
)

__all__ = [
    "Chain",
    "GradientTransformation",
    "Hyperparameter",
    "State",
    "UnsupportedOptimizer",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "build_optimizer",
    "chain",
    "chain_of",
    "config_chain",
    "decoupled_weight_decay",
    "init_stacked_state",
    "lr_at",
    "optimizer_chain",
    "rmsprop",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_momentum",
    "scale_by_rms",
    "scaled_lr",
    "scaling_factor",
    "set_lr",
    "sgd",
    "shared_or_per_replica",
    "signature",
    "stacked_chain",
    "torch_state",
    "warmup_steps",
]
