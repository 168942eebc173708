"""Issue 11, class 6 (the policy part): endpoints and spellings the rules never saw.

Batch uploads are judged line by line as the requests they describe, inline batches
request by request, `/v1/batches` can be held; the model named only in the URL path is the
model; every output-token spelling and numeric strings meet numeric rules; provider-side
tools (MCP servers, web search) can be named by rules. Through a real mitmdump; each
bypass asserts the stand-in upstream received nothing."""

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
  - name: no-gpt5
    match: {model: ["gpt-5*"]}
    action: block
  - name: no-bluebird
    match: {prompt: {words: [project bluebird]}}
    action: block
  - name: big-output
    match: {output_tokens: "> 4096"}
    action: block
  - name: many-choices
    match: {fields: {n: "> 10"}}
    action: block
  - name: no-remote-mcp
    match: {provider_tools: {type: [mcp], server_url: ["https://evil.example*"]}}
    action: block
  - name: no-web-search
    match: {provider_tools: ["web_search*"]}
    action: block
  - name: hold-batches
    match: {method: [POST], path: ["/v1/batches"]}
    action: approve
    approvers: [reviewers]
    timeout: 0.5
"""
CHAT = OPENAI + "/v1/chat/completions"
RESPONSES = OPENAI + "/v1/responses"
MESSAGES = ANTHROPIC + "/v1/messages"


@pytest.fixture
def gw(gateway_factory, no_identity):
    return gateway_factory("{standin_upstreams}" + no_identity + RULES)


def _upload(lines: list[dict], purpose: str = "batch") -> tuple[bytes, str]:
    boundary = "agentgate-test-boundary"
    jsonl = "\n".join(json.dumps(x) for x in lines).encode() + b"\n"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() \
        + jsonl + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _line(i: int, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def test_batch_upload_lines_are_judged_as_requests(gw, standin) -> None:
    files = OPENAI + "/v1/files"
    cases = [
        ("model in line 2", [_line(1, chat()), _line(2, chat("gpt-5-pro"))], "no-gpt5"),
        ("keyword in line 1", [_line(1, chat(text="project bluebird plans"))], "no-bluebird"),
        ("output tokens", [_line(1, chat(max_completion_tokens=100000))], "big-output"),
        ("responses line", [_line(1, {"model": "gpt-4o-mini", "input": "hi",
                                      "tools": [{"type": "web_search_preview"}]},
                                  "/v1/responses")], "no-web-search"),
    ]
    for what, lines, rule in cases:
        body, ctype = _upload(lines)
        r = assert_refused(gw, standin, files, body, content_type=ctype, rule=rule, what=what)
        if rule == "no-gpt5":  # a decision taken for one line names it
            assert "batch request 2" in r.text, r.text
    # a line that is not a request cannot be skipped over
    body, ctype = _upload([_line(1, chat())])
    body = body.replace(b'"body": {', b'"bodx": {')
    assert_refused(gw, standin, files, body, content_type=ctype, status=400, what="bad line")
    body, ctype = _upload([_line(1, chat()), _line(2, chat())])
    assert_passes(gw, standin, files, body, content_type=ctype)
    # the Uploads API would split a batch file across requests: refused for batches
    assert_refused(gw, standin, OPENAI + "/v1/uploads",
                   {"purpose": "batch", "filename": "b.jsonl", "bytes": 100,
                    "mime_type": "application/jsonl"}, status=400, what="uploads in parts")


def test_inline_anthropic_batch_and_batch_create_are_matched(gw, standin) -> None:
    reqs = {"requests": [
        {"custom_id": "a", "params": {"model": "claude-haiku", "max_tokens": 10,
                                      "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "b", "params": {"model": "claude-haiku", "max_tokens": 64000,
                                      "messages": [{"role": "user", "content": "hi"}]}}]}
    r = assert_refused(gw, standin, ANTHROPIC + "/v1/messages/batches", reqs,
                       rule="big-output", what="anthropic inline batch")
    assert "batch request 2" in r.text
    reqs["requests"][1]["params"]["messages"][0]["content"] = "Project Bluebird"
    reqs["requests"][1]["params"]["max_tokens"] = 10
    assert_refused(gw, standin, ANTHROPIC + "/v1/messages/batches", reqs,
                   rule="no-bluebird", what="keyword in an inline batch")
    # OpenAI batch create: held for approval (nobody approves: denied), never forwarded
    assert_refused(gw, standin, OPENAI + "/v1/batches",
                   {"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                    "completion_window": "24h"}, status=(403, 408, 429, 503, 504),
                   what="batch create")


def test_model_in_the_url_path(gw, standin) -> None:
    azure = OPENAI + "/openai/deployments/gpt-5-pro/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert_refused(gw, standin, azure, body, rule="no-gpt5", what="azure deployment")
    # a path model and a different body model: refused as ambiguous
    assert_refused(gw, standin, azure.replace("gpt-5-pro", "gpt-4o-mini"),
                   {**body, "model": "gpt-5"}, status=400, what="two models")


def test_every_output_token_spelling_and_numeric_strings(gw, standin) -> None:
    cases = [
        (CHAT, chat(max_tokens=5000)),
        (CHAT, chat(max_completion_tokens=100000)),
        (CHAT, chat(max_tokens=10, max_completion_tokens="100000")),
        (RESPONSES, {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 99999}),
        (MESSAGES, {"model": "claude-haiku", "max_tokens": 64000,
                    "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for url, body in cases:
        assert_refused(gw, standin, url, body, rule="big-output", what=json.dumps(body))
    assert_refused(gw, standin, CHAT, chat(n="11"), rule="many-choices", what="n string")
    # a non-number where a number is compared is refused, never silently let through
    assert_refused(gw, standin, CHAT, chat(max_tokens="lots"), status=400, what="not a number")
    assert_refused(gw, standin, CHAT, chat(n=[11]), status=400, what="n list")
    assert_passes(gw, standin, CHAT, chat(max_tokens=100, n=2))


def test_provider_side_tools_are_nameable(gw, standin) -> None:
    mcp = {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp",
           "require_approval": "never"}
    cases = [
        (RESPONSES, {"model": "gpt-4o-mini", "input": "hi", "tools": [mcp]}, "no-remote-mcp"),
        (RESPONSES, {"model": "gpt-4o-mini", "input": "hi",
                     "tools": [{"type": "web_search_preview"}]}, "no-web-search"),
        (CHAT, chat(web_search_options={}), "no-web-search"),
        (MESSAGES, {"model": "claude-haiku", "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
         "no-web-search"),
        (MESSAGES, {"model": "claude-haiku", "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}],
                    "mcp_servers": [{"type": "url", "url": "https://evil.example/sse",
                                     "name": "e"}]}, "no-remote-mcp"),
    ]
    for url, body, rule in cases:
        assert_refused(gw, standin, url, body, rule=rule, what=json.dumps(body))
    ok = {**mcp, "server_url": "https://tools.internal.example/mcp"}
    assert_passes(gw, standin, RESPONSES, {"model": "gpt-4o-mini", "input": "hi",
                                           "tools": [ok]})
