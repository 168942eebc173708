"""A request's header fields that the session sent before with nothing found are not
scanned again (bodies.Masked.header_fields with the session's MessageCache): compared with
a twin session without a cache over sequences of header sets — repeated, changed, with a
value in some turns only, context split over fields, names that hold values — the fields,
the findings and the session's map are identical at every turn; the shortcut is taken; a
header set with a value after clean ones is masked; one session's sets do not answer for
another's.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking.bodies import Masked, MessageCaches
from addons.masking.config import MaskingConfig
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session

DETECTORS = DetectorSet(MaskingConfig())
PASSED = MaskingConfig().headers_pass
BASE = [("host", "api.openai.com"), ("user-agent", "OpenAI/Python 1.54.3"),
        ("content-length", "1234"), ("x-agent-session", "agent-7"),
        ("x-stainless-lang", "python"), ("x-trace", "abc")]
VALUES = ["abc", "agent-7", "4111 1111 1111 1111", "4111 1111", "1111 1111",
          "jane.doe@example.com", "aws_secret_access_key", SAMPLES["AWS_SECRET_KEY"][24:],
          "ghp_5ytzwHhANLUH8nLYuJoEoxq0bUfEJ0dpayuX", "+1 415 555 0132", "", "x" * 40]
NAMES = ["x-trace", "x-note", "x-aws-secret-access-key", "x-card", "jane.doe@example.com"]


def _turns(masker: Masker, sets: list[list[tuple[str, str]]], cached: bool
           ) -> list[tuple[Any, dict, dict]]:
    session = Session()
    cache = MessageCaches().get("s", session, masker) if cached else None
    out = []
    for fields in sets:
        found: dict = {}
        new = Masked(masker, session, found, cache=cache).header_fields(list(fields), PASSED)
        out.append((new, found, dict(session._by_value)))
    return out


header_sets = st.lists(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
                                max_size=4).map(lambda extra: BASE + extra),
                       min_size=1, max_size=4)


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(header_sets, st.integers(0, 3))
def test_cached_turns_equal_uncached(sets, repeat):
    # each set again after the others (a clean one is then taken from the cache)
    seq = sets + sets[:repeat] + sets
    assert _turns(Masker(DETECTORS, b"k"), seq, True) == \
        _turns(Masker(DETECTORS, b"k"), seq, False)


def test_random_sequences_with_values_in_some_turns():
    rng = random.Random(16)
    for _ in range(60):
        seq = []
        for _ in range(8):
            extra = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randrange(3))]
            seq.append(BASE + extra if rng.random() < 0.5 else BASE)
        assert _turns(Masker(DETECTORS, b"k"), seq, True) == \
            _turns(Masker(DETECTORS, b"k"), seq, False)


def test_a_clean_set_is_not_scanned_again_and_a_value_is_masked():
    masker = Masker(DETECTORS, b"k")
    scanned: list[str] = []
    real = masker.find
    masker.find = lambda t: (scanned.append(t), real(t))[1]  # type: ignore[method-assign]
    leaky = BASE[:-1] + [("x-trace", "jane.doe@example.com")]
    got = _turns(masker, [BASE, BASE, BASE, leaky, BASE], True)
    assert len(scanned) == 2  # the first clean set, then the one with a value
    assert got[0][0] is None and got[1][0] is None and got[4][0] is None
    assert got[3][0] is not None and ("x-trace", "[EMAIL_1]") in got[3][0]


def test_context_split_over_fields_is_not_taken_for_clean():
    # the key alone is clean; with the context word in another field it is a finding:
    # the set is the key, not each field
    masker = Masker(DETECTORS, b"k")
    key = SAMPLES["AWS_SECRET_KEY"].split("= ")[1]
    alone = BASE + [("x-a", key)]
    with_word = BASE + [("x-n", "aws_secret_access_key"), ("x-a", key)]
    got = _turns(masker, [alone, alone, with_word, alone], True)
    assert got[0][0] is None and got[3][0] is None
    assert got[2][0] is not None and key not in str(got[2][0])


def test_one_sessions_clean_sets_are_its_own():
    masker = Masker(DETECTORS, b"k")
    caches = MessageCaches()
    scanned: list[str] = []
    real = masker.find
    masker.find = lambda t: (scanned.append(t), real(t))[1]  # type: ignore[method-assign]
    for key in ("alice", "bob"):
        session = Session()
        Masked(masker, session, {}, cache=caches.get(key, session, masker)).header_fields(
            BASE, PASSED)
    assert len(scanned) == 2


def _both_ways(masker: Masker, sets: list[list[tuple[str, str]]], cached: bool
               ) -> list[tuple[Any, dict, dict]]:
    """Header sets of requests and responses in turn in ONE session (one cache): a
    response's headers are masked with restorable=False, as the addon's responseheaders."""
    session = Session()
    cache = MessageCaches().get("s", session, masker) if cached else None
    out = []
    for i, fields in enumerate(sets):
        found: dict = {}
        new = Masked(masker, session, found, restorable=i % 2 == 0, cache=cache) \
            .header_fields(list(fields), PASSED)
        out.append((new, found, dict(session._by_value), dict(session._restore)))
    return out


@settings(max_examples=200, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(header_sets, st.integers(0, 3))
def test_response_header_sets_cached_equal_uncached(sets, repeat):
    # requests and responses of a session share its clean sets: the same fields, findings
    # and map (placeholders and what they restore) as with no cache at all
    seq = sets + sets[:repeat] + sets + sets[::-1]
    assert _both_ways(Masker(DETECTORS, b"k"), seq, True) == \
        _both_ways(Masker(DETECTORS, b"k"), seq, False)


def test_the_addon_scans_a_sessions_clean_response_headers_once(tmp_path) -> None:
    from mitmproxy import http
    from mitmproxy.test import taddons, tutils

    from tests.masking.test_addon import addon_for, chat, flow, run
    m = addon_for(tmp_path)
    scanned: list[str] = []
    real = m._masker.find
    m._masker.find = lambda t: (scanned.append(t), real(t))[1]  # type: ignore[method-assign]
    hdrs = [("x-upstream-build", "upstream/1.2"), ("x-ratelimit-remaining", "99"),
            ("content-type", "application/json")]

    def answer(extra: list[tuple[str, str]]) -> http.HTTPFlow:
        f = flow("openai", chat("hello"), headers={"x-agent-session": "s1"})
        with taddons.context(m):
            run(m.request(f))
            f.response = tutils.tresp(content=b"{}", headers=http.Headers(
                [(k.encode(), v.encode()) for k, v in hdrs + extra]))
            scanned.clear()
            m.responseheaders(f)
        return f

    first = answer([])
    assert any("upstream/1.2" in t for t in scanned)  # scanned the first time
    again = answer([])
    assert not any("upstream/1.2" in t for t in scanned)  # the same clean set: not again
    leaky = answer([("x-debug", "ann@example.com")])
    assert any("upstream/1.2" in t for t in scanned)
    assert "ann@example.com" not in str(leaky.response.headers)
    assert "EMAIL" in leaky.metadata["findings"]
    assert first.response.headers["x-upstream-build"] == \
        again.response.headers["x-upstream-build"] == "upstream/1.2"
