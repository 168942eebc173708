"""decode.loads_strict with its one prebuilt decoder answers as json.loads with the same
hooks did: the same value (JsonFloat text kept), or a DecodeError where json.loads raised
(duplicate keys, a BOM, invalid JSON, numbers out of range), on generated documents."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.frame import decode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=4),
    max_leaves=12)


def _reference(text: str) -> tuple[str, object]:
    try:
        return "ok", json.loads(text, object_pairs_hook=decode._no_duplicates,
                                parse_float=decode.JsonFloat)
    except (ValueError, RecursionError):
        return "error", None


def _ours(text: str) -> tuple[str, object]:
    try:
        return "ok", decode.loads_strict(text)
    except decode.DecodeError:
        return "error", None


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                   default=str) and \
        repr(a) == repr(b)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(json_values, st.sampled_from(["", " ", "\ufeff", "\n"]), st.sampled_from(["", " ", "x"]))
def test_loads_strict_is_json_loads_with_its_hooks(value, head, tail):
    text = head + json.dumps(value) + tail
    ref, ours = _reference(text), _ours(text)
    assert ref[0] == ours[0]
    assert _same(ref[1], ours[1])


@pytest.mark.parametrize("text", ['{"a": 1, "a": 2}', "\ufeff{}", "[1e400]", "{", "",
                                  '{"a": 1.50}', '[0.1, -0.0, 1E5]', '"\\ud800"'])
def test_crafted(text):
    ref, ours = _reference(text), _ours(text)
    assert ref[0] == ours[0] and _same(ref[1], ours[1])
