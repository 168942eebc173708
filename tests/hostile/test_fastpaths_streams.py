"""Hostile review of stream masking against the masking engine's escapes, through a real
mitmdump: an upstream streams a chat answer (SSE) holding a card or an SSN written with
the escapes normalize undoes — `\\u0034`, `%34`, `&#52;`, full-width and mathematical
digits percent-encoded as UTF-8 — in groups separated by spaces, cut into deltas of 1-7
characters, one TCP write per event. Masking the whole answer finds each of them; the
stream must too: the stream masker holds back the tail a value could still extend into
(`DetectorSet.holdback`), which used to know only plain digit groups, so the first groups
of an escaped value left unmasked before the rest arrived ('%34%31%31%31 %31%31%31%31 %'
then '[CREDIT_CARD_1]': 8 of the card's 16 digits)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import quote

import httpx
import pytest

from addons.masking.detectors import DetectorSet
from tests.conftest import Gateway
from tests.hostile.edgekit import serve_tls
from tests.hostile.test_fastpaths_masking import leaked, reading

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"
SSN = "536 22 4519"
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))


def _each_digit(value: str, f) -> str:
    return "".join(f(c) if c.isdigit() else c for c in value)


VALUES = {
    f"{what}:{how}": enc
    for what, v in (("card", CARD), ("ssn", SSN))
    for how, enc in {
        "json-escape": _each_digit(v, lambda c: f"\\u{ord(c):04x}"),
        "percent": _each_digit(v, lambda c: f"%{ord(c):02X}"),
        "html": _each_digit(v, lambda c: f"&#{ord(c)};"),
        "fullwidth-pct": quote(_each_digit(v, lambda c: chr(0xFF10 + int(c))), safe=_PRINTABLE),
        "math-bold-pct": quote(_each_digit(v, lambda c: chr(0x1D7CE + int(c))),
                               safe=_PRINTABLE),
    }.items()
}
PROSE = "Thanks for reaching out about the March invoice. The refund was approved. "


def answer(enc: str) -> str:
    return PROSE + "Here it is: " + enc + " and that is all. " + PROSE


def events(text: str, size: int) -> list[bytes]:
    out = []
    for i in range(0, len(text), size):
        out.append(("data: " + json.dumps({
            "id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text[i:i + size]},
                         "finish_reason": None}]}) + "\n\n").encode())
    out.append(b"data: [DONE]\n\n")
    return out


class Upstream:
    """HTTPS (the stand-in's certificate); a chat request whose `user` is
    "<value name>/<delta size>" is answered with that stream, chunked, one write per
    event."""

    def __init__(self, standin) -> None:
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:  # noqa: ANN002
                pass

            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                name, size = req["user"].rsplit("/", 1)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for w in events(answer(VALUES[name]), int(size)):
                    self.wfile.write(f"{len(w):x}\r\n".encode() + w + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.001)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server, self.url = serve_tls(H, standin)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream(standin) -> Iterator[Upstream]:
    u = Upstream(standin)
    yield u
    u.stop()


@pytest.fixture
def gw(gateway_factory, no_identity, upstream) -> Gateway:
    extra = f"""  - name: local-llm
    hosts: [llm.example.com]
    dialect: openai
    forward_to: {upstream.url}
"""
    return gateway_factory("{standin_upstreams}" + extra + no_identity)


def streamed_text(body: str) -> str:
    parts = []
    for line in body.split("\n"):
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            ev = json.loads(line[6:])
            parts.append(ev["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


def digits_left(text: str) -> str:
    """The digits a reader finds in the answer once the placeholders are taken out (the
    prose has none): any is a piece of the value that left unmasked."""
    return re.sub(r"\D", "", reading(_PLACEHOLDER.sub("", text)))


_PLACEHOLDER = re.compile(r"\[[A-Z_]+_[0-9]+\]")


def test_each_escaped_value_is_a_finding_and_a_leak_when_unmasked():
    ref = DetectorSet(fast=False)
    for name, enc in VALUES.items():
        assert ref.find(answer(enc)), name
        assert leaked(answer(enc)) and digits_left(answer(enc)), name
        assert not digits_left(answer("[CREDIT_CARD_1]")), name


def test_escaped_values_never_reach_the_agent_from_a_stream(gw, upstream) -> None:
    bad = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as c:
        for name in VALUES:
            for size in (1, 2, 3, 5, 7):
                r = c.post("https://llm.example.com/v1/chat/completions",
                           json={"model": "m", "stream": True, "user": f"{name}/{size}",
                                 "messages": [{"role": "user", "content": "hi"}]},
                           headers={"authorization": "Bearer x"})
                assert r.status_code == 200, (name, size, r.text[:300])
                text = streamed_text(r.text)
                if digits_left(text):
                    bad.append(f"{name}/{size}: {digits_left(text)}")
                assert "and that is all" in text, (name, size, text[-300:])
    assert bad == [], bad
