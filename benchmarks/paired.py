"""Did a change make batchlab slower? The same workloads timed on two versions of the source, in one run.

Each version is a git revision (``--before``, ``--after``; ``WORKTREE`` is the files as they are),
its ``src/`` written to a temporary folder. Every repeat runs each workload once per version, in a
fresh Python process (a warm-up run, then the faster of two) with that version first on its path (one torch thread, the process's CPU
time), the two versions' order alternating; the table gives the median seconds of each and the
median of the per-repeat ratios after/before (paired, so that a slow moment of a shared machine hits
both sides of a ratio). The workloads, each on MNIST-1D (4000 samples, MLP 40-100-100-10, SGD lr 0.05):

- ``fit eager B=1`` / ``fit eager B=32``: ``bl.fit`` for one epoch, evaluation time excluded;
- ``fit compiled B=32``: ``bl.fit(compile="on")``, two epochs (the warm-up run compiled the graphs);
- ``replicas R=16 B=32``: ``bl.fit_replicas`` of 16 learning rates, one epoch;
- ``track B=32``: a user's loop over in-memory batches inside ``bl.track``, one epoch;
- ``study``: ``run_study`` of 3 batch sizes × 3 learning rates, one seed, in this process.

    python benchmarks/paired.py --before e35e451 --after HEAD [--repeats 5] [--only fit,track]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import os, sys, time, json, tempfile
import torch
torch.set_num_threads(1)
import batchlab as bl
full = bl.load_dataset("mnist1d")
data = bl.Dataset("mnist1d", full.train, None, None, full.n_classes)
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100),
                               torch.nn.ReLU(), torch.nn.Linear(100, 10))
def config(**kw):
    return bl.TrainConfig(lr=0.05, eval_train=False, **kw)
"""

WORKLOADS = {
    "fit eager B=1": """
def work():
    started = time.process_time()
    run = bl.fit(mlp(), data, config(batch_size=1, epochs=1), progress=False)
    seconds = time.process_time() - started - run.eval_seconds
    return seconds
""",
    "fit eager B=32": """
def work():
    started = time.process_time()
    run = bl.fit(mlp(), data, config(batch_size=32, epochs=3), progress=False)
    seconds = time.process_time() - started - run.eval_seconds
    return seconds
""",
    "fit compiled B=32": """
def work():
    started = time.process_time()
    run = bl.fit(mlp(), data, config(batch_size=32, epochs=2, compile="on"), progress=False)
    seconds = time.process_time() - started - run.eval_seconds
    return seconds
""",
    "replicas R=16 B=32": """
def work():
    configs = [config(batch_size=32, epochs=1, seed=s) for s in range(16)]
    started = time.process_time()
    runs = bl.fit_replicas(lambda seed: mlp(seed), data, configs, progress=False)
    seconds = time.process_time() - started - sum(r.eval_seconds for r in runs)
    return seconds
""",
    "track B=32": """
def work():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    X, y = data.train
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    started = time.process_time()
    with bl.track(model, optimizer) as run:
        for start in range(0, X.shape[0], 32):
            index = order[start:start + 32]
            output = model(X[index])
            loss = torch.nn.functional.cross_entropy(output, y[index])
            optimizer.zero_grad()
            loss.backward()
            run.step(loss, outputs=output, targets=y[index])
            optimizer.step()
    seconds = time.process_time() - started
    return seconds
""",
    "study": """
def work():
    from batchlab.study import run_study, make_executor
    study_config = bl.StudyConfig(model="mlp", batch_sizes=[32, 128, 512], lrs=[0.02, 0.05, 0.1], seeds=1,
                                  target="val_acc>=0.5", epochs=4)
    with tempfile.TemporaryDirectory() as folder:
        started = time.process_time()
        run_study(study_config, store=os.path.join(folder, "s.db"), executor=make_executor("in-process"))
        seconds = time.process_time() - started
    return seconds
""",
}


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def source_of(revision: str, folder: Path) -> Path:
    """``src/`` of a revision (``WORKTREE``: the files as they are) written under ``folder``."""
    if revision == "WORKTREE":
        return ROOT / "src"
    target = folder / revision.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        fail(f"cannot read src/ of revision {revision!r}: {archive.stderr.decode().strip().splitlines()[-1]}")
    archive = archive.stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def time_once(source: Path, workload: str) -> float:
    """``workload`` in a fresh process importing batchlab from ``source``: run once to warm up (first
    calls, compiled graphs), then the fastest of two more runs, in CPU seconds."""
    code = SETUP + WORKLOADS[workload] + "\nwork()\nprint(json.dumps(min(work() for _ in range(2))))\n"
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode != 0:
        fail(f"{workload!r} failed on {source}: {out.stderr.strip().splitlines()[-1]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision, or WORKTREE")
    parser.add_argument("--after", default="WORKTREE", help="git revision, or WORKTREE (default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated substrings of the workloads to run")
    args = parser.parse_args()
    names = [n for n in WORKLOADS if not args.only or any(part in n for part in args.only.split(","))]
    with tempfile.TemporaryDirectory() as folder:
        sources = {"before": source_of(args.before, Path(folder)), "after": source_of(args.after, Path(folder))}
        print(f"before = {args.before}, after = {args.after}; one torch thread per process, CPU seconds, "
              f"median of {args.repeats}")
        print(f"{'workload':>20} {'before s':>9} {'after s':>9} {'after/before':>13}")
        for name in names:
            seconds: dict[str, list[float]] = {"before": [], "after": []}
            for repeat in range(args.repeats):
                for side in ("before", "after") if repeat % 2 == 0 else ("after", "before"):
                    seconds[side].append(time_once(sources[side], name))
            ratios = [a / b for a, b in zip(seconds["after"], seconds["before"])]
            print(f"{name:>20} {statistics.median(seconds['before']):9.4f} {statistics.median(seconds['after']):9.4f} "
                  f"{statistics.median(ratios):13.3f}", flush=True)


if __name__ == "__main__":
    main()
