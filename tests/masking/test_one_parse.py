"""One JSON parse per body: masking reads the flow's shared parse (addons/frame/decode.py,
the one policy, sessions and approval read) and never changes it (copy on write); the
masked bytes are the same as with masking's own parse, byte for byte. One serialisation,
on the fast encoder when its output is the same text.

Also: a key masked together with its value (or something under it) leaves neither
original in the body (the value used to be written back under the original key)."""

from __future__ import annotations

import codecs
import copy
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from addons.frame import decode
from addons.masking import bodies
from addons.masking.addon import mask_message, mask_response
from addons.masking.bodies import Masked, MessageCaches, _dump, shared_json
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

MASKER = Masker(DetectorSet(), b"k")
LIMIT = 16 << 20
EMAILS = [f"user{i}.name@example.com" for i in range(8)]


def ctx(dialect: str = "openai", cache: bool = False) -> Masked:
    session = Session()
    caches = MessageCaches()
    return Masked(MASKER, session, {}, restorable=True, dialect=dialect,
                  cache=caches.get("s", session, MASKER) if cache else None)


def flow_with(body: bytes, ctype: str = "application/json"):
    f = tflow.tflow(resp=True)
    for msg in (f.request, f.response):
        msg.headers["content-type"] = ctype
        msg.raw_content = body
    return f


# ---------------------------------------------------------------- keys and values
LEAKY = [
    {"alice@example.com": "bob@example.com"},
    {"x": {"carol@example.com": {"d": "dave@example.com"}}},
    {"erin@example.com": json.dumps({"frank@example.com": "gina@example.com"})},
    {"hank@example.com": [{"text": "ivan@example.com"}, {"text": "x"}]},
    {"judy@example.com": [4111, 1111, 1111, 1111]},
    {"messages": [{"role": "user", "content": "hi",
                   "kate@example.com": {"leo@example.com": "mia@example.com"}}]},
]


@pytest.mark.parametrize("doc", LEAKY)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_a_masked_key_and_its_value_leave_no_original(doc, shared, cache):
    raw = json.dumps(doc).encode()
    f = flow_with(raw)
    out = mask_message(ctx(cache=cache), raw, "", "application/json", LIMIT, False,
                       flow=f if shared else None)
    assert out is not None
    for v in ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan",
              "judy", "kate", "leo", "mia", "4111"):
        assert v not in out.decode(), (v, out)
    assert json.loads(out)  # still one valid document


# ---------------------------------------------------------------- the shared parse
SHAPES = [
    {"model": "m", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]},
    {"model": "m", "temperature": 0.7, "n": 4111111111111111.0, "x": 1.50e0,
     "messages": [{"role": "system", "content": "s"},
                  {"role": "user", "content": [{"type": "text", "text": "call 555-01"},
                                               {"type": "text", "text": "23-4567 "}]},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "c1", "type": "function", "function": {
                          "name": "f", "arguments": json.dumps(
                              {"q": "tom@example.com", "ssn": "078-05-1123"})}}]}],
     "user": "zed@example.com"},
    {"choices": [{"message": {"content": "ok anna.meyer@example.com"},
                  "logprobs": {"content": [{"token": "a"}]}}],
     "ids": [4111, 1111, 1111, 1111], "anna.meyer@example.com": {"k": "v"}},
    [{"text": "4111 1111"}, {"text": " 1111 1111"}, "x", {"nested": ["+1 415 555 0134"]}],
]


@pytest.mark.parametrize("doc", SHAPES)
@pytest.mark.parametrize("dialect", ["openai", "generic"])
@pytest.mark.parametrize("cache", [False, True])
def test_the_shared_parse_is_read_once_and_never_changed(doc, dialect, cache, monkeypatch):
    raw = json.dumps(doc).encode()
    f = flow_with(raw)
    shared = decode.request_body(f).json  # what policy read
    before = copy.deepcopy(shared)
    parses: list[int] = []
    real = bodies.loads

    def counting(data):
        parses.append(len(data))
        return real(data)
    monkeypatch.setattr(bodies, "loads", counting)
    got = mask_message(ctx(dialect, cache), raw, "", "application/json", LIMIT, False, flow=f)
    top = [n for n in parses if n == len(raw)]
    assert top == []  # the body itself was not parsed again
    assert shared == before and json.dumps(shared) == json.dumps(before)
    assert decode.request_body(f).json is shared
    monkeypatch.setattr(bodies, "loads", real)
    own = mask_message(ctx(dialect, cache), raw, "", "application/json", LIMIT, False)
    assert got == own  # byte for byte the masking of its own parse
    assert got is not None and b"@example.com" not in got


def test_a_response_and_its_restore_read_the_shared_parse():
    raw = json.dumps(SHAPES[2]).encode()
    f = flow_with(raw)
    shared = decode.response_body(f).json
    before = copy.deepcopy(shared)
    c = ctx()
    new, masked = mask_response(c, raw, "", "application/json", LIMIT, False, True, flow=f)
    assert shared == before
    c2 = Masked(MASKER, c.session, {}, restorable=True, dialect="openai")
    assert (new, masked) == mask_response(c2, raw, "", "application/json", LIMIT, False, True)


def test_policy_reads_numbers_as_it_did():
    doc = decode.loads_strict('{"t": 0.7, "m": 1e3, "n": 12, "x": 4111111111111111.0}')
    assert doc == {"t": 0.7, "m": 1000.0, "n": 12, "x": 4111111111111111.0}
    assert isinstance(doc["t"], float) and doc["t"].text == "0.7" and doc["m"].text == "1e3"
    assert json.dumps(doc) == '{"t": 0.7, "m": 1000.0, "n": 12, "x": 4111111111111111.0}'
    assert repr(doc["t"]) == "0.7" and f"{doc['m']}" == "1000.0"
    assert copy.deepcopy(doc)["x"].text == "4111111111111111.0"


# ---------------------------------------------------------------- charsets agree or not
DOC = {"a": "jane.doe@example.com \u00e9\u4e2d"}


@pytest.mark.parametrize("data,ctype,shared", [
    (json.dumps(DOC, ensure_ascii=False).encode(), "application/json", True),
    (codecs.BOM_UTF8 + json.dumps(DOC).encode(), "application/json", True),
    (codecs.BOM_UTF16_LE + json.dumps(DOC).encode("utf-16-le"), "application/json", True),
    (json.dumps(DOC).encode("utf-16-be"), "application/json", True),
    (json.dumps(DOC).encode("utf-32-le"), "application/json", True),
    # a declared charset of a non-JSON type: the decoder reads Latin-1, json.loads UTF-8
    (json.dumps(DOC, ensure_ascii=False).encode("latin-1", "replace"),
     "text/plain; charset=latin-1", False),
    # a lone surrogate encoded: not valid UTF-8 for the decoder, json.loads passes it
    (b'{"a": "jane.doe@example.com \xed\xa0\x80"}', "application/json", False),
])
def test_the_shared_parse_is_used_only_where_both_read_the_same_text(data, ctype, shared):
    f = flow_with(data, ctype)
    body = decode.request_body(f)
    assert (shared_json(body) is not None) is shared
    out = mask_message(ctx(), data, "", ctype, LIMIT, True, flow=f)
    assert out == mask_message(ctx(), data, "", ctype, LIMIT, True)
    assert out is not None and b"jane.doe" not in out


# ---------------------------------------------------------------- one fast serialisation
json_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                  blacklist_categories=()), max_size=12) | st.sampled_from(
    ["\\u0041", "\x7f", "\x00", "\u2028", "\ud800", "\udfff x", '"\\', "é", "\U0001f600"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(json_text, kids, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_the_fast_serialisation_is_the_same_text(value):
    fast, slow = _dump(value, True), _dump(value, False)
    assert fast == slow
    # and slow is what masking always wrote: non-ASCII as is, unless it is not UTF-8
    try:
        want = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        want.encode("utf-8")
    except UnicodeEncodeError:
        want = json.dumps(value, separators=(",", ":"))
    assert slow == want


def test_escapes_and_non_ascii_bodies_are_forwarded_as_before():
    rng = random.Random(3)
    for body in [
        '{"a":"\\u00e9 jane.doe@example.com","b":"\\ud800"}',
        '{"a":"é jane.doe@example.com \\u007f \u007f","b":"\\\\u0041"}',
        '{"a":"plain jane.doe@example.com","b":"tab\\t\\"q\\" \\u001f"}',
        json.dumps({"a": "".join(rng.choice("ab\u00e9\x7f\\\"\n") for _ in range(200))
                    + " jane.doe@example.com"}),
    ]:
        raw = body.encode("utf-8", "surrogatepass")
        out = ctx().body(raw, "application/json")
        assert out is not None and b"jane.doe" not in out
        obj = json.loads(raw.decode("utf-8", "surrogatepass"))
        obj["a"] = obj["a"].replace("jane.doe@example.com", "[EMAIL_1]")
        assert out == _dump(obj, False).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- clean URL paths
def test_a_clean_url_path_is_remembered_and_a_path_with_a_value_never():
    masker = Masker(DetectorSet(), b"k")
    clean = "/v1/chat/completions"
    dirty = "/v1/users/jane.doe@example.com/orders/4111/1111/1111/1111"
    for _ in range(3):
        found: dict = {}
        c = Masked(masker, Session(), found, restorable=True)
        assert c.url_path(clean) is None
        out = c.url_path(dirty)
        assert out is not None and "jane.doe" not in out and "4111" not in out
        assert found["EMAIL"]["count"] == 1 and found["CREDIT_CARD"]["count"] == 1
    assert clean in masker.clean_paths and dirty not in masker.clean_paths
    # a restoring or detection-free pass neither reads nor fills it
    masker.clean_paths.clear()
    Masked(masker, Session(), {}, restore=True).url_path(clean)
    assert masker.clean_paths == {}


# ---------------------------------------------------------------- cache hits replayed
def test_a_hit_is_replayed_in_one_step_only_where_each_call_would_change_nothing():
    s = Session()
    assert s.replays([], True)
    ph = s.placeholder("EMAIL", "ann@example.com", True)
    assert s.replays([("EMAIL", "ann@example.com", ph)], True)
    assert not s.replays([("EMAIL", "ann@example.com", "[EMAIL_9]")], True)
    assert not s.replays([("EMAIL", "bob@example.com", ph)], False)
    # the same value in another spelling: same placeholder, restore now gives that
    # spelling, so the cached spelling must go through placeholder() again (as a miss)
    assert s.placeholder("EMAIL", "ANN@example.com", True) == ph
    assert not s.replays([("EMAIL", "ann@example.com", ph)], True)
    assert s.replays([("EMAIL", "ann@example.com", ph)], False)
