"""`batchlab fit --nproc N` when things go wrong: a rank killed, Ctrl-C, bad requests.

The launches run 2 gloo ranks of one thread each on tiny data. torchrun starts each rank in a
session of its own, so killing the launcher's process group would leave the ranks behind: on a
timeout the tests kill the launcher's children by their ids, then the launcher.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batchlab.store import RunStore

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_terminal import ANSI, SRC, TINY  # noqa: E402

LAUNCH_TIMEOUT = 180  # seconds for one launch on a busy 2-core machine
LONG = ["--epochs", "300"]  # long enough to be stopped mid-run, short enough to end by itself


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", TERM="xterm",
               COLUMNS="120", LINES="40")  # fmt: skip
    return env


def _ranks(launcher: int) -> dict[int, int]:
    """The launcher's rank processes: {rank: pid}, from /proc (their parent and RANK)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher:
            for variable in environ:
                if variable.startswith(b"RANK="):
                    found[int(variable[5:])] = int(entry)
    return found


def _kill_all(launcher: int) -> None:
    for pid in _ranks(launcher).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(launcher, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stored(path: Path) -> list[tuple[str, str]]:
    with RunStore(path, create=False) as store:
        runs = store.list_runs()
        return [(store.load_run(int(i)).status, store.load_run(int(i)).message) for i in runs["id"]]


def _wait_for_steps(path: Path, deadline: float) -> None:
    """Until the run in ``path`` has stored an epoch (the ranks are past their collectives' setup)."""
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with RunStore(path, create=False) as store:
                    runs = store.list_runs()
                    if len(runs) and len(store.load_run(int(runs["id"].iloc[0])).epochs):
                        return
            except Exception:  # the store is being created
                pass
        time.sleep(0.2)
    pytest.fail("the run stored no epoch in time")


def test_a_killed_rank_fails_the_run_in_one_line(tmp_path):
    """kill -9 of rank 1: rank 0 sees the collective fail, stores the run as failed and says so in one line."""
    args = [sys.executable, "-m", "batchlab", "fit", "--nproc", "2", *TINY, *LONG, "--store", "s.db"]
    process = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        _wait_for_steps(tmp_path / "s.db", deadline)
        ranks = _ranks(process.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _kill_all(process.pid)
    reader.join(timeout=10)
    output = "".join(lines)
    assert status == 1, output
    assert "Traceback" not in output and "[rank" not in output, output
    assert lines[0].startswith("blobs: 500 samples") and len(lines) == 2, output  # the accounting line, the error
    assert lines[1] == "error: rank 0: lost another rank, which ended without a message (killed, or out of memory?)\n"
    [(stored, message)] = _stored(tmp_path / "s.db")
    assert stored == "failed" and message == lines[1].strip()[len("error: "):]


def _run_in_terminal(args: list[str], cwd: Path, interrupt_when: str) -> tuple[int, str]:
    """``batchlab ARGS`` in a pseudo-terminal, Ctrl-C once ``interrupt_when`` has been drawn (as
    tests/test_cli_terminal.py does); on a timeout the launcher and its ranks are killed."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "batchlab", *args], _env())
    chunks: list[bytes] = []
    interrupted = False
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer left
                    break
                if not data:
                    break
                chunks.append(data)
            if not interrupted and interrupt_when in ANSI.sub("", b"".join(chunks).decode(errors="replace")):
                os.kill(pid, signal.SIGINT)  # what the terminal sends the foreground process on Ctrl-C
                interrupted = True
    finally:
        if time.monotonic() >= deadline:
            _kill_all(pid)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    screen = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return os.waitstatus_to_exitcode(status), screen.replace("\r\n", "\n")


def test_ctrl_c_on_fit_nproc_exits_130_and_stores_the_run_as_interrupted(tmp_path):
    status, screen = _run_in_terminal(["fit", "--nproc", "2", *TINY, *LONG, "--store", "s.db"], tmp_path,
                                      interrupt_when="epoch 2: ")
    assert status == 130, screen
    assert "Traceback" not in screen and "[rank" not in screen and "death signal" not in screen, screen
    errors = [line for line in screen.splitlines() if "error" in line]
    assert errors == ["error: interrupted"], screen
    [(stored, message)] = _stored(tmp_path / "s.db")
    assert stored == "interrupted" and message.startswith("interrupted at step ")


# --- refused before launching (no processes) --------------------------------------------------------


def test_nproc_above_the_cores_is_refused(tmp_path, cli):
    cores = len(os.sched_getaffinity(0))
    status, _, err = cli(["fit", "--nproc", str(cores + 1), *TINY, "--store", str(tmp_path / "x.db")])
    assert status == 2 and err.strip().splitlines() == [
        f"error: --nproc {cores + 1} is more than this machine's {cores} CPU cores (one per rank); use --nproc "
        f"{cores} or fewer, or torchrun to train across machines"]
    assert not (tmp_path / "x.db").exists()


def test_noise_scale_with_one_rank_is_refused(tmp_path, cli):
    """From ranks, the noise scale compares a rank's share with the global batch: with one rank they are equal."""
    status, _, err = cli(["fit", "--nproc", "1", *TINY, "--probes", "noise_scale", "--store", str(tmp_path / "x.db")])
    assert status == 2 and len(err.strip().splitlines()) == 1 and "needs 2 or more ranks" in err, err
    assert not (tmp_path / "x.db").exists()


def test_batch_norm_with_one_sample_per_rank_is_refused(tmp_path, cli):
    status, _, err = cli(["fit", "--nproc", "2", "--dataset", "blobs", "--model", "mlp:hidden=8,batch_norm=true",
                          "--batch-size", "1", "--store", str(tmp_path / "x.db")])
    assert status == 2 and len(err.strip().splitlines()) == 1 and "batch norm" in err, err
    assert not (tmp_path / "x.db").exists()
