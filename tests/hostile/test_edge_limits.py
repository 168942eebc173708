"""Edge resource limits (the edge part of class 9): oversized heads, bodies declared or
streamed, slow and idle clients. After each, the gateway still serves a normal request and
its RSS stayed bounded."""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from tests.hostile.edgekit import (
    AGENT_KEY,
    SplitTLS,
    assert_healthy,
    connect_tunnel,
    rss_kb,
    status_of,
)

pytestmark = pytest.mark.integration

RULES = "{standin_upstreams}identity:\n  required: false\n"


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(RULES, extra_args=(
        "--set", "agentgate_max_body_bytes=4194304",
        "--set", "agentgate_head_timeout=2", "--set", "agentgate_body_timeout=3"))


def tunnel(gw, host: str = "api.openai.com") -> tuple[socket.socket, SplitTLS]:
    s, head = connect_tunnel(gw, f"{host}:443", timeout=60)
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    t = SplitTLS(s, gw.ca_cert, host, first_split=0)
    t.handshake()
    return s, t


def head(path: str = "/v1/chat/completions", extra: str = "", length: int | None = 0,
         chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: api.openai.com",
             "Content-Type: application/json", f"Authorization: Bearer {AGENT_KEY}"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def send_until_answer(t: SplitTLS, s: socket.socket, chunks) -> bytes:
    """Push chunks until the gateway answers or closes; returns what it answered (a reset
    while we were still sending can eat the answer: callers also check the gateway's log)."""
    got = b""
    s.settimeout(0.2)
    try:
        for chunk in chunks:
            t.send(chunk)
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            t.inc.write(data)  # may be only TLS session tickets: keep sending then
            try:
                got += t.obj.read(65536)
            except ssl.SSLWantReadError:
                continue
            break
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    s.settimeout(30)
    try:
        return got + t.recv_all()
    except (ssl.SSLError, OSError):
        return got


def assert_json_413(answer: bytes) -> None:
    head_, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head_.lower(), head_
    assert b"<html" not in answer.lower() and b"mitmproxy" not in answer.lower()
    err = json.loads(body)["error"]  # an OpenAI-dialect error: the tunnel is api.openai.com
    assert err["code"] == "body_too_large" and err["type"] == "invalid_request_error"


def test_huge_header_gets_431_without_being_buffered(gw, standin) -> None:
    standin.clear()
    s, t = tunnel(gw)
    line = "X-Pad: " + "a" * 65000 + "\r\n"
    before = rss_kb(gw)
    answer = send_until_answer(
        t, s, (head()[:-2] if i == 0 else line.encode() for i in range(1024)))  # 64 MiB
    s.close()
    assert status_of(answer) in (431, 0), answer[:300]
    assert not answer or b"headers_too_large" in answer
    assert "request head over 65536 bytes" in gw.logs()
    assert rss_kb(gw) - before < 32 * 1024
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_huge_header_to_the_proxy_itself_gets_a_json_431(gw, standin) -> None:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(b"POST http://hooks.example.com/x HTTP/1.1\r\nHost: hooks.example.com\r\n")
    answer = b""
    try:
        for _ in range(40):
            s.sendall(b"X-Pad: " + b"a" * 10000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    assert status_of(answer) == 431, answer[:300]
    assert b'"code": "headers_too_large"' in answer
    assert standin.requests == [] or all("/x" not in r["path"] for r in standin.requests)
    assert_healthy(gw, standin)


def test_too_many_headers_get_431(gw, standin) -> None:
    standin.clear()
    s, t = tunnel(gw)
    t.send(head(extra="".join(f"X-H{i}: v\r\n" for i in range(150))))
    answer = t.recv_all()
    s.close()
    assert status_of(answer) == 431, answer[:300]
    assert b"headers_too_large" in answer  # ours, not an upstream's own 431
    assert standin.requests == []


def test_declared_huge_content_length_gets_413_at_once(gw, standin) -> None:
    standin.clear()
    s, t = tunnel(gw)
    t.send(head(length=200 * 1024 * 1024))  # ...and no body at all
    answer = t.recv_all()
    s.close()
    assert status_of(answer) == 413, answer[:300]
    # mitmproxy's own body_size_limit check answers first: in the caller's dialect, not HTML
    assert_json_413(answer)
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_chunked_200mb_body_is_cut_with_bounded_memory(gw, standin) -> None:
    standin.clear()
    before = rss_kb(gw)
    s, t = tunnel(gw)
    t.send(head(chunked=True))
    mb = b"a" * (1 << 20)
    chunk = f"{len(mb):x}\r\n".encode() + mb + b"\r\n"
    answer = send_until_answer(t, s, (chunk for _ in range(200)))
    s.close()
    assert status_of(answer) in (413, 0), answer[:300]
    if answer:
        assert_json_413(answer)
    assert "body_size_limit" in gw.logs()
    assert standin.requests == []
    assert rss_kb(gw) - before < 64 * 1024  # 4 MiB limit: nowhere near 200 MB held
    assert_healthy(gw, standin)


def test_idle_and_slowloris_connections_are_closed(gw, standin) -> None:
    # idle tunnel: CONNECT + TLS, then nothing
    s, t = tunnel(gw)
    s.settimeout(60)
    assert t.recv_all() == b""  # closed by the gateway, not by our timeout
    s.close()
    # slowloris: a head that never ends, one byte at a time
    s, t = tunnel(gw)
    s.settimeout(0.5)
    closed = False
    for b in head()[:-2] + b"X-Slow: " + b"a" * 200:
        try:
            t.send(bytes([b]))
            if s.recv(65536) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    s.close()
    assert closed, "the slow head was not cut"
    # a body that never arrives
    s, t = tunnel(gw)
    t.send(head(length=100))
    s.settimeout(60)
    answer = t.recv_all()
    s.close()
    assert b" 200 " not in answer[:20]
    assert standin.requests == [] or all(r["raw_len"] != 100 for r in standin.requests)
    assert_healthy(gw, standin)


def test_limit_options_are_validated(gateway_factory) -> None:
    gw = gateway_factory(RULES, extra_args=("--set", "agentgate_max_headers=0"), wait=False)
    assert gw.proc.wait(30) != 0
    assert "agentgate_max_headers must be a positive number" in gw.logs()
