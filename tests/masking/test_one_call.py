"""Body masking's two detector passes in one call (bodies.Masked._detect): the slots' text
and the cross-field text joined by DetectorSet.isolating_break must give exactly the
findings of two calls (the reference: bodies.USE_ONE_CALL off) — the same bytes, findings,
placeholders and session map — on generated documents (values split over siblings, context
words, private-key blocks, escapes, non-ASCII) and on crafted ones where a separator that
is too short, or lacks the BEGIN line that stops a key block, changes the answer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import bodies
from addons.masking.bodies import Masked, _cross_findings, _Slots
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session

MASKER = Masker(DetectorSet(MaskingConfig()), b"test-key")
REFERENCE = Masker(DetectorSet(MaskingConfig(), fast=False), b"test-key")

PEM_HEAD = "-----BEGIN " + "RSA PRIVATE KEY-----"
PEM_BODY = "\n".join(["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"] * 3)
PEM_FOOT = "-----END " + "RSA PRIVATE KEY-----"
AWS_KEY = "kW9pQ2xR7vT4mN8bZ3cF6hJ1sL5dG0yA/EuIoP+q"


def _masked(masker: Masker, doc: Any, one_call: bool, dialect: str = "generic"
            ) -> tuple[bytes | None, dict, dict]:
    saved = bodies.USE_ONE_CALL
    bodies.USE_ONE_CALL = one_call
    try:
        session = Session()
        found: dict = {}
        raw = json.dumps(doc).encode()
        out = Masked(masker, session, found, restorable=True, dialect=dialect).body(
            raw, "application/json")
        return out, found, dict(session._by_value)
    finally:
        bodies.USE_ONE_CALL = saved


def _same(masker: Masker, doc: Any, dialect: str = "generic") -> tuple[bytes | None, dict]:
    one = _masked(masker, doc, True, dialect)
    two = _masked(masker, doc, False, dialect)
    assert one == two
    return one[0], one[1]


# ---------------------------------------------------------------- generated documents
pieces = st.sampled_from([
    "4111", " 1111", "1111 ", "jane.doe", "@example.com", "+1 415", " 555 0132", "sk-proj-Xi",
    "8tcNiHV9awbCcvilTeT3BlbkFJ3UDnpdEwNNm6wVBpYM0o", "aws_secret_access_key = ", AWS_KEY[:20],
    AWS_KEY[20:], "password: \"", "hunter2!x9\"", "Bearer ", "eyJhbGciOiJIUzI1NiJ9abc123",
    "ssn ", "078-05-", "1123", "192.168.", "1.20", "DE89 3704 ", "0044 0532 0130 00", "call ",
    PEM_HEAD + "\n", PEM_BODY, "\n" + PEM_FOOT, PEM_FOOT, "\\u0034111", "%34", "&#52;",
    "４１１１", "é", "z\u200b", "\n\n", " ", "-----BEGIN ", "x" * 300, "12", "450",
])
strings = st.lists(pieces, min_size=1, max_size=4).map("".join)
scalars = st.one_of(strings, st.integers(0, 10**20), st.none())
docs = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6),
    st.dictionaries(st.sampled_from(["a", "b", "text", "content", "role", "key"]), inner,
                    max_size=5)), max_leaves=30)


@settings(max_examples=400, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(docs)
def test_one_call_is_two_calls(doc):
    if not isinstance(doc, dict | list):
        doc = [doc]
    _same(MASKER, doc)
    _same(MASKER, {"messages": [{"role": "user", "content": doc}]}, "openai")


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(docs)
def test_one_call_is_two_calls_reference_engine(doc):
    _same(REFERENCE, doc if isinstance(doc, dict | list) else [doc])


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(list(SAMPLES.values()) + ["", " ", "x", "\n"]),
                min_size=2, max_size=6), st.integers(1, 30))
def test_split_samples(values, cut):
    # every sample value split in two over siblings, among other fields
    run = []
    for v in values:
        run += [v[:cut], v[cut:]] if len(v) > cut else [v]
    out, found = _same(MASKER, {"run": run, "tail": values[-1], "n": 4111})
    assert out is None or b"[" in out or found


# ---------------------------------------------------------------- crafted documents
# the cross text's first plan is the first run of siblings; the slots' text ends with the
# document's last slot: what a separator must keep apart
CONTEXT_DOC = {"a": [AWS_KEY[:20], AWS_KEY[20:]], "z": "aws_secret_access_key"}
# a key block that the slots' text leaves open (no END line in it: the run's two halves of
# one are apart there) and the cross text closes with its joined run, after words that are
# no key body: run on to that END line, the block is not a key at all; stopped where the
# slots' text ends, it is the truncated block the first pass finds
PEM_DOC = {"a": ["not base64!", PEM_FOOT[:14], PEM_FOOT[14:]],
           "z": PEM_HEAD + "\n" + PEM_BODY}

# the same with the BEGIN line disguised (a zero-width space: normalising takes it out)
PEM_DOC_HIDDEN = {"a": PEM_DOC["a"],
                  "z": PEM_HEAD.replace("BEGIN", "BEG\u200bIN") + "\n" + PEM_BODY}


# the same with other line breaks (a bare CR, U+2028 close a cut block too: 47a3096), the
# key's slot ending in one (the separator's first LF then makes a CR LF)
PEM_DOC_CR = {"a": PEM_DOC["a"],
              "z": PEM_HEAD + "\r" + PEM_BODY.replace("\n", "\r") + "\r"}
PEM_DOC_LS = {"a": PEM_DOC["a"],
              "z": PEM_HEAD + "\u2028" + PEM_BODY.replace("\n", "\u2028") + "\u2028 "}


@pytest.mark.parametrize("doc", [CONTEXT_DOC, PEM_DOC, PEM_DOC_HIDDEN, PEM_DOC_CR, PEM_DOC_LS,
                                 {"env": ["x", "y"], "z": "DB_PASSWORD=hunter2x9\r"},
                                 {"z": PEM_HEAD + "\n" + PEM_BODY},
                                 {"a": ["4111 1111 ", "1111 1111"], "b": "card"},
                                 {"a": ["jane.doe", "@example.com"]}])
def test_crafted(doc):
    _same(MASKER, doc)
    _same(REFERENCE, doc)


def test_the_shortcut_is_taken():
    seen: list[str] = []
    masker = Masker(DetectorSet(MaskingConfig()), b"test-key")
    find = masker.find
    masker.find = lambda text: (seen.append(text), find(text))[1]  # type: ignore[method-assign]
    _masked(masker, {"a": ["jane.doe", "@example.com"], "b": "x"}, True)
    assert len(seen) == 1
    seen.clear()
    _masked(masker, {"a": ["jane.doe", "@example.com"], "b": "x"}, False)
    assert len(seen) == 2


def test_custom_detectors_take_two_calls():
    ds = DetectorSet(MaskingConfig(custom=(CustomDetector("EMPLOYEE_ID", r"[0-9]{6}"),)))
    assert ds.isolating_break("abc") is None
    _same(Masker(ds, b"k"), {"a": [123, 456], "b": "id 123456"})


@pytest.mark.parametrize("doc", [CONTEXT_DOC, PEM_DOC])
def test_a_weaker_separator_is_caught(doc, monkeypatch):
    # the two crafted documents tell a separator that is too short (context reaches over
    # it) or lacks the BEGIN line (a key block runs over it to the cross text's END line)
    # from the real one: both fail with a weaker one
    if doc is CONTEXT_DOC:
        weak = "\n\n"
    else:
        weak = "\n" * (MASKER.detectors.context_len + 2)
    monkeypatch.setattr(DetectorSet, "isolating_break", lambda self, a: weak)
    one = _masked(MASKER, doc, True)
    two = _masked(MASKER, doc, False)
    assert one != two


def test_detect_matches_the_passes_apart():
    doc = {"a": ["sk-proj-Xi", "8tcNiHV9awbCcvilTeT3BlbkFJ3UDnpdEwNNm6wVBpYM0o"],
           "b": "mail jane.doe@example.com", "c": ["4111 1111 ", "1111 1111"]}
    slots = _Slots(False)
    slots.walk(doc, -1)
    joined = "".join(slots.parts)
    found, cross = Masked(MASKER, Session(), {})._detect(slots, joined)
    want = MASKER.find(joined)
    assert [(f.entity, f.start, f.end) for f in found] == \
        [(f.entity, f.start, f.end) for f in want]
    assert cross == _cross_findings(MASKER, slots, want)
    assert {e for e, _, _ in cross} == {"OPENAI_KEY", "CREDIT_CARD"}
