"""Placement: where masking applies inside request/response bodies (pure)."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from addons.frame.decode import parse_content_type
from addons.masking.bodies import Masked, TooLarge, Unparseable, decode_content
from addons.masking.masker import Masker, Session
from tests.masking.test_masker import FakeDetectors

CARD = "4111 1111 1111 1111"


def ctx(dialect: str = "openai", **kw) -> tuple[Masked, dict, FakeDetectors]:
    det = FakeDetectors()
    found: dict = {}
    return Masked(Masker(det), Session(), found, dialect=dialect, **kw), found, det


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_openai_chat_every_text_place() -> None:
    m, found, det = ctx()
    req = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Support for ann@example.com"},
            {"role": "user", "content": [{"type": "text", "text": "card " + CARD},
                                         {"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,"
                                                        + "QUFB" * 40}}]},
            {"role": "assistant", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "lookup",
                             "arguments": json.dumps({"email": "bob@example.com"})}}]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": json.dumps({"owner": "eve@example.com"})},
        ],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": "escalate to boss@example.com",
            "parameters": {"type": "object", "properties": {
                "email": {"type": "string", "description": "like x@example.com"}}}}}],
    }
    out = json.loads(m.body(body(req), "application/json"))
    text = json.dumps(out)
    for raw in ("ann@", "bob@", "eve@", "boss@", "x@example", "4111"):
        assert raw not in text, raw
    assert out["messages"][0]["content"] == "Support for [EMAIL_1]"
    assert out["messages"][1]["content"][0]["text"] == "card [CREDIT_CARD_1]"
    # tool-call arguments stay a JSON string holding JSON
    assert json.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"]) == \
        {"email": "[EMAIL_2]"}
    assert json.loads(out["messages"][3]["content"]) == {"owner": "[EMAIL_3]"}
    # structural fields and the image payload untouched
    assert out["model"] == "gpt-4o-mini" and out["messages"][3]["tool_call_id"] == "call_1"
    assert out["messages"][1]["content"][1] == req["messages"][1]["content"][1]
    assert found["EMAIL"]["count"] == 5 and found["CREDIT_CARD"]["count"] == 1
    # one detector pass for the whole body, one more across sibling boundaries
    assert det.calls <= 2


def test_anthropic_messages_system_tools_and_results() -> None:
    m, found, _ = ctx("anthropic")
    req = {
        "model": "claude-sonnet-4-5", "max_tokens": 100,
        "system": [{"type": "text", "text": "Operator: op@example.com"}],
        "messages": [
            {"role": "user", "content": "my ssn is 078-05-1120"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "crm",
                                               "input": {"q": "ann@example.com"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text",
                                                       "text": "found bob@example.com"}]}]},
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "QUFB" * 100}}]},
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "dan@example.com"}}]},
        ],
        "tools": [{"name": "crm", "description": "CRM of ceo@example.com",
                   "input_schema": {"type": "object"}}],
    }
    out = json.loads(m.body(body(req), ""))
    s = json.dumps(out)
    assert "op@" not in s and "078-05" not in s and "bob@" not in s and "ceo@" not in s
    assert out["messages"][1]["content"][0]["input"] == {"q": "[EMAIL_2]"}
    # base64 payloads are never rewritten; a "data" field that is not base64 is text
    assert out["messages"][3]["content"][0]["source"]["data"] == "QUFB" * 100
    assert out["messages"][4]["content"][0]["source"]["data"] == "[EMAIL_4]"


def test_value_split_across_consecutive_text_parts() -> None:
    m, found, _ = ctx()
    req = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "pay with 4111 1111"},
        {"type": "text", "text": " 1111 1111 thanks"},
    ]}]}
    out = json.loads(m.body(body(req), "application/json"))
    parts = [p["text"] for p in out["messages"][0]["content"]]
    assert parts == ["pay with [CREDIT_CARD_1]", " thanks"]
    assert found == {"CREDIT_CARD": {"count": 1, "strategy": "placeholder"}}


def test_separate_fields_are_not_glued() -> None:
    # fields of different containers are never joined
    m, found, _ = ctx("generic")
    out = m.body(body({"a": {"x": "4111 1111"}, "b": {"y": "1111 1111"}}), "application/json")
    assert out is None and found == {}


def test_adjacent_sibling_fields_are_joined() -> None:
    # a value split across adjacent fields of one object (or items of one array) is caught
    m, found, _ = ctx("generic")
    out = json.loads(m.body(body({"a": "pay 4111 1111", "b": " 1111 1111 ok"}),
                            "application/json"))
    assert out == {"a": "pay [CREDIT_CARD_1]", "b": " ok"}


def test_json_unicode_escapes_and_numbers_and_keys() -> None:
    m, found, _ = ctx("webhook")
    raw = b'{"note": "\\u0061nn@example.com", "card": 4111111111111111, ' \
          b'"bob@example.com": true, "n": 12}'
    out = json.loads(m.body(raw, "application/json"))
    assert out == {"note": "[EMAIL_1]", "card": "[CREDIT_CARD_1]", "[EMAIL_2]": True, "n": 12}


def test_unchanged_body_is_none() -> None:
    m, found, _ = ctx()
    assert m.body(body({"messages": [{"role": "user", "content": "hello"}]}),
                  "application/json") is None
    assert m.body(b"", "application/json") is None


def test_form_urlencoded_values_are_decoded_first() -> None:
    m, found, _ = ctx("webhook")
    # %34 = '4', '+' = space: the detector sees the decoded value
    raw = b"to=ann%40example.com&card=%34111+1111+1111+1111&n=1"
    out = m.body(raw, "application/x-www-form-urlencoded")
    assert out == b"to=%5BEMAIL_1%5D&card=%5BCREDIT_CARD_1%5D&n=1"


def test_form_value_holding_json() -> None:
    m, _, _ = ctx("webhook")
    raw = b"payload=" + json.dumps({"text": "ann@example.com"}).encode().replace(b" ", b"+")
    out = m.body(raw, "application/x-www-form-urlencoded; charset=utf-8")
    assert b"ann" not in out and b"EMAIL_1" in out


def test_multipart_text_and_json_parts() -> None:
    m, _, _ = ctx("webhook")
    b = "XyZ"
    raw = (f"--{b}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nann@example.com\r\n"
           f"--{b}\r\nContent-Disposition: form-data; name=\"j\"\r\nContent-Type: "
           f"application/json\r\n\r\n{{\"e\": \"\\u0062ob@example.com\"}}\r\n"
           f"--{b}--\r\n").encode()
    out = m.body(raw, f"multipart/form-data; boundary={b}")
    assert b"ann@" not in out and b"bob@" not in out
    assert out.count(b"--XyZ") == 3 and b"[EMAIL_1]" in out and b'"[EMAIL_2]"' in out


def test_multipart_binary_part_is_refused_unless_pass_text() -> None:
    m, _, _ = ctx("webhook")
    raw = (b"--B\r\nContent-Type: application/octet-stream\r\n\r\n\xff\x00 ann@example.com\r\n"
           b"--B--\r\n")
    with pytest.raises(Unparseable):
        m.body(raw, "multipart/form-data; boundary=B")
    out = m.body(raw, "multipart/form-data; boundary=B", pass_text=True)
    assert out == b"--B\r\nContent-Type: application/octet-stream\r\n\r\n\xff\x00 [EMAIL_1]" \
                  b"\r\n--B--\r\n"


def test_text_and_binary_bodies() -> None:
    m, _, _ = ctx("generic")
    assert m.body(b"mail ann@example.com", "text/plain") == b"mail [EMAIL_1]"
    with pytest.raises(Unparseable) as e:
        m.body(b"\xff\xfe\x00ann@example.com", "application/octet-stream")
    assert e.value.status == 415
    with pytest.raises(Unparseable) as e:
        m.body(b"{not json", "application/json")
    assert e.value.status == 400


def test_ndjson() -> None:
    m, _, _ = ctx("generic")
    out = m.body(b'{"a": "\\u0061nn@example.com"}\n{"b": 1}\n', "application/x-ndjson")
    assert out == b'{"a":"[EMAIL_1]"}\n{"b": 1}\n'


def test_response_restore_and_new_values_stay_masked() -> None:
    det = FakeDetectors()
    s = Session()
    req = Masked(Masker(det), s, {}, dialect="openai")
    req.body(body({"messages": [{"role": "user", "content": "I am ann@example.com"}]}),
             "application/json")
    found: dict = {}
    resp = Masked(req.masker, s, found, restorable=False, restore=True, dialect="openai")
    answer = {"choices": [{"message": {
        "content": "Hello [EMAIL_1], meet eve@example.com",
        "tool_calls": [{"function": {"name": "send",
                                     "arguments": json.dumps({"to": "[EMAIL_1]"})}}]}}]}
    out = json.loads(resp.body(body(answer), "application/json"))
    msg = out["choices"][0]["message"]
    assert msg["content"] == "Hello ann@example.com, meet [EMAIL_2]"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"to": "ann@example.com"}
    assert found == {"EMAIL": {"count": 1, "strategy": "placeholder"}}


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd", "gzip, br", "identity"])
def test_decode_content(enc: str) -> None:
    data = b'{"x": "ann@example.com"}' * 10
    raw = data
    for c in [c.strip() for c in enc.split(",")]:
        raw = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
               "zstd": zstandard.ZstdCompressor().compress,
               "identity": lambda b: b}[c](raw)
    assert decode_content(raw, enc, 1 << 20) == data


def test_decode_raw_deflate_and_bombs() -> None:
    data = b"a" * 100_000
    co = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_content(co.compress(data) + co.flush(), "deflate", 1 << 20) == data
    for enc, fn in (("gzip", gzip.compress), ("br", brotli.compress),
                    ("zstd", zstandard.ZstdCompressor().compress), ("deflate", zlib.compress)):
        with pytest.raises(TooLarge):
            decode_content(fn(data), enc, 10_000)
    with pytest.raises(Unparseable):
        decode_content(b"xx", "compress", 100)
    with pytest.raises(Unparseable):
        decode_content(b"not gzip", "gzip", 100)
    with pytest.raises(TooLarge):
        decode_content(b"x" * 101, "", 100)


def test_parse_content_type() -> None:
    assert parse_content_type('Multipart/Form-Data; boundary="a b"; charset=UTF-8') == \
        ("multipart/form-data", {"boundary": "a b", "charset": "UTF-8"})
    assert parse_content_type(None) == ("", {})


def test_deep_json_refused() -> None:
    m, _, _ = ctx("generic")
    deep = b"[" * 300 + b"]" * 300
    with pytest.raises(Unparseable):
        m.body(deep, "application/json")


def test_duplicate_keys_refused() -> None:
    """Parsers disagree on which duplicate wins: never forward one we did not check."""
    m, _, _ = ctx()
    raw = b'{"messages": [{"role": "user", "content": "4111 1111 1111 1111", "content": "hi"}]}'
    with pytest.raises(Unparseable) as e:
        m.body(raw, "application/json")
    assert e.value.status == 400
    nested = json.dumps({"a": '{"x": "ann@example.com", "x": 1}'}).encode()
    with pytest.raises(Unparseable):
        ctx("webhook")[0].body(nested, "application/json")


def test_float_numbers_checked_as_written() -> None:
    m, _, _ = ctx("webhook")
    out = m.body(b'{"card": 4111111111111111.0, "pi": 3.14159, "tiny": 1e-400}',
                 "application/json")
    assert out is not None and b"4111" not in out and b"CREDIT_CARD_1" in out
    # past a double it would be re-serialised as `Infinity` (not JSON): refused instead
    with pytest.raises(Unparseable, match="out of range"):
        m.body(b'{"card": 4111111111111111.0, "big": 1e400}', "application/json")


def test_lone_surrogates_survive() -> None:
    m, _, _ = ctx("webhook")
    out = m.body(b'{"a": "\\ud800 ann@example.com"}', "application/json")
    assert json.loads(out) == {"a": "\ud800 [EMAIL_1]"}
    out.decode("utf-8")  # valid UTF-8 on the wire


def test_json_under_text_content_type_is_json_aware() -> None:
    m, _, _ = ctx("generic")
    out = m.body(b'{"a": "\\u0061nn@example.com"}', "text/plain")
    assert json.loads(out) == {"a": "[EMAIL_1]"}
    assert m.body(b"{not json ann@example.com", "text/plain") == b"{not json [EMAIL_1]"


def test_response_logprobs_dropped() -> None:
    m, _, _ = ctx("openai")
    resp = {"choices": [{"message": {"content": "hi"}, "logprobs": {"content": [
        {"token": "ann@", "top_logprobs": []}, {"token": "example.com"}]}}]}
    out = json.loads(m.body(body(resp), "application/json"))
    assert out["choices"][0]["logprobs"] is None and out["choices"][0]["message"]["content"] == "hi"
    assert m.body(body({"choices": [{"logprobs": None}]}), "application/json") is None
    # the request flags keep their values
    assert m.body(body({"logprobs": True, "top_logprobs": 5}), "application/json") is None
