"""A turn's new messages detected in ONE detector call (bodies.Masked._walk_ahead and
_detect_units: each message's text, with its left context and cross-field text, after the
one before, apart by DetectorSet.isolating_break of all the text before it) must give
exactly what one call per message gives (the reference: _detect_units off) — the same
bytes, findings, placeholders and session map, turn by turn — on generated conversations
(values split over messages and parts, context words at a message's end, private-key
blocks left open, escapes, non-ASCII), through the real glue (policy's decode with the
session's memo key, masking.addon.mask_message on a real flow), with both engines; and a
separator that does not isolate (two line breaks) is caught by the same comparison.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.frame import decode
from addons.masking import bodies
from addons.masking.addon import mask_message
from addons.masking.bodies import Masked, MessageCaches
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session, session_key
from tests.masking.test_one_call import AWS_KEY, PEM_BODY, PEM_FOOT, PEM_HEAD, pieces
from tests.masking.test_prefix_reuse import _flow

FAST = Masker(DetectorSet(MaskingConfig()), b"test-key")
REFERENCE = Masker(DetectorSet(MaskingConfig(), fast=False), b"test-key")


@pytest.fixture(autouse=True)
def _memo_every_body(monkeypatch: pytest.MonkeyPatch) -> None:
    decode.MEMOS.clear()
    monkeypatch.setattr(decode, "MEMO_MIN_CHARS", 0)  # small test bodies are memoised too
    monkeypatch.setattr(bodies, "MIN_BATCH_CHARS", 0)  # and short messages share a call


def _run(masker: Masker, turns: list[bytes], batched: bool, monkeypatch: pytest.MonkeyPatch
         ) -> tuple[list, list, list, int]:
    """Every turn's (masked body, findings), the session's map after it, and how many
    detector calls served more than one message."""
    decode.MEMOS.clear()
    calls = 0
    real = Masked._detect_units

    def units(self: Masked, slots: list) -> Any:
        nonlocal calls
        got = real(self, slots) if batched else None
        calls += got is not None
        return got

    with monkeypatch.context() as m:
        m.setattr(Masked, "_detect_units", units)
        session, caches = Session(), MessageCaches()
        key = session_key("alice", "conv")
        outs, founds, maps = [], [], []
        for body in turns:
            f = _flow(body)
            decode.request_body(f, memo_key=key).json  # noqa: B018 - as policy parses it
            found: dict = {}
            ctx = Masked(masker, session, found, dialect="openai",
                         cache=caches.get(key, session, masker))
            try:
                outs.append(mask_message(ctx, body, "", "application/json", 1 << 24, False,
                                         flow=f, memo_key=key))
            except bodies.Unparseable as e:
                outs.append(("refused", e.reason))
            founds.append(found)
            maps.append((list(session._by_value.items()), dict(session._restore)))
    return outs, founds, maps, calls


def _same(masker: Masker, turns: list[bytes], monkeypatch: pytest.MonkeyPatch) -> int:
    one = _run(masker, turns, True, monkeypatch)
    each = _run(masker, turns, False, monkeypatch)
    assert one[:3] == each[:3]
    return one[3]


def _content(rng: random.Random, draw_text: Any) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return [{"type": "text", "text": draw_text()}, {"type": "text", "text": draw_text()}]
    if kind == 1:
        return None
    return draw_text()


def _conversation(texts: list[str], seed: int, new_per_turn: int) -> list[bytes]:
    """Request bodies of a growing conversation whose messages take `texts` in turn;
    `new_per_turn` messages added each turn (a tool loop adds several)."""
    rng = random.Random(seed)
    it = iter(texts * 3)

    def draw() -> str:
        return next(it, "end")

    msgs: list[dict] = [{"role": "system", "content": draw()}]
    out = []
    roles = ("user", "assistant", "tool", "user")
    for t in range(4):
        for k in range(new_per_turn if t else 2):
            role = roles[(t + k) % len(roles)]
            msg: dict = {"role": role, "content": _content(rng, draw)}
            if role == "assistant" and rng.random() < 0.3:
                msg["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                    "name": "lookup", "arguments": json.dumps({"q": draw()})}}]
            msgs.append(msg)
        out.append(json.dumps({"model": "gpt-4o-mini", "messages": msgs,
                               "temperature": 0.2}).encode())
    return out


text_lists = st.lists(st.lists(pieces, min_size=1, max_size=5).map("".join), min_size=4,
                 max_size=14)


@pytest.mark.parametrize("masker", [FAST, REFERENCE], ids=["hyperscan", "reference"])
@settings(max_examples=100, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(texts=text_lists, seed=st.integers(0, 1000), new=st.integers(2, 4))
def test_one_call_per_turn_is_one_call_per_message(masker, texts, seed, new, monkeypatch):
    _same(masker, _conversation(texts, seed, new), monkeypatch)


SAMPLE_VALUES = [v for v in SAMPLES.values() if v]


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.sampled_from(SAMPLE_VALUES + ["", " ", "x", "\n", "key: "]),
                min_size=4, max_size=12), seed=st.integers(0, 1000))
def test_samples_split_over_messages(values, seed, monkeypatch):
    # every detector's sample, whole and cut in two at a message boundary
    texts = []
    for v in values:
        cut = len(v) // 2
        texts += [f"note {v} end", v[:cut], v[cut:]]
    _same(FAST, _conversation(texts, seed, 3), monkeypatch)


# a message that ends in a context word, a key block left open, or a card's first half:
# what the next message starts with must not be read with it unless one call per message
# would (its own left context is the previous message's tail, nothing more)
CRAFTED = [
    ["aws_secret_access_key = ", AWS_KEY, "plain", "words"],
    [PEM_HEAD + "\n" + PEM_BODY, PEM_BODY + "\n" + PEM_FOOT, "after", "the key"],
    # (past the cross-field text's window: its head holds no BEGIN line to stop the block)
    ["x" * 300 + "\n" + PEM_HEAD + "\n" + PEM_BODY, PEM_BODY + "\n" + PEM_FOOT, "a", "b"],
    ["card 4111 1111", "1111 1111 thanks", "call +1 415", "555 0132"],
    ["x" * 300 + " " + PEM_HEAD, PEM_BODY, PEM_FOOT, "done"],
    ["jane.doe", "@example.com", "ssn 078-05-", "1123"],
]


@pytest.mark.parametrize("texts", CRAFTED)
@pytest.mark.parametrize("new", [2, 3])
def test_crafted(texts, new, monkeypatch):
    assert _same(FAST, _conversation(texts, 1, new), monkeypatch) > 0


def test_the_one_call_is_taken(monkeypatch):
    # the usual turn (a reply and a question) costs one detector call, not two
    monkeypatch.setattr(bodies, "MIN_BATCH_CHARS", 256)
    calls = []
    real = FAST.detectors.find

    def find(text: str) -> Any:
        calls.append(text)
        return real(text)

    turns = _conversation([f"{w} " * 60 for w in ("one", "three", "five", "seven",
                                                   "eight", "ten", "eleven", "twelve")], 3, 2)
    decode.MEMOS.clear()
    session, caches = Session(), MessageCaches()
    key = session_key("alice", "calls")
    monkeypatch.setattr(FAST.detectors, "find", find)
    for body in turns[:-1]:
        f = _flow(body)
        mask_message(Masked(FAST, session, {}, dialect="openai",
                            cache=caches.get(key, session, FAST)),
                     body, "", "application/json", 1 << 24, False, flow=f, memo_key=key)
    calls.clear()
    f = _flow(turns[-1])
    mask_message(Masked(FAST, session, {}, dialect="openai",
                        cache=caches.get(key, session, FAST)),
                 turns[-1], "", "application/json", 1 << 24, False, flow=f, memo_key=key)
    message_calls = [c for c in calls if "seven" in c or "eight" in c or "ten" in c
                     or "eleven" in c or "twelve" in c]
    assert len(message_calls) == 1


def test_a_separator_that_does_not_isolate_is_caught(monkeypatch):
    # two line breaks between messages: a context word at one message's end then reaches
    # the key at the next one's start, and the comparison above sees it
    monkeypatch.setattr(DetectorSet, "isolating_break", lambda self, a: "\n\n")
    with pytest.raises(AssertionError):
        _same(FAST, _conversation(CRAFTED[0], 1, 2), monkeypatch)


def test_custom_detectors_take_one_call_per_message(monkeypatch):
    cfg = MaskingConfig(custom=(CustomDetector("TICKET", r"TCK-\d{6}"),))
    masker = Masker(DetectorSet(cfg), b"test-key")
    assert _same(masker, _conversation(["TCK-123456", "a", "TCK-", "654321"], 1, 2),
                 monkeypatch) == 0
