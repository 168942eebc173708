"""Hostile review of the fast masking engine (addons/masking/fastscan.py, the Hyperscan
prefilter in front of the detectors) through a real mitmdump: every disguise the reference
engine (`DetectorSet(fast=False)`) sees through — digits of other scripts, zero-width and
odd separators, `\\u0034` / `%34` / `&#52;` escapes, a value at the very start or end of a
string — placed where an agent can put it (JSON value, JSON key, URL path, query, header,
form field; percent-encoded as UTF-8 where only ASCII travels) must not reach the
upstream in any reading of it.

`reading()` is written here, independently of addons/masking/normalize.py: Unicode digits
by their digit value, NFKC, format characters and combining marks dropped, the three
escape syntaxes undone; then only the digits (for numbers) or the address (for e-mail)."""

from __future__ import annotations

import html
import json
import re
import unicodedata
from urllib.parse import quote, unquote

import pytest

from addons.masking.detectors import DetectorSet
from tests.conftest import Gateway
from tests.hostile.policykit import client

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com"
CARD = "4111111111111111"
SSN = "536-22-4519"
EMAIL = "ann.lee@example.com"
REF = DetectorSet(fast=False)


def _digits(value: str, base: int) -> str:
    return "".join(chr(base + int(c)) if c.isdigit() else c for c in value)


def _between(value: str, sep: str) -> str:
    return sep.join(value)


def disguises(value: str) -> dict[str, str]:
    out = {
        "fullwidth": _digits(value, 0xFF10),
        "arabic-indic": _digits(value, 0x0660),
        "ext-arabic-indic": _digits(value, 0x06F0),
        "devanagari": _digits(value, 0x0966),
        "math-bold": _digits(value, 0x1D7CE),
        "zwsp": _between(value, "\u200b"),
        "word-joiner": _between(value, "\u2060"),
        "soft-hyphen": _between(value, "\u00ad"),
        "combining": "".join(c + "\u0301" if c.isdigit() else c for c in value),
        "json-escape": "".join(f"\\u{ord(c):04x}" if c.isdigit() or c == "@" else c
                               for c in value),
        "percent": "".join(f"%{ord(c):02X}" if c.isdigit() or c == "@" else c
                           for c in value),
        "html": "".join(f"&#{ord(c)};" if c.isdigit() or c == "@" else c for c in value),
    }
    if value == CARD:
        out |= {"nbsp": "\u00a04111\u00a01111\u00a01111\u00a01111"[1:],
                "en-dash": "4111\u20131111\u20131111\u20131111",
                "minus": "4111\u22121111\u22121111\u22121111",
                "ideographic-space": "4111\u30001111\u30001111\u30001111"}
    if value == SSN:
        out |= {"en-dash": "536\u201322\u20134519", "fullwidth-dash":
                _digits("536\uff0d22\uff0d4519", 0x30)}
    return out


CASES = [(f"{v}:{k}", d) for v in (CARD, SSN, EMAIL) for k, d in disguises(v).items()]


def reading(text: str) -> str:
    """The text as a reader takes it: escapes undone, Unicode digits and compatibility
    forms folded, invisible characters dropped."""
    for _ in range(2):
        text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
        text = html.unescape(unquote(text))
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Mn", "Me"):
            continue
        d = unicodedata.digit(ch, None)
        out.append(str(d) if d is not None else unicodedata.normalize("NFKC", ch))
    return "".join(out)


def leaked(text: str) -> list[str]:
    r = reading(text)
    digits = re.sub(r"[^0-9]", "", r)
    found = [v for v in (CARD, "536224519") if v in digits]
    if EMAIL in r:
        found.append(EMAIL)
    return found


def test_the_reference_engine_and_the_reading_see_every_disguise():
    # both sides of the end-to-end check can fail: each disguise alone is a finding of the
    # reference engine, and the reading below sees the value in it
    for name, text in CASES:
        assert REF.find(f"value {text} end"), name
        assert leaked(text), name


@pytest.fixture
def gwf(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))


def _send_all(gw: Gateway, standin, text: str) -> list[tuple[str, str]]:
    """Send `text` in every place; returns (place, what the upstream received)."""
    raw_json = '{"note": "' + text + '", "start": "' + text + ' x", "end": "x ' + text + \
        '", "' + text + '": 1}'
    got = []
    with client(gw) as c:
        for place, kw, path in [
            ("json", {"content": raw_json.encode(),
                      "headers": {"content-type": "application/json"}}, "/j"),
            ("json, percent-encoded", {"json": {"note": quote(text, safe=_PRINTABLE)}},
             "/jp"),
            ("form", {"content": ("f=" + quote(text) + "&" + quote(text) + "=v").encode(),
                      "headers": {"content-type": "application/x-www-form-urlencoded"}},
             "/f"),
            # a header carries ASCII: only the other characters percent-encoded (UTF-8)
            ("header", {"headers": {"x-note": quote(text, safe=_PRINTABLE)},
                        "content": b"{}"}, "/h"),
            ("query", {"content": b"{}"}, "/q?note=" + quote(text, safe="%&#;\\")),
            ("path", {"content": b"{}"}, "/p/" + quote(text, safe="%&#;\\") + "/tail"),
        ]:
            standin.clear()
            r = c.post(HOOK + path, **kw)
            assert r.status_code in (200, 400, 415), (place, r.status_code, r.text[:300])
            for req in standin.requests:
                got.append((place, req["path"] + " " + json.dumps(req["headers"],
                                                                   ensure_ascii=False)
                            + " " + req["body"]))
        standin.clear()
        r = c.post(HOOK + "/ok", json={"hello": "world"})
        assert r.status_code == 200, r.text[:300]
    return got


def test_disguised_values_reach_the_upstream_nowhere(gwf, standin) -> None:
    bad = []
    for name, text in CASES:
        for place, received in _send_all(gwf, standin, text):
            if leaked(received):
                bad.append((name, place, received[:300]))
    assert bad == [], " ".join(f"{n}@{p}" for n, p, _ in bad)
