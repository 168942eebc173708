"""The connector over real loopback sockets, against a fake gateway that records what it got."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from addons.connect.tokens import CommandToken, EnvToken, FileToken
from tests.connect.helpers import (
    free_port,
    jwt,
    recv_head,
    recv_until_closed,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
CONNECT = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n"


def dial(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def token_file(tmp_path: Path, token: str) -> Path:
    f = tmp_path / "token"
    tmp = tmp_path / "token.tmp"
    tmp.write_text(token)
    os.replace(tmp, f)  # atomic, like the kubelet's symlink swap
    return f


def test_connect_relays_bytes_both_ways(tmp_path, fake_gateway, connector) -> None:
    tok = jwt(time.time() + 300)
    c = connector(FileToken(str(token_file(tmp_path, tok))), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(CONNECT + b"early")  # bytes right behind the head go through too
        assert recv_head(s).startswith(b"HTTP/1.1 200")
        got = b""
        while b"early" not in got:
            got += s.recv(100)
        s.sendall(b"x" * 100_000)
        want = 100_000 + len(b"echo:") * 0
        seen = got.count(b"x")
        while seen < want:
            seen += s.recv(65536).count(b"x")
    assert fake_gateway.heads[0]["start"] == "CONNECT api.openai.com:443 HTTP/1.1"
    assert fake_gateway.tokens() == [tok]


def test_token_file_rotation_gives_each_connection_the_current_token(
        tmp_path, fake_gateway, connector) -> None:
    first, second = jwt(time.time() + 300, "a"), jwt(time.time() + 300, "b")
    f = token_file(tmp_path, first)
    c = connector(FileToken(str(f)), fake_gateway.port)
    with dial(c.port) as s1:
        s1.sendall(CONNECT)
        assert recv_head(s1).startswith(b"HTTP/1.1 200")
        token_file(tmp_path, second)
        with dial(c.port) as s2:
            s2.sendall(CONNECT)
            assert recv_head(s2).startswith(b"HTTP/1.1 200")
    assert fake_gateway.tokens() == [first, second]


def test_client_cannot_choose_the_token(tmp_path, fake_gateway, connector) -> None:
    tok = jwt(time.time() + 300)
    c = connector(FileToken(str(token_file(tmp_path, tok))), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
                  b"Proxy-Authorization: Basic YWdlbnQ6ZXZpbA==\r\n"
                  b"proxy-authorization: Bearer evil2\r\n\r\n")
        assert recv_head(s).startswith(b"HTTP/1.1 200")
    raw = fake_gateway.heads[0]["raw"].lower()
    assert raw.count(b"proxy-authorization") == 1 and b"evil" not in raw
    assert fake_gateway.tokens() == [tok]


def test_expired_token_in_the_file_opens_no_tunnel(tmp_path, fake_gateway, connector,
                                                   caplog) -> None:
    old = jwt(time.time() - 60)
    f = token_file(tmp_path, old)
    c = connector(FileToken(str(f)), fake_gateway.port)
    with caplog.at_level(logging.ERROR, logger="agentgate.connect"), dial(c.port) as s:
        s.sendall(CONNECT)
        answer = recv_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"expired" in answer and str(f).encode() in answer
    assert old.encode() not in answer
    assert fake_gateway.heads == []  # no tunnel, not even a connection attempt with it
    lines = [r.getMessage() for r in caplog.records if r.name == "agentgate.connect"]
    assert len(lines) == 1 and "expired" in lines[0] and old not in lines[0]


def test_command_failure_answers_503_and_the_next_connection_retries(
        tmp_path, fake_gateway, connector, caplog) -> None:
    flag = tmp_path / "ok"
    script = tmp_path / "tok.py"
    good = jwt(time.time() + 300)
    script.write_text(f"import pathlib, sys\nif not pathlib.Path({str(flag)!r}).exists():\n"
                      f"    sys.exit('identity service down')\nprint({good!r})\n")
    src = CommandToken(f"{sys.executable} {script}")
    c = connector(src, fake_gateway.port)
    with caplog.at_level(logging.ERROR, logger="agentgate.connect"), dial(c.port) as s:
        s.sendall(CONNECT)
        answer = recv_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"failed (exit status 1): identity service down" in answer
    assert fake_gateway.heads == []
    assert any("identity service down" in r.getMessage() for r in caplog.records)
    flag.write_text("")
    for _ in range(2):  # works now; the second connection uses the cached token
        with dial(c.port) as s:
            s.sendall(CONNECT)
            assert recv_head(s).startswith(b"HTTP/1.1 200")
    assert fake_gateway.tokens() == [good, good] and src.runs == 2


def test_gateway_unreachable_is_502_and_logged_once_not_per_retry(connector, caplog) -> None:
    port = free_port()  # nothing listens there
    c = connector(EnvToken("T", environ={"T": "opaque"}), port)
    with caplog.at_level(logging.ERROR, logger="agentgate.connect"):
        for _ in range(3):  # an agent retrying: every client gets the reason, stderr one line
            with dial(c.port) as s:
                s.sendall(CONNECT)
                answer = recv_until_closed(s)
            assert answer.startswith(b"HTTP/1.1 502 ")
            assert f"gateway 127.0.0.1:{port} unreachable".encode() in answer
    lines = [r.getMessage() for r in caplog.records if r.name == "agentgate.connect"]
    assert len(lines) == 1 and "unreachable" in lines[0]


def test_gateway_refusal_is_passed_back_as_is(fake_gateway, connector) -> None:
    fake_gateway.refuse = (407, b"token expired (rule identity)")
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(CONNECT)
        answer = recv_until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 Refused") and b"Proxy-Authenticate: Bearer" in head
    assert body == b"token expired (rule identity)"


def test_plain_http_is_forwarded_one_request_per_connection(fake_gateway, connector) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque-1"}), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(b"POST http://hooks.example/notify HTTP/1.1\r\nHost: hooks.example\r\n"
                  b"Connection: keep-alive\r\nProxy-Authorization: Basic ZXZpbA==\r\n"
                  b"Content-Length: 5\r\n\r\nhello")
        answer = recv_until_closed(s)  # the connector closes after one answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head and b"keep-alive" not in head.lower()
    assert body == b"plain POST http://hooks.example/notify 5"
    rec = fake_gateway.heads[0]
    assert rec["start"] == "POST http://hooks.example/notify HTTP/1.1" and rec["body"] == b"hello"
    assert fake_gateway.header(0, "connection") == "close"
    assert fake_gateway.tokens() == ["opaque-1"] and b"ZXZpbA" not in rec["raw"]


@pytest.mark.parametrize("request_head, status", [
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),          # origin-form: not a proxy
    (b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),          # https must be CONNECT
    (b"CONNECT api.openai.com HTTP/1.1\r\n\r\n", 400),             # no port
    (b"CONNECT a:443 HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),          # bare CR in a value
    (b"CONNECT a:443 HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n", 431),
])
def test_bad_request_heads_never_reach_the_gateway(fake_gateway, connector, request_head,
                                                   status) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(request_head)
        answer = recv_until_closed(s)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert fake_gateway.heads == []


def test_connections_beyond_the_cap_are_answered_503(fake_gateway, connector) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port, max_connections=1)
    with dial(c.port) as held:
        held.sendall(CONNECT)
        assert recv_head(held).startswith(b"HTTP/1.1 200")
        with dial(c.port) as s:
            s.sendall(CONNECT)
            answer = recv_until_closed(s)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
    # the slot is free again once the held connection ends
    assert wait_for(lambda: c.conn._active == 0)
    with dial(c.port) as s:
        s.sendall(CONNECT)
        assert recv_head(s).startswith(b"HTTP/1.1 200")
    assert len(fake_gateway.heads) == 2


def test_an_idle_tunnel_is_closed(fake_gateway, connector) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port, idle_timeout=0.5)
    with dial(c.port) as s:
        s.sendall(CONNECT)
        assert recv_head(s).startswith(b"HTTP/1.1 200")
        s.settimeout(30)
        assert s.recv(10) == b""  # closed by the connector, not by the test's timeout
    assert wait_for(lambda: c.conn._active == 0)


def test_a_silent_client_is_dropped(fake_gateway, connector) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port,
                  header_timeout=0.5)
    with dial(c.port) as s:
        s.sendall(b"CONNECT a:443 HTTP/1.1\r\n")  # never finishes its head
        s.settimeout(30)
        assert recv_until_closed(s).startswith(b"HTTP/1.1 408 ")
    assert fake_gateway.heads == []


def test_cli_prints_one_clear_line_per_refused_connection(tmp_path, fake_gateway) -> None:
    old = jwt(time.time() - 60)
    f = token_file(tmp_path, old)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "addons.cli", "connect", "--gateway",
                          f"http://127.0.0.1:{fake_gateway.port}", "--listen",
                          f"127.0.0.1:{port}", "--token-file", str(f)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        ready = p.stderr.readline()
        assert f"listening on http://127.0.0.1:{port}" in ready and str(f) in ready
        with dial(port) as s:
            s.sendall(CONNECT)
            assert recv_until_closed(s).startswith(b"HTTP/1.1 503 ")
        line = p.stderr.readline()
        assert "expired" in line and str(f) in line and old not in line
    finally:
        p.terminate()
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err  # SIGTERM is a clean stop
    assert old not in out + err and fake_gateway.heads == []


@pytest.mark.parametrize("args, message", [
    (["--gateway", "http://gw:8080", "--listen", "0.0.0.0:8888", "--token-env", "T"],
     "not a loopback address"),
    (["--gateway", "https://gw:8080", "--token-env", "T"], "must be an http:// URL"),
    (["--gateway", "http://agent:tok@gw:8080", "--token-env", "T"], "must not carry credentials"),
])
def test_cli_refuses_unsafe_arguments(args, message) -> None:
    import contextlib
    import io

    from addons.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["connect", *args]) == 2
    assert message in err.getvalue()


def test_a_hanging_token_command_answers_503_and_the_loop_keeps_serving(
        tmp_path, fake_gateway, connector) -> None:
    script = tmp_path / "hang.py"
    script.write_text("import time; time.sleep(60)")
    c = connector(CommandToken(f"{sys.executable} {script}", timeout=1), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(CONNECT)
        # while the command hangs the loop still answers another client (a bad head: 400)
        with dial(c.port) as other:
            other.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert recv_until_closed(other).startswith(b"HTTP/1.1 400 ")
        answer = recv_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"did not finish within 1 s" in answer
    assert fake_gateway.heads == []


def test_stopping_the_connector_ends_open_tunnels(fake_gateway, connector) -> None:
    c = connector(EnvToken("T", environ={"T": "opaque"}), fake_gateway.port)
    with dial(c.port) as s:
        s.sendall(CONNECT)
        assert recv_head(s).startswith(b"HTTP/1.1 200")
        c.stop()  # must not wait for the client (Server.wait_closed waits for connections)
        s.settimeout(30)
        assert recv_until_closed(s) == b""
