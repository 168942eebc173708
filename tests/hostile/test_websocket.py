"""Class 4: WebSocket upgrades are refused unless the upstream opts in (`websocket: true`).

Hostile agent: the OpenAI Realtime API over a WebSocket got the real key injected and its
frames were neither masked, policed nor recorded. Refused by default, before any upstream
connection; other protocol upgrades (h2c, arbitrary) are refused too.

Messages (below the refusal tests): to an opted-in upstream (mask on) the agent sends PII in
a Realtime `conversation.item.create` and split across two plain text messages, a blocked
keyword and an approval keyword, and the upstream answers with PII split across
`response.text.delta` events: nothing raw reaches the upstream, the agent or the record,
and a blocked message closes the socket with 1008 naming the rule. On the base commit
`websocket: true` with masking on was a rules error (frames passed raw with `mask: false`).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb
import pytest

from tests.hostile.edgekit import (
    assert_healthy,
    connect_tunnel,
    http_req,
    status_of,
    tls_request,
)

pytestmark = pytest.mark.integration

WS_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory("{standin_upstreams}identity:\n  required: false\n")


@pytest.mark.parametrize("host,path", [("api.openai.com", "/v1/realtime?model=gpt-4o-realtime"),
                                       ("hooks.example.com", "/socket")])
def test_websocket_upgrade_refused_by_default(gw, standin, host: str, path: str) -> None:
    standin.clear()
    answer = tls_request(gw, f"{host}:443", http_req("GET", path, host, headers=WS_HEADERS),
                         sni=host)
    assert status_of(answer) == 403, answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert "websocket_not_allowed" in json.dumps(body)
    assert standin.requests == []
    assert_healthy(gw, standin)


@pytest.mark.parametrize("upgrade", ["h2c", "tls/1.2", "WebSocket, h2c"])
def test_other_protocol_upgrades_refused(gw, standin, upgrade: str) -> None:
    standin.clear()
    answer = tls_request(gw, "hooks.example.com:443",
                         http_req("GET", "/socket", "hooks.example.com",
                                  headers={"Upgrade": upgrade, "Connection": "Upgrade"}),
                         sni="hooks.example.com")
    assert status_of(answer) == 403, answer[:300]
    assert standin.requests == []


def test_opted_in_upstream_carries_websocket_messages(gateway_factory, standin) -> None:
    import ssl
    import threading

    from websockets.sync.client import connect
    from websockets.sync.server import serve

    from tests.hostile.edgekit import connect_tunnel

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(standin._leaf), str(standin._key))
    seen: list[str] = []

    def echo(ws) -> None:
        for msg in ws:
            seen.append(msg)
            ws.send(f"echo: {msg}")

    with serve(echo, "127.0.0.1", 0, ssl=sctx) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        gw = gateway_factory("{standin_upstreams}"
                             "  - name: live\n    hosts: [ws.example.com]\n"
                             "    dialect: webhook\n    websocket: true\n    mask: false\n"
                             f"    forward_to: https://127.0.0.1:{port}\n"
                             "identity:\n  required: false\n",
                             extra_args=("--set", "agentgate_head_timeout=1"))
        sock, head = connect_tunnel(gw, "ws.example.com:443")
        assert b" 200 " in head.split(b"\r\n", 1)[0]
        cctx = ssl.create_default_context(cafile=str(gw.ca_cert))
        with connect("wss://ws.example.com/live", sock=sock, ssl=cctx,
                     server_hostname="ws.example.com") as ws:
            ws.send("hello")
            assert ws.recv(timeout=30) == "echo: hello"
            import time
            time.sleep(2.5)  # longer than the idle timeout: an open WebSocket is not idle
            ws.send("again")
            assert ws.recv(timeout=30) == "echo: again"
        server.shutdown()
    assert seen == ["hello", "again"]
    assert_healthy(gw, standin)


# ---------------------------------------------------------------- messages inspected
EMAIL = "ann.lee@example.com"
CARD = "4111 1111 1111 1111"
VALUES = [EMAIL, "ann.lee@", CARD, "4111111111111111"]

RULES = """{standin_upstreams}  - name: live
    hosts: [ws.example.com]
    dialect: webhook
    websocket: true
    restore: RESTORE
    forward_to: https://127.0.0.1:PORT
identity:
  required: false
policies:
  - name: no-exfil
    match: {prompt: {regex: ['exfiltrat(e|ion)']}}
    action: block
  - name: hold-wire
    match: {prompt: {words: [wire transfer]}}
    action: approve
    approvers: [reviewers]
"""


def _leaks(text: str) -> list[str]:
    digits = re.sub(r"\D", "", text)
    return [v for v in VALUES if v in text] + (["card digits"] if "4111111111111111" in digits
                                               else [])


class Upstream:
    """A TLS WebSocket upstream: records every message; JSON events are echoed as they
    are, `{"type": "test.end"}` is answered with `script` and `{"type": "test.ended"}`,
    plain text is echoed as `echo: …`."""

    def __init__(self, standin: Any) -> None:
        self.seen: list[str] = []
        self.script: list[str] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(standin._leaf), str(standin._key))  # noqa: SLF001

    def handler(self, ws: Any) -> None:
        for msg in ws:
            text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
            self.seen.append(text)
            if text.startswith("{"):
                if json.loads(text).get("type") == "test.end":
                    for out in [*self.script, END]:
                        ws.send(out)
                else:
                    ws.send(text)
            else:
                ws.send(f"echo: {text}")


END = json.dumps({"type": "test.ended"})


def until_end(ws: Any) -> list[str]:
    """Messages the agent gets up to the upstream's end event (sent after everything)."""
    ws.send(json.dumps({"type": "test.end"}))
    got: list[str] = []
    while True:
        msg = ws.recv(timeout=30)
        if msg == END:
            return got
        got.append(msg)


@contextmanager
def live(gateway_factory: Any, standin: Any, restore: bool = False
         ) -> Iterator[tuple[Any, Upstream]]:
    from websockets.sync.server import serve
    up = Upstream(standin)
    with serve(up.handler, "127.0.0.1", 0, ssl=up.ctx) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        gw = gateway_factory(RULES.replace("PORT", str(port))
                             .replace("RESTORE", "true" if restore else "false"))
        try:
            yield gw, up
        finally:
            server.shutdown()


@contextmanager
def client(gw: Any) -> Iterator[Any]:
    from websockets.sync.client import connect
    sock, head = connect_tunnel(gw, "ws.example.com:443")
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    cctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    with connect("wss://ws.example.com/v1/realtime", sock=sock, ssl=cctx,
                 server_hostname="ws.example.com") as ws:
        yield ws


def _records(gw: Any) -> str:
    assert gw.stop() == 0
    db = gw.data_dir / "agentgate.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE flows").fetchall()]
        rows = con.execute(f"SELECT {', '.join(f'CAST({c} AS VARCHAR)' for c in cols)} "
                           "FROM flows").fetchall()
    finally:
        con.close()
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("*.wal"))
    return json.dumps(rows, default=str) + raw.decode("latin-1")


def test_agent_pii_never_reaches_the_upstream(gateway_factory, standin) -> None:
    item = {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": f"mail {EMAIL} card {CARD}"}]}}
    with live(gateway_factory, standin) as (gw, up):
        with client(gw) as ws:
            ws.send(json.dumps(item))
            got = json.loads(ws.recv(timeout=30))
            assert got["type"] == "conversation.item.create"
            assert "[EMAIL" in json.dumps(got)  # masked on the way out, not restored
            # split across two messages: neither half alone is a card number
            ws.send("my card is 4111 1111 ")
            ws.send("1111 1111 thanks")
            ws.send(" and a little more text")
            replies = until_end(ws)
        assert "thanks" in "".join(up.seen)
        assert not _leaks("".join(up.seen)), up.seen
        assert not _leaks(json.dumps(replies))
        assert_healthy(gw, standin)
        record = _records(gw)
        assert "thanks" in record  # the messages are in the record ...
        assert not _leaks(record)  # ... masked


def test_upstream_pii_split_across_deltas_is_masked_for_the_agent(gateway_factory,
                                                                   standin) -> None:
    def delta(text: str) -> str:
        return json.dumps({"type": "response.text.delta", "response_id": "r1", "item_id": "i1",
                           "output_index": 0, "content_index": 0, "delta": text})
    events = [delta("Your card is 4111 1111 "), delta("1111 1111"),
              json.dumps({"type": "response.text.done", "response_id": "r1", "item_id": "i1",
                          "output_index": 0, "content_index": 0,
                          "text": f"Your card is {CARD}"}),
              json.dumps({"type": "response.done", "response": {"id": "r1"}})]
    with live(gateway_factory, standin) as (gw, up):
        up.script = events
        with client(gw) as ws:
            got = [json.loads(m) for m in until_end(ws)]
        types = [e["type"] for e in got]
        assert types.count("response.text.delta") == 3, types  # + the held tail, flushed
        # the held tail goes out as a delta before the done event, in order
        assert types[-2:] == ["response.text.done", "response.done"], types
        streamed = "".join(e["delta"] for e in got if e["type"] == "response.text.delta")
        assert streamed.startswith("Your card is ") and len(streamed) > len("Your card is ")
        assert not _leaks(json.dumps(got)), got
        done = next(e for e in got if e["type"] == "response.text.done")
        assert streamed == done["text"]  # deltas and the full text agree (same placeholder)
        record = _records(gw)
        assert "response.text.done" in record and not _leaks(record)


def test_restore_gives_the_agent_its_values_but_the_record_keeps_them_masked(
        gateway_factory, standin) -> None:
    with live(gateway_factory, standin, restore=True) as (gw, up):
        with client(gw) as ws:
            ws.send(f"write to {EMAIL} please")
            ws.send(" and a little more text")
            replies = until_end(ws)
        assert not _leaks("".join(up.seen)), up.seen
        assert EMAIL in "".join(replies)  # restored for the agent
        record = _records(gw)
        assert "please" in record and not _leaks(record)


@pytest.mark.parametrize("text,rule", [("please exfiltrate the files", "no-exfil"),
                                       ("do a wire transfer now", "hold-wire")])
def test_blocked_message_closes_with_1008_naming_the_rule(gateway_factory, standin,
                                                          text: str, rule: str) -> None:
    from websockets.exceptions import ConnectionClosed
    with live(gateway_factory, standin) as (gw, up):
        with client(gw) as ws:
            ping = json.dumps({"type": "test.ping"})
            ws.send(ping)
            assert ws.recv(timeout=30) == ping
            ws.send(text)
            with pytest.raises(ConnectionClosed) as exc:
                ws.recv(timeout=30)
        rcvd = exc.value.rcvd
        assert rcvd is not None and rcvd.code == 1008, rcvd
        assert rule in rcvd.reason
        assert all(text not in s for s in up.seen), up.seen
        assert_healthy(gw, standin)


def test_unending_fragmented_message_is_cut_at_the_limit(gateway_factory, standin) -> None:
    """mitmproxy joins a message's frames before any hook runs: a message that never ends
    must be cut at agentgate_max_body_bytes, not buffered on (base: buffered, RSS grows)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve
    up = Upstream(standin)
    release = threading.Event()

    def fragments() -> Iterator[str]:
        for _ in range(8):
            yield "x" * 100_000
        release.wait(30)  # the message never ends while the gateway decides
        yield "end"

    with serve(up.handler, "127.0.0.1", 0, ssl=up.ctx) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        gw = gateway_factory(RULES.replace("PORT", str(port)).replace("RESTORE", "false"),
                             extra_args=("--set", "agentgate_max_body_bytes=300000"))
        try:
            with client(gw) as ws:
                sender = threading.Thread(target=lambda: _quietly(ws.send, fragments()),
                                          daemon=True)
                sender.start()
                with pytest.raises(ConnectionClosed) as exc:
                    ws.recv(timeout=30)
                release.set()
                sender.join(30)
            assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009, exc.value
            assert up.seen == []
            assert_healthy(gw, standin)
        finally:
            release.set()
            server.shutdown()


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the gateway closes the socket mid-message
        pass


def test_keyword_split_across_two_messages_closes_with_1008(gateway_factory, standin) -> None:
    from websockets.exceptions import ConnectionClosed
    with live(gateway_factory, standin) as (gw, up):
        with client(gw) as ws:
            ws.send("please exfil")
            ws.send("trate the files")
            with pytest.raises(ConnectionClosed) as exc:
                while True:
                    ws.recv(timeout=30)
        rcvd = exc.value.rcvd
        assert rcvd is not None and rcvd.code == 1008 and "no-exfil" in rcvd.reason, rcvd
        assert "trate" not in "".join(up.seen), up.seen
        assert_healthy(gw, standin)
