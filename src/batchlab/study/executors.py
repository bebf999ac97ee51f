"""Where a study's groups run: in this process, or on a Ray cluster.

An executor is given the trial function (`batchlab.study.trials.train_group`, or any function
with its signature) and the groups that are ready, and yields each group's trial records as soon
as the group ends, in whatever order they end; the study stores them one group per transaction.
What a group computes does not depend on where it runs, so a study may be resumed on another
executor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..data import Dataset
    from .plan import GroupPlan, StudyPlan
    from .trials import TrialRecord

    TrainGroup = Callable[[StudyPlan, GroupPlan, Dataset], list[TrialRecord]]


class InProcessExecutor:
    """Runs the groups one after another in this process (each group vectorized inside)."""

    name = "in-process"

    def run(self, train: "TrainGroup", plan: "StudyPlan", groups: Sequence["GroupPlan"], dataset: "Dataset"
            ) -> Iterator[tuple["GroupPlan", list["TrialRecord"]]]:
        for group in groups:
            yield group, train(plan, group, dataset)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


class RayExecutor:
    """Runs the groups as Ray tasks, in parallel, and yields each as it finishes.

    Needs ``ray`` installed (it is not a dependency of batchlab). The dataset is put in Ray's
    object store once; each task trains one group.

    Args:
        address: a Ray cluster address, or None to start or join a local one.
        num_cpus: CPUs per task (torch threads follow it).
        num_gpus: GPUs per task.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0):
        if not ray_available():
            raise ConfigError("the ray executor needs ray; install it with `pip install ray`, or use the in-process executor")
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus

    def run(self, train, plan, groups, dataset):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_train_group_task)
        data_ref = ray.put(dataset)
        futures = {remote.remote(train, plan, group, data_ref, max(1, int(self.num_cpus))): group for group in groups}
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            group = futures.pop(ready[0])
            yield group, ray.get(ready[0])


def _train_group_task(train, plan, group, dataset, threads: int):
    import torch

    torch.set_num_threads(threads)
    return train(plan, group, dataset)


def make_executor(name: str = "in-process", **options) -> InProcessExecutor | RayExecutor:
    """An executor by name: ``in-process`` (default) or ``ray``."""
    if name == "in-process":
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise ConfigError(f"unknown executor {name!r}; choose in-process or ray")
