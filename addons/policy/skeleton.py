"""Keyword text normalisation: the same skeleton for the rule's words and the searched text.

Pure; no mitmproxy import. Two levels:
- `normalize(text)`: NFKC, then every format character (Cf: zero-width space/joiner, soft
  hyphen, bidi marks, word joiner ...), combining mark (after NFD) and invisible filler
  removed, and words hyphenated across a line break joined (`pass-\\nword` -> `password`).
  Case is kept, so case-sensitive rules can use it.
- `skeleton(text)`: normalize, case fold, then Unicode confusables mapped to one
  representative per class (UTS #39 confusables data, as shipped by the maintained
  `confusable-homoglyphs` package): a Cyrillic `а`, a full-width `ａ` and `a` are one letter.

Why the table is built here rather than taken from the package's API: the package keeps
confusables.txt as an undirected graph (each pair stored both ways), so the UTS #39
prototype is not recoverable for pairs; equality of skeletons is what a keyword rule needs,
and the connected classes of that graph are exactly the UTS #39 classes (each source has one
prototype). Text is case folded before it is mapped, so pairs with a character that case folding
changes are left out (they can never be looked up, and joining through them would chain
unrelated letters: `ſ`~`f` plus `ſ`->`s`).
Mappings of one character to a sequence (`m` -> `rn`) are left out: they would make
`skeleton` change lengths in ways a regex literal cannot follow.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

# invisible but not Cf: Hangul fillers, braille blank, combining grapheme joiner (Mn anyway)
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
_DROP_CATS = frozenset(("Cf", "Mn", "Me", "Mc"))  # format characters, marks
# a hyphen (any dash the confusables map to `-`, or still the original) at a line break
_HYPHEN_BREAK = re.compile(r"[-\u2010\u2011\u2012\u2013\u2043\u2212\ufe63\uff0d]"
                           r"[ \t]*(?:\r\n|\r|\n|\u2028|\u2029|\x85|\x0b|\x0c)\s*")


def _data_path() -> Path:
    import confusable_homoglyphs
    return Path(confusable_homoglyphs.__file__).with_name("confusables.json")


def _single(s: str) -> str | None:
    s = s.replace("\u200e", "").replace("\u200f", "")
    return s if len(s) == 1 else None


@lru_cache(maxsize=1)
def table() -> dict[int, str]:
    """Code point -> representative character of its confusable class (case folded)."""
    with _data_path().open(encoding="utf-8") as fh:
        raw: dict[str, list[dict[str, str]]] = json.load(fh)
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        root = c
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(c, c) != root:  # path compression
            parent[c], c = root, parent[c]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    def norm(c: str) -> str | None:
        # text is case folded before it is mapped: characters that case folding changes
        # never reach the table, and joining through them would chain unrelated letters
        # (`ſ`~`f` with `ſ`->`s` would make `s` and `f` one class)
        return c if c.casefold() == c else None

    for key, entries in raw.items():
        a = _single(key)
        a = norm(a) if a else None
        if a is None:
            continue
        for e in entries:
            b = _single(e.get("c", ""))
            b = norm(b) if b else None
            if b is not None:
                parent.setdefault(a, a)
                parent.setdefault(b, b)
                union(a, b)
    classes: dict[str, list[str]] = {}
    for c in parent:
        classes.setdefault(find(c), []).append(c)

    def rank(c: str) -> tuple[int, int]:
        if "a" <= c <= "z":
            return 0, ord(c)
        if c.isascii() and c.isalnum():
            return 1, ord(c)
        if c.isascii():
            return 2, ord(c)
        return 3, ord(c)

    out: dict[int, str] = {}
    for members in classes.values():
        rep = min(members, key=rank)
        for c in members:
            if c != rep:
                out[ord(c)] = rep
    return out


@lru_cache(maxsize=1)
def _ascii_bytes_table() -> bytes:
    t = table()
    tb = bytearray(range(256))
    for cp in range(128):
        ch = chr(cp).lower()
        rep = t.get(ord(ch), ch)
        tb[cp] = ord(rep) if len(rep) == 1 and rep.isascii() else ord(ch)
    return bytes(tb)


# ASCII text: a literal first character lets `re` skip ahead with a fast search
_ASCII_HYPHEN_BREAK = re.compile(r"-[ \t]*(?:\r\n|\r|\n|\x0b|\x0c)\s*")


_CLASSES: dict[frozenset[int], re.Pattern[str]] = {}


def _translate(text: str, table: dict[int, str | None]) -> str:
    """text.translate(table), character for character the same. str.translate looks
    every character of a non-ASCII text up in the dict (~0.25 us each: 30 ms for 120 KB);
    a regex over just the table's characters visits only those (a drop-only table is one
    C-level sub). The compiled classes are cached, a few hundred at most."""
    if not table:
        return text
    if len(text) < 256:
        return text.translate(table)
    keys = frozenset(table)
    rx = _CLASSES.get(keys)
    if rx is None:
        if len(_CLASSES) >= 256:
            _CLASSES.clear()
        rx = _CLASSES[keys] = re.compile(
            "[" + "".join(re.escape(chr(k)) for k in sorted(keys)) + "]")
    if all(v is None for v in table.values()):
        return rx.sub("", text)
    return rx.sub(lambda m: table[ord(m.group())] or "", text)


def normalize(text: str) -> str:
    """NFKC; format characters, combining marks and fillers removed; hyphenation joined.

    Marks are taken off precomposed letters by decomposing every character (NFD) and
    composing again (NFC) after the marks are gone: a Hangul syllable comes out as it went
    in, whatever else the text holds (decomposing only when some character had a table
    decomposition left the syllables in jamo next to any accented letter, so a Korean
    keyword went unseen beside an `é`). Every step works on each character or stops at
    an ASCII letter or digit, so normalize(a + b) == normalize(a) + normalize(b) when b
    starts with one (tests/policy/test_skeleton.py)."""
    if text.isascii():
        return _ASCII_HYPHEN_BREAK.sub("", text) if "-" in text else text
    text = unicodedata.normalize("NFKC", text)
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
        drop = {ord(ch): None for ch in set(text)
                if ch in _INVISIBLE or unicodedata.category(ch) in _DROP_CATS}
        if drop:
            text = _translate(text, drop)
        text = unicodedata.normalize("NFC", text)
    return _HYPHEN_BREAK.sub("", text)


def skeleton(text: str) -> str:
    """normalize, case fold, confusables mapped: what keyword rules compare."""
    text = normalize(text)
    if text.isascii():
        return text.encode("ascii").translate(_ascii_bytes_table()).decode("ascii")
    text = text.casefold()
    t = table()
    mapping = {ord(ch): t[ord(ch)] for ch in set(text) if ord(ch) in t}
    text = _translate(text, mapping) if mapping else text
    # casefold can produce marks again (e.g. `İ`), and the confusables map dashes to `-`
    # (`˗` U+02D7 at a line break is hyphenation too): normalised again, also when the
    # result is ASCII — so that skeleton(a + b) == skeleton(a) + skeleton(b) whenever b
    # starts with an ASCII letter or digit, which lets a session's skeleton be extended
    # by its new text alone (engine.derive_text)
    return normalize(text)


# ---------------------------------------------------------------- regex literals
_ESC_ARG = {"x": 2, "u": 4, "U": 8}


def skeleton_pattern(pattern: str, form: Callable[[str], str] | None = None) -> str:
    """The regex with its literal characters mapped through `form` (default `skeleton`;
    `normalize` for case-sensitive rules), metacharacters,
    escapes, group headers and repetition counts left alone. Characters whose skeleton is
    empty (zero-width) are dropped. The result may fail to compile; callers fall back."""
    form = form or skeleton
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            j = i + 2
            if nxt in _ESC_ARG:
                j = i + 2 + _ESC_ARG[nxt]
            elif nxt in "pPN" and j < n and pattern[j] == "{":
                j = pattern.find("}", j) + 1 or n
            out.append(pattern[i:j])
            i = j
            continue
        if in_class:
            if c == "]":
                in_class = False
                out.append(c)
            elif i + 2 < n and pattern[i + 1] == "-" and pattern[i + 2] != "]":
                out.append(pattern[i:i + 3])  # a range stays as written
                i += 3
                continue
            else:
                # the character itself and its skeleton: a class cannot hold a sequence
                s = form(c)
                out.append(re.escape(c) if c in "-^[" else c)
                if len(s) == 1 and s != c:
                    out.append(re.escape(s))
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            j = i + 2
            if pattern.startswith("(?P<", i) or pattern.startswith("(?P=", i):
                j = pattern.find(">" if pattern[i + 3] == "<" else ")", i) + 1 or n
            elif pattern.startswith("(?#", i):
                j = pattern.find(")", i) + 1 or n
            else:
                while j < n and (pattern[j].isalpha() or pattern[j] in "-<=!:"):
                    if pattern[j] in ":=!" or pattern[j - 1] == "<":
                        j += 1
                        break
                    j += 1
            out.append(pattern[i:j])
            i = j
            continue
        if c == "{":
            j = pattern.find("}", i)
            if j > 0 and re.fullmatch(r"\{\d*,?\d*\}", pattern[i:j + 1]):
                out.append(pattern[i:j + 1])
                i = j + 1
                continue
        if c in ".^$*+?|()":
            out.append(c)
        else:
            out.append(_lit(c, form))
        i += 1
    return "".join(out)


def _lit(c: str, form: Callable[[str], str]) -> str:
    s = form(c)
    if s == c:
        return c
    if len(s) == 1:
        return re.escape(s) if not s.isalnum() else s
    return f"(?:{re.escape(s)})" if s else ""
