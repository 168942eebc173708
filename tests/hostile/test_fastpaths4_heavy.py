"""Hostile: bodies crafted to be cheap by the loop-or-thread estimate (masking addon
_heavy) but expensive to mask. The estimate counted what starts findings — '@', digits,
'%', bytes past ASCII — and nothing else, so provider secrets made of letters alone
(AWS key ids 'AKIA' + 16 upper-case letters, GitHub 'ghp_', GitLab 'glpat-' tokens in
lower case, Google 'AIza' keys, Slack hook paths: each ~12-30 us to find, check and
replace) came out as plain prose: ~50 KB of them were masked on the event loop, holding
every other flow of the gateway 15-35 ms per request (in process, this machine). Such a
body now goes to a worker thread (the bytes sent are the same), while prose of that size
(a few per cent capitals) stays on the loop.

Through the real masking addon with its real detectors (the rules' masking section), the
flow's parse made as policy makes it; hand-overs to a thread counted (as in
tests/masking/test_loop_budget.py)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from addons.masking import addon as masking_addon
from tests.frame.threadcount import count_to_thread
from tests.hostile.test_fastpaths3_inline import _addon
from tests.masking.test_loop_budget import PLAIN, _reference, _send

_rnd = random.Random(7)


def _tok(n: int, alphabet: str = string.ascii_letters) -> str:
    return "".join(_rnd.choice(alphabet) for _ in range(n))


LETTER_SECRETS = {
    "aws key ids": " ".join("AKIA" + _tok(16, string.ascii_uppercase) for _ in range(2400)),
    "github tokens": " ".join("ghp_" + _tok(36) for _ in range(1200)),
    "google keys": " ".join("AIza" + _tok(35) for _ in range(1400)),
    "github tokens, lower case": " ".join("ghp_" + _tok(36, string.ascii_lowercase)
                                          for _ in range(1200)),
    "gitlab tokens, lower case": " ".join("glpat-" + _tok(20, string.ascii_lowercase)
                                          for _ in range(2000)),
    "slack hooks": " ".join("https://hooks.slack.com/services/" + _tok(30)
                            for _ in range(900)),
}


@pytest.mark.parametrize("what", list(LETTER_SECRETS))
def test_a_body_of_letter_only_secrets_is_masked_in_a_thread(tmp_path: Path, monkeypatch,
                                                             what: str) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    text = LETTER_SECRETS[what]
    doc = {"model": "m", "messages": [{"role": "user", "content": text}]}
    assert len(json.dumps(doc)) < masking_addon.THREAD_MIN_BYTES
    assert not any(c.isdigit() or c in "@%" for c in text) and text.isascii()
    got = _send(m, doc)
    assert len(threaded) == 1, what
    assert got == _reference(m, doc)
    assert text.split()[0].encode() not in got and text.split()[-1].encode() not in got


def test_prose_with_capitals_stays_on_the_loop(tmp_path: Path, monkeypatch) -> None:
    """Not every long body goes to a thread: 40 KB of sentences with their capitals."""
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = _addon(tmp_path)
    prose = (PLAIN.replace("the order", "The order") * 4)[:40_000]
    doc = {"model": "m", "messages": [{"role": "user", "content": prose}]}
    assert len(json.dumps(doc)) < masking_addon.THREAD_MIN_BYTES
    got = _send(m, doc)
    assert got == _reference(m, doc)
    assert len(threaded) == 0
