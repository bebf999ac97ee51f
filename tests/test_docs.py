"""The console blocks and tables of numbers in README.md and docs/ are what the commands print today.

Each such block is a region written by `docs/generate.py`; here the cheap regions are generated
again and compared with the committed text (timings masked), the slow ones likewise under
``-m slow``, and every fenced block outside a region must be code or commands without output.
The commands behind the blocks run on the portable kernels (`generate.PORTABLE_KERNELS`), so the
comparison is exact on any x86-64 CPU and under any ``ATEN_CPU_CAPABILITY`` the tests run with.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    """docs/generate.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


generate = load_generator()
REGIONS = generate.all_regions()
BLOCKS = generate.BLOCKS

CHEAP = [r for r in REGIONS if not BLOCKS[r.name].slow]
SLOW = [r for r in REGIONS if BLOCKS[r.name].slow and BLOCKS[r.name].benchmark is None]
BENCHMARKS = [r for r in REGIONS if BLOCKS[r.name].benchmark is not None]

# A fenced block outside a generated region may show commands, never their output: every line is
# a comment, a continuation of the line before, or starts with one of these programs (an optional
# `$ ` prompt and VAR=value settings before it).
COMMAND_PROGRAMS = ("batchlab", "python", "python3", "pip", "tensorboard", "torchrun", "srun")
CODE_LANGUAGES = {"python", "toml", "text"}  # code, and `text` for diagrams
FENCE = re.compile(r"^\s*```(\S*)")
ENV_SETTING = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)+")


def region_id(region) -> str:
    return f"{region.path.name}:{region.name}"


def assert_matches(region) -> None:
    generated = generate.generate(BLOCKS[region.name], keep_artifacts=False)
    assert not generate.differs(region, generated), (
        "the committed block differs from what the command prints today; run `python docs/generate.py"
        f"{' --slow' if BLOCKS[region.name].slow else ''}`:\n{generate.diff(region, generated)}"
    )


def test_docs_have_generated_blocks_of_every_kind():
    assert CHEAP and SLOW and BENCHMARKS


def test_every_marker_has_a_generator_and_every_generator_one_marker():
    assert sorted(region.name for region in REGIONS) == sorted(BLOCKS)


@pytest.mark.parametrize("region", CHEAP, ids=region_id)
def test_cheap_block_is_what_its_command_prints(region):
    assert_matches(region)


@pytest.mark.slow
@pytest.mark.parametrize("region", SLOW, ids=region_id)
def test_slow_block_is_what_its_command_prints(region):
    # The studies train inside the generator's process: run it as its own (pinned) program.
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check", "--only", region.name],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_blocks_of_numbers_run_on_the_portable_kernels_whatever_the_callers_are(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    pinned, native = generate.command_env(), generate.command_env(pinned=False)
    assert all(pinned[name] == value for name, value in generate.PORTABLE_KERNELS.items())
    assert not any(name in native for name in generate.PORTABLE_KERNELS)  # benchmarks: this CPU's own kernels
    assert not generate.is_pinned()


@pytest.mark.parametrize("region", REGIONS, ids=region_id)
def test_a_block_shows_the_settings_its_commands_ran_with(region):
    commands = [line for line in region.body.splitlines() if line.startswith("$ ")]
    shown = [line.startswith(f"$ {generate.PORTABLE_PREFIX} ") for line in commands]
    assert shown == [BLOCKS[region.name].pinned] * len(commands), commands


def test_the_portable_kernels_are_honoured_by_torch():
    # A setting torch ignored would pin nothing: ATen must report its scalar kernels under it.
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, **generate.PORTABLE_KERNELS}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "DEFAULT"


@pytest.mark.parametrize("region", BENCHMARKS, ids=region_id)
def test_benchmark_block_shows_the_command_that_made_it(region):
    command = BLOCKS[region.name].benchmark
    assert f"$ {command}\n" in region.body
    assert (ROOT / command.split()[1]).is_file()


@pytest.mark.parametrize("region", CHEAP + SLOW, ids=region_id)
def test_a_changed_number_in_a_block_is_caught(region):
    # The masks must leave the measured numbers alone: altering one is a difference.
    number = re.search(r"(?<![\w.])\d[\d.]*\d(?!\w)", generate.mask_timings(region.body))
    assert number, "a block of numbers without a number"
    digits = number.group(0)
    first = next(i for i, c in enumerate(digits) if c not in "0.")  # the leading significant digit
    altered_number = digits[:first] + str((int(digits[first]) + 1) % 10) + digits[first + 1:]
    altered = region.body.replace(digits, altered_number, 1)
    assert generate.differs(region, altered)
    assert not generate.differs(region, region.body)


def test_every_printed_digit_must_match_but_a_column_may_change_width():
    body = "│  125 │ 0.2655 │ 0.8125 │\n"
    region = generate.Region(path=ROOT / "README.md", name="x", start=0, end=len(body), body=body)
    assert not generate.differs(region, "│ 125 │ 0.2655 │ 0.8125 │\n")  # layout only
    assert generate.differs(region, "│  125 │ 0.2656 │ 0.8125 │\n")  # the last digit: pinned runs agree on it
    assert generate.differs(region, "│  126 │ 0.2655 │ 0.8125 │\n")  # a count
    assert generate.differs(region, "│  125 │ 0.2655 │\n")  # a number gone


def test_masks_hide_timings_and_only_timings():
    before = (
        "took 12.3 s (1 min 40 s), 4.5it/s, 0:00:03, at 2025-01-02T10:11:12; Fastest here: B = 32 (0.01 s)\n"
        "┃ step ┃  acc   ┃ seconds ┃\n┡━━━━━━╇━━━━━━━━╇━━━━━━━━━┩\n│  125 │ 0.2655 │  0.0845 │\n"
        "| probes | seconds | ratio |\n|---|---:|---:|\n| none | 0.101 | 1.00 |\n"
    )
    after = (
        "took 9.8 s (2 min 3 s), 17.0it/s, 0:01:13, at 2026-03-04T05:06:07; Fastest here: B = full (0.2 s)\n"
        "┃ step ┃  acc   ┃ seconds ┃\n┡━━━━━━╇━━━━━━━━╇━━━━━━━━━┩\n│  125 │ 0.2655 │  1.1234 │\n"
        "| probes | seconds | ratio |\n|---|---:|---:|\n| none | 0.202 | 1.00 |\n"
    )
    assert generate.mask_timings(before) == generate.mask_timings(after)
    for number, other in [("125 ", "126 "), ("0.2655", "0.2656"), ("1.00 |", "1.01 |"), ("40 s", "40 samples")]:
        assert generate.mask_timings(before) != generate.mask_timings(before.replace(number, other))


def test_an_unpaired_marker_is_an_error(tmp_path):
    text = "<!-- generated: loop_accounting -->\n```console\n```\n"
    with pytest.raises(generate.GenerationError, match="without its pair"):
        generate.find_regions(ROOT / "README.md", text)


def fenced_blocks_outside_regions(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, language, lines) of each fenced block of `path` that no region holds."""
    text = path.read_text(encoding="utf-8")
    for region in reversed(generate.find_regions(path, text)):  # from the end, so offsets stay valid
        text = text[: region.start] + "\n" * region.body.count("\n") + text[region.end :]
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and current is None:
            current = (number, fence.group(1), [])
        elif fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def is_command(line: str, continued: bool) -> bool:
    """Whether one line of a fenced block is (part of) a command rather than output."""
    stripped = ENV_SETTING.sub("", line.strip().removeprefix("$ "))
    return continued or not stripped or stripped.startswith("#") or stripped.split()[0] in COMMAND_PROGRAMS


@pytest.mark.parametrize("path", generate.doc_files(), ids=lambda p: p.name)
def test_every_fenced_block_outside_a_region_is_code_or_commands(path):
    for number, language, lines in fenced_blocks_outside_regions(path):
        if language in CODE_LANGUAGES or (lines and lines[0].startswith("#!")):  # code, or a whole script
            continue
        continued = [False] + [line.rstrip().endswith("\\") for line in lines[:-1]]
        output = [line for line, cont in zip(lines, continued) if not is_command(line, cont)]
        assert not output, (
            f"{path.name}:{number}: a fenced block shows output that no command generates; wrap it in "
            f"<!-- generated: NAME --> ... <!-- end generated --> with a NAME in docs/generate.py: {output[:3]}"
        )


def test_the_command_only_check_catches_output():
    # The rule above must tell output from commands, or it guards nothing.
    assert is_command("$ batchlab fit --dataset blobs", False)
    assert is_command("MLFLOW_ALLOW_FILE_STORE=true batchlab runs export 3", False)
    assert is_command("    --probes grad_norm", True)
    assert not is_command("mnist1d: 4000 samples, batch 32 -> 125 steps/epoch", False)
    assert not is_command("     1   125   0.2655   0.5000", False)
