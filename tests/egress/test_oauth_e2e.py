"""An MCP server guarded by OAuth client-credentials, through a real mitmdump: the gateway gets
the token from a real local token endpoint, injects it (the agent's own token never reaches the
server), reuses it, and refuses in the caller's dialect when it cannot get one. Neither the
client secret nor a token appears in the gateway's log or in the recording."""

from __future__ import annotations

import asyncio
import json
import textwrap

import httpx
import pytest

from addons.devkit.mcpserver import MCPTestServer, TokenServer, client_session
from tests.recording.test_e2e import assert_no_secrets

pytestmark = pytest.mark.integration

SECRET = "cs-GATEWAY-OAUTH-E2E-SECRET-0000000000"
AGENT_TOKEN = "agent-own-bearer-token-must-not-pass-000"


def rules(ts: TokenServer, mcp: MCPTestServer, name: str = "crm",
          standin_upstreams: bool = False, dialect: str = "generic") -> str:
    head = "{standin_upstreams}" if standin_upstreams else "upstreams:\n"
    return head + textwrap.dedent(f"""\
          - name: {name}
            hosts: [mcp.crm.example]
            dialect: {dialect}
            forward_to: {mcp.base_url}
            credential:
              oauth:
                token_url: {ts.token_url}
                client_id: agentgate
                client_secret_env: AG_T_OAUTH_E2E
                scope: "mcp:tools"
                audience: crm
                ca_file: {ts.ca_path}
        identity: {{required: false}}
        approvals: {{listen: "off"}}
        recorder: {{batch_interval_ms: 20}}
        """)


def test_mcp_server_gets_the_gateway_token_never_the_agents(gateway_factory, standin,
                                                            tmp_path) -> None:
    certdir = standin.ca_path.parent  # the gateway already trusts this CA
    with TokenServer({"agentgate": SECRET}, certdir=certdir, lifetime=600) as ts, \
            MCPTestServer(certdir=certdir, require_auth=ts.valid, json_response=True) as mcp:
        gw = gateway_factory(rules(ts, mcp), env={"AG_T_OAUTH_E2E": SECRET})

        async def agent() -> list[str]:
            async with client_session("https://mcp.crm.example/mcp", ca=gw.ca_cert,
                                      proxy=gw.proxy_url(),
                                      headers={"authorization": f"Bearer {AGENT_TOKEN}"}) as c:
                out = [t.name for t in (await c.list_tools()).tools]
                for i in range(3):
                    r = await c.call_tool("add", {"a": i, "b": 1})
                    out.append(r.content[0].text)
                return out
        got = asyncio.run(asyncio.wait_for(agent(), 60))
        assert "add" in got and got[-3:] == ["1", "2", "3"]
        # one grant for the whole session, with the configured scope and audience
        assert len(ts.grants) == 1
        g = ts.grants[0]
        assert (g["client_id"], g["scope"], g["audience"], g["auth"]) == (
            "agentgate", "mcp:tools", "crm", "basic")
        token = g["token"]
        seen = [v for r in mcp.requests for k, v in r["headers"] if k == "authorization"]
        assert seen and set(seen) == {f"Bearer {token}"}
        assert all(AGENT_TOKEN not in json.dumps(r["headers"]) for r in mcp.requests)

        # the token endpoint goes down and the server revokes the token: a 401 makes the
        # gateway drop it, the next request finds no token -> 503 JSON, nothing forwarded
        ts.fail_next = 1000
        with ts._lock:
            ts._tokens.clear()
        before = len(mcp.requests)
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as h:
            hdrs = {"accept": "application/json, text/event-stream",
                    "authorization": f"Bearer {AGENT_TOKEN}"}
            first = h.post("https://mcp.crm.example/mcp", json=body, headers=hdrs)
            assert first.status_code == 401  # the server's own answer, passed back
            assert len(mcp.requests) == before + 1
            refused = h.post("https://mcp.crm.example/mcp", json=body, headers=hdrs)
        assert refused.status_code == 503, refused.text
        assert refused.headers["x-agentgate-refused"] == "credential_unavailable"
        assert "crm" in refused.text and "HTTP 500" in refused.text
        assert len(mcp.requests) == before + 1  # the refused request never left
        gw.stop()
        logs = gw.logs()
        for value in (SECRET, token):
            assert value not in logs
        assert_no_secrets(gw.data_dir / "agentgate.duckdb", values=(SECRET, token))


def test_a_slow_token_endpoint_holds_only_its_own_requests(gateway_factory, standin) -> None:
    """The token request runs off the event loop: while it hangs, other upstreams are served
    at full speed, and the waiting requests share one token request."""
    import threading
    import time

    import openai

    certdir = standin.ca_path.parent
    with TokenServer({"agentgate": SECRET}, certdir=certdir, lifetime=600) as ts, \
            MCPTestServer(certdir=certdir, require_auth=ts.valid, json_response=True) as mcp:
        gw = gateway_factory(rules(ts, mcp, standin_upstreams=True),
                             env={"AG_T_OAUTH_E2E": SECRET})
        ts.delay = 3.0
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        statuses: list[int] = []

        def tool_request() -> None:
            with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as h:
                r = h.post("https://mcp.crm.example/mcp", json=body,
                           headers={"accept": "application/json, text/event-stream"})
                statuses.append(r.status_code)
        waiting = [threading.Thread(target=tool_request) for _ in range(4)]
        for t in waiting:
            t.start()
        time.sleep(0.5)  # all four are now waiting for the token
        llm = openai.OpenAI(api_key="sk-agent", max_retries=0, timeout=30,
                            http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                  verify=str(gw.ca_cert)))
        t0 = time.monotonic()
        for _ in range(3):
            r = llm.chat.completions.create(model="gpt-4o-mini",
                                            messages=[{"role": "user", "content": "ping"}])
            assert r.choices[0].message.content == "echo: ping"
        fast = time.monotonic() - t0
        for t in waiting:
            t.join(30)
        assert fast < 2.0, f"other upstreams waited for the token endpoint ({fast:.2f}s)"
        assert statuses == [200] * 4
        assert len(ts.grants) == 1


def test_no_token_is_a_json_rpc_error_on_an_mcp_upstream(gateway_factory, standin) -> None:
    """On a `dialect: mcp` upstream the refusal is a JSON-RPC error the SDK client raises,
    naming why; the server never sees the request."""
    from mcp.shared.exceptions import McpError

    certdir = standin.ca_path.parent
    with TokenServer({"agentgate": SECRET}, certdir=certdir) as ts, \
            MCPTestServer(certdir=certdir, require_auth=ts.valid) as mcp:
        gw = gateway_factory(rules(ts, mcp, dialect="mcp"), env={"AG_T_OAUTH_E2E": "wrong"})

        async def agent() -> None:
            async with client_session("https://mcp.crm.example/mcp", ca=gw.ca_cert,
                                      proxy=gw.proxy_url()):
                pass
        with pytest.raises(BaseException) as ei:
            asyncio.run(asyncio.wait_for(agent(), 60))
        err = ei.value
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        assert isinstance(err, McpError), repr(err)
        assert "could not obtain a token" in err.error.message
        assert "HTTP 401 (invalid_client)" in err.error.message
        assert mcp.requests == [] and ts.grants == []
