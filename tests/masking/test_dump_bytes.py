"""The masked JSON body is written by orjson when it gives the bytes the json module gives
(bodies._dump_bytes): the same bytes on generated documents, and the json module wherever
orjson would write something else (plain floats, lone surrogates, big integers, depth)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.frame.decode import JsonFloat
from addons.masking import bodies
from addons.masking.bodies import Masked, _dump, _dump_bytes
from addons.masking.config import MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

pytestmark = pytest.mark.skipif(bodies._orjson is None, reason="orjson is not installed")

# every character class that an encoder treats differently: control characters, quote,
# backslash, DEL, C1, the line/paragraph separators, BOM, astral, lone surrogates
_CHARS = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x7F),
    st.sampled_from("\x7f\x85\u2028\u2029\ufeff\u00e9\u4e2d\U0001f600\ud800\udfff\\\"/"),
    st.characters(),
)
_TEXT = st.text(_CHARS, max_size=40)
_FLOAT_TEXT = st.one_of(
    # (1e999 is refused at parse: decode.NumberOutOfRange)
    st.sampled_from(["1.5", "1.50", "1e-05", "1E5", "-0.0", "0.1", "1e308",
                     "-1.7976931348623157e308",
                     "123456789012345678.0", "4111111111111111.0", "5e-324", "1e16"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), _TEXT,
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    _FLOAT_TEXT.map(JsonFloat),
)
_DOCS = st.recursive(
    _SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=5),
                           st.dictionaries(_TEXT, kids, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCS)
def test_same_bytes_as_json(doc: object) -> None:
    want = _dump(doc).encode()
    assert _dump_bytes(doc, False) == want
    assert _dump_bytes(doc, False, True) == want
    assert _dump_bytes(doc, True) == want


@settings(max_examples=500, deadline=None)
@given(st.lists(st.floats(), min_size=1, max_size=4))
def test_plain_floats_flagged_go_to_json(values: list[float]) -> None:
    # orjson writes NaN as null and 1e-05 as 0.00001: with the flag, json writes them
    doc = {"v": values}
    assert _dump_bytes(doc, True) == _dump(doc).encode()


def test_orjson_is_what_writes_an_ordinary_body() -> None:
    doc = {"model": "m", "temperature": JsonFloat("0.70"), "messages": [
        {"role": "user", "content": "caf\u00e9 \u2028 \x01 \"q\" \\ " * 3}]}
    out = _dump_bytes(doc, False)
    assert out == bodies._orjson.dumps(doc, default=bodies._orjson_default)
    assert out == _dump(doc).encode()
    assert b'"temperature":0.7,' in out


def _masked(body: bytes) -> bytes | None:
    masker = Masker(DetectorSet(MaskingConfig(), fast=True), b"k")
    return Masked(masker, Session(), {}, dialect="openai").body(body, "application/json")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_walked_constants_keep_their_spelling(constant: str) -> None:
    """json.loads reads NaN / Infinity as plain floats: the walk flags them, so the masked
    body says NaN, not orjson's null (a changed value the upstream would act on)."""
    body = ('{"model": "m", "x": C, "y": [1e-05, C], "messages": [{"role": "user", '
            '"content": "mail jane.doe@example.com"}]}').replace("C", constant).encode()
    out = _masked(body)
    assert out is not None and b"jane.doe" not in out
    assert (b'"x":%s,' % constant.encode()) in out
    assert (b'"y":[1e-05,%s]' % constant.encode()) in out
    doc = bodies.loads(body)
    doc["messages"][0]["content"] = json.loads(out)["messages"][0]["content"]
    assert out == _dump(doc).encode()


def test_body_with_big_integer_and_surrogate_falls_back() -> None:
    body = (b'{"model": "m", "n": 123456789012345678901234567890, "s": "\\ud800", '
            b'"messages": [{"role": "user", "content": "call +1 415 555 0132"}]}')
    out = _masked(body)
    assert out is not None and b"415 555" not in out
    assert b'"n":123456789012345678901234567890' in out
    assert b'"s":"\\ud800"' in out  # escaped: not valid UTF-8 as it is
