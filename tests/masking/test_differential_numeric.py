"""The fast engine's numeric detectors against the reference ones, piece by piece.

The fast engine (addons/masking/detectors.py, `_NUMERIC_FAST`) validates cards, SSNs and
phone numbers with bytes operations instead of the reference span functions, stops
searching a window once no finding fits in what is left (`_run_fast`), and runs a detector
in a 9-digit cluster only when its Hyperscan anchor (fastscan.NUMERIC_ANCHORS) ends at a
digit of that cluster. Each of those is checked here on its own, over random runs of
digits, separators, letters and context words (hypothesis, derandomised), and in every
window: the engine-level agreement (test_differential.py) would hide a broken piece that
its inputs happen not to reach. The last tests show the checks fail when a piece is broken.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import detectors as D
from addons.masking import fastscan

pytestmark = pytest.mark.skipif(not fastscan.AVAILABLE, reason="hyperscan not importable")

PROFILE = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DIGIT_RUNS = st.text("0123456789", min_size=1, max_size=8)
PIECES = st.one_of(
    DIGIT_RUNS, DIGIT_RUNS, DIGIT_RUNS,
    st.sampled_from([
        # numbers the detectors know, and their parts
        "4111", "1111", "5500", "0004", "378282246310005", "4111111111111111", "0132",
        "415", "555", "078", "05", "1123", "536", "22", "4519", "020", "7123", "4567", "01",
        "42", "68", "53", "00", "138", "0013", "8000", "2024", "06", "11", "911", "666",
        "900", "123456789", "987654321", "02111", "1307",
        # separators, one or several, ASCII and not
        " ", "-", ".", "/", ",", "_", ":", "(", ")", "+", "\r\n", "\n", "\r", "\t", "#",
        "\u2022", "\u00b7", "\u2013", "  ", "   ", "    ", " - ", ". ", "\u00a0",
        # letters, non-ASCII letters and digits, context words, country codes
        "a", "Z", "x", "\u00e9", "\u0664", "\u00b2", "SSN ", "ssn: ", "social security ",
        "phone ", "call ", "tel ", "+1 ", "+44 ", "+91-", "1-", "91-", "+1-", "(415) ",
        "(20) ", "+86 ", "+7 ", "+352 ",
    ]))


SEPS = st.sampled_from([" ", " ", "-", "-", ".", "/", ",", "_", "\r\n", "\u2022", "\u00b7",
                        ":", "(", ")", "\t"])


def _luhn_complete(body: str) -> str:
    for c in "0123456789":
        if D.luhn_ok(body + c):
            return body + c
    raise AssertionError(body)


@st.composite
def numbers(draw) -> str:
    """A value of one of the numeric detectors' shapes (valid or nearly), digits grouped
    and separated the ways people and evasions write them."""
    kind = draw(st.sampled_from(["card", "card", "nanp", "intl", "ssn", "trunk", "cn"]))
    if kind == "card":
        head = draw(st.sampled_from(["4", "51", "55", "37", "34", "6011", "3528", "36", "62",
                                     "2221", "1", "9792"]))
        size = draw(st.sampled_from([13, 14, 15, 16, 16, 16, 19]))
        body = head + draw(st.text("0123456789", min_size=size - len(head) - 1,
                                   max_size=size - len(head) - 1))
        digits = _luhn_complete(body) if draw(st.booleans()) else body + "7"
        sizes = draw(st.sampled_from([[4], [1], [2], [4, 6, 5], [3], [5], [19]]))
    elif kind == "nanp":
        digits = (draw(st.sampled_from(["", "1", "+1", "91", "44"])) + draw(st.sampled_from(
            "2345678901")) + draw(st.text("0123456789", min_size=2, max_size=2))
            + draw(st.sampled_from("2345678901")) + draw(st.text("0123456789", min_size=6,
                                                                  max_size=6)))
        sizes = [len(digits) - 10, 3, 3, 4] if len(digits) > 10 else [3, 3, 4]
    elif kind == "intl":
        digits = "+" + draw(st.sampled_from(["1", "44", "49", "352", "7", "86", "33", "999",
                                             "20"])) + draw(st.text("0123456789", min_size=5,
                                                                    max_size=13))
        sizes = draw(st.sampled_from([[3], [2], [4], [3, 3, 4], [2, 4, 4]]))
    elif kind == "ssn":
        digits = draw(st.sampled_from(["536", "078", "000", "666", "912", "123"])) + draw(
            st.text("0123456789", min_size=6, max_size=6))
        sizes = draw(st.sampled_from([[3, 2, 4], [9], [3, 6]]))
    elif kind == "trunk":
        digits = "0" + draw(st.text("123456789", min_size=1, max_size=1)) + draw(
            st.text("0123456789", min_size=7, max_size=10))
        sizes = draw(st.sampled_from([[3, 4, 4], [2, 2, 2, 2, 2], [5, 4], [4, 6], [2, 8]]))
    else:
        digits = "1" + draw(st.sampled_from("3456789")) + draw(
            st.text("0123456789", min_size=9, max_size=9))
        sizes = draw(st.sampled_from([[3, 4, 4], [11]]))
    groups, i, k = [], 0, 0
    while i < len(digits):
        n = sizes[min(k, len(sizes) - 1)] or 1
        groups.append(digits[i:i + n])
        i, k = i + n, k + 1
    out = groups[0]
    same = draw(st.booleans())
    sep = draw(SEPS)
    for g in groups[1:]:
        out += (sep if same else draw(SEPS)) + g
    return out


def _text(pieces: list[str]) -> str:
    return "".join(pieces)


# pieces around one or two numbers of the detectors' shapes
TEXTS = st.builds(lambda a, n, b, m, c: _text(a + [n] + b + m + c),
                  st.lists(PIECES, max_size=8), numbers(), st.lists(PIECES, max_size=8),
                  st.lists(numbers(), max_size=1), st.lists(PIECES, max_size=6))


def _findings(run, det, t: str, lo: int, hi: int) -> list:
    out: list = []
    run(det, t, lo, hi, out)
    return out


def _agree(t: str, lo: int, hi: int) -> None:
    """Both engines' runs of every numeric detector in t[lo:hi] find the same; the fast one
    with the `re` patterns where the window is ASCII, as the engine runs it, and with the
    `regex` ones everywhere."""
    asc = D._ascii_window(t, lo, hi)
    for ref, fast in D._NUMERIC_FAST.items():
        want = _findings(D._run, ref, t, lo, hi)
        got = _findings(lambda *a: D._run_fast(*a, asc), fast, t, lo, hi)
        assert got == want, (D._NUMERIC_NAMES[ref], t, lo, hi, asc)
        got = _findings(D._run_fast, fast, t, lo, hi)
        assert got == want, (D._NUMERIC_NAMES[ref], t, lo, hi)


@PROFILE
@given(st.one_of(numbers(), TEXTS, st.lists(PIECES, max_size=24).map(_text)), st.integers(0, 40),
       st.integers(0, 40))
def test_fast_numeric_detectors_agree_in_every_window(t: str, a: int, b: int):
    _agree(t, 0, len(t))
    lo, hi = sorted((min(a, len(t)), max(0, len(t) - b)))
    _agree(t, lo, hi)


@PROFILE
@given(st.one_of(numbers(), TEXTS))
def test_fast_numeric_detectors_agree_in_each_cluster_window(t: str):
    """As the engines run them: inside each 9-digit cluster's window."""
    n = len(t)
    for cm in D._NUM_CLUSTER.finditer(t):
        s, e = cm.span()
        _agree(t, max(0, s - 2), min(n, e + 3))


def _anchor_ends(name: str, t: str) -> list[int]:
    pre = _anchor_db(name)
    ends: list[int] = []
    pre.scan(fastscan.to_bytes(t), match_event_handler=lambda i, s, e, f, c: ends.append(e))
    return ends


_DBS: dict[str, object] = {}


def _anchor_db(name: str):
    db = _DBS.get(name)
    if db is None:
        db = _DBS[name] = fastscan._compile([fastscan.NUMERIC_ANCHORS[name]], [0])
    return db


def _anchored(t: str, findings_by_det: dict) -> list[tuple[str, tuple[int, int]]]:
    """(detector, finding) pairs whose finding has no anchor of its detector ending at one
    of its digits (must be none)."""
    missing = []
    for ref, found in findings_by_det.items():
        name = D._NUMERIC_NAMES[ref]
        ends = _anchor_ends(name, t) if found else []
        for s, e, _, _ in found:
            if not any(s < x <= e and t[x - 1] in "0123456789" for x in ends):
                missing.append((name, (s, e)))
    return missing


@PROFILE
@given(st.one_of(numbers(), TEXTS))
def test_every_numeric_finding_holds_its_anchor(t: str):
    """fastscan.NUMERIC_ANCHORS: every reference finding of a detector, in any cluster
    window, has that detector's anchor ending at one of its digits."""
    n = len(t)
    by_det: dict = {d: [] for d in D._NUMERIC}
    for cm in D._NUM_CLUSTER.finditer(t):
        s, e = cm.span()
        for d in D._NUMERIC:
            D._run(d, t, max(0, s - 2), min(n, e + 3), by_det[d])
    assert _anchored(t, by_det) == [], t


# values each numeric detector finds, written in the ways the fast paths split on
EDGES = [
    "card 4111 1111 1111 1111 exp", "4111-1111-1111-1111", "4111111111111111",
    "12 4111 1111 1111 1111", "4111 1111 1111 1111 12/25", "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
    "4111\r\n1111\r\n1111\r\n1111", "4111\u20221111\u20221111\u20221111", "3782 822463 10005",
    "[6718,1885,8966,6125,590]", "41 11 11 11 11 11 11 11", "SSN 078-05-1123",
    "536 22 4519", "536_22/4519", "ssn 536224519", "x 536-224519 y", "+1 415 555 0132",
    "(415) 555-0132", "1-415-555-0132", "91-415-555-0132", "+44 20 7123 4567",
    "+44 (20) 7123 4567", "+1 415 555 0132 4111", "+49 30 1234567 89 1 2", "020 7123 4567",
    "01 42 68 53 00", "090-1234-5678", "02111-1307", "138 0013 8000", "13800138000",
    "call 4155550132", "+352 621 123 456", "+7 912 345 67 89", "+86 138 0013 8000",
]


def test_edge_values_agree_and_are_found():
    for text in EDGES:
        _agree(text, 0, len(text))
        for cm in D._NUM_CLUSTER.finditer(text):
            s, e = cm.span()
            _agree(text, max(0, s - 2), min(len(text), e + 3))
    found = 0
    for text in EDGES:
        for d in D._NUMERIC_FAST.values():
            found += len(_findings(D._run_fast, d, text, 0, len(text)))
    assert found >= 25  # the list exercises the accepting paths, not only refusals


def _disagree(texts: list[str]) -> bool:
    try:
        for t in texts:
            _agree(t, 0, len(t))
    except AssertionError:
        return True
    return False


def test_a_broken_fast_validator_is_caught(monkeypatch):
    assert not _disagree(EDGES)
    monkeypatch.setattr(D, "_exotic_b", lambda v: False)  # '[6718,1885,…]' is a list
    assert _disagree(EDGES)
    monkeypatch.undo()
    monkeypatch.setattr(D, "luhn_ok_b", lambda d: True)
    assert _disagree(EDGES + ["4111 1111 1111 1112"])
    monkeypatch.undo()
    monkeypatch.setattr(D, "_NUM_MIN_MATCH", 14)  # stops before a 12-character number
    assert _disagree(EDGES)


def test_a_missing_anchor_is_caught(monkeypatch):
    monkeypatch.setitem(fastscan.NUMERIC_ANCHORS, "nanp", rb"[0-9]{3}-[0-9]{3}-[0-9]{4}")
    _DBS.clear()
    try:
        by_det = {d: [] for d in D._NUMERIC}
        text = "call +1 415 555 0132 now"
        D._run(D._NUMERIC[2], text, 0, len(text), by_det[D._NUMERIC[2]])
        assert _anchored(text, by_det) == [("nanp", (5, 20))]
    finally:
        _DBS.clear()


def test_nanp_country_code_without_the_regex_is_the_regex():
    """detectors._nanp_cc against _NANP_CC.match(t, max(0, s - 5), s) on every string of up
    to 6 characters over digits, '+', the separators it takes and a letter, at every s."""
    import itertools

    checked = 0
    for size in range(7):
        for chars in itertools.product("10+ .-a", repeat=size):
            t = "".join(chars)
            for s in range(size + 1):
                cm = D._NANP_CC.match(t, max(0, s - 5), s)
                want = None if cm is None else (cm.start(), cm.group(1))
                assert D._nanp_cc(t, s) == want, (t, s)
                checked += 1
    assert checked > 900_000
    for size in range(6):  # and with characters past ASCII and latin-1 among them
        for chars in itertools.product("1+ -\u00e9\u4e2d\u0664", repeat=size):
            t = "".join(chars)
            for s in range(size + 1):
                cm = D._NANP_CC.match(t, max(0, s - 5), s)
                want = None if cm is None else (cm.start(), cm.group(1))
                assert D._nanp_cc(t, s) == want, (t, s)


# around a '+1 NNN NNN NNNN' cluster: what decides the two phone detectors there (digits,
# '+', word and non-word characters, separators, non-ASCII letters and digits)
_AROUND = ["", "0", "7", "+", ",", " ", "-", ".", "(", "a", "_", "\u00e9", "\u0664", "\n"]
_PLUS1_NUMBERS = ["1 415 555 0132", "1-415-555-0132", "1.415.555.0132", "1 415-555.0132",
                  "1 911 555 0132", "1 415 211 0132", "1 015 555 0132", "1 415 155 0132"]


def _phone_runs(t: str, lo: int, hi: int) -> tuple[list, list, list, list]:
    nanp, intl = D._NUMERIC[2], D._NUMERIC[3]
    return (_findings(D._run, nanp, t, lo, hi), _findings(D._run, intl, t, lo, hi),
            _findings(D._run_fast, D._NUMERIC_FAST[nanp], t, lo, hi),
            _findings(D._run_fast, D._NUMERIC_FAST[intl], t, lo, hi))


def test_plus1_cluster_intl_adds_nothing_to_nanp():
    """detectors._PLUS1: in a cluster of that shape with '+' before it, every finding of
    the international detector is one the NANP detector makes too (so the fast engine
    runs only the latter there) — for every two characters before the '+' and after the
    number, in both engines' detectors."""
    import itertools

    checked = 0
    for number in _PLUS1_NUMBERS:
        for a, b, c, d in itertools.product(_AROUND, repeat=4):
            t = a + b + "+" + number + c + d
            clusters = [cm.span() for cm in D._NUM_CLUSTER.finditer(t)]
            s = len(a + b) + 1
            if (s, s + len(number)) not in clusters:
                continue  # the cluster goes on (a digit next to it): not the fast path
            lo, hi = max(0, s - 2), min(len(t), s + len(number) + 3)
            nanp, intl, nanp_fast, intl_fast = _phone_runs(t, lo, hi)
            assert set(intl) <= set(nanp), t
            assert set(intl_fast) <= set(nanp_fast), t
            checked += 1
    assert checked > 10_000


def test_plus1_engines_agree():
    ref = D.DetectorSet(fast=False)
    fast = D.DetectorSet(fast=True)
    assert fast.fast
    texts = [f"{a}{b}+{n}{c}" for n in _PLUS1_NUMBERS for a in _AROUND for b in _AROUND
             for c in _AROUND]
    for t in texts:
        assert fast.find(t) == ref.find(t), t
    found = fast.find("call +1 415 555 0132, or 5,+1 415 555 0132 x+1 415 555 0132")
    assert [f.value for f in found] == ["+1 415 555 0132", "+1 415 555 0132",
                                        "+1 415 555 0132"]


def test_a_looser_plus1_shape_is_caught(monkeypatch):
    """With the shape loosened to any separator, the fast engine loses a number only the
    international detector finds ('+1,415,555,0132': to NANP, '415,555,0132' is an item
    of a list after '1,'): the engine comparison above would fail."""
    import re

    text = "call +1,415,555,0132 today"
    ref = D.DetectorSet(fast=False).find(text)
    assert [f.value for f in ref] == ["+1,415,555,0132"]
    assert D.DetectorSet(fast=True).find(text) == ref
    monkeypatch.setattr(D, "_PLUS1", re.compile(r"1[\W_][0-9]{3}[\W_][0-9]{3}[\W_][0-9]{4}"))
    assert D.DetectorSet(fast=True).find(text) == []
