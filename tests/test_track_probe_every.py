"""The noise scale every few steps in bl.track: the same per-step estimates as when every step is
measured (it used to be refused, as if the model were not made of linear layers)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import batchlab as bl
from batchlab.data import load_dataset
from batchlab.models import build_model


def tracked(probe_every: int):
    torch.set_num_threads(1)
    ds = load_dataset("blobs")
    X, y = ds.train[0].double(), ds.train[1]
    model = build_model("mlp", ds, hidden=[8], seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with bl.track(model, optimizer, probes=["noise_scale"], probe_every=probe_every, n_train=500) as run:
        for _ in range(2):
            for start in range(0, 500, 50):
                out = model(X[start:start + 50])
                loss = F.cross_entropy(out, y[start:start + 50])
                optimizer.zero_grad()
                loss.backward()
                run.step(loss, outputs=out, targets=y[start:start + 50])
                optimizer.step()
            run.end_epoch()
    return run.steps


def test_noise_scale_every_third_step_gives_the_same_estimates_at_those_steps():
    every, third = tracked(1), tracked(3)
    measured = (third["step"] - 1) % 3 == 0
    assert third.loc[~measured, "grad_sq_raw"].isna().all() and measured.sum() == 7
    for column in ("grad_sq_raw", "trace_cov_raw"):
        assert np.allclose(third.loc[measured, column], every.loc[measured, column], rtol=1e-9), column
    assert third["batch_loss"].tolist() == every["batch_loss"].tolist()
