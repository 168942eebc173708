"""Classes 2 and 3: destination pinning and no cleartext credentials.

Inside a tunnel to a declared host, a request naming another host (Host, absolute-form,
HTTP/2 :authority, TLS SNI) is domain fronting: refused with 421 before anything reaches an
upstream. Undeclared ports, names that resolve to loopback/private addresses, the gateway's
own listeners and plain-HTTP requests to https upstreams are refused too.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.hostile.edgekit import (
    CHAT,
    assert_healthy,
    client,
    connect_tunnel,
    http_req,
    status_of,
    tls_request,
)

pytestmark = pytest.mark.integration

NO_ID = "identity:\n  required: false\n"


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory("{standin_upstreams}" + NO_ID)


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}")


def test_host_header_naming_another_host_is_421(gw, standin) -> None:
    standin.clear()
    answer = tls_request(gw, "api.openai.com:443",
                         http_req("POST", "/v1/chat/completions", "hooks.example.com", CHAT),
                         sni="api.openai.com")
    assert status_of(answer) == 421, answer[:300]
    assert body_of(answer)["error"]["code"] == "misdirected_request"
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_sni_naming_another_host_is_421(gw, standin) -> None:
    standin.clear()
    answer = tls_request(gw, "api.openai.com:443",
                         http_req("POST", "/v1/chat/completions", "api.openai.com", CHAT),
                         sni="hooks.example.com")
    assert status_of(answer) == 421, answer[:300]
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_absolute_form_naming_another_host_in_a_tunnel_is_421(gw, standin) -> None:
    standin.clear()
    answer = tls_request(gw, "api.openai.com:443",
                         http_req("POST", "https://hooks.example.com/hook", "hooks.example.com",
                                  b"{}"),
                         sni="api.openai.com")
    assert status_of(answer) == 421, answer[:300]
    assert standin.requests == []


@pytest.mark.parametrize("target", ["api.openai.com:22", "api.openai.com:8443",
                                    "hooks.example.com:8443"])
def test_host_declared_without_port_is_443_only(gw, standin, target: str) -> None:
    s, head = connect_tunnel(gw, target)
    s.close()
    assert b" 403 " in head.split(b"\r\n", 1)[0], head
    assert b"destination_not_allowed" in head or b"not a declared upstream" in head


def test_plain_http_to_an_https_upstream_gets_no_credential(gw, standin) -> None:
    standin.clear()
    with httpx.Client(proxy=gw.proxy_url(), timeout=30) as c:
        r = c.post("http://api.openai.com/v1/chat/completions", content=CHAT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 403, r.text  # port 80 is not declared for an https upstream
    assert r.json()["error"]["code"] in ("cleartext_refused", "destination_not_allowed")
    assert standin.requests == []
    # ...nor inside a CONNECT tunnel without TLS
    s, head = connect_tunnel(gw, "api.openai.com:443")
    s.sendall(http_req("POST", "/v1/chat/completions", "api.openai.com", CHAT))
    from tests.hostile.edgekit import read_until_closed
    answer = read_until_closed(s)
    s.close()
    assert status_of(answer) == 403, answer[:300]
    assert b"cleartext_refused" in answer
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_declared_name_resolving_to_loopback_is_refused(gateway_factory, standin) -> None:
    from tests.hostile.edgekit import RawRecorder
    raw = RawRecorder()  # a loopback service the rules name only by a DNS name
    gw = gateway_factory("{standin_upstreams}"
                         "  - name: sneaky\n"
                         f"    hosts: ['localhost:{raw.port}']\n"
                         "    dialect: webhook\n"
                         "    credential: {header: X-Webhook-Token, env: WEBHOOK_TOKEN}\n"
                         + NO_ID)
    answer = tls_request(gw, f"localhost:{raw.port}",
                         http_req("POST", "/hook", f"localhost:{raw.port}", b"{}"),
                         sni="localhost")
    raw.close()
    assert status_of(answer) == 502, answer[:300]
    assert bytes(raw.received) == b""
    assert "loopback/private" in gw.logs()
    assert_healthy(gw, standin)


def test_allow_private_opts_a_loopback_name_in(gateway_factory, standin) -> None:
    gw = gateway_factory("{standin_upstreams}"
                         "  - name: local\n"
                         f"    hosts: ['localhost:{standin.port}']\n"
                         "    dialect: webhook\n"
                         "    allow_private: true\n" + NO_ID)
    standin.clear()
    answer = tls_request(gw, f"localhost:{standin.port}",
                         http_req("POST", "/hook", f"localhost:{standin.port}", b"{}"),
                         sni="localhost")
    assert status_of(answer) == 200, answer[:300]
    (req,) = standin.requests
    assert req["host"] == f"localhost:{standin.port}"  # pinned to the IP, Host kept


def test_gateway_approvals_api_is_never_an_upstream(gateway_factory, standin) -> None:
    import re
    import time
    gw = gateway_factory("{standin_upstreams}" + NO_ID)
    deadline = time.monotonic() + 30
    while gw.approvals_url is None:
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.1)
    port = int(re.search(r":(\d+)$", gw.approvals_url).group(1))
    # The rules name the reviewers' API by address (a loopback literal is "declared"):
    # it must still never be reachable through the proxy.
    assert_own_listener_refused(gw, standin, "approvals.example.com", port, "/api/approvals")


def assert_own_listener_refused(gw, standin, host: str, port: int, path: str) -> None:
    """Rules forwarding `host` to 127.0.0.1:`port` (one of the gateway's own listeners)
    are loaded, and a request there is refused with 502 instead of reaching it."""
    import time
    rules = next(gw.rules_dir.glob("*.yaml"))
    rules.write_text(rules.read_text().replace(
        "identity:", f"  - name: own-listener\n    hosts: [{host}]\n"
        f"    dialect: webhook\n    forward_to: http://127.0.0.1:{port}\nidentity:"))
    deadline = time.monotonic() + 30
    while "rules reloaded" not in gw.logs():
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.1)
    with client(gw) as c:
        r = c.get(f"https://{host}{path}")
    assert r.status_code == 502, r.text
    assert "own listeners" in gw.logs(), gw.logs()
    assert_healthy(gw, standin)


def test_connect_inside_a_tunnel_is_refused(gw, standin) -> None:
    standin.clear()
    answer = tls_request(gw, "api.openai.com:443",
                         b"CONNECT hooks.example.com:443 HTTP/1.1\r\n"
                         b"Host: hooks.example.com:443\r\n\r\n", sni="api.openai.com")
    assert status_of(answer) == 400, answer[:300]  # mitmproxy: CONNECT only in regular mode
    assert standin.requests == []
    assert_healthy(gw, standin)


def test_a_listener_on_an_ephemeral_port_is_never_an_upstream(gateway_factory, standin) -> None:
    """A listener given port 0 binds a port no option shows (here the probes): the egress
    check knows it from the socket, so rules that forward to it are still refused."""
    import re
    import time
    gw = gateway_factory("{standin_upstreams}" + NO_ID,
                         extra_args=("--set", "agentgate_health_listen=127.0.0.1:0"))
    deadline = time.monotonic() + 30
    while not (m := re.search(r"probes at http://[^:]+:(\d+)/healthz", gw.logs())):
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.1)
    assert_own_listener_refused(gw, standin, "probes.example.com", int(m.group(1)), "/healthz")
