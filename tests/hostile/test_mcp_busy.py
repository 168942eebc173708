"""The fair pool full while MCP traffic needs it (hostile, through a real mitmdump whose
pool has one slot and a queue of one job per identity, tests/hostile/_tiny_pool.py; one
identity keeps the slot busy and sends three heavy MCP items at once):

- a masked MCP SSE stream (masking on: masking's stream function wraps the mcp addon's):
  the agent gets a JSON-RPC error event for its request id, in the stream — not an aborted
  connection, and never the unjudged, unmasked event; the refusal is recorded;
- a heavy JSON-RPC request: answered with a JSON-RPC error for its id (code busy), never
  forwarded to the server, recorded.

Before, the masked stream's chunk was refused by the pool and the stream aborted (the
client saw a broken transfer instead of an answer).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.hostile.edgekit import assert_healthy, client
from tests.hostile.test_heavy_pool_share import TINY_POOL, _while_occupied
from tests.hostile.test_mcp import HostileServer, evil  # noqa: F401 - fixture
from tests.hostile.test_websocket import _records

MASKED_RULES = """{{standin_upstreams}}  - name: evil-tools
    hosts: [evil-tools.example.com]
    dialect: mcp
    forward_to: https://127.0.0.1:{port}
identity:
  required: false
"""
EMAIL = "rita.moreno@example.org"


def _post(gw: Any, body: dict[str, Any]) -> httpx.Response:
    with client(gw) as c:
        return c.post("https://evil-tools.example.com/mcp", content=json.dumps(body),
                      headers={"content-type": "application/json",
                               "accept": "application/json, text/event-stream"}, timeout=90)


def _events(r: httpx.Response) -> list[dict[str, Any]]:
    out = []
    for e in r.content.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].strip() for ln in e.split(b"\n") if ln.startswith(b"data:")]
        if data:
            out.append(json.loads(b"\n".join(data)))
    return out


def test_masked_stream_gets_a_jsonrpc_error_when_the_pool_is_full(
        gateway_factory, standin, evil: HostileServer) -> None:  # noqa: F811
    def answer(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        rid = json.loads(body)["id"]
        progress = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                               "params": {"progressToken": rid, "progress": 1}})
        event = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": f"owner {EMAIL}"}],
            "structuredContent": {"rows": [{"who": EMAIL}] * 20_000}}},
            separators=(",", ":"))
        return 200, {"content-type": "text/event-stream"}, \
            b"event: message\ndata: " + progress.encode() + b"\n\n" + \
            b"event: message\ndata: " + event.encode() + b"\n\n"

    evil.script = answer
    gw = gateway_factory(MASKED_RULES.format(port=evil.port),
                         extra_args=("-s", str(TINY_POOL)))
    outcomes = _while_occupied(gw, 3, lambda i: _post(gw, {
        "jsonrpc": "2.0", "id": 30 + i, "method": "tools/call",
        "params": {"name": "rows", "arguments": {}}}))
    busy = 0
    for i, r in enumerate(outcomes):
        assert r is not None and r.status_code == 200, r
        assert EMAIL.encode() not in r.content  # masked or refused, never in clear
        events = _events(r)
        answers = [m for m in events if m.get("id") == 30 + i]
        assert len(answers) == 1, r.content[:400]
        if "error" in answers[0]:
            busy += 1
            assert "too busy" in answers[0]["error"]["message"], answers[0]
        else:
            rows = answers[0]["result"]["structuredContent"]["rows"]
            assert len(rows) == 20_000 and "[EMAIL_" in rows[0]["who"]
    assert busy, [r.content[:200] for r in outcomes if r is not None]
    assert_healthy(gw, standin)
    record = _records(gw)
    assert record.count("too busy") >= busy
    assert EMAIL not in record


def test_heavy_request_gets_a_jsonrpc_error_when_the_pool_is_full(
        gateway_factory, standin, evil: HostileServer) -> None:  # noqa: F811
    evil.script = lambda m, b: (200, {"content-type": "application/json"}, json.dumps(
        {"jsonrpc": "2.0", "id": json.loads(b)["id"], "result": {"content": []}}).encode())
    gw = gateway_factory(MASKED_RULES.format(port=evil.port),
                         extra_args=("-s", str(TINY_POOL)))
    notes = "lorem ipsum dolor sit amet " * 4000  # 108 KB: read and parsed in the pool
    outcomes = _while_occupied(gw, 3, lambda i: _post(gw, {
        "jsonrpc": "2.0", "id": 40 + i, "method": "tools/call",
        "params": {"name": "save_note", "arguments": {"text": notes, "n": i}}}))
    busy = []
    for i, r in enumerate(outcomes):
        assert r is not None and r.status_code == 200, (r, r.text[:500])
        msg = r.json()
        assert msg["id"] == 40 + i, msg
        if "error" in msg:
            assert msg["error"]["data"]["code"] == "busy", msg
            busy.append(i)
    assert busy, [r.text[:200] for r in outcomes if r is not None]
    forwarded = {m["params"]["arguments"]["n"] for m in evil.jsonrpc()
                 if m.get("method") == "tools/call"}
    assert not forwarded & set(busy), (forwarded, busy)
    assert_healthy(gw, standin)
    assert _records(gw).count('"busy"') >= len(busy)
