"""Incremental prompt search per session (engine.SearchHistory): a turn that re-sends the
history searches only past what the session's previous text shared with it, and the answer
is always that of a full search.

Differential (hypothesis): random sequences of texts — appended to, edited in the middle,
cut, replaced — searched through one history and by a full `pattern.search`, for patterns
with word boundaries, look-behinds and look-aheads, anchors, case folding, alternations
and unbounded ones; blocks are made tiny so that matches straddle the shared prefix's end.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.config.schema import Where
from addons.egress.config import Upstream
from addons.policy import engine
from addons.policy.config import parse_policies
from addons.policy.engine import RequestFacts, SearchHistory, evaluate, pattern_reach

PATTERNS = [re.compile(p, f) for p, f in (
    (r"\b\d{3}-\d{2}-\d{4}\b", 0),
    (r"(?<!\w)project\s{1,3}bluebird(?!\w)", re.IGNORECASE),
    (r"(?<=key=)[a-z]{4}", 0),
    (r"^ssn$", re.MULTILINE),
    (r"ab(?:cd|x)e", 0),
    (r"a.*z", re.DOTALL),          # unbounded: searched whole
    (r"(q)\1", 0),                 # back-reference: searched whole
    (r"\d{2}\Z", 0),
    (r"x(?=y{5})", 0),             # a wide look-ahead: its width counts in the reach
)]
ALPHABET = "ab cdexz-0123456789\nqk=yé\u200b"
PIECES = ["123-45-6789", "Project  Bluebird", "key=abcd", "\nssn\n", "abcde", "abxe",
          "qq", "99", " ", "-", "\n", "xyyyyy", "yyyy"]


def texts() -> st.SearchStrategy[list[str]]:
    piece = st.one_of(st.text(ALPHABET, max_size=12), st.sampled_from(PIECES))
    chunk = st.lists(piece, max_size=8).map("".join)
    edit = st.tuples(st.sampled_from(["append", "insert", "cut", "replace"]), chunk,
                     st.integers(0, 10**6))
    return st.tuples(chunk, st.lists(edit, min_size=1, max_size=12)).map(_apply_edits)


def _apply_edits(args: tuple[str, list]) -> list[str]:
    text, edits = args
    out = [text]
    for kind, piece, pos in edits:
        if kind == "append":
            text = text + piece
        elif kind == "insert":
            i = pos % (len(text) + 1)
            text = text[:i] + piece + text[i:]
        elif kind == "cut":
            text = text[:pos % (len(text) + 1)]
        else:
            text = piece
        out.append(text)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts())
def test_same_answer_as_a_full_search(seq: list[str]) -> None:
    old = engine.BLOCK_CHARS
    engine.BLOCK_CHARS = 4  # tiny blocks: matches straddle the shared prefix's end
    try:
        h = SearchHistory()
        for text in seq:
            shared = h.begin("prompt_text", text)
            for p in PATTERNS:
                assert h.search(p, "prompt_text", text, shared) == \
                    (p.search(text) is not None), (p.pattern, text)
    finally:
        engine.BLOCK_CHARS = old


def test_reach() -> None:
    assert pattern_reach(re.compile(r"\b\d{3}-\d{2}-\d{4}\b")) == 13
    assert pattern_reach(re.compile(r"(?<=key=)[a-z]{4}")) == 4 + 4 + 2
    assert pattern_reach(re.compile(r"a.*z")) is None
    assert pattern_reach(re.compile(r"a\s+b")) is None
    assert pattern_reach(re.compile(r"(q)\1")) is None
    assert pattern_reach(re.compile(r"(?<!\w)x(?=\w+)")) is None


UPS = (Upstream("openai", ("api.openai.com",), "openai", None),)
POLICY = parse_policies([({"name": "no-ssn", "action": "block",
                           "match": {"prompt": {"regex": [r"\b\d{3}-\d{2}-\d{4}\b"],
                                                "words": ["project bluebird"]}}},
                          Where("t.yaml", "policies[0]"))], UPS)


def _facts(messages: list[dict], history: SearchHistory | None) -> RequestFacts:
    body = json.dumps({"model": "gpt-4o-mini", "messages": messages, "temperature": 0}).encode()
    f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions", upstream="openai",
                     identity={"sub": "a"}, body=body, content_type="application/json")
    f.history = history
    return f


@pytest.mark.parametrize("late", ["536-22-4519", "Project Bluebird", "53\u200b6-22-4519"])
def test_a_conversation_searches_only_its_new_text(late: str) -> None:
    h = SearchHistory()
    msgs = [{"role": "system", "content": "be brief " * 50}]
    for turn in range(12):
        msgs = [*msgs, {"role": "user", "content": f"turn {turn} question 12-34 " * 120},
                {"role": "assistant", "content": "answer 555-12 " * 150}]
        with_h = evaluate(POLICY, _facts(msgs, h))
        assert with_h.action == evaluate(POLICY, _facts(msgs, None)).action == "allow"
    saved = h.saved_chars
    assert saved > 100_000  # the history was not searched again
    # a value split across the end of what was sent before: still found
    msgs[-1] = {"role": "assistant", "content": msgs[-1]["content"] + late[:4]}
    msgs = [*msgs, {"role": "user", "content": late[4:]}]
    # (a value split across two messages is two strings; the real test is the next one)
    evaluate(POLICY, _facts(msgs, h))
    msgs = [*msgs, {"role": "user", "content": f"by the way {late} thanks"}]
    want = evaluate(POLICY, _facts(msgs, None)).action
    assert evaluate(POLICY, _facts(msgs, h)).action == want
    if "\u200b" not in late:
        assert want == "block"


def test_a_look_ahead_reaching_past_the_shared_prefix() -> None:
    """'x' followed by five 'y': the x sits in the shared prefix, its look-ahead needs
    characters after it. Searching from the prefix's end minus the match length alone
    (the look-ahead's width forgotten) misses it."""
    old = engine.BLOCK_CHARS
    engine.BLOCK_CHARS = 4
    try:
        p = re.compile(r"x(?=y{5})")
        h = SearchHistory()
        for text in ("aaaaaaaaxyyyzzzz", "aaaaaaaaxyyyyy"):
            assert h.search(p, "prompt_text", text, h.begin("prompt_text", text)) == \
                (p.search(text) is not None)
        assert h.saved_chars > 0
    finally:
        engine.BLOCK_CHARS = old


@settings(max_examples=300, deadline=None)
@given(st.text("ab\u00e9", max_size=40), st.text("ab\u00e9", max_size=40),
       st.integers(1, 8))
def test_common_prefix(a: str, b: str, block: int) -> None:
    import os.path
    old = engine.BLOCK_CHARS
    engine.BLOCK_CHARS = block
    try:
        for x, y in ((a, b), (a, a + b), (a + b, a), (b + a, b + b)):
            assert engine.common_prefix(x, y) == len(os.path.commonprefix([x, y]))
    finally:
        engine.BLOCK_CHARS = old


def test_a_pattern_not_searched_last_time_is_searched_whole() -> None:
    """The prefilter skipped a pattern on one turn: its answer belongs to an older text,
    so the next search of it starts at 0, not at the newer text's shared prefix."""
    p = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
    h = SearchHistory()
    t1 = "a" * 9000
    assert not h.search(p, "prompt_text", t1, h.begin("prompt_text", t1))
    t2 = "123-45-6789 " + "a" * 9000  # not searched for p this time (as if skipped)
    h.begin("prompt_text", t2)
    t3 = t2 + " more"
    assert h.search(p, "prompt_text", t3, h.begin("prompt_text", t3))


def test_histories_are_bounded_in_bytes_and_fair_per_identity() -> None:
    from addons.policy.engine import SearchHistories
    hs = SearchHistories(max_sessions=64, max_bytes=1 << 20)
    alice = hs.get("alice\x00t")
    alice.begin("prompt_text", "x" * 50_000)
    for i in range(500):  # mallory: many sessions, big texts
        hs.get(f"mallory\x00s{i}").begin("prompt_text", "y" * 100_000)
        assert hs.bytes <= hs.max_bytes and len(hs) <= 64
    assert hs.get("alice\x00t") is alice and alice.bytes > 0
    assert "xxxx" not in repr(alice) and "yyyy" not in repr(hs)
    huge = hs.get("bob\x00t")
    huge.begin("prompt_text", "z" * (2 << 20))  # alone over the total: keeps no text
    assert hs.bytes <= hs.max_bytes
    assert huge.bytes == 0


def test_a_form_equal_to_the_prompt_text_is_kept_as_that_one_string() -> None:
    """Normalising prose in ASCII changes nothing: the session keeps the prompt text once
    for both forms (a 120 KB history, 20 sessions: 2.3 MiB), and a form that differs is
    still its own text, exactly fn(src)."""
    from addons.policy.skeleton import normalize, skeleton

    h = SearchHistory()
    src = "Plain words, nothing to normalise. " * 400  # (the skeleton folds the case)
    src2 = src + "And A Few More. " * 50
    for text in (src, src2):
        shared = h.begin("prompt_text", text)
        norm, _ = h.derive("norm_text", normalize, text, shared)
        skel, _ = h.derive("skel_text", skeleton, text, shared)
        assert norm is text and norm == normalize(text)
        assert skel == skeleton(text) and skel is not text
        last = h.last("norm_text")
        assert last is not None and last[1] is text
