"""Every usage error a person can make, generated from the command tree.

For every command and group: ``-h`` and ``--help`` print usage and exit 0; no arguments where
arguments are required, an unknown flag, a badly typed value for every typed option or argument,
non-finite and overflowing numbers wherever a number is read, and an ``--out`` that cannot be
written are one line ``error: ...`` on stderr, exit 2, no traceback, and leave the store and the
folder exactly as they were. New commands and flags join the corpus by themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click
import pytest

from batchlab.cli import cli
from batchlab.cli.app import FiniteFloat, WholeNumber

TINY = ["--dataset", "blobs", "--model", "mlp:hidden=4"]
# A valid, fast invocation of every command: a bad value is appended to it (click keeps the last
# value of a flag given twice), so each case differs from a working command in one place only.
BASES = {
    "fit": [*TINY, "--epochs", "1", "--quiet"],
    "explain": [*TINY, "--epochs", "1", "--quiet", "--out", "{tmp}/figs"],
    "study": [*TINY, "--batch-sizes", "full", "--lrs", "0.2", "--seeds", "1", "--max-steps", "5",
              "--no-noise-scale", "--quiet"],  # fmt: skip
    "gradnorm": [*TINY, "--at", "0", "--batch-sizes", "1,2", "--trials", "2"],
    "distance": [*TINY, "--batch-sizes", "64", "--lrs", "0.1", "--epochs", "1"],
    "runs show": ["1"],
    "runs export": ["1", "--format", "json", "--out", "{tmp}/export.json"],
    "report": ["1", "--out", "{tmp}/report.html"],
}
HUGE = str(2**64)  # a whole number no 64-bit integer holds
BAD_NUMBERS = ["abc", "inf", "-inf", "nan", "1e999"]
BAD_WHOLE_NUMBERS = [*BAD_NUMBERS, "1.5", HUGE, f"-{HUGE}"]
# Text flags that hold numbers say so in their metavar (see batchlab.cli.train.TEXT_METAVARS).
WHOLE_NUMBER_TEXT = ("INTS", "B|full", "K|epoch")
NUMBER_TEXT = ("NUMBERS", "METRIC>=VALUE")


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    """(path, command) for the group itself and every command under it."""
    yield path, group
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _bad_values(param: click.Parameter) -> list[str]:
    """Bad values for a parameter, by what it reads: whole numbers, numbers, choices."""
    metavar = param.metavar or ""
    if isinstance(param.type, WholeNumber):
        return [*BAD_WHOLE_NUMBERS, str(param.type.minimum - 1)]
    if any(kind in metavar for kind in WHOLE_NUMBER_TEXT):
        return BAD_WHOLE_NUMBERS
    if isinstance(param.type, (FiniteFloat, click.Tuple)) or any(kind in metavar for kind in NUMBER_TEXT):
        return BAD_NUMBERS
    if isinstance(param.type, click.Choice):
        return ["nosuch"]
    return []


def _flag(option: click.Option) -> str:
    return next(o for o in option.opts if o.startswith("--"))


def corpus() -> list[tuple[str, list[str], str]]:
    """(case id, argv with {tmp} placeholders, expectation: "help" or "bad")."""
    cases = []
    for path, command in _commands(cli):
        words = list(path)
        label = " ".join(words) or "batchlab"
        for help_flag in ("-h", "--help"):
            cases.append((f"{label} {help_flag}", [*words, help_flag], "help"))
        base = BASES.get(label, [])
        if isinstance(command, click.Group):
            cases.append((f"{label} (no command)", words, "bad"))
            cases.append((f"{label} --nosuch", [*words, "--nosuch"], "bad"))
            continue
        if any(p.required for p in command.params):
            cases.append((f"{label} (no arguments)", words, "bad"))
        cases.append((f"{label} --nosuch", [*words, *base, "--nosuch"], "bad"))
        cases.append((f"{label} extra", [*words, *base, "extra"], "bad"))
        store = ["--store", "{tmp}/store.db"] if any(p.name == "store" for p in command.params) else []
        for param in command.params:
            for value in _bad_values(param):
                if isinstance(param, click.Argument):
                    args = [value if a == base[0] else a for a in base] if base else [value]
                    cases.append((f"{label} {param.name}={value}", [*words, *args, *store], "bad"))
                elif isinstance(param.type, click.Tuple):
                    args = [_flag(param), value, "0.5"]
                    cases.append((f"{label} {_flag(param)} {value} 0.5", [*words, *base, *store, *args], "bad"))
                else:
                    args = [f"{_flag(param)}={value}"]
                    cases.append((f"{label} {args[0]}", [*words, *base, *store, *args], "bad"))
            if param.name == "out":
                for where in _bad_outs(param):
                    args = [*words, *base, *store, "--out", where]
                    cases.append((f"{label} --out {where}", args, "bad"))
    for label, args in REPORTED:
        command = label.split()[0]
        cases.append((label, [command, *BASES[command], "--store", "{tmp}/store.db", *args], "bad"))
    return cases


# Inputs that were once accepted (or crashed) and must stay one-line errors that write nothing.
REPORTED = [
    ("gradnorm --at=-1", ["--at=-1"]),
    ("gradnorm --at=1,x", ["--at=1,x"]),
    ("distance --lrs=0.1,nan", ["--lrs=0.1,nan"]),
    ("distance --lrs=0.1,-1", ["--lrs=0.1,-1"]),
    ("distance --batch-sizes=0", ["--batch-sizes=0"]),
    ("study --lrs=0.1,inf", ["--lrs=0.1,inf"]),
    ("study --seeds=1,1", ["--seeds=1,1"]),
    ("study --seeds=", ["--seeds="]),
    ("study --target=val_acc>=nan", ["--target=val_acc>=nan"]),
    ("fit --model=os.path:join", ["--model=os.path:join"]),
    ("study --model=os.path:join", ["--model=os.path:join"]),
    ("gradnorm --model=os.path:join", ["--model=os.path:join"]),
    ("fit --nproc=4096", ["--nproc=4096"]),  # more ranks than cores
    ("fit --nproc=1 --probes=noise_scale", ["--nproc=1", "--probes=noise_scale"]),  # ranks' noise scale needs 2
    ("fit --model=mlp:batch_norm=true --batch-size=1", ["--model=mlp:hidden=4,batch_norm=true", "--batch-size=1"]),
    ("study --executor=ray --ray-address=127.0.0.1:1", ["--executor=ray", "--ray-address=127.0.0.1:1"]),
]


def _bad_outs(param: click.Parameter) -> list[str]:
    """Output paths that cannot be written: a file where a folder is wanted and the reverse, a
    missing folder for a file, a path below a file, and (when not root) a read-only folder."""
    kind = param.type
    assert isinstance(kind, click.Path)
    bad = ["{tmp}/a_file/below"]
    if not kind.file_okay:  # a folder
        bad += ["{tmp}/a_file"] + (["{tmp}/read_only/sub"] if os.geteuid() != 0 else [])  # root writes anywhere
    if not kind.dir_okay:  # a file
        bad += ["{tmp}/a_folder", "{tmp}/missing/report.html"]
        bad += ["{tmp}/read_only/report.html"] if os.geteuid() != 0 else []
    return bad


CORPUS = corpus()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a store holding one finished run, a file, a folder and a read-only folder."""
    from batchlab.cli import main

    tmp = tmp_path_factory.mktemp("corpus")
    try:
        main(["fit", *TINY, "--epochs", "1", "--quiet", "--store", str(tmp / "store.db")])
    except SystemExit as exit_:
        assert not exit_.code
    (tmp / "a_file").write_text("not a folder")
    (tmp / "a_folder").mkdir()
    (tmp / "read_only").mkdir(mode=0o555)
    return tmp


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_the_corpus_covers_every_command():
    labels = {case[0].split(" -")[0].split(" (")[0] for case in CORPUS}
    assert {"batchlab", "fit", "explain", "study", "gradnorm", "distance", "report", "datasets", "runs",
            "runs list", "runs show", "runs export"} <= {label.split(" --")[0] for label in labels}  # fmt: skip
    assert len(CORPUS) > 300


@pytest.mark.parametrize("case, argv, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_one_line_and_changes_nothing(workspace, cli, case, argv, expected):
    argv = [a.replace("{tmp}", str(workspace)) for a in argv]
    before = _snapshot(workspace)
    status, out, err = cli(argv)
    assert "Traceback" not in out + err
    if expected == "help":
        assert status == 0 and out.startswith("Usage: batchlab") and not err
        return
    assert status == 2, (status, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out
    assert _snapshot(workspace) == before
