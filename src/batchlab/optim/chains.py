"""torch.optim's optimizers as chains of `batchlab.optim.transforms`, built for a config, for R
replicas, or from a live torch optimizer, with their state where the caller keeps it.

Each chain equals torch.optim's single-tensor algorithm of the same name over a whole run (within
float64 roundoff: tests/test_optim_transforms.py), so the eager replicas, the compiled step and the
compiled replicas train exactly as ``bl.fit``'s ``optimizer.step()``:

- `sgd`: [`add_decayed_weights`] → [`scale_by_momentum`] → `scale_by_lr`
- `adam`: [`add_decayed_weights`] → `scale_by_adam` → `scale_by_lr`
- `adamw`: `scale_by_adam` → [`decoupled_weight_decay`] → `scale_by_lr`
- `rmsprop`: [`add_decayed_weights`] → `scale_by_rms` → [`scale_by_momentum`] → `scale_by_lr`

(a bracketed transform only when its hyperparameter is in use). Defaults are torch.optim's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import BatchlabError
from .transforms import (
    Chain,
    Hyperparameter,
    State,
    add_decayed_weights,
    chain,
    decoupled_weight_decay,
    in_use,
    scale_by_adam,
    scale_by_lr,
    scale_by_momentum,
    scale_by_rms,
)


class UnsupportedOptimizer(BatchlabError):
    """A torch optimizer, or an option of one, that no chain reproduces (named in the message)."""


def _decay(weight_decay: Hyperparameter) -> tuple:
    return (add_decayed_weights(weight_decay),) if in_use(weight_decay) else ()


def _momentum(momentum: Hyperparameter, dampening: Hyperparameter = 0.0, nesterov: bool = False) -> tuple:
    return (scale_by_momentum(momentum, dampening, nesterov),) if in_use(momentum) else ()


def sgd(momentum: Hyperparameter = 0.0, dampening: Hyperparameter = 0.0, nesterov: bool = False,
        weight_decay: Hyperparameter = 0.0) -> Chain:
    """torch.optim.SGD: weight decay, momentum (dampening, Nesterov), the step.

    Args:
        momentum, dampening, nesterov, weight_decay: as torch.optim.SGD takes them; a float or a
            tensor (per replica: (R,)), nesterov shared.

    Returns:
        The chain; its state is ``momentum_buffer`` with momentum (and ``step`` with dampening).
    """
    return chain(*_decay(weight_decay), *_momentum(momentum, dampening, nesterov), scale_by_lr())


def adam(b1: Hyperparameter = 0.9, b2: Hyperparameter = 0.999, eps: Hyperparameter = 1e-8,
         weight_decay: Hyperparameter = 0.0) -> Chain:
    """torch.optim.Adam: L2 weight decay into the gradient, Adam's scaling, the step.

    Args:
        b1, b2: torch's ``betas``; eps, weight_decay: as torch.optim.Adam takes them.

    Returns:
        The chain; its state is ``step``, ``exp_avg``, ``exp_avg_sq``.
    """
    return chain(*_decay(weight_decay), scale_by_adam(b1, b2, eps), scale_by_lr())


def adamw(b1: Hyperparameter = 0.9, b2: Hyperparameter = 0.999, eps: Hyperparameter = 1e-8,
          weight_decay: Hyperparameter = 1e-2) -> Chain:
    """torch.optim.AdamW: Adam's scaling, decoupled weight decay (Loshchilov & Hutter 2019), the step.

    Args:
        b1, b2: torch's ``betas``; eps, weight_decay: as torch.optim.AdamW takes them.

    Returns:
        The chain; its state is ``step``, ``exp_avg``, ``exp_avg_sq``.
    """
    decay = (decoupled_weight_decay(weight_decay),) if in_use(weight_decay) else ()
    return chain(scale_by_adam(b1, b2, eps), *decay, scale_by_lr())


def rmsprop(alpha: Hyperparameter = 0.99, eps: Hyperparameter = 1e-8, weight_decay: Hyperparameter = 0.0,
            momentum: Hyperparameter = 0.0, centered: bool = False) -> Chain:
    """torch.optim.RMSprop: weight decay, the RMS scaling, momentum on the scaled gradient, the step.

    Args:
        alpha, eps, weight_decay, momentum, centered: as torch.optim.RMSprop takes them.

    Returns:
        The chain; its state is ``step``, ``square_avg``, and ``momentum_buffer`` with momentum,
        ``grad_avg`` centered.
    """
    return chain(*_decay(weight_decay), scale_by_rms(alpha, eps, centered), *_momentum(momentum), scale_by_lr())


def optimizer_chain(kind: str, *, momentum: Hyperparameter = 0.0, nesterov: bool = False,
                    weight_decay: Hyperparameter = 0.0,
                    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999)) -> Chain:
    """The chain of ``TrainConfig``'s optimizer fields (torch's defaults for the others).

    Args:
        kind: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        momentum: SGD's and RMSprop's; nesterov: SGD's; weight_decay: every kind's; betas: Adam's.

    Returns:
        The chain that trains as `batchlab.optim.build_optimizer` with the same fields.
    """
    if kind == "sgd":
        return sgd(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if kind == "adam":
        return adam(*betas, weight_decay=weight_decay)
    if kind == "adamw":
        return adamw(*betas, weight_decay=weight_decay)
    if kind == "rmsprop":
        return rmsprop(weight_decay=weight_decay, momentum=momentum)
    raise AssertionError(f"unvalidated optimizer {kind!r}")


def config_chain(config: TrainConfig) -> Chain:
    """The chain that trains as ``build_optimizer(params, config, lr)`` (the lr is each update's)."""
    return optimizer_chain(config.optimizer, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, betas=config.betas)


def shared_or_per_replica(values: np.ndarray, device: torch.device | str | None = None) -> Hyperparameter:
    """R replicas' values of one hyperparameter: a float when they agree, else an (R,) float64 tensor.

    A shared value stays a Python number, so eager kernels are torch.optim's own (``add(alpha=)``)
    and a compiled graph is specialised on it; values that differ become one tensor input.
    """
    values = np.asarray(values, dtype=np.float64)
    first = float(values[0])
    if bool((values == first).all()):
        return first
    return torch.as_tensor(values, dtype=torch.float64, device=device)


def stacked_chain(kind: str, nesterov: bool, values: dict[str, np.ndarray],
                  device: torch.device | str | None = None) -> Chain:
    """The chain of R stacked replicas from their (R,) hyperparameters.

    Args:
        kind: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``, shared.
        nesterov: SGD with Nesterov momentum, shared.
        values: (R,) float64 arrays ``momentum``, ``weight_decay``, ``beta1``, ``beta2``.
        device: where per-replica tensors live.

    Returns:
        The chain, with each hyperparameter a float where the replicas agree, else an (R,) tensor.
    """
    hyper = {name: shared_or_per_replica(array, device) for name, array in values.items()}
    return optimizer_chain(kind, momentum=hyper["momentum"], nesterov=nesterov, weight_decay=hyper["weight_decay"],
                           betas=(hyper["beta1"], hyper["beta2"]))


def init_stacked_state(kind: str, params: Sequence[torch.Tensor]) -> State:
    """Zeroed state for R stacked replicas of ``kind`` (each tensor (R, *shape)), ``step`` excepted.

    Holds every parameter-shaped buffer a replica of ``kind`` may use (SGD's and RMSprop's momentum
    buffer whether or not a replica has momentum), so a stack can keep, re-lay and drop rows of
    each; its update counter is kept beside it.

    Returns:
        ``sgd``: ``momentum_buffer``; ``adam``/``adamw``: ``exp_avg``, ``exp_avg_sq``;
        ``rmsprop``: ``square_avg``, ``momentum_buffer``.
    """
    widest = optimizer_chain(kind, momentum=0.5)  # momentum in use: its buffer is included
    return {name: tensors for name, tensors in widest.init(list(params)).items() if name != "step"}


# torch.optim options no chain implements, with the value that is harmless.
_REFUSED_OPTIONS = (("maximize", False), ("amsgrad", False), ("differentiable", False))


def chain_of(optimizer: torch.optim.Optimizer) -> Chain:
    """The chain equal to a live torch optimizer's ``step()``, from its one parameter group.

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``.

    Returns:
        Its chain (the group's learning rate is not part of it: each update is given one).

    Raises:
        UnsupportedOptimizer: another optimizer, several parameter groups, or ``maximize``,
            ``amsgrad`` or ``differentiable`` set; the message names which.
    """
    if len(optimizer.param_groups) != 1:
        raise UnsupportedOptimizer("the optimizer has several parameter groups")
    group = optimizer.param_groups[0]
    for option, default in _REFUSED_OPTIONS:
        if group.get(option, default) != default:
            raise UnsupportedOptimizer(f"optimizer option {option}={group[option]!r}")
    decay = float(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        return (adamw if decoupled else adam)(*group["betas"], eps=group["eps"], weight_decay=decay)
    if isinstance(optimizer, torch.optim.SGD):
        return sgd(group["momentum"], group["dampening"], group["nesterov"], decay)
    if isinstance(optimizer, torch.optim.RMSprop):
        return rmsprop(group["alpha"], group["eps"], decay, group["momentum"], group["centered"])
    raise UnsupportedOptimizer(f"optimizer {type(optimizer).__name__} (supported: SGD, Adam, AdamW, RMSprop)")


def torch_state(optimizer: torch.optim.Optimizer, optimizer_as_chain: Chain) -> State:
    """The chain's state as the very tensors of ``optimizer.state``, created there as torch.optim would.

    Entries the optimizer has already made (after an ``optimizer.step()``, or loaded from a
    checkpoint) are used as they are; missing ones are created zeroed, as torch.optim creates them
    at its first step. A zero momentum buffer gives the same first update as torch.optim.SGD's
    lazy copy of the first gradient, so the chain and ``optimizer.step()`` may alternate at any step.

    Args:
        optimizer: the optimizer `chain_of` read ``optimizer_as_chain`` from.
        optimizer_as_chain: its chain.

    Returns:
        ``{name: [optimizer.state[p][name] for p in params]}`` for the chain's state names.

    Raises:
        UnsupportedOptimizer: SGD with dampening, whose first step torch.optim recognises by the
            buffer's absence (undamped), which a state created beforehand cannot reproduce.
    """
    params = optimizer.param_groups[0]["params"]
    fresh = optimizer_as_chain.init(params)
    if "step" in fresh and isinstance(optimizer, torch.optim.SGD):
        # SGD's undamped first step is told by a missing buffer, which a shared state cannot be.
        dampening = optimizer.param_groups[0]["dampening"]
        raise UnsupportedOptimizer(f"optimizer option dampening={dampening!r} (SGD's state cannot be shared)")
    for name, tensors in fresh.items():
        for p, tensor in zip(params, tensors):
            if optimizer.state[p].get(name) is None:
                optimizer.state[p][name] = tensor
    return {name: [optimizer.state[p][name] for p in params] for name in fresh}
