"""How long masking a piece of data would take, estimated without masking it: the
loop-or-thread choice of every place that masks on the event loop (the masking addon's
bodies, SSE chunks and WebSocket messages, the database relay's rows). Pure (no mitmproxy)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger("agentgate.masking")

# Whatever its size, a body (or a continued body's new part) goes to a worker thread when
# masking it is not small work. That cost follows the values in it more than its bytes
# (measured in process, 16 KB bodies: ~3-7 us per e-mail address, 0.7-3.4 us per digit of
# number-dense text — cards, phones, IBAN-like ' de12' runs — ~0.003 us per byte of plain
# prose; 60 KB of addresses held the loop ~175 ms: BENCHMARKS, PERF-AC). It is estimated
# from C-level counts of the bytes that start or make findings (heavy: 8 us an '@', 2 a
# digit, 1 a '%', a byte past ASCII or a capital letter, 2 a '_', '-' or '/' — those
# two in a body of 2 KB or more —, 0.01 a byte); over this many microseconds, a thread.
# (Only where the work runs changes: the bytes are the same.)
LOOP_BUDGET_US = 2000
_NON_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
_ASCII_BYTES = bytes(range(128))
_NON_CAPS = bytes(b for b in range(256) if not 0x41 <= b <= 0x5A)
_NON_JOINERS = bytes(b for b in range(256) if b not in b"_-/")
# under this size even a body of letter-only secrets is small work (~100 of them)
_TOKENS_MIN_BYTES = 2048


# What makes the other detectors work (measured on 64 KB bodies of each,
# bench/bench_cost.py), with the estimate's us per occurrence: the words that start a
# password assignment ('passwd: x' runs: ~1.1 us each; one that is a finding,
# 'password="…"': ~11.7), the AWS-secret words (~0.4-1.2 us), any casing — 4; the word
# bearer (the token after it: ~7-17 us) — 8; IPv6 triggers (two colons with at most four
# hex digits between them: ~1.7-3.3 us each) — 4; IBAN candidates (a country code's two
# letters, any case, then two digits, not after a letter or digit: ' de12' runs ~6.6 us,
# of which the digits count 4) — 5. Counted in one Hyperscan pass (~0.6 us per KB; one
# callback per occurrence, the scan stops once over the limit); without Hyperscan, by
# byte counts (slower: ~20 us per KB).
TRIGGERS: tuple[tuple[bytes, int], ...] = (
    *((rb"(?i)" + w, 4) for w in (b"pass", b"pwd", b"secret", b"token", b"key", b"credent",
                                  b"aws")),
    (rb"(?i)bearer", 8),
    (rb":[0-9A-Fa-f]{0,4}:", 4),
    (rb"(?:^|[^A-Za-z0-9])[A-Za-z]{2}[0-9]{2}", 5),
)
# the byte-count fallback's forms of the same
_KEYWORDS = (b"pass", b"pwd", b"secret", b"token", b"key", b"credent", b"aws")
_HEX_TO_H = bytes.maketrans(b"0123456789abcdefABCDEF", b"h" * 22)
_IPV6_TRIGGERS = (b"::", b":h:", b":hh:", b":hhh:", b":hhhh:")
# letters -> 'a', digits -> '0', anything else -> ' ' (the shape of IBAN candidates)
_CLASSES = bytes(0x61 if chr(b).isascii() and chr(b).isalpha() else
                 0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


class _Scanner:
    """TRIGGERS compiled once (Hyperscan); scratch space per thread."""

    def __init__(self) -> None:
        import hyperscan as hs

        self.hs = hs
        self.weights = [w for _, w in TRIGGERS]
        self.db = hs.Database(mode=hs.HS_MODE_BLOCK)
        self.db.compile(expressions=[p for p, _ in TRIGGERS], ids=list(range(len(TRIGGERS))),
                        elements=len(TRIGGERS), flags=[0] * len(TRIGGERS))
        self.local = threading.local()

    def count(self, data: bytes, est: int, limit: int) -> int:
        scratch = getattr(self.local, "scratch", None)
        if scratch is None:
            scratch = self.local.scratch = self.hs.Scratch(self.db)
        total = [est, limit, self.weights]
        try:
            self.db.scan(data, match_event_handler=_hit, context=total, scratch=scratch)
        except self.hs.ScanTerminated:
            pass
        return total[0]


def _hit(pid: int, start: int, end: int, flags: int, total: list[Any]) -> bool | None:
    total[0] += total[2][pid]
    return True if total[0] > total[1] else None


def _scanner() -> _Scanner | None:
    try:
        return _Scanner()
    except Exception as e:  # noqa: BLE001 - no Hyperscan here: byte counts
        log.info("masking: cost estimate by byte counts (%s)", type(e).__name__)
        return None


_SCANNER = _scanner()


def _count_bytes(data: bytes, est: int, limit: int) -> int:
    """TRIGGERS' occurrences by byte counts (no Hyperscan)."""
    low = data.lower()
    est += 4 * sum(low.count(w) for w in _KEYWORDS) + 8 * low.count(b"bearer")
    if est <= limit and b":" in data:
        hexed = data.translate(_HEX_TO_H)
        est += 4 * sum(hexed.count(t) for t in _IPV6_TRIGGERS)
    if est <= limit:
        est += 5 * (b" " + data).translate(_CLASSES).count(b" aa00")
    return est


# a custom detector's match: ~1.8-5 us each to find, check and replace (any pattern)
CUSTOM_MATCH_US = 6


class CustomCost:
    """What bounds the number of matches of one custom detector in a body: the pieces every
    match holds (a literal string, or at least k characters of a class), from its pattern.
    A body holds at most min(count(piece) // k) matches. A pattern that cannot be read
    this way (no required piece, or syntax only the `regex` module knows) counts one
    match per two bytes."""

    def __init__(self, pattern: str, ignore_case: bool = False) -> None:
        self.pieces: list[tuple[bytes | None, bytes | None, int]] = []  # (literal, deleted, k)
        self.fold = ignore_case
        try:
            self._read(pattern)
        except Exception as e:  # noqa: BLE001 - unreadable here: counted per byte
            log.debug("masking: custom pattern cost counted per byte (%s)", type(e).__name__)
            self.pieces = []

    def _read(self, pattern: str) -> None:
        import re._constants as c  # the standard parser reads most `regex` patterns
        import re._parser as sre

        tree = sre.parse(pattern)
        if tree.state.flags & c.SRE_FLAG_IGNORECASE:
            self.fold = True
        run: list[int] = []
        for op, av in _required(tree, c):
            if op is c.LITERAL and av < 128:
                run.append(av)
                continue
            self._literal(run)
            run = []
            if op is c.IN:
                cls = _class_bytes(av, c)
                if cls is not None:
                    self._class(cls, 1)
            elif op is c.MAX_REPEAT and av[0] >= 1 and len(av[2]) == 1:
                sop, sav = av[2][0]
                cls = bytes([sav]) if sop is c.LITERAL and sav < 128 else \
                    _class_bytes(sav, c) if sop is c.IN else None
                if cls is not None:
                    self._class(cls, av[0])
        self._literal(run)

    def _literal(self, run: list[int]) -> None:
        if run:
            lit = bytes(run)
            self.pieces.append((lit.lower() if self.fold else lit, None, 1))

    def _class(self, cls: bytes, k: int) -> None:
        if self.fold:
            cls = bytes(set(cls) | set(cls.lower()) | set(cls.upper()))
        keep = set(cls)
        self.pieces.append((None, bytes(b for b in range(256) if b not in keep), k))

    def matches(self, data: bytes, low: bytes | None = None) -> int:
        """At most how many matches `data` (`low`: lower-cased, when known) holds."""
        if not self.pieces:
            return len(data) // 2
        best = len(data)
        for lit, deleted, k in self.pieces:
            if lit is not None:
                if self.fold and low is None:
                    low = data.lower()
                n = (low if self.fold and low is not None else data).count(lit)
            else:
                n = len(data.translate(None, deleted)) // k
            best = min(best, n)
            if not best:
                break
        return best


def _required(tree: Any, c: Any) -> Iterable[tuple[Any, Any]]:
    """The items every match goes through, in order (groups opened; alternatives,
    optional parts and look-arounds left out)."""
    for op, av in tree:
        if op is c.SUBPATTERN:
            yield from _required(av[3], c)
        elif op is c.MAX_REPEAT and av[0] >= 1 and len(av[2]) == 1 and \
                av[2][0][0] is c.SUBPATTERN:
            yield from _required(av[2][0][1][3], c)
        elif op in (c.LITERAL, c.IN, c.MAX_REPEAT):
            yield op, av


def _class_bytes(items: Any, c: Any) -> bytes | None:
    """The bytes of a character class (non-ASCII characters: every byte past ASCII, their
    UTF-8 bytes), or None (a negated class: too wide to be worth counting)."""
    out: set[int] = set()
    for op, av in items:
        if op is c.NEGATE:
            return None
        if op is c.LITERAL:
            out.update([av] if av < 128 else range(128, 256))
        elif op is c.RANGE:
            lo, hi = av
            out.update(range(lo, min(hi, 127) + 1))
            if hi >= 128:
                out.update(range(128, 256))
        elif op is c.CATEGORY:
            name = str(av)
            if "NOT" in name:
                return None
            if "DIGIT" in name:
                out.update(b"0123456789")
            elif "WORD" in name:
                out.update(b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
            else:
                out.update(b" \t\n\r\x0b\x0c")
            out.update(range(128, 256))
        else:
            return None
    return bytes(sorted(out))


# the custom detectors of the rules in force (use_custom): their cost counts in every
# estimate, as the built-ins' do
_CUSTOM: tuple[CustomCost, ...] = ()


def use_custom(custom: Sequence[Any]) -> None:
    """Count these custom detectors (masking config `custom`: objects with `pattern`,
    `ignore_case`, `enabled`) in every estimate from now on (the masking addon calls it
    with each new rules' masker)."""
    global _CUSTOM
    _CUSTOM = tuple(CustomCost(d.pattern, d.ignore_case) for d in custom
                    if getattr(d, "enabled", True))


def estimate(data: bytes, custom: Sequence[CustomCost] | None = None,
             limit: int | None = None) -> int:
    """The estimated microseconds masking `data` takes (counting stops once over `limit`),
    from what makes the detectors work (see LOOP_BUDGET_US): '@' (e-mail
    addresses), digits (every numeric detector, IBANs, IPs), '%' (escapes decoded), bytes
    past ASCII (normalised), the length, TRIGGERS (the words of password assignments,
    bearer tokens and AWS secrets, IPv6 and IBAN candidates), and in 2 KB or more:
    capitals and joiners (letter-only secrets) and what every match of a custom detector
    holds (`custom`, or those of the rules in force: use_custom). A few us per KB to ask. `limit`:
    LOOP_BUDGET_US unless given."""
    if limit is None:
        limit = LOOP_BUDGET_US
    est = len(data) // 100
    if est <= limit:
        est += 8 * data.count(b"@") + data.count(b"%")
    if est <= limit:
        est += 2 * len(data.translate(None, _NON_DIGITS))
    if est <= limit and not data.isascii():
        est += len(data.translate(None, _ASCII_BYTES))
    if est <= limit:
        est = _SCANNER.count(data, est, limit) if _SCANNER is not None else \
            _count_bytes(data, est, limit)
    if est <= limit and len(data) >= _TOKENS_MIN_BYTES:
        # provider secrets made of letters (AKIA + 16 capitals, ghp_/glpat-/npm_/pplx-/
        # AIza tokens, Slack hook paths: ~12-30 us each to find, check and replace) have
        # none of the bytes above: each has a capital, '_', '-' or '/' (in the
        # secret rules' literals). Prose has a few per cent capitals and few of the rest.
        est += len(data.translate(None, _NON_CAPS))
        if est <= limit:
            est += 2 * len(data.translate(None, _NON_JOINERS))
        low: bytes | None = None
        for det in _CUSTOM if custom is None else custom:
            if est > limit:
                break
            if det.fold and low is None:
                low = data.lower()
            est += CUSTOM_MATCH_US * det.matches(data, low)
    return est


def heavy(data: bytes) -> bool:
    """Would masking `data` likely take more than LOOP_BUDGET_US (estimate)?"""
    return estimate(data) > LOOP_BUDGET_US
