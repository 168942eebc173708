"""The parts of an LLM request around its message list (model, tools, settings, a system
prompt) that a session sent before with nothing found in them are not walked and scanned
again (bodies.Masked._apply_part, MessageCache.clean_part): the detectors' answer depends
on the part's content alone, hashed structurally like a message.

Differential: conversations whose surrounding parts repeat, change, and carry values in
some turns only (same keys, same shape), masked with the session's cache and against a
twin session with no cache: bodies, findings and placeholder maps identical. And: the
shortcut is taken, it is bounded, and it lives in one session's cache only."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import bodies
from addons.masking.bodies import CLEAN_PARTS, Masked, MessageCaches
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session
from tests.masking.test_session_cache import VALUES, text

DETECTORS = DetectorSet()

TOOLS = [{"type": "function", "function": {
    "name": "lookup_customer", "description": "Find a customer by name or e-mail address.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "name, e-mail or phone"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        "required": ["query"]}}}]


def _part(rng: random.Random) -> tuple[dict, dict]:
    """(before, after) of the message list: mostly the same clean settings, sometimes a
    value in the same place (same keys), a float written another way, or other tools."""
    before: dict = {"model": rng.choice(["gpt-4o-mini", "gpt-4o-mini", "o3-2025"])}
    after: dict = {"temperature": json.loads(rng.choice(["0.7", "0.70", "7e-1"])),
                   "tools": TOOLS}
    k = rng.randrange(6)
    if k == 0:
        after["user"] = rng.choice(VALUES)
    elif k == 1:
        after["tools"] = [{**TOOLS[0], "function": {**TOOLS[0]["function"],
                                                    "description": rng.choice(VALUES)}}]
    elif k == 2:
        before["metadata"] = {"note": text(rng, 6)}
    elif k == 3:
        after["stop"] = [rng.choice(["4111", "1111 1111"]), "1111"]  # split across items
    return before, after


def _bodies(seed: int, turns: int) -> list[bytes]:
    rng = random.Random(seed)
    msgs: list[dict] = [{"role": "system", "content": text(rng, 6)}]
    out = []
    for _ in range(turns):
        msgs.append({"role": "user", "content": text(rng, 10)})
        before, after = _part(rng)
        out.append(json.dumps({**before, "messages": msgs, **after}).encode())
        msgs.append({"role": "assistant", "content": text(rng, 8)})
    return out


def _run(masker: Masker, bodies_: list[bytes], cached: bool
         ) -> tuple[list[bytes | None], list[dict], Session]:
    session, caches = Session(), MessageCaches()
    outs, founds = [], []
    for body in bodies_:
        found: dict = {}
        ctx = Masked(masker, session, found, dialect="openai",
                     cache=caches.get("alice\x00t", session, masker) if cached else None)
        outs.append(ctx.body(body, "application/json"))
        founds.append(found)
    return outs, founds, session


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000))
def test_parts_around_the_messages_are_masked_as_masking_again_gives(seed: int) -> None:
    masker = Masker(DETECTORS, b"k")
    bodies_ = _bodies(seed, 12)
    outs, founds, a = _run(masker, bodies_, cached=True)
    ref, ref_found, b = _run(masker, bodies_, cached=False)
    assert outs == ref
    assert founds == ref_found
    assert list(a._by_value.items()) == list(b._by_value.items())
    assert dict(a._restore) == dict(b._restore)


def test_a_value_that_appears_in_a_part_seen_clean_is_masked() -> None:
    """Turn 1: the tools are clean. Turn 2: the same keys and shape, one description now
    holds an address: masked (a digest of the shape alone would have passed it)."""
    masker = Masker(DETECTORS, b"k")
    leaky = [{**TOOLS[0], "function": {**TOOLS[0]["function"],
                                       "description": "escalate to ann.lee@example.com"}}]
    msgs = [{"role": "user", "content": "hello"}]
    b1 = json.dumps({"model": "m", "messages": msgs, "tools": TOOLS}).encode()
    b2 = json.dumps({"model": "m", "messages": msgs, "tools": leaky}).encode()
    outs, _, _ = _run(masker, [b1, b2, b1], cached=True)
    assert outs[0] is None and outs[2] is None
    assert outs[1] is not None and b"ann.lee" not in outs[1] and b"[EMAIL_1]" in outs[1]


def test_a_clean_part_is_not_scanned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    masker = Masker(DETECTORS, b"k")
    scanned: list[str] = []
    real = masker.find

    def spy(t: str) -> list:
        scanned.append(t)
        return real(t)

    monkeypatch.setattr(masker, "find", spy)
    # the two passes as two calls (bodies.Masked._detect joins them): counted per pass
    monkeypatch.setattr(bodies, "USE_ONE_CALL", False)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"}], "tools": TOOLS}).encode()
    _run(masker, [body] * 4, cached=True)
    with_tools = [t for t in scanned if "lookup_customer" in t]
    with_model = [t for t in scanned if "gpt-4o-mini" in t]
    assert len(with_tools) == 2 and len(with_model) == 1  # (first turn: both passes)
    scanned.clear()
    _run(masker, [body] * 4, cached=False)
    assert len([t for t in scanned if "lookup_customer" in t]) == 8  # every turn


def test_bounded_per_session_and_counted_in_its_bytes() -> None:
    masker = Masker(DETECTORS, b"k")
    caches = MessageCaches()
    session = Session()
    cache = caches.get("alice\x00t", session, masker)
    for i in range(CLEAN_PARTS * 4):
        body = json.dumps({"model": f"model-{i}", "messages": [
            {"role": "user", "content": "hi"}]}).encode()
        Masked(masker, session, {}, dialect="openai", cache=cache).body(
            body, "application/json")
    assert len(cache._clean) == CLEAN_PARTS
    assert cache.bytes >= CLEAN_PARTS * bodies.CLEAN_PART_COST
    assert caches.bytes == cache.bytes
    other = caches.get("mallory\x00t", Session(), masker)
    assert not any(other.clean_part(d) for d in cache._clean)  # one session's only
    caches.clear()
    assert caches.bytes == 0 and not cache._clean


@pytest.mark.parametrize("where", ["before", "after", "messages"])
def test_the_stand_in_for_the_list_never_splices_in_the_wrong_place(
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The document around the message list is serialised with a random stand-in for the
    list, then the masked messages replace it. A part that holds the very stand-in (here
    known: the random source fixed) is refused, never spliced at the wrong place; the same
    text inside the messages is only text."""
    monkeypatch.setattr(bodies.secrets, "token_hex", lambda n=16: "ab" * n)
    mark = "agentgate-messages-" + "ab" * 16
    masker = Masker(DETECTORS, b"k")
    msgs = [{"role": "user", "content": "mail ann.lee@example.com"}]
    doc: dict = {"model": "m", "messages": msgs, "temperature": 0.5}
    if where == "before":
        doc["model"] = mark
    elif where == "after":
        doc["temperature"] = [mark]
    else:
        msgs.append({"role": "user", "content": mark})
    body = json.dumps(doc).encode()
    session, caches = Session(), MessageCaches()
    ctx = Masked(masker, session, {}, dialect="openai",
                 cache=caches.get("alice\x00t", session, masker))
    if where != "messages":
        with pytest.raises(bodies.Unparseable):
            ctx.body(body, "application/json")
        return
    out = ctx.body(body, "application/json")
    assert out == Masked(masker, Session(), {}, dialect="openai").body(
        body, "application/json")
    assert json.loads(out)["messages"][1]["content"] == mark
