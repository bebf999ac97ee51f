"""Argument checks at the public entry points: the wrong kind of object is one line, not an
AttributeError from deep inside training.

``bl.fit(model, ds.train, cfg)`` or ``bl.fit(model, ds, {"batch_size": 32})`` used to fail far
from the mistake (``'tuple' object has no attribute 'to'``). Each public function checks its
arguments' kinds first, with `check_argument` and `check_items`, and names what it expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from .errors import ArgumentError

# What each expected kind is, in words, and how to get one. Keyed by class name, so that this
# module imports nothing heavier than errors.py.
_DESCRIPTIONS = {
    "Module": "a torch.nn.Module (build one with bl.build_model(name, dataset))",
    "Dataset": "a batchlab Dataset (bl.load_dataset(...) or bl.from_arrays(X, y)); pass the dataset itself, "
               "not one of its splits such as ds.train",
    "TrainConfig": "a bl.TrainConfig (for a dict of values, write bl.TrainConfig(**values))",
    "StudyConfig": "a bl.StudyConfig (for a dict of values, write bl.StudyConfig(**values))",
    "Callback": "a bl.Callback (subclass it and override on_step_end, on_epoch_end, ...)",
    "Callable": "a function",
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "True or False",
    "NoneType": "None",
    "dtype": "a torch floating dtype such as torch.float32",
}


def _describe(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_DESCRIPTIONS.get(kind.__name__, kind.__name__) for kind in kinds)


def _kind_of(value: Any) -> str:
    """The given value's type, with a hint at its shape for the containers people mix up."""
    name = type(value).__name__
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(item).__name__ for item in value[:3])
        return f"a {name} ({inner}{', ...' if len(value) > 3 else ''})"
    return f"a {name}"


def _is(value: Any, expected: type | tuple[type, ...]) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:  # True is an int to Python, not to a user
        return False
    return isinstance(value, expected)


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is a whole number as a user means it: a Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """Whether ``value`` is a count: a whole number (`is_whole_number`) of at least 1."""
    return is_whole_number(value) and value >= 1


def check_argument(function: str, name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    """Raise one line unless ``value`` is an instance of ``expected``.

    Args:
        function: the public function, as the user called it (``fit``).
        name: the argument's name.
        value: what was given.
        expected: the accepted class or classes (``type(None)`` for an optional argument).

    Raises:
        ArgumentError: ``fit: config must be a bl.TrainConfig (...), got a dict``.
    """
    if not _is(value, expected):
        raise ArgumentError(f"{function}: {name} must be {_describe(expected)}, got {_kind_of(value)}")


def check_items(function: str, name: str, values: Any, expected: type | tuple[type, ...]) -> list[Any]:
    """Check that ``values`` is a list (or other iterable, not a string) of ``expected`` instances.

    Args:
        function, name, expected: as in `check_argument`.
        values: what was given.

    Returns:
        The items as a list.

    Raises:
        ArgumentError: naming the first wrong item and its position.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or _is(values, expected):
        raise ArgumentError(f"{function}: {name} must be a list of {_describe(expected)}, got {_kind_of(values)}")
    items = list(values)
    for index, item in enumerate(items):
        if not _is(item, expected):
            raise ArgumentError(f"{function}: {name}[{index}] must be {_describe(expected)}, got {_kind_of(item)}")
    return items


def check_arguments(function: str, **arguments: tuple[Any, type | tuple[type, ...]]) -> None:
    """`check_argument` for several arguments at once: ``check_arguments("fit", model=(model, nn.Module))``.

    Args:
        function: the public function, as the user called it.
        **arguments: argument name -> (value given, accepted class or classes).

    Raises:
        ArgumentError: for the first argument of the wrong kind.
    """
    for name, (value, expected) in arguments.items():
        check_argument(function, name, value, expected)
