"""A local-CBS branch is `bl.fit` resumed from the same checkpoint at the branch's batch size and lr.

`local_cbs` branches with its own functions (`_branch_point`, `branch`, `train_branch`, `mean_loss`):
deep copies of the model and the optimizer's state, the lr scaled by the rule, a plain loop over a
stream of samples. Here the same weights and optimizer state come from a `Checkpoint` of a `fit`
run, the branch trains on the samples the resumed run draws, and both must agree: every weight and
the final training loss, in float64, to 1e-10 (the bound the issue asks is 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from batchlab.callbacks import Checkpoint
from batchlab.config import TrainConfig
from batchlab.critical_batch import (
    AUTO_RULES,
    _branch_point,
    branch,
    mean_loss,
    train_branch,
)
from batchlab.data import Dataset
from batchlab.loop import fit
from batchlab.optim import build_optimizer, scaling_factor

N, B, EPOCHS_BEFORE, EPOCHS_AFTER = 96, 8, 2, 2


def dataset() -> Dataset:
    g = torch.Generator().manual_seed(11)
    X = torch.randn(N + 24, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] - X[:, 3] > 0).long() + (X[:, 1] > 0.5).long()
    return Dataset("toy", (X[:N], y[:N]), (X[N:], y[N:]), None, n_classes=3)


def model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_a_branch_equals_fit_resumed_at_the_branch_batch_size_and_lr(tmp_path, optimizer, factor):
    extra = {"momentum": 0.9} if optimizer in ("sgd", "rmsprop") else {}
    base = TrainConfig(batch_size=B, epochs=EPOCHS_BEFORE, optimizer=optimizer, lr=0.02, weight_decay=1e-3,
                       seed=5, compile="off", **extra)
    fit(model(), dataset(), base, callbacks=[Checkpoint(tmp_path / "c.pt")], progress=False)
    blob = torch.load(tmp_path / "c.pt", weights_only=True)

    # The user's side: the model and optimizer as the run left them, branched by local_cbs' functions.
    net = model()
    net.load_state_dict(blob["model"])
    opt = build_optimizer(net.parameters(), base, base.lr)
    opt.load_state_dict(blob["optimizer"])
    rule = AUTO_RULES[type(opt)]
    branch_model, branch_opt = branch(_branch_point(net, opt), scaling_factor(rule, factor))
    generator = torch.Generator()
    generator.set_state(blob["generator"])
    stream = torch.cat([torch.randperm(N, generator=generator) for _ in range(EPOCHS_AFTER)])  # what fit draws next
    train_branch(branch_model, branch_opt, torch.nn.functional.cross_entropy, dataset().train, stream,
                 factor * B, seed=0)

    # fit's side: the same checkpoint resumed with the batch size k·B from there, the lr by the same rule.
    resumed_model = model()
    branched = base.replace(batch_size=[(0, B), (EPOCHS_BEFORE * N, factor * B)], lr_scaling=rule,
                            reference_batch_size=B, epochs=EPOCHS_BEFORE + EPOCHS_AFTER)
    run = fit(resumed_model, dataset(), branched, resume_from=tmp_path / "c.pt", progress=False)

    assert run.steps.batch_size.tolist()[-1] == factor * B
    assert run.steps.lr.iloc[-1] == pytest.approx(branch_opt.param_groups[0]["lr"], rel=1e-15)
    for (name, got), want in zip(branch_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
    loss = mean_loss(branch_model, torch.nn.functional.cross_entropy, dataset().train)
    assert loss == pytest.approx(run.evals.train_loss.iloc[-1], abs=1e-10)
