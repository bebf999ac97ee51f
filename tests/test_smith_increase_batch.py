"""benchmarks/smith_increase_batch.py: Smith et al. 2018's two arms, checked against arithmetic, and the claim.

The fast tests check the arms against independent counting: the batch grows exactly where the
step schedule divides the lr (samples seen = epoch × N), the number of updates is the sum of each
phase's epochs × ceil(N/B), a short run of both arms changes at the same samples, and the
committed results and figure are those of these arms. The slow test trains both arms for 5 seeds
and asserts the paper's claim on MNIST-1D: the same test accuracy (mean within 0.5 points) with at
least 2× fewer updates.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchlab as bl
from batchlab.loop import plan_run
from batchlab.optim import lr_at
from batchlab.schedule import epoch_batch_sizes, resolve

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "smith_increase_batch.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def load_benchmark():
    """benchmarks/smith_increase_batch.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("smith_increase_batch", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
N = 3600  # mnist1d's 4000 training samples less the 10% validation split


def updates(n: int, sizes: list[int], epochs_each: int) -> int:
    """Updates of a run that trains ``epochs_each`` epochs at each batch size in turn (a short last batch counts)."""
    return sum(epochs_each * math.ceil(n / b) for b in sizes)


def test_the_dataset_split_is_the_documented_one():
    ds = bench.load_dataset()
    assert (ds.n_train, len(ds.val[1]), len(ds.test[1])) == (N, 400, 1000)
    # The test split is mnist1d's own held-out set, which the default split calls val.
    assert torch.equal(ds.test[0], bl.load_dataset("mnist1d").val[0])


def test_the_batch_grows_exactly_where_the_lr_decays():
    arms = bench.arms(N)
    decay, grow = arms["decay lr"], arms["increase B"]
    E = bench.PHASE_EPOCHS
    # Everything but how the batch size and the lr move is the same.
    moving = {"batch_size", "schedule", "step_epochs", "gamma"}
    assert {k: v for k, v in decay if k not in moving} == {k: v for k, v in grow if k not in moving}
    assert (decay.optimizer, decay.momentum, decay.lr_scaling, decay.epochs) == ("sgd", 0.9, "none", 3 * E)

    # The step arm: B = 16 throughout, the lr ÷5 after epochs E and 2E.
    steps_per_epoch = math.ceil(N / 16)
    total = plan_run(bench.load_dataset(), decay).total_steps
    lrs = [lr_at(epoch * steps_per_epoch, decay, decay.lr, steps_per_epoch, total) for epoch in range(3 * E)]
    decays = [epoch for epoch in range(1, 3 * E) if lrs[epoch] != lrs[epoch - 1]]
    assert decays == [E, 2 * E] and lrs[-1] == pytest.approx(0.05 / 25, rel=1e-12)

    # The batch arm: B ×5 at the samples seen when those epochs start, the lr fixed.
    assert resolve(grow.batch_size, N) == ((0, 16), (decays[0] * N, 80), (decays[1] * N, 400))
    sizes = [set(epoch_batch_sizes(resolve(grow.batch_size, N), N, epoch * N, False)) for epoch in range(3 * E)]
    assert sizes == [{16}] * E + [{80}] * E + [{400}] * E  # each epoch at one B: N is a multiple of each

    # Updates: 10 epochs at each of 16, 80, 400 against 30 at 16.
    assert total == updates(N, [16], 3 * E) == 6750
    assert plan_run(bench.load_dataset(), grow).total_steps == updates(N, [16, 80, 400], E) == 2790
    assert total / 2790 >= 2


def test_a_short_run_of_both_arms_changes_at_the_same_samples():
    # 400 samples, one epoch per phase: B 16 -> 80 -> 400 (25 + 5 + 1 steps) against 75 steps at 16.
    full = bench.load_dataset()
    n = 400
    ds = bl.Dataset("mnist1d-400", (full.train[0][:n], full.train[1][:n]), full.val, None, n_classes=10)
    runs = {arm: bl.fit(bl.build_model("logreg", ds, seed=0), ds, config, progress=False)
            for arm, config in bench.arms(n, phase_epochs=1).items()}
    decay, grow = runs["decay lr"].steps, runs["increase B"].steps
    assert len(decay) == updates(n, [16], 3) == 75 and len(grow) == updates(n, [16, 80, 400], 1) == 31
    def changes(table, column):
        """The samples seen when a step starts whose ``column`` differs from the step before's."""
        start = (table.samples_seen - table.batch_size).tolist()  # rows hold samples seen after the step
        values = table[column].tolist()
        return [start[i] for i in range(1, len(values)) if values[i] != values[i - 1]]

    lr_changes, b_changes = changes(decay, "lr"), changes(grow, "batch_size")
    assert lr_changes == b_changes == [n, 2 * n]
    assert set(decay.batch_size) == {16} and set(grow.lr) == {0.05}
    assert grow.batch_size.tolist() == [16] * 25 + [80] * 5 + [400]
    # Same seed, same first phase: the same batches and updates until the first change.
    assert decay.batch_loss[:25].tolist() == grow.batch_loss[:25].tolist()
    assert decay.batch_loss[25] != grow.batch_loss[25]


def test_the_kernels_are_the_docs_portable_ones():
    from test_docs import generate

    assert bench.PORTABLE_KERNELS == generate.PORTABLE_KERNELS


def test_the_documented_commands_train_the_two_arms():
    """The `batchlab fit` lines of docs/adaptive.md's section are seed 0 of each arm (parsed, not run)."""
    import shlex

    from batchlab.cli import cli as group
    from batchlab.cli.train import given, spec_from_options

    doc = (ROOT / "docs" / "adaptive.md").read_text(encoding="utf-8")
    section = doc.split("## Increase the batch instead of decaying the learning rate", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("batchlab fit")]
    assert len(lines) == 2
    for line, arm in zip(lines, bench.ARMS):
        ctx = group.commands["fit"].make_context("fit", shlex.split(line)[2:])
        spec = spec_from_options(given(ctx))
        assert spec.train == bench.arms(N, seed=0)[arm]
        assert (spec.dataset.name, spec.dataset.val_fraction, spec.model) == ("mnist1d", 0.1, "mlp:hidden=100x100")


COMMITTED = bench.committed()
needs_results = pytest.mark.skipif(not COMMITTED, reason="benchmarks/results/smith_increase_batch.json not written")


@needs_results
@pytest.mark.parametrize("results", COMMITTED, ids=lambda r: f"b{r['setup']['batch']}-lr{r['setup']['lr']:g}-"
                         f"e{r['setup']['phase_epochs']}-seeds{r['setup']['seeds'][0]}")
def test_committed_results_are_these_arms(results):
    s = results["setup"]
    assert s["kernels"] == bench.PORTABLE_KERNELS  # pinned: the same numbers on every x86-64 CPU
    for arm, data in results["arms"].items():
        assert [run["seed"] for run in data["runs"]] == s["seeds"]
        assert data["config"] == bench.arms(N, s["seeds"][0], s["batch"], s["lr"], s["phase_epochs"])[arm].model_dump(mode="json")
        sizes = [s["batch"]] * 3 if arm == "decay lr" else [s["batch"] * 5**k for k in range(3)]
        assert {run["updates"] for run in data["runs"]} == {updates(N, sizes, s["phase_epochs"])}
    rows = {row["arm"]: row for row in bench.summary(results)}
    for arm, row in rows.items():
        accs = [100 * run["test_acc"] for run in results["arms"][arm]["runs"]]
        assert row["test_acc"] == pytest.approx(sum(accs) / len(accs)) and row["test_acc_sd"] == pytest.approx(statistics.stdev(accs))
    assert f"{rows['decay lr']['test_acc']:.2f} ± {rows['decay lr']['test_acc_sd']:.2f}" in bench.report(results)


@needs_results
def test_the_figure_reads_well():
    from test_figures_readable import problems, squeezed_axes

    fig = bench.figure(COMMITTED[0])
    assert problems(fig) == [] and squeezed_axes(fig) == []


@pytest.mark.slow
def test_increasing_the_batch_matches_decaying_the_lr_with_fewer_updates(tmp_path):
    """Smith et al. 2018 on MNIST-1D, the benchmark's default setup: 5 seeds per arm, eager, on the
    portable kernels (half a minute to two on one core, as busy as it is). Pinned, so also exactly the
    committed numbers."""
    out = tmp_path / "smith.json"
    subprocess.run([sys.executable, str(BENCHMARK), "--json", str(out), "--figure", str(tmp_path / "smith")],
                   cwd=ROOT, check=True, capture_output=True, timeout=570)  # under pytest-timeout's 600
    results = json.loads(out.read_text())
    decay, grow = bench.summary(results)
    assert abs(grow["test_acc"] - decay["test_acc"]) <= 0.5, (decay, grow)
    assert decay["updates"] / grow["updates"] >= 2
    assert min(decay["test_acc"], grow["test_acc"]) > 60  # both learned (chance is 10%)
    assert results["setup"]["seeds"] == COMMITTED[0]["setup"]["seeds"]
    for arm in bench.ARMS:
        fresh, kept = (r["arms"][arm]["runs"] for r in (results, COMMITTED[0]))
        assert [run["test_acc"] for run in fresh] == [run["test_acc"] for run in kept], (
            f"{arm}: the committed results are not what training gives today; run `{bench.COMMAND}`")
