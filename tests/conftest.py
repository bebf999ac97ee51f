"""Shared test fixtures."""

from __future__ import annotations

import pytest

from batchlab.cli import main


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
