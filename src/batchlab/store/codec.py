"""The one codec between batchlab's numbers and JSON: for the store, ``--json`` output and exports.

JSON has no NaN or infinity. Everywhere batchlab writes JSON, NaN becomes ``null`` and ±inf the
strings ``"Infinity"``/``"-Infinity"``; numpy and torch scalars become Python numbers (integers
stay integers); pandas' missing values become ``null``. Row values read back turn ``null`` into
NaN and the infinity strings into floats, so a stored row equals the row that was written.

What is read back from a store is checked as it is decoded: a store file may come from anyone, so
text that is not JSON, a mapping that is not an object, or a row value that is not a number is a
`Malformed` error of one line, never a traceback and never a silently different number.

Example::

    dumps({"lr": float("nan"), "step": np.int64(3)})   # '{"lr": null, "step": 3}'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..errors import first_line

INFINITY, MINUS_INFINITY = "Infinity", "-Infinity"


class NotANumber(ValueError):
    """A row value that is not a number (the store's rows hold numbers only)."""


class Malformed(ValueError):
    """A stored value that batchlab cannot have written: not JSON, or JSON of the wrong shape."""


# The whole numbers SQLite holds; a row value beyond them was not written by batchlab.
_INT64 = (-(2**63), 2**63 - 1)


def plain(value: Any) -> Any:
    """A numpy or torch scalar as the Python number it holds; anything else as is."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def number(name: str, value: Any) -> float | int:
    """One row value as a Python number: bool -> int, None -> NaN, numpy/torch scalars unwrapped.

    Args:
        name: the column, for the error message.
        value: the value.

    Returns:
        An int or a float.

    Raises:
        NotANumber: for anything else (a string, a list, a tensor with several elements).
    """
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    unwrapped = plain(value)
    if unwrapped is not value:
        return number(name, unwrapped)
    raise NotANumber(f"column {name!r} holds {type(value).__name__}, not a number")


def json_ready(value: Any) -> Any:
    """Plain JSON values: NaN -> None, ±inf -> "Infinity"/"-Infinity", scalars and arrays unwrapped.

    Mappings and sequences are converted item by item (keys become strings); pandas' missing
    values (``pd.NA``, ``NaT``) become None; anything else unknown becomes its ``str``.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return INFINITY if value > 0 else MINUS_INFINITY
        return value
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    if value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return json_ready(value.item())
    if hasattr(value, "tolist"):  # arrays, tensors
        return json_ready(value.tolist())
    return str(value)


def dumps(value: Any, indent: int | None = None) -> str:
    """JSON text of any value, through `json_ready` (never the invalid tokens NaN/Infinity)."""
    return json.dumps(json_ready(value), indent=indent, allow_nan=False)


def loads(text: str | None) -> Any:
    """JSON text back to values (a stored NaN comes back as None); None for None.

    Raises:
        Malformed: ``text`` is not a string of valid JSON (too deeply nested counts as invalid).
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise Malformed(f"holds {type(text).__name__} data, not JSON text")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: "[[[[..." nested beyond the stack
        raise Malformed(f"is not valid JSON ({first_line(error)})") from None


def load_object(text: str | None) -> dict[str, Any]:
    """JSON text of a mapping (a config, spec, provenance or summary) back to a dict; {} for None.

    Raises:
        Malformed: not valid JSON, or valid JSON that is not an object.
    """
    value = loads(text)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"holds a JSON {_json_kind(value)}, not an object")
    return value


def normalized(value: Any) -> Any:
    """A value as it comes back from a JSON round trip, so fresh and stored values compare equal."""
    return json.loads(dumps(value))


def decode(value: Any) -> Any:
    """One row value read back: null -> NaN, "Infinity"/"-Infinity" -> ±inf.

    Raises:
        Malformed: anything else that is not a number (text, a list, a bool, an integer beyond 64 bits).
    """
    if value is None:
        return math.nan
    if value == INFINITY:
        return math.inf
    if value == MINUS_INFINITY:
        return -math.inf
    if type(value) is float or (type(value) is int and _INT64[0] <= value <= _INT64[1]):
        return value
    raise Malformed(f"holds {short_repr(value)}, not a number")


_ROW_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(**kw) builds one per call
_PLAIN_NUMBERS = (float, int)


def encode_row(row: Mapping[str, Any], key: str) -> tuple[int, str]:
    """(key value, compact JSON text) of one table row.

    Args:
        row: column name -> number (see `number`).
        key: the column that orders the table (``step`` or ``epoch``); it must hold a whole number.

    Raises:
        NotANumber: a value is not a number, or the key is missing or not whole.
    """
    if all(type(v) in _PLAIN_NUMBERS for v in row.values()):  # the common case, kept fast
        values = row
    else:
        values = {name: number(name, value) for name, value in row.items()}
    at = values.get(key)
    if at is None or not (math.isfinite(at) and at == int(at)):
        raise NotANumber(f"it has no whole-number {key!r} column (got {at!r})")
    text = _ROW_ENCODER.encode(values)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(json_ready(values), separators=(",", ":"), allow_nan=False)
    return int(at), text


def decode_row(text: str | None, key: str | None = None) -> dict[str, Any]:
    """JSON text of one row back to numbers: null is NaN, "Infinity" is inf.

    Args:
        text: the stored row; None is an empty row.
        key: the column the row must hold as a whole number (``step``, ``epoch``), if any.

    Raises:
        Malformed: not JSON, not an object, a value that is not a number, or no whole-number key.
    """
    if text is None:
        return {}
    row = load_object(text)
    try:
        row = {name: decode(value) for name, value in row.items()}
    except Malformed:
        raise Malformed(_bad_value(row)) from None
    if key is not None:
        _check_key(row, key)
    return row


def frame(rows: list[Any], key: str) -> pd.DataFrame:
    """Decoded rows as a table, key column first; null back to NaN and "Infinity" back to inf.

    Raises:
        Malformed: a row that is not an object, a value that is not a number, or a row without a
            whole-number ``key``.
    """
    if not rows:
        return pd.DataFrame({key: pd.Series(dtype="int64")})
    for row in rows:
        if type(row) is not dict:
            raise Malformed(f"holds a row that is a JSON {_json_kind(row)}, not an object")
    table = pd.DataFrame.from_records(rows)
    for column in table.columns:
        values = table[column]
        if pd.api.types.is_bool_dtype(values) or values.dtype == "uint64":  # true/false, ints beyond 64 bits
            raise Malformed(f"column {column!r} holds {short_repr(values.iloc[0])}, not a number")
        if not pd.api.types.is_numeric_dtype(values):  # held "Infinity", or nulls, or something wrong
            try:
                decoded = values.map(decode)
            except Malformed as error:
                raise Malformed(f"column {column!r} {error}") from None
            table[column] = pd.to_numeric(decoded).astype(float)
    if key not in table or table[key].isna().any() or not (table[key] % 1 == 0).all():
        raise Malformed(f"holds a row without a whole-number {key!r}")
    columns = [key, *(c for c in table.columns if c != key)]
    return table[columns].reset_index(drop=True)


def _check_key(row: Mapping[str, Any], key: str) -> None:
    at = row.get(key)
    if not isinstance(at, (int, float)) or not math.isfinite(at) or at != int(at):
        raise Malformed(f"has no whole-number {key!r} (got {short_repr(at)})")


def _bad_value(row: Mapping[str, Any]) -> str:
    """The message for the first value of a row that is not a number."""
    for name, value in row.items():
        try:
            decode(value)
        except Malformed as error:
            return f"column {name!r} {error}"
    return "holds a value that is not a number"


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def short_repr(value: Any, limit: int = 40) -> str:
    """A value for a one-line message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows as dicts of plain Python values: integers stay int, missing values become None.

    Whole-number columns with gaps (pandas ``Int64``) keep their integers; NaN in float columns
    becomes None, as in JSON.
    """
    return [{str(k): json_ready(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
