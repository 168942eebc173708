"""search_twin: the faster pattern a prompt rule searches with finds exactly what the rule's
own pattern finds (differential, property-based), and is really used."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from addons.policy import engine
from addons.policy.engine import RequestFacts, SearchHistory, search_twin

PATTERNS = [
    r"\b\d{3}-\d{2}-\d{4}\b",
    r"\b\d{2,}x",
    r"\B\d+?z",
    r"\bab",
    r"\b[a-c]{1,3}\b",
    r"(?<!\w)ab(?!\w)",
    r"(?<=x)\d\d",
    r"(?<!a)[^b]c",
    r"\b(\d)\1",          # a back-reference: group numbers must survive the rewrite
    r"\b(?P<n>[ab])+c",
    r"\bé\w",
]
FLAGS = [0, re.IGNORECASE, re.ASCII, re.IGNORECASE | re.ASCII]
# digits and word characters from several scripts, the case pairs re folds specially
ALPHABET = "ab cxz-_1234٣5\u212aKkſsSÉé.\n"


def compiled() -> list[re.Pattern[str]]:
    return [re.compile(p, f) for p in PATTERNS for f in FLAGS]


def test_the_twins_are_rewrites() -> None:
    for p in compiled():
        # every pattern above starts with \b, \B or a look-behind followed by one
        # character (or a repeat of one); a group there is left alone
        grouped = p.pattern in (r"\b(\d)\1", r"\b(?P<n>[ab])+c")
        assert (search_twin(p) is p) == grouped, p
    p = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
    assert search_twin(p).search("call 123-45-6789 now").span() == (5, 16)


def test_no_rewrite_when_not_applicable() -> None:
    for text in (r"\d{3}", r"\b", r"\b(?:ab|cd)", r"^\bab", r"(?<=a|c)x"):
        p = re.compile(text)
        twin = search_twin(p)
        assert twin is p or all(
            bool(twin.search(t)) == bool(p.search(t)) for t in ("ab", "cdx", "abx", "x"))


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40), pos=st.integers(0, 45),
       which=st.integers(0, len(PATTERNS) * len(FLAGS) - 1))
def test_twin_finds_exactly_what_the_pattern_finds(text: str, pos: int, which: int) -> None:
    p = compiled()[which]
    twin = search_twin(p)
    a, b = p.search(text, pos), twin.search(text, pos)
    assert (a and (a.span(), a.groups())) == (b and (b.span(), b.groups())), (p, text, pos)
    fa = [m.span() for m in p.finditer(text)]
    fb = [m.span() for m in twin.finditer(text)]
    assert fa == fb


def test_requests_and_histories_search_with_the_twin(monkeypatch) -> None:
    """The twin is what runs (the original stays the history's key and reach)."""
    p = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
    check = engine.prompt_test(p)
    calls: list[str] = []
    real = engine.search_twin(p)

    class Spy:
        def search(self, text: str, pos: int = 0):
            calls.append("twin")
            return real.search(text, pos)

    monkeypatch.setitem(engine._TWINS, (p.pattern, p.flags), Spy())
    # a whole (short) text is searched with the literal-anchored twin when there is one
    monkeypatch.setitem(engine._ANCHORS, (p.pattern, p.flags), None)
    check = engine.prompt_test(p)
    f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions",
                     body=b'{"messages": [{"role": "user", "content": "ssn 123-45-6789"}]}',
                     content_type="application/json")
    assert check(f) and calls == ["twin"]
    long = "x " * 6000 + " 123-45-6789"
    h = SearchHistory()
    assert h.search(p, "prompt_text", long, h.begin("prompt_text", long), engine.search_twin(p))
    assert calls == ["twin", "twin"]
