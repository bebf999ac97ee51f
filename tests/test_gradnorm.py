"""The gradient-norm and distance experiments against brute force: per-sample gradients by a loop
of autograd, batch norms by direct averaging, the theory by enumerating every possible batch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError
from batchlab.gradnorm import (
    GradientStats,
    batch_sq_norms,
    distance_experiment,
    gradient_stats,
    gradnorm_experiment,
    norms_by_batch_size,
    per_sample_gradients,
)
from batchlab.metrics import loss_function

N, FEATURES, CLASSES = 64, 4, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    yield
    torch.set_num_threads(threads)


def toy_dataset(n: int = N) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, FEATURES, generator=generator)
    y = ((X[:, 0] - X[:, 1] + 0.7 * torch.randn(n, generator=generator)) > 0).long() + (X[:, 3] > 0.8).long()
    return Dataset("toy", (X, y), val=(X[:16], y[:16]), n_classes=CLASSES)


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 6), nn.ReLU(), nn.Linear(6, CLASSES))


def brute_force(model, X, y) -> torch.Tensor:
    rows = []
    for i in range(X.shape[0]):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)  # (N, P)


LOSS = loss_function("auto", "classification")


def test_per_sample_gradients_match_a_loop_of_autograd():
    dataset, model = toy_dataset(), toy_model()
    rows = per_sample_gradients(model, *dataset.train, LOSS, chunk_size=10)
    assert rows.shape == (N, sum(p.numel() for p in model.parameters()))
    assert torch.allclose(rows, brute_force(model, *dataset.train), atol=1e-6)


@pytest.mark.parametrize("size", [3, 40])  # the gather path and the matrix-product path
def test_batch_sq_norms_equal_direct_batch_gradients(size):
    per_sample = torch.randn(N, 7, dtype=torch.float64)
    batches = torch.stack([torch.randperm(N)[:size] for _ in range(5)])
    direct = torch.stack([per_sample[b].mean(0).square().sum() for b in batches])
    assert torch.allclose(batch_sq_norms(per_sample @ per_sample.T, batches), direct, rtol=1e-10)


def test_theory_equals_the_average_over_every_possible_batch():
    per_sample = torch.randn(7, 3, dtype=torch.float64) + torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    stats = gradient_stats(per_sample)
    n, b = 7, 3
    without = np.mean([float(per_sample[list(c)].mean(0).square().sum()) for c in itertools.combinations(range(n), b)])
    with_replacement = np.mean([float(per_sample[list(c)].mean(0).square().sum()) for c in itertools.product(range(n), repeat=b)])
    assert stats.expected_sq_norm(b) == pytest.approx(without, rel=1e-12)
    assert stats.expected_sq_norm(b, replacement=True) == pytest.approx(with_replacement, rel=1e-12)
    # A batch of the whole set is G itself.
    assert stats.expected_sq_norm(n) == pytest.approx(float(per_sample.mean(0).square().sum()), rel=1e-12)


def test_trials_agree_with_theory_and_conventions_are_opposite():
    dataset, model = toy_dataset(), toy_model()
    per_sample = per_sample_gradients(model, *dataset.train, LOSS)
    stats = gradient_stats(per_sample)
    table = norms_by_batch_size(per_sample, [1, 4, 16, 32], trials=2000, generator=torch.Generator().manual_seed(0))
    for row in table.itertuples():
        assert abs(row.sq_norm_mean - stats.expected_sq_norm(row.batch_size)) < 4 * row.sq_norm_se
    assert table["grad_norm_mean"].is_monotonic_decreasing  # mean loss: falls with B


def test_gradnorm_experiment_measures_at_each_point():
    dataset, model = toy_dataset(), toy_model()
    config = TrainConfig(batch_size=8, lr=0.1, eval_train=True)
    result = gradnorm_experiment(model, dataset, config, at_epochs=[0, 3], batch_sizes=[1, 8, 32], trials=50, progress=False)
    assert list(result.table["point"].unique()) == ["epoch 0", "epoch 3"]
    assert len(result.table) == 6 and len(result.training) == 3
    # The stats at epoch 3 are those of the trained model's weights (the model is trained in place).
    final = gradient_stats(brute_force(model, *dataset.train).double())
    assert result.stats["epoch 3"].grad_sq == pytest.approx(final.grad_sq, rel=1e-4)
    assert result.stats["epoch 3"].trace_cov == pytest.approx(final.trace_cov, rel=1e-4)
    # Epoch 0 is the untrained model: the closed form |G|^2 + tr(S)(1/B - 1/N) from brute-force
    # per-sample gradients of a fresh copy, with S numpy's 1/(N-1) covariance.
    initial = brute_force(toy_model(), *dataset.train).double().numpy()  # (N, P)
    grad_sq, trace_cov = np.sum(initial.mean(axis=0) ** 2), np.trace(np.cov(initial, rowvar=False))
    first = result.table[result.table["point"] == "epoch 0"]
    expected = [grad_sq + trace_cov * (1 / b - 1 / N) for b in (1, 8, 32)]
    np.testing.assert_allclose(first["theory_sq_norm"], expected, rtol=1e-4)
    with pytest.raises(ConfigError, match="batch sizes"):
        gradnorm_experiment(toy_model(), dataset, config, at_epochs=[1], batch_sizes=[0, 8], progress=False)
    with pytest.raises(ConfigError, match="--at"):
        gradnorm_experiment(toy_model(), dataset, config, at_epochs=[-1], progress=False)


def test_distance_experiment_same_samples_and_exact_end_distance():
    dataset = toy_dataset()
    config = TrainConfig(epochs=2, optimizer="sgd")
    result = distance_experiment(lambda: toy_model(seed=3), dataset, config, batch_sizes=[4, 32], lrs=[0.01, 0.1],
                                 points_per_run=5, progress=False)  # fmt: skip
    assert len(result.final) == 4
    assert set(result.final["samples_seen"]) == {2 * N}
    # Re-train one run by hand: plain SGD (momentum 0), B = 32, lr 0.1, the documented data order
    # (one randperm per epoch from a generator seeded with the config's seed).
    model = toy_model(seed=3)
    theta0 = [p.detach().clone() for p in model.parameters()]
    X, y = dataset.train
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(2):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, 32):
            index = order[start:start + 32]
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(X[index]), y[index]), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.1 * g
    manual = math.sqrt(sum(float((p.detach() - q).square().sum()) for p, q in zip(model.parameters(), theta0)))
    row = result.final[(result.final["batch_size"] == 32) & (result.final["lr"] == 0.1)].iloc[0]
    assert row["dist_from_init"] == pytest.approx(manual, rel=1e-5)  # float32, 4 steps
    last = result.curves[(result.curves["batch_size"] == 32) & (result.curves["lr"] == 0.1)].iloc[-1]
    assert last["dist_from_init"] == pytest.approx(manual, rel=1e-5) and last["samples_seen"] == 2 * N
    # Ten times the learning rate moves further from the initial weights.
    big = result.final.set_index(["batch_size", "lr"])["dist_from_init"]
    assert big[(4, 0.1)] > big[(4, 0.01)] and big[(32, 0.1)] > big[(32, 0.01)]


def test_noise_scale_equals_numpys_covariance_over_the_squared_mean():
    """B_simple = tr(S)/|G|^2 with S the 1/(N-1) sample covariance (numpy's np.cov), from per-sample gradients."""
    dataset, model = toy_dataset(), toy_model()
    per_sample = brute_force(model, *dataset.train).double().numpy()  # (N, P)
    expected = np.trace(np.cov(per_sample, rowvar=False)) / np.sum(per_sample.mean(axis=0) ** 2)
    stats = gradient_stats(torch.from_numpy(per_sample))
    assert stats.noise_scale == pytest.approx(expected, rel=1e-10)
    assert math.isnan(GradientStats(n=10, grad_sq=0.0, trace_cov=4.0).noise_scale)  # no signal: undefined
