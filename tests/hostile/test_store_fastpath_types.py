"""Hostile: values the audit store's orjson fast paths meet (store._canonical, the chain's
hashed form, and _batch_json, the batch DuckDB parses) give the json module's bytes and
values. A float subclass (numpy.float64 is one) made _orjson_same itself raise TypeError
(orjson refuses subclasses of float) where the json module writes the value; now it takes
the json module's way. The writer process only gets marshal's exact types, so this guards
every other caller of the store's row build."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest

from addons.recording import store


class Sub(float):
    def __repr__(self) -> str:  # what the json module does not use either
        return "1.5"


class StrSub(str):
    def __str__(self) -> str:
        return "other"


class IntE(enum.IntEnum):
    A = 7


VALUES: list[Any] = [Sub(2.0), StrSub("ann\u2028"), IntE.A, 1e16, -0.0, 5e-324, 1e-07,
                     2**63, 2**70, -(2**63) - 1, ["a", StrSub("b")], [2**70], True,
                     "é\x00\x1f\x7f", [1e-07]]


def _reference(row: dict[str, Any]) -> bytes:
    out = {c: row.get(c) for c in sorted(store.HASHED_COLUMNS)}
    for c in store.OPTIONAL_HASHED:
        if out[c] is None:
            del out[c]
    return json.dumps(out, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_fast_paths_write_what_the_json_module_writes(value: Any) -> None:
    row = {c: None for c in store.HASHED_COLUMNS}
    row["metadata"] = value
    assert "metadata" in store.HASHED_COLUMNS
    assert store._canonical(row)[0] == _reference(row)
    doc = [{"metadata": value, "seq": 1}]
    assert json.loads(store._batch_json(doc)) == json.loads(
        json.dumps(doc, allow_nan=False))
