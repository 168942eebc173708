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
