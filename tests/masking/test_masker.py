"""Strategies and per-session state of the masker (pure; a small fake detector set)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.masking.masker import (
    LABELS,
    Masker,
    Session,
    SessionStore,
    canonical,
    label,
    partial,
    session_key,
)


@dataclass(frozen=True)
class FakeFinding:
    entity: str
    start: int
    end: int
    value: str


class FakeDetectors:
    """Emails and 16-digit card-like numbers (with spaces/dashes): enough to test placement
    without depending on the real detector engine."""

    PATTERNS = (
        ("EMAIL", re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")),
        ("CREDIT_CARD", re.compile(r"\b\d{4}(?:[ -]?\d{4}){3}\b")),
        ("US_SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    )
    max_len = 40

    def __init__(self, strategies: dict[str, str] | None = None) -> None:
        self.strategies = strategies or {}
        self.calls = 0

    def find(self, text: str) -> list[FakeFinding]:
        self.calls += 1
        out = []
        for entity, pat in self.PATTERNS:
            out += [FakeFinding(entity, m.start(), m.end(), m.group()) for m in pat.finditer(text)]
        out.sort(key=lambda f: f.start)
        kept, end = [], -1
        for f in out:
            if f.start >= end:
                kept.append(f)
                end = f.end
        return kept

    def strategy_for(self, entity: str) -> str:
        return self.strategies.get(entity, "placeholder")


def test_placeholder_is_stable_per_session_and_distinct_per_value() -> None:
    m = Masker(FakeDetectors())
    s = Session()
    found: dict = {}
    out = m.mask_text("mail ann@example.com and bob@example.com, again ann@example.com",
                      s, found)
    assert out == "mail [EMAIL_1] and [EMAIL_2], again [EMAIL_1]"
    assert found == {"EMAIL": {"count": 3, "strategy": "placeholder"}}
    # the next request of the same session reuses the numbering
    assert m.mask_text("to bob@example.com", s, {}) == "to [EMAIL_2]"
    # another session starts again at 1
    assert m.mask_text("to bob@example.com", Session(), {}) == "to [EMAIL_1]"


def test_same_value_different_spelling_same_placeholder() -> None:
    m = Masker(FakeDetectors())
    s = Session()
    a = m.mask_text("4111 1111 1111 1111", s, {})
    b = m.mask_text("4111-1111-1111-1111", s, {})
    c = m.mask_text("ANN@example.com ann@example.com", s, {})
    assert a == b == "[CREDIT_CARD_1]"
    assert label("EMAIL_ADDRESS") == "EMAIL" and label("my-thing") == "MY_THING"
    assert c == "[EMAIL_1] [EMAIL_1]"
    assert canonical("CREDIT_CARD", "４１１１ 1111") == canonical("CREDIT_CARD", "41111111")
    assert canonical("EMAIL", "a\u200b@b.com") == "a@b.com"


def test_strategies() -> None:
    det = FakeDetectors({"EMAIL": "redact", "CREDIT_CARD": "partial", "US_SSN": "hash"})
    m = Masker(det, hmac_key=b"k1")
    found: dict = {}
    out = m.mask_text("a@b.com 4111-1111-1111-1234 078-05-1120", Session(), found)
    assert out.startswith("[REDACTED_EMAIL] ****-****-****-1234 [US_SSN_HMAC_")
    assert found == {"EMAIL": {"count": 1, "strategy": "redact"},
                     "CREDIT_CARD": {"count": 1, "strategy": "partial"},
                     "US_SSN": {"count": 1, "strategy": "hash"}}
    # keyed: same key -> same hash (correlation), other key -> other hash, no raw value
    h1 = m.hash_text("US_SSN", "078-05-1120")
    assert h1 == Masker(det, hmac_key=b"k1").hash_text("US_SSN", "078051120")
    assert h1 != Masker(det, hmac_key=b"k2").hash_text("US_SSN", "078-05-1120")
    assert "1120" not in h1


def test_partial_never_reveals_short_values() -> None:
    assert partial("4111111111111234") == "************1234"
    assert partial("123-45") == "******"
    assert partial("a\u200bbcdefghij") == "******ghij"


def test_restore_only_values_the_agent_sent() -> None:
    m = Masker(FakeDetectors())
    s = Session()
    m.mask_text("ann@example.com", s, {}, restorable=True)
    # the model invents a new address: masked, but never restorable
    out = m.mask_text("write [EMAIL_1] or eve@evil.com", s, {}, restorable=False, restore=True)
    assert out == "write ann@example.com or [EMAIL_2]"
    assert s.restore("[EMAIL_2] [EMAIL_1] [EMAIL_9]") == "[EMAIL_2] ann@example.com [EMAIL_9]"
    assert s.restore('"[EMAIL_1]"', escape=lambda v: v.upper()) == '"ANN@EXAMPLE.COM"'


def test_session_repr_hides_values() -> None:
    s = Session()
    Masker(FakeDetectors()).mask_text("ann@example.com", s, {})
    assert "ann" not in repr(s) and "ann" not in repr(SessionStore())


def test_session_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_ttl=10, clock=lambda: now[0])
    a = store.get("a")
    store.get("b")
    store.get("c")  # evicts a (least recently used)
    assert len(store) == 2
    assert store.get("a") is not a
    now[0] = 100.0
    store.get("z")  # everything else idle for > ttl
    assert len(store) == 1


def test_session_entries_are_bounded() -> None:
    m = Masker(FakeDetectors())
    s = Session(max_entries=3)
    for i in range(5):
        m.mask_text(f"u{i}@example.com", s, {})
    assert len(s) == 3
    assert s.original("[EMAIL_1]") is None and s.original("[EMAIL_5]") == "u4@example.com"


def test_session_key_binds_identity() -> None:
    assert session_key("alice", "s1") != session_key("bob", "s1")
    assert session_key(None, "s1") != session_key("", "s1x")


@pytest.mark.parametrize("text", ["", "nothing here", "[EMAIL_1] stays"])
def test_no_findings_returns_same_text(text: str) -> None:
    assert Masker(FakeDetectors()).mask_text(text, Session(), {}) == text


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(max_size=12) | st.sampled_from(["EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE",
                                               "CREDIT_CARD", "ß", "__", ""]))
def test_label_is_worked_out_once_the_same(entity):
    # label() remembers its answer per entity: the first and the remembered one are the
    # rule's (fails when the memo keeps another entity's label or skips LABELS)
    want = LABELS[entity] if entity in LABELS else (
        re.sub(r"[^A-Z0-9_]+", "_", entity.upper()).strip("_") or "VALUE")
    assert label(entity) == want
    assert label(entity) == want


def test_session_bytes_are_charged_by_real_size_of_wide_values() -> None:
    """The byte bound counts what a value's str really takes: one 4-byte character (an emoji)
    makes every character of it 4 bytes, which len() counted as 1 each."""
    import sys

    from addons.masking.bodies import CachedMessage, _entry_size
    from addons.masking.masker import Session
    narrow, wide = Session(), Session()
    for i in range(50):
        narrow.placeholder("PASSWORD", f"{i:04d}" + "a" * 200, restorable=True)
        wide.placeholder("PASSWORD", f"{i:04d}" + "a" * 199 + "\U0001F600", restorable=True)
    # the wide values take about 4x the memory of the narrow ones, and are charged so
    real_wide = 50 * sys.getsizeof("0000" + "a" * 199 + "\U0001F600")
    assert wide.bytes - narrow.bytes >= 2 * (real_wide - 50 * sys.getsizeof("0000" + "a" * 200))
    v = "x" * 99 + "\U0001F600"
    entry = CachedMessage(b"{}", True, (("PASSWORD", v, "[PASSWORD_1]"),), ())
    assert _entry_size(entry) >= sys.getsizeof(v) + sys.getsizeof("[PASSWORD_1]")
