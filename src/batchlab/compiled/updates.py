"""Optimizer updates as tensor functions over explicit state, for a compiled step.

torch.optim reads its learning rate as a Python number, so a compiled graph would bake it in and
recompile whenever a schedule changes it. The updates here are torch.optim's single-tensor
algorithms (SGD with momentum, Nesterov and weight decay; Adam; AdamW; RMSprop), written in the
same order of operations, with the learning rate a tensor input. Their state is kept in
torch.optim's own format (``momentum_buffer``, ``step``, ``exp_avg``, ...), inside the optimizer's
``state``, so a run may switch between a compiled step and ``optimizer.step()`` at any step, and
checkpoints written from ``optimizer.state_dict()`` hold everything.

The same functions update stacked replicas (every tensor (R, *shape)): a hyperparameter is then a
Python float when the replicas share it, or an (R,) tensor broadcast along the leading dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import BatchlabError

if TYPE_CHECKING:
    import numpy as np

Scalar = float | torch.Tensor  # a shared value, or one per replica (R,)


class CompileUnsupported(BatchlabError):
    """The step cannot be compiled (an optimizer option or a model the compiler cannot capture)."""


class Hyper(NamedTuple):
    """The optimizer's hyperparameters, learning rate excluded (an input of every step)."""

    kind: str  # "sgd", "adam", "adamw", "rmsprop"
    momentum: Scalar = 0.0
    nesterov: bool = False
    weight_decay: Scalar = 0.0
    beta1: Scalar = 0.9
    beta2: Scalar = 0.999
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop's smoothing constant


STATE_NAMES = {"sgd": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq"),
               "adamw": ("step", "exp_avg", "exp_avg_sq"), "rmsprop": ("step", "square_avg", "momentum_buffer")}


def hyper_of(optimizer: torch.optim.Optimizer) -> Hyper:
    """The `Hyper` of a torch optimizer, or `CompileUnsupported` naming the option in the way.

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop`` with one parameter group.

    Returns:
        Its hyperparameters; options the compiled updates do not implement (amsgrad, dampening,
        centered RMSprop, maximize, several parameter groups) raise `CompileUnsupported`.
    """
    if len(optimizer.param_groups) != 1:
        raise CompileUnsupported("the optimizer has several parameter groups")
    group = optimizer.param_groups[0]
    for option, default in (("maximize", False), ("amsgrad", False), ("dampening", 0), ("centered", False),
                            ("differentiable", False)):
        if group.get(option, default) != default:
            raise CompileUnsupported(f"optimizer option {option}={group[option]!r}")
    wd = float(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.AdamW) or (isinstance(optimizer, torch.optim.Adam)
                                                     and group.get("decoupled_weight_decay", False)):
        return Hyper("adamw", weight_decay=wd, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
    if isinstance(optimizer, torch.optim.Adam):
        return Hyper("adam", weight_decay=wd, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
    if isinstance(optimizer, torch.optim.SGD):
        return Hyper("sgd", momentum=group["momentum"], nesterov=group["nesterov"], weight_decay=wd)
    if isinstance(optimizer, torch.optim.RMSprop):
        return Hyper("rmsprop", momentum=group["momentum"], weight_decay=wd, eps=group["eps"], alpha=group["alpha"])
    raise CompileUnsupported(f"optimizer {type(optimizer).__name__} (compiled: SGD, Adam, AdamW, RMSprop)")


def optimizer_state(optimizer: torch.optim.Optimizer, hyper: Hyper) -> dict[str, list[torch.Tensor]]:
    """The state tensors the update mutates, created in ``optimizer.state`` as torch.optim would.

    Zeroed buffers give the same first update as torch.optim's lazy start: SGD's momentum buffer
    becomes momentum·0 + g = g, exactly the gradient torch.optim copies.

    Returns:
        ``{name: [one tensor per parameter]}`` for the names in `STATE_NAMES` (SGD without momentum
        and RMSprop without momentum keep no buffer).
    """
    params = optimizer.param_groups[0]["params"]
    names = state_names(hyper)
    for p in params:
        slot = optimizer.state[p]
        for name in names:
            if name not in slot or slot[name] is None:
                # torch.optim keeps ``step`` as a float scalar tensor next to the parameter's device.
                slot[name] = (torch.zeros((), dtype=_scalar_dtype(), device=p.device) if name == "step"
                              else torch.zeros_like(p, memory_format=torch.preserve_format))
    return {name: [optimizer.state[p][name] for p in params] for name in names}


def state_names(hyper: Hyper) -> list[str]:
    """The state `apply_update` keeps for ``hyper`` (no momentum buffer without momentum)."""
    return [n for n in STATE_NAMES[hyper.kind] if not (n == "momentum_buffer" and not _nonzero(hyper.momentum))]


def init_stacked_state(hyper: Hyper, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Zeroed optimizer state for stacked parameters (each (R, *shape)), in `apply_update`'s layout.

    The compiled counterpart of `batchlab.optim.init_stacked_state`, with ``step`` counters (a
    tensor, so Adam's bias corrections do not recompile).
    """
    names = state_names(hyper)
    return {name: [torch.zeros((), dtype=torch.float32, device=p.device) if name == "step" else torch.zeros_like(p)
                   for p in params] for name in names}


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _nonzero(value: Scalar) -> bool:
    """Whether a hyperparameter is in use; decided while tracing, so never by reading a tensor.

    A per-replica tensor is nonzero by construction: `stacked_hyper` turns values that are zero
    for every replica into the float 0.0.
    """
    return True if isinstance(value, torch.Tensor) else value != 0


def stacked_hyper(kind: str, nesterov: bool, values: dict[str, "np.ndarray"], device: torch.device) -> Hyper:
    """The `Hyper` of R stacked replicas from their (R,) hyperparameter arrays.

    A value shared by every replica stays a Python float (the graph is specialised on it, as on
    the optimizer's kind); one that differs becomes an (R,) float64 tensor input, so replicas
    differing in momentum or weight decay share one compiled graph.

    Args:
        kind: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        nesterov: SGD with Nesterov momentum, shared by all replicas.
        values: (R,) float64 arrays ``momentum``, ``weight_decay``, ``beta1``, ``beta2``.
        device: where the per-replica tensors live.
    """
    def scalar_or_tensor(array) -> Scalar:
        first = float(array[0])
        if all(float(v) == first for v in array):
            return first
        return torch.as_tensor(array, dtype=torch.float64, device=device)  # (R,)

    return Hyper(kind, momentum=scalar_or_tensor(values["momentum"]), nesterov=nesterov,
                 weight_decay=scalar_or_tensor(values["weight_decay"]), beta1=scalar_or_tensor(values["beta1"]),
                 beta2=scalar_or_tensor(values["beta2"]))


def _at(value: Scalar, like: torch.Tensor, stacked: bool) -> Scalar:
    """A hyperparameter shaped to broadcast against ``like``: (R,) -> (R, 1, ..., 1) when stacked."""
    if stacked and isinstance(value, torch.Tensor):
        return value.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
    return value.to(like.dtype) if isinstance(value, torch.Tensor) else value


def apply_update(hyper: Hyper, params: list[torch.Tensor], grads: list[torch.Tensor],
                 state: dict[str, list[torch.Tensor]], lr: torch.Tensor, stacked: bool = False) -> None:
    """One in-place update of ``params`` and ``state``, as torch.optim's single-tensor ``step``.

    Call under ``torch.no_grad()``.

    Args:
        hyper: the optimizer and its hyperparameters.
        params: the parameters (stacked: (R, *shape)).
        grads: the gradients of the batch's mean loss, one per parameter.
        state: from `optimizer_state` (or the stacked equivalent), mutated in place.
        lr: () the learning rate of this step, float64; stacked: (R,) one per replica.
        stacked: whether the tensors are stacked replicas (hyperparameter tensors are per replica).
    """
    update = {"sgd": _sgd, "adam": _adam, "adamw": _adam, "rmsprop": _rmsprop}[hyper.kind]
    for i, (p, g) in enumerate(zip(params, grads)):
        update(hyper, p, g, {k: v[i] for k, v in state.items()}, lr, stacked)


def _decayed(g: torch.Tensor, p: torch.Tensor, weight_decay: Scalar) -> torch.Tensor:
    """g + wd·p (L2 regularisation folded into the gradient)."""
    return g + weight_decay * p


def _sgd(hyper: Hyper, p, g, state, lr, stacked) -> None:
    """torch.optim.SGD (dampening 0): buf = μ·buf + g; step along buf (or g + μ·buf, Nesterov)."""
    if _nonzero(hyper.weight_decay):
        g = _decayed(g, p, _at(hyper.weight_decay, p, stacked))
    if "momentum_buffer" in state:
        momentum = _at(hyper.momentum, p, stacked)
        buf = state["momentum_buffer"]
        buf.mul_(momentum).add_(g)
        g = g + momentum * buf if hyper.nesterov else buf
    p.sub_(_at(lr, p, stacked) * g)


def _adam(hyper: Hyper, p, g, state, lr, stacked) -> None:
    """torch.optim.Adam / AdamW (Kingma & Ba 2015, Alg. 1; decoupled decay: Loshchilov & Hutter 2019)."""
    step = state["step"]
    step.add_(1)
    if _nonzero(hyper.weight_decay):
        if hyper.kind == "adamw":
            p.mul_(_at(1 - lr * hyper.weight_decay, p, stacked))  # 1 − lr·wd in float64, as torch.optim
        else:
            g = _decayed(g, p, _at(hyper.weight_decay, p, stacked))
    beta1, beta2 = _at(hyper.beta1, p, stacked), _at(hyper.beta2, p, stacked)
    state["exp_avg"].lerp_(g, 1 - beta1)
    if isinstance(beta2, torch.Tensor):
        state["exp_avg_sq"].mul_(beta2).addcmul_(g * (1 - beta2), g)  # per replica
    else:
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # Bias corrections in float64, as torch.optim computes them with Python floats.
    t = step.to(torch.float64)
    bias1 = 1 - torch.as_tensor(hyper.beta1, dtype=torch.float64) ** t  # () or (R,)
    bias2_sqrt = (1 - torch.as_tensor(hyper.beta2, dtype=torch.float64) ** t).sqrt()
    step_size = lr / bias1
    denom = (state["exp_avg_sq"].sqrt() / _at(bias2_sqrt, p, stacked)).add_(hyper.eps)
    p.sub_(_at(step_size, p, stacked) * state["exp_avg"] / denom)


def _rmsprop(hyper: Hyper, p, g, state, lr, stacked) -> None:
    """torch.optim.RMSprop (not centered): v = α·v + (1−α)·g²; step along g/(√v + ε)."""
    state["step"].add_(1)
    if _nonzero(hyper.weight_decay):
        g = _decayed(g, p, _at(hyper.weight_decay, p, stacked))
    square_avg = state["square_avg"]
    square_avg.mul_(hyper.alpha).addcmul_(g, g, value=1 - hyper.alpha)
    avg = square_avg.sqrt().add_(hyper.eps)
    if "momentum_buffer" in state:
        buf = state["momentum_buffer"]
        buf.mul_(_at(hyper.momentum, p, stacked)).addcdiv_(g, avg)
        p.sub_(_at(lr, p, stacked) * buf)
    else:
        p.sub_(_at(lr, p, stacked) * g / avg)
