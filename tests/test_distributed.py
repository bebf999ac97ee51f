"""Data-parallel training (batchlab.distributed) against single-process runs.

One torchrun launch of 2 gloo ranks (tests/distributed_worker.py) trains the SGD-with-momentum and
Adam runs and then a run whose rank 1 raises; its outputs are compared here with `bl.fit` at the
global batch, in float64, and with the two-batch noise-scale formula computed from the parts'
gradients. A second launch (slow) stalls rank 1 and checks that the collective timeout fails the
run. Each launch has a timeout and its process group is killed on expiry, and every collective in
the ranks has one too, so a failing rank cannot hang the suite.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab import distributed
from batchlab.errors import ConfigError
from batchlab.store import RunStore

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

LAUNCH_TIMEOUT = 240  # seconds for the whole launch on a busy 2-core machine
WORLD = 2


def _launch(scenarios: str, out: Path, timeout: float = 30) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(bl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "--monitor-interval", "0.1", str(Path(worker.__file__)), scenarios, str(out), str(timeout)]
    # A session of its own, so that on a timeout the launcher and its ranks are killed together.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-rank launch did not end within {LAUNCH_TIMEOUT} s:\n{output[-3000:]}")
    return process.returncode, output


class OracleNoise:
    """A probe for the single-process reference: the two-batch estimates of McCandlish et al. 2018
    (App. A.1) with B_small = each rank's part of the batch and B_big = the batch, from the parts'
    gradients computed here by autograd on the live graph (nothing of batchlab's estimators)."""

    name = "oracle"
    point = "forward"

    def init(self, ctx):
        return None

    def measure(self, state, ctx, losses):
        big = losses.numel()
        sizes = [big // WORLD + (1 if r < big % WORLD else 0) for r in range(WORLD)]
        bounds = np.cumsum([0, *sizes])
        parts = [torch.autograd.grad(losses[a:b].mean(), ctx.params, retain_graph=True) for a, b in
                 zip(bounds[:-1], bounds[1:])]
        flat = [torch.cat([g.reshape(-1) for g in part]) for part in parts]  # each (P,)
        g_big = sum(f * (b / big) for f, b in zip(flat, sizes))  # the whole batch's mean-loss gradient
        big_sq = float(g_big.square().sum())
        traces, grads = [], []
        for f, b in zip(flat, sizes):
            small_sq = float(f.square().sum())
            traces.append((small_sq - big_sq) / (1 / b - 1 / big))
            grads.append((big * big_sq - b * small_sq) / (big - b))
        trace = sum(traces) / WORLD
        n_train = ctx.dataset.n_train
        return state, {"oracle_trace_cov": trace, "oracle_grad_sq": sum(grads) / WORLD + trace / n_train}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The ranks' outputs and, computed meanwhile in this process, the single-process references."""
    out = tmp_path_factory.mktemp("ddp")
    process = _launch("equivalence,track,looks,failure", out)
    torch.set_num_threads(1)
    ds = worker.dataset()
    references = {}
    for name, options in worker.CONFIGS.items():
        config = bl.TrainConfig(batch_size=worker.global_batch(name, WORLD), **options)
        probes = [p for p in worker.PROBES[name] if p != "noise_scale"]
        if "noise_scale" in worker.PROBES[name]:
            probes.append(OracleNoise())
        references[name] = bl.fit(worker.model(ds, options["seed"]), ds, config, probes=probes, progress=False)
    config = bl.TrainConfig(batch_size=worker.TRACK_BATCH * WORLD, **worker.TRACK_CONFIG)
    references["track"] = bl.fit(worker.model(ds, config.seed), ds, config, probes=["grad_norm", OracleNoise()],
                                 progress=False)
    status, output = _wait(process)
    return out, references, status, output


def _table(out: Path, name: str, rank: int) -> pd.DataFrame:
    path = out / f"{name}-rank{rank}.json"
    assert path.exists(), f"rank {rank} wrote no {name} table"
    return pd.DataFrame(json.loads(path.read_text()))


@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_step_table_equals_single_process_at_global_batch(launched, name):
    out, references, _, output = launched
    reference = references[name].steps
    for rank in range(WORLD):
        table = _table(out, name, rank)
        assert len(table) == len(reference) > 0, output[-2000:]
        for column in reference.columns:
            if column == "seconds" or column.startswith("oracle"):
                continue
            expected, got = reference[column].to_numpy(float), table[column].to_numpy(float)
            assert np.array_equal(np.isnan(expected), np.isnan(got)), column
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8, equal_nan=True, err_msg=column)
    n_train = references[name].clock.n_train
    if name == "diverges":  # inside a stretch (steps 15-20): its rows stop there on both ranks, as in one process
        assert references[name].status == "diverged" and list(reference["step"]) == list(range(1, worker.DIVERGES_AT + 1))
        assert math.isnan(reference["batch_loss"].iloc[-1]) and worker.DIVERGES_AT % 7 not in (0, 6)
        with RunStore(out / "runs.db") as store:
            runs = store.list_runs()
            stored = store.load_run(int(runs[runs["name"] == name]["id"].iloc[0]))
        assert (stored.status, stored.message) == (references[name].status, references[name].message)
        return
    if name == "scheduled":  # the global batch 24, then 40 from 600 samples on, with the epochs' short batches
        assert {24, 40} < set(reference["batch_size"]) and len(set(reference["lr"])) == 2
        return
    global_batch = worker.PER_RANK_BATCH * WORLD
    assert n_train % global_batch and set(reference["batch_size"]) == {global_batch, n_train % global_batch}  # short last batches split too


def test_noise_scale_equals_two_batch_formula_from_the_ranks_gradients(launched):
    out, references, _, _ = launched
    reference, table = references["sgd"].steps, _table(out, "sgd", 0)
    np.testing.assert_allclose(table["trace_cov_raw"], reference["oracle_trace_cov"], rtol=1e-6)
    np.testing.assert_allclose(table["grad_sq_raw"], reference["oracle_grad_sq"], rtol=1e-6, atol=1e-10)
    # The smoothed ratio: bias-corrected moving averages (β = 0.99) of the oracle's estimates.
    beta, trace_avg, grad_avg, expected = 0.99, 0.0, 0.0, []
    for k, (trace, grad) in enumerate(zip(reference["oracle_trace_cov"], reference["oracle_grad_sq"]), start=1):
        trace_avg, grad_avg = beta * trace_avg + (1 - beta) * trace, beta * grad_avg + (1 - beta) * grad
        expected.append(trace_avg / grad_avg if grad_avg > 0 else math.nan)
    np.testing.assert_allclose(table["noise_scale"], expected, rtol=1e-6)


def test_track_in_a_users_ddp_loop_records_the_global_batch(launched):
    out, references, _, _ = launched
    reference = references["track"].steps
    for rank in range(WORLD):
        table = _table(out, "track", rank)
        for column in ("step", "batch_size", "batch_loss", "batch_acc", "running_loss", "running_acc", "grad_norm"):
            np.testing.assert_allclose(table[column], reference[column], rtol=1e-5, err_msg=column)
        np.testing.assert_allclose(table["trace_cov_raw"], reference["oracle_trace_cov"], rtol=1e-6)
        np.testing.assert_allclose(table["grad_sq_raw"], reference["oracle_grad_sq"], rtol=1e-6, atol=1e-10)
    with RunStore(out / "runs.db") as store:
        runs = store.list_runs()
        tracked = store.load_run(int(runs[runs["name"] == "track"]["id"].iloc[0]))
    assert tracked.provenance["distributed"]["world_size"] == WORLD
    assert len(tracked.steps) == len(reference)


def _looks(out: Path) -> list[dict]:
    paths = [out / f"looks-rank{rank}.json" for rank in range(WORLD)]
    assert all(path.exists() for path in paths), "a rank wrote no looks results"
    return [json.loads(path.read_text()) for path in paths]


def test_a_rank0_callback_declaring_a_step_stops_every_rank_there(launched):
    """Rank 0's callback sees step 10 only (step_end_steps=(10,)) and stops there: every rank ends at
    step 10, agreeing at the start, the evaluation at 7, step 10 and the stopped epoch's end only."""
    out, _, _, output = launched
    ranks = [results["stop"] for results in _looks(out)]
    for rank, result in enumerate(ranks):
        assert result["status"] == "stopped", output[-2000:]
        assert result["steps"] == list(range(1, worker.STOP_AT + 1))
        assert result["evals"] == [0, 7, worker.STOP_AT]
        assert result["agreed"] == [0, 7, worker.STOP_AT, worker.STOP_AT]
    assert ranks[0]["message"] == f"stopped at step {worker.STOP_AT}"
    assert ranks[1]["message"] == "rank 0 stopped the run"


def test_a_rank0_display_adds_no_agreement_between_evaluations(launched):
    """With only row-reading callbacks on rank 0 (one that counts rows, and the progress bar) the ranks
    agree where rank 0 evaluates and nowhere else, while the display is still handed every row; a live
    callback that needs every step makes them agree after each step (and at each epoch's end)."""
    out, _, _, output = launched
    steps_per_epoch = math.ceil(500 / (worker.PER_RANK_BATCH * WORLD))  # blobs: 500 training samples
    total = steps_per_epoch * worker.LOOKS_CONFIG["epochs"]
    # every 7 steps within an epoch, and at the step-0 evaluation and each epoch's end
    evaluations = sorted({0, *range(7, total + 1, 7), *range(steps_per_epoch, total + 1, steps_per_epoch)})
    for rank, results in enumerate(_looks(out)):
        rows, every = results["rows"], results["every"]
        assert rows["status"] == every["status"] == "finished", output[-2000:]
        assert rows["evals"] == evaluations
        assert rows["agreed"] == evaluations
        assert rows["rows"] == (total if rank == 0 else None)
        epoch_ends = range(steps_per_epoch, total + 1, steps_per_epoch)
        assert every["agreed"] == sorted([0, *range(1, total + 1), *epoch_ends])


def _step_reductions(shapes: list[list[int]]) -> list[int]:
    """The steps each all-reduce of step numbers summed, from the shapes the worker counted: (K, 2)
    is K steps' (loss sum, correct count), (2,) one step's; (splits, 3) is an evaluation's."""
    return [shape[0] if len(shape) == 2 else 1 for shape in shapes if shape[-1] == 2]


def test_a_rank_reduces_its_step_numbers_once_per_stretch_between_looks(launched):
    """With eval_every=7 and nothing else looking (a display only), each rank all-reduces the step
    numbers once per stretch: the updates up to each evaluation, and, as in `bl.fit`, the epoch's last
    full batch and its short last batch apart. That is 8 all-reduces for 42 steps instead of 42; a
    callback declaring step 10 ends a stretch there, and one that sees every step makes one per step."""
    out, _, _, output = launched
    steps_per_epoch = math.ceil(500 / (worker.PER_RANK_BATCH * WORLD))  # 21: 20 batches of 24, one of 20
    epochs = worker.LOOKS_CONFIG["epochs"]
    total = steps_per_epoch * epochs
    epoch_ends = set(range(steps_per_epoch, total + 1, steps_per_epoch))
    ends = sorted({*range(7, total + 1, 7), *epoch_ends, *(end - 1 for end in epoch_ends)})  # 7 14 20 21 28 35 41 42
    stretches = [b - a for a, b in zip([0, *ends], ends)]
    for results in _looks(out):
        rows = _step_reductions(results["rows"]["reduced"])
        assert rows == stretches == [7, 7, 6, 1, 7, 7, 6, 1], output[-2000:]
        assert sum(rows) == total and len(rows) <= math.ceil(total / 7) + epochs
        assert _step_reductions(results["stop"]["reduced"]) == [7, worker.STOP_AT - 7]
        assert _step_reductions(results["every"]["reduced"]) == [1] * total


def test_rank0_alone_records_with_provenance(launched):
    out, _, _, _ = launched
    with RunStore(out / "runs.db") as store:
        runs = store.list_runs()
        assert list(runs["name"]) == [*worker.CONFIGS, "track", "fails"]  # one run per training, not one per rank
        stored = store.load_run(int(runs["id"].iloc[0]))
    assert stored.provenance["distributed"] == {
        "world_size": WORLD, "backend": "gloo", "per_rank_batch": worker.PER_RANK_BATCH,
        "global_batch": worker.PER_RANK_BATCH * WORLD, "hosts": [stored.provenance["hostname"]] * WORLD}
    assert stored.config["batch_size"] == worker.PER_RANK_BATCH * WORLD


def test_a_rank_that_raises_fails_the_run_and_no_rank_hangs(launched):
    out, _, status, output = launched
    assert status != 0  # the launch ended (no hang) and reported the failure
    with RunStore(out / "runs.db") as store:
        runs = store.list_runs()
        failed = store.load_run(int(runs[runs["name"] == "fails"]["id"].iloc[0]))
    assert failed.status == "failed"
    assert failed.message == "rank 1: ValueError: boom on rank 1", output[-2000:]
    for rank in range(WORLD):  # both ranks left fit with the same one-line error
        assert (out / f"error-rank{rank}.txt").read_text() == "rank 1: ValueError: boom on rank 1"


@pytest.mark.slow  # a launch of its own (~20 s on two busy cores) for a guard the default suite needs less
def test_a_stalled_rank_fails_the_run_within_the_collective_timeout(tmp_path):
    """Rank 1 stops answering mid-run (no error, no exit): rank 0's collective gives up after the
    process group's timeout (3 s here) and stores the run as failed, rather than waiting forever."""
    status, output = _wait(_launch("stall", tmp_path, timeout=3))
    assert status != 0
    with RunStore(tmp_path / "runs.db") as store:
        stalled = store.load_run(int(store.list_runs()["id"].iloc[0]))
    assert stalled.status == "failed", output[-2000:]
    assert stalled.message == ("rank 0: timed out waiting for the other ranks in a collective: another rank is "
                               "stuck or gone")
    seconds, message = (tmp_path / "error-rank0.txt").read_text().split(" ", 1)
    assert message == stalled.message and float(seconds) < 60  # the timeout, not rank 1's 120 s sleep, ended it


# --- without processes ------------------------------------------------------------------------------


def test_rank_parts_cover_the_global_batch_in_order():
    for size in (1, 5, 24, 25):
        index = torch.randperm(100)[:size]
        parts = [distributed.rank_part(index, distributed.Ranks(r, 3, r, "gloo")) for r in range(3)]
        assert torch.equal(torch.cat(parts), index)
        assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1


def test_global_batch_larger_than_the_data_is_refused():
    ds = bl.load_dataset("blobs")
    with pytest.raises(ConfigError, match="per rank"):
        distributed.plan_global(ds, bl.TrainConfig(batch_size=ds.n_train), 2)
    config, clock = distributed.plan_global(ds, bl.TrainConfig(batch_size=10), 4)
    assert config.batch_size == clock.batch_size == 40


def test_probes_needing_the_whole_batch_are_refused():
    for spec in ("noise_scale_exact", bl.probes.NoiseScale(method="parts")):
        with pytest.raises(ConfigError, match="data-parallel"):
            distributed.rank_probe(spec)
    assert isinstance(distributed.rank_probe("noise_scale"), bl.probes.RankNoiseScale)


def test_noise_scale_from_one_rank_is_refused():
    """With one rank, its share of the batch is the global batch: the two-batch estimate has no second size."""
    with pytest.raises(ConfigError, match="needs 2 or more ranks"):
        distributed.rank_probe("noise_scale", world_size=1)
    assert distributed.rank_probe("grad_norm", world_size=1).name == "grad_norm"


@pytest.mark.parametrize(("text", "expected"), [
    ("Got the following error when running the callback: RuntimeError: [/pytorch/third_party/gloo/gloo/transport/"
     "tcp/pair.cc:537] Read error [127.0.0.1]:1240: Connection reset by peer. This is typically caused by ...",
     "rank 0: lost another rank, which ended without a message (killed, or out of memory?)"),
    ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation to complete",
     "rank 0: timed out waiting for the other ranks in a collective: another rank is stuck or gone"),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x2)", None),  # the rank's own error, not a lost peer
])
def test_a_failed_collective_is_one_line_without_the_backends_text(text, expected):
    ranks = distributed.Ranks(0, 2, 0, "gloo")
    error = RuntimeError(text)
    assert distributed._lost_peer(error) is (expected is not None)
    if expected is not None:
        assert distributed._lost_message(error, ranks) == expected


def test_signals_once_shielded_are_remembered_not_raised():
    """Ctrl-C raises KeyboardInterrupt while training; once the run is ending it is only remembered."""
    with distributed._Signals(distributed.Ranks(0, 2, 0, "gloo")) as signals:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
        signals.shield()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert signals.interrupted


def test_more_ranks_than_cores_are_refused():
    cores = len(os.sched_getaffinity(0))
    distributed.check_nproc(cores, "cpu")
    with pytest.raises(ConfigError, match=f"more than this machine's {cores} CPU cores"):
        distributed.check_nproc(cores + 1, "cpu")


def test_fit_outside_a_launch_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ds = bl.load_dataset("blobs")
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.fit(bl.build_model("mlp", ds), ds, bl.TrainConfig(batch_size=8))


@pytest.mark.slow
def test_cli_nproc_trains_what_one_process_trains_at_the_global_batch(tmp_path, cli):
    """`batchlab fit --nproc 2 --batch-size 25` stores the run `batchlab fit --batch-size 50` stores."""
    flags = ["--dataset", "blobs", "--model", "mlp:hidden=16", "--epochs", "1", "--optimizer", "adam", "--lr", "0.01",
             "--probes", "grad_norm", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(bl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "batchlab", "fit", "--nproc", "2", "--batch-size", "25",
                                "--store", str(tmp_path / "ddp.db"), *flags], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    status, _, err = cli(["fit", "--batch-size", "50", "--store", str(tmp_path / "one.db"), *flags])
    assert status == 0, err
    code, output = _wait(process)
    assert code == 0, output[-2000:]
    with RunStore(tmp_path / "ddp.db") as ddp_store, RunStore(tmp_path / "one.db") as one_store:
        assert len(ddp_store.list_runs()) == 1
        ddp, one = ddp_store.load_run(1), one_store.load_run(1)
    assert ddp.provenance["distributed"]["per_rank_batch"] == 25 and ddp.config["batch_size"] == 50
    # float32 here (the CLI trains in float32): the ranks' gradients are summed in another order than
    # one process sums the batch's. Each sum of n ≤ 50 per-sample terms differs by at most ~n·u
    # (u = 6e-8, float32's unit roundoff) ≈ 3e-6 relatively; Adam's update is a ratio of such sums,
    # and one epoch is 8 updates, so the runs stay within ~8 × 3e-6 ≈ 2.4e-5: rtol 1e-4 is that
    # bound with a factor 4 to spare, derived, not measured. (A sample scored the other way would
    # need a logit margin below that, and would move running_acc by 1/50: a real difference.)
    for column in ("batch_loss", "running_acc", "grad_norm"):
        np.testing.assert_allclose(ddp.steps[column], one.steps[column], rtol=1e-4, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(ddp.evals["val_loss"], one.evals["val_loss"], rtol=1e-4)


def test_cli_nproc_refuses_bad_input_before_launching(tmp_path, cli):
    status, _, err = cli(["fit", "--nproc", "2", "--dataset", "blobs", "--batch-size", "400",
                          "--store", str(tmp_path / "x.db")])
    assert status == 2 and err.strip().splitlines() == [
        "error: batch_size 400 per rank × 2 ranks = 800 is larger than the training set (500 samples); "
        "use a per-rank batch size <= 250"]
    assert not (tmp_path / "x.db").exists()
