"""Write every console block and table of numbers in README.md and docs/*.md from the command that prints it.

Such a block sits between two markers in the markdown, and only the text between them is rewritten:

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

NAME is a function below registered with `@block`; it returns the block's text by running the real
command (``python -m batchlab ...`` or a benchmark script) in a temporary folder with its own store,
one torch thread and the commands' fixed default seeds. The measured studies of docs/study.md run
in this process instead and are kept in STUDY_STORE (``docs-study.db`` in the repository root), so
an interrupted generation resumes them; delete it to run them afresh. Usage, from the repository root:

    python docs/generate.py              # rewrite every cheap block (about a minute)
    python docs/generate.py --slow       # and the slow ones: the studies, gradnorm, the benchmarks
    python docs/generate.py --only NAME  # rewrite the named blocks (comma-separated)
    python docs/generate.py --check      # exit 1 and print a diff where the committed text differs

The check compares the committed and the generated text after `mask_timings`, which blanks what
differs from run to run (seconds, rates, dates, durations); every other number must match.
Benchmark blocks are nothing but timings, so their check only asserts that the block shows the
command that made it. `tests/test_docs.py` runs the check.

Numbers from training are pinned, not tolerated: hundreds of float32 steps on another CPU's vector
kernels (AVX-512 instead of AVX2, another MKL code path) round differently, and sooner or later a
sample near the decision boundary is scored the other way. So every command behind a block of
numbers runs on the portable kernels (PORTABLE_KERNELS: ATen's scalar kernels, MKL's compatible
code path), which every x86-64 CPU computes alike, and the block's command line says so. A user who
runs that line gets the block exactly; without the settings, the last digits may differ. Benchmark
blocks measure the machine's own kernels and are not pinned. docs/architecture.md ("Testing")
states the rule for every test.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from batchlab.study import Study

ROOT = Path(__file__).resolve().parents[1]

REGION = re.compile(r"<!-- generated: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end generated -->", re.S)
MARKER = re.compile(r"<!-- (generated: [\w-]+|end generated) -->")

# What differs between two runs of the same command, and nothing else: a mask that also caught a
# measured number (an accuracy, a step count) would let that number drift unnoticed.
TIMING_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:?\d\d|Z)?"), "<date>"),
    (re.compile(r"\b\d+:\d\d(:\d\d)?\b"), "<duration>"),  # 0:00:03, 12:41
    (re.compile(r"\d+(\.\d+)?\s?(it/s|s/it|steps/s|samples/s)"), "<rate>"),
    (re.compile(r"\d+(\.\d+)?\s?(ms|µs|us|s|sec|seconds|min|h)\b"), "<time>"),
    (re.compile(r"Fastest here: B = \w+"), "Fastest here: B = <fastest>"),  # the study's pick by seconds
]

# The kernels every x86-64 CPU computes alike (see the module docstring): ATen's default (scalar)
# kernels instead of the CPU's own AVX2/AVX-512 ones, and MKL's conditional numerical
# reproducibility in its compatible code path, alignment-independent (STRICT) for the matrix products.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT"}
PORTABLE_PREFIX = " ".join(f"{name}={value}" for name, value in PORTABLE_KERNELS.items())

# Table columns that hold timings: the cells under these headers are masked as a whole.
TIMING_COLUMNS = {"seconds", "s/epoch", "ms/step", "vectorized_s", "sequential_s", "wall time"}
CELL = re.compile(r"[│┃|]")
MARKDOWN_RULE = re.compile(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*")
BORDER = re.compile(r"[\s─━┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇┳┻╋╈╍-]*")


class GenerationError(Exception):
    """A command behind a block failed, or the markers in a file are malformed."""


@dataclass(frozen=True)
class Block:
    """One generated region: how to make its text, and how expensive that is.

    Args:
        name: the NAME in ``<!-- generated: NAME -->``.
        make: temporary folder -> the region's text (ends with a newline).
        slow: made only with ``--slow`` (minutes); the test of its numbers is marked slow.
        benchmark: the benchmark command when the block is all timings; the check then only
            asserts that the committed block shows this command. Benchmarks run on the machine's
            own kernels; every other block on PORTABLE_KERNELS.
        artifacts: files (relative to the temporary folder and to the repository alike) the
            command writes, copied into the repository when the block is rewritten (figures).
        pinned: its commands run on PORTABLE_KERNELS and show them; False for a benchmark and for
            a command that prints no number computed by training (counts alone).
    """

    name: str
    make: Callable[[Path], str]
    slow: bool = False
    benchmark: str | None = None
    artifacts: tuple[str, ...] = ()
    pinned: bool = True


BLOCKS: dict[str, Block] = {}


def block(slow: bool = False, benchmark: str | None = None, artifacts: tuple[str, ...] = (), pinned: bool = True):
    """Register the decorated function as the maker of the region of the same name."""

    def register(make: Callable[[Path], str]) -> Callable[[Path], str]:
        BLOCKS[make.__name__] = Block(make.__name__, make, slow, benchmark, artifacts, pinned and benchmark is None)
        return make

    return register


# ---------------------------------------------------------------------------------------------
# Running commands


def command_env(pinned: bool = True) -> dict[str, str]:
    """The environment every command runs in: this checkout's source, one thread, no user store,
    and (`pinned`) the portable kernels; otherwise the machine's own, whatever the caller set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_") and k not in PORTABLE_KERNELS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore", COLUMNS="100", NO_COLOR="1", TERM="dumb")  # fmt: skip
    if pinned:
        env.update(PORTABLE_KERNELS)
    return env


def is_pinned() -> bool:
    """Whether this process runs on the portable kernels (for the blocks made in-process)."""
    return all(os.environ.get(name) == value for name, value in PORTABLE_KERNELS.items())


def run(command: str, cwd: Path, head: int | None = None, pinned: bool = True) -> str:
    """Run one documented command line as a user would and return what it printed (stdout and stderr).

    Args:
        command: ``batchlab ...`` (run as ``python -m batchlab ...``) or ``python benchmarks/x.py ...``
            (this checkout's script).
        cwd: the folder it runs in.
        head: stop the command once it has printed this many lines, and return those.
        pinned: run it on PORTABLE_KERNELS (False for a benchmark, which measures this CPU's own).

    Raises GenerationError when the command fails.
    """
    argv = shlex.split(command)
    if argv[0] == "batchlab":
        argv = [sys.executable, "-m", "batchlab", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *[str(ROOT / a) if a.startswith("benchmarks/") else a for a in argv[1:]]]
    with subprocess.Popen(argv, cwd=cwd, env=command_env(pinned), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:  # fmt: skip
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if head is not None and len(lines) == head:
                process.terminate()  # what follows is not shown, so not worth the wait
                break
        status = process.wait()
    output = "".join(lines)
    if status != 0 and not (head is not None and len(lines) == head):
        raise GenerationError(f"`{command}` exited with {status}:\n{output[-3000:]}")
    # The temporary folder is a detail of generation, not of the output a user sees.
    output = output.replace(f"{cwd}{os.sep}", "").replace(str(cwd), ".")
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines()) + "\n"


def console(cwd: Path, *commands: str, head: int | None = None, pinned: bool = True) -> str:
    """A fenced console block: each command after ``$ `` and its output.

    Args:
        cwd: the folder the commands run in (they share it, and so its store).
        commands: documented command lines, run in order.
        head: show only the first `head` lines of each command's output (and stop it there).
        pinned: run them on PORTABLE_KERNELS, shown before each command as the settings a user
            gives to get the same output (False for a benchmark).

    Returns:
        The block's text, fences included.
    """
    parts = ["```console\n"]
    for command in commands:
        output = run(command, cwd, head, pinned)
        parts += [f"$ {PORTABLE_PREFIX + ' ' if pinned else ''}{command}\n", output]
    return "".join(parts) + "```\n"


# ---------------------------------------------------------------------------------------------
# The blocks, in the order of the docs


@block(pinned=False)
def loop_accounting(cwd: Path) -> str:
    """docs/loop.md: the accounting line every run prints first (counts, before any training)."""
    return console(cwd, "batchlab fit --dataset mnist1d --batch-size 32 --epochs 20", head=1, pinned=False)


@block(pinned=False)
def loop_schedule_accounting(cwd: Path) -> str:
    """docs/loop.md: the accounting line of a run whose batch size follows a schedule."""
    return console(cwd, "batchlab fit --dataset mnist1d --batch-size 32,20000:64,60000:128 --lr-scaling linear "
                        "--epochs 20", head=1, pinned=False)


@block(artifacts=("docs/figures/batchlab-explain-1.png",))
def explain_default(cwd: Path) -> str:
    """docs/explain.md: `batchlab explain` with no training flags, its table, paragraph and figure."""
    return console(cwd, "batchlab explain --store explain.db --out docs/figures")


@block(artifacts=("docs/figures/explain-adam/batchlab-explain-1.png",))
def explain_adam(cwd: Path) -> str:
    """docs/explain.md: the per-batch sawtooth with Adam (Liu & Ma 2025), and its counterfactual runs."""
    return console(cwd, "batchlab explain --model mlp:hidden=256x256 --optimizer adam --lr 0.001 --epochs 10 "
                        "--metric loss --store explain.db --out docs/figures/explain-adam")



def benchmark(name: str, command: str) -> None:
    """Register a benchmark block: the console output of `command`, made only with --slow."""
    BLOCKS[name] = Block(name, lambda cwd: console(cwd, command, pinned=False), slow=True, benchmark=command,
                         pinned=False)


# docs/loop.md: seconds per epoch of bl.fit against a plain loop, Lightning and Keras
benchmark("loop_overhead", "python benchmarks/overhead.py --repeats 3 --skip plain+compile,batchlab+compile,jax")
# docs/replicas.md: vectorized replicas against one fit after another
benchmark("replicas_benchmark", "python benchmarks/replicas.py --sequential-budget 10")
# docs/compile.md: the compiled step against eager PyTorch and JAX; 64 replicas compiled and stacked
benchmark("compile_overhead", "python benchmarks/overhead.py --repeats 5 --skip keras,lightning")
# docs/loop.md: the same rows, bl.fit compiled among them
benchmark("loop_compiled", "python benchmarks/overhead.py --repeats 5 --skip keras,lightning")
benchmark("compile_replicas", "python benchmarks/overhead.py --repeats 3 --batch-sizes 32 "
                              "--skip keras,lightning,plain+log,batchlab,jax --replicas 64")  # fmt: skip

# docs/loop.md: the driver's workloads on the revision before the one driver loop and on this one
benchmark("paired_driver", "python benchmarks/paired.py --before e35e451 --repeats 5")

PROBES_OVERHEAD = "python benchmarks/probes_overhead.py --repeats 15"
TRACK_OVERHEAD = "python benchmarks/track.py --repeats 30 --parts"
TRACK_INSTRUCTIONS = "python benchmarks/track.py --instructions"


def table_block(command: str, cwd: Path) -> str:
    """A benchmark that prints a header line and a markdown table: the header as console output, the
    table rendered."""
    header, _, table = run(command, cwd, pinned=False).partition("\n")
    return f"```console\n$ {command}\n{header}\n```\n\n{table.strip()}"


@block(slow=True, benchmark=TRACK_OVERHEAD)
def track_overhead(cwd: Path) -> str:
    """docs/integrations.md: what bl.track costs a user's loop, in CPU time."""
    return table_block(TRACK_OVERHEAD, cwd)


@block(slow=True, benchmark=TRACK_INSTRUCTIONS)
def track_instructions(cwd: Path) -> str:
    """docs/integrations.md: what bl.track costs a user's loop, in instructions per step."""
    return table_block(TRACK_INSTRUCTIONS, cwd)


@block(slow=True, benchmark=PROBES_OVERHEAD)
def probes_overhead(cwd: Path) -> str:
    """docs/probes.md: the cost of each probe set."""
    return table_block(PROBES_OVERHEAD, cwd)


STUDY_BENCHMARK = "python benchmarks/study.py"


@block(slow=True, benchmark=STUDY_BENCHMARK)
def study_benchmark(cwd: Path) -> str:
    """docs/study.md: run_study against a plain PyTorch loop doing the same trials, on one and on all
    cores; the script's `table` prints the markdown table between its first line and its last lines."""
    header, _, rest = run(STUDY_BENCHMARK, cwd, pinned=False).partition("\n")
    table = "\n".join(line for line in rest.splitlines() if line.startswith("|"))
    notes = "\n".join(line for line in rest.splitlines() if line and not line.startswith("|"))
    return f"```console\n$ {STUDY_BENCHMARK}\n{header}\n```\n\n{table}\n\n{notes}"


DDP_BENCHMARK = "python benchmarks/ddp.py --repeats 3 --epochs 4"


@block(slow=True, benchmark=DDP_BENCHMARK)
def ddp_benchmark(cwd: Path) -> str:
    """docs/distributed.md: seconds per epoch at 1 and 2 ranks; the script prints a markdown table."""
    return f"```console\n$ {DDP_BENCHMARK}\n```\n\n{run(DDP_BENCHMARK, cwd, pinned=False)}"


GRADNORM = "batchlab gradnorm --out docs/figures/gradnorm"


@block(slow=True, artifacts=("docs/figures/gradnorm/gradnorm.png", "docs/figures/gradnorm/gradnorm_conventions.png"))
def gradnorm_default(cwd: Path) -> str:
    """docs/probes.md: the gradient-norm experiment with its defaults (minutes)."""
    return console(cwd, GRADNORM)


DISTANCE = "batchlab distance --out docs/figures/distance"


@block(slow=True, artifacts=("docs/figures/distance/distance.png",))
def distance_default(cwd: Path) -> str:
    """docs/probes.md: distance from the initial weights with its defaults (minutes)."""
    return console(cwd, DISTANCE)


# ---------------------------------------------------------------------------------------------
# docs/study.md's measured studies: run in this process (they need the Study objects, not a
# console), and stored so that an interrupted generation resumes where it stopped.

STUDY_STORE = ROOT / "docs-study.db"  # delete it to run the studies afresh after changing training
RESEEDS = ((0, 1, 2), (10, 11, 12))


def import_batchlab():
    """This checkout's batchlab, training on one torch thread like the commands of the other blocks."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    import batchlab

    torch.set_num_threads(1)
    return batchlab


def reseeded_studies(store: str | Path, seed_sets: Sequence[Sequence[int]] = RESEEDS) -> list[Study]:
    """The default study (``StudyConfig()``) once per set of seeds, resumed from `store`."""
    bl = import_batchlab()
    from batchlab.study import run_study

    return [run_study(bl.StudyConfig(seeds=tuple(seeds)), store=store) for seeds in seed_sets]


def agree(first: Study, second: Study) -> tuple[bool, bool]:
    """Whether two runs of a study agree: B_crit intervals overlap; recommended B within a factor 2."""
    a, b = first.fit, second.fit
    overlap = max(a.b_crit_lo, b.b_crit_lo) <= min(a.b_crit_hi, b.b_crit_hi)
    ra, rb = (recommended_value(s) for s in (first, second))
    return overlap, ra is not None and rb is not None and max(ra, rb) <= 2 * min(ra, rb)


def recommended_value(study: Study) -> float | None:
    """The recommended batch size as a number (``full`` as the training set's size); None without one."""
    batch_size = study.recommendation.batch_size
    return None if batch_size is None else float(study.plan.value_of(batch_size))


def short_number(value: float, digits: int = 3) -> str:
    """`value` for a table: whole with thousands separators from 100 on, else `digits` significant; – if not finite."""
    if not math.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def summary_table(study: Study) -> str:
    """Steps-to-target per batch size with its interval, the best lr and its margin, the regime."""
    num = short_number
    from batchlab.study import steps_interval_label

    lines = ["| B | best lr | margin | steps (median) | interval | fit | regime |", "|---:|---:|---:|---:|---|---:|---|"]
    for row in study.summary.to_dict("records"):
        bound = "≥" if row.get("lr_margin_is_bound") else ""
        lines.append(f"| {row['batch_size']} | {row['best_lr']:.3g} | {bound}{row['lr_margin']:.2f}× | "
                     f"{num(row['steps_to_target'])} | {num(row['steps_ci_lo'])}–{num(row['steps_ci_hi'])} "
                     f"({steps_interval_label(row)}) | "
                     f"{num(row.get('steps_fit', math.nan))} | {row['regime']} |")  # fmt: skip
    return "\n".join(lines)


def fit_line(study: Study) -> str:
    """The scaling fit in one sentence: B_crit and S_min with their intervals, R², B_simple."""
    fit, num = study.fit, short_number
    return (f"B_crit = {num(fit.b_crit)} (95% bootstrap CI {num(fit.b_crit_lo)}–{num(fit.b_crit_hi)}; ± {num(fit.b_crit_err)} "
            f"delta method), S_min = {num(fit.s_min)} steps (95% bootstrap CI {num(fit.s_min_lo)}–{num(fit.s_min_hi)}), "
            f"R² = {fit.r2:.3f} on log S, B_simple ≈ {num(fit.b_simple)}")  # fmt: skip


@block(slow=True)
def study_reseeding(cwd: Path) -> str:
    """docs/study.md: the default study with seeds 0,1,2 and with 10,11,12, and whether they agree."""
    started = time.perf_counter()
    studies = reseeded_studies(STUDY_STORE)
    seconds = time.perf_counter() - started
    overlap, within = agree(*studies)
    parts = []
    for seeds, study in zip(RESEEDS, studies):
        parts += [f"**Seeds {','.join(map(str, seeds))}** ({len(study.trials)} trials):", "",
                  summary_table(study), "", fit_line(study) + ".", "",
                  f"> {study.recommendation.text}", ""]  # fmt: skip
    parts.append(f"The two B_crit intervals {'overlap' if overlap else 'do not overlap'} and the recommended batch "
                 f"sizes are {'within' if within else 'not within'} a factor 2 of each other "
                 f"(both studies: {seconds:.0f} s of wall time on the shared CPU, including any resumed from the store).")
    return "\n".join(parts) + "\n"


@block(slow=True)
def preset_blobs_batch_size(cwd: Path) -> str:
    """docs/study.md: Brownlee's preset with 5 seeds, our final accuracies (median and range) beside his."""
    import_batchlab()
    from batchlab.config import make_study_config
    from batchlab.study import brownlee_comparison, preset_values, run_study

    study = run_study(make_study_config({**preset_values("blobs-batch-size"), "seeds": 5}), store=STUDY_STORE)
    lines = ["| B | train acc (median, range) | val acc (median, range) | Brownlee train | Brownlee test |",
             "|---|---|---|---:|---:|"]  # fmt: skip
    for row in brownlee_comparison(study).to_dict("records"):
        lines.append(f"| {row['batch_size']} | {row['train_acc']:.3f} ({row['train_acc_lo']:.3f}–{row['train_acc_hi']:.3f}) | "
                     f"{row['val_acc']:.3f} ({row['val_acc_lo']:.3f}–{row['val_acc_hi']:.3f}) | "
                     f"{row['brownlee_train_acc']:.3f} | {row['brownlee_test_acc']:.3f} |")  # fmt: skip
    return "\n".join(lines) + f"\n\n({len(study.trials)} trials, 5 seeds, final accuracies after 200 epochs.)\n"


@block(slow=True)
def preset_mnist1d(cwd: Path) -> str:
    """docs/study.md: the MNIST-1D preset, B_crit with its interval beside the noise scale B_simple."""
    import_batchlab()
    from batchlab.config import make_study_config
    from batchlab.study import preset_values, run_study

    study = run_study(make_study_config(preset_values("mnist1d")), store=STUDY_STORE)
    fit = study.fit
    inside = fit.b_crit_lo <= fit.b_simple <= fit.b_crit_hi
    return "\n".join([summary_table(study), "", fit_line(study) + ".", "",
                      f"B_simple (median over batch sizes, near the target) {'lies inside' if inside else 'lies outside'} "
                      "the bootstrap interval of B_crit.", "", f"> {study.recommendation.text}"]) + "\n"  # fmt: skip


@block()
def compile_break_even(cwd: Path) -> str:
    """docs/compile.md: the steps after which `compile="auto"` compiles, from the policy itself."""
    import_batchlab()
    from batchlab.compiled.policy import SAVING_PER_STEP, should_chunk, should_compile

    def fewest(accepts: Callable[[int], bool]) -> str:
        """The fewest steps a policy accepts (by bisection), with their epochs of 4000 samples."""
        low, high = 1, 10**9
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if accepts(middle) else (middle + 1, high)
        if low == 10**9:
            return "never"
        steps = float(f"{low:.2g}")
        epochs = float(f"{steps / math.ceil(4000 / batch_size):.2g}")
        return f"~{steps:,.0f} steps ({epochs:,.0f} epochs of 4000 samples)"

    rows = ["| B | saving per step | break-even | four steps per graph from |", "|---|---|---|---|"]
    for batch_size, saving in SAVING_PER_STEP:
        rows.append(f"| {batch_size} | {saving * 1e3:.2f} ms | {fewest(lambda n: should_compile(n, batch_size))} | "
                    f"{fewest(lambda n: should_chunk(n, batch_size))} |")
    return "\n".join(rows) + "\n"


ADVISE_VS_STUDY = ROOT / "benchmarks" / "advise_vs_study.py"


@block(pinned=False)
def advise_vs_study(cwd: Path) -> str:
    """docs/advise.md: advise's recommendation beside the full study's, per workload and optimizer, rendered
    from the committed JSON of `python benchmarks/advise_vs_study.py` (which trains for many minutes; this
    block trains nothing, so it runs no command and pins no kernels)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("advise_vs_study", ADVISE_VS_STUDY)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(bench)
    return bench.report(json.loads(bench.RESULTS.read_text())["cases"]) + "\n"


SMITH_INCREASE_BATCH = ROOT / "benchmarks" / "smith_increase_batch.py"


@block(pinned=False)
def smith_increase_batch(cwd: Path) -> str:
    """docs/adaptive.md: decaying the lr against increasing the batch (Smith et al. 2018), the default setup's
    table and every setup tried, rendered from the committed JSON of `python benchmarks/smith_increase_batch.py`
    (which trains on the portable kernels itself; this block trains nothing and runs no command)."""
    import importlib.util

    import_batchlab()
    spec = importlib.util.spec_from_file_location("smith_increase_batch", SMITH_INCREASE_BATCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.committed()
    if not results or results[0]["setup"]["seeds"] != list(range(bench.SEEDS)):
        raise GenerationError(f"{bench.RESULTS.relative_to(ROOT)} is missing; run `{bench.COMMAND}`")
    mean, error, seeds = bench.pooled_difference(results)
    return "\n\n".join([bench.report(results[0]), "Every setup tried, each arm over its seeds (the first row is the "
                                                   "table above's):", bench.setups_report(results),
                         f"This setup over all {len(seeds)} of its seeds: increase B minus decay lr {mean:+.2f} points "
                         f"of test accuracy (standard error {error:.2f})."]) + "\n"


ADAPTIVE_BENCHMARK = ROOT / "benchmarks" / "adaptive.py"


@block(pinned=False)
def adaptive_vs_study(cwd: Path) -> str:
    """docs/adaptive.md: the adaptive batch size against each study's best fixed batch size, rendered from
    the committed JSON of `python benchmarks/adaptive.py` (this block trains nothing and runs no command)."""
    import importlib.util
    import json

    import_batchlab()
    spec = importlib.util.spec_from_file_location("adaptive_benchmark", ADAPTIVE_BENCHMARK)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    if not bench.RESULTS.exists():
        raise GenerationError(f"{bench.RESULTS.relative_to(ROOT)} is missing; run `{bench.COMMAND}`")
    return bench.table(json.loads(bench.RESULTS.read_text())) + "\n"


@block(slow=True, artifacts=("docs/figures/batchlab-adaptive-1.png",))
def adaptive_fit(cwd: Path) -> str:
    """docs/adaptive.md: `batchlab fit` with an adaptive batch size: its accounting line, epochs, where the
    batch grew, and the run's figure."""
    return console(cwd, "batchlab fit --dataset mnist1d --batch-size adaptive:start=16,max=1024 --optimizer adam "
                        "--lr 0.001 --epochs 6 --store docs/figures/adaptive.db")


# ---------------------------------------------------------------------------------------------
# Regions in the markdown


@dataclass(frozen=True)
class Region:
    """The text between one pair of markers: `path` holds `body` at text[start:end]."""

    path: Path
    name: str
    start: int
    end: int
    body: str


def doc_files() -> list[Path]:
    """README.md and every page in docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def find_regions(path: Path, text: str) -> list[Region]:
    """Every generated region of one file; raises GenerationError on an unpaired or nested marker."""
    regions = [Region(path, m["name"], m.start("body"), m.end("body"), m["body"]) for m in REGION.finditer(text)]
    if len(MARKER.findall(text)) != 2 * len(regions):
        raise GenerationError(f"{path.relative_to(ROOT)}: a generated-block marker without its pair")
    return regions


def all_regions() -> list[Region]:
    """The regions of every doc file, in file order."""
    return [region for path in doc_files() for region in find_regions(path, path.read_text(encoding="utf-8"))]


def mask_timings(text: str) -> str:
    """`text` with every timing (TIMING_MASKS, TIMING_COLUMNS) replaced by a placeholder."""
    text = mask_timing_columns(text)
    for pattern, placeholder in TIMING_MASKS:
        text = pattern.sub(placeholder, text)
    return text


def mask_timing_columns(text: str) -> str:
    """`text` with the cells of TIMING_COLUMNS blanked in its box-drawn and markdown tables."""
    lines = text.splitlines(keepends=True)
    masked, timing, in_header = [], set(), False
    for index, line in enumerate(lines):
        cells = CELL.split(line)
        if len(cells) < 3:
            # A border line belongs to the table around it; any other line ends the table.
            timing = timing if BORDER.fullmatch(line) else set()
            masked.append(line)
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        header = "┃" in line or bool(MARKDOWN_RULE.fullmatch(following.strip()))
        names = [cell.strip() for cell in cells]
        if header:
            # A header starts a table (its lines may continue one another); its names say which columns are timings.
            timing = (timing if in_header else set()) | {i for i, name in enumerate(names) if name in TIMING_COLUMNS}
        else:
            cells = ["<time>" if i in timing else cell for i, cell in enumerate(cells)]
        in_header = header
        masked.append("|".join(cells))
    return "".join(masked)


NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w])")


def differs(region: Region, generated: str) -> bool:
    """Whether the committed region says something else than the generated text, timings aside.

    Words, numbers and layout must match exactly, except that a table's column may widen or narrow
    (runs of spaces and rules collapse). No tolerance for decimals: the blocks' commands run on
    PORTABLE_KERNELS, which compute the same bits on every x86-64 CPU, so any difference in a
    number is a change in what the code computes.
    """
    committed, fresh = NUMBER.split(mask_timings(region.body)), NUMBER.split(mask_timings(generated))
    if len(committed) != len(fresh):
        return True
    return any(old != new if index % 2 else _layout(old) != _layout(new)
               for index, (old, new) in enumerate(zip(committed, fresh)))


def _layout(text: str) -> str:
    """Text with runs of spaces and of box-drawing rules collapsed (a column may widen by a digit)."""
    return re.sub(r"([ ─━-])\1+", r"\1", text)


def generate(block_: Block, keep_artifacts: bool) -> str:
    """Make one block's text in a fresh temporary folder; copy its artifacts into the repository if asked."""
    with tempfile.TemporaryDirectory(prefix="batchlab-docs-") as folder:
        cwd = Path(folder)
        (cwd / "docs" / "figures").mkdir(parents=True)
        text = block_.make(cwd).rstrip("\n") + "\n"  # the end marker starts a line of its own
        if keep_artifacts:
            for artifact in block_.artifacts:
                (ROOT / artifact).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cwd / artifact, ROOT / artifact)
    return text


def diff(region: Region, generated: str) -> str:
    """A unified diff from the committed region to the generated text."""
    where = f"{region.path.relative_to(ROOT)} [{region.name}]"
    lines = difflib.unified_diff(region.body.splitlines(keepends=True), generated.splitlines(keepends=True),
                                 fromfile=f"{where} (committed)", tofile=f"{where} (generated)")  # fmt: skip
    return "".join(lines)


def selected(regions: list[Region], slow: bool, only: set[str] | None, checking: bool) -> list[Region]:
    """The regions this invocation handles; raises GenerationError for a marker with no maker.

    Checking a benchmark runs nothing, so a check covers the benchmarks even without `slow`.
    """
    for region in regions:
        if region.name not in BLOCKS:
            raise GenerationError(f"{region.path.relative_to(ROOT)}: no generator for block {region.name!r}")
    if only is not None:
        return [r for r in regions if r.name in only]
    cheap = [r for r in regions if not BLOCKS[r.name].slow or (checking and BLOCKS[r.name].benchmark is not None)]
    return regions if slow else cheap


def check(regions: list[Region]) -> list[str]:
    """The diffs of every region that no longer matches its command (benchmarks: their command)."""
    problems = []
    for region in regions:
        block_ = BLOCKS[region.name]
        if block_.benchmark is not None:
            if f"$ {block_.benchmark}\n" not in region.body:
                problems.append(f"{region.path.relative_to(ROOT)} [{region.name}]: does not show `$ {block_.benchmark}`\n")
            continue
        generated = generate(block_, keep_artifacts=False)
        if differs(region, generated):
            problems.append(diff(region, generated))
    return problems


def rewrite(regions: list[Region]) -> list[str]:
    """Regenerate the regions and write every file that changed; returns the names rewritten."""
    texts = {region.name: generate(BLOCKS[region.name], keep_artifacts=True) for region in regions}
    for path in sorted({region.path for region in regions}):
        old = path.read_text(encoding="utf-8")
        new = REGION.sub(lambda m: f"<!-- generated: {m['name']} -->\n{texts.get(m['name'], m['body'])}<!-- end generated -->", old)
        if new != old:
            path.write_text(new, encoding="utf-8")
    return sorted(texts)


def main(argv: list[str] | None = None) -> int:
    """Command line: rewrite (default) or --check the generated blocks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--slow", action="store_true", help="include the slow blocks (many minutes)")
    parser.add_argument("--only", help="comma-separated block names (slow ones included)")
    args = parser.parse_args(argv)
    if not is_pinned():  # the studies and other blocks made in this process train on the portable kernels too
        arguments = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, __file__, *arguments], {**os.environ, **PORTABLE_KERNELS})
    only = set(args.only.split(",")) if args.only else None
    try:
        if only is not None and only - BLOCKS.keys():
            raise GenerationError(f"unknown block(s): {', '.join(sorted(only - BLOCKS.keys()))}")
        regions = selected(all_regions(), args.slow, only, args.check)
        if args.check:
            problems = check(regions)
            print("".join(problems) or f"{len(regions)} generated block(s) match their commands")
            return 1 if problems else 0
        names = rewrite(regions)
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"regenerated {len(names)} block(s): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
