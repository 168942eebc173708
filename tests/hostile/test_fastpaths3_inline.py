"""Hostile: which request bodies masking works on in the event loop. The choice was made
on the wire size: a body of a few KB gzip that decodes to MBs (up to the decoder's ratio
cap, 200x, and masking.max_body_bytes) was masked whole on the loop, holding every other
flow of the gateway for as long (tens of ms per body, as often as the agent sends it).
Policy already sends every compressed body to a worker thread; masking must too.

Through the real masking addon (its real detectors: the rules' masking section) with the
flow's parse made as policy makes it; the hand-overs to a thread are counted."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.frame import decode
from addons.frame.principal import flow_session_key
from addons.masking import addon as masking_addon
from addons.masking.addon import Masking
from tests.frame.threadcount import count_to_thread
from tests.masking.test_addon import UPSTREAMS, flow, run

CARD = "4111 1111 1111 1111"


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    decode.MEMOS.clear()


def squeezable(n: int) -> str:
    """~220 * n characters that gzip ~130x smaller: under the decoder's 200x ratio cap,
    so a few KB on the wire are MBs decoded (more repetitive text hits the cap)."""
    rnd = random.Random(n)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "theta"]
    return "".join("words and more words here " * 8 + rnd.choice(words) + " "
                   for _ in range(n))


def _addon(tmp_path: Path) -> Masking:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS)
    return Masking(RulesHolder(load_rules(tmp_path)))


def _send(m: Masking, body: bytes, *, coding: str = "", session: str = "s") -> bytes:
    headers = {"x-agent-session": session}
    if coding:
        headers["content-encoding"] = coding
    f = flow("openai", body, headers=headers)
    parsed = decode.request_body(f, memo_key=flow_session_key(f))  # as policy reads it
    assert parsed is not None
    parsed.json  # noqa: B018
    with taddons.context(m):
        m.requestheaders(f)
        run(m.request(f))
    assert f.response is None, f.response and f.response.text
    return f.request.content or b""


def test_a_small_gzip_body_that_decodes_large_is_masked_in_a_thread(tmp_path: Path,
                                                                    monkeypatch) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    content = squeezable(12_000)  # 2.6 MB
    text = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": content + CARD}]}).encode()
    wire = gzip.compress(text)
    assert len(text) > 2 << 20 and len(wire) < masking_addon.THREAD_MIN_BYTES
    got = _send(m, wire, coding="gzip")
    assert CARD.encode() not in got and b"[CREDIT_CARD_1]" in got
    assert len(threaded) == 1


def test_a_compressed_continued_body_is_masked_in_a_thread(tmp_path: Path,
                                                           monkeypatch) -> None:
    """A continued body is taken on the loop only within INLINE_MAX_BYTES, which a
    compressed one can pass on the wire size: the same bound holds for it."""
    threaded = count_to_thread(monkeypatch, masking_addon)
    monkeypatch.setattr(masking_addon, "INLINE_MAX_BYTES", 150 * 1024)
    m = _addon(tmp_path)
    msgs = [{"role": "user", "content": "plain words, ann@example.com " * 8000}]  # 240 KB
    _send(m, json.dumps({"model": "m", "messages": msgs}).encode())
    assert len(threaded) == 1
    msgs = [*msgs, {"role": "user", "content": "and " + CARD}]
    wire = gzip.compress(json.dumps({"model": "m", "messages": msgs}).encode())
    assert len(wire) < 150 * 1024
    got = _send(m, wire, coding="gzip")
    assert CARD.encode() not in got and b"ann@example.com" not in got
    assert len(threaded) == 2


def test_a_small_gzip_response_that_decodes_large_is_masked_in_a_thread(
        tmp_path: Path, monkeypatch) -> None:
    """The same on the way back: an upstream (a hostile MCP server, say, which may ignore
    the gateway's `accept-encoding: identity`) answering a few KB of gzip that decode to
    MBs had them masked on the loop."""
    from mitmproxy import http
    from mitmproxy.test import tutils

    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    content = squeezable(12_000)
    answer = json.dumps({"choices": [{"message": {"role": "assistant",
                                                  "content": content + CARD}}]}).encode()
    wire = gzip.compress(answer)
    assert len(answer) > 2 << 20 and len(wire) < masking_addon.THREAD_MIN_BYTES
    f = flow("openai", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    f.response = tutils.tresp(content=b"", headers=http.Headers(
        [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]))
    f.response.raw_content = wire
    with taddons.context(m):
        run(m.request(f))
        before = len(threaded)
        run(m.response(f))
    got = f.response.content or b""
    assert CARD.encode() not in got and b"[CREDIT_CARD_1]" in got
    assert len(threaded) - before == 1


def test_a_compressed_body_is_searched_for_its_session_only_within_max_body() -> None:
    """recording/sessions.py reads the session a body names, on the event loop, for bodies
    up to MAX_BODY (1 MiB) — on the wire: a compressed one was decoded whole (up to 16
    MiB) and parsed there. Now the same bound holds for what it decodes to: such a body
    is not searched (as an uncompressed one over MAX_BODY is not); one within it still
    is."""
    from mitmproxy.test import tflow

    from addons.recording import sessions

    def chat_flow(data: bytes):
        f = tflow.tflow()
        f.request.headers["content-type"] = "application/json"
        f.request.headers["content-encoding"] = "gzip"
        f.request.raw_content = gzip.compress(data)
        f.metadata["session"] = f"conn-{f.client_conn.id}"
        f.metadata["recorder"] = {"session_source": "connection"}
        return f

    s = sessions.Sessions(RulesHolder())
    pad = squeezable(9_000)  # ~2 MB
    big = chat_flow(json.dumps({"metadata": {"thread_id": "t-big"}, "pad": pad}).encode())
    small = chat_flow(json.dumps({"metadata": {"thread_id": "t-small"}, "pad": "x"}).encode())
    assert len(big.request.raw_content) < sessions.MAX_BODY // 50 and len(pad) > sessions.MAX_BODY
    with taddons.context():
        s.request(big)
        s.request(small)
    assert big.metadata["session"].startswith("conn-")
    assert small.metadata["session"] == "t-small"


def test_a_body_whose_memo_continued_the_other_list_is_masked_in_a_thread(
        tmp_path: Path, monkeypatch) -> None:
    """The memo continued "input" (first in the body) while masking masks "messages":
    nothing of the history is taken whole, so the whole body is masked — in a thread,
    as any long body that is not a small continuation."""
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    history = [{"role": "user", "content": "plain words, ann@example.com " * 3000}]  # 90 KB
    _send(m, json.dumps({"model": "m", "input": history}).encode())
    assert len(threaded) == 1
    _send(m, json.dumps({"model": "m", "input": [*history, {"role": "user", "content": "x"}]}
                        ).encode())
    assert len(threaded) == 1  # a small continuation of the same list: on the loop
    got = _send(m, json.dumps({"model": "m", "input": [*history, {"role": "user",
                                                                   "content": "x"}],
                               "messages": [{"role": "user", "content": "hi " + CARD}]}
                              ).encode())
    assert CARD.encode() not in got and b"ann@example.com" not in got
    assert len(threaded) == 2
