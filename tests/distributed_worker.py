"""What each rank runs in tests/test_distributed.py (started by torchrun, 2 gloo ranks, one thread each).

Usage: ``torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py SCENARIO[,SCENARIO] OUT_DIR``.
Rank 0 writes its runs' step tables as JSON into OUT_DIR and records into OUT_DIR/runs.db.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import batchlab as bl
from batchlab import distributed

# The configs both sides of the equivalence test train: per-rank batch 12 over 2 ranks = global 24.
# blobs has a training set that 24 does not divide, so the last global batch is short and split too.
PER_RANK_BATCH = 12
CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=2, eval_every=7, seed=3),
    "adam": dict(optimizer="adam", lr=0.01, epochs=2, eval_every=7, seed=4),
}
PROBES = {"sgd": ["noise_scale", "grad_norm", "dist_from_init"], "adam": ["grad_norm"]}


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
        config = bl.TrainConfig(batch_size=PER_RANK_BATCH, **options)
        callbacks = [bl.recorder(out / "runs.db", name=name)] if dist.get_rank() == 0 else []
        run = distributed.fit(model(ds, options["seed"]), ds, config, probes=PROBES[name], callbacks=callbacks,
                              progress=False, timeout=60)
        (out / f"{name}-rank{dist.get_rank()}.json").write_text(run.steps.to_json(orient="records"))


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
    distributed.start("cpu", timeout=30)
    try:
        for name in scenario.split(","):  # a failure breaks the process group: it comes last
            {"equivalence": equivalence, "failure": failure}[name](folder)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
