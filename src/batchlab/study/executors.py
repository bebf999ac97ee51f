"""Where a study's groups run: in this process, in a pool of local processes, or on a Ray cluster.

An executor is given the trial function (`batchlab.study.trials.train_group`, or any function
with its signature, importable by name) and the groups that are ready, and yields each group's
outcome as soon as the group ends, in whatever order they end: its trial records, or a
`GroupFailure` with the error. The study stores each group in one transaction and goes on past a
failure. What a group computes does not depend on where it runs (every worker trains with the
same number of torch threads, one by default), so the executors give identical results and a study
may be resumed on another executor.

``shares_cores`` says whether groups run side by side on shared cores: their ``seconds`` are then
measured under sharing, and the analysis does not rank batch sizes by them.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..data import Dataset
    from .plan import GroupPlan, StudyPlan
    from .trials import TrialRecord

    TrainGroup = Callable[[StudyPlan, GroupPlan, Dataset], list[TrialRecord]]

EXECUTORS = ("processes", "in-process", "ray")


@dataclass(frozen=True)
class GroupFailure:
    """A group whose training raised (or whose worker died for good): the error, in one line."""

    message: str

    @classmethod
    def from_exception(cls, error: BaseException) -> "GroupFailure":
        text = str(error).strip().splitlines()
        return cls(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "))


GroupOutcome = Union[list["TrialRecord"], GroupFailure]


class InProcessExecutor:
    """Runs the groups one after another in this process (each group vectorized inside)."""

    name = "in-process"
    shares_cores = False

    def run(self, train: "TrainGroup", plan: "StudyPlan", groups: Sequence["GroupPlan"], dataset: "Dataset"
            ) -> Iterator[tuple["GroupPlan", GroupOutcome]]:
        for group in groups:
            try:
                outcome: GroupOutcome = train(plan, group, dataset)
            except Exception as error:  # the study records it and goes on; Ctrl-C still stops it
                outcome = GroupFailure.from_exception(error)
            yield group, outcome

    def close(self) -> None:
        pass


def resolve_workers(workers: int | str | None) -> int:
    """``auto`` (or None): the cores this process may use; else a positive number."""
    if workers in (None, "auto"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        count = int(workers)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ConfigError(f"--workers takes a positive number or 'auto', got {workers!r}")
    return count


def _init_worker(dataset: "Dataset", threads: int) -> None:
    import torch

    global _WORKER_DATASET
    _WORKER_DATASET = dataset  # sent once per worker, not once per group
    torch.set_num_threads(threads)
    # Ctrl-C in a terminal reaches the whole process group: the driver reports it, workers leave quietly.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, a worker whose driver is killed (even by SIGKILL) is killed too, instead of lingering."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_WORKER_DATASET: Any = None


def _train_in_worker(train: "TrainGroup", plan: "StudyPlan", group: "GroupPlan") -> list["TrialRecord"]:
    return train(plan, group, _WORKER_DATASET)


class ProcessExecutor:
    """Runs groups side by side in a pool of local processes, one torch thread each.

    The pool starts on first use (forked where the platform can, else spawned: then the calling
    script needs an ``if __name__ == "__main__":`` guard and a custom model must be importable as
    ``package.module:function``) and lives until `close`, so the later rounds of a study reuse it.

    Args:
        workers: processes, or ``auto`` for the cores this process may use. With 1 the groups
            run in this process.
        threads: torch threads per worker.
    """

    name = "processes"

    def __init__(self, workers: int | str | None = "auto", threads: int = 1):
        self.workers, self.threads = resolve_workers(workers), threads
        self._pool: Any = None
        self._dataset: Any = None

    @property
    def shares_cores(self) -> bool:
        return self.workers > 1

    def run(self, train, plan, groups, dataset):
        if self.workers == 1:
            yield from InProcessExecutor().run(train, plan, groups, dataset)
            return
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pending, futures = iter(groups), {}
        try:
            while True:
                # Keep every worker busy, taking the next group only when one is free: the groups
                # are claimed as they are taken, so other drivers get the rest.
                while len(futures) < self.workers and (group := next(pending, None)) is not None:
                    futures[self._pool_for(dataset).submit(_train_in_worker, train, plan, group)] = group
                if not futures:
                    return
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        outcome: GroupOutcome = future.result()
                    except BrokenProcessPool as error:  # a worker died: the next group gets a new pool
                        self._pool = None
                        outcome = GroupFailure.from_exception(error)
                    except Exception as error:
                        outcome = GroupFailure.from_exception(error)
                    yield futures.pop(future), outcome
        except BaseException:  # Ctrl-C or the caller stopped: nothing outstanding keeps running
            self.close(cancel=True)
            raise

    def _pool_for(self, dataset):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None or self._dataset is not dataset:
            self.close()
            # fork where there is one: workers inherit the dataset, the user's models and sys.path, and a
            # script without an `if __name__ == "__main__":` guard still works; one torch thread
            # per worker keeps fork clear of OpenMP's thread pools.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                             initializer=_init_worker, initargs=(dataset, self.threads))
            self._dataset = dataset
        return self._pool

    def close(self, cancel: bool = False) -> None:
        """Stop the pool; with ``cancel``, end running groups too (their results are not stored)."""
        pool, self._pool, self._dataset = self._pool, None, None
        if pool is None:
            return
        if cancel:
            # concurrent.futures has no public way to stop running tasks before Python 3.14.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


class RayExecutor:
    """Runs the groups as Ray tasks, in parallel, and yields each as it finishes.

    Needs ``ray`` (``pip install 'batchlab[ray]'``). The dataset is put in Ray's object store once;
    each task trains one group with ``num_cpus`` torch threads and records the worker's host, pid
    and device. A task whose worker crashes is retried ``max_failures`` times; a task that raises
    is a `GroupFailure` (a rerun of the study retries it). Ctrl-C cancels the outstanding tasks.
    Workers' output is shown in the driver.

    Args:
        address: a Ray cluster address (``host:6379``, ``ray://host:10001``, ``auto`` for the one
            ``ray start`` left on this machine or ``RAY_ADDRESS``), or None to start a local one.
            An address where no Ray cluster answers is refused within `CONNECT_TIMEOUT` seconds.
        cpus_per_group: CPUs per group (torch threads follow it).
        gpus_per_group: GPUs per group; fractional values let several groups share one GPU.
        max_failures: retries of a group whose worker crashed.
        runtime_env: extra Ray runtime environment; batchlab itself and a custom model's top-level
            package are shipped to the workers unless ``ship_code`` is False (they are installed there).
        init: further `ray.init` keywords (a local cluster's ``num_cpus``, ...).
    """

    name = "ray"
    shares_cores = True

    def __init__(self, address: str | None = None, cpus_per_group: float = 1, gpus_per_group: float = 0,
                 max_failures: int = 3, runtime_env: dict[str, Any] | None = None, ship_code: bool = True,
                 init: dict[str, Any] | None = None):
        if not ray_available():
            raise ConfigError("the ray executor needs ray; install it with `pip install 'batchlab[ray]'`, "
                              "or use --executor processes")
        if cpus_per_group <= 0 or gpus_per_group < 0 or max_failures < 0:
            raise ConfigError("--cpus-per-group must be > 0, --gpus-per-group and --max-failures >= 0")
        check_reachable(address)  # before anything is stored: ray.init would wait many minutes for a wrong address
        self.address, self.num_cpus, self.num_gpus = address, cpus_per_group, gpus_per_group
        self.max_failures, self.runtime_env, self.ship_code = max_failures, dict(runtime_env or {}), ship_code
        self.init_options = dict(init or {})
        self._started_ray, self._env = False, None

    def run(self, train, plan, groups, dataset):
        import ray

        self._connect(plan)
        remote = ray.remote(_train_group_task).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                       max_retries=self.max_failures, retry_exceptions=False)
        data_ref = ray.put(dataset)
        threads = max(1, int(self.num_cpus))
        pending, futures = iter(groups), {}
        in_flight = self._slots()
        try:
            while True:
                while len(futures) < in_flight and (group := next(pending, None)) is not None:
                    futures[remote.remote(train, plan, group, data_ref, threads)] = group
                if not futures:
                    return
                ready, _ = ray.wait(list(futures), num_returns=1)
                group = futures.pop(ready[0])
                try:
                    outcome: GroupOutcome = ray.get(ready[0])
                except Exception as error:  # RayTaskError wraps the worker's exception
                    outcome = GroupFailure.from_exception(getattr(error, "cause", None) or error)
                yield group, outcome
        except BaseException:  # Ctrl-C or the caller stopped: cancel what is still queued or running
            for ref in futures:
                ray.cancel(ref, force=True)
            raise

    def _slots(self) -> int:
        """Groups to keep in flight: as many as the cluster can run at once (at least one)."""
        import ray

        resources = ray.cluster_resources()
        by_cpu = resources.get("CPU", 1) / self.num_cpus
        by_gpu = resources.get("GPU", 0) / self.num_gpus if self.num_gpus else by_cpu
        return max(1, int(min(by_cpu, by_gpu)))

    def _connect(self, plan) -> None:
        import ray

        env = self._runtime_env(plan)
        if ray.is_initialized():
            if not self._started_ray or env == self._env:
                return  # the caller's own connection (and runtime environment), or ours with this code
            ray.shutdown()  # Ray ships local code per job only: a study with another model module reconnects
        try:
            ray.init(address=self.address, runtime_env=env, log_to_driver=True, **self.init_options)
        except (ConnectionError, RuntimeError, ImportError) as error:  # a cluster gone since check_reachable
            line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"cannot connect to Ray at {self.address or 'a local cluster'}: {line}") from None
        self._started_ray, self._env = True, env

    def _runtime_env(self, plan) -> dict[str, Any]:
        env = dict(self.runtime_env)
        if self.ship_code:
            env["py_modules"] = [*env.get("py_modules", []), *_code_to_ship(plan.config.model)]
        return env

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


CONNECT_TIMEOUT = 10.0  # seconds to wait for a Ray cluster's address to answer
# A client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 §3.4). Ray's GCS and its
# client server speak gRPC, which is HTTP/2: their first frame in reply is SETTINGS (type 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)
_SETTINGS_FRAME = 4


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a Ray address where no Ray cluster answers, within ``timeout`` seconds.

    `ray.init` waits for an unreachable cluster, or a port that is not Ray's, for many minutes;
    this asks the address (``host:port``, ``ray://host:port``, or the one ``auto`` finds, as Ray
    finds it: ``RAY_ADDRESS``, else the cluster ``ray start`` left on this machine) for a gRPC
    (HTTP/2) handshake, which Ray's head answers at once. ``local`` and None (Ray starts a cluster
    of its own) are not checked, unless ``RAY_ADDRESS`` names one for None.

    Raises:
        ConfigError: a malformed address, none found for ``auto``, or no Ray cluster answering.
    """
    if address == "local" or (address is None and not os.environ.get("RAY_ADDRESS")):
        return
    found = _find_address(address)
    if found is None:
        return
    text = found.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {found!r} is not host:port, ray://host:port or auto")
    problem = _grpc_problem(host.strip("[]"), int(port), timeout)
    if problem:
        source = "" if found == address else " (from RAY_ADDRESS)" if found == os.environ.get("RAY_ADDRESS") \
            else " (found by --ray-address auto)"
        raise ConfigError(f"no Ray cluster answers at {found!r}{source}: {problem}; start one with "
                          "`ray start --head`, or check the address")


def _find_address(address: str | None) -> str | None:
    """The address `ray.init` would connect to: the one given, ``RAY_ADDRESS``, or Ray's discovery."""
    if address not in (None, "auto"):
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:  # Ray's own discovery for `auto` (private: when it moves, ray.init's own error applies)
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return None
    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise ConfigError("--ray-address auto found no running Ray cluster on this machine; start one with "
                          "`ray start --head`, give the cluster's address, or leave --ray-address out for a "
                          "local one") from None
    except Exception:  # another Ray version's signature: leave the decision to ray.init
        return None


def _grpc_problem(host: str, port: int, timeout: float) -> str | None:
    """Why ``host:port`` is not a gRPC server (None when it is), decided within ``timeout`` seconds."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(max(0.1, deadline - time.monotonic()))  # one budget for both waits
            connection.sendall(_HTTP2_PREFACE)
            header = connection.recv(9)  # the first frame's header: length (3), type (1), flags, stream
    except TimeoutError:
        return f"nothing answered within {timeout:g} s"
    except (OSError, ValueError) as error:
        return getattr(error, "strerror", None) or str(error) or type(error).__name__
    if len(header) < 4 or header[3] != _SETTINGS_FRAME:
        return "something answers there, but not Ray (its reply is not gRPC)"
    return None


def _code_to_ship(model_spec: str) -> list[str]:
    """Paths of batchlab and, for a ``package.module:function`` model, its top-level package."""
    import batchlab

    paths = [os.path.dirname(batchlab.__file__)]
    name = model_spec.strip().partition(":")[0]
    if "." in name:  # a custom model (`batchlab.models.parse_model_spec`), imported in the driver already
        top = importlib.import_module(name.split(".")[0])
        origin = getattr(top, "__file__", None) or ""
        installed = any(origin.startswith(p) for p in sys.path if p.endswith(("site-packages", "dist-packages")))
        if origin and not installed:  # installed packages are the cluster's job
            paths.append(os.path.dirname(origin) if origin.endswith("__init__.py") else origin)
    return paths


def _train_group_task(train, plan, group, dataset, threads: int):
    import torch

    torch.set_num_threads(threads)
    return train(plan, group, dataset)


def make_executor(name: str = "processes", **options: Any) -> InProcessExecutor | ProcessExecutor | RayExecutor:
    """An executor by name: ``processes`` (default; option ``workers``), ``in-process`` or ``ray``.

    Raises:
        ConfigError: an unknown name, or options the executor does not take.
    """
    makers = {"processes": ProcessExecutor, "in-process": InProcessExecutor, "ray": RayExecutor}
    if name not in makers:
        raise ConfigError(f"unknown executor {name!r}; choose {', '.join(EXECUTORS)}")
    try:
        return makers[name](**options)
    except TypeError as error:
        raise ConfigError(f"executor {name!r} does not take these options: {error}") from None
