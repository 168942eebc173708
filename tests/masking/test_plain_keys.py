"""JSON object keys are left out of the text the detectors read only when the detectors
themselves vouch for them (Masker.plain_key -> DetectorSet.plain_word), never by their look.

The walk used to skip every key shorter than 6 characters and every key of letters and
'_' only (bodies._PLAIN_KEY), remembered in a process-wide set: a Hugging Face token
(`hf_` + 34 letters), an org token, an AWS access key id of letters, a Stripe or GitHub
token that happens to hold no digit are exactly such keys, and went upstream unmasked as
the key of any object (a tool's arguments, a message's metadata, the body itself); and a
custom detector's short match (`PRJ42`) as a key was never read either."""

from __future__ import annotations

import json
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.masking import masker as masker_mod
from addons.masking.addon import mask_message
from addons.masking.bodies import Masked, MessageCaches
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session, session_key

_R = random.Random(7)
_L = string.ascii_letters
# secrets a built-in detector finds, written with letters and '_' only
TOKENS = {
    "HUGGINGFACE_TOKEN": "hf_" + "".join(_R.choice(_L) for _ in range(34)),
    "HUGGINGFACE_ORG": "api_org_" + "".join(_R.choice(_L) for _ in range(34)),
    "AWS_ACCESS_KEY": "AKIA" + "".join(_R.choice(string.ascii_uppercase) for _ in range(16)),
    "STRIPE_KEY": "sk_live_" + "".join(_R.choice(_L) for _ in range(24)),
    "GITHUB_TOKEN": "github_pat_" + "".join(_R.choice(_L + "_") for _ in range(82)),
}


def _masker(cfg: MaskingConfig | None = None) -> Masker:
    return Masker(DetectorSet(cfg or MaskingConfig()), b"test-key")


def _bodies(tok: str) -> list[dict]:
    return [
        {tok: "v"},
        {"model": "m", "messages": [{"role": "user", "content": "hi", "metadata": {tok: 1}}]},
        {"model": "m", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {tok: {}}}}}],
         "messages": [{"role": "user", "content": "hi"}]},
    ]


@pytest.mark.parametrize("entity", sorted(TOKENS))
def test_a_token_as_a_key_is_masked(entity):
    tok = TOKENS[entity]
    m = _masker()
    assert m.find(tok), "the detectors find it as a value"
    for body in _bodies(tok):
        for cached in (False, True):  # the whole-body walk, and the per-message one
            found: dict = {}
            caches = MessageCaches()
            session = Session()
            ctx = Masked(m, session, found, dialect="openai",
                         cache=caches.get(session_key("a", "s"), session, m)
                         if cached else None)
            out = mask_message(ctx, json.dumps(body).encode(), "", "application/json",
                               1 << 20, False)
            assert out is not None and tok not in out.decode(), (body, out)
            assert found
    assert tok not in getattr(m, "plain_keys", ())


def test_a_custom_detectors_match_as_a_short_key_is_masked():
    m = _masker(MaskingConfig(custom=(CustomDetector("PROJECT", r"PRJ[0-9]{2}"),
                                      CustomDetector("CODENAME", r"bluebird"))))
    found: dict = {}
    out = mask_message(Masked(m, Session(), found, dialect="openai"),
                       json.dumps({"PRJ42": 1, "bluebird": 2, "messages": [
                           {"role": "user", "content": "x"}]}).encode(),
                       "", "application/json", 1 << 20, False)
    assert out is not None
    text = out.decode()
    assert "PRJ42" not in text and "bluebird" not in text, text
    assert set(found) == {"PROJECT", "CODENAME"}
    for key in ("PRJ42", "bluebird", "content"):
        assert not m.plain_key(key)  # custom patterns may read anything: every key walked


def test_plain_field_names_are_still_plain_and_remembered_bounded(monkeypatch):
    m = _masker()
    for key in ("role", "content", "finish_reason", "tool_calls", "n", "top_p"):
        assert m.plain_key(key)
        assert key in m.plain_keys
    for key in ("user@example.com", "4111111111111111", "key-1", "x" * 65):
        assert not m.plain_key(key)
        assert key not in m.plain_keys
    monkeypatch.setattr(masker_mod, "PLAIN_KEYS_MAX", 10)
    m = _masker()
    for i in range(100):
        m.plain_key("k" + "".join(chr(97 + (i >> s) % 26) for s in (0, 5)))
    assert len(m.plain_keys) == 10


# text a key may stand after in a body: context words of every built-in that reads one
CONTEXTS = ["", "aws_secret_access_key", "AWS secret key:", "password", "password=",
            "Authorization: Bearer", "token", "api_key:", "iban", "card number", "ssn",
            "-----BEGIN RSA PRIVATE KEY-----"]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(key=st.text(alphabet=_L + "_", min_size=1, max_size=64),
       before=st.sampled_from(CONTEXTS), after=st.sampled_from(CONTEXTS))
def test_a_plain_key_holds_no_finding_between_any_slots(key, before, after):
    """What plain_word vouches for holds where a key really stands: between two slot
    breaks, any context word before or after it (the claim behind leaving it out)."""
    ds = DetectorSet(MaskingConfig())
    if not ds.plain_word(key):
        return
    text = before + "\n\n" + key + "\n\n" + after
    lo, hi = len(before) + 2, len(before) + 2 + len(key)
    assert not [f for f in ds.find(text) if f.start < hi and f.end > lo], (key, before)
