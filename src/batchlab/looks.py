"""When something looks at a run: the steps, known before training, at which the live run is seen.

A driver may compute many updates without reading their numbers back, and a compiled driver may
compute them as one graph; it must stop wherever something needs the run as it is after a given
update. `Looks` holds those points for one run, and every driver asks it:

- an evaluation: after every ``eval_every`` updates within an epoch (an epoch's end evaluates
  anyway; a run without step-wise evaluation has ``eval_every`` None);
- a measured update: the probes measure the update made after every multiple of ``probe_every``
  updates (it runs eagerly, alone, through the probes' hooks);
- a callback's step: the rows per-step callbacks need while the model is at that step (their
  declared `batchlab.events.Callback.step_end_steps`; None when one needs every step); a display,
  which reads rows only (``step_end_live`` False), never counts, so progress shows what was read
  back and never forces a synchronisation;
- the read-back window: at most ``window`` updates between reads, so that a long stretch with
  nothing to see still reports progress and answers Ctrl-C.

The batch sizes and the epochs' ends are the run's plan (`batchlab.schedule`, the clock): a
stretch never crosses an epoch's end or a change of batch size, because a driver trains one
epoch's batches of one size at a time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .events import Clock

WINDOW = 256  # most updates between two reads of their numbers when nothing looks sooner


@dataclass(frozen=True)
class Looks:
    """The points of one run where the live run is seen (see the module docstring).

    Attributes:
        eval_every: a full-pass evaluation after every this many updates within an epoch; None: at
            epochs' ends only.
        probe_every: the probes measure every this many updates; None: no probes.
        steps: the updates after which per-step callbacks need the live run, ascending; None: after
            every update.
        window: the most updates between two reads of their numbers.
    """

    eval_every: int | None = None
    probe_every: int | None = None
    steps: tuple[int, ...] | None = ()
    window: int = WINDOW
    _seen: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))
        object.__setattr__(self, "_seen", frozenset(self.steps or ()))

    def evaluates(self, clock: Clock) -> bool:
        """Whether the run evaluates after the update ``clock`` has just counted: every ``eval_every``
        updates, except at an epoch's last update (its end evaluates there). Where the epoch's length
        is not known yet (``steps_per_epoch`` 0: a tracked loop's first epoch), every multiple is due."""
        return (self.eval_every is not None and clock.step % self.eval_every == 0
                and (clock.steps_per_epoch == 0 or clock.step_in_epoch < clock.steps_per_epoch))

    def measures(self, step: int) -> bool:
        """Whether the probes measure the update made after ``step`` updates."""
        return self.probe_every is not None and step % self.probe_every == 0

    def sees(self, step: int) -> bool:
        """Whether a per-step callback needs the live run after ``step`` updates."""
        return self.steps is None or step in self._seen

    def stretch(self, step: int, limit: int) -> int:
        """How many updates from ``step`` on may run before anything looks: the stretch ends at the
        first update after which the run is evaluated, seen by a callback, or followed by a measured
        update, and at the window. A measured update is a stretch of its own.

        Args:
            step: the updates made so far.
            limit: the most the driver can make in one go (the epoch's remaining batches of one
                size, the run's remaining updates); at least 1.

        Returns:
            From 1 to ``limit``.
        """
        if self.steps is None or self.measures(step):
            return 1
        count = min(limit, self.window)
        for every in (self.eval_every, self.probe_every):
            if every is not None:
                count = min(count, every - step % every)
        if self.steps:
            at = bisect.bisect_right(self.steps, step)
            if at < len(self.steps):
                count = min(count, self.steps[at] - step)
        return max(count, 1)
