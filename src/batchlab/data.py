"""Datasets as in-memory tensors, their splits, and the order of an epoch's batches.

A `Dataset` holds ``train``, ``val`` and ``test`` as ``(X, y)`` tensor pairs on one device.
Batches are slices of a seeded index permutation, never a DataLoader: for data that fits in
memory that is the fastest way, and it makes the epoch order explicit and reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Split = tuple[torch.Tensor, torch.Tensor]  # (X: (N, *features), y: (N,) int64 labels or (N, k) targets)


@dataclass(frozen=True)
class Dataset:
    """A training set with optional validation and test sets, as tensors.

    Attributes:
        name: short name (``mnist1d``) or the file it came from.
        train, val, test: ``(X, y)`` pairs; ``val``/``test`` may be None.
        n_classes: number of classes for classification; None for regression.
        origin: where the data comes from, in words (shown by ``batchlab datasets``).
    """

    name: str
    train: Split
    val: Split | None = None
    test: Split | None = None
    n_classes: int | None = None
    origin: str = ""

    @property
    def task(self) -> str:
        return "regression" if self.n_classes is None else "classification"

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train[0].device

    def to(self, device: str | torch.device) -> "Dataset":
        """The same dataset with every tensor on ``device``."""
        move = lambda split: None if split is None else (split[0].to(device), split[1].to(device))  # noqa: E731
        return replace(self, train=move(self.train), val=move(self.val), test=move(self.test))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """ceil(N/B), or floor(N/B) when the last partial batch is dropped."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, generator: torch.Generator, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch: a fresh permutation drawn from ``generator`` (or 0..N-1)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)


def batch_indices(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Split an epoch's order into consecutive batches; the last partial batch is kept unless drop_last."""
    batches = list(torch.split(order, batch_size))
    if drop_last and batches and batches[-1].numel() < batch_size:
        batches.pop()
    return batches
