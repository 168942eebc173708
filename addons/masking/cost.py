"""How long masking a piece of data would take, estimated without masking it: the
loop-or-thread choice of every place that masks on the event loop (the masking addon's
bodies, SSE chunks and WebSocket messages, the database relay's rows). Pure (no mitmproxy)."""

from __future__ import annotations

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


def estimate(data: bytes) -> int:
    """The estimated microseconds masking `data` takes (counting stops once over
    LOOP_BUDGET_US), from what makes the detectors work (see LOOP_BUDGET_US): '@' (e-mail
    addresses), digits (every numeric detector, IBANs, IPs), '%' (escapes decoded), bytes
    past ASCII (normalised), and the length. A few us per KB to ask."""
    est = len(data) // 100
    if est <= LOOP_BUDGET_US:
        est += 8 * data.count(b"@") + data.count(b"%")
    if est <= LOOP_BUDGET_US:
        est += 2 * len(data.translate(None, _NON_DIGITS))
    if est <= LOOP_BUDGET_US and not data.isascii():
        est += len(data.translate(None, _ASCII_BYTES))
    if est <= LOOP_BUDGET_US and len(data) >= _TOKENS_MIN_BYTES:
        # provider secrets made of letters (AKIA + 16 capitals, ghp_/glpat-/npm_/pplx-/
        # AIza tokens, Slack hook paths: ~12-30 us each to find, check and replace) have
        # none of the bytes above: each has a capital, '_', '-' or '/' (in the
        # secret rules' literals). Prose has a few per cent capitals and few of the rest.
        est += len(data.translate(None, _NON_CAPS))
        if est <= LOOP_BUDGET_US:
            est += 2 * len(data.translate(None, _NON_JOINERS))
    return est


def heavy(data: bytes) -> bool:
    """Would masking `data` likely take more than LOOP_BUDGET_US (estimate)?"""
    return estimate(data) > LOOP_BUDGET_US


