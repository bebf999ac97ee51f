"""The command line: a thin layer over the Python API.

Every command takes ``--store`` and ``--json``. Bad input exits with status 2 and one line
``error: ...`` on stderr; nothing is written to the store before the input has been validated.
One module per group of commands; importing them registers the commands.
"""

from . import advise, explain, experiments, runs, study, train  # noqa: F401  (registers the commands)
from .app import cli, main

__all__ = ["cli", "main"]
