"""The body walk's shortcuts for keys and values (bodies._Slots._walk_dict): a key the
masker vouched for once (Masker.plain_keys, filled only by its detectors' own answer,
DetectorSet.plain_word) is not asked again, and a value too short to be a base64 payload is
not handed to _is_binary_field: the slots walked (texts, positions, siblings) are those of
the walk without either shortcut, on generated documents; the remembered keys stay bounded
whatever keys a sender chooses; without a masker that can tell, every key is walked."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import bodies
from addons.masking import masker as masker_mod
from addons.masking.bodies import _Slots
from addons.masking.config import MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker

MASKER = Masker(DetectorSet(MaskingConfig()), b"test-key")

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


def _slots(doc: Any, llm: bool, masker: Any = MASKER) -> tuple:
    s = _Slots(llm, cow=True, masker=masker)
    s.walk(doc, -1)
    sibs = {}
    return (s.texts, s.starts, [sibs.setdefault(k, len(sibs)) if k is not None else None
                                for k in s.sibs], s.forced, s.pos)


def _reference_walk_key(self: _Slots, chain: Any, k: str, owner: int) -> None:
    # asked of the detectors every time (nothing remembered)
    if MASKER.detectors.plain_word(k):
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
        # every key handed to _walk_key, which asks the detectors itself
        m.setattr(masker_mod.Masker, "plain_key", lambda self, k: False)
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
    monkeypatch.setattr(masker_mod, "PLAIN_KEYS_MAX", 50)
    masker = Masker(DetectorSet(MaskingConfig()), b"test-key")
    doc = {("k" * 6) + "".join(chr(97 + (i >> s) % 26) for s in (0, 5, 10)): "v"
           for i in range(2000)}
    doc["x" * 100] = "long key"
    _slots(doc, True, masker)
    assert len(masker.plain_keys) <= 50
    assert all(len(k) <= masker_mod.PLAIN_KEY_MAX_LEN for k in masker.plain_keys)


@pytest.mark.parametrize("key", ["api-key-4111", "user@example.com", "Ünïcode_key",
                                 "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"])
def test_a_key_that_is_not_plain_is_never_remembered(key):
    masker = Masker(DetectorSet(MaskingConfig()), b"test-key")
    texts = _slots({key: "v", "content": "w"}, True, masker)[0]
    assert key in texts
    assert key not in masker.plain_keys and "content" in masker.plain_keys


def test_without_a_masker_every_key_is_walked():
    texts = _slots({"content": "v", "role": "w"}, True, None)[0]
    assert texts == ["content", "v", "role", "w"]
