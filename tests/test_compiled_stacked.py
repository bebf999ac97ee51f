"""The compiled stacked step trains R replicas exactly as R separate eager loops (float64).

The oracle is independent: each replica is a plain model trained by torch.optim on its own batches
with its own learning rate; hyperparameters that differ between replicas take the per-replica
tensor path of the compiled update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab.compiled.stacked import StackedStep
from batchlab.optim import stacked_chain

R, N, B, STEPS = 3, 48, 8, 30
LRS = [0.02, 0.05, 0.1]
TOLERANCE = 1e-9


def make_models() -> list[torch.nn.Module]:
    models = []
    for seed in range(R):
        torch.manual_seed(seed)
        models.append(torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double())
    return models


def data():
    generator = torch.Generator().manual_seed(7)
    X = torch.randn(N, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=generator)
    orders = torch.stack([torch.randperm(N, generator=generator) for _ in range(R)])  # (R, N) each its own order
    return X, y, orders


CASES = {  # optimizer kind, per-replica values, torch optimizer of replica r
    "sgd": ("sgd", {"momentum": [0.5, 0.9, 0.0], "weight_decay": [0.0] * R},
            lambda params, r: torch.optim.SGD(params, lr=LRS[r], momentum=[0.5, 0.9, 0.0][r])),
    "adam": ("adam", {"momentum": [0.0] * R, "weight_decay": [0.0, 1e-2, 1e-3]},
             lambda params, r: torch.optim.Adam(params, lr=LRS[r], weight_decay=[0.0, 1e-2, 1e-3][r])),
}


@pytest.mark.parametrize("case", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])  # adam: ~30 s of C++ compilation
def test_stacked_compiled_equals_separate_eager_runs(case):
    kind, values, make_optimizer = CASES[case]
    X, y, orders = data()
    models = make_models()
    names = [n for n, _ in models[0].named_parameters()]
    params = [torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_() for n in names]
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    chain = stacked_chain(kind, False, {**arrays, "beta1": np.full(R, 0.9), "beta2": np.full(R, 0.999)},
                          torch.device("cpu"))
    state = chain.init(params)
    step = StackedStep(make_models()[0], names, chain, lambda o, t: F.cross_entropy(o, t, reduction="none"), True)
    lr = torch.tensor(LRS, dtype=torch.float64)
    stacked_numbers = []
    for s in range(STEPS):
        index = orders[:, (s * B) % N:(s * B) % N + B]  # (R, B)
        out = step(params, [], state, lr, X[index], y[index])
        stacked_numbers.append((out.loss.tolist(), out.correct.tolist()))
    assert step.fallback_reason is None

    for r, model in enumerate(make_models()):  # the oracle: one plain loop per replica
        optimizer = make_optimizer(model.parameters(), r)
        for s in range(STEPS):
            index = orders[r, (s * B) % N:(s * B) % N + B]
            output = model(X[index])
            loss = F.cross_entropy(output, y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert abs(loss.item() - stacked_numbers[s][0][r]) < TOLERANCE
            assert (output.argmax(1) == y[index]).sum().item() == stacked_numbers[s][1][r]
        for name, stacked in zip(names, params):
            assert (model.get_parameter(name) - stacked[r]).abs().max().item() < TOLERANCE
