"""Probes against oracles: autograd for grad_norm, manual arithmetic for distances, brute-force
per-sample gradients (a Python loop of autograd over samples) for the gradient noise scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchlab.config import TrainConfig
from batchlab.data import Dataset
from batchlab.errors import ConfigError
from batchlab.loop import fit
from batchlab.metrics import loss_function
from batchlab.probes import (
    GhostTaps,
    NoiseScale,
    ProbeSet,
    part_sizes,
    per_sample_estimates,
    per_sample_gradients_from_losses,
    two_batch_estimates,
)

N, FEATURES, CLASSES = 60, 5, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


def toy_dataset(seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(N, FEATURES, generator=generator)
    y = (X[:, 0] + 0.5 * X[:, 1] + 0.8 * torch.randn(N, generator=generator) > 0).long() + (X[:, 2] > 1).long()
    return Dataset("toy", (X, y), n_classes=CLASSES)


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def brute_force_gradients(model: nn.Module, dataset: Dataset) -> torch.Tensor:
    """(N, P) per-sample gradients, one autograd call per sample, in float64."""
    X, y = dataset.train
    rows = []
    for i in range(X.shape[0]):
        loss = nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def exact_ingredients(per_sample: torch.Tensor) -> tuple[float, float]:
    """‖G‖² and tr(Σ), Σ the per-sample covariance normalised by 1/(N−1)."""
    mean = per_sample.mean(0)
    trace = float((per_sample - mean).square().sum() / (per_sample.shape[0] - 1))
    return float(mean.square().sum()), trace


def probe_on_random_batches(probe_names, model, dataset, batch_size, trials, seed=0):
    """Drive a ProbeSet the way train_step does, on many random batches at fixed weights."""
    X, y = dataset.train
    loss_fn = loss_function("auto", "classification")
    probes = ProbeSet.create(probe_names, model, dataset, TrainConfig(), loss_fn)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(trials):
        index = torch.randperm(N, generator=generator)[:batch_size]  # without replacement
        losses = loss_fn(model(X[index]), y[index])
        probes.after_forward(losses)
        model.zero_grad(set_to_none=True)
        losses.mean().backward()
        probes.after_backward()
        rows.append(probes.collect())
    return rows


def test_grad_norm_equals_autograd():
    dataset, model = toy_dataset(), toy_model()
    X, y = dataset.train
    rows = probe_on_random_batches(["grad_norm"], model, dataset, batch_size=16, trials=1)
    # The same batch again: the seed fixes it.
    index = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:16]
    loss = nn.functional.cross_entropy(model(X[index]), y[index])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert rows[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_dist_from_init_and_update_norm_match_manual_sgd():
    dataset = toy_dataset()
    model = toy_model()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    lr = 0.3
    config = TrainConfig(batch_size=10, max_steps=22, lr=lr, probe_every=3, eval_train=False)
    run = fit(model, dataset, config, probes=["grad_norm", "dist_from_init", "update_norm"], progress=False)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    last = run.steps.dropna(subset=["dist_from_init"]).iloc[-1]
    assert int(last["step"]) == run.clock.step == 22  # probed after steps 1, 4, ..., 22
    assert last["dist_from_init"] == pytest.approx(float((theta - theta0).norm()), rel=1e-5)
    measured = run.steps.dropna(subset=["update_norm"])
    assert len(measured) == 8  # every third of 22 steps
    # Plain SGD: θ_t − θ_{t−1} = −lr·g_B, exactly one step even though probes run every 3 steps.
    assert measured["update_norm"].to_numpy() == pytest.approx(lr * measured["grad_norm"].to_numpy(), rel=1e-5)
    assert run.steps["update_norm"].isna().sum() == len(run.steps) - 8


def test_unknown_or_repeated_probe_is_a_config_error():
    dataset, model = toy_dataset(), toy_model()
    with pytest.raises(ConfigError, match="unknown probe"):
        fit(model, dataset, TrainConfig(epochs=1), probes=["grad_nrom"], progress=False)
    with pytest.raises(ConfigError, match="twice"):
        fit(model, dataset, TrainConfig(epochs=1), probes=["grad_norm", "grad_norm"], progress=False)
    with pytest.raises(ConfigError, match="parts"):
        NoiseScale(parts=1)


def test_part_sizes_cover_the_batch():
    assert part_sizes(32, 2) == [16, 16]
    assert part_sizes(7, 3) == [3, 2, 2]


def test_two_batch_estimator_is_exact_on_its_own_expectations():
    # Feed the estimator the exact expectations E‖g_b‖² = ‖G‖² + tr(Σ)(1/b − 1/N): it must return ‖G‖², tr(Σ).
    grad_sq, trace, n = 0.5, 40.0, 300
    expected = lambda b: torch.tensor(grad_sq + trace * (1 / b - 1 / n), dtype=torch.float64)  # noqa: E731
    est_grad_sq, est_trace = two_batch_estimates([expected(16), expected(16)], [16, 16], expected(32), 32, n)
    assert float(est_grad_sq) == pytest.approx(grad_sq, rel=1e-9)
    assert float(est_trace) == pytest.approx(trace, rel=1e-9)


def test_per_sample_gradients_from_losses_match_brute_force():
    dataset, model = toy_dataset(), toy_model()
    X, y = dataset.train
    losses = nn.functional.cross_entropy(model(X[:20]), y[:20], reduction="none")
    rows = per_sample_gradients_from_losses(losses, list(model.parameters()))
    oracle = brute_force_gradients(model, Dataset("toy", (X[:20], y[:20]), n_classes=CLASSES))
    assert torch.allclose(rows.double(), oracle, atol=1e-6)


@pytest.mark.parametrize(("probe", "trials"), [("noise_scale", 2000), ("noise_scale_exact", 1000)])
def test_noise_scale_estimates_average_to_the_exact_value(probe, trials):
    # N = 60 is small on purpose: tr(Σ)/N is then 13% of ‖G‖², so an estimator that ignored
    # sampling without replacement from a finite training set would miss the 10% tolerance.
    dataset, model = toy_dataset(), toy_model()
    grad_sq, trace = exact_ingredients(brute_force_gradients(model, dataset))
    assert trace / N > 0.12 * grad_sq
    suffix = "" if probe == "noise_scale" else "_exact"
    rows = probe_on_random_batches([probe], model, dataset, batch_size=24, trials=trials)
    mean_grad_sq = sum(r[f"grad_sq{suffix}_raw"] for r in rows) / len(rows)
    mean_trace = sum(r[f"trace_cov{suffix}_raw"] for r in rows) / len(rows)
    assert mean_trace == pytest.approx(trace, rel=0.10)
    assert mean_grad_sq == pytest.approx(grad_sq, rel=0.10)
    assert mean_trace / mean_grad_sq == pytest.approx(trace / grad_sq, rel=0.10)
    # The smoothed columns are moving averages of the raw ones, hence finite and of the same size.
    assert rows[-1][f"noise_scale{suffix}"] == pytest.approx(trace / grad_sq, rel=0.5)


def test_noise_scale_in_fit_at_nearly_fixed_weights():
    dataset, model = toy_dataset(), toy_model()
    grad_sq, trace = exact_ingredients(brute_force_gradients(model, dataset))
    # lr so small the weights do not move: every step estimates the same ‖G‖² and tr(Σ).
    config = TrainConfig(batch_size=24, epochs=300, lr=1e-9, eval_train=False)
    run = fit(model, dataset, config, probes=["noise_scale"], progress=False)
    assert run.steps["trace_cov_raw"].mean() == pytest.approx(trace, rel=0.10)
    assert run.steps["grad_sq_raw"].mean() == pytest.approx(grad_sq, rel=0.10)
    assert run.steps["noise_scale"].iloc[-1] == pytest.approx(trace / grad_sq, rel=0.5)


def test_per_sample_estimates_on_the_whole_population_are_exact():
    # A "batch" that is the whole training set: tr(Σ) is the 1/(N−1) covariance and ‖G‖² exact.
    dataset, model = toy_dataset(), toy_model()
    per_sample = brute_force_gradients(model, dataset)
    grad_sq, trace = exact_ingredients(per_sample)
    est_grad_sq, est_trace = per_sample_estimates(per_sample, n_train=N)
    assert float(est_trace) == pytest.approx(trace, rel=1e-9)
    assert float(est_grad_sq) == pytest.approx(grad_sq, rel=1e-9)


# --- the per-sample path of noise_scale and its fallback ------------------------------------------


def test_noise_scale_per_sample_path_equals_the_per_sample_estimator():
    # For a model of linear layers, noise_scale reads Σ_i ‖g_i‖² from the loop's own backward pass;
    # its raw estimates must equal noise_scale_exact's (B backward passes, one per sample) on the
    # same batch. Both probes together also check that the exact probe's backward passes through
    # the step's graph do not leak into the taps.
    dataset, model = toy_dataset(), toy_model()
    rows = probe_on_random_batches(["noise_scale", "noise_scale_exact"], model, dataset, batch_size=24, trials=5)
    for row in rows:
        assert row["grad_sq_raw"] == pytest.approx(row["grad_sq_exact_raw"], rel=1e-4)
        assert row["trace_cov_raw"] == pytest.approx(row["trace_cov_exact_raw"], rel=1e-4)


def test_noise_scale_per_sample_path_with_dropout_and_a_frozen_bias():
    # Dropout masks differ per sample and one bias is not trained: still the per-sample estimator.
    dataset = toy_dataset()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, CLASSES))
    model[0].bias.requires_grad_(False)
    probes = ProbeSet.create(["noise_scale", "noise_scale_exact"], model, dataset, TrainConfig(), loss_function("auto", "classification"))
    assert probes.ctx.scratch["linear_taps:noise_scale"] is not None
    X, y = dataset.train
    losses = probes.ctx.loss_fn(model(X[:20]), y[:20])
    probes.after_forward(losses)
    model.zero_grad(set_to_none=True)
    losses.mean().backward()
    probes.after_backward()
    row = probes.collect()
    assert row["trace_cov_raw"] == pytest.approx(row["trace_cov_exact_raw"], rel=1e-4)
    assert row["grad_sq_raw"] == pytest.approx(row["grad_sq_exact_raw"], rel=1e-4)


def test_noise_scale_measures_only_after_backward_on_linear_models():
    # No per-sample losses needed: the loop keeps its fused mean loss.
    dataset, model = toy_dataset(), toy_model()
    loss_fn = loss_function("auto", "classification")
    assert not ProbeSet.create(["noise_scale"], model, dataset, TrainConfig(), loss_fn).wants_losses
    assert ProbeSet.create([NoiseScale(method="parts")], toy_model(), dataset, TrainConfig(), loss_fn).wants_losses


def test_per_sample_linear_layers_accepts_only_per_sample_models():
    from batchlab.probes import per_sample_linear_layers

    def layers(model, dims=2):
        return per_sample_linear_layers(model, [p for p in model.parameters() if p.requires_grad], dims)

    assert len(layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)), dims=3)) == 2
    assert layers(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))) is None  # couples samples
    assert layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))) is None  # overwrites z
    assert layers(nn.Sequential(nn.Linear(4, 3)), dims=3) is None  # (B, T, F) inputs: sums over T
    shared = nn.Linear(3, 3)
    assert layers(nn.Sequential(shared, nn.Tanh(), shared)) is None  # one layer run twice
    conv = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    assert layers(conv) is None


def conv_dataset(seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 8, generator=generator)
    y = (X[:, :4].sum(1) + 0.8 * torch.randn(N, generator=generator) > 0).long() + (X[:, 5] > 1).long()
    return Dataset("toy-conv", (X, y), n_classes=CLASSES)


def brute_force_gradients_of(model: nn.Module, dataset: Dataset) -> torch.Tensor:
    """(N, P) per-sample gradients of a model in eval-free form (no batch coupling), float64."""
    X, y = dataset.train
    rows = []
    for i in range(X.shape[0]):
        loss = nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["conv", "parts"])
def test_noise_scale_beyond_linear_stacks_averages_to_the_exact_value(kind):
    # A convolutional model is read by its ghost norms (per-sample taps of any layer kind), the
    # half-batch method by its parts: both estimates must average to the exact ‖G‖² and tr(Σ)
    # (oracle as above).
    if kind == "conv":
        dataset = conv_dataset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, CLASSES))
        probe = "noise_scale"
    else:
        dataset, model, probe = toy_dataset(), toy_model(), NoiseScale(method="parts")
    grad_sq, trace = exact_ingredients(brute_force_gradients_of(model, dataset))
    loss_fn = loss_function("auto", "classification")
    probes = ProbeSet.create([probe], model, dataset, TrainConfig(), loss_fn)
    # The half-batch method needs the live graph; the ghost norms the loop's own backward pass.
    assert probes.wants_losses == (kind == "parts")
    assert isinstance(probes.ctx.scratch.get("linear_taps:noise_scale"), GhostTaps) == (kind == "conv")
    rows = probe_on_random_batches([probe], model, dataset, batch_size=24, trials=2000)
    mean_grad_sq = sum(r["grad_sq_raw"] for r in rows) / len(rows)
    mean_trace = sum(r["trace_cov_raw"] for r in rows) / len(rows)
    assert mean_trace == pytest.approx(trace, rel=0.10)
    assert mean_grad_sq == pytest.approx(grad_sq, rel=0.10)


def test_noise_scale_taps_leave_the_model_when_the_run_ends():
    dataset, model = toy_dataset(), toy_model()
    fit(model, dataset, TrainConfig(batch_size=10, max_steps=3, eval_train=False), probes=["noise_scale"], progress=False)
    import gc

    gc.collect()
    assert all(not m._forward_hooks for m in model.modules())


def test_dist_from_init_follows_in_place_updates_and_checkpoints(tmp_path):
    # The flat views follow the optimizer's in-place updates; a resumed run gives the same distances.
    from batchlab.callbacks import Checkpoint
    from batchlab.events import Callback, Stop

    class StopAfterEpoch2(Callback):
        def on_epoch_end(self, event):
            return Stop("killed") if event.clock.epoch == 2 else None

    dataset, probes = toy_dataset(), ["dist_from_init", "update_norm", "noise_scale"]
    config = TrainConfig(batch_size=10, epochs=4, lr=0.3, eval_train=False)
    full = fit(toy_model(), dataset, config, probes=probes, progress=False)
    path = tmp_path / "ck.pt"
    fit(toy_model(), dataset, config, probes=probes, callbacks=[Checkpoint(path), StopAfterEpoch2()], progress=False)
    resumed = fit(toy_model(seed=5), dataset, config, probes=probes, resume_from=path, progress=False)
    # θ_0 comes from the checkpoint, not from the resumed model's (different) initial weights.
    for column in ("dist_from_init", "update_norm", "noise_scale"):
        assert resumed.steps[column].to_numpy() == pytest.approx(full.steps[column].to_numpy(), rel=1e-6)


def test_noise_scale_with_probe_every_matches_every_step_at_the_measured_steps():
    # With probe_every > 1 the taps keep output gradients only on measured steps (armed after the
    # forward pass); the raw estimates there equal those of a run measuring every step.
    dataset = toy_dataset()
    config = TrainConfig(batch_size=10, max_steps=12, lr=0.2, eval_train=False)
    every = fit(toy_model(), dataset, config, probes=["noise_scale"], progress=False).steps
    third = fit(toy_model(), dataset, config.replace(probe_every=3), probes=["noise_scale"], progress=False).steps
    measured = third.dropna(subset=["trace_cov_raw"])
    assert list(measured["step"]) == [1, 4, 7, 10]
    expected = every.set_index("step").loc[measured["step"]]
    assert measured["trace_cov_raw"].to_numpy() == pytest.approx(expected["trace_cov_raw"].to_numpy(), rel=1e-5)
    assert measured["grad_sq_raw"].to_numpy() == pytest.approx(expected["grad_sq_raw"].to_numpy(), rel=1e-5)
