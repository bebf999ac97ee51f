"""What each rank runs in tests/test_distributed.py (started by torchrun, 2 gloo ranks, one thread each).

Usage: ``torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py SCENARIO[,SCENARIO] OUT_DIR [TIMEOUT]``
(TIMEOUT: seconds any collective may wait, default 30). Rank 0 writes its runs' step tables as JSON into OUT_DIR and records into OUT_DIR/runs.db.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import batchlab as bl
from batchlab import distributed
from batchlab.events import Callback, Stop

# The configs both sides of the equivalence test train: per-rank batch 12 over 2 ranks = global 24.
# blobs has a training set that 24 does not divide, so the last global batch is short and split too.
PER_RANK_BATCH = 12
CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=2, eval_every=7, seed=3),
    "adam": dict(optimizer="adam", lr=0.01, epochs=2, eval_every=7, seed=4),
}
PROBES = {"sgd": ["noise_scale", "grad_norm", "dist_from_init"], "adam": ["grad_norm"], "scheduled": ["grad_norm"]}
# A batch-size schedule, per rank (samples seen by the whole run -> B per rank): 12 then 20 per rank
# from 600 samples on, the lr linear in the global batch.
CONFIGS["scheduled"] = dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3, eval_every=7, seed=6,
                            lr_scaling="linear", reference_batch_size=24)
BATCH_SIZES = {"scheduled": ((0, PER_RANK_BATCH), (600, 20))}
# An lr so large that the loss grows ~1e23-fold a step and becomes NaN at step 16, the second update
# of the stretch of steps 15-20 (evaluations at 14 and 21): the rows stop there on every rank.
CONFIGS["diverges"] = dict(optimizer="sgd", lr=1e12, epochs=1, eval_every=7, seed=8)
PROBES["diverges"] = []
DIVERGES_AT = 16


def per_rank_batch(name: str):
    return BATCH_SIZES.get(name, PER_RANK_BATCH)


def global_batch(name: str, world: int):
    """The batch size of the single-process reference: each per-rank B times the ranks."""
    batch = per_rank_batch(name)
    return batch * world if isinstance(batch, int) else tuple((s, b * world) for s, b in batch)


def dataset():
    return bl.load_dataset("blobs", dtype=torch.float64)


def model(ds, seed: int) -> torch.nn.Module:
    return bl.build_model("mlp", ds, seed=seed, hidden=[16]).double()


class FailsOnRank1(torch.nn.Module):
    """A model whose forward pass raises on rank 1 at its 4th training call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if dist.get_rank() == 1 and self.calls == 4:
                raise ValueError("boom on rank 1")
        return self.inner(x)


def equivalence(out: Path) -> None:
    ds = dataset()
    for name, options in CONFIGS.items():
        config = bl.TrainConfig(batch_size=per_rank_batch(name), **options)
        callbacks = [bl.recorder(out / "runs.db", name=name)] if dist.get_rank() == 0 else []
        run = distributed.fit(model(ds, options["seed"]), ds, config, probes=PROBES[name], callbacks=callbacks,
                              progress=False, timeout=60)
        (out / f"{name}-rank{dist.get_rank()}.json").write_text(run.steps.to_json(orient="records"))


TRACK_BATCH = 25  # per rank; 2 ranks × 25 divide blobs' 500 training samples
TRACK_CONFIG = dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=1, seed=5)


def track(out: Path) -> None:
    """A user's own DDP loop: each global batch of the seeded permutation split in two, measured by bl.track."""
    from torch.nn.parallel import DistributedDataParallel

    ds = dataset()
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model(ds, TRACK_CONFIG["seed"])
    ddp = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=TRACK_CONFIG["lr"], momentum=TRACK_CONFIG["momentum"])
    X, y = ds.train
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(TRACK_CONFIG["seed"]))
    with bl.track(ddp, optimizer, store=out / "runs.db", name="track", probes=["noise_scale", "grad_norm"],
                  n_train=len(X)) as run:
        for start in range(0, len(X), TRACK_BATCH * world):
            local = order[start + rank * TRACK_BATCH:start + (rank + 1) * TRACK_BATCH]
            outputs = ddp(X[local])
            loss = torch.nn.functional.cross_entropy(outputs, y[local])
            optimizer.zero_grad()
            loss.backward()
            run.step(loss, outputs=outputs, targets=y[local])
            optimizer.step()
        run.end_epoch()
    (out / f"track-rank{rank}.json").write_text(run.steps.to_json(orient="records"))


LOOKS_CONFIG = dict(optimizer="sgd", lr=0.05, epochs=2, eval_every=7, seed=7)  # global batch 24: 21 steps/epoch
STOP_AT = 10  # the step rank 0's declared callback stops the run at


class StopsAt(Callback):
    """A live callback that sees only step ``step`` (declared) and stops the run there."""

    def __init__(self, step: int):
        self.step, self.step_end_steps = step, (step,)

    def on_step_end(self, event):
        return Stop(f"stopped at step {self.step}") if event.clock.step == self.step else None


class CountsRows(Callback):
    """A callback that reads rows only (as a progress display): it counts those it is handed."""

    step_end_live = False

    def __init__(self):
        self.rows = 0

    def on_step_end(self, event):
        self.rows += 1


class SeesEveryStep(Callback):
    """A live callback that needs every step (declares no steps) and asks for nothing."""

    def on_step_end(self, event):
        return None


def looks(out: Path) -> None:
    """Where the ranks agree on rank 0's requests, counted in every rank (`distributed._agree` calls):
    a callback declaring one step stops both ranks there; a display (with the progress bar) adds no
    agreement; a live every-step callback one per step. Every all-reduce is counted too, by the shape
    of what it sums: the step numbers go as (K, 2), K steps' loss sums and correct counts (an
    evaluation's totals as (splits, 3))."""
    ds = dataset()
    config = bl.TrainConfig(batch_size=PER_RANK_BATCH, **LOOKS_CONFIG)
    rank0 = dist.get_rank() == 0
    agree, agreed = distributed._agree, []
    all_reduce, reduced = dist.all_reduce, []

    def counted(state):
        agreed.append(state.recorder.clock.step)
        return agree(state)

    def counted_reduce(tensor, *args, **kwargs):
        reduced.append(list(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    distributed._agree, dist.all_reduce = counted, counted_reduce
    results = {}
    try:
        for name, kind, progress in (("stop", StopsAt, False), ("rows", CountsRows, True),
                                     ("every", SeesEveryStep, False)):
            agreed.clear()
            reduced.clear()
            callbacks = [kind(STOP_AT) if kind is StopsAt else kind()] if rank0 else []
            run = distributed.fit(model(ds, config.seed), ds, config, callbacks=callbacks, progress=progress,
                                  timeout=60)
            results[name] = {"agreed": list(agreed), "reduced": list(reduced), "status": run.status,
                             "message": run.message, "steps": run.steps["step"].tolist(),
                             "evals": run.evals["step"].tolist(),
                             "rows": callbacks[0].rows if callbacks and kind is CountsRows else None}
    finally:
        distributed._agree, dist.all_reduce = agree, all_reduce
    (out / f"looks-rank{dist.get_rank()}.json").write_text(json.dumps(results))


class StallsOnRank1(torch.nn.Module):
    """A model whose rank 1 stops answering (a long sleep, as a stuck rank) at its 4th training call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if dist.get_rank() == 1 and self.calls == 4:
                time.sleep(120)  # the launcher ends this rank once rank 0 has failed the run
        return self.inner(x)


def stall(out: Path) -> None:
    """Rank 1 stalls: rank 0's next collective times out (the process group's timeout) and fails the run."""
    ds = dataset()
    config = bl.TrainConfig(batch_size=PER_RANK_BATCH, epochs=1, seed=0)
    callbacks = [bl.recorder(out / "runs.db", name="stalls")] if dist.get_rank() == 0 else []
    started = time.monotonic()
    try:
        distributed.fit(StallsOnRank1(model(ds, 0)), ds, config, callbacks=callbacks, progress=False)
    except distributed.RankFailure as error:
        (out / f"error-rank{dist.get_rank()}.txt").write_text(f"{time.monotonic() - started:.1f} {error}")
        raise SystemExit(1)


def failure(out: Path) -> None:
    ds = dataset()
    config = bl.TrainConfig(batch_size=PER_RANK_BATCH, epochs=1, seed=0)
    callbacks = [bl.recorder(out / "runs.db", name="fails")] if dist.get_rank() == 0 else []
    try:
        distributed.fit(FailsOnRank1(model(ds, 0)), ds, config, callbacks=callbacks, progress=False, timeout=20)
    except distributed.RankFailure as error:
        (out / f"error-rank{dist.get_rank()}.txt").write_text(str(error))
        raise SystemExit(1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0  # seconds any collective may wait
    distributed.start("cpu", timeout=timeout)
    try:
        for name in scenario.split(","):  # a failure breaks the process group: it comes last
            {"equivalence": equivalence, "track": track, "looks": looks, "failure": failure, "stall": stall}[name](folder)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
