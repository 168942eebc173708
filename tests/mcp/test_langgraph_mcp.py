"""Issue 13 acceptance: a real LangGraph agent uses the devkit MCP server's tools through
`langchain-mcp-adapters`, with the model (langchain-openai against the stand-in, which answers
with a tool call) and the tool server both reached through a real mitmdump, configured only by
environment (HTTPS_PROXY carrying the agent's OIDC token, SSL_CERT_FILE). The tool call goes
through policy (its rule is in the record) and masking (the card number never reaches the
agent nor the model), the recording holds the session's LLM and tool calls interleaved,
`agentgate audit sessions` shows them side by side, and the exported session replays offline
with `mitmdump --server-replay`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from addons.devkit.mcpserver import CUSTOMER_CARD, CUSTOMER_EMAIL, MCPTestServer
from tests.conftest import BIN, ROOT, free_port
from tests.recording.test_e2e import assert_no_secrets, wait_port

pytestmark = pytest.mark.integration

SESSION = "lg-mcp-1"
TOOL_TOKEN = "mcp-GATEWAY-CRM-TOKEN-000000000000000000"

# The agent: nothing but the environment (proxy + CA) and its own code. The session header is
# how a LangGraph app names its thread for the gateway's record (recorder.session_headers).
AGENT = r'''
import asyncio, json, os, sys
from typing import Annotated, TypedDict

from langchain_core.messages import AnyMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_openai import ChatOpenAI
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

HEADERS = {"X-Agent-Session": os.environ["AGENT_SESSION"]}


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


async def main(question: str) -> None:
    client = MultiServerMCPClient({"crm": {"url": "https://mcp.crm.example/mcp",
                                           "transport": "streamable_http",
                                           "headers": HEADERS}})
    tools = [t for t in await client.get_tools() if t.name == "lookup_customer"]
    llm = ChatOpenAI(model="gpt-4o-mini", api_key="managed-by-agentgate", max_retries=0,
                     timeout=60, default_headers=HEADERS).bind_tools(tools)

    async def model(state: State) -> dict:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    out = await graph.compile().ainvoke({"messages": [("user", question)]})
    print(json.dumps([{"type": m.type, "content": m.content,
                       "tool_calls": [c["name"] for c in getattr(m, "tool_calls", None) or []]}
                      for m in out["messages"]]))


asyncio.run(main(sys.argv[1]))
'''


def rules(mcp: MCPTestServer, identity: str) -> str:
    return f"""{{standin_upstreams}}
  - name: crm
    hosts: [mcp.crm.example]
    dialect: mcp
    forward_to: {mcp.base_url}
    credential: {{header: Authorization, prefix: "Bearer ", env: CRM_MCP_TOKEN}}
{identity}
approvals: {{listen: "off"}}
recorder: {{batch_interval_ms: 20}}
policies:
  - name: crm-lookups-for-support
    match: {{groups: [support], mcp: {{tool: lookup_customer}}}}
    action: allow
  - name: no-email-from-agents
    match: {{mcp: {{tool: send_email}}}}
    action: block
"""


def same(transcript: list[dict]) -> list[dict]:
    """The transcript without the ids langchain makes up per run for content blocks."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "id"}
        return [strip(x) for x in v] if isinstance(v, list) else v
    return strip(transcript)


def audit(gw, *args: str) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "sessions", "--db",
                        str(gw.data_dir / "agentgate.duckdb"), "--format", "json", *args],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [json.loads(x) for x in p.stdout.splitlines()]


def test_langgraph_agent_with_mcp_tools_through_the_gateway(
        gateway_factory, standin, oidc_provider, gateway_confdir: Path, tmp_path: Path) -> None:
    with MCPTestServer(certdir=standin.ca_path.parent) as mcp:
        gw = gateway_factory(rules(mcp, oidc_provider.identity_yaml()),
                             env={"CRM_MCP_TOKEN": TOOL_TOKEN})
        token = oidc_provider.token(sub="lg-agent", groups=["support"])
        env = {**gw.client_env(token), "AGENT_SESSION": SESSION}
        standin.clear()
        live = subprocess.run([sys.executable, "-c", AGENT, "Jane Doe"], env=env,
                              capture_output=True, text=True, timeout=180)
        assert live.returncode == 0, live.stderr[-3000:]
        transcript = json.loads(live.stdout)
        assert [m["type"] for m in transcript] == ["human", "ai", "tool", "ai"]
        assert transcript[1]["tool_calls"] == ["lookup_customer"]
        tool_result, final = transcript[2]["content"], transcript[3]["content"]
        # masked in the tool's answer: neither the agent nor the model saw the card number
        assert "Customer Jane Doe" in json.dumps(tool_result)
        assert CUSTOMER_CARD not in live.stdout and CUSTOMER_EMAIL not in live.stdout
        assert final.startswith("done: ")
        assert all(CUSTOMER_CARD not in r["body"] and CUSTOMER_EMAIL not in r["body"]
                   for r in standin.requests)
        # the server got the call, with the gateway's credential and not the agent's token
        calls = mcp.jsonrpc("tools/call")
        assert [c["params"]["name"] for c in calls] == ["lookup_customer"]
        auths = {v for r in mcp.requests for k, v in r["headers"] if k == "authorization"}
        assert auths == {f"Bearer {TOOL_TOKEN}"}

        # the record: one session, LLM and tool calls interleaved, the tool call's rule
        deadline = time.monotonic() + 10
        while True:
            rows = audit(gw, "--session", SESSION)
            if sum(r["kind"] == "llm" for r in rows) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        kinds = [r["kind"] for r in rows]
        calls_at = [i for i, r in enumerate(rows) if r["what"].startswith("tools/call")]
        llm_at = [i for i, k in enumerate(kinds) if k == "llm"]
        assert len(llm_at) == 2 and len(calls_at) == 1, rows
        assert llm_at[0] < calls_at[0] < llm_at[1]  # model -> tool -> model
        call = rows[calls_at[0]]
        assert call["what"] == "tools/call lookup_customer @crm"
        assert call["rule"] == "crm-lookups-for-support" and call["outcome"] == "forwarded"
        assert call["findings"] > 0 and call["identity_sub"] == "lg-agent"
        (summary,) = [s for s in audit(gw) if s["session_id"] == SESSION]
        assert summary["llm_calls"] == 2 and summary["tool_calls"] == 1
        assert summary["policy_blocks"] == 0 and summary["mcp_other"] >= 2

        # export the session and replay it offline: the same agent completes, same answers
        out = tmp_path / "lg-mcp.mitm"
        e = subprocess.run([sys.executable, "-m", "addons.cli", "export", "--db",
                            str(gw.data_dir / "agentgate.duckdb"), "--session", SESSION,
                            "-o", str(out)], cwd=str(ROOT), capture_output=True, text=True,
                           timeout=60)
        assert e.returncode == 0, e.stderr
        port = free_port()
        rp = subprocess.Popen([str(BIN / "mitmdump"), "--server-replay", str(out),
                               "--listen-host", "127.0.0.1", "--listen-port", str(port),
                               "--set", f"confdir={gateway_confdir}",
                               "--set", "server_replay_ignore_content=true",
                               "--set", "server_replay_extra=kill",
                               "--set", "connection_strategy=lazy"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_port(port, rp)
            standin.clear()
            mcp.clear()
            offline_env = {**env, "HTTPS_PROXY": f"http://127.0.0.1:{port}",
                           "HTTP_PROXY": f"http://127.0.0.1:{port}"}
            offline = subprocess.run([sys.executable, "-c", AGENT, "Jane Doe"],
                                     env=offline_env, capture_output=True, text=True,
                                     timeout=180)
        finally:
            rp.terminate()
            replay_log = rp.communicate(timeout=10)[0]
        assert offline.returncode == 0, offline.stderr[-3000:] + replay_log[-3000:]
        assert same(json.loads(offline.stdout)) == same(transcript)
        assert standin.requests == [] and mcp.requests == []  # offline: nothing upstream
        gw.stop()
        assert_no_secrets(out, gw.data_dir / "agentgate.duckdb", values=(TOOL_TOKEN, token))


def test_langgraph_mcp_agent_through_agentgate_connect(gateway_factory, standin, oidc_provider,
                                                        tmp_path: Path) -> None:
    """The same agent with HTTPS_PROXY pointing at `agentgate connect` (no token anywhere in
    the agent's environment): the connector adds the token, MCP and LLM calls both pass."""
    with MCPTestServer(certdir=standin.ca_path.parent) as mcp:
        gw = gateway_factory(rules(mcp, oidc_provider.identity_yaml()),
                             env={"CRM_MCP_TOKEN": TOOL_TOKEN})
        token_file = tmp_path / "token"
        token_file.write_text(oidc_provider.token(sub="lg-connect", groups=["support"]))
        port = free_port()
        conn = subprocess.Popen(
            [sys.executable, "-m", "addons.cli", "connect", "--gateway",
             f"http://127.0.0.1:{gw.port}", "--listen", f"127.0.0.1:{port}",
             "--token-file", str(token_file)], cwd=str(ROOT), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert conn.stderr is not None and "listening on" in conn.stderr.readline()
            env = {**gw.client_env(), "AGENT_SESSION": "lg-connect-1",
                   "HTTPS_PROXY": f"http://127.0.0.1:{port}", "HTTP_PROXY": ""}
            assert token_file.read_text() not in json.dumps(env)
            p = subprocess.run([sys.executable, "-c", AGENT, "Jane Doe"], env=env,
                               capture_output=True, text=True, timeout=180)
        finally:
            conn.terminate()
            conn.communicate(timeout=20)
        assert p.returncode == 0, p.stderr[-3000:]
        transcript = json.loads(p.stdout)
        assert [m["type"] for m in transcript] == ["human", "ai", "tool", "ai"]
        assert CUSTOMER_CARD not in p.stdout
        assert [c["params"]["name"] for c in mcp.jsonrpc("tools/call")] == ["lookup_customer"]
        deadline = time.monotonic() + 10
        while True:
            rows = audit(gw, "--session", "lg-connect-1")
            if len(rows) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {r["identity_sub"] for r in rows} == {"lg-connect"}
        assert [r["kind"] for r in rows if r["kind"] != "tool" or
                r["what"].startswith("tools/call")] == ["llm", "tool", "llm"]
