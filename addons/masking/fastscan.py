"""A Hyperscan prefilter for the detectors: one pass over the text says which detector
families can possibly match, and where the position-anchored ones may start. No mitmproxy.

The detectors (addons.masking.detectors) are the reference: a family this module says is
absent cannot match, so its regex scans are skipped; a family that is present runs its exact
`regex` detector and validators, over the whole text (secrets, e-mail, URL passwords, bearer
tokens, IPv6) or only near its anchors (IBAN starts, 9-digit clusters and the numeric
detectors inside them, IPv4 triggers, password operators). Each anchor below matches a
piece of everything its detector can find (a necessary substring, or a looser shape without
the look-arounds), so skipping never loses a finding; tests/masking/test_differential.py
checks that the fast and the reference engine agree on the corpus, the test suites' evasion
cases and random (hypothesis) text, and that a wrong anchor or window is caught.

Text is scanned as latin-1 bytes with every character above U+00FF replaced by '?': one byte
per character, so byte offsets are character offsets. All anchors are ASCII, and a replaced
character is never a letter or digit of an anchor, which keeps every anchor a superset
(a non-ASCII letter is a separator to these byte classes, as it is not to the detectors').

`hyperscan` (the python bindings, MIT, with Vectorscan — the BSD fork of Intel Hyperscan —
statically linked) is a runtime dependency; when it cannot be imported or cannot compile on
this CPU, `Prefilter.create()` returns None, says so once in the log, and the detectors run
unfiltered (the reference engine: same findings, slower).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from addons.masking.validators import IBAN_LENGTHS

log = logging.getLogger("agentgate.masking")

try:  # the wheel is binary: a platform without it still masks, with the reference engine
    import hyperscan as _hs
except ImportError:  # pragma: no cover - exercised when the wheel is missing
    _hs = None

__all__ = ["Prefilter", "AVAILABLE", "IBAN_WINDOW", "MAX_WINDOW_HITS", "SECRET_ANCHORS",
           "PRESENCE_ANCHORS", "POSITION_ANCHORS", "NUMERIC_ANCHORS", "to_bytes"]

AVAILABLE = _hs is not None

# Presence families (answer: occurs or not). Family names are what detectors.py asks for.
# Each pattern is a superset of what the family's detector needs to find anything.
PRESENCE_ANCHORS: dict[str, tuple[bytes, ...]] = {
    # _find_emails: the e-mail pattern starts at '@'
    "email": (rb"@",),
    # _find_aws_secret: a key counts only after one of AWS_SECRET_WORDS (any casing)
    "aws_word": (rb"(?i)aws", rb"(?i)secret"),
    # _find_bearer: the word, any casing
    "bearer": (rb"(?i)bearer",),
    # _find_ipv6's trigger: two colons with at most four hex digits between them
    "ipv6": (rb":[0-9A-Fa-f]{0,4}:",),
}
# Positional families: every end offset is reported, the detectors run near them only.
POSITION_ANCHORS: dict[str, tuple[bytes, ...]] = {
    # URL passwords (URL_PASSWORD): '://', a user of 1-64 characters without ':', '/',
    # '@', '#', '[', ']', quotes, '<', '>' or whitespace, then ':' (where the anchor ends;
    # one end per '://'). Not after most '://' of prose ('https://host/path': a '/' comes
    # first), so few callbacks. '?' stays in the class (every character above U+00FF is a
    # '?' here), and Hyperscan's \s-less class leaves in the Unicode spaces the regex's \s
    # refuses: a superset
    "pw_url": (rb"://[^\t\n\x0b\x0c\r :/@#\[\]\"'<>]{1,64}:",),
    # password assignments (PASSWORD_ASSIGNMENTS): a key word, then at most a few more
    # letters, two digits, a quote and blanks, then the '=' or ':' (where the anchor ends).
    # The assignments' (?i) also matches U+0130 'İ' for an 'i' (the one non-ASCII letter
    # that `regex` case-folds to ASCII and normalize leaves; here it is the byte '?')
    "pw_op": (rb"(?i)(?:pass|pwd|secret|token|key|credent[i?]al)[A-Za-z_\-]{0,8}[0-9]{0,2}"
              rb"[\"']?[ \t]*[=:]",),
    # _find_ipv4's trigger (digit.digit.digit.digit, at most 15 characters)
    "ipv4": (rb"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]",),
    # IBAN candidates (upper or lower case): a country code of the registry (_iban_span
    # refuses any other) not after a letter or digit, then two digits; the match starts 4
    # bytes before the reported end
    "iban": (rb"(?:^|[^A-Za-z0-9])(?:" + b"|".join(
        b"[%c%c][%c%c]" % (a, a + 32, b, b + 32) for a, b in sorted(
            cc.encode("ascii") for cc in IBAN_LENGTHS)) + rb")[0-9]{2}",),
}
# Secret rules by (entity, literals): anchors tighter than the rule's gate literal where
# the literal is common ('_' in code and JSON); otherwise the literals themselves.
SECRET_ANCHORS: dict[tuple[str, tuple[str, ...]], tuple[bytes, ...]] = {
    ("AWS_ACCESS_KEY", ()): (rb"A(?:KIA|SIA|BIA|CCA|3T)",),
    ("GITHUB_TOKEN", ("_",)): (rb"gh[pousr]_", rb"github_pat_"),
    ("HUGGINGFACE_TOKEN", ("_",)): (rb"hf_", rb"api_org_"),
    ("STRIPE_KEY", ("k_",)): (rb"[rs]k_(?:live|test)_",),
}
# The numeric detectors (detectors._NUMERIC, by name): a pattern that matches in every
# FINDING each can return (its validated span's text; at most its look-behind's character
# before it) and ends at a digit of it, and ends only a few times per number (each end is a
# Python callback). A 9-digit cluster runs only the detectors with an anchor ending inside
# it: a finding's digits are its cluster's (no finding holds a letter, and digits with at
# most three separators between them are one cluster). S is the detectors' SEP (one
# character that is not a letter or digit, or CRLF).
_S = rb"(?:\r\n|[^A-Za-z0-9])"
NUMERIC_ANCHORS: dict[str, bytes] = {
    # the first 13 digits of a card (13-19 digits, card_ok / _card_span), one separator
    # between groups
    # (from its first digit, which follows no letter or digit: the card pattern's
    # look-behind; one end per card, not one per digit from the 13th on)
    "card": rb"(?:^|[^A-Za-z0-9])[0-9](?:" + _S + rb"?[0-9]){12}",
    "ssn": rb"[0-9]{3}(?:[0-9]{6}|" + _S + rb"[0-9]{2}" + _S + rb"[0-9]{4}|-[0-9]{6})",
    # the finding may start earlier (a country code); it ends where the pattern does
    "nanp": rb"(?:[0-9]{3}" + _S + rb"|\([0-9]{3}\)" + _S + rb"?)[0-9]{3}" + _S + rb"[0-9]{4}",
    # '+' and the first 8 digits (_intl_span_raw wants 8-15 digits); between two digits at
    # most ')', a separator (CRLF: two) and '('
    "intl": rb"\+[1-9](?:[^A-Za-z0-9]{0,4}[0-9]){7}",
    # the trunk prefix where its pattern's first look-behind lets it start (not after a
    # word character, '+', '-' or '.': not inside an SSN '078-05-1123'), then what
    # _trunk_span wants after it: a group of 3+ digits, or four pairs (not a date's
    # '06-01'). (Its second look-behind, no digit and space before, as an alternative here
    # made this pattern 8x slower in Hyperscan.)
    "trunk": rb"(?:^|[^A-Za-z0-9_+\-.])0[1-9][0-9]{0,3}" + _S
             + rb"(?:[0-9]{3}|[0-9]{2}(?:" + _S + rb"[0-9]{2}){3})",
    "cn": rb"1[3-9][0-9](?:[0-9]{8}|" + _S + rb"[0-9]{4}" + _S + rb"[0-9]{4})",
    "bare": rb"[2-9][0-9]{2}[2-9][0-9]{6}",
}
# a _NUM_CLUSTER match (the numeric detectors run only inside them) holds 9 digits with
# at most three non-alphanumeric characters between neighbours: a presence anchor, so that
# text without one (most prose) is not scanned for the numeric anchors (~0.6 ms per MB)
CLUSTER_ANCHOR = rb"[0-9](?:[^A-Za-z0-9]{0,3}[0-9]){8}"
# an IBAN match is at most 4 + 2 + 4 + 8 * (2 + 4) = 58 characters from its country code,
# plus one character of look-ahead; windows reach that far past every candidate start
IBAN_WINDOW = 64
# numeric anchors are coded in 3 bits (scan()'s pos["num"])
NUM_CODES = 8
# more candidates than this (plus one per HITS_PER_BYTES bytes) and the bookkeeping of
# windows costs more than running the detectors over the whole text
MAX_WINDOW_HITS = 2048
HITS_PER_BYTES = 16


def _hit_limit(data: bytes) -> int:
    return MAX_WINDOW_HITS + len(data) // HITS_PER_BYTES


class Prefilter:
    """Compiled anchors for one set of detector families; thread-safe (scratch space is
    per thread).

    Three databases, each one pass over the text (one database of all three ran 3-4x
    slower: Hyperscan picks worse engines for the mix). `presence`: secret literals, '@',
    words, each reported once (which families can match at all). `positions`: every end
    offset of the anchors of the detectors that then run only near them (IBAN starts, IPv4
    triggers, password operators) — not single-match: in Hyperscan that made the pass 5x
    slower once such a pattern had matched. `numeric`, when the text holds a 9-digit
    cluster (presence family "num"): every end offset of the numeric detectors' anchors
    (NUMERIC_ANCHORS), coded with the detector's index: a cluster holding none is never
    looked at, and one that holds some runs only those detectors."""

    def __init__(self, presence: Sequence[tuple[str, bytes]],
                 positions: Sequence[tuple[str, bytes]],
                 numeric: Sequence[tuple[str, bytes]] = ()) -> None:
        assert _hs is not None
        assert len(numeric) <= NUM_CODES
        self._names = [n for n, _ in presence]
        self._pos_names = [n for n, _ in positions]
        # numeric detector name -> its code in scan()'s pos["num"] (end << 3 | code)
        self.numeric_codes = {n: k for k, (n, _) in enumerate(numeric)}
        self.families = frozenset(self._names) | frozenset(self._pos_names) | \
            (frozenset(("num",)) if numeric else frozenset())
        self._presence = _compile([p for _, p in presence],
                                  [_hs.HS_FLAG_SINGLEMATCH] * len(presence))
        self._positions = _compile([p for _, p in positions], [0] * len(positions))
        self._numeric = _compile([p for _, p in numeric], [0] * len(numeric))
        self._local = threading.local()

    @classmethod
    def create(cls, families: Sequence[str], secrets: Sequence[tuple[str, tuple[str, ...]]],
               positional: Sequence[str] = (), numeric: Sequence[str] = (), *,
               wait: bool = True) -> Prefilter | None:
        """The prefilter for these presence families, secret rules (keys of SECRET_ANCHORS
        or (entity, literals)), positional families (keys of POSITION_ANCHORS) and numeric
        detectors (NUMERIC_ANCHORS names), compiled once per process (~0.3 s).

        None when hyperscan is not importable or cannot compile here — and, with
        wait=False, while it is still compiling in a background thread (Hyperscan releases
        the GIL meanwhile; `cached(key)` has it once done)."""
        if _hs is None:
            _warn_once()
            return None
        key = prefilter_key(families, secrets, positional, numeric)
        pre = _CACHE.get(key)
        if pre is not None or key in _FAILED:
            return pre
        if wait:
            return _compile_key(key)
        with _CACHE_LOCK:
            if key not in _PENDING:
                _PENDING.add(key)
                threading.Thread(target=_compile_key, args=(key,), daemon=True,
                                 name="agentgate-hyperscan-compile").start()
        return None

    @classmethod
    def _build(cls, families: Sequence[str], secrets: Sequence[tuple[str, tuple[str, ...]]],
               positional: Sequence[str], numeric: Sequence[str]) -> Prefilter:
        presence: list[tuple[str, bytes]] = []
        for fam in families:
            presence.extend((fam, p) for p in PRESENCE_ANCHORS[fam])
        for key in secrets:
            anchors = SECRET_ANCHORS.get(key)
            if anchors is None:
                anchors = tuple(_literal(lit) for lit in key[1])
            presence.extend((secret_family(key), p) for p in anchors)
        if numeric:
            presence.append(("num", CLUSTER_ANCHOR))
        positions = [(fam, p) for fam in positional for p in POSITION_ANCHORS[fam]]
        return cls(presence, positions, [(n, NUMERIC_ANCHORS[n]) for n in numeric])

    def _scratch(self, which: str, db: object) -> object:
        s = getattr(self._local, which, None)
        if s is None:
            s = _hs.Scratch(db)
            setattr(self._local, which, s)
        return s

    def scan(self, data: bytes) -> tuple[set[str], dict[str, list[int]] | None]:
        """(families whose anchor occurs in `data`, sorted end offsets of every positional
        anchor by family; "num": sorted `end << 3 | code` of every numeric anchor, code
        from `numeric_codes`). With more than a few positional and numeric anchors per 16
        bytes the answer is (every family, None): run the detectors over the whole text,
        cheaper then than the bookkeeping."""
        found: set[str] = set()
        ends: dict[str, list[int]] = {n: [] for n in self._pos_names}
        codes: list[int] = []
        ends["num"] = codes
        if self._presence is not None:
            names = self._names

            def seen(pid: int, start: int, end: int, flags: int, ctx: object) -> None:
                found.add(names[pid])

            self._presence.scan(data, match_event_handler=seen,
                                scratch=self._scratch("presence", self._presence))
        lists = [ends[n] for n in self._pos_names]
        limit = _hit_limit(data)
        count = 0

        def hit(pid: int, start: int, end: int, flags: int, ctx: object) -> bool | None:
            nonlocal count
            lists[pid].append(end)
            count += 1
            return True if count > limit else None

        def num(pid: int, start: int, end: int, flags: int, ctx: object) -> bool | None:
            nonlocal count
            codes.append(end << 3 | pid)
            count += 1
            return True if count > limit else None

        try:
            if self._positions is not None:
                self._positions.scan(data, match_event_handler=hit,
                                     scratch=self._scratch("positions", self._positions))
            if self._numeric is not None and "num" in found:
                self._numeric.scan(data, match_event_handler=num,
                                   scratch=self._scratch("numeric", self._numeric))
        except _hs.ScanTerminated:
            return set(self.families), None
        for n, v in ends.items():
            if v:
                found.add(n)
                v.sort()  # (already in end order; sorting a sorted list is one pass)
        return found, ends


def secret_family(key: tuple[str, tuple[str, ...]]) -> str:
    return "secret:" + key[0] + ":" + "|".join(key[1])


def to_bytes(text: str) -> bytes:
    """One byte per character (latin-1, '?' above U+00FF): offsets stay character offsets."""
    return text.encode("latin-1", "replace")


def _literal(lit: str) -> bytes:
    out = []
    for ch in lit.encode("ascii"):
        c = bytes([ch])
        out.append(c if c.isalnum() else b"\\x%02x" % ch)
    return b"".join(out)


def _compile(exprs: list[bytes], flags: list[int]) -> object | None:
    if not exprs:
        return None
    db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
    db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs),
               flags=flags)
    return db


_warned = False
PrefilterKey = tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...], tuple[str, ...],
                     tuple[str, ...]]
_CACHE: dict[PrefilterKey, Prefilter] = {}   # compiled, by anchor set (one in practice)
_FAILED: set[PrefilterKey] = set()           # could not compile on this machine
_PENDING: set[PrefilterKey] = set()          # compiling in a background thread
_CACHE_LOCK = threading.Lock()               # guards _PENDING (held for microseconds)
_BUILD_LOCK = threading.Lock()               # one compilation at a time


def prefilter_key(families: Sequence[str], secrets: Sequence[tuple[str, tuple[str, ...]]],
                  positional: Sequence[str], numeric: Sequence[str]) -> PrefilterKey:
    return (tuple(families), tuple((e, tuple(lits)) for e, lits in secrets),
            tuple(positional), tuple(numeric))


def cached(key: PrefilterKey) -> Prefilter | None:
    """The compiled prefilter for `key`, or None while it is not (yet) compiled."""
    return _CACHE.get(key)


def _compile_key(key: PrefilterKey) -> Prefilter | None:
    with _BUILD_LOCK:
        pre = _CACHE.get(key)
        if pre is None and key not in _FAILED:
            try:
                pre = Prefilter._build(*key)
            except _hs.HyperscanError as e:  # e.g. a CPU without the instructions it needs
                _FAILED.add(key)
                _warn_once(f"hyperscan cannot compile here ({type(e).__name__}: {e})")
            else:
                _CACHE[key] = pre
        with _CACHE_LOCK:
            _PENDING.discard(key)
        return pre


def _warn_once(why: str = "hyperscan is not importable") -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s: masking runs the reference detectors (same findings, several "
                    "times slower on long bodies)", why)
