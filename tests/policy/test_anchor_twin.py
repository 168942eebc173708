"""anchor_twin: a prompt rule whose first literal follows a fixed-width start is searched
from that literal (addons/policy/engine.py). It must find a match exactly when the rule's
own pattern does, in a whole text and in a session's incremental search (differential,
property-based), be declined where the rewrite would not be exact, and be what runs."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from addons.policy import engine
from addons.policy.engine import RequestFacts, SearchHistory, anchor_twin

# each: a fixed-width start (assertions, classes, exact repeats) before its first literal
# each with a text it matches (split across two turns below)
SAMPLES = {r"\b\d{3}-\d{2}-\d{4}\b": "123-45-6789", r"\d\d:\d\d": "12:34",
           r"(?<!\w)\w{2}-x": " ab-x", r"\B.\s=": "ab =", r"[^-]{2}-(\d)\1": "ab-11",
           r"\b\d{2}-(?P<n>\d)+": "12-3", r"\b\d{3}-(?:ab|c)": "123-c",
           r"(?<=x)\d\d-": "x12-", r"\b\d{1}-\d": "1-2", r"(?:\d\d)-x": "12-x"}
ANCHORED = [
    r"\b\d{3}-\d{2}-\d{4}\b",
    r"\d\d:\d\d",
    r"(?<!\w)\w{2}-x",
    r"\B.\s=",
    r"[^-]{2}-(\d)\1",       # a group after the literal: numbering kept
    r"\b\d{2}-(?P<n>\d)+",
    r"\b\d{3}-(?:ab|c)",
    r"(?<=x)\d\d-",
    r"\b\d{1}-\d",
    r"(?:\d\d)-x",          # a group that does not number: flattened by the parser
]
# no literal, a literal first, a variable or grouped start, a cased literal under
# IGNORECASE: not rewritten (the last one only under IGNORECASE)
DECLINED = [r"\d{3}\s\d", r"-\d{3}", r"\b\d+-\d", r"\b\d{2,3}-\d", r"(\d)-\1",
            r"\d*x", r"\b\d{2}a"]
FLAGS = [0, re.IGNORECASE, re.ASCII, re.IGNORECASE | re.ASCII]
ALPHABET = "ab cx-_:=1234٣5\u212aKkſsSÉé.\n"


def compiled(patterns: list[str]) -> list[re.Pattern[str]]:
    return [re.compile(p, f) for p in patterns for f in FLAGS]


def test_rewritten_and_declined() -> None:
    for p in compiled(ANCHORED):
        assert anchor_twin(p) is not None, p
    for p in compiled(DECLINED):
        cased = p.pattern == r"\b\d{2}a" and not p.flags & re.IGNORECASE
        assert (anchor_twin(p) is not None) == cased, p
    p = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
    assert anchor_twin(p).search("call 123-45-6789 now")
    assert not anchor_twin(p).search("call 1234-45-6789 now 123-45-67890")


@settings(max_examples=600, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40),
       which=st.integers(0, len(ANCHORED) * len(FLAGS) - 1))
def test_anchor_finds_a_match_exactly_when_the_pattern_does(text: str, which: int) -> None:
    p = compiled(ANCHORED)[which]
    twin = anchor_twin(p)
    assert (p.search(text) is None) == (twin.search(text) is None), (p, text)


def test_whole_texts_and_histories_use_it(monkeypatch) -> None:
    p = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
    calls: list[str] = []
    real = anchor_twin(p)

    class Spy:
        def search(self, text: str, pos: int = 0):
            calls.append(f"anchor@{pos}")
            return real.search(text, pos)

    monkeypatch.setitem(engine._ANCHORS, (p.pattern, p.flags), Spy())
    check = engine.prompt_test(p)
    for content, want in (("ssn 123-45-6789", True), ("ssn 123-45-678", False)):
        f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions",
                         body=json.dumps({"messages": [{"role": "user", "content": content}]})
                         .encode(), content_type="application/json")
        assert check(f) is want
    assert calls == ["anchor@0", "anchor@0"]
    # a session's next turn: searched from near the end of what it shared with the last
    h = SearchHistory()
    first = {"messages": [{"role": "user", "content": "x " * 6000}]}
    second = {"messages": [*first["messages"], {"role": "user", "content": "123-45-6789"}]}
    for body, want in ((first, False), (second, True)):
        f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions",
                         body=json.dumps(body).encode(), content_type="application/json")
        f.history = h
        assert check(f) is want
    assert calls[2] == "anchor@0" and calls[3].startswith("anchor@") and calls[3] != "anchor@0"


# the previous text has no match; the next one adds a suffix, or edits near the end
@settings(max_examples=500, deadline=None)
@given(old=st.text(alphabet=ALPHABET, max_size=30), new=st.text(alphabet=ALPHABET, max_size=30),
       cut=st.integers(0, 30), which=st.integers(0, len(ANCHORED) * len(FLAGS) - 1))
def test_incremental_search_with_the_anchor_answers_as_a_full_search(
        old: str, new: str, cut: int, which: int) -> None:
    p = compiled(ANCHORED)[which]
    old = "a" * 40 + old
    if p.search(old):
        return  # the shortcut starts from a previous text without a match
    text = old[:max(40, len(old) - cut)] + new
    h = SearchHistory()
    assert not h.search(p, "prompt_text", old, h.begin("prompt_text", old), anchor_twin(p))
    got = h.search(p, "prompt_text", text, h.begin("prompt_text", text), anchor_twin(p))
    assert got == (p.search(text) is not None), (p, old, text)


def test_a_match_split_across_two_turns_is_found_incrementally() -> None:
    """The previous turn ends inside a match (no match yet); the next completes it: the
    anchor, searching from near the end of the shared text, finds it wherever the split
    falls (before, at or after the literal)."""
    for p in compiled(ANCHORED):
        sample = SAMPLES[p.pattern]
        assert p.search(sample), p
        for k in range(len(sample) + 1):
            for pad in ("", " ", "z" * 7):
                old = "word " * 40 + pad + sample[:k]
                if p.search(old):
                    continue
                text = old + sample[k:] + " tail"
                h = SearchHistory()
                assert not h.search(p, "prompt_text", old, h.begin("prompt_text", old),
                                    anchor_twin(p))
                got = h.search(p, "prompt_text", text, h.begin("prompt_text", text),
                               anchor_twin(p))
                assert got == (p.search(text) is not None), (p, k, pad)
