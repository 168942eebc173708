"""Hostile upstream: a response (not streamed) whose JSON the one-parse path must refuse or
read whole — a number past a double (1e400, which reads as infinity), duplicate keys, a
lone surrogate, deep nesting — next to an e-mail address and a card. Through a real
mitmdump: whatever the gateway does with such an answer, the agent never receives the
address or the card raw, the answer it gets is valid JSON when it is a 200, and the
gateway keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.hostile.edgekit import serve_tls

pytestmark = pytest.mark.integration

EMAIL = "ann.lee@example.com"
CARD = "4111111111111111"
PII = f'"note":"mail {EMAIL} card {CARD}"'
ANSWERS = {
    "out of range": '{' + PII + ',"n":1e400}',
    "negative out of range": '{' + PII + ',"n":-1e400}',
    "duplicate keys": '{' + PII + ',"note":"clean"}',
    "lone surrogate": '{' + PII + ',"s":"\\ud800"}',
    "deep": '{' + PII + ',"d":' + "[" * 5000 + "]" * 5000 + "}",
    "card as an exponent": '{"note":"mail ' + EMAIL + '","n":41111111111111110e-1}',
    "constant": '{' + PII + ',"n":NaN}',
}


class _Answer(BaseHTTPRequestHandler):
    """Answers every POST with the server's `answer` (set by the test)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        answer = self.server.answer  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def upstream(standin) -> Iterator[Any]:
    server, url = serve_tls(_Answer, standin)
    server.answer = b"{}"  # type: ignore[attr-defined]
    server.url = url  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def gw(gateway_factory, no_identity, upstream) -> Gateway:
    # one scripted upstream behind both dialects
    ups = "".join(f"  - name: local-{d}\n    hosts: [{d}.example.com]\n    dialect: {d}\n"
                  f"    forward_to: {upstream.url}\n" for d in ("openai", "webhook"))
    return gateway_factory("{standin_upstreams}" + ups + no_identity)


@pytest.mark.parametrize("what", list(ANSWERS))
def test_a_hostile_answer_never_reaches_the_agent_raw(gw, upstream, standin, what) -> None:
    upstream.answer = ANSWERS[what].encode()
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for url in ("https://openai.example.com/v1/chat/completions",
                    "https://webhook.example.com/x"):
            r = c.post(url, json={"model": "gpt-4o-mini",
                                  "messages": [{"role": "user", "content": "hi"}]})
            got = r.text
            digits = "".join(ch for ch in got if ch.isdigit())
            assert EMAIL not in got and CARD not in got and CARD not in digits, \
                (what, url, r.status_code, got[:300])
            if r.status_code == 200:
                # valid JSON: nothing the gateway wrote is `Infinity` (NaN: the upstream's
                # own spelling, kept as it sent it)
                json.loads(got, parse_constant=None if what == "constant" else
                           lambda k: pytest.fail(f"{what}: {k}"))
            else:
                assert r.status_code in (502, 400, 415), (what, r.status_code, got[:300])
        standin.clear()
        r = c.post("https://api.openai.com/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]},
            headers={"authorization": "Bearer sk-agent"})
        assert r.status_code == 200
