"""orjson writes the audit rows' JSON texts only where its bytes are the json module's.

The flow state, the metadata and header columns are hashed into the chain and exported as
stored: written faster, they must be the very same bytes. orjson differs from the json
module in three ways these tests pin down: floats 1e-05 .. 1e-09 (its "0.00001", "1e-7"
for "1e-05", "1e-07"), NaN and infinities (null), and objects it writes natively that the
json module refuses (UUID, datetime, enum, dataclass). `_gate` (marshal's view of the data)
and `_odd_float` (orjson's text) must send every such value the json module's way.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import marshal
import math
import random
import struct
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from addons.recording import store

SECRET = "sk-live-EXACTJSON-0000000000000000000"


def _floats() -> list[float]:
    rnd = random.Random(16)
    out = [1e-05, 1e-07, 9.99e-05, 1e-09, 9.999999e-10, 1e-10, 1e-04, 1.2345e-06, 5e-324,
           2.2250738585072014e-308, 1e16, 1e22, 1796212223.612595, -0.0, 0.0, 0.1, 1e300]
    out += [struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
            for _ in range(20000)]
    out += [rnd.uniform(1, 10) * 10.0 ** e * rnd.choice((1, -1))
            for e in range(-320, 300) for _ in range(20)]
    out += [rnd.uniform(0, 2e-4) for _ in range(20000)]
    return [x for x in out if math.isfinite(x)]


def test_odd_float_finds_every_float_orjson_spells_otherwise() -> None:
    differ = agree = 0
    for x in _floats():
        for doc in (x, [x], {"a": [1, x, "3e-7c"]}, {"b": x, "c": "0.00001"}, [x, x]):
            ours = orjson.dumps(doc)
            if ours != json.dumps(doc, separators=(",", ":")).encode():
                differ += 1
                assert store._odd_float(ours), ours
            else:
                agree += 1
                if not any(isinstance(v, str) for v in (doc.values() if isinstance(
                        doc, dict) else [])):
                    assert not store._odd_float(ours), ours
    assert differ > 1000 and agree > 1000  # both kinds were there to find


@pytest.mark.parametrize("bad", [math.nan, -math.nan, math.inf, -math.inf,
                                 struct.unpack("<d", b"\x01\x02\x03\x04\x05\x06\xf8\x7f")[0]])
def test_gate_refuses_nan_and_infinity_anywhere(bad: float) -> None:
    for doc in ({"a": [bad, "x"]}, {"a": bad, "b": bad}, [1796212223.5, {"t": (bad,)}]):
        assert not store._gate(marshal.dumps(doc))
    assert store._gate(marshal.dumps({"t": [1796212223.612595, 1e-7, -0.0, "\x7f\xff"]}))


class _Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class _Point:
    x: int


class _Text(str):
    pass


@pytest.mark.parametrize("obj", [uuid.UUID(int=7), datetime.datetime(2026, 12, 2),
                                 _Color.RED, _Point(1), _Text("x")])
def test_gate_refuses_what_orjson_writes_and_json_refuses(obj: Any) -> None:
    """orjson writes these natively (or as their base type); the json module calls
    `default` (dump_state's raises). marshal takes none of them: the gate is closed."""
    with pytest.raises(ValueError):
        marshal.dumps({"m": obj})
    assert not store._gate(None)


_text = st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=4) | st.sampled_from(
    ["\x00", "\x1f", "\x7f", "\u2028", '"', "\\", "\udc80", SECRET, "e-7", "0.0000"]),
    max_size=4).map("".join)
_leaf = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
         | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
             [1e-05, 3.5e-07, 4.05e-05, 1e-10, 1796212223.5]) | _text
         | st.binary(max_size=8) | st.just(SECRET.encode()))
_data = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
                     | st.dictionaries(_text, kids, max_size=4), max_leaves=20)


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the same failure either way
        return type(e)


@settings(max_examples=400, deadline=None)
@given(_data, st.sampled_from([(), (SECRET,), (SECRET, 'odd"se\\cret\u00e9 x')]))
@example({"k": f"a {SECRET} b"}, (SECRET,))  # a secret's text: dump_state would change it
@example({"a": 12345678}, ("12345678}}",))  # ... across the end of the metadata
@example({"x": 1e-05, "y": [math.nan]}, ())
@example({"$h": [["a", "b"]]}, ())  # what the state reader turns into header pairs
@example({"$h": "not pairs"}, ())  # ... and cannot
@example({"$h": [[1, 2]]}, ())
def test_fast_texts_are_the_json_modules(doc: Any, secrets: tuple[str, ...]) -> None:
    """Whatever the data: dump_state through the gate writes what the json module writes
    (or fails alike); _exact_json is cjson's text or None; the metadata shortcut answers as
    the reference comparison (serialise, parse, compare) does."""
    scrub = store.scrubber(secrets)
    try:
        packed = marshal.dumps(doc)
    except ValueError:
        packed = None
    gate = store._gate(packed)
    state = {"metadata": doc, "request": {"content": b"x", "headers": ((b"a", b"b"),)}}
    assert _outcome(lambda: store.dump_state(state, scrub, gate)) == \
        _outcome(lambda: store.dump_state(state, scrub))
    if gate:
        for sort in (True, False):
            fast = store._exact_json(doc, sort=sort)
            if fast is not None:
                assert fast == json.dumps(doc, sort_keys=sort, separators=(",", ":"),
                                          ensure_ascii=False)
    if isinstance(doc, dict) and doc:
        column = _outcome(lambda: store.cjson(doc))
        if isinstance(column, str):
            text = None
            if gate:
                try:
                    text = orjson.dumps(doc)
                except TypeError:
                    text = None
            def reference() -> bool:
                try:
                    back = store.load_state(store.dump_state({"m": doc}, scrub))["m"]
                    return bool(back == json.loads(column, object_hook=store._state_hook))
                except (TypeError, ValueError):
                    return False

            assert _outcome(lambda: store._same_metadata(doc, column, scrub, doc, text)) \
                == _outcome(reference)


def test_headers_json_is_cjsons_text_for_every_byte() -> None:
    pairs = [(bytes([b]), bytes([b]) + "é\u2028".encode()) for b in range(256)]
    pairs.append((b"x", b"\xff\xfe\x80"))
    assert store._headers_json(pairs) == store.cjson(
        [[k.decode("latin-1"), v.decode("utf-8", "replace")] for k, v in pairs])


def _reference_bytes(secrets: list[str], b: bytes) -> bytes:
    """Scrubber.bytes without the shortcut: every occurrence of every secret (each start
    position tried) replaced; occurrences that overlap become one marker, adjacent ones
    stay two."""
    spans = sorted((i, i + len(v)) for v in {s.encode() for s in secrets
                                            if len(s) >= store.MIN_SECRET_LEN}
                   for i in range(len(b)) if b.startswith(v, i))
    runs: list[list[int]] = []
    for x, y in spans:
        if runs and x < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], y)
        else:
            runs.append([x, y])
    out, pos = b"", 0
    for x, y in runs:
        out += b[pos:x] + store.REDACTED.encode()
        pos = y
    return out + b[pos:]


_piece = st.sampled_from(["sk-abcdefgh", "Bearer ", "[REDACTED]", "xyz", "abcdefgh", "\u00e9"])
_secret = st.lists(_piece, min_size=1, max_size=3).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(_secret, max_size=4, unique=True), st.lists(_piece | st.text(max_size=3),
                                                          max_size=8).map("".join))
def test_scrubber_shortcut_replaces_as_every_secret_looked_for(secrets: list[str],
                                                               text: str) -> None:
    """Only the secrets that hold no other one are looked for first: a value without them
    holds none (every secret holds one); with one there, every secret is, as before. Same
    for header blocks looked at whole first."""
    scrub = store.Scrubber(secrets)
    raw = text.encode()
    assert scrub.bytes(raw) == _reference_bytes(secrets, raw)
    assert scrub.str(text) == _reference_bytes(secrets, raw).decode()
    assert scrub.found_in(raw) == any(len(s) >= store.MIN_SECRET_LEN and s.encode() in raw
                                      for s in secrets)
    pairs = [(b"x-b", b"plain"), (b"x-a", raw), (b"Authorization", raw), (b"x-c", raw[:5])]
    assert store.redact_header_pairs(pairs, store.REDACT_HEADERS, scrub) == tuple(
        (k, store.REDACTED.encode() if k.lower() == b"authorization"
         else _reference_bytes(secrets, v)) for k, v in pairs)
