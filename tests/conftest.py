"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

from batchlab.cli import main


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Tests may set torch's thread count for speed; the next test starts with the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    training on a shared machine, several threads under contention crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    """Run the command line in-process: ``status, out, err = cli([...])`` (status 0 when it returns)."""

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            status = 0
        except SystemExit as exit_:
            status = exit_.code or 0
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
