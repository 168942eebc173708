"""Class 4: WebSocket upgrades are refused unless the upstream opts in (`websocket: true`).

Hostile agent: the OpenAI Realtime API over a WebSocket got the real key injected and its
frames were neither masked, policed nor recorded. Refused by default, before any upstream
connection; other protocol upgrades (h2c, arbitrary) are refused too.
"""

from __future__ import annotations

import json

import pytest

from tests.hostile.edgekit import assert_healthy, http_req, status_of, tls_request

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
