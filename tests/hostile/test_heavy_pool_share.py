"""Heavy work of WebSocket policy and of MCP answers is counted in the identity's share of
the gateway's worker threads (frame/offload.FairPool), as masking's is: through a real
mitmdump whose pool has one slot and a queue of one job per identity (tests/hostile/
_tiny_pool.py), one identity keeps the slot busy (masking a request of 300k e-mail
addresses) and sends three more heavy items at once — WebSocket messages of 80 KB to a
`mask: false` upstream, or 100 KB JSON answers from a `mask: false` MCP server. The share
is full: at least one is refused at once in the caller's dialect — a WebSocket closed with
1013 (try again later) and the refusal recorded, a JSON-RPC error with the request's id
naming the queue — nothing of a refused item is forwarded, and the gateway keeps
serving. Before, both went to asyncio's own executor (min(32, cores + 4) threads), past
the identity's share: every item was judged at once, none refused.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hostile.edgekit import AGENT_KEY, assert_healthy, client, connect_tunnel
from tests.hostile.test_mcp import HostileServer, evil  # noqa: F401 - fixture
from tests.hostile.test_websocket import _records

pytestmark = pytest.mark.integration

TINY_POOL = Path(__file__).with_name("_tiny_pool.py")
N_ADDRESSES = 300_000  # ~7 MB to mask: one to several seconds holding the only slot


def _occupy(gw: Any, done: dict[str, Any]) -> threading.Thread:
    """The identity's slot taken: a chat request whose masking is long (in the pool)."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": " ".join(
        f"user{i}.x@example.com" for i in range(N_ADDRESSES))}]}).encode()

    def run() -> None:
        with client(gw) as c:
            r = c.post("https://api.openai.com/v1/chat/completions", content=body,
                       headers={"content-type": "application/json",
                                "authorization": f"Bearer {AGENT_KEY}"})
        done["status"] = r.status_code
        done["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # its masking holds the slot (the probe logs it): wait for that, then a little more so
    # that the slot is still held by it (the masking takes seconds), not by its policy step
    deadline = time.monotonic() + 60
    while "slot taken" not in gw.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline and t.is_alive(), "the occupier never took the slot"
        time.sleep(0.05)
    time.sleep(0.3)
    return t


def _while_occupied[R](gw: Any, n: int, send: Callable[[int], R]) -> list[R]:
    """`send(0..n-1)` at once, in threads, while the identity's slot is held (_occupy);
    their results, after the occupier finished."""
    done: dict[str, Any] = {}
    occupier = _occupy(gw, done)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = send(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    occupier.join(90)
    assert "at" in done, "the occupying request never finished"
    assert not errors, errors
    return out


def _mcp_call(gw: Any, rid: int) -> httpx.Response:
    with client(gw) as c:
        return c.post("https://evil-tools.example.com/mcp", content=json.dumps(
            {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
             "params": {"name": "rows", "arguments": {}}}),
            headers={"content-type": "application/json",
                     "accept": "application/json, text/event-stream"})


# ------------------------------------------------------------------------- WebSocket
@contextmanager
def _ws_upstream(standin: Any) -> Iterator[tuple[int, list[str]]]:
    from websockets.sync.server import serve
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(standin._leaf), str(standin._key))  # noqa: SLF001
    seen: list[str] = []

    def echo(ws: Any) -> None:
        for msg in ws:
            seen.append(msg)
            ws.send(f"echo: {len(msg)}")

    with serve(echo, "127.0.0.1", 0, ssl=sctx) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.socket.getsockname()[1], seen
        finally:
            server.shutdown()


def test_websocket_policy_work_is_in_the_identitys_share(gateway_factory, standin) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with _ws_upstream(standin) as (port, seen):
        gw = gateway_factory(
            "{standin_upstreams}  - name: live\n    hosts: [ws.example.com]\n"
            "    dialect: webhook\n    websocket: true\n    mask: false\n"
            f"    forward_to: https://127.0.0.1:{port}\n"
            "identity:\n  required: false\n"
            "policies:\n  - name: no-exfil\n    match: {prompt: {words: [exfiltrate]}}\n"
            "    action: block\n",
            extra_args=("-s", str(TINY_POOL)))
        cctx = ssl.create_default_context(cafile=str(gw.ca_cert))
        sockets = []
        for _ in range(3):
            sock, head = connect_tunnel(gw, "ws.example.com:443")
            assert b" 200 " in head.split(b"\r\n", 1)[0]
            sockets.append(connect("wss://ws.example.com/live", sock=sock, ssl=cctx,
                                   server_hostname="ws.example.com"))
        for ws in sockets:  # each socket open through to the upstream
            ws.send("hello")
            assert ws.recv(timeout=30) == "echo: 5"
        seen.clear()
        big = "lorem ipsum dolor sit amet " * 3000  # 81 KB: judged in the pool

        def send(i: int) -> Any:
            try:
                sockets[i].send(big)
                return sockets[i].recv(timeout=60)
            except ConnectionClosed as e:
                return e.rcvd

        outcomes = _while_occupied(gw, len(sockets), send)
        for ws in sockets:
            ws.close()
    refused = [o for o in outcomes if o is not None and not isinstance(o, str)]
    passed = [o for o in outcomes if isinstance(o, str)]
    assert refused, outcomes  # the identity's share was full: refused at once
    for close in refused:
        assert close.code == 1013, close
        assert "heavy body work" in close.reason, close.reason
    assert passed == [f"echo: {len(big)}"] * len(passed)
    assert len(seen) == len(passed)  # nothing of a refused message reached the upstream
    assert_healthy(gw, standin)
    record = _records(gw)
    assert "<busy>" in record and "1013" in record


# ------------------------------------------------------------------------------- MCP
MCP_RULES = """{{standin_upstreams}}  - name: evil-tools
    hosts: [evil-tools.example.com]
    dialect: mcp
    mask: false
    forward_to: https://127.0.0.1:{port}
identity:
  required: false
"""


def test_mcp_answer_work_is_in_the_identitys_share(
        gateway_factory, standin, evil: HostileServer) -> None:  # noqa: F811
    def answer(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        rid = json.loads(body)["id"]
        return 200, {"content-type": "application/json"}, json.dumps(
            {"jsonrpc": "2.0", "id": rid, "result": {"content": [
                {"type": "text", "text": "row " * 25_000}]}}).encode()

    evil.script = answer
    gw = gateway_factory(MCP_RULES.format(port=evil.port), extra_args=("-s", str(TINY_POOL)))
    outcomes = _while_occupied(gw, 3, lambda i: _mcp_call(gw, 10 + i))
    busy = []
    for i, r in enumerate(outcomes):
        assert r is not None and r.status_code == 200, r
        msg = r.json()
        assert msg["id"] == 10 + i
        if "error" in msg:
            busy.append(msg)
            assert msg["error"]["code"] == -32001, msg
            assert "heavy body work" in msg["error"]["message"], msg
            assert "row row" not in r.text  # nothing of the unjudged answer
        else:
            assert msg["result"]["content"][0]["text"] == "row " * 25_000
    assert busy, [r.text[:200] for r in outcomes if r is not None]
    assert_healthy(gw, standin)
    record = _records(gw)
    assert record.count("heavy body work") >= len(busy)  # each refusal recorded


# ----------------------------------------------------- masking's estimate (masking/cost.py)
@pytest.mark.parametrize("unit", ["passwd: x ", "acctqwerty "], ids=["passwd-runs", "custom"])
def test_bodies_heavy_for_other_detectors_leave_the_loop(gateway_factory, standin,
                                                         unit: str) -> None:
    """60 KB (under masking's size threshold) of `passwd: x` runs (~7 ms to mask here) or of
    a letters-only custom detector's matches (~28 ms): masking/cost.py counts what makes
    those detectors work, so each goes to the identity's share of the worker threads —
    here full (one slot held, one queued): at least one of three is refused at once with
    429 and nothing of it forwarded. Before, both were estimated at ~0.6 ms and masked on
    the event loop, holding every other flow: all three passed."""
    gw = gateway_factory("{standin_upstreams}identity:\n  required: false\n"
                         "masking:\n  custom:\n    - name: ACCT_REF\n"
                         "      pattern: 'acct[a-z]{6}'\n",
                         extra_args=("-s", str(TINY_POOL)))
    text = unit * (60_000 // len(unit))
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": text}]}).encode()

    def send(i: int) -> httpx.Response:
        with client(gw) as c:
            return c.post("https://api.openai.com/v1/chat/completions", content=body,
                          headers={"content-type": "application/json",
                                   "authorization": f"Bearer {AGENT_KEY}"})

    standin.clear()
    outcomes = _while_occupied(gw, 3, send)
    codes = [r.status_code if r is not None else None for r in outcomes]
    assert set(codes) <= {200, 429}, codes
    # refused before it was forwarded: its request's masking had no place (the answer's
    # masking may be refused too — the stand-in echoes the text — after it was forwarded)
    refused = [r for r in outcomes if r is not None and r.status_code == 429
               and "upstream response" not in r.json()["error"]["message"]]
    assert refused, [r.text[:200] for r in outcomes if r is not None]
    for r in refused:
        assert r.json()["error"]["code"] == "busy", r.text
    # what reached the upstream: the occupier and the ones not refused, masked
    assert len(standin.requests) == 1 + len(outcomes) - len(refused)
    if unit.startswith("acct"):
        assert all("acctqwerty" not in json.dumps(q.get("body", "")) for q in standin.requests)
    assert_healthy(gw, standin)


def test_mcp_stream_event_work_is_in_the_identitys_share(
        gateway_factory, standin, evil: HostileServer) -> None:  # noqa: F811
    """A heavy SSE event (`mask: false`: the mcp addon's stream function is the response's
    own) is judged in the identity's share too; with the share full, the agent gets a
    JSON-RPC error event for its request instead — never the unjudged event."""
    def answer(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        rid = json.loads(body)["id"]
        event = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": "rows"}],
            "structuredContent": {"rows": [{}] * 60_000}}}, separators=(",", ":"))
        return 200, {"content-type": "text/event-stream"}, \
            b"event: message\ndata: " + event.encode() + b"\n\n"

    evil.script = answer
    gw = gateway_factory(MCP_RULES.format(port=evil.port), extra_args=("-s", str(TINY_POOL)))
    outcomes = _while_occupied(gw, 3, lambda i: _mcp_call(gw, 20 + i))
    busy = 0
    for i, r in enumerate(outcomes):
        assert r is not None and r.status_code == 200, r
        events = [e for e in r.content.split(b"\n\n") if e.strip()]
        assert len(events) == 1, r.content[:300]
        msg = json.loads(events[0].split(b"data: ", 1)[1])
        assert msg["id"] == 20 + i
        if "error" in msg:
            busy += 1
            assert "too busy" in msg["error"]["message"], msg
            assert msg["error"]["data"]["code"] == "upstream_invalid_jsonrpc"
        else:
            assert len(msg["result"]["structuredContent"]["rows"]) == 60_000
    assert busy, [r.content[:200] for r in outcomes if r is not None]
    assert_healthy(gw, standin)
