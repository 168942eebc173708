"""Issue 11, class 8: keyword rules cannot be dodged.

The rule's words and the searched text go through the same skeleton (NFKC, case fold,
format characters / soft hyphens / combining marks removed, hyphenation joined, UTS #39
confusables mapped), and every string of the body is searched, not a list of known keys.
Through a real mitmdump; each bypass asserts the stand-in upstream received nothing."""

from __future__ import annotations

import json

import pytest

from tests.hostile.policykit import (
    ANTHROPIC,
    OPENAI,
    assert_passes,
    assert_refused,
    chat,
)

pytestmark = pytest.mark.integration

RULES = """
policies:
  - name: no-bluebird
    match: {prompt: {words: [project bluebird, password]}}
    action: block
  - name: no-exfil
    match: {prompt: {regex: ['exfiltrat(e|ion)']}}
    action: block
"""
CHAT = OPENAI + "/v1/chat/completions"
RESPONSES = OPENAI + "/v1/responses"

SPELLINGS = [
    ("zero-width space", "pass\u200bword"),
    ("zero-width joiner", "pa\u200dss\u2060word"),
    ("soft hyphen", "pass\u00adword"),
    ("bidi marks", "pass\u200eword\u202c"),
    ("cyrillic", "p\u0430ssw\u043erd"),
    ("greek omicron", "passw\u03bfrd"),
    ("fullwidth", "\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24"),
    ("math bold", "".join(chr(0x1D41A + ord(c) - ord("a")) for c in "password")),
    ("combining marks", "pa\u0301ssw\u0308ord"),
    ("hyphenation", "pass-\nword"),
    ("hyphenation crlf", "pass-\r\n  word"),
    ("case", "PaSsWoRd"),
    ("two words, nbsp", "project\u00a0blue\u200bbird"),
]


@pytest.fixture
def gw(gateway_factory, no_identity):
    return gateway_factory("{standin_upstreams}" + no_identity + RULES)


def test_spellings_of_a_word_are_the_word(gw, standin) -> None:
    for what, word in SPELLINGS:
        assert_refused(gw, standin, CHAT, chat(text=f"the {word} is here"),
                       rule="no-bluebird", what=what)
    # regex rules: literal characters go through the same skeleton
    assert_refused(gw, standin, CHAT, chat(text="plan the \u0435xfiltr\u0430tion now"),
                   rule="no-exfil", what="regex + confusables")
    assert_refused(gw, standin, CHAT, chat(text="EXFIL\u200bTRATE"), rule="no-exfil",
                   what="regex + zero-width")
    # not every word that shares letters: no false positive on an innocent prompt
    assert_passes(gw, standin, CHAT, chat(text="passing words and a blue bird"))


def test_every_string_of_the_body_is_searched(gw, standin) -> None:
    fn_tool = {"type": "function", "function": {
        "name": "lookup", "description": "returns the password",
        "parameters": {"type": "object", "properties": {}}}}
    places = [
        ("tool description", CHAT, chat(tools=[fn_tool])),
        ("prediction.content", CHAT,
         chat(prediction={"type": "content", "content": "the password"})),
        ("response_format json_schema", CHAT, chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "description": "project bluebird"}}})),
        ("text.format", RESPONSES, {"model": "gpt-4o-mini", "input": "hi", "text": {
            "format": {"type": "json_schema", "name": "x",
                       "schema": {"type": "object", "description": "password"}}}}),
        ("metadata", CHAT, chat(metadata={"note": "project bluebird"})),
        ("a JSON key", CHAT, chat(metadata={"password": "x"})),
        ("JSON-in-string tool arguments with escapes", CHAT, {
            "model": "gpt-4o-mini", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "c1", "type": "function", "function": {
                        "name": "f",
                        "arguments": json.dumps({"q": "\\u0070assword"})[:-1]
                        .replace("\\\\u", "\\u") + "}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
        ("anthropic tool input_schema", ANTHROPIC + "/v1/messages", {
            "model": "claude-haiku", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "t", "input_schema": {"type": "object",
                                                     "description": "password"}}]}),
    ]
    for what, url, body in places:
        assert_refused(gw, standin, url, body, rule="no-bluebird", what=what)


def test_forms_multipart_jsonl_and_query_are_searched(gw, standin) -> None:
    hook = "https://hooks.example.com/notify"
    cases = [
        ("form value, percent-encoded", hook, b"text=pass%77ord",
         "application/x-www-form-urlencoded"),
        ("multipart JSONL upload with escapes", OPENAI + "/v1/files",
         b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n"
         b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
         b"Content-Type: application/jsonl\r\n\r\n{\"t\": \"\\u0070assword\"}\r\n--b--\r\n",
         "multipart/form-data; boundary=b"),
        ("NDJSON with escapes", hook, b'{"t": "x"}\n{"t": "pa\\u0073sword"}\n',
         "application/x-ndjson"),
        ("query string", hook + "?note=pass%E2%80%8Bword", b"{}", "application/json"),
    ]
    for what, url, body, ctype in cases:
        assert_refused(gw, standin, url, body, content_type=ctype, rule="no-bluebird",
                       what=what)
