"""Every refusal an agent can get is a JSON error in its API's dialect — including the ones
mitmproxy makes itself below every addon hook (413 from body_size_limit, 400 for a malformed
head or a CONNECT inside a tunnel, 502 when the upstream connection fails), which were HTML
pages naming mitmproxy and quoting the request."""

from __future__ import annotations

import json
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest

from addons.frame.errors import error_types
from tests.hostile.edgekit import (
    AGENT_KEY,
    SplitTLS,
    assert_healthy,
    client,
    connect_tunnel,
    read_until_closed,
    status_of,
)

pytestmark = pytest.mark.integration

MARKER = "leak-canary-7f3a"  # request text that must never come back in an error
LIMIT = 1024 * 1024
RULES = "{standin_upstreams}identity:\n  required: false\n"
ENDPOINT = {"api.openai.com": "/v1/chat/completions", "api.anthropic.com": "/v1/messages"}


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(RULES, extra_args=("--set", f"agentgate_max_body_bytes={LIMIT}"))


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return status_of(raw), headers, body


def assert_dialect_json(status: int, headers: dict[str, str], body: bytes, want: int,
                        dialect: str, code: str) -> None:
    assert status == want, body[:300]
    assert headers.get("content-type") == "application/json", headers
    text = body.decode("utf-8", "replace")
    assert "<html" not in text.lower() and "mitmproxy" not in text.lower(), text
    assert "mitmproxy" not in headers.get("server", "")
    assert MARKER not in text and AGENT_KEY not in text
    doc = json.loads(body)
    openai_type, anthropic_type = error_types(want)
    if dialect == "anthropic":
        assert doc["type"] == "error" and doc["error"]["code"] == code, doc
        assert doc["error"]["type"] == anthropic_type, doc
    else:
        assert "type" not in doc and doc["error"]["code"] == code, doc
        assert doc["error"]["type"] == openai_type, doc
        assert doc["error"]["message"].startswith("agentgate: "), doc


def tunnel(gw, host: str) -> tuple[socket.socket, SplitTLS]:
    s, head = connect_tunnel(gw, f"{host}:443", timeout=30)
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    t = SplitTLS(s, gw.ca_cert, host, first_split=0)
    t.handshake()
    return s, t


@pytest.mark.parametrize("host,dialect", [("api.anthropic.com", "anthropic"),
                                          ("api.openai.com", "openai")])
def test_content_length_over_limit_is_a_dialect_413(gw, standin, host, dialect):
    before = len(standin.requests)
    s, t = tunnel(gw, host)
    t.send((f"POST {ENDPOINT[host]}?q={MARKER} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {AGENT_KEY}\r\n"
            f"Content-Length: {LIMIT * 8}\r\n\r\n").encode())
    raw = t.recv_all()
    s.close()
    assert_dialect_json(*split(raw), 413, dialect, "body_too_large")
    assert len(standin.requests) == before  # nothing went upstream
    assert_healthy(gw, standin)


def recv_some(t: SplitTLS) -> bytes:
    """Whatever TLS data is available next (b"" once the connection is closed)."""
    while True:
        try:
            return t.obj.read(65536)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        try:
            chunk = t.sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return b""
        if not chunk:
            return b""
        t.inc.write(chunk)


def h2_answer(t: SplitTLS, headers: list[tuple[str, str]]) -> tuple[int, dict, bytes]:
    """Send one HTTP/2 request head (no body) and read its answer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    t.send(conn.data_to_send())
    status, got, body = 0, {}, b""
    while True:
        data = recv_some(t)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                got = {k.decode(): v.decode() for k, v in ev.headers}
                status = int(got.pop(":status"))
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                 h2.events.ConnectionTerminated)):
                return status, got, body
        out = conn.data_to_send()
        if out:
            t.send(out)
    return status, got, body


def test_content_length_over_limit_over_http2(gw, standin):
    before = len(standin.requests)
    s, head = connect_tunnel(gw, "api.anthropic.com:443", timeout=30)
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    t = SplitTLS(s, gw.ca_cert, "api.anthropic.com", first_split=0, alpn=["h2"])
    t.handshake()
    assert t.obj.selected_alpn_protocol() == "h2"
    status, headers, body = h2_answer(t, [
        (":method", "POST"), (":scheme", "https"), (":authority", "api.anthropic.com"),
        (":path", f"/v1/messages?q={MARKER}"), ("content-type", "application/json"),
        ("content-length", str(LIMIT * 8))])
    s.close()
    assert_dialect_json(status, headers, body, 413, "anthropic", "body_too_large")
    assert len(standin.requests) == before


def test_malformed_head_in_tunnel_is_a_dialect_400(gw, standin):
    s, t = tunnel(gw, "api.anthropic.com")
    t.send(f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\n"
           f"x-canary {MARKER} without a colon\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    raw = t.recv_all()
    s.close()
    assert_dialect_json(*split(raw), 400, "anthropic", "bad_request")
    assert_healthy(gw, standin)


@pytest.mark.parametrize("head", [
    # a request line mitmproxy cannot parse (the layer guard let it through as HTTP)
    f"GET http://hooks.example.com:99999999/{MARKER} HTTP/1.1\r\n"
    "Host: hooks.example.com\r\n\r\n",
    # framing that would allow smuggling
    f"POST http://hooks.example.com/{MARKER} HTTP/1.1\r\nHost: hooks.example.com\r\n"
    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
], ids=["port", "te-and-cl"])
def test_malformed_request_on_proxy_port_is_json_400(gw, standin, head):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(head.encode())
    raw = read_until_closed(s)
    s.close()
    assert_dialect_json(*split(raw), 400, "generic", "bad_request")
    assert_healthy(gw, standin)


def test_unknown_http_version_is_refused_not_forwarded(gw, standin):
    # mitmproxy parses "HTTP/9.9" and forwarded it upstream as such (the upstream answered
    # its own HTML 505, passed on as an HTML 502): refused at the edge with a JSON 505.
    before = len(standin.requests)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(f"GET http://hooks.example.com/{MARKER} HTTP/9.9\r\n"
              "Host: hooks.example.com\r\n\r\n".encode())
    raw = read_until_closed(s)
    s.close()
    assert_dialect_json(*split(raw), 505, "generic", "http_version_not_supported")
    assert len(standin.requests) == before
    assert_healthy(gw, standin)


def test_connect_inside_tunnel_is_a_dialect_400(gw, standin):
    s, t = tunnel(gw, "api.openai.com")
    t.send(f"CONNECT {MARKER}.example.com:443 HTTP/1.1\r\n"
           f"Host: {MARKER}.example.com:443\r\n\r\n".encode())
    raw = t.recv_all()
    s.close()
    assert_dialect_json(*split(raw), 400, "openai", "bad_request")
    assert_healthy(gw, standin)


def test_upstream_refusing_connections_is_a_dialect_502(gateway_factory, standin):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    rules = ("upstreams:\n"
             "  - name: anthropic\n    hosts: [api.anthropic.com]\n    dialect: anthropic\n"
             f"    forward_to: https://127.0.0.1:{port}\n"
             "    credential: {header: x-api-key, env: ANTHROPIC_API_KEY}\n"
             "  - name: openai\n    hosts: [api.openai.com]\n    dialect: openai\n"
             f"    forward_to: {standin.url}\n"
             "    credential: {header: Authorization, prefix: 'Bearer ', "
             "env: OPENAI_API_KEY}\n"
             "identity:\n  required: false\n")
    gw = gateway_factory(rules)
    with client(gw) as c:
        r = c.post(f"https://api.anthropic.com/v1/messages?q={MARKER}",
                   content=json.dumps({"model": "claude-3-5-haiku-latest", "max_tokens": 5,
                                       "messages": [{"role": "user",
                                                     "content": MARKER}]}).encode(),
                   headers={"content-type": "application/json", "x-api-key": AGENT_KEY})
    headers = {k.lower(): v for k, v in r.headers.items()}
    assert_dialect_json(r.status_code, headers, r.content, 502, "anthropic",
                        "upstream_unreachable")
    assert_healthy(gw, standin)
