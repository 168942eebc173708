"""addons/frame/principal.py: the identity key is exactly json.dumps([iss, sub]) — the
written form other replicas (and Postgres-shared placeholder maps) key by — for any
strings, including non-ASCII, control characters, quotes and lone surrogates."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from addons.frame.principal import ANONYMOUS, principal

ODD = ["", "alice", 'a"b\\c', "\x00\x1f\x7f", "é ü 中文 🙂", "\ud800", "line\nbreak", "</script>"]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.sampled_from(ODD)), st.one_of(st.text(min_size=1),
                                                             st.sampled_from(ODD[1:])))
def test_same_as_json_dumps(iss: str, sub: str) -> None:
    assert principal({"iss": iss, "sub": sub}) == json.dumps([iss, sub])
    assert "\x00" not in principal({"iss": iss, "sub": sub})


def test_anonymous_and_odd_types() -> None:
    assert principal(None) == principal({}) == principal({"sub": ""}) == ANONYMOUS
    assert principal({"sub": 7}) == ANONYMOUS
    assert principal({"sub": "bob", "iss": 3}) == json.dumps(["", "bob"])
    assert principal({"sub": "bob"}) == '["", "bob"]'
