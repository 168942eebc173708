"""Hostile: policy's literal-anchored prompt patterns (engine.anchor_twin: a pattern whose
first literal follows a fixed-width start is searched from that literal, with the start
checked by a look-behind; also in a session's incremental search, which starts a little
before the end of the text both turns share), through a real mitmdump with custom regex
rules from a rules file. Each second turn grows the first turn's last message so that a
match straddles the join, overlaps a rejected candidate, or depends on a Unicode digit or
word character or on IGNORECASE; the answer (status and what the upstream received) must
be the one the same body gets in a fresh session, and the rules must block exactly where
a reader expects."""

from __future__ import annotations

import re

import httpx
import pytest

from addons.policy.engine import anchor_twin
from tests.conftest import Gateway
from tests.hostile.test_fastpaths3_policy import FILLER, chat, msg, send

pytestmark = pytest.mark.integration

POLICY = r"""policies:
  - name: anchored
    match:
      prompt:
        regex: ['\b\d{3}-\d{2}-\d{4}\b', '(?i)\b\w{2}=token\b', '(?<![\w-])[A-Z]{2}#\d{3}(?!\d)']
    action: block
    message: forbidden pattern
"""

# (name, first turn's last message, second turn's last message, blocked?)
CASES = [
    ("ssn split before the dash", "x 123", "x 123-45-6789", True),
    ("ssn split after the dash", "x 123-", "x 123-45-6789", True),
    ("ssn split in the middle", "x 123-45", "x 123-45-6789 ok", True),
    ("overlapping: first dash rejected", "x 99-12", "x 99-123-45-6789", True),
    ("four digits before the dash", "x 1234", "x 1234-45-6789", False),
    ("a word character after", "x 123-45-678", "x 123-45-6789a", False),
    ("arabic-indic digits", "x \u0661\u0662\u0663",
     "x \u0661\u0662\u0663-\u0664\u0665-\u0666\u0667\u0668\u0669", True),
    ("a letter with an accent before", "x \u00e9", "x \u00e9123-45-6789", False),
    ("ignorecase split at the literal", "x ab", "x ab=TOKEN", True),
    ("ignorecase, longer word", "x ab=TOK", "x ab=Tokens", False),
    ("ignorecase, three letters before", "x abc", "x abc=token", False),
    ("hash: letters then the join", "x QZ", "x QZ#123", True),
    ("hash: a dash before", "x -QZ", "x -QZ#123", False),
    ("hash: a digit after", "x QZ#12", "x QZ#1234", False),
]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity + POLICY)


def test_anchored_patterns_answer_as_fresh_bodies(gw, standin) -> None:
    # every rule here is one the anchored search serves
    for p in (r"\b\d{3}-\d{2}-\d{4}\b", r"(?i)\b\w{2}=token\b",
              r"(?<![\w-])[A-Z]{2}#\d{3}(?!\d)"):
        assert p in POLICY
        assert anchor_twin(re.compile(p)) is not None, p
    bad = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for i, (name, first, second, blocked) in enumerate(CASES):
            base = [msg(FILLER), msg("ok", "assistant")]
            assert send(c, f"a-{i}", chat([*base, msg(first)])) == 200, name
            standin.clear()
            got = send(c, f"a-{i}", chat([*base, msg(second)]))
            up_cont = [r["body"] for r in standin.requests]
            standin.clear()
            want = send(c, f"fresh-{i}", chat([*base, msg(second)]))
            up_full = [r["body"] for r in standin.requests]
            standin.clear()
            if (got, up_cont) != (want, up_full) or (want == 403) != blocked:
                bad.append((name, got, want, blocked))
    assert bad == [], bad
