"""The learning-rate schedules against PyTorch's own schedulers, over whole runs.

`optim.lr_at` computes each update's learning rate in closed form; `torch.optim.lr_scheduler`
steps an optimizer through the same schedule one update at a time. Both must give the same rate at
every update of a run, warm-up, decays, cosine annealing and warm restarts included, and `bl.fit`
must train with those rates.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler

import batchlab as bl
from batchlab.optim import lr_at, warmup_steps

BASE_LR = 0.4
STEPS_PER_EPOCH = 7


def torch_rates(config: bl.TrainConfig, total_steps: int) -> list[float]:
    """The rate of each update as torch.optim.lr_scheduler gives it for `config`'s schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    warmup = warmup_steps(config, STEPS_PER_EPOCH)
    main = {
        "constant": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
        # Decays count epochs from the start of the run, warm-up included (Goyal et al. 2017: 30, 60, 80).
        "step": lambda: lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * STEPS_PER_EPOCH, gamma=config.gamma),
        "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup - 1, 1),
                                                         eta_min=config.min_lr),
        "sgdr": lambda: lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=config.sgdr_epochs * STEPS_PER_EPOCH,
                                                                 T_mult=config.sgdr_mult, eta_min=config.min_lr),
    }[config.schedule]
    if warmup == 0:
        scheduler = main()
    else:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
        if config.schedule == "step":  # the step count runs on under the ramp: both act at once
            scheduler = lr_scheduler.ChainedScheduler([ramp, main()])
        else:  # the annealing starts where the ramp ends
            scheduler = lr_scheduler.SequentialLR(optimizer, [ramp, main()], milestones=[warmup])
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


SCHEDULES = [
    dict(schedule="constant"),
    dict(schedule="constant", warmup_steps=5),
    dict(schedule="step", step_epochs=2, gamma=0.5),
    dict(schedule="step", step_epochs=3, gamma=0.1, warmup_epochs=1.0),
    dict(schedule="cosine", min_lr=0.01),
    dict(schedule="cosine", min_lr=0.0, warmup_steps=10),
    dict(schedule="sgdr", sgdr_epochs=2, sgdr_mult=1, min_lr=0.02),
    dict(schedule="sgdr", sgdr_epochs=1, sgdr_mult=2, min_lr=0.0),
    dict(schedule="sgdr", sgdr_epochs=2, sgdr_mult=3, min_lr=0.001, warmup_steps=4),
]


@pytest.mark.parametrize("options", SCHEDULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_lr_at_is_what_torchs_schedulers_give_at_every_update(options):
    config = bl.TrainConfig(lr=BASE_LR, epochs=12, **options)
    total = 12 * STEPS_PER_EPOCH
    expected = torch_rates(config, total)
    ours = [lr_at(step, config, BASE_LR, STEPS_PER_EPOCH, total) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("options", [SCHEDULES[3], SCHEDULES[5], SCHEDULES[8]], ids=["step", "cosine", "sgdr"])
def test_fit_trains_with_torchs_rates(options):
    dataset = bl.load_dataset("blobs")
    batch_size = -(-len(dataset.train[0]) // STEPS_PER_EPOCH)  # STEPS_PER_EPOCH batches an epoch
    config = bl.TrainConfig(batch_size=batch_size, epochs=12, lr=BASE_LR, compile="off", **options)
    run = bl.fit(bl.build_model("mlp", dataset, seed=0), dataset, config)
    assert len(run.steps) == 12 * STEPS_PER_EPOCH
    assert run.steps["lr"].tolist() == pytest.approx(torch_rates(config, len(run.steps)), rel=1e-12, abs=1e-15)
