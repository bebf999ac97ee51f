"""The epoch skeleton every driver that owns its batches runs: one place for the order of things.

`drive` is the whole of a run from the core's point of view, for a group of runs that step
together: `batchlab.fit` and a data-parallel rank are a group of one, `batchlab.fit_replicas` a
group of R stacked replicas that shrinks as replicas finish. The runs start, the step-0 evaluation
(of the fresh runs; a resumed one has it), then epochs until the clock's last step or until no
member trains: each epoch draws its order and batches, trains them, evaluates every member at its
end (unless it just was), delivers each member's row, and acts on the callbacks' requests. A member
that stops within an epoch (its callback, a target) ends that epoch there as `fit` does, with an
evaluation and its row, and its run ends; one that diverges ends at once, with neither; the others
train on. A Ctrl-C ends every member still training as ``interrupted`` at its step.

A driver supplies what differs:

- ``members``: the group's cores (`batchlab.record.Recorder`), in order;
- ``model``: the module that trains, put in train mode once the step-0 evaluation is done;
- ``epoch_batches()``: the next epoch's sample order and its batches, for the members still
  training (`batchlab.schedule.cut_epoch`);
- ``run_epoch(order, batches)``: the steps, each handing its numbers to the members' cores and
  calling `after_steps` (or doing what it does) where the rows are read; it returns at the epoch's
  end, or early once a member stops or diverges (``not member.going``), and is then called again
  for the rest of the epoch while other members train;
- ``evaluate(members)``: full passes at these members' current weights, handed to their cores;
- ``settle(members)``: act on these members' requests (a data-parallel run agrees on them across
  ranks; a batch-size change re-plans the run).

A group of one ignores the ``members`` arguments: they are always its one core. How a run that
raises anything but a Ctrl-C is recorded stays the driver's (one process, or every rank agreeing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .record import Recorder, Run


class Driver(Protocol):
    """What `drive` needs of a way of training (see the module docstring)."""

    @property
    def members(self) -> Sequence[Recorder]: ...

    @property
    def model(self) -> torch.nn.Module: ...

    def epoch_batches(self) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def run_epoch(self, order: torch.Tensor, batches: list[torch.Tensor]) -> None: ...

    def evaluate(self, members: Sequence[Recorder]) -> None: ...

    def settle(self, members: Sequence[Recorder]) -> object: ...


def drive(driver: Driver) -> list[Run]:
    """Run ``driver``'s group through the epoch skeleton.

    Returns:
        The finished runs, in the order of ``driver.members``.

    Raises:
        KeyboardInterrupt: after every member still training is finished as ``interrupted``.
    """
    group = list(driver.members)
    runs: dict[Recorder, Run] = {}  # the members whose runs have ended
    try:
        for member in group:
            member.start_run()
        fresh = [member for member in group if not member.evals]  # a resumed run has its step-0 evaluation
        if fresh:
            driver.evaluate(fresh)
        driver.settle(group)
        driver.model.train()
        active = _end_stopped(group, runs)
        # The members step together: the first one's clock is every member's.
        while active and active[0].clock.step < active[0].clock.total_steps:
            order, batches = driver.epoch_batches()
            for member in active:
                member.start_epoch(len(batches) if member.clock.changes else None)
            active = _train_epoch(driver, order, batches, active, runs)
        for member in active:
            runs[member] = member.finish()
    except KeyboardInterrupt:
        for member in group:
            if member not in runs:
                runs[member] = member.finish("interrupted", f"interrupted at step {member.clock.step}")
        raise
    return [runs[member] for member in group]


def after_steps(driver: Driver, members: Sequence[Recorder]) -> bool:
    """Where ``run_epoch`` reads its latest steps' rows into the members' cores: the members due
    evaluate, and those whose callbacks asked for something have it acted on.

    Returns:
        Whether every member trains on; False once one stopped or diverged (``run_epoch`` then
        returns, and `drive` ends that member's epoch and run).
    """
    due = [member for member in members if member.evaluation_due()]  # never a diverged one
    if due:
        driver.evaluate(due)
    for member in members:
        if member.going and member.wants_attention:
            member.settle()
    return all(member.going for member in members)


def _train_epoch(driver: Driver, order: torch.Tensor, batches: list[torch.Tensor], active: list[Recorder],
                 runs: dict[Recorder, Run]) -> list[Recorder]:
    """One epoch of the ``active`` members; returns those that train on after it.

    A member that stops or diverges within the epoch ends there (`_end_epoch`, then its run), and
    the others' epoch goes on from where it stands.
    """
    while True:
        driver.run_epoch(order, batches)
        left = [member for member in active if not member.going]
        if not left:
            break
        _end_epoch(driver, [member for member in left if member.status != "diverged"])
        _end_runs(left, runs)
        active = [member for member in active if member.going]
        if not active:
            return active
    _end_epoch(driver, active)
    return _end_stopped(active, runs)


def _end_epoch(driver: Driver, members: list[Recorder]) -> None:
    """The end of these members' epoch: an evaluation where they were not just evaluated, their
    rows, then their callbacks' requests."""
    if not members:
        return
    unevaluated = [member for member in members if not member.evaluated_now()]
    if unevaluated:
        driver.evaluate(unevaluated)
    for member in members:
        member.end_epoch()
    driver.settle(members)


def _end_stopped(members: list[Recorder], runs: dict[Recorder, Run]) -> list[Recorder]:
    """End the runs of the members that stopped; return the others."""
    _end_runs([member for member in members if not member.going], runs)
    return [member for member in members if member.going]


def _end_runs(members: Sequence[Recorder], runs: dict[Recorder, Run]) -> None:
    for member in members:
        runs[member] = member.finish()
