"""Gradient accumulation in bl.track follows the optimizer: an update is what ``optimizer.step()``
applied, k micro-batches or an epoch's shorter last group, with its probes measured before the
weights move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.data import load_dataset
from batchlab.errors import BatchlabError
from batchlab.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def test_the_short_last_group_of_an_epoch_is_an_update_measured_before_it_moves():
    """23 micro-batches of 10 an epoch, accumulate=2, the optimizer stepping on every second one and
    on the last: 12 rows an epoch, each with its micro-batches' total size and sample-weighted loss,
    and the gradient norm and update norm of the update the optimizer applied (the loop's own)."""
    ds = load_dataset("blobs")
    X, y = ds.train[0][:230].double(), ds.train[1][:230]
    model = build_model("mlp", ds, hidden=[8], seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    k, applied = 2, []  # (size, loss, grad norm, update norm) per optimizer step, by the loop itself
    with bl.track(model, optimizer, probes=["grad_norm", "update_norm", "noise_scale"], accumulate=k) as run:
        for _ in range(2):
            group = []
            for i in range(23):
                out = model(X[10 * i:10 * i + 10])
                loss = F.cross_entropy(out, y[10 * i:10 * i + 10])
                (loss / k).backward()
                run.step(loss, outputs=out, targets=y[10 * i:10 * i + 10])
                group.append(loss.item())
                if len(group) == k or i == 22:
                    before = flat(model.parameters())
                    norm = flat(p.grad for p in model.parameters()).norm().item()
                    optimizer.step()
                    optimizer.zero_grad()
                    moved = (flat(model.parameters()) - before).norm().item()
                    applied.append((10 * len(group), np.mean(group), norm, moved))
                    group = []
            run.end_epoch()
    steps = run.steps
    size, loss, norm, moved = (np.array(c) for c in zip(*applied))
    assert len(steps) == len(applied) == 24
    assert steps["batch_size"].tolist() == size.tolist() == ([20] * 11 + [10]) * 2
    assert steps.groupby("epoch")["samples_seen"].max().tolist() == [230, 460]
    assert np.allclose(steps["batch_loss"], loss, rtol=1e-12)
    assert np.allclose(steps["grad_norm"], norm, rtol=1e-10)
    assert np.allclose(steps["update_norm"], moved, rtol=1e-10)
    # The micro-batch noise scale needs two micro-batches: none for the one-batch groups.
    short = steps["batch_size"] == 10
    assert steps.loc[short, "grad_sq_raw"].isna().all() and steps.loc[~short, "grad_sq_raw"].notna().all()
    assert run.run.clock.steps_per_epoch == 12


def test_an_epoch_ending_inside_a_group_without_its_update_is_refused():
    ds = load_dataset("blobs")
    model = build_model("mlp", ds, hidden=[8], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = ds.train
    with bl.track(model, optimizer, accumulate=2) as run:
        for i in range(3):
            out = model(X[10 * i:10 * i + 10])
            F.cross_entropy(out, y[10 * i:10 * i + 10]).backward()
            run.step(0.5, outputs=out, targets=y[10 * i:10 * i + 10])
            if i == 1:
                optimizer.step()
        with pytest.raises(BatchlabError, match="1 of 2 micro-batches with no optimizer.step"):
            run.end_epoch()
