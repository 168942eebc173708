"""Hostile: the audit store's split bodies (store.SplitCache, blobs, the ZSTD columns)
for a conversation built to trip the cutting and reassembly, through a real mitmdump and
its writer process: bodies exactly at and around the inline size (4096 bytes) with a
4-byte character across the boundary, JSON escapes for NUL and lone surrogates, CR/LF
between items, nested arrays as messages, every split key at once (system, tools, input,
messages), both "input" and "messages" with the memo continuing one of them, values the
masker replaces deep in the history, a non-ASCII header. `agentgate audit export` must
give back, per row, exactly the body and header the upstream received, and `agentgate
audit verify` must walk the chain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mitmproxy import io as mio

from tests.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
FILLER = "lorem ipsum dolor sit amet " * 200


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


def verified_export(db: Path, session: str, tmp_path: Path) -> list:
    """`agentgate audit verify` of the store passes; the session's chat flows as
    `agentgate export` gives them back."""
    v = cli("audit", "verify", "--db", str(db))
    assert v.returncode == 0, v.stdout + v.stderr
    out = tmp_path / f"{session}.mitm"
    e = cli("export", "--db", str(db), "--session", session, "-o", str(out))
    assert e.returncode == 0, e.stdout + e.stderr
    with open(out, "rb") as fh:
        return [f for f in mio.FlowReader(fh).stream()
                if f.request.path.endswith("/chat/completions")]


def msg(text: str) -> dict:
    return {"role": "user", "content": text}


def at_size(size: int, emoji_at_end: bool) -> bytes:
    """A chat body of exactly `size` bytes (the last message padded)."""
    head = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
    tail = '"}]}'
    pad = size - len(head) - len(tail)
    text = ("a" * (pad - 4) + "\U0001f600") if emoji_at_end else "a" * pad
    out = (head + text + tail).encode()
    assert len(out) == size
    return out


def turns() -> list[bytes]:
    h = [msg(f"{FILLER} one, mail ann@example.com"), msg(f"{FILLER} two \\u0000")]
    esc = ('{"model":"gpt-4o-mini","messages":[' + json.dumps(msg(FILLER))
           + ',{"role":"user","content":"nul \\u0000 lone \\ud800 end"}]}')
    crlf = ('{"model":"gpt-4o-mini",\r\n"messages":[\r\n' + json.dumps(msg(FILLER))
            + "\r\n,\r\n" + json.dumps(msg("second")) + "\r\n]\r\n}")
    every = json.dumps({"model": "gpt-4o-mini", "system": [{"type": "text", "text": FILLER}],
                        "tools": [{"type": "function", "function": {"name": "f"}}],
                        "input": [msg(FILLER)], "messages": [msg("x"), [1, [2, "y"]]]})
    both1 = json.dumps({"model": "gpt-4o-mini", "input": [msg(FILLER)],
                        "messages": [msg("first")]})
    both2 = json.dumps({"model": "gpt-4o-mini", "input": [msg(FILLER)],
                        "messages": [msg("second, card 4111 1111 1111 1111")]})
    return [
        at_size(4095, False), at_size(4096, True), at_size(4097, True), at_size(4098, False),
        json.dumps({"model": "gpt-4o-mini", "messages": h}).encode(),
        json.dumps({"model": "gpt-4o-mini", "messages": [*h, msg("bob@example.com")]}).encode(),
        esc.encode(), crlf.encode(), every.encode(), both1.encode(), both2.encode(),
        json.dumps({"model": "gpt-4o-mini", "messages": [*h, msg("bob@example.com"),
                                                          msg("more")]}).encode(),
    ]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity
                           + "recorder:\n  batch_interval_ms: 20\n")


def test_a_hostile_conversation_exports_as_forwarded(gw, standin, tmp_path) -> None:
    sent: list[tuple[str, str]] = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for raw in turns():
            standin.clear()
            r = c.post(OPENAI, content=raw, headers={
                "content-type": "application/json", "x-agent-session": "hostile",
                "x-note": "caf\u00e9 \u2603".encode(), "authorization": "Bearer sk-agent"})
            assert r.status_code == 200, (raw[:80], r.text[:300])
            assert len(standin.requests) == 1
            got = standin.requests[0]
            note = next(v for k, v in got["headers"] if k == "x-note")
            sent.append((got["body"], note))
    assert "4111 1111 1111 1111" not in sent[-2][0]
    assert gw.stop() == 0
    flows = verified_export(gw.data_dir / "agentgate.duckdb", "hostile", tmp_path)
    got = [(f.request.content.decode("utf-8", "replace"),
            f.request.headers.get("x-note")) for f in flows]
    assert [g[0] for g in got] == [s[0] for s in sent]
    # the header as the upstream's http.server read it (latin-1) and as recorded (UTF-8)
    assert all(g[1] is not None for g in got)
    assert [g[1].encode("utf-8", "surrogateescape") for g in got] == \
        [s[1].encode("latin-1") for s in sent]
