"""The re-sent history is checked once, not every turn: a session's placeholder map has an
epoch (masker.Session.epoch) that changes whenever an answer `Session.replays` gave True
could turn False, and a CachedPrefix known good at the map's current epoch is spliced in
without looking each of its values up again (bodies.Masked._replay_prefix).

1. The invariant itself, on random sequences of placeholder() calls with tiny bounds
   (values forgotten, spelling shortcuts dropped, restore spellings changed): every set of
   answers that replayed at an epoch still replays while the epoch is the same.
2. Differential, through the real glue (policy's decode with the memo key, then
   masking.addon.mask_message): conversations whose values are forgotten during turns
   (tiny bounds) or sent with another spelling, masked with the shortcut and against a
   twin session masked with no cache; bodies, findings and maps identical — and the
   shortcut is taken (no vacuous pass). Values pushed out between turns by other flows:
   test_prefix_reuse.py's forgotten-placeholder test, which takes this path too."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.frame import decode
from addons.masking.bodies import MessageCaches
from addons.masking.masker import Masker, Session, session_key
from tests.masking.test_prefix_reuse import _same_maps, run_cached, run_reference
from tests.masking.test_session_cache import DETECTORS, text


@pytest.fixture(autouse=True)
def _memo_every_body(monkeypatch: pytest.MonkeyPatch) -> None:
    decode.MEMOS.clear()
    monkeypatch.setattr(decode, "MEMO_MIN_CHARS", 0)  # small test bodies are memoised too


# spellings of a few values: same canonical form, different raw text
SPELLINGS = [("EMAIL", v) for v in ("ann@example.com", "ANN@example.com", "Ann@Example.com",
                                    "bob@example.com", "BOB@example.com", "cy@example.org",
                                    "dee@example.org", "eve@example.net")] + \
    [("PHONE", v) for v in ("+1 415 555 0134", "+14155550134", "+1-415-555-0134",
                            "+1 212 555 0199")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, len(SPELLINGS) - 1), st.booleans()),
                    min_size=1, max_size=60),
       max_entries=st.integers(2, 6), max_bytes=st.sampled_from([1 << 20, 1500, 2500]))
def test_an_answer_that_replayed_still_replays_while_the_epoch_is_the_same(
        ops: list[tuple[int, bool]], max_entries: int, max_bytes: int) -> None:
    s = Session(max_entries=max_entries, max_bytes=max_bytes)
    seen: list[tuple[int, bool, tuple[str, str, str]]] = []
    for idx, restorable in ops:
        entity, value = SPELLINGS[idx]
        ph = s.placeholder(entity, value, restorable)
        for r in (False, True):
            if s.replays([(entity, value, ph)], r):
                seen.append((s.epoch, r, (entity, value, ph)))
        for epoch, r, item in seen:
            if epoch == s.epoch:
                assert s.replays([item], r), (item, r)


def test_the_epoch_changes_on_each_kind_of_change_and_not_on_additions() -> None:
    s = Session(max_entries=2)
    e = s.epoch
    a = s.placeholder("EMAIL", "ann@example.com", True)
    s.placeholder("EMAIL", "bob@example.com", True)
    assert s.epoch == e  # new values only
    s.placeholder("EMAIL", "ann@example.com", True)  # known spelling: nothing changes
    assert s.epoch == e
    s.placeholder("EMAIL", "ANN@example.com", True)  # another spelling restores now
    assert s.epoch != e and not s.replays([("EMAIL", "ann@example.com", a)], True)
    e = s.epoch
    s.placeholder("EMAIL", "cy@example.com", True)  # over max_entries: a value forgotten
    assert s.epoch != e
    assert Session().epoch != Session().epoch  # an epoch names one session's state


def _conversation(seed: int, turns: int, spellings: bool) -> list[bytes]:
    """A growing conversation; each new message carries values, some of them again in
    another spelling (the restore entry then changes)."""
    rng = random.Random(seed)
    msgs: list[dict] = [{"role": "system", "content": text(rng, 8)}]
    out = []
    for t in range(turns):
        words = text(rng, 20)
        if spellings and t % 3 == 2:
            words += " " + rng.choice(["ANNA.Meyer@example.com", "anna.meyer@example.com",
                                       "Anna.Meyer@Example.com"])
        msgs.append({"role": "user", "content": words})
        out.append(json.dumps({"model": "m", "messages": msgs}).encode())
        msgs.append({"role": "assistant", "content": text(rng, 15)})
    return out


def _count_replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = Session.replays

    def counting(self: Session, items, restorable):  # noqa: ANN001
        calls[0] += 1
        return real(self, items, restorable)

    monkeypatch.setattr(Session, "replays", counting)
    return calls


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bounds", [dict(max_entries=3), dict(max_entries=6),
                                    dict(max_bytes=2000), dict()])
def test_forgotten_and_respelled_values_are_masked_as_masking_again_gives(
        seed: int, bounds: dict) -> None:
    masker = Masker(DETECTORS, b"k")
    bodies = _conversation(seed, 10, spellings=True)
    a, b = Session(**bounds), Session(**bounds)
    outs, founds, reused = run_cached(bodies, masker, session_key("alice", "t"), a,
                                      MessageCaches())
    ref, ref_found = run_reference(bodies, masker, b)
    assert outs == ref
    # the same counts, in the same order (the record's findings are serialised as counted)
    assert [list(f.items()) for f in founds] == [list(f.items()) for f in ref_found]
    _same_maps(a, b)
    assert reused == len(bodies) - 1


def test_an_unchanged_map_is_not_asked_again_for_the_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken: with no value forgotten or respelled, the history's values
    are looked up in the turn that recorded them only, not in every later turn."""
    masker = Masker(DETECTORS, b"k")
    bodies = [json.dumps({"model": "m", "messages": [
        {"role": "user", "content": f"mail ann{i}@example.com about {i}"}
        for i in range(n + 1)]}).encode() for n in range(8)]
    calls = _count_replays(monkeypatch)
    a, b = Session(), Session()
    outs, founds, reused = run_cached(bodies, masker, session_key("alice", "t"), a,
                                      MessageCaches())
    ref, ref_found = run_reference(bodies, masker, b)
    assert outs == ref and founds == ref_found
    _same_maps(a, b)
    assert reused == len(bodies) - 1
    assert calls[0] == 0  # (before: one look-up of the whole history per turn)
