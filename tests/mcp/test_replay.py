"""A recorded MCP session replays: the SDK client's session through the gateway is recorded
(one flow per JSON-RPC exchange, with its MCP names), exported with `agentgate export`, and
the same client completes offline against `mitmdump --server-replay` with the recorded
answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from addons.devkit.mcpserver import MCPTestServer, client_session
from tests.conftest import BIN, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


async def _session(url: str, ca: Path, proxy: str) -> tuple[list[str], str]:
    async with client_session(url, ca=ca, proxy=proxy,
                              headers={"X-Agent-Session": "mcp-run-1"}) as s:
        names = sorted(t.name for t in (await s.list_tools()).tools)
        res = await s.call_tool("add", {"a": 20, "b": 22})
        return names, res.content[0].text


def test_recorded_mcp_session_replays_offline(gateway_factory, standin, gateway_confdir,
                                              tmp_path) -> None:
    server = MCPTestServer(certdir=Path(standin.ca_path).parent, json_response=True).start()
    try:
        gw = gateway_factory(f"""
identity: {{required: false}}
upstreams:
  - name: tools
    hosts: [tools.example.com]
    dialect: mcp
    forward_to: https://127.0.0.1:{server.port}
mcp:
  pinning: {{store: {tmp_path / 'pins.json'}}}
""")
        url = "https://tools.example.com/mcp"
        names, text = asyncio.run(asyncio.wait_for(
            _session(url, gw.ca_cert, gw.proxy_url()), 60))
        assert text == "42" and "add" in names
    finally:
        server.stop()
    db = gw.data_dir / "agentgate.duckdb"
    gw.stop()
    q = _cli("audit", "query", "--db", str(db), "--format", "json",
             "SELECT method, url, metadata FROM flows WHERE session_id = 'mcp-run-1' "
             "ORDER BY seq")
    assert q.returncode == 0, q.stderr
    rows = [json.loads(line) for line in q.stdout.splitlines() if line.strip()]
    meta = [json.loads(r["metadata"]) if isinstance(r["metadata"], str) else r["metadata"]
            for r in rows]
    methods = [(m.get("mcp") or {}).get("method") for m in meta]
    assert "initialize" in methods and "tools/list" in methods and "tools/call" in methods
    call = meta[methods.index("tools/call")]["mcp"]
    assert call["tool"] == "add" and call["session"]

    out = tmp_path / "mcp.mitm"
    e = _cli("export", "--db", str(db), "--session", "mcp-run-1", "-o", str(out))
    assert e.returncode == 0, e.stdout + e.stderr
    port = free_port()
    rp = subprocess.Popen([str(BIN / "mitmdump"), "--server-replay", str(out),
                           "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={gateway_confdir}",
                           "--set", "server_replay_extra=kill",
                           "--set", "server_replay_reuse=true",
                           "--set", "connection_strategy=lazy"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        import socket
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        again = asyncio.run(asyncio.wait_for(
            _session(url, gw.ca_cert, f"http://127.0.0.1:{port}"), 60))
        assert again == (names, text)  # the server is gone: these are the recorded answers
    except BaseException:
        rp.terminate()
        print(rp.communicate(timeout=10)[0])
        raise
    finally:
        rp.terminate()
        rp.wait(10)
