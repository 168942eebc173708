"""Hostile: the audit writer's split cache (addons/recording/store.py SplitCache: a turn
that re-sends the history is cut and hashed only past the part it shares with the
session's previous body) through a real mitmdump and its writer process. Each next body
starts like the previous one and then differs where a byte compare could be fooled: one
byte changed deep in the history (same length), a multi-byte character swapped for
another of the same length, white space moved, a message removed, the same history under
another session name and under a body that is not an object. What `agentgate audit
export` gives back for every row must be, byte for byte, what the upstream received, and
`agentgate audit verify` must walk the chain."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
from mitmproxy import io as mio

from tests.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
FILLER = "lorem ipsum dolor sit amet " * 200  # each message over the store's inline size


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


def body(msgs: list[str], sep: str = ",") -> bytes:
    items = sep.join(json.dumps({"role": "user", "content": m}, ensure_ascii=False)
                     for m in msgs)
    return ('{"model":"gpt-4o-mini","messages":[' + items + "]}").encode()


def turns() -> list[tuple[str, bytes]]:
    h = [f"{FILLER} one é", f"{FILLER} two", f"{FILLER} three"]
    changed = [h[0][:100] + "X" + h[0][101:], h[1], h[2]]        # same length, early
    accent = [h[0][:-1] + "è", h[1], h[2]]                        # é -> è: 2 bytes each
    return [
        ("s1", body(h)),
        ("s1", body(h + [f"{FILLER} four"])),
        ("s1", body(changed + [f"{FILLER} four"])),
        ("s1", body(accent + [f"{FILLER} four"])),
        ("s1", body(h + [f"{FILLER} four"], sep=" , ")),
        ("s1", body(h[:2] + [f"{FILLER} four"])),
        ("s1", body(h + [f"{FILLER} four", "five"])),
        ("s2", body(h + [f"{FILLER} four", "five"])),
        ("s1", b"[" + body(h) + b"]"),
        ("s1", body(h + [f"{FILLER} four", "five", "six"])),
    ]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity
                           + "recorder:\n  batch_interval_ms: 20\n")


def test_every_row_reassembles_to_what_was_forwarded(gw, standin, tmp_path) -> None:
    forwarded: dict[str, list[bytes]] = {"s1": [], "s2": []}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for sid, raw in turns():
            standin.clear()
            r = c.post(OPENAI, content=raw, headers={
                "content-type": "application/json", "x-agent-session": sid,
                "authorization": "Bearer sk-agent"})
            assert r.status_code in (200, 400), r.text[:300]
            if r.status_code == 200:
                assert len(standin.requests) == 1
                forwarded[sid].append(standin.requests[0]["body"].encode())
    assert len(forwarded["s1"]) >= 8 and len(forwarded["s2"]) == 1
    assert gw.stop() == 0
    # the cache was in play: later turns were cut only past an earlier one
    m = re.search(r"audit writer: (\d+) of (\d+) split bodies cut past", gw.logs())
    assert m and int(m.group(1)) >= 4, gw.logs()[-2000:]
    db = gw.data_dir / "agentgate.duckdb"
    v = cli("audit", "verify", "--db", str(db))
    assert v.returncode == 0, v.stdout + v.stderr
    for sid, sent in forwarded.items():
        out = tmp_path / f"{sid}.mitm"
        e = cli("export", "--db", str(db), "--session", sid, "-o", str(out))
        assert e.returncode == 0, e.stdout + e.stderr
        with open(out, "rb") as fh:
            got = [f.request.content for f in mio.FlowReader(fh).stream()
                   if f.request.path.endswith("/chat/completions")]
        assert got == sent, (sid, [len(b) for b in got], [len(b) for b in sent])
