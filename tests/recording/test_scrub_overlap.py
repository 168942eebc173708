"""Secrets scrubbed from the audit store by value: overlapping occurrences leave nothing of
either secret, whatever order the secrets come in (the hash seed ordered equal lengths)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from addons.recording import store

A, B = "abcdefgh12", "gh12345678"  # equal lengths, sharing "gh12"


def _reference(text: str, secrets: list[str]) -> str:
    """Every character covered by an occurrence of a secret, replaced; runs of covered
    characters that overlap become one marker."""
    covered = [False] * len(text)
    for s in secrets:
        i = text.find(s)
        while i >= 0:
            for j in range(i, i + len(s)):
                covered[j] = True
            i = text.find(s, i + 1)
    out, i = [], 0
    spans = [(i, i + len(s)) for s in secrets for i in _all(text, s)]
    spans.sort()
    runs: list[list[int]] = []
    for a, b in spans:
        if runs and a < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    for a, b in runs:
        out += [text[i:a], store.REDACTED]
        i = b
    out.append(text[i:])
    assert all(covered[j] for a, b in runs for j in range(a, b))
    return "".join(out)


def _all(text: str, s: str) -> list[int]:
    out, i = [], text.find(s)
    while i >= 0:
        out.append(i)
        i = text.find(s, i + 1)
    return out


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
