"""Where a study's groups run: every executor gives the in-process answer; failures and claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from batchlab.config import make_study_config
from batchlab.errors import ConfigError
from batchlab.store import RunStore
from batchlab.study import InProcessExecutor, make_executor, run_study, trials_table
from batchlab.study.executors import ProcessExecutor, ray_available
from batchlab.study.run import GroupClaims

TINY = dict(dataset="blobs", model="mlp:hidden=16", batch_sizes=[8, 64, "full"], lrs=[0.05, 0.2],
            seeds=2, target="val_acc>=0.75", max_steps=150, noise_scale=False)
TIMED = ["seconds", "seconds_to_target", "seconds_shared"]


def trials(study) -> pd.DataFrame:
    """Everything a study measured but its timings, in a fixed order."""
    table = study.trials.drop(columns=[c for c in TIMED if c in study.trials])
    return table.sort_values(["group", "lr", "seed"]).reset_index(drop=True)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_processes_give_the_in_process_trials_and_label_their_seconds():
    config = make_study_config(dict(TINY, lrs=[0.01, 0.05, 0.2, 0.8]))  # every best lr inside: a recommendation
    alone = run_study(config, executor="in-process")
    pooled = run_study(config, executor=ProcessExecutor(workers=2))
    pd.testing.assert_frame_equal(trials(pooled), trials(alone))
    assert not alone.trials["seconds_shared"].any() and pooled.trials["seconds_shared"].all()
    assert alone.recommendation.supported and alone.recommendation.fastest_batch_size is not None
    assert pooled.recommendation.fastest_batch_size is None and "shared the cores" in pooled.recommendation.text
    pids = {r.provenance["pid"] for r in pooled.records}
    assert os.getpid() not in pids and len(pids) >= 1  # provenance from the worker


def test_executor_names_and_bad_options_are_config_errors():
    assert make_executor("processes", workers=3).workers == 3
    assert make_executor("processes", workers="auto").workers >= 1
    with pytest.raises(ConfigError, match="--workers"):
        make_executor("processes", workers=0)
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("threads")


class FailsAtB64(InProcessExecutor):
    """The in-process executor whose trial function raises for B = 64, as a crashing group would."""

    def run(self, train, plan, groups, dataset):
        def train_or_fail(plan, group, dataset):
            if group.batch_size == 64:
                raise RuntimeError("CUDA out of memory\nsecond line")
            return train(plan, group, dataset)

        return super().run(train_or_fail, plan, groups, dataset)


def test_a_failed_group_is_recorded_and_the_study_goes_on_then_a_rerun_retries_it(tmp_path):
    config = make_study_config(TINY)
    broken = run_study(config, store=tmp_path / "s.db", executor=FailsAtB64())
    (key,) = broken.failed
    assert "B=64" in key and broken.failed[key] == "RuntimeError: CUDA out of memory"
    assert set(broken.summary["batch_size"]) == {8, "full"}  # the others were trained and analysed
    with RunStore(tmp_path / "s.db") as store:  # recorded in the store, as another driver sees it
        assert GroupClaims(store, broken.study_id).failures() == {key: "RuntimeError: CUDA out of memory"}
    rerun = run_study(config, store=tmp_path / "s.db", executor="in-process")
    assert rerun.groups_run == 1 and rerun.failed == {}
    whole = run_study(config, executor="in-process")
    pd.testing.assert_frame_equal(trials(rerun), trials(whole))


def test_a_dead_holders_claim_is_taken_over(tmp_path):
    config = make_study_config(dict(TINY, batch_sizes=[8]))
    with RunStore(tmp_path / "s.db") as store:
        from batchlab.study import load_dataset_for, next_groups, plan_study

        plan = plan_study(config, load_dataset_for(config))
        (group,) = next_groups(plan, trials_table([]))
        dead = GroupClaims(store, plan.study_id, lease=0.5)
        assert dead.claim(group.key)  # and then its driver dies: no heartbeat
        alive = GroupClaims(store, plan.study_id, lease=0.5)
        assert not alive.claim(group.key)  # held, and the lease has not run out
        time.sleep(0.6)
        study = run_study(config, store=store, executor="in-process", lease=0.5)
    assert study.groups_run == 1 and len(study.trials) == 4


TWO_DRIVERS = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    from batchlab.config import make_study_config
    from batchlab.study import run_study
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # both drivers start together
    study = run_study(make_study_config(json.loads(sys.argv[1])), store=sys.argv[2], executor="in-process")
    print(json.dumps({"run": study.groups_run, "trials": len(study.trials)}))
""")


def test_two_drivers_on_one_store_train_each_trial_exactly_once(tmp_path):
    values = dict(TINY, batch_sizes=[4, 8, 16, 64, "full"])
    store = tmp_path / "shared.db"
    start = str(time.time() + 4)  # after both interpreters have imported torch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    drivers = [subprocess.Popen([sys.executable, "-c", TWO_DRIVERS, json.dumps(values), str(store), start],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [d.communicate(timeout=300) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), [err for _, err in outputs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert sum(r["run"] for r in results) == 5  # every group trained once, by one of the two
    assert all(r["trials"] == 5 * 2 * 2 for r in results)  # both end with the whole study
    with RunStore(store) as s:
        (group,) = s.find_groups("study")
        stored = [r["summary"] for r in s.group_run_summaries(group["id"])]
    keys = [(t["group"], t["lr"], t["seed"]) for t in stored]
    assert len(keys) == len(set(keys)) == 5 * 2 * 2
    alone = run_study(make_study_config(values), executor="in-process")
    shared = trials_table(stored).drop(columns=TIMED).sort_values(["group", "lr", "seed"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(shared[trials(alone).columns], trials(alone), check_dtype=False)


MODEL_PACKAGE = textwrap.dedent("""
    import os
    from torch import nn

    def make(dataset):
        # Builds in the driver (where the study checks the model); raises in a worker.
        if os.environ.get("DRIVER_PID") != str(os.getpid()):
            raise ValueError("no GPU on this worker")
        return nn.Sequential(nn.Flatten(), nn.Linear(dataset.input_shape[0], dataset.n_classes))
""")


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="ray is not installed")
def test_ray_on_a_local_cluster_gives_the_in_process_answer_and_records_failures(tmp_path, monkeypatch):
    import ray

    from batchlab.study import RayExecutor

    config = make_study_config(TINY)
    alone = run_study(config, executor="in-process")
    # A user's model package outside sys.path of the workers: the executor ships it to them.
    (tmp_path / "usermodels").mkdir()
    (tmp_path / "usermodels" / "__init__.py").write_text("")
    (tmp_path / "usermodels" / "net.py").write_text(MODEL_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DRIVER_PID", str(os.getpid()))
    executor = RayExecutor(cpus_per_group=1, max_failures=1, init={"num_cpus": 2, "include_dashboard": False})
    try:
        study = run_study(config, store=tmp_path / "s.db", executor=executor)
        pd.testing.assert_frame_equal(trials(study), trials(alone))
        assert {r.provenance["pid"] for r in study.records}.isdisjoint({os.getpid()})  # the workers'
        custom = make_study_config(dict(TINY, model="usermodels.net:make"))
        failed = run_study(custom, store=tmp_path / "s.db", executor=executor, allow_import=True)
        assert len(failed.failed) == 3
        assert all(error.startswith("ModelError: the model factory usermodels.net:make(dataset) raised ValueError: "
                                    "no GPU on this worker") for error in failed.failed.values())
        assert failed.summary.empty  # recorded, and the study ended instead of hanging
    finally:
        executor.close()
    assert not ray.is_initialized()


USER_MODEL = '''
import torch.nn as nn

def make(dataset, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(dataset.input_shape[0], width), nn.ReLU(),
                         nn.Linear(width, dataset.n_classes))
'''


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """An importable ``study_user_pkg.nets:make`` model, and the zoo's MLP of the same architecture."""
    package = tmp_path / "study_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "study_user_pkg.nets:make"
    for name in ("study_user_pkg.nets", "study_user_pkg"):
        sys.modules.pop(name, None)


def test_a_user_model_study_needs_allow_import_and_then_runs_on_every_executor(user_model, cli, tmp_path):
    config = make_study_config({**TINY, "model": user_model, "batch_sizes": [8, "full"]})
    with pytest.raises(ConfigError, match="allow_import=True") as refused:
        run_study(config, executor="in-process")
    assert "\n" not in str(refused.value)
    assert "study_user_pkg.nets" not in sys.modules  # refused before anything was imported
    alone = run_study(config, executor="in-process", allow_import=True)
    pooled = run_study(config, executor=ProcessExecutor(workers=2), allow_import=True)  # built in the workers
    pd.testing.assert_frame_equal(trials(pooled), trials(alone))
    assert alone.trials["status"].isin(["reached", "not_reached", "pruned"]).all() and len(alone.trials) == 8
    args = ["study", "--model", user_model, "--dataset", "blobs", "--batch-sizes", "8,full", "--lrs", "0.05,0.2",
            "--seeds", "2", "--target", "val_acc>=0.75", "--max-steps", "150", "--no-noise-scale", "--workers", "2",
            "--store", str(tmp_path / "s.db"), "--quiet"]
    status, out, err = cli(args)
    assert status == 2 and err.count("\n") == 1 and "--allow-import" in err
    status, out, err = cli([*args, "--allow-import"])
    assert status == 0, err
    with RunStore(tmp_path / "s.db") as store:
        assert len(store.list_runs()) == 8


@pytest.mark.parametrize("address", ["bad:1", "127.0.0.1:1", "ray://127.0.0.1:1", "nonsense"])
def test_an_unreachable_ray_address_is_one_line_before_ray_is_asked(address, monkeypatch):
    from batchlab.study.executors import RayExecutor, check_reachable

    # Refused by batchlab's own bounded check, never by ray.init's minutes of retries.
    if ray_available():
        import ray

        monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was asked"))
    with pytest.raises(ConfigError) as refused:
        check_reachable(address, timeout=5)
    assert "\n" not in str(refused.value) and address in str(refused.value)
    if ray_available():  # refused when the executor is made, before a study stores anything
        with pytest.raises(ConfigError):
            RayExecutor(address=address)
    check_reachable("local")  # Ray starts a cluster of its own: nothing to ask


@pytest.fixture
def listener():
    """``listen(reply)``: a local TCP port whose server answers each connection with ``reply``
    (None: accepts and stays silent), as a service that is not Ray would."""
    import socket
    import threading

    servers = []

    def listen(reply: bytes | None) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def serve():
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:  # closed at the end of the test
                    return
                connection.recv(64)
                if reply is not None:
                    connection.sendall(reply)
                servers.append(connection)  # kept open: a silent server must not look closed

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]

    yield listen
    for server in servers:
        server.close()


HTTP_REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
GRPC_SETTINGS = bytes(3) + b"\x04" + bytes(5)  # an HTTP/2 server's first frame: an empty SETTINGS


@pytest.mark.parametrize("reply", [HTTP_REPLY, None], ids=["http-server", "silent-server"])
def test_a_port_that_is_not_ray_is_refused_by_the_bounded_check(listener, reply, monkeypatch):
    import socket

    from batchlab.study.executors import check_reachable

    address = f"127.0.0.1:{listener(reply)}"
    timeouts = []  # every socket the check opens waits at most its timeout (not ray.init's minutes)
    original = socket.socket.settimeout
    monkeypatch.setattr(socket.socket, "settimeout", lambda self, t: (timeouts.append(t), original(self, t))[1])
    with pytest.raises(ConfigError) as refused:
        check_reachable(address, timeout=2)
    assert timeouts and all(t is not None and 0 < t <= 2 for t in timeouts)
    message = str(refused.value)
    assert "\n" not in message and address in message and "ray start --head" in message
    assert ("not Ray" in message) == (reply is not None) and ("within 2 s" in message) == (reply is None)


def test_a_grpc_server_passes_the_check(listener):
    from batchlab.study.executors import check_reachable

    check_reachable(f"127.0.0.1:{listener(GRPC_SETTINGS)}", timeout=2)
    check_reachable(f"ray://127.0.0.1:{listener(GRPC_SETTINGS)}", timeout=2)


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="ray is not installed")
def test_a_running_ray_clusters_address_passes_the_check():
    import ray

    from batchlab.study.executors import check_reachable

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        check_reachable(ray.get_runtime_context().gcs_address, timeout=5)
    finally:
        ray.shutdown()


@pytest.mark.skipif(not ray_available(), reason="ray is not installed")
def test_auto_follows_ray_address_and_refuses_a_dead_one(monkeypatch):
    from batchlab.study.executors import check_reachable

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # what `auto` (and no address) connects to
    for address in ("auto", None):
        with pytest.raises(ConfigError, match=r"no Ray cluster answers at '127.0.0.1:1' \(from RAY_ADDRESS\)"):
            check_reachable(address, timeout=2)


@pytest.mark.skipif(not ray_available(), reason="ray is not installed")
def test_study_with_ray_auto_and_no_cluster_is_one_line_and_stores_nothing(cli, tmp_path, monkeypatch):
    import ray._private.services as services

    def nothing_running(address, temp_dir):  # Ray's discovery on a machine without a cluster
        raise ConnectionError("Could not find any running Ray instance.")

    # Another Ray on this machine (a parallel test) must not be found: discovery is made to find none.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "get_ray_address_from_environment", nothing_running)
    store = tmp_path / "s.db"
    status, out, err = cli(["study", "--dataset", "blobs", "--batch-sizes", "16", "--lrs", "0.1", "--seeds", "1",
                            "--max-steps", "5", "--executor", "ray", "--ray-address", "auto", "--store", str(store),
                            "--quiet"])
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --ray-address auto found no running Ray cluster")
    assert "ray start --head" in err and not store.exists()
