"""The command line in a real terminal: every command in a pseudo-terminal, and Ctrl-C.

A pipe hides what only a terminal shows (the progress displays draw only when stderr is a tty), so
these tests run `python -m batchlab` with a pty as its stdin, stdout and stderr.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from batchlab.store import RunStore

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--dataset", "blobs", "--model", "mlp:hidden=8"]
BAR = "━"  # rich draws its progress bars with this character


def run_in_terminal(args: list[str], cwd: Path, *, interrupt_when: str | None = None,
                    timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[int, str]:  # fmt: skip
    """Run ``batchlab ARGS`` in a pseudo-terminal; return its exit status and everything it drew.

    Args:
        args: the command line after ``batchlab``.
        cwd: the working directory.
        interrupt_when: send SIGINT (Ctrl-C) once this text has appeared on the terminal.
        timeout: seconds before the test gives up and kills the command.
        env: variables to set for the command besides these (``CI`` is unset unless given here).
    """
    extra, env = env or {}, {k: v for k, v in os.environ.items() if k != "CI"}  # progress displays hide under CI
    env.update(**extra)
    env.update(PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", TERM="xterm",
               COLUMNS="120", LINES="40")  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes `python -m batchlab ARGS` on the terminal
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "batchlab", *args], env)
    chunks: list[bytes] = []
    interrupted = interrupt_when is None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        if not interrupted and interrupt_when in ANSI.sub("", b"".join(chunks).decode(errors="replace")):
            os.kill(pid, signal.SIGINT)
            interrupted = True
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    screen = b"".join(chunks).decode(errors="replace")
    return os.waitstatus_to_exitcode(status), ANSI.sub("", screen).replace("\r\n", "\n")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves, so assertions read the text


def _store_statuses(path: Path) -> list[str]:
    with RunStore(path, create=False) as store:
        return list(store.list_runs()["status"])


def test_fit_then_report_in_a_terminal(tmp_path):
    status, screen = run_in_terminal(["fit", *TINY, "--epochs", "3", "--store", "s.db"], tmp_path)
    assert status == 0, screen
    assert BAR in screen and "epoch 1/3" in screen and "epoch 3: " in screen  # the bar and its epoch lines
    assert "Traceback" not in screen and "finished: run 1" in screen
    frames = re.findall(r"epoch (\d+)/3 .*? (\d+)/(\d+) ", screen)  # the bar's epoch and its step i/steps
    assert frames and frames[-1][0] == "3" and frames[-1][1] == frames[-1][2], frames[-3:]  # the true last epoch, full
    assert all(int(epoch) <= 3 for epoch, _, _ in frames), frames
    status, screen = run_in_terminal(["report", "1", "--store", "s.db"], tmp_path)
    assert status == 0 and "report written to" in screen, screen
    assert (tmp_path / "s-run-1.html").exists()


def test_a_terminal_under_ci_draws_no_progress(tmp_path):
    """Under CI (whose logs keep every redraw) a command draws no progress even on a terminal, as the
    library decides it (`batchlab.callbacks.progress_wanted`), and still says what it did."""
    status, screen = run_in_terminal(["fit", *TINY, "--epochs", "2", "--store", "s.db"], tmp_path, env={"CI": "1"})
    assert status == 0, screen
    assert not re.search(r"epoch \d+/2 ", screen) and "finished: run 1" in screen  # no bar's "epoch i/epochs"


def test_explain_in_a_terminal(tmp_path):
    status, screen = run_in_terminal(["explain", *TINY, "--epochs", "2", "--store", "s.db", "--out", "figs"], tmp_path)
    assert status == 0, screen
    assert BAR in screen and "Traceback" not in screen
    assert (tmp_path / "figs" / "batchlab-explain-1.png").exists()


def test_study_in_a_terminal(tmp_path):
    args = ["study", *TINY, "--batch-sizes", "16,full", "--lrs", "0.2", "--seeds", "1", "--max-steps", "30",
            "--target", "val_acc>=0.5", "--no-noise-scale", "--store", "s.db"]  # fmt: skip
    status, screen = run_in_terminal(args, tmp_path)
    assert status == 0, screen
    assert BAR in screen and "study groups" in screen and "Traceback" not in screen
    assert "recommendation:" in screen


def test_gradnorm_in_a_terminal(tmp_path):
    args = ["gradnorm", *TINY, "--at", "0,1", "--batch-sizes", "1,4", "--trials", "10", "--store", "s.db"]
    status, screen = run_in_terminal(args, tmp_path)
    assert status == 0, screen
    assert BAR in screen and "Traceback" not in screen and "stored as group 1" in screen


def test_distance_in_a_terminal(tmp_path):
    args = ["distance", *TINY, "--batch-sizes", "16,64", "--lrs", "0.1", "--epochs", "2", "--store", "s.db"]
    status, screen = run_in_terminal(args, tmp_path)
    assert status == 0, screen
    assert BAR in screen and "Traceback" not in screen and "stored as group 1" in screen


def test_ctrl_c_on_fit_exits_130_and_stores_the_run_as_interrupted(tmp_path):
    args = ["fit", *TINY, "--epochs", "100000", "--store", "s.db"]
    status, screen = run_in_terminal(args, tmp_path, interrupt_when="epoch 2: ")
    assert status == 130, screen
    assert "error: interrupted" in screen and "Traceback" not in screen
    assert _store_statuses(tmp_path / "s.db") == ["interrupted"]


@pytest.mark.parametrize("args", [[], ["runs"], ["-h"], ["--version"]])
def test_front_door_in_a_terminal(tmp_path, args):
    status, screen = run_in_terminal(args, tmp_path)
    assert "Traceback" not in screen
    if args in (["-h"], ["--version"]):
        assert status == 0 and ("Usage: batchlab" in screen or "batchlab 0." in screen)
    else:
        assert status == 2 and screen.startswith("error: ") and screen.count("\n") == 1
