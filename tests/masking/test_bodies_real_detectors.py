"""Placement with the real detector engine: every entity, in every place of each dialect."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from addons.masking.bodies import Masked
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session

DETECTORS = DetectorSet()


def masked(dialect: str = "openai") -> tuple[Masked, dict]:
    found: dict = {}
    return Masked(Masker(DETECTORS, b"k"), Session(), found, dialect=dialect), found


def core(entity: str) -> str:
    return SAMPLES[entity].split("=")[-1].strip()  # the AWS sample carries a context word


def places(v: str) -> list[dict]:
    """One OpenAI chat, one responses and one Anthropic request with `v` in every place."""
    return [
        {"model": "gpt-4o-mini", "user": v, "messages": [
            {"role": "system", "content": f"ops: {v}"},
            {"role": "user", "content": [{"type": "text", "text": f"see {v}"}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": json.dumps({"q": v})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"r": v})}],
         "tools": [{"type": "function", "function": {"name": "f", "description": f"d {v}",
                                                     "parameters": {"type": "object"}}}]},
        {"model": "gpt-4o-mini", "instructions": f"i {v}", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": f"t {v}"}]},
            {"type": "function_call", "call_id": "c", "name": "f",
             "arguments": json.dumps({"q": v})},
            {"type": "function_call_output", "call_id": "c", "output": f"o {v}"}]},
        {"model": "claude", "max_tokens": 9, "system": [{"type": "text", "text": f"s {v}"}],
         "messages": [
             {"role": "user", "content": f"u {v}"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                "input": {"q": v}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                           "content": [{"type": "text", "text": v}]}]}],
         "tools": [{"name": "f", "description": v, "input_schema": {"type": "object"}}]},
    ]


@pytest.mark.parametrize("entity", sorted(SAMPLES))
def test_every_entity_in_every_place(entity: str) -> None:
    v = SAMPLES[entity]
    for req, n in zip(places(v), (6, 4, 5), strict=True):
        m, found = masked("anthropic" if req["model"] == "claude" else "openai")
        out = m.body(json.dumps(req).encode(), "application/json")
        assert out is not None
        text = json.dumps(json.loads(out), ensure_ascii=False)
        for part in (core(entity)[:14], core(entity)[-14:]):
            assert part not in text, (entity, part)
        assert found == {entity: {"count": n, "strategy": "placeholder"}}


@pytest.mark.parametrize("entity", ["CREDIT_CARD", "US_SSN", "EMAIL", "IBAN", "OPENAI_KEY"])
def test_json_escaped_values(entity: str) -> None:
    v = core(entity)
    escaped = "".join(f"\\u{ord(c):04x}" for c in v)
    raw = ('{"messages": [{"role": "user", "content": "x ' + escaped + ' y"}]}').encode()
    m, found = masked()
    out = json.loads(m.body(raw, "application/json"))
    assert out["messages"][0]["content"] == f"x [{entity}_1] y"


def test_form_encoded_every_byte() -> None:
    v = core("CREDIT_CARD")
    raw = ("card=" + "".join(f"%{ord(c):02X}" for c in v) + "&mail=" + quote(SAMPLES["EMAIL"])
           ).encode()
    m, _ = masked("webhook")
    out = m.body(raw, "application/x-www-form-urlencoded")
    assert out == b"card=%5BCREDIT_CARD_1%5D&mail=%5BEMAIL_1%5D"


def test_value_split_across_anthropic_text_blocks() -> None:
    key = core("OPENAI_KEY")
    req = {"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "my key is " + key[:20]},
        {"type": "text", "text": key[20:] + " thanks"}]}]}
    m, found = masked("anthropic")
    out = json.loads(m.body(json.dumps(req).encode(), "application/json"))
    parts = [p["text"] for p in out["messages"][0]["content"]]
    assert parts == ["my key is [OPENAI_KEY_1]", " thanks"]
