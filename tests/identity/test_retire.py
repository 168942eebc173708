"""A tunnel is retired before the token bound at CONNECT expires (issue 12, item 2).

SDK pools never reconnect after a 401, so expiry must never surface to a pooled client as an
error: inside `identity.retire_before` of `exp` responses carry `Connection: close`, an idle
tunnel is closed, and the pool opens a new connection with a fresh token.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from mitmproxy.test import taddons, tflow

import addons.identity.addon as identity_mod
from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.identity.addon import Identity
from tests.identity.test_addon import UPSTREAMS, basic, flow

DUMMY = "sk-agent-dummy-key-0000"


def with_retire(identity_yaml: str, retire: str) -> str:
    return identity_yaml.replace("  required: true\n",
                                 f"  required: true\n  retire_before: {retire}\n", 1)


def holder(tmp_path: Path, identity_yaml: str) -> RulesHolder:
    (tmp_path / "upstreams.yaml").write_text(UPSTREAMS)
    (tmp_path / "identity.yaml").write_text(identity_yaml)
    return RulesHolder(load_rules(tmp_path))


# ---------------------------------------------------------------- rules
@pytest.mark.parametrize("value,seconds", [("45", 45), ("30s", 30), ("2m", 120), ("0", 0)])
def test_retire_before_parses(tmp_path, local_issuer, value, seconds) -> None:
    h = holder(tmp_path, with_retire(local_issuer.identity_yaml(), value))
    assert h.rules.identity.retire_before == seconds


def test_retire_before_default_and_bad_values(tmp_path, local_issuer) -> None:
    assert holder(tmp_path, local_issuer.identity_yaml()).rules.identity.retire_before == 30
    for bad in ("-1", "soon", "2d", "7200", "true"):
        with pytest.raises(ConfigError, match="retire_before"):
            holder(tmp_path, with_retire(local_issuer.identity_yaml(), bad))


# ---------------------------------------------------------------- unit (taddons)
def tunnel(addon: Identity, token: str):
    c = flow(method="CONNECT", headers={"proxy-authorization": basic(token)})
    asyncio.run(addon.http_connect(c))
    assert c.response is None
    return c


def serve(addon: Identity, c) -> tflow.tflow:
    f = flow(client_conn=c.client_conn)
    f.request.http_version = "HTTP/1.1"
    asyncio.run(addon.requestheaders(f))
    addon.request(f)
    f.response = tflow.tresp()
    addon.responseheaders(f)
    addon.response(f)
    return f


def test_response_inside_margin_carries_connection_close(tmp_path, local_issuer) -> None:
    a = Identity(holder(tmp_path, with_retire(local_issuer.identity_yaml(), "30s")))
    with taddons.context(a):
        fresh = tunnel(a, local_issuer.token(expires_in=300))
        f = serve(a, fresh)
        assert f.response.status_code == 200 and "connection" not in f.response.headers
        near = tunnel(a, local_issuer.token(expires_in=20))  # 20 s left < 30 s margin
        f = serve(a, near)
        assert f.response.status_code == 200  # still served ...
        assert f.response.headers["connection"] == "close"  # ... and the tunnel retired
        # a request without a CONNECT-bound token (inner bearer) is not a tunnel to retire
        f = flow(headers={"authorization": f"Bearer {local_issuer.token(expires_in=20)}"})
        asyncio.run(a.requestheaders(f))
        f.response = tflow.tresp()
        a.response(f)
        assert "connection" not in f.response.headers


def test_margin_zero_retires_only_at_exp(tmp_path, local_issuer) -> None:
    a = Identity(holder(tmp_path, with_retire(local_issuer.identity_yaml(), "0")))
    with taddons.context(a):
        f = serve(a, tunnel(a, local_issuer.token(expires_in=20)))
        assert "connection" not in f.response.headers


class _Handler:
    def __init__(self, client) -> None:
        self.client = client
        self.closed = 0

    def close_connection(self, client) -> None:
        assert client is self.client
        self.closed += 1


def test_timer_closes_only_at_exp_and_only_when_idle(tmp_path, local_issuer,
                                                     monkeypatch) -> None:
    """The per-tunnel timer (driven here by hand): inside the margin an idle tunnel stays open
    (closing it under a request the client is sending would be an error); at exp it is closed
    once no request is in flight."""
    a = Identity(holder(tmp_path, with_retire(local_issuer.identity_yaml(), "30s")))
    with taddons.context(a) as tctx:
        # taddons has no proxyserver: one holding the connection handlers the addon closes
        proxyserver = type("ProxyServer", (), {"connections": {}})()
        monkeypatch.setattr(tctx.master.addons, "get",
                            lambda name: proxyserver if name == "proxyserver" else None)
        near = local_issuer.token(expires_in=20)
        idle, busy = tunnel(a, near), tunnel(a, near)
        handlers = {}
        for c in (idle, busy):
            handlers[c.client_conn.id] = proxyserver.connections[c.client_conn.id] = \
                _Handler(c.client_conn)
        serve(a, idle)
        inflight = flow(client_conn=busy.client_conn)
        asyncio.run(a.requestheaders(inflight))
        a.request(inflight)  # no response yet: a long stream
        # inside the margin, before exp: nothing is closed
        for c in (idle, busy):
            a._check_retire(c.client_conn.id)
        assert [h.closed for h in handlers.values()] == [0, 0]
        # at exp
        exp = a._conns[idle.client_conn.id].exp
        monkeypatch.setattr(identity_mod, "_now", lambda: exp + 1)
        for c in (idle, busy):
            a._check_retire(c.client_conn.id)
        assert handlers[idle.client_conn.id].closed == 1
        assert idle.client_conn.id not in a._conns
        assert handlers[busy.client_conn.id].closed == 0    # a request is in flight
        # the stream ends: its response carries Connection: close, and once idle it closes
        inflight.response = tflow.tresp()
        a.response(inflight)
        assert inflight.response.headers["connection"] == "close"
        a._check_retire(busy.client_conn.id)
        assert handlers[busy.client_conn.id].closed == 1
        a.client_disconnected(busy.client_conn)
        assert busy.client_conn.id not in a._conns


# ---------------------------------------------------------------- through a real mitmdump
class FreshTokenForwarder:
    """What `agentgate connect` does, in a thread: a loopback HTTP proxy that forwards each
    CONNECT to the gateway with a freshly issued token in Proxy-Authorization."""

    def __init__(self, gateway_port: int, new_token) -> None:
        self.gateway_port = gateway_port
        self.new_token = new_token
        self.connects = 0
        self.refused: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk or len(head) > 65536:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode()
            method, target, _ = line.split(" ", 2)
            if method != "CONNECT":
                return
            cred = base64.b64encode(f"agent:{self.new_token()}".encode()).decode()
            upstream = socket.create_connection(("127.0.0.1", self.gateway_port), timeout=30)
            with upstream:
                upstream.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                                 f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
                reply = b""
                while b"\r\n\r\n" not in reply:
                    chunk = upstream.recv(4096)
                    if not chunk:
                        return
                    reply += chunk
                if b" 200 " not in reply.split(b"\r\n", 1)[0]:
                    self.refused.append(reply)
                    client.sendall(reply)
                    return
                self.connects += 1
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.settimeout(None)
                t = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
                t.start()
                self._pipe(client, upstream)
                t.join(30)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        # one side closed: close both, so the agent's pool sees the gateway's close
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop = True
        self._sock.close()


@pytest.fixture
def rotating(gateway_factory, local_issuer) -> Iterator[tuple[object, FreshTokenForwarder]]:
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                          "identity.yaml": with_retire(local_issuer.identity_yaml(leeway=0), "5s")})
    fwd = FreshTokenForwarder(gw.port, lambda: local_issuer.token(sub="pooled-agent",
                                                                  expires_in=8))
    yield gw, fwd
    fwd.stop()


def pooled_client(gw, fwd: FreshTokenForwarder) -> openai.OpenAI:
    # max_retries=0: a retried failure must not hide a refused call. keepalive_expiry
    # above the token's life: the pool must not drop idle connections itself (httpx's
    # default is 5 s), only the gateway may.
    return openai.OpenAI(api_key=DUMMY, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(
                             proxy=f"http://127.0.0.1:{fwd.port}", verify=str(gw.ca_cert),
                             limits=httpx.Limits(max_connections=10, keepalive_expiry=120)))


def call(client: openai.OpenAI, n: int) -> str:
    r = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": f"call {n}"}])
    return r.choices[0].message.content


@pytest.mark.integration
def test_pooled_client_outlives_its_tokens(rotating, standin) -> None:
    """One client built once, a call every second for 12 s with 8 s tokens: no call fails,
    and the gateway retired tunnels (more than one connection)."""
    gw, fwd = rotating
    client = pooled_client(gw, fwd)
    standin.clear()
    failures: list[str] = []
    start = time.monotonic()
    n = 0
    # at least 10 calls and at least 12 s (on a loaded machine a call can take seconds: a
    # fixed 12 s window then held fewer calls than the test is about)
    while n < 10 or time.monotonic() - start < 12:
        n += 1
        try:
            assert call(client, n) == f"echo: call {n}"
        except Exception as exc:  # noqa: BLE001 - count every kind of failure
            failures.append(f"call {n}: {exc!r}")
        time.sleep(1)
    assert failures == []
    assert fwd.refused == []
    assert fwd.connects > 1
    assert len(standin.requests) == n


@pytest.mark.integration
def test_idle_tunnel_is_closed_when_its_token_expires(rotating, standin) -> None:
    """A pooled connection left idle past its token's exp is not reused into a 401."""
    gw, fwd = rotating
    client = pooled_client(gw, fwd)
    assert call(client, 1) == "echo: call 1"
    time.sleep(9)  # past the first token's exp (8 s)
    assert call(client, 2) == "echo: call 2"
    assert fwd.connects == 2
    assert "closing idle tunnel" in gw.logs()


@pytest.mark.integration
def test_mitmproxy_closes_the_connection_after_a_retiring_response(gateway_factory,
                                                                   local_issuer) -> None:
    """On the wire: inside the margin the response says `Connection: close` and the gateway
    really closes the HTTP/1.1 connection after it (EOF, not a kept-alive socket)."""
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                          "identity.yaml": with_retire(local_issuer.identity_yaml(), "30s")})
    tok = local_issuer.token(sub="near-exp", expires_in=20)  # retiring from the start
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
    cred = base64.b64encode(f"agent:{tok}".encode()).decode()
    raw.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
                + f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = raw.recv(4096)
        assert chunk, reply
        reply += chunk
    assert b" 200 " in reply.split(b"\r\n", 1)[0]
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    with ctx.wrap_socket(raw, server_hostname="api.openai.com") as tls:
        body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
        tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := tls.recv(65536):  # returns b"" only when the gateway closes
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert b"\r\nconnection: close" in head
