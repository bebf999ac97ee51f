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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    return _mean_squared_error  # one function object: compiled steps are cached by it


def _mean_squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _squared_error(output, y).mean()  # ()


def _cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, y, reduction="none")  # (N,)


def _squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.reshape(output.shape).to(output.dtype)
    return (output - target).pow(2).reshape(output.shape[0], -1).mean(dim=1)  # (N,) mean over outputs


def correct_count(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max class equals the label (a 0-d tensor, not synchronised)."""
    return (output.argmax(dim=1) == y).sum()


def correct_counts(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`correct_count` of K batches at once: outputs (K, B, classes), labels (K, B); (K,) counts."""
    return (outputs.argmax(dim=2) == y).sum(dim=1)


@dataclass
class RunningMean:
    """Keras' epoch aggregate: totals of loss·B, correct samples and samples since the epoch began."""

    loss_total: float = 0.0
    correct: int = 0
    count: int = 0

    def update(self, batch_loss: float, batch_correct: int, batch_size: int) -> tuple[float, float]:
        """Add a batch; the running loss and accuracy after it."""
        self.loss_total += batch_loss * batch_size
        self.correct += batch_correct
        self.count += batch_size
        return self.loss, self.acc

    @property
    def loss(self) -> float:
        return self.loss_total / self.count if self.count else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.count if self.count else float("nan")


def pass_totals(
    forward: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    batches: Iterable[Any],
    loss_fn,
    classification: bool,
    replicas: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed loss and correct count of ``forward`` over the given batches of a split: the one pass
    every full-split evaluation makes (eval mode and gradients are the caller's choice).

    Args:
        forward: maps a batch of inputs to outputs, (b, K); or, for ``replicas=R``, to (R, b, K):
            R models (a vmapped stack) on the same inputs.
        X, y: the split.
        batches: slices or index tensors into the split.
        loss_fn: per-sample loss, ``(output, y) -> (b,)``.
        classification: count correct arg-max predictions.
        replicas: R for a stacked forward, else None.

    Returns:
        ``(loss_sum, correct, n)``: float64 sums (0-d, or (R,) stacked) and the samples seen.
    """
    shape = () if replicas is None else (replicas,)
    loss_sum = torch.zeros(shape, dtype=torch.float64, device=X.device)
    correct = torch.zeros(shape, dtype=torch.int64, device=X.device)
    n = 0
    for index in batches:
        xb, yb = X[index], y[index]
        output = forward(xb)  # (b, K) or (R, b, K)
        b = xb.shape[0]
        if replicas is None:
            loss_sum += loss_fn(output, yb).sum(dtype=torch.float64)
            if classification:
                correct += correct_count(output, yb)
        else:
            # The loss on (R·b, K) rows: a per-sample loss under vmap would run torch's slow decomposition.
            losses = loss_fn(output.reshape(replicas * b, *output.shape[2:]),
                             yb.repeat(replicas, *([1] * (yb.ndim - 1))))  # (R·b,)
            loss_sum += losses.reshape(replicas, b).sum(dim=1, dtype=torch.float64)
            if classification:
                correct += (output.argmax(dim=2) == yb).sum(dim=1)
        n += b
    return loss_sum, correct, n


def _slices(n: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]


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
    try:
        with torch.inference_mode():
            loss_sum, correct, n = pass_totals(model, X, y, _slices(X.shape[0], batch_size), loss_fn, classification)
    finally:
        model.train(was_training)
    return loss_sum.item() / n, (correct.item() / n if classification else float("nan"))


Split = tuple[torch.Tensor, torch.Tensor]


def evaluation_splits(dataset, eval_train: bool = True) -> dict[str, Split]:
    """The splits a run evaluates, by name: ``train`` (unless ``eval_train`` is off), ``val``, ``test``
    (those the dataset has)."""
    every = {"train": dataset.train if eval_train else None, "val": dataset.val, "test": dataset.test}
    return {name: split for name, split in every.items() if split is not None}


def evaluate_splits(model: torch.nn.Module, splits: Mapping[str, Split], loss_fn, classification: bool,
                    batch_size: int = 8192) -> dict[str, float]:
    """Full passes of one model over named splits: ``{"train_loss", "train_acc", "val_loss", ...}``.

    The one full-split evaluation of batchlab: `fit`, the replicas on the CPU, the study's
    evaluator and ``explain`` all call it (or `evaluate_stacked` for a vmapped stack).
    """
    metrics: dict[str, float] = {}
    for name, split in splits.items():
        loss, acc = evaluate(model, split, loss_fn, classification, batch_size)
        metrics[f"{name}_loss"] = loss
        if classification:
            metrics[f"{name}_acc"] = acc
    return metrics


def evaluate_stacked(forward: Callable[[torch.Tensor], torch.Tensor], replicas: int, splits: Mapping[str, Split],
                     loss_fn, classification: bool, batch_size: int = 8192) -> list[dict[str, float]]:
    """`evaluate_splits` for R stacked models at once.

    Args:
        forward: inputs (b, ...) -> outputs (R, b, K), the R models in eval mode (a vmapped call).
        replicas: R.

    Returns:
        One metrics dict per model, in stack order.
    """
    results: list[dict[str, float]] = [{} for _ in range(replicas)]
    with torch.no_grad():
        for name, (X, y) in splits.items():
            loss_sum, correct, n = pass_totals(forward, X, y, _slices(X.shape[0], batch_size), loss_fn,
                                               classification, replicas)
            for result, loss, right in zip(results, (loss_sum / n).tolist(), correct.tolist()):
                result[f"{name}_loss"] = loss
                if classification:
                    result[f"{name}_acc"] = right / n
    return results
