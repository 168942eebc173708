"""The cross-field pass of body masking (bodies._cross_findings) lays its text out once and
works out where each slot's pieces lie only for the plans a finding falls in; the reference
below is the pass as it was (every piece's position recorded up front, commit 8580f69). Both
must give the same crossing findings — entity, value, and the slots and local spans each
covers — on generated documents: numbers, short and long strings (past SPLIT_WINDOW, so
heads and tails), values split over siblings, letters beside digits (the spaced join),
non-ASCII text. Also the two other shortcuts of this change: normalize's UTF-8 %-escape
scan only where a lead byte was seen, and Session.replays checking each distinct item once.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import normalize as N
from addons.masking.bodies import (
    _BREAK,
    SPLIT_WINDOW,
    _cross_findings,
    _junctions,
    _Slots,
    _word_junction,
)
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

MASKER = Masker(DetectorSet(MaskingConfig()), b"test-key")


# ---------------------------------------------------------------- the reference (8580f69)
def reference_cross_findings(masker: Masker, slots: _Slots, found: list
                    ) -> list[tuple[str, str, list[tuple[int, int, int]]]]:
    """Findings that cross the boundary between sibling slots (see the module doc):
    (entity, value, [(slot, local start, local end), …]) for those overlapping nothing the
    first pass found."""
    runs: dict[Any, list[int]] = {}
    for i, key in enumerate(slots.sibs):
        if key is not None:
            runs.setdefault(key, []).append(i)
    texts, starts = slots.texts, slots.starts
    out: list[tuple[str, str, list[tuple[int, int, int]]]] = []
    w = SPLIT_WINDOW
    # Every run in one window text (runs apart by a break): one more detector pass. Each
    # run joined with nothing ('sk-proj-Xi' + '8tcN…' is one key) and, where a letter meets
    # a digit, once more with a space there ('cards' + '4111': a word boundary, as a reader
    # sees two fields, so a number's look-behind still sees its start). A crossing finding
    # starts in the tail of one slot and ends in the head of a later one: the first slot of
    # a run gives its tail, the last its head, the others both (whole when short).
    # Bookkeeping in flat arrays: a body may hold millions of slots.
    buf: list[str] = []
    seg_pos = array("q")
    seg_slot = array("q")
    seg_local = array("q")
    pos = 0
    plans = [(idxs, False) for idxs in runs.values() if len(idxs) > 1]
    plans += [(idxs, True) for idxs, _ in plans if _ref_has_junction(texts, idxs)]
    for idxs, spaced in plans:
        if buf:
            buf.append(_BREAK)
            pos += len(_BREAK)
        last = len(idxs) - 1
        prev_end = ""
        for j, i in enumerate(idxs):
            t = texts[i]
            if len(t) <= w or (0 < j < last and len(t) <= 2 * w):
                pieces: tuple[tuple[int, str], ...] = ((0, t),)
            elif j == 0:
                pieces = ((len(t) - w, t[-w:]),)
            elif j == last:
                pieces = ((0, t[:w]),)
            else:
                pieces = ((0, t[:w]), (len(t) - w, t[-w:]))
            for k, (local, piece) in enumerate(pieces):
                if k:
                    buf.append(_BREAK)
                    pos += len(_BREAK)
                elif spaced and j and _word_junction(prev_end, piece[:1]):
                    buf.append(" ")
                    pos += 1
                seg_pos.append(pos)
                seg_slot.append(i)
                seg_local.append(local)
                buf.append(piece)
                pos += len(piece)
            prev_end = t[-1:]
    if not seg_pos:
        return out
    text = "".join(buf)
    del buf
    n_segs = len(seg_pos)
    taken = [(f.start, f.end) for f in found]
    for f in masker.find(text):
        a = bisect_right(seg_pos, f.start) - 1
        b = bisect_right(seg_pos, f.end - 1) - 1
        if a < 0 or seg_slot[a] == seg_slot[b]:
            continue  # inside one slot: the first pass saw it
        pieces_out: list[tuple[int, int, int]] = []
        for g in range(a, b + 1):
            p0 = seg_pos[g]
            p1 = seg_pos[g + 1] if g + 1 < n_segs else len(text)
            slot, local = seg_slot[g], seg_local[g]
            # the segment's own length (what follows it may be a break or a space)
            p1 = min(p1, p0 + len(texts[slot]) - local)
            lo, hi = max(f.start, p0) - p0, min(f.end, p1) - p0
            if hi > lo:
                pieces_out.append((slot, local + lo, local + hi))
        if len(pieces_out) < 2:
            continue
        g0 = starts[pieces_out[0][0]] + pieces_out[0][1]
        g1 = starts[pieces_out[-1][0]] + pieces_out[-1][2]
        if any(s < g1 and e > g0 for s, e in taken):
            continue  # the first pass (or the other join) has it
        taken.append((g0, g1))
        out.append((f.entity, f.value, pieces_out))
    return out


def _ref_has_junction(texts: list[str], idxs: list[int]) -> bool:
    return any(_word_junction(texts[a][-1:], texts[b][:1]) for a, b in zip(idxs, idxs[1:],
                                                                           strict=False))


def _ref_has_junction(texts: list[str], idxs: list[int]) -> bool:
    return any(_word_junction(texts[a][-1:], texts[b][:1]) for a, b in zip(idxs, idxs[1:],
                                                                           strict=False))


# ---------------------------------------------------------------- generated documents
PIECES = ["4111", "1111", "411", "11", "1", "0", "078", "05", "1123", "+1", "415", "555",
          "0132", "jane.doe", "@", "example.com", "sk-proj-Xi", "8tcNiHV9awbCcvilTeT3Blbk",
          "FJ3UDnpdEwNNm6wVBpYM0o", "ssn", "call", " ", "-", ".", "x", "DE89", "3704",
          "0044", "0532", "0130", "00", "192.168", ".1.20", "４", "１", "é", "\u0034",
          "cards", "a b", "\n"]
texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join)
long_texts = st.tuples(texts, st.integers(SPLIT_WINDOW - 8, SPLIT_WINDOW * 2 + 8),
                       texts).map(lambda t: t[0] + "lorem ipsum " * (t[1] // 12) + t[2])
scalars = st.one_of(texts, long_texts, st.integers(0, 10 ** 19), st.integers(-9999, 0),
                    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none())
# a value that only the join of its siblings shows, split at random places (digit pieces
# may become JSON numbers), with words or noise around it
VALUES = ["4111 1111 1111 1111", "4111111111111111", "ssn 536-22-4519", "ssn 536224519",
          "+1 415 555 0132", "call 4155550132", "jane.doe@example.com",
          "DE89 3704 0044 0532 0130 00",
          "sk-proj-Xi8tcNiHV9awbCcvilTeT3BlbkFJ3UDnpdEwNNm6wVBpYM0o", "192.168.1.20"]


@st.composite
def split_values(draw: Any) -> list:
    value = draw(st.sampled_from(VALUES))
    cuts = sorted(draw(st.sets(st.integers(1, len(value) - 1), min_size=1, max_size=5)))
    parts = [value[a:b] for a, b in zip([0, *cuts], [*cuts, len(value)], strict=True)]
    out: list = [int(p) if p.isdigit() and p[0] != "0" and draw(st.booleans()) else p
                 for p in parts]
    return draw(st.lists(scalars, max_size=2)) + out + draw(st.lists(scalars, max_size=2))


docs = st.recursive(st.one_of(scalars, split_values()), lambda inner: st.one_of(
    st.lists(inner, max_size=8),
    st.dictionaries(st.sampled_from(["a", "b", "text", "content", "value", "n"]), inner,
                    max_size=6)), max_leaves=40)


def _slots(doc: Any) -> _Slots:
    slots = _Slots(llm=False)
    slots.walk(doc if isinstance(doc, dict | list) else [doc], -1)
    return slots


def _both(doc: Any) -> tuple[list, list]:
    slots = _slots(doc)
    found = MASKER.find("".join(slots.parts))
    return _cross_findings(MASKER, slots, found), reference_cross_findings(MASKER, slots, found)


def _short_digit_runs(doc: Any) -> bool:
    """Whether the pass leaves a run out: fewer than 9 ASCII digits in all."""
    slots = _slots(doc)
    runs: dict = {}
    for i, key in enumerate(slots.sibs):
        if key is not None:
            runs.setdefault(key, []).append(slots.texts[i])
    return any(len(r) > 1 and len(j := "".join(r)) < 9 and j.isascii() and j.isdigit()
               for r in runs.values())


@settings(max_examples=400, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(docs)
def test_cross_findings_match_the_reference(doc):
    # the same findings; where runs of a few digits were left out, at least the same (the
    # others' text only comes closer: context can be gained, not lost)
    got, want = _both(doc)
    if _short_digit_runs(doc):
        assert all(w in got for w in want)
    else:
        assert got == want


DIGITS_CONTEXT = ["ssn ", "social security ", "call ", "phone number ", "aws secret key ",
                  "password=", 'password: "', "Bearer ", "card ", "+", "+1 ", "tel: "]


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=8), st.sampled_from(DIGITS_CONTEXT),
       st.sampled_from(["", "\n\n"]))
def test_fewer_than_nine_digits_alone_hold_nothing(digits, before, gap):
    # why a run of fewer than 9 ASCII digits can be left out of the cross-field text: no
    # built-in finds anything in it, whatever words come before it
    text = before + gap + digits
    assert MASKER.detectors.digits_alone_min == 9
    start = len(before + gap)
    assert not [f for f in MASKER.find("x\n\n" + text + "\n\n") if f.end > start + 3]


@pytest.mark.parametrize("doc,crossing", [
    ({"n": [4111, 1111, 1111, 1111, None]}, True),              # numbers only, a card
    ({"a": "card 4111 ", "b": "1111 1111 ", "c": "1111"}, True),   # strings
    (["ssn", "536", "22", "4519"], True),                       # the spaced join
    ({"a": "x " * 300 + "jane.doe", "b": "@example.com " + "y " * 300}, True),  # windows
    ({"a": ["sk-proj-Xi", "8tcNiHV9awbCcvilTeT3Blbk", "FJ3UDnpdEwNNm6wVBpYM0o"]}, True),
    ([["ssn", "536", "22", "4519"], ["4111", "1111", "1111", "1111"], ["+1", "415 555",
                                                                      " 0132"]], True),
    ({"a": "x" * 300, "b": "4111" * 100, "c": "1111 " * 80 + "z" * 300}, False),
    ({"rows": [{"id": i, "qty": i % 7, "ok": True} for i in range(50)]}, False),
    ([{"id": 5, "n": 536, "m": 22}, {"a": "ssn", "b": 536, "c": 22, "d": 4519}], True),
])
def test_cross_findings_match_the_reference_on_known_splits(doc, crossing):
    got, want = _both(doc)
    assert got == want
    assert bool(want) == crossing


def test_custom_detectors_keep_every_run():
    ds = DetectorSet(MaskingConfig(custom=(CustomDetector("EMPLOYEE_ID", r"[0-9]{6}"),)))
    assert ds.digits_alone_min == 0
    masker = Masker(ds, b"k")
    slots = _slots({"a": 123, "b": 456})
    found = masker.find("".join(slots.parts))
    got = _cross_findings(masker, slots, found)
    assert got == reference_cross_findings(masker, slots, found)
    assert [e for e, _, _ in got] == ["EMPLOYEE_ID"]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.text(alphabet="ab1２é _-.", min_size=1, max_size=4), min_size=2, max_size=6))
def test_junctions_are_the_word_junctions(run):
    gaps = [_word_junction(a[-1:], b[:1]) for a, b in zip(run, run[1:], strict=False)]
    assert _junctions(run, "".join(run)) == (gaps if any(gaps) else None)


# ---------------------------------------------------------------- normalize, replays
@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.text(alphabet="%CcDEefF0189AaBb4x é", max_size=40))
def test_utf8_escapes_are_looked_for_wherever_they_can_be(text):
    assert N._pct_utf8_units_after(text, N._pct_units(text)) == N._pct_utf8_units(text)
    dense = text * 80  # '%' denser than _pct_units' loop takes: the regex path
    assert N._pct_utf8_units_after(dense, N._pct_units(dense)) == N._pct_utf8_units(dense)


def test_a_utf8_escape_is_still_folded():
    assert N.normalize("call %EF%BC%94111 now, 50% off").text == "call 4111 now, 50% off"


def _replays_one_by_one(session: Session, items: list, restorable: bool) -> bool:
    with session.lock:
        for entity, value, ph in items:
            if session._by_raw.get((entity, value)) != ph or (
                    restorable and session._restore.get(ph) != value):
                return False
    return True


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["EMAIL", "PHONE"]), st.sampled_from(["a", "b", "c"]),
                          st.sampled_from(["[EMAIL_1]", "[EMAIL_2]", "[PHONE_1]", "[X]"])),
                max_size=12), st.booleans())
def test_replays_answers_as_one_check_per_item(items, restorable):
    session = Session()
    for entity, value in (("EMAIL", "a"), ("EMAIL", "b"), ("PHONE", "c")):
        session.placeholder(entity, value, restorable=entity == "EMAIL")
    assert session.replays(iter(items), restorable) == \
        _replays_one_by_one(session, items, restorable)


def _state(session: Session) -> tuple:
    return (list(session._by_value.items()), dict(session._by_raw),
            list(session._restore.items()), dict(session._counters), session.bytes,
            session._raw_bytes)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["EMAIL", "PHONE", "US_SSN"]),
                          st.sampled_from(["a@x.io", "A@X.IO", "b@x.io", "4155550132",
                                           "415-555-0132", "536-22-4519", "c" * 300])),
                max_size=30),
       st.lists(st.tuples(st.sampled_from(["EMAIL", "PHONE"]), st.sampled_from(["a@x.io", "z"])),
                max_size=4),
       st.booleans(), st.sampled_from([(10_000, 1 << 20), (3, 1 << 20), (50, 2_000)]))
def test_placeholders_in_one_batch_are_the_calls_one_by_one(items, seen, restorable, bounds):
    # same answers and the same map afterwards, also past the session's bounds (values
    # forgotten, the spelling shortcut cleared between two values of one batch)
    one, batch = Session(*bounds), Session(*bounds)
    for s in (one, batch):
        for entity, value in seen:
            s.placeholder(entity, value, not restorable)
    want = [one.placeholder(e, v, restorable) for e, v in items]
    assert batch.placeholders(items, restorable) == want
    assert _state(batch) == _state(one)
    assert MASKER.replacements(items, None, restorable) == \
        [MASKER.replacement(e, v, None, restorable) for e, v in items]
