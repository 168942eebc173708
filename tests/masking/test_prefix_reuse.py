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
