"""The body walk's shortcuts for keys and values (bodies._Slots._walk_dict): a key of 6+
characters known plain (bodies._PLAIN_KEYS, filled only by _PLAIN_KEY's own answer) is
not asked again, and a value too short to be a base64 payload is not handed to
_is_binary_field: the slots walked (texts, positions, siblings) are those of the walk
without either shortcut, on generated documents; the remembered keys stay bounded
whatever keys a sender chooses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import bodies
from addons.masking.bodies import _Slots

keys = st.one_of(
    st.sampled_from(["content", "finish_reason", "api_key", "aws_secret_access_key",
                     "password", "b64_json", "file_data", "signature", "data", "text",
                     "logprobs", "top_logprobs", "type", "format", "role", "______",
                     "key-4111", "user@example.com", "Ünïcode_key", "sk-proj-abc"]),
    st.text(min_size=0, max_size=12))
values = st.one_of(st.text(max_size=20), st.integers(-10**20, 10**20), st.none(),
                   st.booleans(), st.sampled_from(["A" * 300, "data:image/png;base64," +
                                                   "QUJD" * 80, "4111 1111 1111 1111"]))
docs = st.recursive(values, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=6)), max_leaves=25)


def _slots(doc: Any, llm: bool) -> tuple:
    s = _Slots(llm, cow=True)
    s.walk(doc, -1)
    sibs = {}
    return (s.texts, s.starts, [sibs.setdefault(k, len(sibs)) if k is not None else None
                                for k in s.sibs], s.forced, s.pos)


def _reference_walk_key(self: _Slots, chain: Any, k: str, owner: int) -> None:
    if len(k) < 6 or bodies._PLAIN_KEY.fullmatch(k):
        return

    def rename(new: str) -> None:
        self.rename(chain, k, new)

    self.add(k, rename, owner)


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=docs, llm=st.booleans())
def test_shortcuts_walk_the_same_slots(doc, llm, monkeypatch):
    if not isinstance(doc, dict | list):
        doc = [doc]
    fast = _slots(doc, llm)
    fast_again = _slots(doc, llm)  # keys remembered by the first walk now
    with monkeypatch.context() as m:
        m.setattr(bodies, "_PLAIN_KEYS", set())
        m.setattr(bodies, "PLAIN_KEYS_MAX", 0)  # nothing remembered
        m.setattr(_Slots, "_walk_key", _reference_walk_key)
        # every string value handed to _is_binary_field, which answers as it did
        real, least = bodies._is_binary_field, bodies.BINARY_MIN_LEN

        def binary(d: dict, k: str, v: Any) -> bool:
            return isinstance(v, str) and len(v) >= least and real(d, k, v)

        m.setattr(bodies, "BINARY_MIN_LEN", 0)
        m.setattr(bodies, "_is_binary_field", binary)
        reference = _slots(doc, llm)
    assert fast == reference
    assert fast_again == reference


def test_remembered_keys_are_bounded(monkeypatch):
    monkeypatch.setattr(bodies, "_PLAIN_KEYS", set())
    monkeypatch.setattr(bodies, "PLAIN_KEYS_MAX", 50)
    doc = {("k" * 6) + "".join(chr(97 + (i >> s) % 26) for s in (0, 5, 10)): "v"
           for i in range(2000)}
    doc["x" * 100] = "long key"
    _slots(doc, True)
    assert len(bodies._PLAIN_KEYS) <= 50
    assert all(len(k) <= bodies.PLAIN_KEY_MAX_LEN for k in bodies._PLAIN_KEYS)


@pytest.mark.parametrize("key", ["api-key-4111", "user@example.com", "Ünïcode_key"])
def test_a_key_that_is_not_plain_is_never_remembered(key, monkeypatch):
    monkeypatch.setattr(bodies, "_PLAIN_KEYS", set())
    texts = _slots({key: "v", "content": "w"}, True)[0]
    assert key in texts
    assert key not in bodies._PLAIN_KEYS and "content" in bodies._PLAIN_KEYS
