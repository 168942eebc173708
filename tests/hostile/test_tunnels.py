"""Class 1: every byte is an inspected HTTP flow or the connection is refused.

Hostile agent: CONNECT to a declared host and speak something that is not TLS/HTTP (raw TCP
relay on mitmproxy's defaults), or split the TLS ClientHello so the first segment is too
short to look like TLS (end-to-end pass-through on mitmproxy's defaults), or ask the
operator's flags for pass-through.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REAL_WEBHOOK_TOKEN
from tests.hostile.edgekit import (
    AGENT_KEY,
    RawRecorder,
    SplitTLS,
    assert_healthy,
    client,
    connect_tunnel,
    http_req,
    read_until_closed,
    status_of,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def raw_upstream():
    r = RawRecorder()
    yield r
    r.close()


def rules(standin, raw_port: int) -> str:
    # Both declared by address: the tunnels' targets are real, reachable upstreams.
    return ("{standin_upstreams}"
            "  - name: raw\n"
            f"    hosts: ['127.0.0.1:{raw_port}']\n"
            "    dialect: webhook\n"
            "  - name: direct\n"
            f"    hosts: ['127.0.0.1:{standin.port}']\n"
            "    dialect: webhook\n"
            "    credential: {header: X-Webhook-Token, env: WEBHOOK_TOKEN}\n"
            "identity:\n  required: false\n")


@pytest.mark.parametrize("first_bytes", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00\x01binary-protocol secret\n",
    b"hello upstream, no request line here\r\n\r\n",
    b"\x16\x03\x01\x00\x20" + b"\xff" * 32,  # a TLS record that is no ClientHello
])
def test_non_tls_non_http_tunnel_is_closed_not_relayed(gateway_factory, standin, raw_upstream,
                                                       first_bytes: bytes) -> None:
    gw = gateway_factory(rules(standin, raw_upstream.port))
    s, head = connect_tunnel(gw, f"127.0.0.1:{raw_upstream.port}")
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    s.sendall(first_bytes)
    answer = read_until_closed(s)
    s.close()
    assert b"RAW-UPSTREAM-SAW-BYTES" not in answer
    assert bytes(raw_upstream.received) == b""
    assert "closing connection" in gw.logs()
    assert_healthy(gw, standin)


@pytest.mark.parametrize("split", [1, 2])
def test_split_client_hello_is_intercepted_not_passed_through(gateway_factory, standin,
                                                              raw_upstream, split: int) -> None:
    gw = gateway_factory(rules(standin, raw_upstream.port))
    standin.clear()
    target = f"127.0.0.1:{standin.port}"
    s, head = connect_tunnel(gw, target)
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    # Verified against the *gateway's* CA only: a pass-through would show the upstream's
    # own certificate and fail here.
    t = SplitTLS(s, gw.ca_cert, "127.0.0.1", first_split=split)
    t.handshake()
    t.send(http_req("POST", "/hook", target, b'{"x": 1}'))
    answer = t.recv_all()
    s.close()
    assert status_of(answer) == 200, answer[:300]
    (req,) = standin.requests
    headers = dict(req["headers"])
    assert AGENT_KEY not in json.dumps(req)
    assert headers.get("x-webhook-token") == REAL_WEBHOOK_TOKEN  # went through the pipeline
    assert_healthy(gw, standin)


def test_garbage_inside_intercepted_tls_is_closed(gateway_factory, standin,
                                                  raw_upstream) -> None:
    gw = gateway_factory(rules(standin, raw_upstream.port))
    standin.clear()
    target = f"127.0.0.1:{standin.port}"
    s, _ = connect_tunnel(gw, target)
    t = SplitTLS(s, gw.ca_cert, "127.0.0.1", first_split=0)
    t.handshake()
    t.send(b"\x00\x00\x00binary inside TLS, not HTTP\n")
    answer = t.recv_all()
    s.close()
    assert answer == b""
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_non_tls_garbage_to_the_proxy_port_is_closed(gateway_factory, standin,
                                                      raw_upstream) -> None:
    import socket
    gw = gateway_factory(rules(standin, raw_upstream.port))
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"\x05\x01\x00")  # a SOCKS5 greeting
    assert b"\x05" not in read_until_closed(s)[:2]
    s.close()
    assert_healthy(gw, standin)


@pytest.mark.parametrize("flags", [
    ("--set", "ignore_hosts=.*"),
    ("--set", "allow_hosts=api\\.openai\\.com"),
    ("--set", "tcp_hosts=.*"),
    ("--set", "udp_hosts=.*"),
    ("--mode", "socks5"),
    ("--mode", "reverse:tcp://127.0.0.1:9"),
])
def test_pass_through_options_refuse_to_start(gateway_factory, flags) -> None:
    gw = gateway_factory("{standin_upstreams}identity:\n  required: false\n",
                         extra_args=flags, wait=False)
    assert gw.proc.wait(30) != 0
    assert "refused by agentgate" in gw.logs()


def test_script_that_fails_to_configure_leaves_the_gateway_closed(gateway_factory,
                                                                  standin) -> None:
    # mitmproxy raises while applying a script option given twice (deferred `--set`), after
    # importing the script but before any addon's load(): it used to run on as an open proxy.
    gw = gateway_factory("{standin_upstreams}identity:\n  required: false\n",
                         extra_args=("--set", "agentgate_rules_poll_ms=300"))
    standin.clear()
    with client(gw) as c:
        r = c.post("http://api.openai.com/v1/chat/completions", content=b"{}")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "pipeline_not_loaded"
    s, head = connect_tunnel(gw, f"127.0.0.1:{standin.port}")
    s.close()
    assert b" 503 " in head.split(b"\r\n", 1)[0]
    assert standin.requests == []
