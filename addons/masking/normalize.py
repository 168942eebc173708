"""Undo the cheap disguises of PII before detection, keeping a map back to the original text.

What is folded (detection only; the original text is never changed by this module):
- Unicode digits of any script, superscripts and circled digits -> ASCII digits
  (unicodedata digit value), full-width ASCII (`４`, `＠`, `ｓｋ`) and mathematical
  alphanumerics -> ASCII (NFKC when it yields one ASCII character),
- Unicode spaces -> ' ', Unicode dashes and the minus sign -> '-',
- zero-width and other invisible characters are removed: ZWSP, ZWNJ, ZWJ, WJ, BOM, soft
  hyphen, bidi controls (all of category Cf), combining marks and variation selectors,
- escapes that appear inside text: JSON `\\uXXXX` (and surrogate pairs), URL `%XX` (printable
  ASCII, and runs that are one UTF-8 encoded character: `%EF%BC%94` is a full-width 4) and
  HTML numeric references `&#52;` / `&#x34;`.

Pure ASCII text without `\\u`, `%` or `&#` is returned untouched without any work, which is
the common case and keeps detection fast.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_right

import regex

_ESC_U = regex.compile(r"\\u(?:([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
                      r"|([0-9a-fA-F]{4}))")
_ESC_PCT = regex.compile(r"%([0-9A-Fa-f]{2})")
# a UTF-8 encoded character written as %XX escapes: a lead byte, then 1-3 continuation
# bytes (`%EF%BC%94` is a full-width 4, `%E2%80%8B` a zero-width space)
_ESC_PCT_UTF8 = regex.compile(r"%(?:[C-Fc-f][0-9A-Fa-f])(?:%[89ABab][0-9A-Fa-f]){1,3}")
_ESC_HTML = regex.compile(r"&#(?:[xX]([0-9A-Fa-f]{1,6})|([0-9]{1,7}));")
_ALWAYS_DROP = frozenset("\u115f\u1160\u3164\uffa0\u034f\u180e")
# punctuation that matters inside the values we detect (full-width forms fold to these)
_KEEP_PUNCT = frozenset("@.-+()/_:=%&#\\")
_NON_ASCII = regex.compile(r"[^\x00-\x7F]+")


class _FoldTable(dict):
    """code point -> folded text ('' to drop), computed on first use and cached; usable
    with str.translate."""

    def __missing__(self, cp: int) -> str:
        value = _fold_char(chr(cp))
        self[cp] = value
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
    if len(n) == 1 and n.isascii() and (n.isalnum() or n in _KEEP_PUNCT):
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


def _unescape_u(m: regex.Match) -> str:
    g = m.groups()
    if g[0] is not None:
        hi, lo = int(g[0], 16), int(g[1], 16)
        return FOLD[0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)]
    return FOLD[int(g[2], 16)]


def _unescape_pct(m: regex.Match) -> str:
    code = int(m.group(1), 16)
    return chr(code) if 0x20 <= code <= 0x7E else m.group(0)


_HEX = "0123456789ABCDEFabcdef"
# the first hex digit of a UTF-8 lead byte (C0-FF)
_LEAD = "CDEFcdef"
# at most one '%' per this many characters: str.find (memchr) from one to the next is
# cheaper than the regex's scan (prose with a few '50%': ~0.15 vs 0.35 ms per MB); denser
# text ('%%%…') goes to the regex, which is cheaper per '%'
_PCT_SPARSE = 64


def _pct_units(text: str) -> list[tuple[int, int, str]] | None:
    """The units of _ESC_PCT.finditer(text) (same matches: left to right, not overlapping,
    two ASCII hex digits after the '%'), or None when '%' is too dense for this loop."""
    limit = len(text) // _PCT_SPARSE
    out: list[tuple[int, int, str]] = []
    find = text.find
    seen = 0
    at = find("%")
    while at != -1:
        seen += 1
        if seen > limit:
            return None
        a, b = text[at + 1:at + 2], text[at + 2:at + 3]
        if a and b and a in _HEX and b in _HEX:
            code = int(a + b, 16)
            out.append((at, at + 3, chr(code) if 0x20 <= code <= 0x7E else text[at:at + 3]))
            at = find("%", at + 3)
        else:
            at = find("%", at + 1)
    return out


def _pct_utf8_units(text: str) -> list[tuple[int, int, str]]:
    """Units of the UTF-8 characters written as %XX runs, each folded: one unit per
    character (a run that is not valid UTF-8 is left to the single-byte units)."""
    out: list[tuple[int, int, str]] = []
    for m in _ESC_PCT_UTF8.finditer(text):
        s, e = m.span()
        raw = bytes.fromhex(m.group().replace("%", ""))
        try:
            ch = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(ch) == 1:
            out.append((s, e, FOLD[ord(ch)]))
    return out


def _pct_utf8_units_after(text: str, pct: list[tuple[int, int, str]] | None
                          ) -> list[tuple[int, int, str]]:
    """_pct_utf8_units(text), given _pct_units(text): a UTF-8 run starts with a '%' and a
    lead byte C0-FF, which the single-byte pass took as a unit of its own (no '%' is inside
    another unit: '%' is no hex digit) and left as it was (not printable). Without such a
    unit there is no run, and prose with the odd '50%' skips that whole-text regex scan
    (~0.3 ms per MB)."""
    if pct is not None and not any(len(rep) == 3 and rep[1] in _LEAD for _, _, rep in pct):
        return []
    return _pct_utf8_units(text)


def _unescape_html(m: regex.Match) -> str:
    code = int(m.group(1), 16) if m.group(1) is not None else int(m.group(2))
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return m.group(0)
    return FOLD[code]


def needs_normalizing(text: str) -> bool:
    return not text.isascii() or "\\u" in text or "%" in text or "&#" in text


def untouched(text: str) -> bool:
    """Is `text` what normalize() leaves as it is, told without the work: pure ASCII
    without `\\u`, `%` or `&#` (normalize returns None for such a text)."""
    return text.isascii() and "%" not in text and not ("\\" in text and "\\u" in text) \
        and not ("&" in text and "&#" in text)


def normalize(text: str) -> Normalized | None:
    """Normalised form of `text`, or None when nothing needed folding (use `text` itself)."""
    is_ascii = text.isascii()
    # each test scans the text once; the backslash and ampersand are rare, so test them
    # alone before the two-character sequences
    has_u = "\\" in text and "\\u" in text
    has_pct = "%" in text
    has_amp = "&" in text and "&#" in text
    if is_ascii and not (has_u or has_pct or has_amp):
        return None
    # (start, end, replacement) of every unit to replace, from literal-first scans that the
    # regex engine runs at memory speed
    units: list[tuple[int, int, str]] = []
    sources = 0
    if has_u:
        sources += 1
        units.extend((m.start(), m.end(), _unescape_u(m)) for m in _ESC_U.finditer(text))
    if has_pct:
        sources += 1
        pct = _pct_units(text)
        if pct is None:
            units.extend((m.start(), m.end(), _unescape_pct(m))
                         for m in _ESC_PCT.finditer(text))
        else:
            units.extend(pct)
        utf8 = _pct_utf8_units_after(text, pct)
        if utf8:
            sources += 1  # overlaps the single-byte units of the same escapes: sorted
            units.extend(utf8)
    if has_amp:
        sources += 1
        units.extend((m.start(), m.end(), _unescape_html(m)) for m in _ESC_HTML.finditer(text))
    if not is_ascii:
        sources += 1
        add = units.append
        for m in _NON_ASCII.finditer(text):
            run = m.group()
            folded = run.translate(FOLD)
            if folded == run:
                continue  # accented letters, CJK, emoji …: nothing to fold
            if len(folded) == len(run) or len(run) == 1:
                # one character for one (full-width digits …) keeps positions: the run is
                # one unit; a single dropped character (ZWSP) is one unit too
                add((m.start(), m.end(), folded))
                continue
            base = m.start()
            for k, ch in enumerate(run):
                f = FOLD[ord(ch)]
                if f != ch:
                    add((base + k, base + k + 1, f))
    if not units:
        return None
    if sources > 1:
        units.sort()
    pieces: list[str] = []
    bp_norm: list[int] = []
    bp_orig: list[int] = []
    unit_end: dict[int, int] = {}
    last = 0  # original position copied up to
    npos = 0  # length of the normalised text so far
    changed = False
    for s, e, rep in units:
        if s < last:
            continue
        r = len(rep)
        if r == e - s:
            if rep == text[s:e]:
                continue  # an escape left as it was (%0A, &#0;)
            # same length (full-width digits, NBSP -> ' '): positions keep their offset,
            # so no breakpoint is needed
            changed = True
            if s > last:
                pieces.append(text[last:s])
            pieces.append(rep)
            npos += (s - last) + r
            last = e
            continue
        changed = True
        if s > last:
            pieces.append(text[last:s])
            npos += s - last
        for k in range(r):  # a shorter replacement: each char stands for the whole unit
            bp_norm.append(npos + k)
            bp_orig.append(s)
            unit_end[npos + k] = e
        pieces.append(rep)
        npos += r
        bp_norm.append(npos)
        bp_orig.append(e)
        last = e
    if not changed:
        return None
    pieces.append(text[last:])
    return Normalized("".join(pieces), bp_norm, bp_orig, unit_end)
