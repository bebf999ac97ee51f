"""Optimizers, learning-rate schedules and batch-size scaling rules, from a TrainConfig.

The schedule is a pure function of the step (`lr_at`), so the loop, the vectorized replicas and
the analysis all agree on the learning rate of every update without sharing a scheduler object.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config import TrainConfig


def scaled_lr(config: TrainConfig, batch_size: int) -> float:
    """The base learning rate after the batch-size scaling rule.

    ``linear``: lr·B/B_ref (Goyal et al. 2017, "Accurate, Large Minibatch SGD");
    ``sqrt``: lr·sqrt(B/B_ref) (Hoffer et al. 2017, "Train longer, generalize better").
    """
    return config.lr * scaling_factor(config.lr_scaling, batch_size / config.reference_batch_size)


def scaling_factor(rule: str, ratio: float) -> float:
    """The learning-rate multiplier for a batch ``ratio`` times larger under a scaling ``rule``:
    the ratio (``linear``), its square root (``sqrt``), or 1 (``none``)."""
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps, whether it was given in steps or epochs."""
    return config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)


def lr_at(step: int, config: TrainConfig, base_lr: float, steps_per_epoch: int, total_steps: int,
          epochs_done: int | None = None) -> float:
    """The learning rate of update number ``step`` (0-based: the first update is step 0).

    Args:
        step: index of the update about to be made.
        config: gives the schedule and its parameters (epochs are converted with ``steps_per_epoch``).
        base_lr: the learning rate after `scaled_lr`, at the batch size of this update.
        steps_per_epoch: updates per epoch.
        total_steps: updates in the whole run (cosine anneals to ``min_lr`` at the last one).
        epochs_done: epochs completed before this update, for the ``step`` schedule; default
            ``step // steps_per_epoch``. A batch-size schedule gives it, as its epochs differ in
            length (and it refuses the epoch-counted ``warmup_epochs`` and ``sgdr``).

    Returns:
        The learning rate, warm-up included: a linear ramp (step+1)/W over the first W steps.
    """
    warmup = warmup_steps(config, steps_per_epoch)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = step - warmup  # steps since warm-up ended
    if config.schedule == "step":
        if epochs_done is None:
            epochs_done = step // steps_per_epoch
        return base_lr * config.gamma ** (epochs_done // config.step_epochs)
    if config.schedule == "cosine":
        span = max(total_steps - warmup - 1, 1)
        return _cosine(config.min_lr, base_lr, min(t / span, 1.0))
    if config.schedule == "sgdr":
        # Loshchilov & Hutter 2017: cycles of length T_i = T_0·mult^i, restarting at base_lr.
        period = config.sgdr_epochs * steps_per_epoch
        while t >= period:
            t -= period
            period *= config.sgdr_mult
        return _cosine(config.min_lr, base_lr, t / period)
    return base_lr


def _cosine(low: float, high: float, fraction: float) -> float:
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The torch optimizer that `config.optimizer` names, with ``lr`` as its starting learning rate."""
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise AssertionError(f"unvalidated optimizer {config.optimizer!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

