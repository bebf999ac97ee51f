"""The noise scale on the models users write, in their own loop: every step's raw estimates equal the
per-sample estimator computed from brute-force per-sample gradients (float64), whatever the layer
kinds (Linear on any shape, Conv1d/2d, Embedding, LayerNorm) and however the model is written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchlab as bl
from batchlab.probes import per_sample_estimates

N, BATCH, CLASSES = 48, 12, 3


class SubclassMLP(nn.Module):
    """The way many users write an MLP: named layers, functional activations."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SequenceModel(nn.Module):
    """Tokens -> embedding -> Conv1d over time -> layer norm -> Linear on (B, T, C) -> mean over time."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, ids):
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)  # (B, T, 6)
        return self.head(torch.tanh(self.norm(h))).mean(dim=1)  # (B, classes)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=1, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, CLASSES))  # (B, 1, 8, 8) -> (B, 3)


def data(kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "mlp":
        return torch.randn(N, 6, generator=generator, dtype=torch.float64)
    if kind == "cnn":
        return torch.randn(N, 1, 8, 8, generator=generator, dtype=torch.float64)
    return torch.randint(0, 10, (N, 7), generator=generator)


MODELS = {"mlp": SubclassMLP, "cnn": cnn, "sequence": SequenceModel}


def brute_force_estimates(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """`per_sample_estimates` from each sample's gradient, one backward pass per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    grad_sq, trace_cov = per_sample_estimates(torch.stack(rows), n_train=N)
    return float(grad_sq), float(trace_cov)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tracked_noise_scale_equals_brute_force_per_sample_gradients(kind):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    X, y = data(kind, generator), torch.randint(0, CLASSES, (N,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    with bl.track(model, optimizer, probes=["noise_scale"], n_train=N) as run:
        for start in range(0, N, BATCH):
            xb, yb = X[start:start + BATCH], y[start:start + BATCH]
            expected.append(brute_force_estimates(model, xb, yb))  # at the weights this step starts from
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad()
            loss.backward()
            run.step(loss, outputs=out, targets=yb)
            optimizer.step()
        run.end_epoch()
    steps = run.steps
    assert len(steps) == N // BATCH
    grad_sq, trace_cov = (torch.tensor(column, dtype=torch.float64) for column in zip(*expected))
    assert torch.tensor(steps["trace_cov_raw"].to_numpy()) == pytest.approx(trace_cov, rel=1e-9)
    assert torch.tensor(steps["grad_sq_raw"].to_numpy()) == pytest.approx(grad_sq, rel=1e-7, abs=1e-12)
