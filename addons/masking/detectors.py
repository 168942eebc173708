"""Find PII and secrets in text: validated detectors on the `regex` module, no mitmproxy.

API (what the masking placement code uses):

    ds = DetectorSet(rules.masking)          # precompiles everything; reuse it
    for f in ds.find(text):                  # sorted, non-overlapping Finding(entity, start,
        ...                                  #   end, value) in ORIGINAL text positions
    ds.strategy_for("EMAIL")                 # "placeholder" | "redact" | "partial" | "hash"
    ds.max_len                               # longest span any detector can match
    ds.holdback(pending_text)                # chars at the end of a stream buffer to keep back

Entities (placeholders become `[EMAIL_1]`): EMAIL, PHONE, US_SSN, CREDIT_CARD, IBAN,
IP_ADDRESS, OPENAI_KEY, ANTHROPIC_KEY, ANTHROPIC_ADMIN_KEY, AWS_ACCESS_KEY, AWS_SECRET_KEY,
AWS_BEDROCK_KEY, GITHUB_TOKEN, SLACK_TOKEN, SLACK_WEBHOOK, GOOGLE_API_KEY, HUGGINGFACE_TOKEN,
PERPLEXITY_KEY, PRIVATE_KEY, JWT, STRIPE_KEY, GITLAB_TOKEN, NPM_TOKEN, PYPI_TOKEN,
SENDGRID_KEY, BEARER_TOKEN, PASSWORD — plus the rules' custom detectors. `SAMPLES` holds one
synthetic value per entity that is caught on its own (for tests); `CONTEXT_SAMPLES` the
entities that need words around them (BEARER_TOKEN, PASSWORD; AWS_SECRET_KEY is in both).

Streaming (SSE): do not hold back `max_len` characters — it is large because a PEM private
key may legitimately be 32 KiB. Use `holdback(buffer)`: it is the length of the tail that a
match could still extend into (the last token, a run of short digit groups such as
"4111 1111 ", or an open `-----BEGIN … PRIVATE KEY-----` block), bounded by `max_len`; in
prose it is a few characters. Keep `context_len` characters of already-sent ORIGINAL text in
front of the buffer you pass to find() so that left context (word boundaries, the "aws
secret" word before a secret key) is still seen, and ignore findings that end inside that
carried context.

Overlaps: the longer finding wins; on equal length the more specific entity (provider
secrets > card > IBAN > SSN > e-mail > phone > IP > bearer token > password).

Positions: the text is first normalised (addons.masking.normalize: Unicode digits, zero-width
characters, `\\u0034` / `%34` / `&#52;` escapes), detection runs on the normalised text,
and spans are mapped back, so a finding's `value` is exactly `text[start:end]` of what was
passed in.

Engines: `DetectorSet(config)` runs one Hyperscan pass first (addons.masking.fastscan) and
then only the detectors whose anchors occur (IBANs only in windows around their candidates);
`DetectorSet(config, fast=False)` is the reference engine that runs every detector. Both
give the same findings (tests/masking/test_differential.py); without the hyperscan module
the default falls back to the reference engine and logs that once.

Cost (reference engine): ~50 MB/s per core on ASCII prose, 25-40 MB/s on prose with
non-ASCII words; the fast engine skips the regex scans of absent families, which is most of
that on clean prose. Every detector stays linear on hostile input (worst case measured
~1.3 MB/s, e.g. a body of '1' + zero-width space repeated) — see bench/bench_detectors.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

import regex

from addons.masking import fastscan
from addons.masking.config import BUILTIN_ENTITIES, MaskingConfig
from addons.masking.normalize import normalize, untouched
from addons.masking.secret_rules import (
    AWS_SECRET,
    AWS_SECRET_WINDOW,
    AWS_SECRET_WORDS,
    BEARER,
    PASSWORD_ASSIGNMENTS,
    SECRET_RULES,
    URL_PASSWORD,
    SecretRule,
    aws_secret_ok,
    bearer_ok,
    password_ok,
    pem_end,
)
from addons.masking.validators import (
    IBAN_LENGTHS,
    card_lengths,
    card_ok,
    card_ok_b,
    luhn_ok,
    luhn_ok_b,
    mod97_ok,
    ssn_ok,
)

__all__ = ["Finding", "DetectorSet", "ENTITIES", "SAMPLES", "CONTEXT_SAMPLES"]

ENTITIES: tuple[str, ...] = tuple(BUILTIN_ENTITIES)


@dataclass(frozen=True, slots=True)
class Finding:
    entity: str
    start: int   # positions in the ORIGINAL text passed to find()
    end: int
    value: str   # text[start:end]


_new_finding = object.__new__
_set_entity, _set_start, _set_end, _set_value = (
    Finding.entity.__set__, Finding.start.__set__,  # type: ignore[attr-defined]
    Finding.end.__set__, Finding.value.__set__)  # type: ignore[attr-defined]


def _finding(entity: str, start: int, end: int, value: str) -> Finding:
    """Finding(entity, start, end, value), the same object at half the cost: the frozen
    dataclass's __init__ goes through object.__setattr__ per field, the slots' descriptors
    set them directly."""
    f = _new_finding(Finding)
    _set_entity(f, entity)
    _set_start(f, start)
    _set_end(f, end)
    _set_value(f, value)
    return f


def _c(p: str, flags: int = 0) -> regex.Pattern:
    return regex.compile(p, regex.V0 | flags)


# ---------------------------------------------------------------------------- separators
# Between the digit groups of a card, SSN, IBAN or phone number: any ONE character that is
# neither a letter nor a digit (space, dash, dot, comma, slash, underscore, colon, tab,
# newline, bullet, …) or a CRLF, the same or mixed from group to group. One character, not
# a run: "4111, 1111" in prose and '"4111", "1111"' in JSON are lists, not one number (a
# value split across JSON fields is joined by the body walk, not here). The validators
# (issuer range + Luhn, SSA rules, mod-97, NANP rules) and the grouping rules keep number
# lists, dates and versions out; the shapes stay bounded (at most 19 digits in 18 groups).
SEP = r"(?:\r\n|[\W_])"
_SEP_SPLIT = _c(SEP)


def _groups(s: str) -> list[str]:
    """Digit/letter groups of a separated value ('4111,1111/1111_1111' -> 4 groups)."""
    return _SEP_SPLIT.split(s)


# a character that is neither an ASCII letter or digit nor a classic separator
_EXOTIC_CHAR = _c(r"[^0-9A-Za-z \-.()]")


def _exotic(value: str) -> bool:
    """True when a separated value uses a separator other than space, dash, dot (the
    classic ones, whose behaviour is pinned by the corpus)."""
    return _EXOTIC_CHAR.search(value) is not None


def _isolated(t: str, s: int, e: int) -> bool:
    """The span is not one item of a longer list of numbers ('[6718,1885,8966,6125,590]',
    '2781_736_545_8985'): no digit + separator right before it, no separator + digit right
    after it. Asked only of values with an exotic separator: a list written with commas,
    slashes or underscores is far more often data than one number."""
    if s >= 2 and t[s - 2].isdigit() and not t[s - 1].isalnum() and not t[s - 1].isspace():
        return False
    if e + 1 < len(t) and t[e + 1].isdigit() and not t[e].isalnum() and not t[e].isspace():
        return False
    return True


# ---------------------------------------------------------------------------- cards
# 13-19 digits, either in one run or in groups of 1-6 digits separated by single separators
# (SEP). Single-digit groups are allowed on purpose: "4 1 1 1 …" is an evasion, and the
# issuer range + Luhn keep plain number lists out.
# (Patterns start by consuming a digit, then look behind: the engine scans fastest so.)
# (not the decimals of a number: '1.3862943611198906')
_CARD = _c(r"[0-9](?<![0-9A-Za-z][0-9])(?<![0-9][.,][0-9])(?:[0-9]{12,18}(?![0-9])"
           r"|[0-9]{0,5}(?P<sep>" + SEP + r")[0-9]{1,6}(?:" + SEP + r"[0-9]{1,6}){1,17}"
           r"(?![0-9]))")


def _card_grouping_ok(lens: list[int]) -> bool:
    """Groups as card numbers are written: equal groups of 4 with a shorter-or-equal last
    one (4-4-4-4, 4-4-4-4-3, 4-4-4-1), the 1-1-1… / 2-2-2… evasions, or Amex/Diners 4-6-5 /
    4-6-4."""
    if len(lens) == 3 and lens[0] == 4 and lens[1] == 6:
        return True
    first = lens[0]
    # groups of 4 (the way cards are printed), or of 1-2 digits (a spacing evasion); not
    # 3-3-3-3-3 or 5-5-5, which are how long numbers and tables are written
    return first in (1, 2, 4) and lens.count(first) >= len(lens) - 1 and lens[-1] <= first


def _card_retry(m: regex.Match) -> int:
    """After a failed candidate: its second group may start a card when the first group
    does not belong ("12 4111 1111 1111 1111"); equal groups ("1 1 1 1 …") cannot, so
    skip the whole candidate (keeps a hostile '1 1 1 …' body linear)."""
    if m.group("sep") is None:
        return m.end()
    groups = _groups(m.group(0))
    first, second = groups[0], groups[1]
    return m.start() + len(first) + 1 if len(first) != len(second) else m.end()


def _card_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    if m.group("sep") is None:
        return m.span() if card_ok(m.group(0)) else None
    # the number starts the run of groups; trailing groups may be something else
    # ("4111 1111 1111 1111 12/25"), so try the longest prefix of groups first
    raw = m.group(0)
    groups = _groups(raw)
    digits = "".join(groups)
    allowed = card_lengths(digits[:6])
    if not allowed:
        return None
    lens = [len(g) for g in groups]
    total = 0
    ends = []  # (number of groups, digits so far)
    for j, n in enumerate(lens, 1):
        total += n
        if total > 19:
            break
        if total in allowed and j > 1:
            ends.append((j, total))
    for j, total in reversed(ends):
        if _card_grouping_ok(lens[:j]) and luhn_ok(digits[:total]):
            end = m.start() + _prefix_len(raw, groups, j)
            value = t[m.start():end]
            if _exotic(value):
                # groups of 1-2 digits with mixed exotic separators are number lists
                if lens[0] <= 2 and len(set(_SEP_SPLIT.findall(value))) > 1:
                    return None
                if not _isolated(t, m.start(), end):
                    return None
            return m.start(), end
    return None


def _prefix_len[S: (str, bytes)](raw: S, groups: list[S], j: int) -> int:
    """Length of `raw` up to the end of its j-th group (separators may differ in length)."""
    pos = 0
    for k, g in enumerate(groups[:j]):
        pos = raw.index(g, pos) + len(g) if g else pos
        if k == j - 1:
            break
    return pos


# ---------------------------------------------------------------------------- US SSN
# AAA-GG-SSSS with a separator (SEP, the same or mixed) between the groups, or none at all,
# plus the 3-6 dash grouping presidio also accepts; validated with the SSA rules
# (validators.ssn_ok). Not the 5-4 grouping: that
# is how ZIP+4 codes are written ('Boston, MA 02111-1307' is in every GPL header).
# Not inside a word or an identifier ('#_Toc398718022', 'issue-817742836', '123456789abc').
_SSN = _c(r"[0-9]{3}(?<![A-Za-z0-9_][0-9]{3})(?<![0-9][.\-][0-9]{3})"
          r"(?:[0-9]{6}|" + SEP + r"[0-9]{2}" + SEP + r"[0-9]{4}|-[0-9]{6})"
          r"(?![A-Za-z0-9_]|[.\-][0-9])")


_SSN_WORDS = _c(r"(?i)ssn|social[ \-_]?sec|soc\.? ?sec|\bss#|\btin\b|itin|tax ?id|taxpayer|"
                r"sozialversicherung|seguro social")


def _ssn_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if raw.isdigit():
        # nine bare digits are far more often an id, a count or a timestamp than an SSN
        # ('"id": "194521489"', 'oauth_timestamp=137131201'): they need a word such as
        # "SSN" or "social security" nearby. Written with separators they do not.
        if (m.start() and t[m.start() - 1] in "-#/.+") or raw in ("123456789", "987654321"):
            return None
        # (the word must come before the number: a stream may already have sent the
        # number when a word after it arrives)
        if _SSN_WORDS.search(t, max(0, m.start() - 40), m.start()) is None:
            return None
    if _exotic(raw) and not _isolated(t, m.start(), m.end()):
        return None
    return m.span() if ssn_ok(_digits(raw)) else None





# ---------------------------------------------------------------------------- IBAN
# country code + check digits, then the BBAN in one run or in groups of up to 4 separated
# by single separators (SEP, the same or mixed)
_IBAN_GROUPS = r"(?P<sep>" + SEP + r")[A-Za-z0-9]{1,4}(?:" + SEP + r"[A-Za-z0-9]{1,4}){2,8}"
_IBAN = _c(r"[A-Z]{2}(?<![A-Za-z0-9][A-Z]{2})[0-9]{2}(?:[A-Za-z0-9]{11,30}(?![A-Za-z0-9])"
           r"|" + _IBAN_GROUPS + ")")
# the same in lower case, found from its check digits (a scan that starts at a lower-case
# letter would visit most of the text)
_IBAN_LOWER = _c(r"[0-9]{2}(?<=(?<![A-Za-z0-9])[a-z]{2}[0-9]{2})"
                 r"(?:[a-z0-9]{11,30}(?![A-Za-z0-9])"
                 r"|(?P<sep>" + SEP + r")[a-z0-9]{1,4}(?:" + SEP + r"[a-z0-9]{1,4}){2,8})")


def _iban_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    want = IBAN_LENGTHS.get(raw[:2].upper())
    if want is None:
        return None
    sep = m.group("sep")
    if sep is None:
        if len(raw) != want:
            return None
        value, end = raw, m.end()
    else:
        # take groups up to the country's length; it must end on a group boundary, so
        # "VG96 VPVG 0000 0123 4567 8901 X" stops before " X"
        parts = _groups(raw)
        total = 0
        used = 0
        while used < len(parts) and total < want:
            total += len(parts[used])
            used += 1
        if total != want:
            return None
        value = "".join(parts[:used])
        end = m.start() + _prefix_len(raw, parts, used)
    # written upper case, or all lower case (an easy disguise); 'LV80 bANK …' is neither
    if any(c.islower() for c in value):
        if not value.islower():
            return None
        value = value.upper()
    if not mod97_ok(value):
        return None
    if _exotic(t[m.start():end]) and not _isolated(t, m.start(), end):
        return None
    return m.start(), end


# ---------------------------------------------------------------------------- phone
# E.164 country calling codes (ITU), used to validate '+CC …' numbers.
_CC = frozenset(
    "1 7 20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 "
    "62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98 211 212 213 216 218 220 221 222 223 224 "
    "225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 "
    "247 248 249 250 251 252 253 254 255 256 257 258 260 261 262 263 264 265 266 267 268 269 "
    "290 291 297 298 299 350 351 352 353 354 355 356 357 358 359 370 371 372 373 374 375 376 "
    "377 378 379 380 381 382 383 385 386 387 389 420 421 423 500 501 502 503 504 505 506 507 "
    "508 509 590 591 592 593 594 595 596 597 598 599 670 672 673 674 675 676 677 678 679 680 "
    "681 682 683 685 686 687 688 689 690 691 692 800 808 850 852 853 855 856 870 878 880 881 "
    "882 883 886 888 960 961 962 963 964 965 966 967 968 970 971 972 973 974 975 976 977 979 "
    "992 993 994 995 996 998".split())


def _nanp_ok(d10: str) -> bool:
    """Area code and exchange start with 2-9 and are not N11 service codes."""
    if len(d10) != 10 or d10[0] in "01" or d10[3] in "01":
        return False
    return d10[1:3] != "11" and d10[4:6] != "11"


# 415-555-0132, 415.555.0132, 415 555 0132 and (415) 555-0132; a country code in front
# ('1-', '+1 ', '91-') is taken into the span by _nanp_span
_PHONE_NANP = _c(r"(?:[0-9]{3}(?<![0-9]{4})" + SEP + r"|\([0-9]{3}\)" + SEP + r"?)"
                 r"[0-9]{3}" + SEP + r"[0-9]{4}(?![0-9]|[.\-][0-9])")
_NANP_CC = _c(r"(?r)(?<![0-9+])(\+?[0-9]{1,3})[ .\-]?")
# +CC then digit groups (optionally one in parentheses), 8-15 digits in all
_PHONE_INTL = _c(r"\+(?<![\w+]\+)[1-9][0-9]{0,2}(?:" + SEP + r"?(?:\([0-9]{1,4}\)|[0-9]{1,6}))"
                 r"{1,8}"
                 r"(?![0-9])")
# national numbers with a trunk prefix 0: 09-7625400, 090-1234-5678, 020 7123 4567,
# 01 42 68 53 00; not '00…' (an international prefix) and not SSN-like 078-05-1123
_PHONE_TRUNK = _c(r"0(?<![\w+\-.]0)(?<![0-9][ .\-]0)[1-9][0-9]{0,3}(?:" + SEP + r"[0-9]{2,8})"
                  r"{1,4}"
                  r"(?![0-9]|[ .\-][0-9])")
# Chinese mobile numbers: 1[3-9]x xxxx xxxx
_PHONE_CN = _c(r"1(?<![0-9A-Za-z+\-.]1)(?<![0-9][ .\-]1)[3-9][0-9]"
               r"(?:[0-9]{8}|" + SEP + r"[0-9]{4}" + SEP + r"[0-9]{4})"
               r"(?![0-9A-Za-z_]|[ .\-][0-9])")
# ten bare digits only count as a phone number right after a word that says so
_PHONE_BARE = _c(r"[2-9](?<![0-9A-Za-z_+\-.][2-9])[0-9]{2}[2-9][0-9]{6}"
                 r"(?![0-9A-Za-z_]|[.\-][0-9])")
_PHONE_WORDS = _c(r"(?i)phone|tel\b|call|mobile|cell|fax|whatsapp|sms|contact|reach|number|"
                  r"ph\.|tlf|telefon|t[eé]l[eé]phone|n[uú]mero")


_NON_DIGITS = _c(r"[^0-9]+")


def _digits(s: str) -> str:
    """The ASCII digits of `s`."""
    return _NON_DIGITS.sub("", s)


def _nanp_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    s, e = m.span()
    if not _nanp_ok(_digits(m.group(0))):
        return None
    if _exotic(m.group(0)) and not _isolated(t, s, e):
        return None
    prev = t[s - 1] if s else ""
    if prev.isdigit():
        return None
    cm = _NANP_CC.match(t, max(0, s - 5), s) if prev in "+-. " else None
    if cm is not None and cm.group(1).lstrip("+") in _CC:
        return cm.start(), e  # '+1 ', '1-', '91-' belong to the number
    if prev and prev in "+-.":  # ('' is in every string: a number at the text's start)
        return None  # inside a longer dash/dot sequence that is not a phone number
    return s, e


def _cc_of(d: str) -> str | None:
    for k in (1, 2, 3):
        if d[:k] in _CC:
            return d[:k]
    return None


def _plain_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    if _exotic(m.group(0)) and not _isolated(t, *m.span()):
        return None
    return m.span()


def _intl_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    span = _intl_span_raw(m, t)
    if span is not None and _exotic(t[span[0]:span[1]]) and not _isolated(t, *span):
        return None
    return span


def _intl_span_raw(m: regex.Match, t: str) -> tuple[int, int] | None:
    text = m.group(0)
    # cut at group boundaries from the right until the digit count fits E.164
    cuts = [i for i in range(1, len(text)) if not text[i].isdigit() and text[i] != ")"
            and (text[i - 1].isdigit() or text[i - 1] == ")")]
    ends = [len(text)] + [c for c in reversed(cuts)]
    for end in ends:
        d = _digits(text[:end])
        cc = _cc_of(d)
        if cc is None:
            return None
        if cc == "1":
            if len(d) == 11 and _nanp_ok(d[1:]):
                return m.start(), m.start() + end
            continue
        if 8 <= len(d) <= 15 and len(d) - len(cc) >= 6:
            return m.start(), m.start() + end
    return None


def _trunk_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    parts = _groups(m.group(0))
    if [len(p) for p in parts] == [5, 4] and "-" in m.group(0):
        return None  # 02111-1307: a ZIP+4 code
    rest = [len(p) for p in parts[1:]]
    # subscriber groups: all pairs (French style, 4+ of them) or all of 3+ digits
    if not (all(n >= 3 for n in rest) or (all(n == 2 for n in rest) and len(rest) >= 4)):
        return None
    n = sum(len(p) for p in parts)
    if _exotic(m.group(0)) and not _isolated(t, *m.span()):
        return None
    return m.span() if 9 <= n <= 11 else None


def _bare_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    if not _nanp_ok(m.group(0)):
        return None
    lo = max(0, m.start() - 30)
    return m.span() if _PHONE_WORDS.search(t, lo, m.start()) else None


# ---------------------------------------------------------------------------- IP
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4_RE = _OCTET + r"(?:\." + _OCTET + r"){3}"
_IPV4 = _c(r"(?<![\w.])" + _IPV4_RE + r"(?:/(?:3[0-2]|[12]?[0-9])(?![0-9]))?(?![\w])")
_IPV6 = _c(r"(?<![\w:.%])(?:[0-9A-Fa-f]{1,4}|(?=::))(?::[0-9A-Fa-f]{0,4}){1,7}"
           r"(?:(?<=:)" + _IPV4_RE + r")?"
           r"(?P<zone>%[0-9A-Za-z_\-]{1,16})?"
           r"(?P<cidr>/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])(?![0-9]))?"
           r"(?![\w:]|\.[0-9])")
# an IPv6 address has '::' or at least two colons close together; prose colons ("Note: ",
# "10:30") do not, so candidates are few
_V6_TRIGGER = _c(r":(?:(?<=[0-9A-Fa-f]:)[0-9A-Fa-f]{0,4}:|[0-9A-Fa-f]{0,4}:(?=[0-9A-Fa-f/]))")
# IPv4 candidates: digit.digit.digit.digit, then the exact pattern at that position
_V4_TRIGGER = _c(r"[0-9](?<![\w.][0-9])[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]")
_V6_BACK = _c(r"(?r)[0-9A-Fa-f:]{1,45}")
_V6_RUN = _c(r"[0-9A-Fa-f:.]*")


def _ipv6_ok(m: regex.Match) -> bool:
    addr = m.group(0)
    cidr = m.group("cidr")
    if cidr:
        addr = addr[: -len(cidr)]
    zone = m.group("zone")
    if zone:
        addr = addr[: -len(zone)]
    if addr == "::" and not cidr:
        return False  # bare '::' is Haskell / C++ / slicing syntax far more often than an IP
    if addr != "::" and not any(c.isdigit() for c in addr):
        return False  # 'Add::Bee', 'dead:beef::' — identifiers, not addresses
    if addr.startswith("::") and addr.count(":") == 2 and len(addr) <= 4 and addr != "::1" \
            and not cidr:
        return False  # Python slices 'a[::2]', 'b[::10]'; '::1' (loopback) is kept
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return True


def _find_ipv4(t: str, out: list, windows: list[list[int]] | None = None) -> None:
    """IPv4 addresses; with `windows` (sorted, disjoint [lo, hi] that hold every trigger
    match of the text) the trigger is looked for only inside them, with the same result."""
    pos = 0
    search = _V4_TRIGGER.search
    for lo, hi in windows if windows is not None else ((0, len(t)),):
        while pos < hi:
            tm = search(t, max(pos, lo), hi)
            if tm is None:
                break
            m = _IPV4.match(t, tm.start())
            if m is not None:
                out.append((m.start(), m.end(), "IP_ADDRESS", 20))
                pos = m.end()
            else:
                pos = tm.start() + 1


def _find_ipv6(t: str, out: list) -> None:
    pos = 0
    n = len(t)
    while pos < n:
        tm = _V6_TRIGGER.search(t, pos)
        if tm is None:
            return
        c = tm.start()
        bm = _V6_BACK.match(t, max(0, c - 45), c)
        s = bm.start() if bm else c
        m = _IPV6.match(t, s)
        if m is not None and m.end() > c:
            if _ipv6_ok(m):
                out.append((m.start(), m.end(), "IP_ADDRESS", 20))
            pos = m.end()  # a failed candidate is skipped whole ('1::1::1::…' stays linear)
        else:
            # only the start of a hex/colon run can start an address (the look-behind
            # rejects any later position), so nothing else in this run can match
            pos = _V6_RUN.match(t, c).end() + 1


# ---------------------------------------------------------------------------- e-mail
# found from the '@' (rare in text) with the local part captured by a look-behind, so the
# whole scan runs inside the regex engine
_EMAIL_DOMAIN = (r"(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+"
                 r"(?:[^\W\d_]{2,63}|xn--[A-Za-z0-9\-]{1,59})(?![\w\-])")
_EMAIL = _c(r"@(?<=(?<![\w.%+\-])(?P<pre>[\w.%+\-]{1,64})@)" + _EMAIL_DOMAIN)


def _find_emails(t: str, out: list) -> None:
    for m in _EMAIL.finditer(t):
        _email_found(t, m.start("pre"), m.start(), m.end(), out)


def _email_found(t: str, s: int, at: int, end: int, out: list) -> None:
    """A match of _EMAIL: local part from s, '@' at `at`, domain up to `end`."""
    while t[s] == ".":  # a local part does not start with a dot
        s += 1
    if s >= at:
        return
    if s and t[s - 1] == ":" and t.rfind("://", max(0, s - 80), s) != -1:
        return  # 'scheme://user:secret@host': a password in a URL, not an address
    out.append((s, end, "EMAIL", 35))


# The fast engine on ASCII text: the same matches from `re` (2-3x cheaper per call than the
# look-behind capture). Each '@' is tried on its own — no domain holds an '@', so finditer's
# matches never overlap the next one. The local part is the run of [\w.%+-] before the '@'
# when it is 1-64 long (the look-behind takes it greedily and wants no such character
# before it), read on the reversed bytes of the text; the domain is _EMAIL_DOMAIN.
_EMAIL_DOMAIN_ASCII = re.compile(_EMAIL_DOMAIN)
_EMAIL_LOCAL_REVERSED = re.compile(rb"[A-Za-z0-9_.%+\-]{1,65}")


_EMAIL_DENSE = 64  # more than one '@' per this many characters: the regex scan


def _find_emails_ascii(t: str, rev: bytes, out: list, limit: int | None = None) -> bool:
    """_find_emails for an ASCII `t`; rev: its bytes reversed. With `limit`: once more
    than that many '@' are seen, what it added to `out` is taken back and False returned
    (the caller runs the regex scan instead): the same choice as counting the '@' first,
    without a counting pass over the whole text (~0.3 ms per MB)."""
    n = len(t)
    domain, local = _EMAIL_DOMAIN_ASCII.match, _EMAIL_LOCAL_REVERSED.match
    mark = len(out)
    seen = 0
    at = t.find("@")
    while at != -1:
        if limit is not None:
            seen += 1
            if seen > limit:
                del out[mark:]
                return False
        lm = local(rev, n - at)
        if lm is not None:
            size = lm.end() - lm.start()
            if size <= 64:
                dm = domain(t, at + 1)
                if dm is not None:
                    _email_found(t, at - size, at, dm.end(), out)
        at = t.find("@", at + 1)
    return True


# ---------------------------------------------------------------------------- PEM
def _find_pem(rule: SecretRule, t: str, out: list) -> None:
    """Private-key blocks; the next BEGIN is looked for after the end of the previous block,
    so text made of BEGIN lines costs one pass."""
    pos = 0
    while True:
        m = rule.pattern.search(t, pos)
        if m is None:
            return
        end = pem_end(m, t)
        if end is None:
            pos = m.end()
            continue
        out.append((m.start(), end, rule.entity, rule.priority))
        pos = end


# ---------------------------------------------------------------------------- passwords
_TEMPLATE = _c(r"[$<{%].*|[*xX]+|\.\.\.")


_PW_WORDS = ("pass", "pwd", "secret", "token", "key", "credential")


def _find_passwords(t: str, low: str | None, out: list, url: bool = True,
                    assign: bool = True) -> None:
    if url and "://" in t:
        for m in URL_PASSWORD.finditer(t):
            v = m.group("v")
            if not _TEMPLATE.fullmatch(v) and password_ok(v):
                out.append((m.start("v"), m.end("v"), "PASSWORD", 15))
    if not assign:
        return
    if low is not None and len(t) < _SHORT_TEXT and not any(w in low for w in _PW_WORDS):
        return  # short text without a password-like word (cheaper than the scans)
    for op, pattern in zip("=:", PASSWORD_ASSIGNMENTS, strict=True):
        if op not in t:
            continue
        for m in pattern.finditer(t):
            if password_ok(m.group("v")):
                out.append((m.start("v"), m.end("v"), "PASSWORD", 15))


# an URL_PASSWORD match: '://', 1-64 characters of user, ':', 1-128 of password, '@'
_URL_PASSWORD_AT = 3 + 64 + 1 + 128


def _find_url_passwords(t: str, ends: list[int], out: list) -> None:
    """The URL passwords of _find_passwords: URL_PASSWORD tried only at the '://' of each
    fastscan 'pw_url' anchor (ends: sorted offsets just past the ':' that ends a user part
    after a '://') with an '@' close enough after it (most URLs have none). The same
    matches as its finditer: a match starts at its '://' (the scheme is a look-behind),
    its user part holds no ':' (so the '://' is the last one before the anchor's end:
    rfind), and it holds no '/', so it never reaches the next '://'."""
    for e in ends:
        i = t.rfind("://", max(0, e - 68), e)  # '://', 1-64 of user, ':'
        if i == -1:
            continue  # (not reached: the anchor holds that '://')
        if t.find("@", i + 3, i + _URL_PASSWORD_AT + 1) != -1:
            m = URL_PASSWORD.match(t, i)
            if m is not None:
                v = m.group("v")
                if not _TEMPLATE.fullmatch(v) and password_ok(v):
                    out.append((m.start("v"), m.end("v"), "PASSWORD", 15))


def _find_assignments_at(t: str, op_ends: list[int], out: list) -> None:
    """PASSWORD_ASSIGNMENTS matched only at the '=' / ':' that end a fastscan 'pw_op' anchor
    (a password word before the operator, which each assignment's look-behind needs): the
    same matches, in the same order, as their finditer over the whole text."""
    for op, pattern in zip("=:", PASSWORD_ASSIGNMENTS, strict=True):
        last = 0
        for e in op_ends:
            i = e - 1
            if i < last or t[i] != op:
                continue
            m = pattern.match(t, i)
            if m is not None:
                if password_ok(m.group("v")):
                    out.append((m.start("v"), m.end("v"), "PASSWORD", 15))
                last = m.end()


def _windows(points: list[int], before: int, after: int, n: int, t: str = "",
             tail: regex.Pattern | None = None) -> list[list[int]]:
    """Sorted, merged [lo, hi] windows [p - before, p + after] around sorted points, clipped
    to [0, n]; with `tail`, hi is one past what `tail` matches in `t` at p + after."""
    wins: list[list[int]] = []
    for p in points:
        lo = max(0, p - before)
        hi = min(n, p + after)
        if tail is not None:
            hi = min(n, tail.match(t, hi).end() + 1)
        if wins and lo <= wins[-1][1]:
            if hi > wins[-1][1]:
                wins[-1][1] = hi
        else:
            wins.append([lo, hi])
    return wins


def _find_bearer(t: str, low: str | None, out: list) -> None:
    src = low if low is not None else t
    i = src.find("bearer")
    while i != -1:
        m = BEARER.match(t, i)
        if m is not None and bearer_ok(m.group("v")):
            out.append((m.start("v"), m.end("v"), "BEARER_TOKEN", 18))
        i = src.find("bearer", i + 6)


# ---------------------------------------------------------------------------- assembly
SpanFn = Callable[[regex.Match, str], "tuple[int, int] | None"]


@dataclass(frozen=True, slots=True)
class _RegexDet:
    entity: str
    pattern: regex.Pattern
    span: SpanFn | None
    priority: int
    gate: tuple[str, ...] = ()      # skip unless one of these substrings occurs
    # where to look again after a candidate failed validation (default: after it); cards
    # and IBANs may start at a later group of the candidate ("12 4111 1111 1111 1111")
    retry: Callable[[regex.Match], int] | None = None
    # the same pattern compiled by the standard library's `re` (fast engine, ASCII windows)
    ascii_pattern: re.Pattern | None = None


# Detectors of numbers written with digits and separators. They run only inside "numeric
# clusters" (_NUM_CLUSTER, one fast scan) that hold at least _NUM_MIN_DIGITS digits, so prose
# with the odd date or price costs almost nothing.
_NUMERIC: tuple[_RegexDet, ...] = (
    _RegexDet("CREDIT_CARD", _CARD, _card_span, 50, retry=_card_retry),
    _RegexDet("US_SSN", _SSN, _ssn_span, 40),
    _RegexDet("PHONE", _PHONE_NANP, _nanp_span, 30),
    _RegexDet("PHONE", _PHONE_INTL, _intl_span, 30),
    _RegexDet("PHONE", _PHONE_TRUNK, _trunk_span, 30),
    _RegexDet("PHONE", _PHONE_CN, _plain_span, 30),
    _RegexDet("PHONE", _PHONE_BARE, _bare_span, 30),
)
# their prefilter anchors (fastscan.NUMERIC_ANCHORS)
_NUMERIC_NAMES: dict[_RegexDet, str] = dict(zip(
    _NUMERIC, ("card", "ssn", "nanp", "intl", "trunk", "cn", "bare"), strict=True))
# ---------------------------------------------------------------------------- fast engine
# The numeric detectors' validation as the fast engine runs it: the same answers as the
# span functions above (the reference), with bytes operations in C instead of regex calls
# and per-character Python loops (tests/masking/test_differential.py compares them on
# random clusters). Only a match that is all ASCII takes these paths — one byte per
# character, and str.isdigit() agrees with [0-9] — any other goes to the reference function.
_NOT_DIGIT = bytes(b for b in range(256) if not 48 <= b <= 57)
_SEP_TO_SPACE = bytes.maketrans(_NOT_DIGIT, b" " * len(_NOT_DIGIT))
_CLASSIC = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz -.()"
_CC_B = frozenset(c.encode("ascii") for c in _CC)


def _exotic_b(value: bytes) -> bool:
    """_exotic of an ASCII value."""
    return bool(value.translate(None, _CLASSIC))


def _nanp_ok_b(d: bytes) -> bool:
    """_nanp_ok of ASCII digits (48 = '0', 49 = '1')."""
    return len(d) == 10 and d[0] > 49 and d[3] > 49 and d[1:3] != b"11" and d[4:6] != b"11"


def _card_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if not raw.isascii():
        return _card_span(m, t)
    if m.group("sep") is None:
        return m.span() if card_ok_b(raw.encode("ascii")) else None
    rb = raw.encode("ascii")
    groups = rb.translate(_SEP_TO_SPACE).split()  # the match alternates digits, one SEP
    digits = b"".join(groups)
    allowed = card_lengths(digits[:6].decode("ascii"))
    if not allowed:
        return None
    lens = [len(g) for g in groups]
    total = 0
    ends = []
    for j, n in enumerate(lens, 1):
        total += n
        if total > 19:
            break
        if total in allowed and j > 1:
            ends.append((j, total))
    s = m.start()
    crlf = rb.find(b"\r\n")
    for j, total in reversed(ends):
        if _card_grouping_ok(lens[:j]) and luhn_ok_b(digits[:total]):
            # j groups and the j - 1 one-character separators between them (a CRLF is two)
            end = s + (total + j - 1 if crlf == -1 else _prefix_len(rb, groups, j))
            if _exotic_b(rb[:end - s]):
                value = t[s:end]
                if lens[0] <= 2 and len(set(_SEP_SPLIT.findall(value))) > 1:
                    return None
                if not _isolated(t, s, end):
                    return None
            return s, end
    return None


def _card_retry_fast(m: regex.Match) -> int:
    if m.group("sep") is None:
        return m.end()
    raw = m.group(0)
    if not raw.isascii():
        return _card_retry(m)
    groups = raw.encode("ascii").translate(_SEP_TO_SPACE).split(None, 2)
    first, second = groups[0], groups[1]
    return m.start() + len(first) + 1 if len(first) != len(second) else m.end()


def _ssn_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if not raw.isascii() or raw.isdigit():
        return _ssn_span(m, t)  # bare digits: the context word decides (rare)
    rb = raw.encode("ascii")
    if _exotic_b(rb) and not _isolated(t, m.start(), m.end()):
        return None
    return m.span() if ssn_ok(rb.translate(None, _NOT_DIGIT).decode("ascii")) else None


def _nanp_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if not raw.isascii():
        return _nanp_span(m, t)
    rb = raw.encode("ascii")
    if not _nanp_ok_b(rb.translate(None, _NOT_DIGIT)):
        return None
    s, e = m.span()
    if _exotic_b(rb) and not _isolated(t, s, e):
        return None
    prev = t[s - 1] if s else ""
    if prev.isdigit():
        return None
    if prev in "+-. ":
        cc = _nanp_cc(t, s)
        if cc is not None and cc[1].lstrip("+") in _CC:
            return cc[0], e
        if prev and prev in "+-.":
            return None
    return s, e


# _NANP_CC read forwards on the reversed text: the same elements in the same order (an
# optional separator, 1-3 digits, an optional '+', greedy, then the look-behind turned
# look-ahead), so `re` backtracks through the same choices. A match is at most 5
# characters and its look-behind reads one more, so 7 characters before s are enough (and
# the window's max(0, s - 5) never cuts a match).
_NANP_CC_REVERSED = re.compile(r"[ .\-]?([0-9]{1,3}\+?)(?![0-9+])")


def _nanp_cc(t: str, s: int) -> tuple[int, str] | None:
    """(start, group 1) of _NANP_CC.match(t, max(0, s - 5), s), without `regex`'s reverse
    matching. Checked against it on every string of 7 characters over the alphabet that
    matters (tests/masking/test_differential_numeric.py)."""
    lo = max(0, s - 7)
    # (on the reversed str: every character it reads is ASCII or refused as any other)
    m = _NANP_CC_REVERSED.match(t[lo:s][::-1])
    if m is None:
        return None
    start = s - m.end()
    return start, t[start:s - m.start(1)]


def _cc_len(p: str) -> int:
    cc = _cc_of(p)
    return 0 if cc is None else len(cc)


# the length of _cc_of(d) by d[:3] (every string of 1-3 digits), 0 for none
_CC_LEN: dict[bytes, int] = {p.encode("ascii"): _cc_len(p) for k in (1, 2, 3)
                             for p in (str(i).zfill(k) for i in range(10 ** k))}


def _intl_ok_b(d: bytes) -> bool | None:
    """One step of _intl_span_raw on the digits of a prefix: True (a number), False (try a
    shorter prefix), None (no country code: give up)."""
    cc = _CC_LEN.get(d[:3], 0)
    if not cc:
        return None
    if cc == 1 and d[0] == 49:  # '1': NANP
        return len(d) == 11 and _nanp_ok_b(d[1:])
    return 8 <= len(d) <= 15 and len(d) - cc >= 6


def _intl_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    text = m.group(0)
    if not text.isascii():
        return _intl_span(m, t)
    tb = text.encode("ascii")
    s = m.start()
    ok = _intl_ok_b(tb.translate(None, _NOT_DIGIT))
    end = len(tb)
    if ok is None:
        return None
    if not ok:
        # cut at group boundaries from the right (a non-digit other than ')' after a digit
        # or ')'), as _intl_span_raw does
        end = 0
        for i in range(len(tb) - 1, 0, -1):
            c, p = tb[i], tb[i - 1]
            if not 48 <= c <= 57 and c != 41 and (48 <= p <= 57 or p == 41):
                ok = _intl_ok_b(tb[:i].translate(None, _NOT_DIGIT))
                if ok is None:
                    return None
                if ok:
                    end = i
                    break
        if not end:
            return None
    if _exotic_b(tb[:end]) and not _isolated(t, s, s + end):
        return None
    return s, s + end


def _trunk_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if not raw.isascii():
        return _trunk_span(m, t)
    rb = raw.encode("ascii")
    lens = [len(p) for p in rb.translate(_SEP_TO_SPACE).split()]
    if lens == [5, 4] and b"-" in rb:
        return None
    rest = lens[1:]
    if not (all(n >= 3 for n in rest) or (all(n == 2 for n in rest) and len(rest) >= 4)):
        return None
    if _exotic_b(rb) and not _isolated(t, *m.span()):
        return None
    return m.span() if 9 <= sum(lens) <= 11 else None


def _plain_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    raw = m.group(0)
    if not raw.isascii():
        return _plain_span(m, t)
    if _exotic_b(raw.encode("ascii")) and not _isolated(t, *m.span()):
        return None
    return m.span()


def _bare_span_fast(m: regex.Match, t: str) -> tuple[int, int] | None:
    if not _nanp_ok_b(m.group(0).encode("ascii")):  # ten ASCII digits by its pattern
        return None
    lo = max(0, m.start() - 30)
    return m.span() if _PHONE_WORDS.search(t, lo, m.start()) else None


# the fast engine's numeric detectors: the same patterns, entities, priorities and order.
# In a window that is ASCII (from two characters before it: the farthest any of their
# look-behinds reaches) the standard library's `re` runs the same pattern 2-4x faster per
# call than `regex`: on ASCII text the two engines agree on every construct these patterns
# use (fixed-width look-arounds, [\W_] and \w, greedy groups, endpos), which
# tests/masking/test_differential_numeric.py checks window by window.
def _fast(entity: str, pattern: regex.Pattern, span: SpanFn, priority: int,
          retry: Callable[[regex.Match], int] | None = None) -> _RegexDet:
    return _RegexDet(entity, pattern, span, priority, retry=retry,
                     ascii_pattern=re.compile(pattern.pattern))


_NUMERIC_FAST: dict[_RegexDet, _RegexDet] = dict(zip(_NUMERIC, (
    _fast("CREDIT_CARD", _CARD, _card_span_fast, 50, retry=_card_retry_fast),
    _fast("US_SSN", _SSN, _ssn_span_fast, 40),
    _fast("PHONE", _PHONE_NANP, _nanp_span_fast, 30),
    _fast("PHONE", _PHONE_INTL, _intl_span_fast, 30),
    _fast("PHONE", _PHONE_TRUNK, _trunk_span_fast, 30),
    _fast("PHONE", _PHONE_CN, _plain_span_fast, 30),
    _fast("PHONE", _PHONE_BARE, _bare_span_fast, 30),
), strict=True))


_IBAN_DET = _RegexDet("IBAN", _IBAN, _iban_span, 45, retry=lambda m: m.start() + 1)


def _iban_lower_span(m: regex.Match, t: str) -> tuple[int, int] | None:
    # re-run the upper-case logic on the match extended by its two letters
    start = m.start() - 2
    m2 = _IBAN_ANY.match(t, start)
    if m2 is None:
        return None
    return _iban_span(m2, t)


_IBAN_ANY = _c(r"[A-Za-z]{2}[0-9]{2}(?:[A-Za-z0-9]{11,30}(?![A-Za-z0-9])"
               r"|" + _IBAN_GROUPS + ")")
_IBAN_LOWER_DET = _RegexDet("IBAN", _IBAN_LOWER, _iban_lower_span, 45,
                            retry=lambda m: m.start() + 1)
# the shortest value these detectors accept has 9 digits (SSN, national phone numbers), so
# dates and prices never qualify
_NUM_CLUSTER = _c(r"[0-9](?:[\W_]{0,3}[0-9]){8,}")
# a cluster read backwards from one of its digits: digits with at most three separators
# between neighbours, as far left as they go (the cluster's start)
_CHAIN_BACK = _c(r"(?r)(?:[0-9][\W_]{0,3})*[0-9]")
# the same on ASCII text for `re`: the cluster pattern, and the chain read forwards in the
# text's reversed bytes ([\W_] is [^A-Za-z0-9] there). Possessive separators and repeats
# (`re` backtracks into neither, ~40% cheaper per call): the same matches, as giving back
# a separator leaves a separator where a digit must follow, and nothing follows the repeat
_NUM_CLUSTER_ASCII = re.compile(r"[0-9](?:[\W_]{0,3}+[0-9]){8,}+")
_CHAIN_REVERSED = re.compile(rb"[0-9](?:[^A-Za-z0-9]{0,3}+[0-9])*+")


# A cluster that is exactly '1', then groups of 3, 3 and 4 digits each after one space,
# dash or dot, with a '+' just before it ('+1 415 555 0132', the usual way a US number is
# written in international form): the international detector finds nothing there that
# the NANP detector does not find too, so it is not run (one validation per number
# instead of two). Why, with p the '+' and s = p + 1 the cluster's start: the cluster
# ends at its last digit, so in the window [s - 2, end + 3) _PHONE_INTL can match only at
# p, and only when t[p - 1] is neither a word character nor '+'; it matches the whole
# cluster, and _intl_span gives (p, end) — cc '1', 11 digits, _nanp_ok of the last 10 —
# or None ('+' is exotic: None when t[p - 2] is a digit and t[p - 1] a separator other
# than a space; nothing after the end can make it not isolated, or the cluster would go
# on). _PHONE_NANP matches the last 10 digits there, and _nanp_span gives None when
# _nanp_ok fails (then so does _intl_span), else reads the country code back: '+1' when
# t[p - 1] is not a digit or '+' (always so when _PHONE_INTL matched: a word character
# or '+' failed it first), so (p, end): the same span, entity and priority, a duplicate
# that resolution drops. tests/masking/test_differential_numeric.py runs both engines on
# such numbers with every kind of character around them.
_PLUS1 = re.compile(r"1[ .\-][0-9]{3}[ .\-][0-9]{3}[ .\-][0-9]{4}")


def _run(d: _RegexDet, t: str, pos: int, endpos: int, out: list) -> None:
    search = d.pattern.search
    while True:
        m = search(t, pos, endpos)
        if m is None:
            return
        span = d.span(m, t) if d.span is not None else m.span()
        if span is not None:
            out.append((span[0], span[1], d.entity, d.priority))
            pos = max(span[1], m.start() + 1)
        else:
            pos = max(d.retry(m) if d.retry else m.end(), m.start() + 1)


# no numeric finding is shorter (an SSN or '+' and 8 digits); each lies in its match
_NUM_MIN_MATCH = 9


def _run_fast(d: _RegexDet, t: str, pos: int, endpos: int, out: list,
              ascii_window: bool = False) -> None:
    """_run for the fast engine's numeric detectors: the same findings, without the last
    search once fewer characters are left than any finding needs. `ascii_window`: t[pos -
    2:endpos] is ASCII, run the `re` pattern."""
    search = (d.ascii_pattern if ascii_window and d.ascii_pattern else d.pattern).search
    span_of = d.span
    while endpos - pos >= _NUM_MIN_MATCH:
        m = search(t, pos, endpos)
        if m is None:
            return
        span = span_of(m, t)
        if span is not None:
            out.append((span[0], span[1], d.entity, d.priority))
            pos = max(span[1], m.start() + 1)
        else:
            pos = max(d.retry(m) if d.retry else m.end(), m.start() + 1)


def _ascii_window(t: str, lo: int, hi: int) -> bool:
    """The numeric detectors' look-behinds reach at most two characters before a match."""
    return t[max(0, lo - 2):hi].isascii()


# Every built-in value contains a digit, '@', ':', '_', '/', '+', '=' (a password
# assignment), an escape or a non-ASCII character (before normalisation), or one of the
# secrets' literals: a short string with
# none of them (most JSON fields: roles, model names, plain words) is answered at once.
_MAYBE = _c(r"[0-9@:_/+=%\\&\x80-\U0010FFFF]|sk-|AKIA|ASIA|ABIA|ACCA|A3T|xox|xapp|AIza|pplx-|"
            r"ABSK|eyJ|bedrock-|-----BEGIN|glpat-|pypi-|SG\.")
_QUICK_LEN = 256
# what DetectorSet.plain_word vouches for: letters and '_' only (no digit: see there)
_PLAIN_WORD = _c(r"[A-Za-z_]+")
# characters from rare to common in English text and code (letters by frequency)
_RARITY = "_J`QZXKV|~^$#@=-BPYG/FWMUCLDRHSNIOATjqzxkvbpygfwmucldrhsnioate."


def _rarest(literal: str) -> str:
    return min(literal, key=lambda c: _RARITY.find(c) if c in _RARITY else -1)


# below this length, `in` tests of a rule's literals are cheaper than starting its scan
_SHORT_TEXT = 16384

# longest span per built-in entity, in normalised characters
_MAX_LEN: dict[str, int] = {
    "EMAIL": 64 + 1 + 255, "PHONE": 32, "US_SSN": 11, "CREDIT_CARD": 19 + 18, "IBAN": 34 + 8,
    "IP_ADDRESS": 45 + 17 + 4, "AWS_SECRET_KEY": 40, "PASSWORD": 256, "BEARER_TOKEN": 4100,
}
for _r in SECRET_RULES:
    _MAX_LEN[_r.entity] = max(_MAX_LEN.get(_r.entity, 0), _r.max_len)
# an escape (\uXXXX, 6 chars) can stand for each normalised character
_ESCAPE_WIDTH = 6
_PII_ENTITIES = frozenset(("EMAIL", "PHONE", "US_SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS"))
# left context worth carrying in a stream: word boundaries and the AWS secret's keyword
CONTEXT_LEN = AWS_SECRET_WINDOW + 16

# a token may be as long as the longest whitespace-free match (a JWT); PEM blocks, the only
# long matches with whitespace inside, are handled on their own
_TOKEN_MAX = max(r.max_len for r in SECRET_RULES if r.entity != "PRIVATE_KEY")
_HOLD_TOKEN = _c(r"(?r)\S{1,N}".replace("N", str(_TOKEN_MAX)))
# short groups of digits / capitals (any script's digits, full-width forms, invisible
# characters inside) with a separator (any non-alphanumeric character, as SEP):
# "4111 1111 ", "4111,1111/", "+44 (20) ", "DE89 3704 ", "078 05 "
_G = r"\dA-Z\uFF10-\uFF19\uFF21-\uFF3A"
# ... each character may be written as an escape normalize undoes (`\u0034`, `%34`, `&#52;`,
# a UTF-8 character as two to four `%XX`): "%34%31%31%31 %31%31…" is a card as well
# (atomic, escapes first: read backwards, the '1' of '%31' must not be a unit of its own)
_GU = (r"(?>\\u[0-9A-Fa-f]{4}|%[C-Fc-f][0-9A-Fa-f](?:%[89ABab][0-9A-Fa-f]){1,3}|"
       r"%[0-9A-Fa-f]{2}|&#(?:[xX][0-9A-Fa-f]{1,6}|[0-9]{1,7});|"
       r"[" + _G + r"])")
_HOLD_GROUPS = _c(r"(?r)(?:[+(]?" + _GU + r"(?:" + _GU + r"|[)\u200b-\u200d\u2060\ufeff"
                  r"\u00ad]){0,12}[\W_]){1,12}")
# how far before the last token the groups are looked for: 12 groups of 13 characters,
# each written as an escape of up to 12 characters (a 4-byte UTF-8 character as %XX)
_HOLD_GROUPS_REACH = 12 * 14 * 12
_PEM_OPEN = "-----BEGIN "
_PEM_CLOSE = _c(r"-----END [A-Z0-9 ]{1,40}-----")


@dataclass(frozen=True, slots=True)
class _Custom:
    entity: str
    pattern: regex.Pattern
    validator: str
    context: tuple[str, ...]
    window: int
    max_length: int


class DetectorSet:
    """All enabled detectors of a masking config, compiled once; `find` is thread-safe."""

    def __init__(self, config: MaskingConfig | None = None, *,
                 fast: bool | None = None) -> None:
        """`fast=False` is the reference engine (no prefilter): same findings, slower.
        `fast=True` compiles the Hyperscan prefilter now if this process has not yet (~0.3 s).
        The default does that too, except on a thread running an asyncio event loop (the
        gateway's hooks): there it compiles in a background thread and this set runs the
        reference engine until the prefilter is ready — the loop never waits for it."""
        self.config = config or MaskingConfig()
        enabled = set(self.config.enabled_builtins())
        self._enabled = frozenset(enabled)
        self._numeric = tuple(d for d in _NUMERIC if d.entity in enabled)
        # the fast engine's versions of them, with their prefilter anchors' names
        self._numeric_fast = tuple((_NUMERIC_FAST[d], _NUMERIC_NAMES[d]) for d in self._numeric)
        # _numeric_at's per-prefilter set-up: (code_of, intl, both, detectors by anchor
        # mask, (detector, bit) pairs)
        self._num_plan: tuple | None = None
        self._iban = "IBAN" in enabled
        self._ip = "IP_ADDRESS" in enabled
        self._secrets = tuple(r for r in SECRET_RULES if r.entity in enabled)
        # short texts: rules grouped by gate literal; long texts: every rule, except those
        # whose regex is slow without its literal (always_gate), which keep an `in` test
        self._ungated = tuple(r for r in self._secrets if not r.literals)
        by_lit: dict[str, list[SecretRule]] = {}
        for r in self._secrets:
            for lit in r.literals:
                by_lit.setdefault(lit, []).append(r)
        self._by_literal = tuple((_rarest(lit), lit, tuple(rs)) for lit, rs in by_lit.items())
        self._long_rules_all = tuple(r for r in self._secrets if not r.always_gate)
        self._long_gated = tuple(r for r in self._secrets if r.always_gate)
        self._email = "EMAIL" in enabled
        self._aws_secret = "AWS_SECRET_KEY" in enabled
        self._password = "PASSWORD" in enabled
        self._bearer = "BEARER_TOKEN" in enabled
        self._custom = tuple(
            _Custom(c.name,
                    regex.compile(c.pattern, regex.V0 | (regex.IGNORECASE if c.ignore_case
                                                         else 0)),
                    c.validator, c.context, c.context_window, c.max_length)
            for c in self.config.custom if c.enabled)
        self._allow = tuple(regex.compile(p) for p in self.config.allow)
        # max_len: PII values may be written with an escape per character (\u0034 is six
        # characters for one digit), so they count six-fold; secrets count as written. The
        # bound is the PEM block: 32 KiB of body plus header and footer.
        lens = [_MAX_LEN[e] * (_ESCAPE_WIDTH if e in _PII_ENTITIES else 1) for e in enabled]
        lens += [c.max_length * _ESCAPE_WIDTH for c in self._custom]
        self.max_len: int = max(lens, default=0)
        self.context_len: int = CONTEXT_LEN * _ESCAPE_WIDTH
        # Put between two texts, this makes find(a + sep + b) find(a)'s findings, then
        # find(b)'s moved by len(a + sep) (bodies.Masked._detect: one call for a body's two
        # passes, whose fixed cost per call is most of a short body's). No built-in looks
        # further back than context_len (the left context a stream keeps) or matches across
        # a blank line, save a private-key block (up to 32 KiB, blank lines included, to its
        # END line); a block ends before the next BEGIN line (secret_rules.pem_end), so a
        # BEGIN line in the middle stops one from `a` where `a` ends, as at a text's end.
        # None with custom detectors: their patterns and context windows may reach anywhere.
        pad = "\n" * (self.context_len + 2)
        self._breaks = None if self._custom else (pad, pad + "-----BEGIN \n" + pad)
        self._pem_hold = min(self.max_len, _MAX_LEN["PRIVATE_KEY"])
        # a custom match may be confirmed by a context word up to `window` characters after it
        self._custom_hold = max((c.max_length + (c.window if c.context else 0)
                                 for c in self._custom), default=0)
        self._strategies = {e: self.config.strategy_for(e) for e in enabled}
        for c in self._custom:
            self._strategies[c.entity] = self.config.strategy_for(c.entity)
        # the prefilter (fastscan): secret rules in the order the long-text path runs them
        self._secret_fams = tuple(
            (fastscan.secret_family((r.entity, r.literals)), r)
            for r in self._long_rules_all + self._long_gated)
        self._pre: fastscan.Prefilter | None = None
        self._pre_key: fastscan.PrefilterKey | None = None
        if fast is not False and self.config.enabled:
            # every anchor whatever the config (the families turned off are never looked
            # up): one compiled prefilter per process, shared by every DetectorSet
            args = (("email", "aws_word", "bearer", "ipv6"),
                    [(r.entity, r.literals) for r in SECRET_RULES],
                    ("pw_op", "pw_url", "ipv4", "iban"), tuple(_NUMERIC_NAMES.values()))
            self._pre_key = fastscan.prefilter_key(*args)
            self._pre = fastscan.Prefilter.create(
                *args, wait=fast is True or not _on_event_loop())

    @property
    def digits_alone_min(self) -> int:
        """The fewest ASCII digits a text of digits alone (between line breaks) must have
        for any detector of this set to find something in it: 9 for the built-ins (the
        numeric detectors' shortest value is an SSN's nine digits; every other built-in
        needs a letter, '@', '.', ':' or 40 characters), 0 with custom detectors (their
        patterns may match any digits). The cross-field pass leaves shorter runs of digits
        out (bodies._cross_findings)."""
        return 0 if self._custom else _NUM_MIN_MATCH

    def isolating_break(self, a: str) -> str | None:
        """A separator that keeps `a` and any text after it apart in one find() call:
        find(a + sep + b) is find(a)'s findings, then find(b)'s moved by len(a + sep)
        (bodies.Masked._detect: a short body's two passes in one call, whose fixed cost
        is most of theirs). No built-in looks further back than context_len (what a
        stream keeps as left context) or matches across a blank line, save a private-key
        block (up to 32 KiB, blank lines included, to its END line); a block ends before
        the next BEGIN line (secret_rules.pem_end), so when `a` may hold one (after
        normalising) a BEGIN line in the middle stops it where `a` ends, as at a text's
        end. None with custom detectors: their patterns and context windows may reach
        anywhere."""
        if self._breaks is None:
            return None
        plain, stop = self._breaks
        return plain if untouched(a) and "-----BEGIN " not in a else stop

    def plain_word(self, text: str) -> bool:
        """Does find() provably find nothing in `text` (letters and '_' only) wherever it
        stands between two slot breaks of a body, whatever the slots around it hold? Then a
        JSON key need not be one of the slots (bodies._Slots). Asked of find() itself:
        every built-in reads a value and at most the character on each side of it (a line
        break there, or the edge of `text` here: neither is a token character), save the
        AWS secret key, confirmed by a context word before it, whose 40 characters hold
        digits (aws_secret_ok): never such a text. False with custom detectors: their
        patterns and context windows may read anything."""
        return not self._custom and _PLAIN_WORD.fullmatch(text) is not None and \
            not self.find(text)

    @property
    def fast(self) -> bool:
        """True when the Hyperscan prefilter is in use (now)."""
        return self._prefilter() is not None

    def _prefilter(self) -> fastscan.Prefilter | None:
        pre = self._pre
        if pre is None and self._pre_key is not None:
            # compiled in the background since: use it from now on
            pre = self._pre = fastscan.cached(self._pre_key)
        return pre

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(self._strategies)

    def strategy_for(self, entity: str) -> str:
        return self._strategies.get(entity) or self.config.strategy_for(entity)

    # ------------------------------------------------------------------ detection
    def find(self, text: str) -> list[Finding]:
        if not text or not self.config.enabled:
            return []
        if len(text) < _QUICK_LEN and not self._custom and _MAYBE.search(text) is None:
            return []  # e.g. "assistant", "gpt-4o-mini", "Hello, how are you?"
        norm = normalize(text)
        t = norm.text if norm is not None else text
        cands = self._candidates(t)
        if not cands:
            return []
        chosen = _resolve(cands)
        if norm is None and not self._allow:
            # (_finding inlined: a body may hold thousands)
            found: list[Finding] = []
            new, add = _new_finding, found.append
            for s, e, entity in chosen:
                f = new(Finding)
                _set_entity(f, entity)
                _set_start(f, s)
                _set_end(f, e)
                _set_value(f, text[s:e])
                add(f)
            return found
        out: list[Finding] = []
        for s, e, entity in chosen:
            if norm is not None:
                s, e = norm.span(s, e)
            value = text[s:e]
            if self._allow and any(a.fullmatch(value) for a in self._allow):
                continue
            out.append(Finding(entity, s, e, value))
        return out

    def _candidates(self, t: str) -> list[tuple[int, int, str, int]]:
        pre = self._prefilter()
        if pre is not None:  # (faster from the shortest texts on: 0.8 us per word)
            return self._candidates_fast(t, pre)
        out: list[tuple[int, int, str, int]] = []
        if len(t) < _SHORT_TEXT:
            # one `in` test per distinct literal, then only the rules it gates
            rules: list[SecretRule] = list(self._ungated)
            for rare, lit, group in self._by_literal:
                # a one-character test (memchr speed) before the literal itself
                if rare in t and lit in t:
                    rules.extend(r for r in group if r not in rules)
        else:
            rules = list(self._long_rules_all)
            rules.extend(r for r in self._long_gated if any(lit in t for lit in r.literals))
        for r in rules:
            if r.entity == "PRIVATE_KEY":
                _find_pem(r, t, out)
                continue
            has_pre = "pre" in r.pattern.groupindex
            for m in r.pattern.finditer(t):
                if r.check is None or r.check(m):
                    start = m.start("pre") if has_pre and m.start("pre") >= 0 else m.start()
                    out.append((start, m.end(), r.entity, r.priority))
        low: str | None = None
        if self._aws_secret or self._bearer or self._password:
            low = t.lower()
            if len(low) != len(t):
                low = None
        if self._aws_secret:
            self._find_aws_secret(t, low, out)
        if self._password:
            _find_passwords(t, low, out)
        if self._bearer:
            _find_bearer(t, low, out)
        if self._email and "@" in t:
            _find_emails(t, out)
        if self._iban:
            _run(_IBAN_DET, t, 0, len(t), out)
            _run(_IBAN_LOWER_DET, t, 0, len(t), out)
        if self._numeric:
            n = len(t)
            for cm in _NUM_CLUSTER.finditer(t):
                s, e = cm.span()
                # a '+' or '(' just before the cluster belongs to it; the lookarounds of the
                # detectors see outside the window, and endpos leaves room for look-aheads
                lo, hi = max(0, s - 2), min(n, e + 3)
                for d in self._numeric:
                    _run(d, t, lo, hi, out)
        if self._ip:
            if "." in t:
                _find_ipv4(t, out)
            if ":" in t:
                _find_ipv6(t, out)
        for c in self._custom:
            self._find_custom(c, t, out)
        return out

    def _candidates_fast(self, t: str, pre: fastscan.Prefilter) -> list[
            tuple[int, int, str, int]]:
        """The reference detectors, run only where the prefilter saw their anchors: the same
        calls as `_candidates` in the same order, over the whole text or restricted to the
        places where a match can start, so the findings are the same."""
        out: list[tuple[int, int, str, int]] = []
        data = fastscan.to_bytes(t)
        present, pos = pre.scan(data)  # pos None: too many anchors, whole-text paths
        for fam, r in self._secret_fams:
            if fam not in present:
                continue
            if r.entity == "PRIVATE_KEY":
                _find_pem(r, t, out)
                continue
            has_pre = "pre" in r.pattern.groupindex
            for m in r.pattern.finditer(t):
                if r.check is None or r.check(m):
                    start = m.start("pre") if has_pre and m.start("pre") >= 0 else m.start()
                    out.append((start, m.end(), r.entity, r.priority))
        aws = self._aws_secret and "aws_word" in present
        pw_url = self._password and "pw_url" in present
        pw_assign = self._password and "pw_op" in present
        bearer = self._bearer and "bearer" in present
        low: str | None = None
        if aws or (pw_assign and pos is None) or bearer:
            low = t.lower()
            if len(low) != len(t):
                low = None
        if aws:
            self._find_aws_secret(t, low, out)
        if pw_url and pos is not None:
            _find_url_passwords(t, pos["pw_url"], out)
        elif pw_url:
            _find_passwords(t, low, out, url=True, assign=False)
        if pw_assign and pos is not None:
            _find_assignments_at(t, pos["pw_op"], out)
        elif pw_assign:
            _find_passwords(t, low, out, url=False, assign=True)
        if bearer:
            _find_bearer(t, low, out)
        # ASCII text (the usual case; O(1) to ask): the e-mail and cluster scans run on `re`
        # over the text and its reversed bytes (reading backwards without `regex`'s (?r))
        rev = data[::-1] if t.isascii() and (
            (self._email and "email" in present) or (self._numeric and "num" in present)) \
            else None
        if self._email and "email" in present:
            # (an '@' every few characters, 'a@a@…': regex's one scan is cheaper per '@')
            # count * _EMAIL_DENSE < len(t)  <=>  count <= (len(t) - 1) // _EMAIL_DENSE
            if rev is None or not _find_emails_ascii(t, rev, out,
                                                     (len(t) - 1) // _EMAIL_DENSE):
                _find_emails(t, out)
        n = len(t)
        if self._iban and "iban" in present:
            if pos is None:
                _run(_IBAN_DET, t, 0, n, out)
                _run(_IBAN_LOWER_DET, t, 0, n, out)
            else:
                # merged windows, each reaching IBAN_WINDOW past every start inside it: a
                # match starts at a candidate and ends (look-ahead included) inside its window
                wins = _windows([e - 4 for e in pos["iban"]], 0, fastscan.IBAN_WINDOW, n)
                for d in (_IBAN_DET, _IBAN_LOWER_DET):
                    for lo, hi in wins:
                        _run(d, t, lo, hi, out)
        if self._numeric and "num" in present:
            if pos is None:
                ascii_text = t.isascii()
                for cm in _NUM_CLUSTER.finditer(t):
                    s, e = cm.span()
                    lo, hi = max(0, s - 2), min(n, e + 3)
                    asc = ascii_text or _ascii_window(t, lo, hi)
                    for d, _ in self._numeric_fast:
                        _run_fast(d, t, lo, hi, out, asc)
            else:
                self._numeric_at(t, rev, pos["num"], pre.numeric_codes, out)
        if self._ip and "ipv4" in present:
            if pos is None:
                _find_ipv4(t, out)
            else:
                # a trigger is at most 15 characters and ends where its anchor does
                _find_ipv4(t, out, _windows(pos["ipv4"], 15, 0, n))
        if self._ip and "ipv6" in present:
            _find_ipv6(t, out)
        for c in self._custom:
            self._find_custom(c, t, out)
        return out

    def _numeric_at(self, t: str, rev: bytes | None, codes: list[int],
                    code_of: dict[str, int], out: list) -> None:
        """The numeric detectors in the 9-digit clusters that hold a numeric anchor (codes:
        sorted `end << 3 | detector code` from the prefilter), each cluster running only the
        detectors with an anchor ending inside it — a finding holds its detector's anchor,
        and its digits are the cluster's. The same clusters and windows as the reference's
        _NUM_CLUSTER.finditer: a cluster is found back from any of its digits (`rev`: the
        reversed bytes of an ASCII text, read by `re`; else `regex` reads backwards)."""
        plan = self._num_plan
        if plan is None or plan[0] is not code_of:
            # (worked out once per prefilter, not per text: a short text pays it whole)
            dets = [(d, 1 << code_of[name]) for d, name in self._numeric_fast]
            names = {name for _, name in self._numeric_fast}
            # a '+1 NNN NNN NNNN' cluster: the international detector only when the NANP
            # one does not run there (see _PLUS1)
            intl = 1 << code_of["intl"] if {"nanp", "intl"} <= names else 0
            plan = self._num_plan = (code_of, intl, (intl | 1 << code_of["nanp"]) if intl
                                     else -1, {}, dets)
        _, intl, both, by_mask, dets = plan
        plus1 = _PLUS1.fullmatch
        n = len(t)
        i, count = 0, len(codes)
        ascii_text = rev is not None
        chain_back, cluster = _CHAIN_BACK.match, _NUM_CLUSTER.match
        chain_rev, cluster_ascii = _CHAIN_REVERSED.match, _NUM_CLUSTER_ASCII.match
        while i < count:
            e = codes[i] >> 3  # t[e - 1] is a digit: every anchor ends with one
            if rev is not None:
                r = chain_rev(rev, n - e)
                cm = cluster_ascii(t, n - r.end()) if r is not None else None
            else:
                b = chain_back(t, 0, e)
                cm = cluster(t, b.start()) if b is not None else None
            if cm is None:  # that digit is in no cluster of 9 digits
                i += 1
                continue
            s, ce = cm.span()
            mask = 0
            while i < count and codes[i] >> 3 <= ce:  # the anchors ending in this cluster
                mask |= 1 << (codes[i] & 7)
                i += 1
            if mask & both == both and s and t[s - 1] == "+" and plus1(t, s, ce):
                mask ^= intl
            lo, hi = max(0, s - 2), min(n, ce + 3)
            asc = ascii_text or _ascii_window(t, lo, hi)
            run = by_mask.get(mask)
            if run is None:  # the detectors of these anchors, in the engines' order
                run = by_mask[mask] = tuple(d for d, bit in dets if mask & bit)
            for d in run:
                _run_fast(d, t, lo, hi, out, asc)

    @staticmethod
    def _find_aws_secret(t: str, low: str | None, out: list) -> None:
        words = AWS_SECRET_WORDS[::3]
        if low is None:  # lower-casing changed lengths: look for the usual casings
            low, words = t, AWS_SECRET_WORDS
        ends: list[int] = []
        for word in words:
            i = low.find(word)
            while i != -1:
                ends.append(i + len(word))
                i = low.find(word, i + 1)
        if not ends:
            return
        ends.sort()
        # scan the union of the windows after each word once (a body of 'aws aws aws …'
        # stays linear); a key counts when a word ends at most WINDOW characters before it
        n = len(t)
        lo, hi = ends[0], min(n, ends[0] + AWS_SECRET_WINDOW + 41)
        spans: list[tuple[int, int]] = []
        for e in ends[1:]:
            if e <= hi:
                hi = min(n, e + AWS_SECRET_WINDOW + 41)
            else:
                spans.append((lo, hi))
                lo, hi = e, min(n, e + AWS_SECRET_WINDOW + 41)
        spans.append((lo, hi))
        for lo, hi in spans:
            for m in AWS_SECRET.finditer(t, lo, hi):
                k = bisect_right(ends, m.start()) - 1
                if k >= 0 and m.start() - ends[k] <= AWS_SECRET_WINDOW and \
                        aws_secret_ok(m.group(0)):
                    out.append((m.start(), m.end(), "AWS_SECRET_KEY", 60))

    @staticmethod
    def _find_custom(c: _Custom, t: str, out: list) -> None:
        for m in c.pattern.finditer(t):
            s, e = m.span()
            if e - s > c.max_length or e == s:
                continue
            v = m.group(0)
            if c.validator == "luhn":
                d = _digits(v)
                if len(d) < 2 or not luhn_ok(d):
                    continue
            elif c.validator == "mod97":
                compact = "".join(ch for ch in v if ch.isalnum()).upper()
                if len(compact) < 5 or not mod97_ok(compact):
                    continue
            if c.context:
                around = t[max(0, s - c.window): e + c.window].lower()
                if not any(w in around for w in c.context):
                    continue
            out.append((s, e, c.entity, 70))

    # ------------------------------------------------------------------ streaming
    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` a match could still extend into.

        A stream masker emits (masked) `text[:len(text) - holdback(text)]` and keeps the rest
        for the next chunk; a finding that starts in the emitted part is final. The tail is:
        an open `-----BEGIN … PRIVATE KEY-----` block (from its BEGIN), else the last
        whitespace-free token plus the short digit/capital groups before it ("4111 1111 ",
        "+44 (20) "), plus — with custom detectors — their longest `max_length`.
        Always <= max_len; in prose it is the length of the word being written.
        """
        n = len(text)
        if n == 0:
            return 0
        keep = 0
        if "PRIVATE_KEY" in self._enabled:
            # walk BEGIN … END pairs; the first BEGIN without an END is still open
            i = text.find(_PEM_OPEN, max(0, n - self._pem_hold))
            while i != -1:
                close = _PEM_CLOSE.search(text, i + len(_PEM_OPEN))
                if close is None:
                    keep = n - i
                    break
                i = text.find(_PEM_OPEN, close.end())
        tm = _HOLD_TOKEN.match(text, max(0, n - _TOKEN_MAX * 2), n)
        start = tm.start() if tm is not None else n
        gm = _HOLD_GROUPS.match(text, max(0, start - _HOLD_GROUPS_REACH), start)
        if gm is not None:
            start = gm.start()
        keep = max(keep, n - start, self._custom_hold)
        return min(keep, self.max_len, n)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _resolve(cands: list[tuple[int, int, str, int]]) -> list[tuple[int, int, str]]:
    """Non-overlapping subset: longer first, then higher priority, then earlier."""
    fast = _resolve_disjoint(cands)
    return fast if fast is not None else _resolve_overlapping(cands)


def _resolve_overlapping(cands: list[tuple[int, int, str, int]]) -> list[
        tuple[int, int, str]]:
    cands.sort(key=lambda c: (c[0] - c[1], -c[3], c[0]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[tuple[int, int, str]] = []
    for s, e, entity, _ in cands:
        i = bisect_left(starts, s)
        if i > 0 and ends[i - 1] > s:
            continue
        if i < len(starts) and starts[i] < e:
            continue
        starts.insert(i, s)
        ends.insert(i, e)
        kept.append((s, e, entity))
    kept.sort()
    return kept


_BY_SPAN = itemgetter(0, 1)


def _resolve_disjoint(cands: list[tuple[int, int, str, int]]) -> list[
        tuple[int, int, str]] | None:
    """_resolve's answer when no two different spans overlap (the usual case: the PII of a
    text lies apart), else None. Then every span is kept, each with the entity _resolve
    picks among the candidates of exactly that span: the highest priority, the first
    found among equals (its sort is stable)."""
    ordered = sorted(cands, key=_BY_SPAN)  # stable: same spans keep the order found
    kept: list[tuple[int, int, str]] = []
    last_s = last_e = -1
    best = -1
    for s, e, entity, prio in ordered:
        if s == last_s and e == last_e:
            if prio > best:
                kept[-1] = (s, e, entity)
                best = prio
            continue
        if s < last_e or s >= e:
            return None  # an overlap (or an empty span): the general resolution
        kept.append((s, e, entity))
        last_s, last_e, best = s, e, prio
    return kept


# One synthetic value per entity that the detector catches (use them in tests; none is real).
SAMPLES: dict[str, str] = {
    "EMAIL": "jane.doe@example.com",
    "PHONE": "+1 415 555 0132",
    "US_SSN": "078-05-1123",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "IBAN": "DE89 3704 0044 0532 0130 00",
    "IP_ADDRESS": "192.168.1.20",
    "OPENAI_KEY": "sk-proj-Xi8tcNiHV9awbCcvilTeT3BlbkFJ3UDnpdEwNNm6wVBpYM0o",
    "ANTHROPIC_KEY": "sk-ant-api03-PQ9rw0sES2RBc9jpkVTlqV5opMGtKfmhRHuwbokZXpEDUsQnOUq03n04T4jYn"
                     "WKwdpCTTYVAANH-Qn7rm8cDo6_FqkWhAAA",
    "ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-PQ9rw0sES2RBc9jpkVTlqV5opMGtKfmhRHuwbokZXpEDUsQnOUq03"
                           "n04T4jYnWKwdpCTTYVAANH-Qn7rm8cDo6_FqkWhAAA",
    "AWS_ACCESS_KEY": "AKIAST6ZN3J5ZSABAZLX",
    "AWS_SECRET_KEY": "aws_secret_access_key = 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",
    "AWS_BEDROCK_KEY": "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29t",
    "GITHUB_TOKEN": "ghp_5ytzwHhANLUH8nLYuJoEoxq0bUfEJ0dpayuX",
    "SLACK_TOKEN": "xoxb-781236542736-2364535789652-GkwFDQoHqzXDVsC6GzqYUypD",
    "SLACK_WEBHOOK": "https://hooks.slack.com/services/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",
    "GOOGLE_API_KEY": "AIza54D-5PNH4pfEQfL9I8dcQJF8MjwAQwplbi-",
    "HUGGINGFACE_TOKEN": "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",
    "PERPLEXITY_KEY": "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",
    # synthetic, truncated (not a usable key); header split so repository key scanners stay quiet
    "PRIVATE_KEY": "-----BEGIN " "PRIVATE KEY-----\n"
                   "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ"
                   "DAC4AWkdwKYSd8\nKs14IReLcYgADhoXk56ZzXI=\n-----END PRIVATE KEY-----",
    "JWT": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9"
           "lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    "STRIPE_KEY": "sk_test_ZI3Kz4JToTVFincwL746OJs4",
    "GITLAB_TOKEN": "glpat-D6VvOLHNIgWB980vzxNI",
    "NPM_TOKEN": "npm_GPl6ArRp9vhZUbrs3HpA0Aylwe8WfMMsEqtN",
    "PYPI_TOKEN": "pypi-AgEIcHlwaS5vcmcddGz2zv25OWlepk4eCn0p0Xs1W2hjJTfipk_b1TStKIW6VIMDdSMbmKT"
                  "M-CS",
    "SENDGRID_KEY": "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",
}
# Entities found only with words around them: (text, the finding's value in it).
# AWS_SECRET_KEY is also in SAMPLES (as 'aws_secret_access_key = <value>').
CONTEXT_SAMPLES: dict[str, tuple[str, str]] = {
    "AWS_SECRET_KEY": (SAMPLES["AWS_SECRET_KEY"], "kW9pQ2xR7vT4mN8bZ3cF6hJ1sL5dG0yA/EuIoP+q"),
    "BEARER_TOKEN": ("Authorization: Bearer n49QVJ8ANmb4u9icuNiVGuZyJKhxgy9s",
                     "n49QVJ8ANmb4u9icuNiVGuZyJKhxgy9s"),
    "PASSWORD": ("postgres://app:S3cr3t-Pa55w0rd@db.internal:5432/prod", "S3cr3t-Pa55w0rd"),
}
