"""A hostile MCP server streams one heavy SSE event (millions of bytes of small JSON
values): reading, judging and writing it back must not hold the event loop (every other
flow of the gateway). Through a real mitmdump, with masking on the MCP upstream and with
`mask: false` (then the mcp addon's stream function is the response's own): the server
sends the whole event but its blank line, then the blank line, and another agent's small
request is sent just after: while the event is judged (in a worker thread, the stream's
layer paused) that request completes in a small part of the time the event takes.
Before, the event was parsed and judged inside mitmproxy's stream callback, on the loop
(~0.4 s per 6 MB here, idle): the other request waited for all of it (its latency was
~0.9 of the event's time).

The stream itself is unchanged: events in order, the heavy one whole and judged (its
value count intact), the last one after it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Gateway
from tests.hostile.edgekit import AGENT_KEY, CHAT, ChunkedHandler, client, serve_tls

pytestmark = pytest.mark.integration

N_VALUES = 2_000_000  # empty objects in one event: 6 MB, ~0.5 s to parse and judge


def _event(obj: object) -> bytes:
    return b"event: message\ndata: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# A server-to-client request the rules do not allow: the gateway reads and judges it,
# drops it (the agent never sees it) and answers the server with a JSON-RPC error; so
# the agent's next event waits for exactly that judging (nothing of it is masked).
HEAVY = _event({"jsonrpc": "2.0", "id": "s-1", "method": "sampling/createMessage",
                "params": {"messages": [], "maxTokens": 1, "metadata": {"rows": [{}] * N_VALUES}}})
LAST = _event({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text",
                                                                   "text": "done"}]}})


class Server:
    """Streams to a tools/call: a progress notification, the heavy event but its blank
    line (one write), then — when the test says so — its blank line and the answer at
    once, and ends. Any other POST (the gateway's answer to the refused request) gets 202
    and is kept."""

    def __init__(self, standin) -> None:
        self.heavy_sent = threading.Event()
        self.release = threading.Event()
        self.answers: list[dict] = []
        srv = self

        class H(ChunkedHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length")
                                                      or 0)))
                if body.get("method") != "tools/call":
                    srv.answers.append(body)
                    self.send_response(202)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._chunk(_event({"jsonrpc": "2.0", "method": "notifications/progress",
                                    "params": {"progressToken": 1, "progress": 0}}))
                self._chunk(HEAVY[:-2])
                srv.heavy_sent.set()
                srv.release.wait(30)
                self._chunk(HEAVY[-2:] + LAST)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server, self.url = serve_tls(H, standin)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(standin) -> Iterator[Server]:
    s = Server(standin)
    yield s
    s.stop()


def _gateway(gateway_factory, server: Server, mask: bool) -> Gateway:
    return gateway_factory(f"""{{standin_upstreams}}  - name: heavy-tools
    hosts: [heavy-tools.example.com]
    dialect: mcp
    mask: {"true" if mask else "false"}
    forward_to: {server.url}
identity:
  required: false
mcp:
  max_event_bytes: 16777216
""")


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "mask-false"])
def test_a_heavy_mcp_event_is_judged_while_other_flows_are_served(
        gateway_factory, server: Server, mask: bool) -> None:
    gw = _gateway(gateway_factory, server, mask)
    got = bytearray()
    times: dict[str, float] = {}
    errors: list[BaseException] = []
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "rows", "arguments": {}}}

    def stream() -> None:
        try:
            with client(gw) as c, c.stream(
                    "POST", "https://heavy-tools.example.com/mcp", content=json.dumps(call),
                    headers={"content-type": "application/json",
                             "accept": "application/json, text/event-stream"}) as r:
                assert r.status_code == 200
                for part in r.iter_raw():
                    got.extend(part)
                    if "last" not in times and b'"text":"done"' in got:
                        times["last"] = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def other(c: httpx.Client) -> float:
        t0 = time.monotonic()
        r = c.post("https://api.openai.com/v1/chat/completions", content=CHAT,
                   headers={"content-type": "application/json",
                            "authorization": f"Bearer {AGENT_KEY}"})
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert server.heavy_sent.wait(30)
    time.sleep(0.5)  # the gateway has read the event up to its blank line (cheap: no event)
    with client(gw) as c:
        other(c)  # the tunnel and the upstream connection open (kept for the next one)
        times["release"] = time.monotonic()
        server.release.set()
        time.sleep(0.02)  # the event is complete at the gateway: it is being judged
        latency = other(c)
    t.join(90)
    assert not errors, errors
    assert "last" in times, bytes(got[:300])
    took = times["last"] - times["release"]
    # served while the heavy event was being judged (in a small part of its time), not
    # after it
    assert latency < 0.5 * took, (latency, took)

    # judged as before: dropped for the agent, answered to the server, order kept
    events = [e for e in bytes(got).split(b"\n\n") if e.strip()]
    msgs = [json.loads(e.split(b"data: ", 1)[1]) for e in events]
    assert [m.get("id", m.get("method")) for m in msgs] == ["notifications/progress", 1]
    deadline = time.monotonic() + 10
    while not server.answers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(a.get("id"), a["error"]["code"]) for a in server.answers] == [("s-1", -32001)]
