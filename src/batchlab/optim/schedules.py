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


# --- functional updates of stacked replicas ------------------------------------------------------
#
# `batchlab.ensemble` keeps R replicas' weights stacked along dimension 0 and updates them with
# these pure-tensor versions of torch.optim's single-tensor updates (what torch.optim runs on the
# CPU), in the same order of operations. A hyperparameter that every replica shares is used as a
# Python scalar, so the kernels are the very ones torch.optim calls (fused multiply-add included);
# one that differs is an (R, 1, ..., 1) tensor, which changes only the rounding of a few products.

from collections.abc import Sequence  # noqa: E402  (kept with the block that needs it)

import numpy as np  # noqa: E402

RMSPROP_ALPHA, RMSPROP_EPS, ADAM_EPS = 0.99, 1e-8, 1e-8  # torch.optim's defaults, as build_optimizer uses them


def init_stacked_state(kind: str, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Zeroed optimizer state for stacked parameters (each (R, *shape)).

    Returns:
        ``sgd``: ``momentum_buffer``; ``adam``/``adamw``: ``exp_avg``, ``exp_avg_sq``;
        ``rmsprop``: ``square_avg``, ``momentum_buffer``.
    """
    names = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
             "rmsprop": ("square_avg", "momentum_buffer")}[kind]
    # zeros_like keeps each parameter's memory layout: state, weights and gradients then share
    # strides and every elementwise update runs as one vectorized pass.
    return {name: [torch.zeros_like(p).detach() for p in params] for name in names}


class _PerReplica:
    """Per-replica values (R,) as a scalar when all equal, else as (R, 1, ..., 1) tensors per rank."""

    def __init__(self, values: np.ndarray, like: torch.Tensor):
        self.values = np.asarray(values, dtype=np.float64)
        first = float(self.values[0])
        self.scalar = first if bool((self.values == first).all()) else None
        self.like = like
        self._by_rank: dict[int, torch.Tensor] = {}

    def at(self, rank: int) -> float | torch.Tensor:
        if self.scalar is not None:
            return self.scalar
        if rank not in self._by_rank:
            tensor = torch.as_tensor(self.values, dtype=self.like.dtype, device=self.like.device)
            self._by_rank[rank] = tensor.reshape(-1, *([1] * (rank - 1)))  # (R, 1, ..., 1)
        return self._by_rank[rank]

    def nonzero(self) -> bool:
        return bool((self.values != 0).any())

    def each(self, tensors: Sequence[torch.Tensor]) -> float | list[torch.Tensor]:
        """The scalar, or one (R, 1, ..., 1) tensor per tensor of ``tensors`` (for ``_foreach_*``)."""
        return self.scalar if self.scalar is not None else [self.at(t.ndim) for t in tensors]


def _foreach_add_scaled_(targets: list[torch.Tensor], tensors: list[torch.Tensor], scale: _PerReplica) -> None:
    """targets += scale·tensors in place, as `_add_scaled` does for each pair."""
    if scale.scalar is not None:
        torch._foreach_add_(targets, tensors, alpha=scale.scalar)
    else:
        torch._foreach_addcmul_(targets, tensors, scale.each(targets))


def _add_scaled(target: torch.Tensor, tensor: torch.Tensor, scale: float | torch.Tensor, inplace: bool) -> torch.Tensor:
    """target + scale·tensor: torch's ``add(alpha=)`` for a shared scale, ``addcmul`` for per-replica ones."""
    if isinstance(scale, float):
        return target.add_(tensor, alpha=scale) if inplace else target.add(tensor, alpha=scale)
    return target.addcmul_(tensor, scale) if inplace else target.addcmul(tensor, scale)


def stacked_update(
    kind: str,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: dict[str, list[torch.Tensor]],
    *,
    step: int,
    lr: np.ndarray,
    hyper: dict[str, np.ndarray],
    nesterov: bool = False,
) -> None:
    """One in-place update of every replica's stacked parameters, as torch.optim's ``step`` would.

    Args:
        kind: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        params: stacked parameters (R, *shape), updated in place (call under ``torch.no_grad``).
        grads: their gradients, each replica's row the gradient of its own mean batch loss.
        state: from `init_stacked_state`, updated in place.
        step: 1 for the first update (SGD's momentum buffer starts as the first gradient; Adam's
            bias corrections 1 − β^step, Kingma & Ba 2015, Alg. 1).
        lr: (R,) the learning rate of each replica at this step (float64, from `lr_at`).
        hyper: (R,) float64 arrays ``momentum``, ``weight_decay``, ``beta1``, ``beta2``.
        nesterov: SGD with Nesterov momentum (Sutskever et al. 2013), shared by all replicas.
    """
    like = params[0]
    neg_lr = _PerReplica(-np.asarray(lr, dtype=np.float64), like)
    weight_decay = _PerReplica(hyper["weight_decay"], like)
    decay = weight_decay.nonzero()
    if kind == "sgd":
        # The same kernels as the single-tensor loop, each applied to every tensor by one
        # ``torch._foreach_*`` call (one dispatch per operation instead of one per tensor).
        momentum = _PerReplica(hyper["momentum"], like)
        bufs = state["momentum_buffer"]
        d_ps = [_add_scaled(g, p, weight_decay.at(p.ndim), inplace=False) for p, g in zip(params, grads)] \
            if decay else list(grads)  # g + wd·p
        if momentum.nonzero():
            if step == 1:
                torch._foreach_copy_(bufs, d_ps)  # torch.optim.SGD: the buffer starts as the first d_p
            else:
                torch._foreach_mul_(bufs, momentum.each(params))  # buf = momentum·buf + d_p
                torch._foreach_add_(bufs, d_ps)
            d_ps = [_add_scaled(d, b, momentum.at(d.ndim), inplace=False) for d, b in zip(d_ps, bufs)] \
                if nesterov else bufs
        _foreach_add_scaled_(params, d_ps, neg_lr)  # p -= lr·d_p
    elif kind in ("adam", "adamw"):
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        bias1 = np.array([1 - float(b) ** step for b in beta1])  # python pow, as torch.optim.Adam
        bias2_sqrt = np.array([(1 - float(b) ** step) ** 0.5 for b in beta2])
        neg_step_size = _PerReplica(-np.asarray(lr, dtype=np.float64) / bias1, like)
        bias2_sqrt = _PerReplica(bias2_sqrt, like)
        one_minus_beta1 = _PerReplica(1 - beta1, like)
        beta2_, one_minus_beta2 = _PerReplica(beta2, like), _PerReplica(1 - beta2, like)
        shrink = _PerReplica(1 - np.asarray(lr, dtype=np.float64) * hyper["weight_decay"], like)
        for p, g, exp_avg, exp_avg_sq in zip(params, grads, state["exp_avg"], state["exp_avg_sq"]):
            rank = p.ndim
            if decay and kind == "adamw":
                p.mul_(shrink.at(rank))  # decoupled weight decay (Loshchilov & Hutter 2019)
            elif decay:
                g = _add_scaled(g, p, weight_decay.at(rank), inplace=False)
            exp_avg.lerp_(g, one_minus_beta1.at(rank))  # m = β1·m + (1−β1)·g
            c = one_minus_beta2.at(rank)
            exp_avg_sq.mul_(beta2_.at(rank))
            if isinstance(c, float):
                exp_avg_sq.addcmul_(g, g, value=c)  # v = β2·v + (1−β2)·g²
            else:
                exp_avg_sq.addcmul_(c * g, g)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt.at(rank)).add_(ADAM_EPS)
            s = neg_step_size.at(rank)
            if isinstance(s, float):
                p.addcdiv_(exp_avg, denom, value=s)
            else:
                p.addcdiv_(s * exp_avg, denom)
    elif kind == "rmsprop":
        momentum = _PerReplica(hyper["momentum"], like)
        for p, g, square_avg, buf in zip(params, grads, state["square_avg"], state["momentum_buffer"]):
            rank = p.ndim
            if decay:
                g = _add_scaled(g, p, weight_decay.at(rank), inplace=False)
            square_avg.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
            avg = square_avg.sqrt().add_(RMSPROP_EPS)
            if momentum.nonzero():
                buf.mul_(momentum.at(rank)).addcdiv_(g, avg)
                _add_scaled(p, buf, neg_lr.at(rank), inplace=True)
            else:
                s = neg_lr.at(rank)
                if isinstance(s, float):
                    p.addcdiv_(g, avg, value=s)
                else:
                    p.addcdiv_(s * g, avg)
    else:
        raise AssertionError(f"unvalidated optimizer {kind!r}")
