"""MCP resources, prompts and completions get what tools/call gets (hostile, end to end
through a real mitmdump with the suite and a scripted MCP server over HTTPS): a rule on a
resource URI or a prompt name refuses the request with a JSON-RPC error for its id and the
server never sees it; PII the server returns in a resource's text, a text-like blob, a
prompt's messages or a completion never reaches the agent unmasked, JSON or streamed.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.hostile.test_mcp import RULES as MCP_RULES
from tests.hostile.test_mcp import evil, messages, post, sse  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

SSN = "536-90-4399"
EMAIL = "jane.roe@example.org"
CARD = "4111 1111 1111 1111"

# test_mcp's hostile server and upstream, with rules on resources and prompts
RULES = MCP_RULES.split("policies:")[0] + """policies:
  - name: no-etc
    match: {{mcp: {{resource: "file:///etc/*"}}}}
    action: block
  - name: no-admin-prompts
    match: {{mcp: {{prompt: "admin*"}}}}
    action: block
"""


@pytest.fixture
def gw(gateway_factory, evil):  # noqa: F811 - the fixture
    return gateway_factory(RULES.format(port=evil.port))


def req(method: str, id: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


PII_TEXT = f"patient {EMAIL} ssn {SSN} card {CARD}"


def answer(method: str, mid: Any, params: dict[str, Any]) -> dict[str, Any]:
    """What a hostile server returns: PII in every place each method's result has text."""
    blob = base64.b64encode(PII_TEXT.encode()).decode()
    if method == "resources/read":
        return {"contents": [
            {"uri": params.get("uri"), "mimeType": "text/plain", "text": PII_TEXT},
            {"uri": "mem://b", "mimeType": "text/plain", "blob": blob},
            {"uri": "mem://c", "mimeType": "application/json",
             "blob": base64.b64encode(json.dumps({"email": EMAIL}).encode()).decode()}]}
    if method == "resources/list":
        return {"resources": [{"uri": f"crm://customers/{EMAIL}", "name": EMAIL,
                               "description": PII_TEXT}]}
    if method == "prompts/get":
        return {"description": PII_TEXT, "messages": [
            {"role": "user", "content": {"type": "text", "text": PII_TEXT}},
            {"role": "user", "content": {"type": "resource", "resource": {
                "uri": "mem://r", "mimeType": "text/plain", "blob": blob}}}]}
    if method == "prompts/list":
        return {"prompts": [{"name": "triage", "description": PII_TEXT}]}
    if method == "completion/complete":
        return {"completion": {"values": [EMAIL, SSN], "hasMore": False}}
    if method == "tools/call":
        return {"content": [{"type": "resource", "resource": {
            "uri": "mem://t", "mimeType": "text/plain", "blob": blob}},
            {"type": "text", "text": PII_TEXT}]}
    return {}


def serve(stream: bool):
    def script(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method != "POST":
            return 405, {}, b""
        msg = json.loads(body)
        out = {"jsonrpc": "2.0", "id": msg["id"],
               "result": answer(msg["method"], msg["id"], msg.get("params") or {})}
        if stream:
            return sse(out)
        return 200, {"content-type": "application/json"}, json.dumps(out).encode()
    return script


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("method", "params"), [
    ("resources/read", {"uri": "mem://notes/1"}),
    ("resources/list", {}),
    ("prompts/get", {"name": "triage", "arguments": {}}),
    ("prompts/list", {}),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "triage"},
                             "argument": {"name": "who", "value": "ja"}}),
    ("tools/call", {"name": "fetch_note", "arguments": {}}),
])
def test_pii_in_results_never_reaches_the_agent(gw, evil, stream, method,  # noqa: F811
                                                params) -> None:
    evil.script = serve(stream)
    r = post(gw, req(method, 7, **params))
    assert r.status_code == 200, r.text
    got = messages(r)
    assert len(got) == 1 and got[0]["id"] == 7 and "result" in got[0], r.text
    text = json.dumps(got[0])
    plain = [p for p in (SSN, EMAIL, CARD) if p in text]
    inside = [p for v in _payloads(got[0]) for p in (SSN, EMAIL, CARD)
              if p in base64.b64decode(v).decode("utf-8", "replace")]
    assert not plain and not inside, (method, plain, inside, text[:2000])


@pytest.mark.parametrize(("method", "params", "rule"), [
    ("resources/read", {"uri": "file:///etc/shadow"}, "no-etc"),
    ("resources/subscribe", {"uri": "file:///etc/passwd"}, "no-etc"),
    ("prompts/get", {"name": "admin_reset", "arguments": {}}, "no-admin-prompts"),
    # completing a denied template's or prompt's arguments lists what lies behind it
    ("completion/complete", {"ref": {"type": "ref/resource", "uri": "file:///etc/{name}"},
                             "argument": {"name": "name", "value": "sh"}}, "no-etc"),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "admin_reset"},
                             "argument": {"name": "user", "value": "ro"}},
     "no-admin-prompts"),
])
def test_denied_resource_or_prompt_never_reaches_the_server(gw, evil, method,  # noqa: F811
                                                           params, rule) -> None:
    evil.script = serve(False)
    r = post(gw, req(method, 3, **params))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == 3 and got["error"]["data"]["rule"] == rule, got
    assert not [m for m in evil.jsonrpc() if m.get("method") == method], evil.jsonrpc()


def test_blob_tricks_and_binary_payloads(gw, evil) -> None:  # noqa: F811
    """A text blob with junk a lenient decoder skips, text disguised as an image, text
    nested deeper than the walk: none reaches the agent readable; a real binary blob (PNG)
    passes byte for byte."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    b64 = base64.b64encode(PII_TEXT.encode()).decode()
    deep: Any = {"uri": "mem://deep", "blob": b64}
    for _ in range(80):
        deep = {"nested": [deep]}
    results = {
        "junk": {"contents": [{"uri": "mem://j", "blob": b64[:8] + "!*" + b64[8:]}]},
        "image": {"content": [{"type": "image", "mimeType": "image/png", "data": b64}]},
        "png": {"contents": [{"uri": "mem://p", "mimeType": "image/png",
                              "blob": base64.b64encode(png).decode()}]},
        "deep": {"contents": [deep]},
    }

    def script(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        msg = json.loads(body)
        out = {"jsonrpc": "2.0", "id": msg["id"], "result": results[msg["params"]["uri"]]}
        return 200, {"content-type": "application/json"}, json.dumps(out).encode()
    evil.script = script
    for name in results:
        r = post(gw, req("resources/read", 5, uri=name))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["id"] == 5, got
        if name == "png":
            assert base64.b64decode(got["result"]["contents"][0]["blob"]) == png
            continue
        text = json.dumps(got)
        lenient = [base64.b64decode("".join(c for c in v if c.isalnum() or c in "+/="))
                   for v in _payloads(got)]
        assert not [p for p in (SSN, EMAIL, CARD) if p in text
                    or any(p.encode() in raw for raw in lenient)], (name, text[:1500])
        if name == "deep":
            assert got["error"]["data"]["code"] == "upstream_invalid_jsonrpc", got


def _payloads(obj: Any) -> list[str]:
    out = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            out.extend(v for k, v in o.items() if k in ("blob", "data") and isinstance(v, str))
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return out


def test_the_audit_store_holds_the_masked_text_not_the_blob(gw, evil) -> None:  # noqa: F811
    from tests.hostile.test_websocket import _records
    evil.script = serve(True)
    r = post(gw, req("resources/read", 9, uri="mem://notes/9"))
    assert r.status_code == 200 and messages(r)[0]["id"] == 9, r.text
    stored = _records(gw)
    blob = base64.b64encode(PII_TEXT.encode()).decode()
    assert blob not in stored and EMAIL not in stored and SSN not in stored
    assert "[EMAIL_" in stored and "blobs_as_text" in stored


def test_completion_with_a_malformed_ref_is_refused(gw, evil) -> None:  # noqa: F811
    evil.script = serve(False)
    for ref in ({"type": "ref/resource", "uri": ["file:///etc/shadow"]}, {"uri": "x"},
                "file:///etc/shadow"):
        r = post(gw, req("completion/complete", 4, ref=ref,
                         argument={"name": "n", "value": "s"}))
        got = r.json()
        assert got["id"] == 4 and got["error"]["code"] == -32602, got
    assert not [m for m in evil.jsonrpc() if m.get("method") == "completion/complete"]
