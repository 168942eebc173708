"""Keyword skeleton (addons/policy/skeleton.py): one plain test per normalisation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.policy.skeleton import normalize, skeleton, skeleton_pattern, table


@pytest.mark.parametrize("text", [
    "password", "PASSWORD", "pass\u200bword", "pa\u00adssword", "pass\u2060word",
    "pass\u200eword", "p\u0430ssw\u043erd", "passw\u03bfrd", "\uff50\uff41\uff53\uff53word",
    "pa\u0301ssword", "pass-\nword", "pass-\r\n   word", "pass\u2010\nword",
    "\U0001d429assword", "pass\u3164word",
])
def test_spellings_share_the_skeleton(text: str) -> None:
    assert skeleton(text) == "password"


def test_confusables_from_the_uts39_data() -> None:
    t = table()
    assert t[ord("\u0430")] == "a"          # Cyrillic a
    assert t[ord("\u0455")] == "s"          # Cyrillic dze
    assert skeleton("\u0455\u0435\u0441r\u0435t") == "secret"


def test_unrelated_letters_stay_apart() -> None:
    # case folded pairs are not chained: long s ~ f must not make s and f one letter
    assert skeleton("s") != skeleton("f")
    assert skeleton("kill") != skeleton("kiss")
    assert skeleton("rn") != skeleton("m")   # sequence targets are left out


def test_normalize_keeps_case_and_plain_text() -> None:
    assert normalize("Hello World") == "Hello World"
    assert normalize("Pass\u200bWord") == "PassWord"
    assert normalize("well-\nknown") == "wellknown"
    assert normalize("a - b\nc") == "a - b\nc"   # a dash that is not at a line break


def test_skeleton_pattern_maps_literals_only() -> None:
    assert skeleton_pattern(r"p\u0430ss\s+w[o\u043e]rd{1,2}") == r"p\u0430ss\s+w[o\u043e]rd{1,2}"
    p = skeleton_pattern("p\u0430ss(?P<x>w\u043erd)?[a-z]{2}")
    assert p == "pass(?P<x>word)?[a-z]{2}"
    assert re.search(p, "password") is not None
    assert skeleton_pattern("a\u200bb") == "ab"


def test_skeleton_splits_at_ascii_letters_and_digits() -> None:
    """What lets a session's skeleton be continued from its last one (derive_text):
    fn(a + b) == fn(a) + fn(b) when b starts with an ASCII letter or digit."""
    @settings(max_examples=3000, deadline=None)
    @given(st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
           st.sampled_from("aZ09"),
           st.text(st.characters(exclude_categories=("Cs",)), max_size=8))
    def check(a: str, c: str, b: str) -> None:
        assert normalize(a + c + b) == normalize(a) + normalize(c + b)
        assert skeleton(a + c + b) == skeleton(a) + skeleton(c + b)
    check()


@pytest.mark.parametrize(("a", "b"), [
    ("\u2028", "a\u02d7\r"),       # a dash confusable with '-' at a line break
    ("\u00e9", "a\uac00"),         # an accented letter next to Hangul
])
def test_skeleton_split_cases_that_failed_before(a: str, b: str) -> None:
    assert normalize(a + b) == normalize(a) + normalize(b)
    assert skeleton(a + b) == skeleton(a) + skeleton(b)


def test_korean_keyword_beside_an_accented_letter() -> None:
    """Hangul stays composed whatever else the text holds (before: decomposed to jamo as
    soon as any character had a table decomposition, so the keyword went unseen)."""
    word = skeleton("비밀번호")
    assert word in skeleton("비밀번호 é")
    assert re.search(word, skeleton("café 비밀번호"))


def test_translate_is_str_translate() -> None:
    """skeleton's _translate (a regex over the table's characters, for long texts) gives
    exactly str.translate's result, lone surrogates and regex metacharacters included."""
    from addons.policy.skeleton import _translate
    chars = st.characters(codec=None)
    table = st.dictionaries(chars.map(ord), st.one_of(st.none(), st.text(max_size=2)),
                            max_size=6)

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.one_of(chars, st.sampled_from("]\\^-[.a\u0301")), max_size=400)
           .map("".join), table, st.integers(0, 300))
    def check(text: str, tbl: dict, pad: int) -> None:
        long = text + "x" * pad + text
        for t in (text, long):
            assert _translate(t, tbl) == t.translate(tbl)
            drop = dict.fromkeys(tbl)
            assert _translate(t, drop) == t.translate(drop)
    check()
