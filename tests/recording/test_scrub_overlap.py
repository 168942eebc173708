"""Secrets scrubbed from the audit store by value: overlapping occurrences leave nothing of
either secret, whatever order the secrets come in (the hash seed ordered equal lengths)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from addons.recording import store
from tests.recording.test_exact_json import _reference_bytes

A, B = "abcdefgh12", "gh12345678"  # equal lengths, sharing "gh12"


def _reference(text: str, secrets: list[str]) -> str:
    """Every occurrence of every secret replaced, overlapping ones by one marker (the
    reference test_exact_json checks the scrubber's shortcut against)."""
    return _reference_bytes(secrets, text.encode()).decode()


def test_overlapping_secrets_leave_nothing_of_either() -> None:
    text = "x abcdefgh12345678 y"
    for order in ([A, B], [B, A]):
        sc = store.Scrubber(order)
        assert sc.str(text) == f"x {store.REDACTED} y"
        assert sc.bytes(text.encode()) == f"x {store.REDACTED} y".encode()
    # one secret overlapping itself ("aaaa…" in a longer run of "a")
    sc = store.Scrubber(["aaaaaaaa"])
    assert sc.str("<" + "a" * 11 + ">") == f"<{store.REDACTED}>"


def test_a_stored_state_holds_neither_overlapping_secret() -> None:
    sc = store.Scrubber([B, A])
    state = {"request": {"content": b"k=abcdefgh12345678", "path": "/abcdefgh12345678"},
             "metadata": {"note": "abcdefgh12345678"}}
    for checked in (False, True):
        raw = store.dump_state(state, sc, checked=checked)
        for part in (A, B, "345678", "abcdef"):
            assert part.encode() not in raw, (checked, part)
        json.loads(raw)


@given(st.text(alphabet="ab12", max_size=60),
       st.lists(st.text(alphabet="ab12", min_size=8, max_size=10), min_size=1, max_size=4))
def test_redact_is_the_union_of_every_occurrence(text: str, secrets: list[str]) -> None:
    sc = store.Scrubber(secrets)
    want = _reference(text, sorted(set(secrets)))
    assert sc.str(text) == want
    assert sc.bytes(text.encode()) == want.encode()
    assert store.Scrubber(list(reversed(secrets))).str(text) == want
