"""The per-session message cache (bodies.MessageCache): a message this session already sent
is not masked again, and a hit is byte-identical to a miss.

Differential: the same random conversations, turn by turn, through (a) a session whose
cache persists across turns (hits) and (b) a twin session, same placeholder history, whose
cache is new every turn (all misses); bodies and findings must be identical. And against
the whole-body path (no cache) on ordinary conversations.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import bodies as bodies_mod
from addons.masking.bodies import Masked, MessageCaches
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session

DETECTORS = DetectorSet()
MASKER = Masker(DETECTORS, b"k")
VALUES = [v for k, v in SAMPLES.items() if k not in ("PRIVATE_KEY",)] + [
    "anna.meyer@example.com", "ANNA.Meyer@example.com", "+1 415 555 0134",
    "4111 1111 1111 1111", "10.1.2.3", "DE89 3704 0044 0532 0130 00"]
WORDS = "the order ships friday please check invoice aws secret key card phone".split()


def text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        out.append(rng.choice(VALUES) if rng.random() < 0.15 else rng.choice(WORDS))
    return " ".join(out)


def message(rng: random.Random, role: str) -> dict:
    kind = rng.randrange(4)
    if kind == 0 and role == "user":
        return {"role": role, "content": [{"type": "text", "text": text(rng, 12)},
                                          {"type": "text", "text": text(rng, 5)}]}
    if kind == 1 and role == "assistant":
        return {"role": role, "content": None, "tool_calls": [{
            "id": f"call_{rng.randrange(99)}", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": text(rng, 4)})}}]}
    return {"role": role, "content": text(rng, rng.randrange(1, 30))}


def conversation(seed: int, turns: int) -> list[bytes]:
    rng = random.Random(seed)
    msgs: list[dict] = [{"role": "system", "content": text(rng, 8)}]
    out = []
    for t in range(turns):
        if t:
            msgs.append(message(rng, "assistant"))
        msgs.append(message(rng, "user"))
        if rng.random() < 0.2 and len(msgs) > 3:
            # an agent that edits or drops history: a hit need not sit where it was
            msgs.pop(rng.randrange(1, len(msgs) - 1))
        body = {"model": "gpt-4o-mini", "messages": msgs, "user": rng.choice(VALUES)}
        if rng.random() < 0.3:
            body = {"system": text(rng, 6), "messages": msgs, "max_tokens": 100}
        out.append(json.dumps(body).encode())
    return out


def run(bodies: list[bytes], caches: MessageCaches | None, fresh: bool
        ) -> tuple[list[bytes | None], list[dict], Session]:
    session = Session()
    outs, founds = [], []
    for body in bodies:
        if fresh:
            caches = MessageCaches()
        cache = caches.get("k", session, MASKER) if caches is not None else None
        found: dict = {}
        ctx = Masked(MASKER, session, found, dialect="openai", cache=cache)
        outs.append(ctx.body(body, "application/json"))
        founds.append(found)
    return outs, founds, session


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6))
def test_hit_is_byte_identical_to_miss(seed: int) -> None:
    bodies = conversation(seed, 8)
    caches = MessageCaches()
    hit_out, hit_found, s1 = run(bodies, caches, fresh=False)
    miss_out, miss_found, s2 = run(bodies, None, fresh=True)
    assert hit_out == miss_out
    assert hit_found == miss_found
    # the session's map (what restore gives back) is the same too
    for ph in {p for o in hit_out if o for p in __import__("re").findall(
            rb"\[[A-Z_]+_\d+\]", o)}:
        assert s1.original(ph.decode()) == s2.original(ph.decode())
    assert caches.get("k", s1, MASKER).hits > 0


def test_same_as_whole_body_masking_on_a_plain_conversation() -> None:
    bodies = conversation(7, 10)
    with_cache, f1, _ = run(bodies, MessageCaches(), fresh=False)
    whole, f2, _ = run(bodies, None, fresh=False)
    assert with_cache == whole
    assert f1 == f2


def test_hits_skip_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    # the passes as two calls (bodies.Masked._detect joins them with a separator of
    # ~1,200 line breaks): the characters counted are the texts' own
    monkeypatch.setattr(bodies_mod, "USE_ONE_CALL", False)

    class Counting(DetectorSet):
        calls = 0

        def find(self, t: str) -> list:
            Counting.calls += len(t)
            return super().find(t)

    masker = Masker(Counting(), b"k")
    session = Session()
    caches = MessageCaches()
    msgs = [{"role": "user", "content": "mail anna.meyer@example.com " * 200}]
    scanned = []
    for _ in range(5):
        Counting.calls = 0
        Masked(masker, session, {}, dialect="openai",
               cache=caches.get("k", session, masker)).body(
            json.dumps({"model": "m", "messages": msgs}).encode(), "application/json")
        scanned.append(Counting.calls)
        msgs = [*msgs, {"role": "assistant", "content": "ok " * 10}]
    # the first turn scans the message; later turns only what is new (with the left
    # context of the message before it), never the history again
    assert scanned[0] > 5000
    assert all(s <= masker.context_len + 200 for s in scanned[1:]), scanned


def test_evicted_placeholder_is_masked_again_not_replayed_wrong() -> None:
    session = Session(max_entries=2)
    caches = MessageCaches()
    body = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "a@example.com b@example.com"}]}).encode()
    first = Masked(MASKER, session, {}, dialect="openai",
                   cache=caches.get("k", session, MASKER)).body(body, "application/json")
    # two new values push the first two out of the session's map: renumbered
    Masked(MASKER, session, {}, dialect="openai").body(json.dumps(
        {"messages": [{"role": "user", "content": "c@example.com d@example.com"}]}).encode(),
        "application/json")
    again = Masked(MASKER, session, {}, dialect="openai",
                   cache=caches.get("k", session, MASKER)).body(body, "application/json")
    fresh = Masked(MASKER, session, {}, dialect="openai").body(body, "application/json")
    assert again == fresh
    assert first is not None and b"example.com" not in again


def test_bounded_in_bytes_and_sessions() -> None:
    caches = MessageCaches(max_sessions=3, max_bytes_per_session=64 << 10,
                           max_bytes=128 << 10)
    sessions = [Session() for _ in range(5)]
    for i, s in enumerate(sessions):
        c = caches.get(f"s{i}", s, MASKER)
        for j in range(50):
            Masked(MASKER, s, {}, dialect="openai", cache=c).body(json.dumps(
                {"messages": [{"role": "user", "content": f"{j} x@example.com " + "w" * 4000}]}
            ).encode(), "application/json")
        assert c.bytes <= 64 << 10
    assert len(caches) <= 3
    assert caches.bytes <= 128 << 10


def test_a_new_session_object_drops_the_cache() -> None:
    caches = MessageCaches()
    s1 = Session()
    c1 = caches.get("k", s1, MASKER)
    Masked(MASKER, s1, {}, dialect="openai", cache=c1).body(
        b'{"messages":[{"role":"user","content":"anna.meyer@example.com"}]}',
        "application/json")
    assert len(c1) == 1
    c2 = caches.get("k", Session(), MASKER)  # the placeholder session expired: new one
    assert len(c2) == 0 and len(c1) == 0
    assert "anna" not in repr(c2) and "anna" not in repr(caches)


def test_context_word_in_the_previous_message_still_confirms() -> None:
    """The AWS secret needs its key word within 80 characters before it; with the word at
    the end of one message and the key starting the next, whole-body masking finds it, and
    so must the per-message units (left context), on a miss and on a hit."""
    secret = SAMPLES["AWS_SECRET_KEY"].split("=")[-1].strip()
    msgs = [{"role": "user", "content": "here is my aws_secret_access_key"},
            {"role": "user", "content": f"{secret} thanks"}]
    body = json.dumps({"model": "m", "messages": msgs}).encode()
    whole = Masked(MASKER, Session(), {}, dialect="openai").body(body, "application/json")
    assert whole is not None and secret.encode() not in whole
    session, caches = Session(), MessageCaches()
    for _ in range(2):  # miss, then hit
        got = Masked(MASKER, session, {}, dialect="openai",
                     cache=caches.get("k", session, MASKER)).body(body, "application/json")
        assert got == whole
