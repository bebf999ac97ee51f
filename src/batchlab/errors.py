"""Errors meant for people.

Every error batchlab raises on bad input is a `BatchlabError` whose message is one line that says
what was wrong and how to mend it. The command line prints it as ``error: <message>`` and exits
with status 2; the Python API lets it propagate.
"""

from __future__ import annotations


class BatchlabError(Exception):
    """Bad input or an impossible request; the message says what was wrong and how to mend it."""

    def __init__(self, message: str):
        # One line only: the CLI prints it verbatim after "error: ".
        super().__init__(" ".join(str(message).split()))


class ConfigError(BatchlabError, ValueError):
    """A configuration value is invalid (a flag, a TOML field, a TrainConfig argument).

    Also a ValueError, as pydantic's ValidationError (which it replaces) was.
    """


class ArgumentError(BatchlabError, TypeError):
    """A public function was given the wrong kind of object (a dict for a TrainConfig, ``ds.train``
    for a Dataset); the message names what was expected."""


class DataError(BatchlabError):
    """A dataset cannot be loaded or is malformed (unknown name, unreadable file, NaN features)."""


class ModelError(BatchlabError):
    """A model cannot be built for the dataset (unknown name, bad options, wrong input shape)."""


class StoreError(BatchlabError):
    """The run store cannot be opened or does not hold what was asked for."""


def first_line(error: BaseException) -> str:
    """The first line of what an error said; the type's name where it said nothing."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def error_line(error: BaseException) -> str:
    """Any error as one line for a run's message or a warning: ``RuntimeError: what it said``
    (its first line; the type's name alone where it said nothing)."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
