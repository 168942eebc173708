"""A hostile MCP server answers with an SSE body of declared length (content-length) on a
`mask: false` upstream, and the gateway rewrites the stream (drops a sampling request the
rules refuse): the agent must get the rest of the stream and its end, framed by what the
gateway sends. Before, the server's content-length was passed on with the shorter body:
the agent's client waited for bytes that never came (read timeout)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.hostile.edgekit import assert_healthy
from tests.hostile.test_heavy_pool_share import MCP_RULES
from tests.hostile.test_mcp import HostileServer, evil, sse  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

def test_a_rewritten_stream_of_declared_length_reaches_the_agent_whole(
        gateway_factory, standin, evil: HostileServer) -> None:  # noqa: F811
    sampling = {"jsonrpc": "2.0", "id": "s-9", "method": "sampling/createMessage",
                "params": {"messages": [], "maxTokens": 1}}
    result = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text",
                                                                 "text": "done"}]}}

    def answer(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if json.loads(body).get("method") != "tools/call":
            return 202, {}, b""  # the gateway's refusal of the sampling request
        return sse(sampling, result)

    evil.script = answer
    gw = gateway_factory(MCP_RULES.format(port=evil.port))
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=10) as c:
        r = c.post("https://evil-tools.example.com/mcp", content=json.dumps(
            {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
             "params": {"name": "x", "arguments": {}}}),
            headers={"content-type": "application/json",
                     "accept": "application/json, text/event-stream"})
    assert r.status_code == 200
    events = [e for e in r.content.split(b"\n\n") if e.strip()]
    msgs: list[Any] = [json.loads(e.split(b"data: ", 1)[1]) for e in events]
    assert msgs == [result]  # the sampling request never reaches the agent
    assert_healthy(gw, standin)
