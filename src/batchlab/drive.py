"""The epoch skeleton every driver that owns its batches runs: one place for the order of things.

`drive` is the whole of a run from the core's point of view: the run starts, the step-0 evaluation
(a fresh run; a resumed one has it), then epochs until the clock's last step or a stop: each epoch
draws its order and batches, trains them, is evaluated at its end (unless it just was), delivers its
row, and acts on the callbacks' requests. A driver (`batchlab.fit`, a data-parallel rank) supplies
what differs:

- ``epoch_batches()``: the next epoch's sample order and its batches (`batchlab.schedule.cut_epoch`);
- ``run_epoch(order, batches)``: the steps, each handing its numbers to the core;
- ``evaluate()``: full passes at the current weights, handed to the core;
- ``settle()``: act on the callbacks' requests (a data-parallel run agrees on them across ranks; a
  batch-size change re-plans the run); False once the run stops.

How a run that raises is recorded stays the driver's (one process, or every rank agreeing).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .record import Recorder, Run


class Driver(Protocol):
    recorder: Recorder
    model: torch.nn.Module

    def epoch_batches(self) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def run_epoch(self, order: torch.Tensor, batches: list[torch.Tensor]) -> None: ...

    def evaluate(self) -> None: ...

    def settle(self) -> bool: ...


def drive(driver: Driver) -> Run:
    """Run ``driver`` through the epoch skeleton and return the finished run."""
    rec = driver.recorder
    rec.start_run()
    if not rec.evals:  # a fresh run (a resumed one has its step-0 evaluation)
        driver.evaluate()
    driver.settle()
    driver.model.train()
    while rec.going and rec.clock.step < rec.clock.total_steps:
        order, batches = driver.epoch_batches()
        rec.start_epoch(len(batches) if rec.clock.changes else None)
        driver.run_epoch(order, batches)
        if rec.status == "diverged":
            break
        if not rec.evaluated_now():
            driver.evaluate()
        rec.end_epoch()
        driver.settle()
    return rec.finish()
