"""JSON placement (issue 11, class 7): every string is walked whatever its key, values split
across sibling fields / array items / NDJSON lines are caught, structure is kept."""

from __future__ import annotations

import json

import pytest

from addons.masking.bodies import Masked
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

DS = DetectorSet()
RAW = ["4111", "ann.lee", "536-22", "4519", "GB82"]


def ctx(dialect: str = "openai") -> Masked:
    return Masked(Masker(DS, b"k"), Session(), {}, dialect=dialect)


def mask(obj, dialect: str = "openai", ctype: str = "application/json") -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    out = ctx(dialect).body(data, ctype)
    return (out or data).decode()


def assert_clean(text: str) -> None:
    for v in RAW:
        assert v not in text, (v, text)
        assert v not in json.dumps(text)


@pytest.mark.parametrize("key", ["format", "id", "type", "status", "model", "role", "detail",
                                 "voice", "tool_choice", "object", "call_id", "media_type"])
def test_structural_looking_keys_carrying_user_text_are_masked(key: str) -> None:
    req = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {
               "type": "object", "properties": {"x": {
                   "type": "string", key: "email ann.lee@example.com card 4111 1111 1111 1111"
               }}}}}],
           "metadata": {key: "ssn 536-22-4519"}}
    out = mask(req)
    assert_clean(out)
    o = json.loads(out)
    assert o["model"] == "gpt-4o-mini" and o["messages"][0]["role"] == "user"


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "generic"])
@pytest.mark.parametrize("items", [
    ["4111", "1111", "1111", "1111"], [4111, 1111, 1111, 1111],
    ["ann.lee@", "example.com"], ["536-22-", "4519"], ["53", "6-2", "2-45", "19"],
    ["4", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1"],
    ["GB82 WEST ", "1234 5698 ", "7654 32"],
])
def test_value_split_across_array_items(dialect: str, items: list) -> None:
    out = mask({"input": {"parts": items}, "n": 1}, dialect)
    assert_clean(out)
    assert "".join(str(x) for x in json.loads(out)["input"]["parts"]) != \
        "".join(str(x) for x in items)


def test_value_split_across_adjacent_fields_of_tool_arguments() -> None:
    args = json.dumps({"first": "ann.lee@exa", "second": "mple.com"})
    req = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]}]}
    out = mask(req)
    assert_clean(out)
    inner = json.loads(json.loads(out)["messages"][0]["tool_calls"][0]["function"]["arguments"])
    assert set(inner) == {"first", "second"}


@pytest.mark.parametrize("shape", ["ollama_chat", "ollama_generate", "custom"])
def test_value_split_across_ndjson_lines(shape: str) -> None:
    text = "Sure: 4111 1111 1111 1111 and ann.lee@example.com, ssn 536-22-4519."
    lines = []
    for i in range(0, len(text), 3):
        p = text[i:i + 3]
        obj = {"ollama_chat": {"model": "llama3", "created_at": "2024-01-01T00:00:00Z",
                               "message": {"role": "assistant", "content": p}, "done": False},
               "ollama_generate": {"model": "llama3", "response": p, "done": False},
               "custom": {"seq": i, "tok": {"v": p}}}[shape]
        lines.append(json.dumps(obj))
    out = mask("\n".join(lines).encode(), "generic", "application/x-ndjson")
    assert_clean(out)
    for line in out.split("\n"):
        o = json.loads(line)
        if shape != "custom":
            assert o["model"] == "llama3"


def test_unrelated_fields_do_not_make_a_value() -> None:
    # two halves in different objects are not siblings; lists of small numbers stay as is
    req = {"a": {"x": "4111 1111"}, "b": {"y": "1111 1111"}, "sizes": [1, 2, 3, 4, 5],
           "version": [4, 11, 1111], "max_tokens": 4096}
    out = json.loads(mask(req, "generic"))
    assert out == req


def test_long_base64_payloads_are_left_alone() -> None:
    blob = "QUFB" * 200 + "NDExMTExMTExMTExMTExMQ=="
    req = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + blob}},
        {"type": "input_audio", "input_audio": {"data": blob, "format": "wav"}}]}]}
    out = json.loads(mask(req))
    assert out == req
