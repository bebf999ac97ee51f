"""The store's codec: numbers and JSON, one way for the store, ``--json`` and every export."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchlab.store.codec import NotANumber, decode_row, dumps, encode_row, json_ready, normalized, number, plain, records

finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
row_values = st.one_of(finite_or_not, st.integers(min_value=-(2**53), max_value=2**53), st.booleans())


def _refuse(token: str):
    raise AssertionError(f"non-standard JSON token {token}")


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and type(a) is type(b))


@given(st.dictionaries(st.text(min_size=1, max_size=8), row_values, max_size=6), st.integers(0, 10**9))
def test_a_row_comes_back_equal(row, step):
    row = {**row, "step": step}
    at, text = encode_row(row, "step")
    json.loads(text, parse_constant=_refuse)  # strict JSON: no NaN/Infinity tokens (a column may be named "NaN")
    assert at == step
    back = decode_row(text)
    assert back.keys() == row.keys()
    for name, value in row.items():
        expected = int(value) if isinstance(value, bool) else value
        assert same_number(back[name], expected), (name, value, back[name])


def test_scalars_of_numpy_and_torch_are_numbers_and_ints_stay_ints():
    assert number("x", np.int64(3)) == 3 and type(number("x", np.int64(3))) is int
    assert type(number("x", np.float32(0.5))) is float and number("x", torch.tensor(0.25)) == 0.25
    assert number("x", True) == 1 and math.isnan(number("x", None))
    assert plain(np.int64(7)) == 7 and type(plain(np.int64(7))) is int and plain("s") == "s"
    for bad in ("text", [1, 2], torch.ones(2)):
        with pytest.raises(NotANumber, match="'x' holds"):
            number("x", bad)
    with pytest.raises(NotANumber, match="whole-number 'step'"):
        encode_row({"step": 1.5}, "step")


def test_json_has_no_nan_and_keeps_integers():
    value = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "i": np.int64(4), "f": np.float64(0.5),
             "t": torch.tensor([1, 2]), "na": pd.NA, 3: (1, 2), "obj": object}  # fmt: skip
    text = dumps(value)
    assert json.loads(text) == {"nan": None, "inf": "Infinity", "ninf": "-Infinity", "i": 4, "f": 0.5, "t": [1, 2],
                                "na": None, "3": [1, 2], "obj": str(object)}  # fmt: skip
    assert '"i": 4,' in text  # an integer, not 4.0
    assert normalized({"a": math.nan, "b": (1,)}) == {"a": None, "b": [1]} == json_ready({"a": math.nan, "b": (1,)})


def test_records_keep_integers_where_values_are_missing():
    table = pd.DataFrame({"id": pd.array([1, None], dtype="Int64"), "x": [0.5, math.nan], "n": [1, 2]})
    assert records(table) == [{"id": 1, "x": 0.5, "n": 1}, {"id": None, "x": None, "n": 2}]
    assert all(type(r["n"]) is int for r in records(table)) and type(records(table)[0]["id"]) is int
