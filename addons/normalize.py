"""Undo the cheap disguises of PII before detection, keeping a map back to the original text.

What is folded (detection only; the original text is never changed by this module):
- Unicode digits of any script, superscripts and circled digits -> ASCII digits
  (unicodedata digit value), full-width ASCII (`４`, `＠`, `ｓｋ`) and mathematical
  alphanumerics -> ASCII (NFKC when it yields one ASCII character),
- Unicode spaces -> ' ', Unicode dashes and the minus sign -> '-',
- zero-width and other invisible characters are removed: ZWSP, ZWNJ, ZWJ, WJ, BOM, soft
  hyphen, bidi controls (all of category Cf), combining marks and variation selectors,
- escapes that appear inside text: JSON `\\uXXXX` (and surrogate pairs), URL `%XX` (printable
  ASCII only) and HTML numeric references `&#52;` / `&#x34;`.

Pure ASCII text without `\\u`, `%` or `&#` is returned untouched without any work, which is
the common case and keeps detection fast.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_right

import regex

# Non-ASCII characters worth folding; everything else (accented letters, CJK, emoji …) is
# left alone so that ordinary non-English prose costs one C-level scan and nothing more.
_FOLD_CLASS = (
    r"[[\p{Nd}\p{No}\p{Cf}\p{Zs}\p{Pd}\u0300-\u036F\u1AB0-\u1AFF\u1DC0-\u1DFF\u20D0-\u20FF"
    r"\uFE00-\uFE0F\uFE20-\uFE2F\U000E0000-\U000E01EF\uFF01-\uFF5E\U0001D400-\U0001D7FF"
    r"\u2212\u2024\u2027\u3000\u180E\u034F\u115F\u1160\u3164\uFFA0]--[\x00-\x7F]]"
)
_SCAN = regex.compile(
    r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"  # surrogate pair
    r"|\\u([0-9a-fA-F]{4})"
    r"|%([0-9A-Fa-f]{2})"
    r"|&\#(?:[xX]([0-9A-Fa-f]{1,6})|([0-9]{1,7}));"
    r"|(" + _FOLD_CLASS + r")",
    regex.V1,
)
_ALWAYS_DROP = frozenset("\u115f\u1160\u3164\uffa0\u034f\u180e")


class _FoldTable(dict):
    """char -> folded text ('' to drop), computed on first use and cached."""

    def __missing__(self, ch: str) -> str:
        value = _fold_char(ch)
        self[ch] = value
        return value


def _fold_char(ch: str) -> str:
    if ch.isascii():
        return ch
    if ch in _ALWAYS_DROP:
        return ""
    o = ord(ch)
    cat = unicodedata.category(ch)
    if cat in ("Cf", "Mn", "Me") or 0xFE00 <= o <= 0xFE0F or 0xE0000 <= o <= 0xE01EF:
        return ""
    if cat in ("Nd", "No"):
        d = unicodedata.digit(ch, None)
        if d is not None and 0 <= d <= 9:
            return str(d)
    if cat == "Zs":
        return " "
    if cat == "Pd" or ch == "\u2212":
        return "-"
    n = unicodedata.normalize("NFKC", ch)
    if len(n) == 1 and n.isascii():
        return n
    return ch


FOLD = _FoldTable()


class Normalized:
    """Normalised text plus the map of its positions back to the original text.

    Breakpoints (norm_pos, orig_pos): from each breakpoint on, characters were copied 1:1
    until the next one. A replaced unit (an escape or folded character) is one normalised
    character standing for `orig_end - orig_start` original characters.
    """

    __slots__ = ("text", "_bp_norm", "_bp_orig", "_unit_end")

    def __init__(self, text: str, bp_norm: list[int], bp_orig: list[int],
                 unit_end: dict[int, int]) -> None:
        self.text = text
        self._bp_norm = bp_norm
        self._bp_orig = bp_orig
        self._unit_end = unit_end

    def orig_start(self, p: int) -> int:
        i = bisect_right(self._bp_norm, p) - 1
        if i < 0:
            return p
        return self._bp_orig[i] + (p - self._bp_norm[i])

    def orig_end(self, e: int) -> int:
        """Original position just after normalised character e-1."""
        if e <= 0:
            return self.orig_start(0)
        end = self._unit_end.get(e - 1)
        if end is not None:
            return end
        return self.orig_start(e - 1) + 1

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.orig_start(start), self.orig_end(end)


def _decode(m: regex.Match) -> str:
    """The text an escape or foldable character stands for (after folding)."""
    g = m.groups()
    if g[6] is not None:
        return FOLD[g[6]]
    if g[0] is not None:
        hi, lo = int(g[0], 16), int(g[1], 16)
        ch = chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
    elif g[2] is not None:
        ch = chr(int(g[2], 16))
    elif g[3] is not None:
        code = int(g[3], 16)
        if not 0x20 <= code <= 0x7E:
            return m.group(0)
        return chr(code)
    else:
        code = int(g[4], 16) if g[4] is not None else int(g[5])
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return m.group(0)
        ch = chr(code)
    return FOLD[ch]


def needs_normalizing(text: str) -> bool:
    return not text.isascii() or "\\u" in text or "%" in text or "&#" in text


def normalize(text: str) -> Normalized | None:
    """Normalised form of `text`, or None when nothing needed folding (use `text` itself)."""
    if not needs_normalizing(text):
        return None
    pieces: list[str] = []
    bp_norm: list[int] = []
    bp_orig: list[int] = []
    unit_end: dict[int, int] = {}
    last = 0  # original position copied up to
    npos = 0  # length of the normalised text so far
    changed = False
    for m in _SCAN.finditer(text):
        rep = _decode(m)
        s, e = m.span()
        if rep == text[s:e]:
            continue
        changed = True
        if s > last:
            pieces.append(text[last:s])
            npos += s - last
        if rep:
            # each output char of a replacement maps to the whole unit (rep is 1 char in
            # practice; longer replacements are treated as one unit for every char)
            for k in range(len(rep)):
                bp_norm.append(npos + k)
                bp_orig.append(s)
                unit_end[npos + k] = e
            pieces.append(rep)
            npos += len(rep)
        bp_norm.append(npos)
        bp_orig.append(e)
        last = e
    if not changed:
        return None
    pieces.append(text[last:])
    return Normalized("".join(pieces), bp_norm, bp_orig, unit_end)
