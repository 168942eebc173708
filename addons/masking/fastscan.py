"""A Hyperscan prefilter for the detectors: one pass over the text says which detector
families can possibly match, and where the position-anchored ones may start. No mitmproxy.

The detectors (addons.masking.detectors) are the reference: a family this module says is
absent cannot match, so its regex scans are skipped; a family that is present runs its exact
`regex` detector and validators, over the whole text or, for IBANs, only in windows around
the candidate starts. Each anchor below is a SUPERSET of what its detector can match (a
necessary substring or a looser shape without look-arounds), so skipping never loses a
finding; tests/masking/test_fastscan.py checks the fast and the reference engine agree on the
corpus, the evasion cases and random (hypothesis) text.

Text is scanned as latin-1 bytes with every character above U+00FF replaced by '?': one byte
per character, so byte offsets are character offsets. All anchors are ASCII, and a replaced
character is never a letter or digit of an anchor, which keeps every anchor a superset
(a non-ASCII letter is a separator to these byte classes, as it is not to the detectors').

`hyperscan` (Intel Hyperscan, BSD; python bindings MIT) is a runtime dependency; when it
cannot be imported, `Prefilter.create()` returns None and the detectors run unfiltered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

log = logging.getLogger("agentgate.masking")

try:  # the wheel is binary: a platform without it still masks, with the reference engine
    import hyperscan as _hs
except ImportError:  # pragma: no cover - exercised when the wheel is missing
    _hs = None

__all__ = ["Prefilter", "AVAILABLE", "IBAN_WINDOW", "MAX_WINDOW_HITS",
           "SECRET_ANCHORS", "PRESENCE_ANCHORS"]

AVAILABLE = _hs is not None

# Presence families (answer: occurs or not). Family names are what detectors.py asks for.
# Each pattern is a superset of what the family's detector needs to find anything.
PRESENCE_ANCHORS: dict[str, tuple[bytes, ...]] = {
    # _find_emails: the e-mail pattern starts at '@'
    "email": (rb"@",),
    # _find_aws_secret: a key counts only after one of AWS_SECRET_WORDS (any casing)
    "aws_word": (rb"(?i)aws", rb"(?i)secret"),
    # _find_passwords: URL passwords need '://'; both assignment forms need a password word
    # (PASSWORD_ASSIGNMENTS' key part: pass…, pwd, secret, token, …key, credential)
    "pw_url": (rb"://",),
    "pw_word": (rb"(?i)pass", rb"(?i)pwd", rb"(?i)secret", rb"(?i)token", rb"(?i)key",
                rb"(?i)credential"),
    # _find_bearer: the word, any casing
    "bearer": (rb"(?i)bearer",),
    # the numeric detectors run only inside _NUM_CLUSTER matches: 9 digits with at most
    # three non-alphanumeric characters between neighbours
    "num": (rb"[0-9](?:[^A-Za-z0-9]{0,3}[0-9]){8}",),
    # _find_ipv4's trigger (digit.digit.digit.digit)
    "ipv4": (rb"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]",),
    # _find_ipv6's trigger: two colons with at most four hex digits between them
    "ipv6": (rb":[0-9A-Fa-f]{0,4}:",),
}
# Secret rules by (entity, literals): anchors tighter than the rule's gate literal where
# the literal is common ('_' in code and JSON); otherwise the literals themselves.
SECRET_ANCHORS: dict[tuple[str, tuple[str, ...]], tuple[bytes, ...]] = {
    ("AWS_ACCESS_KEY", ()): (rb"A(?:KIA|SIA|BIA|CCA|3T)",),
    ("GITHUB_TOKEN", ("_",)): (rb"gh[pousr]_", rb"github_pat_"),
    ("HUGGINGFACE_TOKEN", ("_",)): (rb"hf_", rb"api_org_"),
    ("STRIPE_KEY", ("k_",)): (rb"[rs]k_(?:live|test)_",),
}
# The numeric detectors (detectors._NUMERIC, by name): a pattern that matches a piece of
# every FINDING each can return (its validated span's text), without the look-arounds, and
# ends only a few times per number (each end is a Python callback). A 9-digit cluster runs
# only the detectors with an anchor ending inside it (a piece of a finding ends inside the
# finding, and the finding inside the cluster's window). S is the detectors' SEP (one
# character that is not a letter or digit, or CRLF).
_S = rb"(?:\r\n|[^A-Za-z0-9])"
NUMERIC_ANCHORS: dict[str, bytes] = {
    # the first 13 digits of a card (13-19 digits, card_ok / _card_span), one separator
    # between groups
    "card": rb"[0-9](?:" + _S + rb"?[0-9]){12}",
    "ssn": rb"[0-9]{3}(?:[0-9]{6}|" + _S + rb"[0-9]{2}" + _S + rb"[0-9]{4}|-[0-9]{6})",
    # the finding may start earlier (a country code); it ends where the pattern does
    "nanp": rb"(?:[0-9]{3}" + _S + rb"|\([0-9]{3}\)" + _S + rb"?)[0-9]{3}" + _S + rb"[0-9]{4}",
    # '+' and the first 8 digits (_intl_span_raw wants 8-15 digits); between two digits at
    # most ')', a separator (CRLF: two) and '('
    "intl": rb"\+[1-9](?:[^A-Za-z0-9]{0,4}[0-9]){7}",
    # the trunk prefix and the first group after it
    "trunk": rb"0[1-9][0-9]{0,3}" + _S + rb"[0-9]{2}",
    "cn": rb"1[3-9][0-9](?:[0-9]{8}|" + _S + rb"[0-9]{4}" + _S + rb"[0-9]{4})",
    "bare": rb"[2-9][0-9]{2}[2-9][0-9]{6}",
}
# IBAN candidates (upper or lower case): two letters not after a letter or digit, then two
# digits. The match start is 4 bytes before the reported end.
_IBAN_ANCHOR = rb"(?:^|[^A-Za-z0-9])[A-Za-z]{2}[0-9]{2}"
# an IBAN match is at most 4 + 2 + 4 + 8 * (2 + 4) = 58 characters from its country code,
# plus one character of look-ahead; windows reach that far past every candidate start
IBAN_WINDOW = 64
# more candidates than this (plus one per HITS_PER_BYTES bytes) and the bookkeeping of
# windows costs more than running the detectors over the whole text
MAX_WINDOW_HITS = 2048
HITS_PER_BYTES = 16


def _hit_limit(data: bytes) -> int:
    return MAX_WINDOW_HITS + len(data) // HITS_PER_BYTES


class Prefilter:
    """Compiled anchors for one set of detector families; `scan` is thread-safe."""

    def __init__(self, presence: Sequence[tuple[str, bytes]], iban: bool,
                 numeric: Sequence[str] = ()) -> None:
        assert _hs is not None
        self._names: list[str] = []
        exprs: list[bytes] = []
        flags: list[int] = []
        for name, pattern in presence:
            self._names.append(name)
            exprs.append(pattern)
            flags.append(_hs.HS_FLAG_SINGLEMATCH)
        self._presence = _compile(exprs, flags) if exprs else None
        self._iban = _compile([_IBAN_ANCHOR], [0]) if iban else None
        self._numeric_n = len(numeric)
        self._numeric = _compile([NUMERIC_ANCHORS[n] for n in numeric],
                                 [0] * len(numeric)) if numeric else None
        self._local = threading.local()

    @classmethod
    def create(cls, families: Sequence[str], secrets: Sequence[tuple[str, tuple[str, ...]]],
               iban: bool, numeric: Sequence[str] = ()) -> Prefilter | None:
        """A prefilter for these presence families, secret rules (keys of SECRET_ANCHORS
        or (entity, literals)), IBAN windows and numeric detectors (NUMERIC_ANCHORS names,
        in the caller's order); None when hyperscan is not importable."""
        if _hs is None:
            _warn_once()
            return None
        presence: list[tuple[str, bytes]] = []
        for fam in families:
            presence.extend((fam, p) for p in PRESENCE_ANCHORS[fam])
        for key in secrets:
            anchors = SECRET_ANCHORS.get(key)
            if anchors is None:
                anchors = tuple(_literal(lit) for lit in key[1])
            presence.extend((secret_family(key), p) for p in anchors)
        return cls(presence, iban, numeric)

    def _scratch(self, which: str, db: object) -> object:
        s = getattr(self._local, which, None)
        if s is None:
            s = _hs.Scratch(db)
            setattr(self._local, which, s)
        return s

    def scan(self, data: bytes) -> set[str]:
        """Names of the presence families whose anchor occurs in `data`."""
        found: set[str] = set()
        if self._presence is None:
            return found
        names = self._names

        def hit(pid: int, start: int, end: int, flags: int, ctx: object) -> None:
            found.add(names[pid])

        self._presence.scan(data, match_event_handler=hit,
                            scratch=self._scratch("presence", self._presence))
        return found

    def iban_starts(self, data: bytes) -> list[int] | None:
        """Sorted positions where an IBAN may start, or None when there are too many
        (then scan the whole text)."""
        if self._iban is None:
            return []
        starts: list[int] = []
        limit = _hit_limit(data)

        def hit(pid: int, start: int, end: int, flags: int, ctx: object) -> bool | None:
            starts.append(end - 4)
            return True if len(starts) > limit else None

        try:
            self._iban.scan(data, match_event_handler=hit,
                            scratch=self._scratch("iban", self._iban))
        except _hs.ScanTerminated:
            return None
        return starts


    def numeric_ends(self, data: bytes) -> list[list[int]] | None:
        """Per numeric detector (the order given to create), the sorted end offsets of its
        anchor; None when there are too many in all (then run them everywhere)."""
        if self._numeric is None:
            return []
        ends: list[list[int]] = [[] for _ in range(self._numeric_n)]
        count = [0]
        limit = _hit_limit(data)

        def hit(pid: int, start: int, end: int, flags: int, ctx: object) -> bool | None:
            ends[pid].append(end)
            count[0] += 1
            return True if count[0] > limit else None

        try:
            self._numeric.scan(data, match_event_handler=hit,
                               scratch=self._scratch("numeric", self._numeric))
        except _hs.ScanTerminated:
            return None
        return ends


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


def _compile(exprs: list[bytes], flags: list[int]) -> object:
    db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
    db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs),
               flags=flags)
    return db


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("hyperscan is not importable: masking runs the reference detectors "
                    "(same findings, several times slower on long bodies)")
