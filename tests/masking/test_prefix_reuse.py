"""Masking takes the history a session re-sends from its last request, whole (bodies.
CachedPrefix), when the flow's one parse took those messages from the session's previous
body (decode.parse_memo, keyed by identity and session): the masked bytes, the findings
and the session's placeholders are exactly those of masking every message again.

Differential, through the real glue (policy's decode with the memo key, then
masking.addon.mask_message on a real flow): the same conversations, turn by turn, against
a twin session masked with no cache and its own parse (every message masked again)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from addons.frame import decode
from addons.masking.addon import mask_message
from addons.masking.bodies import Masked, MessageCaches
from addons.masking.masker import Masker, Session, session_key
from tests.masking.test_session_cache import DETECTORS, VALUES, conversation, text


@pytest.fixture(autouse=True)
def _memo_every_body(monkeypatch: pytest.MonkeyPatch) -> None:
    decode.MEMOS.clear()
    monkeypatch.setattr(decode, "MEMO_MIN_CHARS", 0)  # small test bodies are memoised too


def _flow(body: bytes) -> object:
    f = tflow.tflow()
    f.request.headers["content-type"] = "application/json"
    f.request.raw_content = body
    return f


def run_cached(bodies: list[bytes], masker: Masker, key: str, session: Session,
               caches: MessageCaches) -> tuple[list, list, int]:
    outs, founds, reused = [], [], 0
    for body in bodies:
        f = _flow(body)
        b = decode.request_body(f, memo_key=key)  # as policy reads it
        assert b is not None
        b.json  # noqa: B018 - parsed here, as policy does, before masking
        found: dict = {}
        ctx = Masked(masker, session, found, dialect="openai",
                     cache=caches.get(key, session, masker))
        outs.append(mask_message(ctx, body, "", "application/json", 1 << 24, False, flow=f))
        reused += bool(ctx.reuse and ctx.reuse[1])
        founds.append(found)
    return outs, founds, reused


def run_reference(bodies: list[bytes], masker: Masker, session: Session) -> tuple[list, list]:
    outs, founds = [], []
    for body in bodies:
        found: dict = {}
        ctx = Masked(masker, session, found, dialect="openai")  # no cache, own parse
        outs.append(ctx.body(body, "application/json"))
        founds.append(found)
    return outs, founds


def _same_maps(a: Session, b: Session) -> None:
    assert list(a._by_value.items()) == list(b._by_value.items())
    assert dict(a._restore) == dict(b._restore)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000))
def test_prefix_reuse_is_byte_identical_to_masking_again(seed: int) -> None:
    decode.MEMOS.clear()
    masker = Masker(DETECTORS, b"k")
    bodies = conversation(seed, 10)
    a, b = Session(), Session()
    outs, founds, _ = run_cached(bodies, masker, session_key("alice", "t1"), a,
                                 MessageCaches())
    ref, ref_found = run_reference(bodies, masker, b)
    assert outs == ref
    assert founds == ref_found
    _same_maps(a, b)


def _growing(seed: int, turns: int) -> list[bytes]:
    rng = random.Random(seed)
    msgs: list[dict] = [{"role": "system", "content": text(rng, 8)}]
    out = []
    for _ in range(turns):
        msgs.append({"role": "user", "content": text(rng, 25)})
        out.append(json.dumps({"model": "m", "messages": msgs}).encode())
        msgs.append({"role": "assistant", "content": text(rng, 25)})
    return out


def test_a_plain_growing_conversation_takes_the_history_whole() -> None:
    masker = Masker(DETECTORS, b"k")
    bodies = _growing(7, 12)
    a, b = Session(), Session()
    caches = MessageCaches()
    outs, founds, reused = run_cached(bodies, masker, session_key("alice", "t"), a, caches)
    ref, ref_found = run_reference(bodies, masker, b)
    assert outs == ref and founds == ref_found
    _same_maps(a, b)
    assert reused == len(bodies) - 1  # every turn after the first took its history whole


def test_a_placeholder_the_session_forgot_is_not_replayed_from_the_prefix() -> None:
    """Between two turns the session's map loses a value (its own bound): the prefix's
    recorded placeholder is no longer what the map gives, so the messages are taken one
    by one, and the value gets a new number, as masking again gives."""
    masker = Masker(DETECTORS, b"k")
    bodies = _growing(11, 6)
    a, b = Session(max_entries=3), Session(max_entries=3)
    caches = MessageCaches()
    key = session_key("alice", "t")
    outs, founds, _ = run_cached(bodies[:3], masker, key, a, caches)
    ref, ref_found = run_reference(bodies[:3], masker, b)
    assert outs == ref
    for s in (a, b):  # the same values pushed out of both maps
        for v in VALUES[:6]:
            s.placeholder("EMAIL", f"x{v}@example.org", True)
    outs, founds, _ = run_cached(bodies[3:], masker, key, a, caches)
    ref, ref_found = run_reference(bodies[3:], masker, b)
    assert outs == ref and founds == ref_found
    _same_maps(a, b)


def test_another_identity_with_the_same_session_id_gets_nothing_from_the_prefix() -> None:
    masker = Masker(DETECTORS, b"k")
    bodies = _growing(13, 5)
    caches = MessageCaches()
    run_cached(bodies[:4], masker, session_key("alice", "t"), Session(), caches)
    mallory, ref = Session(), Session()
    outs, _, reused = run_cached(bodies[4:], masker, session_key("mallory", "t"), mallory,
                                 caches)
    assert reused == 0
    assert outs == run_reference(bodies[4:], masker, ref)[0]
    _same_maps(mallory, ref)


def _prefix_held(cache: object) -> bool:
    p = cache._prefix  # type: ignore[attr-defined]
    entries = cache._entries  # type: ignore[attr-defined]
    return p is None or all(entries.get(d) is e for d, e in p.entries)


@pytest.mark.parametrize("max_entries", [2, 3, 5, 64])
def test_the_prefix_never_names_an_entry_the_cache_dropped(max_entries: int) -> None:
    """set_prefix looks up only the messages after the prefix the turn took whole while
    that one is still the cache's: a cache too small for the history evicts some of them
    while the turn puts its new messages, and then the prefix kept must still hold only
    entries the cache holds (it never keeps an evicted one alive), turn after turn, with
    the bytes those of masking again."""
    masker = Masker(DETECTORS, b"k")
    bodies = _growing(17, 10)
    caches = MessageCaches(max_entries=max_entries)
    key = session_key("alice", "t")
    a, b = Session(), Session()
    for body in bodies:
        outs, founds, _ = run_cached([body], masker, key, a, caches)
        cache = caches.get(key, a, masker)
        assert _prefix_held(cache)
        ref, ref_found = run_reference([body], masker, b)
        assert outs == ref and founds == ref_found
    _same_maps(a, b)


def test_a_prefix_not_the_caches_own_is_looked_up_whole() -> None:
    """A `base` that is no longer the cache's prefix (an entry was dropped since: _drop
    forgets the prefix) gives no shortcut: every entry is looked up."""
    from addons.masking.bodies import CachedMessage, CachedPrefix
    masker = Masker(DETECTORS, b"k")
    session = Session()
    caches = MessageCaches(max_entries=8)
    cache = caches.get("k", session, masker)
    msgs = [(bytes([i]) * 32, CachedMessage(b"{}", False, (), (), True)) for i in range(4)]
    for d, e in msgs:
        cache.put(d, e)
    base = CachedPrefix(1, tuple(msgs[:3]), True, True, "")
    cache.set_prefix(base)
    assert cache._prefix is base
    cache.put(msgs[0][0], CachedMessage(b"[]", False, (), (), True))  # replaced: dropped
    assert cache._prefix is None
    longer = CachedPrefix(2, tuple(msgs), True, True, "", base=base)
    cache.set_prefix(longer, base)
    assert cache._prefix is None  # msgs[0]'s entry is not the one held any more


def test_all_messages_answers_as_the_item_by_item_check() -> None:
    from addons.masking.bodies import _all_messages

    class S(str):
        pass

    class D(dict):
        pass

    cases: list[list] = [
        [{"a": 1}], [{"text": "x"}], [{"text": S("x")}], [{"text": 1}], [D(text="x")],
        [D(a=1)], ["x"], [{"a": 1}, "x"], [{"a": 1}, {"text": None}], [{}], [None],
        [{"role": "user", "content": "c"}] * 50 + [{"text": "t"}],
        [{"role": "user", "content": [{"type": "text", "text": "t"}]}], [[]], [{"text": b"x"}],
    ]
    for c in cases:
        ref = all(isinstance(m, dict) and not isinstance(m.get("text"), str) for m in c)
        assert _all_messages(c) is ref, c
