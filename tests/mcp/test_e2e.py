"""MCP through a real mitmdump with the suite: the official `mcp` SDK client (Streamable HTTP,
HTTPS interception through the gateway as proxy) against the devkit's real SDK server.

One gateway per test module section; the server answers with SSE streams (`tools`) or JSON
(`tools-json`). What the server received is read from its own request log.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import McpError

from addons.devkit.mcpserver import CUSTOMER_CARD, CUSTOMER_EMAIL, MCPTestServer, client_session
from tests.conftest import BIN

pytestmark = pytest.mark.integration

TOOLS_TOKEN = "mcp-GATEWAYREALTOKEN-00000000000000000000"
AGENT_CARD = "5500 0000 0000 0004"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, standin):
    certdir = Path(standin.ca_path).parent  # same throwaway CA: the gateway trusts it
    sse = MCPTestServer(certdir=certdir, client_request_timeout=5).start()
    js = MCPTestServer(certdir=certdir, json_response=True, client_request_timeout=5).start()
    yield sse, js
    sse.stop()
    js.stop()


def rules(sse: MCPTestServer, js: MCPTestServer, identity: str, pins: Path,
          extra: str = "") -> str:
    return f"""
upstreams:
  - name: tools
    hosts: [tools.example.com]
    dialect: mcp
    forward_to: https://127.0.0.1:{sse.port}
    credential: {{header: Authorization, prefix: "Bearer ", env: MCP_TOOLS_TOKEN}}
  - name: tools-json
    hosts: [tools-json.example.com]
    dialect: mcp
    restore: true
    forward_to: https://127.0.0.1:{js.port}
{identity}
policies:
  - name: interns-never-email
    match: {{groups: [interns], mcp: {{tool: send_email}}}}
    action: block
    message: interns may not send email
  - name: big-sums-reviewed
    match: {{mcp: {{tool: add}}, fields: {{params.arguments.a: "> 1000"}}}}
    action: approve
    approvers: [reviewers]
    timeout: 60
  - name: no-crm-for-interns
    match: {{groups: [interns], mcp: {{resource: "crm://*"}}}}
    action: block
approvals:
  max_pending: 50
mcp:
  pinning: {{store: {pins}}}
{extra}
"""


@pytest.fixture
def gw(gateway_factory, servers, oidc_provider, tmp_path):
    sse, js = servers
    sse.clear()
    js.clear()
    return gateway_factory(rules(sse, js, oidc_provider.identity_yaml(), tmp_path / "pins.json"),
                           env={"MCP_TOOLS_TOKEN": TOOLS_TOKEN})


def _leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def run(coro: Any) -> Any:
    """The coroutine's result; an error raised inside the SDK's task groups comes out as
    itself (the McpError a caller sees), not wrapped."""
    try:
        return asyncio.run(asyncio.wait_for(coro, 90))
    except BaseExceptionGroup as e:
        raise _leaf(e) from e


async def _with_session(gw, token: str, host: str, fn, **kw: Any) -> Any:
    async with client_session(f"https://{host}/mcp", ca=gw.ca_cert, proxy=gw.proxy_url(token),
                              **kw) as s:
        return await fn(s)


def session(gw, token: str, fn, host: str = "tools.example.com", **kw: Any) -> Any:
    return run(_with_session(gw, token, host, fn, **kw))


def _api(url: str, method: str, path: str, token: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"reason": "not today"}).encode() if method == "POST" else None
    req = urllib.request.Request(url + path, method=method, data=body)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _pending(gw, token: str, n: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gw.approvals_url:
            status, out = _api(gw.approvals_url, "GET", "/approvals", token)
            assert status == 200, out
            if len(out["approvals"]) >= n:
                return out["approvals"]
        time.sleep(0.1)
    raise AssertionError("no held approval")


@pytest.mark.parametrize("host", ["tools.example.com", "tools-json.example.com"])
def test_allowed_and_blocked_tool_calls(gw, servers, oidc_provider, host) -> None:
    sse, js = servers
    server = sse if host.startswith("tools.") else js
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    intern = oidc_provider.token(sub="intern-1", groups=["interns"])

    async def call_add(s):
        return await s.call_tool("add", {"a": 2, "b": 3})
    res = session(gw, dev, call_add, host=host)
    assert not res.isError and res.content[0].text == "5"

    async def call_email(s):
        return await s.call_tool("send_email", {"to": "a@b.c", "subject": "s", "body": "b"})
    server.clear()
    with pytest.raises(McpError) as ei:
        session(gw, intern, call_email, host=host)
    assert "interns-never-email" in str(ei.value.error.message)
    assert ei.value.error.data["rule"] == "interns-never-email"
    assert not server.jsonrpc("tools/call"), "the blocked call reached the server"
    # the same identity keeps being served
    assert not session(gw, intern, call_add, host=host).isError
    # the agent's own token never reaches the server; the gateway's credential does
    for r in server.requests:
        hdrs = dict(r["headers"])
        assert "proxy-authorization" not in hdrs
        if host.startswith("tools."):
            assert hdrs.get("authorization") == f"Bearer {TOOLS_TOKEN}"
        else:
            assert "authorization" not in hdrs


def test_tools_list_filtered_per_identity(gw, oidc_provider) -> None:
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    intern = oidc_provider.token(sub="intern-1", groups=["interns"])

    async def names(s):
        return {t.name for t in (await s.list_tools()).tools}
    assert "send_email" in session(gw, dev, names)
    got = session(gw, intern, names)
    assert "send_email" not in got and {"add", "lookup_customer"} <= got
    got_json = session(gw, intern, names, host="tools-json.example.com")
    assert "send_email" not in got_json and "add" in got_json


def test_resource_read_blocked_by_uri_glob(gw, servers, oidc_provider) -> None:
    intern = oidc_provider.token(sub="intern-1", groups=["interns"])

    async def read(s):
        from pydantic import AnyUrl
        return await s.read_resource(AnyUrl("crm://customers"))
    with pytest.raises(McpError) as ei:
        session(gw, intern, read)
    assert "no-crm-for-interns" in ei.value.error.message


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_held_tool_call(gw, servers, oidc_provider, decision) -> None:
    sse, _ = servers
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    alice = oidc_provider.token(sub="alice", groups=["reviewers"])

    async def flow(s):
        task = asyncio.create_task(s.call_tool("add", {"a": 5000, "b": 1}))
        held = await asyncio.to_thread(_pending, gw, alice)
        assert not task.done()
        assert held[0]["what"]["kind"] == "tool"
        assert not sse.jsonrpc("tools/call"), "a held call reached the server"
        status, out = await asyncio.to_thread(
            _api, gw.approvals_url, "POST", f"/approvals/{held[0]['id']}/{decision}", alice)
        assert status == 200, out
        return await task
    sse.clear()
    if decision == "approve":
        res = session(gw, dev, flow)
        assert res.content[0].text == "5001"
        assert len(sse.jsonrpc("tools/call")) == 1
    else:
        with pytest.raises(McpError) as ei:
            session(gw, dev, flow)
        assert "big-sums-reviewed" in ei.value.error.message or \
            "denied" in ei.value.error.message
        assert not sse.jsonrpc("tools/call")


@pytest.mark.parametrize("host", ["tools.example.com", "tools-json.example.com"])
def test_arguments_and_results_masked(gw, servers, oidc_provider, host) -> None:
    sse, js = servers
    server = sse if host.startswith("tools.") else js
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    server.clear()

    async def calls(s):
        sent = await s.call_tool("send_email", {"to": "bob.smith@example.org",
                                                "subject": "hi", "body": f"card {AGENT_CARD}"})
        looked = await s.call_tool("lookup_customer", {"name": "Jane"})
        return sent, looked
    sent, looked = session(gw, dev, calls, host=host)
    received = json.dumps(server.jsonrpc("tools/call"))
    assert "bob.smith@example.org" not in received and AGENT_CARD not in received
    # the server's own PII never reaches the agent (text and structured content)
    text = looked.content[0].text
    # whole: each SSE event is one JSON-RPC message, masked as a document; no part of the
    # text held back into a synthetic event the client would never read as the answer
    assert re.fullmatch(r"Customer Jane: email \[EMAIL_\d+\], card \[CREDIT_CARD_\d+\]",
                        text), text
    structured = json.dumps(looked.structuredContent)
    assert CUSTOMER_EMAIL not in structured and CUSTOMER_CARD not in structured
    echoed = sent.content[0].text  # the server echoes what it got: placeholders
    if server is js:  # restore: true — the agent gets its own originals back
        assert "bob.smith@example.org" in echoed
    else:
        assert "bob.smith@example.org" not in echoed and "[EMAIL_" in echoed


def _records(gw) -> list[dict[str, Any]]:
    """The metadata of every recorded flow (the gateway is stopped first: it flushes its
    queue on exit and releases the DuckDB file)."""
    import duckdb
    gw.stop()
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        out = []
        for (meta,) in con.execute("SELECT metadata FROM flows ORDER BY seq").fetchall():
            out.append(json.loads(meta) if isinstance(meta, str) else (meta or {}))
        return out
    finally:
        con.close()


def _pins(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "agentgate"), "mcp", "pins", *args, "--store",
                           str(tmp_path / "pins.json")], capture_output=True, text=True,
                          timeout=60)


def test_rug_pull_caught_mid_session(gw, servers, oidc_provider, tmp_path) -> None:
    sse, _ = servers
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    original = sse.mcp._tool_manager.get_tool("lookup_customer").description

    async def flow(s):
        await s.list_tools()  # pinned
        ok = await s.call_tool("lookup_customer", {"name": "Jane"})
        assert not ok.isError
        sse.rug_pull("lookup_customer")
        await s.list_tools()  # the change is seen
        with pytest.raises(McpError) as ei:
            await s.call_tool("lookup_customer", {"name": "Jane"})
        assert "mcp.pin:lookup_customer" in ei.value.error.message
        assert "agentgate mcp pins accept tools lookup_customer" in ei.value.error.message
        # other tools of the server still work
        assert not (await s.call_tool("add", {"a": 1, "b": 1})).isError
        # the operator looks and accepts the new definition: the next call goes through
        listed = await asyncio.to_thread(_pins, tmp_path, "list")
        assert re.search(r"lookup_customer\s+CHANGED", listed.stdout), listed
        assert "marker:hidden-block" in listed.stdout and "marker:sensitive-file" in listed.stdout
        accepted = await asyncio.to_thread(_pins, tmp_path, "accept", "tools",
                                           "lookup_customer")
        assert accepted.returncode == 0, accepted
        assert not (await s.call_tool("lookup_customer", {"name": "Jane"})).isError
    try:
        session(gw, dev, flow)
    finally:
        sse.rug_pull("lookup_customer", original)
    logs = gw.logs()
    assert "changed tool definitions since pinned: lookup_customer" in logs
    assert "<IMPORTANT>" not in logs  # names only, never the description
    # recorded: the tools/list flow that saw the change, and the refused call, name the pin
    rows = _records(gw)
    assert any((m.get("mcp") or {}).get("pins", {}).get("changed") == ["lookup_customer"]
               for m in rows)
    assert any((m.get("mcp") or {}).get("pin") == "changed" for m in rows)


def test_sampling_refused(gw, servers, oidc_provider) -> None:
    sse, _ = servers
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    seen: list[Any] = []

    async def sampling(ctx, params):
        from mcp import types
        seen.append(params)
        return types.CreateMessageResult(role="assistant", model="m",
                                         content=types.TextContent(type="text", text="yes"))

    async def ask(s):
        return await s.call_tool("ask_model", {"question": "hello?"})
    sse.clear()
    res = session(gw, dev, ask, sampling_callback=sampling)
    assert seen == [], "the client saw the server's sampling request"
    # the server got the gateway's JSON-RPC error (not a timeout), sent with the gateway's
    # credential for it
    assert "sampling failed" in res.content[0].text
    assert "not allowed" in res.content[0].text
    answers = [r for r in sse.requests if '"error"' in r["body"]]
    assert answers and dict(answers[0]["headers"])["authorization"] == f"Bearer {TOOLS_TOKEN}"
    rows = _records(gw)  # stops the gateway: the log and the store are complete
    assert any("sampling/createMessage" in (m.get("mcp") or {}).get(
        "refused_server_requests", []) for m in rows)
    # the real credential is in no log and no record
    assert TOOLS_TOKEN not in gw.logs()
    for f in gw.data_dir.iterdir():
        if f.is_file():
            assert TOOLS_TOKEN.encode() not in f.read_bytes(), f


def test_bad_jsonrpc_gets_jsonrpc_errors(gw, servers, oidc_provider) -> None:
    import httpx
    sse, _ = servers
    dev = oidc_provider.token(sub="dev-1", groups=["devs"])
    sse.clear()
    with httpx.Client(proxy=gw.proxy_url(dev), verify=str(gw.ca_cert), timeout=30) as c:
        def post(body: bytes) -> httpx.Response:
            return c.post("https://tools.example.com/mcp", content=body,
                          headers={"content-type": "application/json",
                                   "accept": "application/json, text/event-stream"})
        r = post(b'{"jsonrpc": "2.0", "id": 1, "method": ')
        assert r.json()["error"]["code"] == -32700 and r.json()["id"] is None
        r = post(b'{"jsonrpc": "1.0", "id": 7, "method": "tools/list"}')
        assert r.json()["error"]["code"] == -32600 and r.json()["id"] == 7
        r = post(b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": 5}}')
        assert r.json()["error"]["code"] == -32602 and r.json()["id"] == 8
        r = post(b'{"jsonrpc": "2.0", "id": 9, "method": "tools/list", "id": 10}')
        assert r.json()["error"]["code"] == -32700
        r = post(b'{"jsonrpc": "2.0", "id": 11, "method": "debug/exec", "params": {}}')
        assert r.status_code == 200
        assert r.json()["error"]["code"] == -32601 and r.json()["id"] == 11
        assert "mcp.unknown_methods" in r.json()["error"]["message"]
        r = post(b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, '
                 b'{"jsonrpc": "2.0", "id": 2, "method": "debug/exec"}]')
        assert [m["id"] for m in r.json()] == [1, 2]
    assert sse.requests == [], "bad JSON-RPC reached the server"
