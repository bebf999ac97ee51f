"""Metric views, each with one exact meaning.

- ``batch_loss``/``batch_acc``: on the current batch, from the forward pass used for the update
  (train mode, weights before the update).
- ``running_loss``/``running_acc``: the sample-weighted mean of the batch values since the epoch
  began. This is what Keras shows in its progress bar and stores in ``History``: its loss tracker is
  a ``Mean`` updated with each batch's mean loss weighted by the batch size, and its accuracy is the
  exact per-sample mean; both are reset when an epoch begins.
- ``train_loss``/``train_acc``, ``val_*``, ``test_*``: one full pass over the split in eval mode under
  ``torch.inference_mode``, at the weights of that moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError


def loss_function(name: str, task: str):
    """The per-sample loss ``f(output, y) -> (N,)`` for the config's ``loss`` and the dataset's task."""
    if name == "auto":
        name = "cross_entropy" if task == "classification" else "mse"
    if name == "cross_entropy":
        if task != "classification":
            raise ConfigError("loss 'cross_entropy' needs class labels; this dataset is a regression task: use loss 'mse'")
        return _cross_entropy
    return _squared_error


def mean_loss_function(name: str, task: str):
    """The batch's mean loss ``f(output, y) -> ()``, fused (cheaper than per-sample losses and a mean)."""
    per_sample = loss_function(name, task)
    if per_sample is _cross_entropy:
        return F.cross_entropy
    return lambda output, y: per_sample(output, y).mean()


def _cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, y, reduction="none")  # (N,)


def _squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.reshape(output.shape).to(output.dtype)
    return (output - target).pow(2).reshape(output.shape[0], -1).mean(dim=1)  # (N,) mean over outputs


def correct_count(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max class equals the label (a 0-d tensor, not synchronised)."""
    return (output.argmax(dim=1) == y).sum()


@dataclass
class RunningMean:
    """Keras' epoch aggregate: totals of loss·B, correct samples and samples since the epoch began."""

    loss_total: float = 0.0
    correct: int = 0
    count: int = 0

    def update(self, batch_loss: float, batch_correct: int, batch_size: int) -> None:
        self.loss_total += batch_loss * batch_size
        self.correct += batch_correct
        self.count += batch_size

    @property
    def loss(self) -> float:
        return self.loss_total / self.count if self.count else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.count if self.count else float("nan")


def evaluate(
    model: torch.nn.Module,
    split: tuple[torch.Tensor, torch.Tensor],
    loss_fn,
    classification: bool,
    batch_size: int = 8192,
) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in eval mode, at the current weights.

    Returns:
        ``(loss, acc)``; ``acc`` is NaN for regression. The model's train/eval mode is restored.
    """
    X, y = split
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=X.device)
    correct = torch.zeros((), dtype=torch.int64, device=X.device)
    with torch.inference_mode():
        for start in range(0, X.shape[0], batch_size):
            xb, yb = X[start : start + batch_size], y[start : start + batch_size]
            output = model(xb)
            loss_sum += loss_fn(output, yb).sum(dtype=torch.float64)
            if classification:
                correct += correct_count(output, yb)
    model.train(was_training)
    n = X.shape[0]
    return loss_sum.item() / n, (correct.item() / n if classification else float("nan"))
