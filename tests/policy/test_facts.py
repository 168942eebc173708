"""Facts added for issue 11: path models, output_tokens, numeric strings, provider tools,
batches judged per request, keywords over every string of the body."""

from __future__ import annotations

import codecs
import json
import textwrap
from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.policy.engine import DEFAULT_RULE, BodyUnavailable, RequestFacts, evaluate

UPSTREAMS = "upstreams:\n  - {name: openai, hosts: [api.openai.com], dialect: openai}\n"


def policies(text: str, tmp_path: Path):
    (tmp_path / "a.yaml").write_text(UPSTREAMS)
    (tmp_path / "b.yaml").write_text(textwrap.dedent(text))
    return load_rules(tmp_path).policies


def decide(ps, body, path="/v1/chat/completions", content_type="application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return evaluate(ps, RequestFacts("POST", "api.openai.com", path, upstream="openai",
                                     body=raw, content_type=content_type))


def test_model_from_the_url_path(tmp_path) -> None:
    ps = policies("policies:\n  - {name: m, action: block, match: {model: [gpt-5*]}}\n",
                  tmp_path)
    assert decide(ps, {}, "/openai/deployments/gpt-5-pro/chat/completions").rule == "m"
    assert decide(ps, {}, "/v1beta/models/gpt-5x:generateContent").rule == "m"
    assert decide(ps, {"model": "gpt-5"}, "/openai/deployments/GPT-5/chat/completions"
                  ).rule == "m"
    with pytest.raises(BodyUnavailable):
        decide(ps, {"model": "gpt-5"}, "/openai/deployments/small/chat/completions")
    with pytest.raises(BodyUnavailable):
        decide(ps, {"model": ["gpt-5"]})


@pytest.mark.parametrize("body,hit", [
    ({"max_tokens": 5000}, True), ({"max_completion_tokens": 5000}, True),
    ({"max_output_tokens": "5000"}, True), ({"generationConfig": {"maxOutputTokens": 9999}}, True),
    ({"max_tokens": 10, "max_completion_tokens": 5000}, True),   # the largest counts
    ({"max_tokens": 4096}, False), ({}, False), ({"max_tokens": None}, False),
    ({"max_tokens": "many"}, "refuse"), ({"max_tokens": True}, "refuse"),
])
def test_output_tokens(tmp_path, body, hit) -> None:
    ps = policies("policies:\n  - {name: t, action: block, match: {output_tokens: '> 4096'}}\n",
                  tmp_path)
    if hit == "refuse":
        with pytest.raises(BodyUnavailable):
            decide(ps, body)
        return
    assert (decide(ps, body).rule == "t") is hit


def test_output_tokens_needs_numbers(tmp_path) -> None:
    with pytest.raises(ConfigError):
        policies("policies:\n  - {name: t, action: block, match: {output_tokens: present}}\n",
                 tmp_path)


def test_provider_tools(tmp_path) -> None:
    ps = policies("""\
        policies:
          - name: mcp
            action: block
            match: {provider_tools: {type: [mcp], server_url: ["https://evil.example/*"]}}
          - name: search
            action: block
            match: {provider_tools: ["web_search*", code_interpreter]}
        """, tmp_path)
    mcp = {"type": "mcp", "server_url": "https://EVIL.example/mcp", "server_label": "e"}
    assert decide(ps, {"tools": [mcp]}).rule == "mcp"
    assert decide(ps, {"tools": [{**mcp, "server_url": "https://ok.example/"}]}).rule \
        == DEFAULT_RULE
    assert decide(ps, {"mcp_servers": [{"type": "url", "url": "https://evil.example/s"}]}
                  ).rule == "mcp"
    assert decide(ps, {"tools": [{"type": "web_search_20250305"}]}).rule == "search"
    assert decide(ps, {"tools": [{"type": "code_interpreter"}]}).rule == "search"
    assert decide(ps, {"web_search_options": {}}).rule == "search"
    assert decide(ps, {"tools": [{"type": "function", "function": {"name": "web_search"}}]}
                  ).rule == DEFAULT_RULE


def test_batches_strictest_decision_names_the_request(tmp_path) -> None:
    ps = policies("""\
        policies:
          - {name: m, action: block, match: {model: [gpt-5*]}}
          - {name: h, action: approve, approvers: [r], match: {model: [held]}}
        """, tmp_path)
    doc = {"requests": [{"custom_id": "a", "params": {"model": "held"}},
                        {"custom_id": "b", "params": {"model": "gpt-5"}}]}
    d = decide(ps, doc, "/v1/messages/batches")
    assert (d.action, d.rule) == ("block", "m") and "batch request 2" in d.message
    doc["requests"].pop()
    d = decide(ps, doc, "/v1/messages/batches")
    assert (d.action, d.rule) == ("approve", "h") and "batch request 1" in d.message


def test_keywords_search_every_string_and_the_skeleton(tmp_path) -> None:
    ps = policies("policies:\n  - {name: k, action: block, "
                  "match: {prompt: {words: [bluebird], regex: ['exfil\\w+']}}}\n", tmp_path)
    for body in ({"tools": [{"type": "function", "function": {"description": "BLUEBIRD"}}]},
                 {"prediction": {"content": "blue\u200bbird"}},
                 {"response_format": {"json_schema": {"schema": {"description": "blu\u0435bird"}}}},
                 {"metadata": {"bluebird": 1}},
                 {"messages": [{"tool_calls": [{"function": {
                     "arguments": '{"q": "\\u0062luebird"}'}}]}]},
                 {"messages": [{"content": "\u0435xfiltrate"}]}):
        assert decide(ps, body).rule == "k", body
    assert decide(ps, {"messages": [{"content": "blue birds"}]}).rule == DEFAULT_RULE


def test_utf16_body_is_read_by_policy(tmp_path) -> None:
    ps = policies("policies:\n  - {name: m, action: block, match: {model: [gpt-5*]}}\n",
                  tmp_path)
    raw = codecs.BOM_UTF16_LE + json.dumps({"model": "gpt-5"}).encode("utf-16-le")
    assert decide(ps, raw).rule == "m"
    assert decide(ps, codecs.BOM_UTF8 + b'{"model": "gpt-5"}', content_type="").rule == "m"
    with pytest.raises(BodyUnavailable):
        decide(ps, b'{"model": "gpt-5", "model": "x"}')


def test_keywords_in_forms_multipart_jsonl_and_query(tmp_path) -> None:
    ps = policies("policies:\n  - {name: k, action: block, "
                  "match: {prompt: {words: [bluebird]}}}\n", tmp_path)

    def d(raw: bytes, ctype: str, path: str = "/hook") -> str:
        return evaluate(ps, RequestFacts("POST", "h", path, body=raw, content_type=ctype)).rule
    assert d(b"q=blue%62ird", "application/x-www-form-urlencoded") == "k"
    assert d(b"q=%7B%22a%22%3A%22%5Cu0062luebird%22%7D",
             "application/x-www-form-urlencoded") == "k"          # JSON in a form value
    mp = (b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.jsonl\"\r\n"
          b"Content-Type: application/jsonl\r\n\r\n{\"t\": \"\\u0062luebird\"}\r\n--b--\r\n")
    assert d(mp, "multipart/form-data; boundary=b") == "k"
    mp_name = (b"--b\r\nContent-Disposition: form-data; name=\"bluebird\"\r\n\r\nx\r\n--b--\r\n")
    assert d(mp_name, "multipart/form-data; boundary=b") == "k"
    png = (b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n"
           b"Content-Type: image/png\r\n\r\n\x89PNG\xff\xfe bluebird\r\n--b--\r\n")
    assert d(png, "multipart/form-data; boundary=b") == "k"
    assert d(b'{"t": "\\u0062luebird"}\n{"t": "x"}\n', "application/x-ndjson") == "k"
    assert d(b"", "", "/hook?q=blue%E2%80%8Bbird") == "k"
    assert d(b"q=blue+birds", "application/x-www-form-urlencoded") == DEFAULT_RULE
    with pytest.raises(BodyUnavailable):
        d(b"\x80\x81abc", "text/plain")


def test_batch_file_in_parts_is_refused(tmp_path) -> None:
    ps = policies("policies:\n  - {name: m, action: block, match: {model: [gpt-5*]}}\n",
                  tmp_path)
    with pytest.raises(BodyUnavailable):
        decide(ps, {"purpose": " Batch", "filename": "b.jsonl", "bytes": 10}, "/v1/uploads")
    assert decide(ps, {"purpose": "assistants", "filename": "a.txt", "bytes": 1},
                  "/v1/uploads").rule == DEFAULT_RULE


def test_json_under_another_content_type_is_json(tmp_path) -> None:
    ps = policies("policies:\n  - {name: m, action: block, match: {model: [gpt-5*]}}\n",
                  tmp_path)
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "application/xml", ""):
        assert decide(ps, {"model": "gpt-5"}, content_type=ctype).rule == "m", ctype


def test_json_too_deep_to_search_is_refused(tmp_path) -> None:
    ps = policies("policies:\n  - {name: k, action: block, "
                  "match: {prompt: {words: [bluebird]}}}\n", tmp_path)
    deep: object = "bluebird"
    for _ in range(80):
        deep = {"x": deep}
    with pytest.raises(BodyUnavailable):
        decide(ps, {"metadata": deep})
    nested = "bluebird"
    for _ in range(12):  # JSON in a string in a string ...: each level doubles the escapes
        nested = json.dumps({"a": nested})
    assert decide(ps, {"m": nested}).rule == "k"   # found through every level
