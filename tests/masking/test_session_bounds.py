"""Hostile: the placeholder maps are bounded in bytes, and one identity cannot evict the
others' placeholders (addons/masking/masker.py Session / SessionStore).

An agent chooses its session ids (X-Agent-Session) and the values it sends, so it can open
sessions and send unique values without end; before, the store allowed 10,000 sessions x
10,000 values with no byte bound (GBs), and the least recently used session of ANY
identity was the one dropped."""

from __future__ import annotations

import gc
import tracemalloc

from addons.masking.masker import Session, SessionStore, session_key


def _fill(s: Session, n: int, size: int = 24, tag: str = "x") -> None:
    for i in range(n):
        local = f"{tag}{i}".ljust(size, "a")
        s.placeholder("EMAIL", f"{local}@example.com", True)


def test_the_byte_estimate_is_not_below_what_python_allocates() -> None:
    """The bound is only as good as the estimate: it must not undercount real memory
    (short e-mail addresses, and long values such as private keys)."""
    for size, n in ((8, 4000), (3000, 300)):
        gc.collect()
        tracemalloc.start()
        try:
            s = Session(max_entries=100_000, max_bytes=1 << 40)
            base = tracemalloc.get_traced_memory()[0]
            _fill(s, n, size)
            real = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert s.bytes >= real, (size, s.bytes, real)
        assert s.bytes <= 3 * real, (size, s.bytes, real)  # and not absurdly above


def test_one_session_is_bounded_in_bytes_and_never_reuses_a_number() -> None:
    s = Session(max_entries=100_000, max_bytes=64 << 10)
    seen: dict[str, str] = {}
    for i in range(2000):
        value = f"user{i}.{'q' * 200}@example.com"
        ph = s.placeholder("EMAIL", value, True)
        assert ph not in seen or seen[ph] == value  # a number never stands for two values
        seen[ph] = value
        assert s.bytes <= 64 << 10
    # the most recent values are the ones kept, and restorable
    assert s.original(ph) == value
    assert s.original("[EMAIL_1]") is None
    # a forgotten value that comes back gets a new number, not an old one
    again = s.placeholder("EMAIL", f"user0.{'q' * 200}@example.com", True)
    assert again == "[EMAIL_2001]"


def test_huge_values_keep_the_store_within_its_bytes() -> None:
    store = SessionStore(max_bytes=2 << 20, session_max_bytes=256 << 10)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for k in range(40):  # 40 identities x 1 session, 3 KB values, far over the bound
            s = store.get(session_key(f"id{k}", "s"))
            for i in range(200):
                s.placeholder("PRIVATE_KEY", f"{k}-{i}-" + "K" * 3000, True)
            assert store.bytes <= store.max_bytes
        gc.collect()
        real = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.bytes <= 2 << 20
    assert real <= (2 << 20) * 1.5, real  # what the interpreter holds follows the bound


def test_one_identity_opening_sessions_evicts_only_its_own() -> None:
    store = SessionStore(max_sessions=100, max_bytes=1 << 20, session_max_bytes=64 << 10)
    victim = store.get(session_key("alice", "thread-1"))
    ph = victim.placeholder("EMAIL", "alice@example.com", True)
    for i in range(5000):  # mallory: new session ids and values, far past every bound
        s = store.get(session_key("mallory", f"s{i}"))
        _fill(s, 3, tag=f"m{i}-")
        assert len(store) <= 100 and store.bytes <= 1 << 20
    # alice's session was never the one dropped: same object, same placeholder
    again = store.get(session_key("alice", "thread-1"))
    assert again is victim
    assert again.placeholder("EMAIL", "alice@example.com", True) == ph
    assert again.original(ph) == "alice@example.com"
    # mallory holds at most its share
    assert store._ident_bytes["mallory"] <= store.identity_max_bytes
    assert len(store._by_ident["mallory"]) <= store.identity_max_sessions


def test_one_identity_with_huge_values_evicts_only_its_own() -> None:
    store = SessionStore(max_bytes=1 << 20, session_max_bytes=128 << 10)
    live = [store.get(session_key(f"user{k}", "t")) for k in range(3)]
    phs = [s.placeholder("EMAIL", f"user{k}@example.com", True) for k, s in enumerate(live)]
    for i in range(300):
        s = store.get(session_key("mallory", f"big{i}"))
        for j in range(40):
            s.placeholder("PRIVATE_KEY", f"{i}.{j}." + "Z" * 4000, True)
        for k, u in enumerate(live):  # the others keep working meanwhile
            assert store.get(session_key(f"user{k}", "t")) is u
    for k, u in enumerate(live):
        assert u.placeholder("EMAIL", f"user{k}@example.com", True) == phs[k]
    assert store.bytes <= 1 << 20


def test_many_identities_past_the_total_drop_the_least_recently_used_session() -> None:
    """Every identity within its share, the total full: the oldest session overall goes;
    a session in use (asked for between the others) stays."""
    store = SessionStore(max_bytes=512 << 10, session_max_bytes=64 << 10)
    live = store.get(session_key("alice", "t"))
    ph = live.placeholder("EMAIL", "alice@example.com", True)
    first = store.get(session_key("id0", "t"))
    for k in range(200):
        _fill(store.get(session_key(f"id{k}", "t")), 60, tag=f"{k}-")
        assert store.bytes <= store.max_bytes
        assert store.get(session_key("alice", "t")) is live  # in use: kept
    assert store.get(session_key("id0", "t")) is not first  # the oldest went
    assert live.placeholder("EMAIL", "alice@example.com", True) == ph


def test_a_dropped_session_no_longer_counts_and_expiry_gives_its_bytes_back() -> None:
    now = [0.0]
    store = SessionStore(idle_ttl=10, clock=lambda: now[0])
    s = store.get(session_key("a", "1"))
    _fill(s, 50)
    assert store.bytes == s.bytes > 0
    now[0] = 100
    store.get(session_key("b", "1"))
    assert store.bytes == 0 and store._ident_bytes == {"b": 0}
    _fill(s, 10, tag="late")  # a flow still holding the dropped session masks on
    assert store.bytes == 0
    store.clear()
    assert store.bytes == 0 and not store._by_ident


def test_the_gateway_masking_caches_stay_within_their_bounds_under_a_flood() -> None:
    """The addon's own stores (placeholders and message caches, with their defaults)
    flooded through the real masking path: many sessions, long unique histories, a
    value in every message; what the interpreter holds follows the bounds."""
    from addons.config.holder import RulesHolder
    from addons.masking.addon import (
        MESSAGE_CACHE_BYTES,
        MESSAGE_CACHE_SESSION_BYTES,
        Masking,
    )
    from addons.masking.bodies import Masked
    from addons.masking.config import MaskingConfig
    from addons.masking.detectors import DetectorSet
    from addons.masking.masker import MAX_BYTES, Masker

    m = Masking(RulesHolder())
    assert m.message_caches.max_bytes == MESSAGE_CACHE_BYTES <= 16 << 20
    assert m.message_caches.max_bytes_per_session == MESSAGE_CACHE_SESSION_BYTES
    assert m.sessions.max_bytes == MAX_BYTES <= 16 << 20
    masker = Masker(DetectorSet(MaskingConfig()), b"k", m.sessions)
    import json
    filler = "lorem ipsum dolor sit amet " * 370  # ~10 KB of prose per message
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for k in range(80):
            key = session_key(f"id{k % 3}", f"s{k}")
            msgs = [{"role": "user", "content": f"{k}.{i} {filler} mail u{k}x{i}@example.com"}
                    for i in range(60)]
            body = json.dumps({"model": "m", "messages": msgs}).encode()
            s = m.sessions.get(key)
            ctx = Masked(masker, s, {}, restorable=True, dialect="openai",
                         cache=m.message_caches.get(key, s, masker))
            assert ctx.body(body, "application/json") is not None
            assert m.message_caches.bytes <= MESSAGE_CACHE_BYTES
            assert m.sessions.bytes <= MAX_BYTES
        gc.collect()
        real = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # 80 x 600 KB of history sent (48 MB; before: all of it kept, 256 MiB allowed);
    # held: the two bounds and a little
    assert real <= MESSAGE_CACHE_BYTES + MAX_BYTES + (4 << 20), real
