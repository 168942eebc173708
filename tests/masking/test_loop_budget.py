"""Which bodies masking works on in the event loop: not by size alone. Masking costs follow
the values in a body (a few us per e-mail address or digit of number-dense text) far
more than its bytes (~0.003 us per byte of prose): a fresh 16-60 KB body of addresses
was masked on the loop (under THREAD_MIN_BYTES), holding every other flow of the gateway
tens to hundreds of ms (BENCHMARKS, PERF-AC). Now a body, a continued body's new part, or
a response whose estimated masking cost (addon._heavy) is over LOOP_BUDGET_US goes to a
worker thread; small or plain ones stay on the loop. The bytes sent are the same either
way (compared with masking the body in this process).

Through the real masking addon (its real detectors: the rules' masking section), the
flow's parse made as policy makes it; the hand-overs to a thread are counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tutils

from addons.frame import decode
from addons.masking import addon as masking_addon
from addons.masking.addon import Masking
from addons.masking.bodies import Masked
from addons.masking.masker import Masker, Session
from bench import harness as h
from tests.frame.threadcount import count_to_thread
from tests.hostile.test_fastpaths3_inline import _addon
from tests.hostile.test_fastpaths3_inline import _send as send
from tests.masking.test_addon import flow, run

ADDRESSES = " ".join(f"user{i}.x@example.com" for i in range(700))  # ~16 KB, 700 values
DENSE_DIGITS = " de12" * 3300  # IBAN candidates, ~16 KB
PLAIN = "the order ships on friday, please check the invoice " * 300  # ~16 KB


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    decode.MEMOS.clear()


def _send(m: Masking, doc: dict, session: str = "s") -> bytes:
    return send(m, json.dumps(doc).encode(), session=session)


def _reference(m: Masking, doc: dict) -> bytes:
    body = json.dumps(doc).encode()
    out = Masked(Masker(m.masker().detectors, b"k"), Session(), {}, dialect="openai").body(
        body, "application/json")
    return body if out is None else out


@pytest.mark.parametrize("text", [ADDRESSES, DENSE_DIGITS], ids=["addresses", "digits"])
def test_a_small_body_dense_with_values_is_masked_in_a_thread(tmp_path: Path, monkeypatch,
                                                              text: str) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    doc = {"model": "m", "messages": [{"role": "user", "content": text}]}
    assert len(json.dumps(doc)) < masking_addon.THREAD_MIN_BYTES
    got = _send(m, doc)
    assert len(threaded) == 1
    assert got == _reference(m, doc)


@pytest.mark.parametrize("body", ["plain", "chat_1k"])
def test_small_plain_bodies_stay_on_the_loop(tmp_path: Path, monkeypatch, body: str) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    doc = {"model": "m", "messages": [{"role": "user", "content": PLAIN}]} \
        if body == "plain" else json.loads(h.chat_body(1024))
    got = _send(m, doc)
    assert len(threaded) == 0
    assert got == _reference(m, doc)


def test_a_continued_body_goes_to_a_thread_when_its_new_part_is_heavy(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A long history continued by a plain part: on the loop (the history comes from the
    session's cache); continued by a part dense with addresses: a thread."""
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    msgs = [{"role": "user", "content": PLAIN * 6 + " ann@example.com"}]  # ~96 KB
    _send(m, {"model": "m", "messages": msgs})
    assert len(threaded) == 1  # fresh and long
    msgs.append({"role": "user", "content": "plain words again " * 20})
    _send(m, {"model": "m", "messages": msgs})
    assert len(threaded) == 1  # continued by a small plain part: the loop
    msgs.append({"role": "user", "content": ADDRESSES})
    got = _send(m, {"model": "m", "messages": msgs})
    assert len(threaded) == 2  # continued by 16 KB of addresses: a thread
    assert b"user0.x@example.com" not in got and b"ann@example.com" not in got


def test_a_small_response_dense_with_values_is_masked_in_a_thread(tmp_path: Path,
                                                                  monkeypatch) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    for content, want in ((ADDRESSES, 1), ("Here is a short summary of the ticket.", 0)):
        answer = json.dumps({"id": "chatcmpl-1", "created": 1700000000, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        f = flow("anthropic", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        f.response = tutils.tresp(content=b"", headers=http.Headers(
            [(b"content-type", b"application/json")]))
        f.response.raw_content = answer
        with taddons.context(m):
            run(m.request(f))
            before = len(threaded)
            run(m.response(f))
        assert len(threaded) - before == want
        got = f.response.content or b""
        assert b"user0.x@example.com" not in got


def test_the_estimate_reads_what_makes_findings() -> None:
    heavy = masking_addon._heavy
    assert not heavy(h.chat_body(1024)) and not heavy(h.CANNED_COMPLETION.encode())
    assert not heavy(PLAIN.encode() * 4)  # 64 KB of prose
    assert not heavy(h.chat_body(16_000))  # the bench's prose, a value per ~450 bytes
    assert heavy(ADDRESSES.encode()) and heavy(DENSE_DIGITS.encode())
    assert heavy(("%41" * 6000).encode()) and heavy(("１" * 3000).encode())
    assert not heavy(b"")
