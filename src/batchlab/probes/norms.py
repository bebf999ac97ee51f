"""Norms over lists of tensors, as the probes take them: not synchronised, in as few operations as possible."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._utils import _flatten_dense_tensors


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t ‖t‖₂² over all elements of all tensors, as a 0-d float64 tensor (not synchronised).

    The per-tensor norms come from one fused ``torch._foreach_norm`` call; accumulating their
    squares in float64 keeps differences of nearly equal squared norms (the noise-scale
    estimators subtract them) meaningful.
    """
    norms = torch._foreach_norm(list(tensors))
    return torch.stack(norms).double().square().sum()


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_n)‖₂ over all elements of all tensors (a 0-d tensor, not synchronised).

    One flat copy and one norm: on the CPU a small model's step pays more for an operation's
    dispatch than for its arithmetic, and ``torch._foreach_norm`` runs one norm per tensor there.
    (``_flatten_dense_tensors`` is the one-call concatenation DDP's buckets use.)
    """
    return torch.linalg.vector_norm(_flatten_dense_tensors(list(tensors)))


def gradients_or_zeros(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's ``p.grad``, or zeros for a parameter the loss did not reach."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
