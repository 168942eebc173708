"""Hostile review of the shared decoder's charset rule (addons/frame/decode.py charset_of)
and masking's reading of text and form bodies, through a real mitmdump.

A media type that is not JSON may declare a charset. JSON parsers ignore it (RFC 8259),
and so do most form parsers; the gateway honoured it. A UTF-8 body declared
`charset=cp037` (EBCDIC), `utf-16` or `utf-32` read as noise to policy and masking, while
the upstream read the JSON or the form in clear: a blocked model passed, an e-mail and a
card number were forwarded unmasked. A declared charset that reads the body as other ASCII
text than the sniffed charset is now refused (415) by every step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Gateway
from tests.hostile.policykit import client

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com"
OPENAI = "https://api.openai.com"
CARD = "4111111111111111"
EMAIL = "ann.lee@example.com"
POLICY = """
policies:
  - name: no-gpt5
    match: {model: ["gpt-5*"]}
    action: block
"""
# a UTF-8 body is what a JSON-reading (or charset-ignoring) upstream takes it for
LYING = ["text/plain; charset=cp037", "text/plain; charset=utf-16",
         "application/octet-stream; charset=utf-32-be", "text/plain; charset=cp500",
         "application/x-www-form-urlencoded; charset=utf-16-le"]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity + POLICY)


def still_serving(c) -> None:
    r = c.post(HOOK + "/ok", json={"hello": "world"})
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("ctype", LYING)
def test_a_lying_charset_hides_neither_model_nor_pii(gw, standin, ctype) -> None:
    blocked = json.dumps({"model": "gpt-5", "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    pii = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"mail {EMAIL} card {CARD[:4]} {CARD[4:8]} "
                                    f"{CARD[8:12]} {CARD[12:]}"}]}).encode()
    with client(gw) as c:
        standin.clear()
        r = c.post(OPENAI + "/v1/chat/completions", content=blocked,
                   headers={"content-type": ctype, "authorization": "Bearer sk-agent"})
        assert r.status_code >= 400, (ctype, r.status_code, r.text[:300])
        assert not any("gpt-5" in x["body"] for x in standin.requests), ctype
        # refused in the caller's dialect
        assert "error" in r.json(), r.text[:300]
        standin.clear()
        r = c.post(OPENAI + "/v1/chat/completions", content=pii,
                   headers={"content-type": ctype, "authorization": "Bearer sk-agent"})
        got = " ".join(x["body"] for x in standin.requests)
        assert EMAIL not in got and CARD[:4] + " " + CARD[4:8] not in got, (ctype, got)
        still_serving(c)


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded; charset=cp037",
                                   "application/x-www-form-urlencoded; charset=utf-16-le",
                                   "text/plain; charset=cp500", "text/csv; charset=utf-7"])
def test_a_lying_charset_hides_no_pii_on_a_webhook(gw, standin, ctype) -> None:
    body = f"mail={EMAIL}&card={CARD}&note=+1-".encode()
    with client(gw) as c:
        standin.clear()
        r = c.post(HOOK + "/form", content=body, headers={"content-type": ctype})
        got = " ".join(x["body"] for x in standin.requests)
        assert EMAIL not in got and CARD not in got, (ctype, r.status_code, got)
        assert r.status_code in (200, 400, 415), (ctype, r.status_code, r.text[:300])
        still_serving(c)


@pytest.mark.parametrize("ctype,body", [
    # honest declarations keep working: Latin-1 (a UTF-8 mix-up differs only in non-ASCII
    # characters), ASCII in any ASCII-compatible charset, UTF-16 with its BOM
    ("text/plain; charset=iso-8859-1", f"caf\xe9 {EMAIL}".encode("latin-1")),
    ("application/x-www-form-urlencoded; charset=windows-1252",
     f"mail={EMAIL}&n=caf\xe9".encode("cp1252")),
    ("text/plain; charset=us-ascii", f"mail {EMAIL}".encode()),
    ("text/plain; charset=utf-16", f"\ufeffmail {EMAIL}".encode("utf-16-le")),
])
def test_honest_charsets_are_masked_and_forwarded(gw, standin, ctype, body) -> None:
    with client(gw) as c:
        standin.clear()
        r = c.post(HOOK + "/text", content=body, headers={"content-type": ctype})
        assert r.status_code == 200, (ctype, r.status_code, r.text[:300])
        got = standin.requests[0]["body"]
        assert EMAIL not in got and "EMAIL_1" in got.replace("\x00", ""), (ctype, got)


@pytest.mark.parametrize("ctype,body", [
    # a UTF-16 BOM (or NUL pattern) in front of UTF-8 text: the decoder reads noise in
    # UTF-16, an upstream that takes the type's charset (or skips the BOM) reads the text
    ("text/plain", b"\xff\xfe" + f"mail {EMAIL} card {CARD}".encode()),
    ("application/x-www-form-urlencoded", b"\xfe\xff" + f"m={EMAIL}&c={CARD}x".encode()),
    ("text/plain; charset=utf-8", b"\xff\xfe" + f"mail {EMAIL} card {CARD}".encode()),
    ("application/octet-stream", b"m\x00" + f"ail {EMAIL} card {CARD}".encode()),
])
def test_bytes_that_say_another_charset_hide_no_pii(gw, standin, ctype, body) -> None:
    with client(gw) as c:
        standin.clear()
        r = c.post(HOOK + "/bytes", content=body, headers={"content-type": ctype})
        got = " ".join(x["body"] for x in standin.requests)
        assert EMAIL not in got and CARD not in got, (ctype, r.status_code, got)
        assert r.status_code in (200, 400, 415), (ctype, r.status_code, r.text[:300])
        still_serving(c)
