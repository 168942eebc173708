"""Shapes of provider secrets (API keys, tokens, private keys, JWTs).

Each rule: entity, a literal every match starts with (a cheap `in` test skips the regex when
the literal is absent), the regex, the part whose randomness is checked (group "r"), and the
longest match. Shapes follow the providers' documented formats and the gitleaks /
detect-secrets rules; a shape-matching value that is an obvious stand-in ('xxxx…', 'ZZZZ…',
'abcdefgh…') is not a secret (validators.looks_placeholder).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass

import regex

from addons.validators import looks_placeholder

# characters that continue a token: a match must not be preceded or followed by one
_TOK = r"A-Za-z0-9_\-"


@dataclass(frozen=True, slots=True)
class SecretRule:
    entity: str
    literals: tuple[str, ...]   # the rule runs only when one of these occurs (() = always)
    pattern: regex.Pattern
    max_len: int
    check: Callable[[regex.Match], bool] | None = None
    priority: int = 80


def _c(p: str) -> regex.Pattern:
    return regex.compile(p, regex.V0)


def _random(m: regex.Match) -> bool:
    return not looks_placeholder(m.group("r"))


def _b64json(seg: str) -> bytes | None:
    seg = seg.replace("\\/", "/")
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        return None


def _jwt_ok(m: regex.Match) -> bool:
    """Header must be a JSON object naming alg/typ (strictly, or — for a token with a damaged
    byte — at least look like one: '{"…"alg"…}'); the payload must start like a JSON object."""
    head = _b64json(m.group("h"))
    if head is None:
        return False
    try:
        obj = json.loads(head)
        if not isinstance(obj, dict) or not ({"alg", "typ", "kid", "enc"} & obj.keys()):
            return False
    except (ValueError, UnicodeDecodeError):
        h = head.strip()
        if not (h.startswith(b'{"') and h.endswith(b"}") and (b'"alg"' in h or b'"typ"' in h)):
            return False
    body = _b64json(m.group("p"))
    return body is not None and body.lstrip()[:1] == b"{"


_BLANK_LINE = regex.compile(r"\n[ \t\r]*\n")


def pem_end(m: regex.Match, text: str) -> int | None:
    """End of a private-key block, or None when it has no body (nothing to protect)."""
    body = m.group("body")
    if body is not None:
        return m.end() if body.strip() else None
    start = m.end()
    limit = min(len(text), start + PEM_MAX_BODY)
    blank = _BLANK_LINE.search(text, start, limit)
    end = blank.start() if blank else limit
    while end > start and text[end - 1].isspace():
        end -= 1
    return end if end > start else None


PEM_MAX_BODY = 32 * 1024

# Every pattern starts with its literal (then a look-behind for the character before it):
# the regex engine then skips through text quickly to that literal.
SECRET_RULES: tuple[SecretRule, ...] = (
    SecretRule(
        "PRIVATE_KEY", ("-----BEGIN ",),
        # the whole block through END when it follows within PEM_MAX_BODY characters; without
        # an END (a truncated paste) the following lines up to a blank line (pem_end)
        _c(r"-----BEGIN (?P<kind>(?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?)-----"
           r"(?:(?P<body>[\s\S]{0,%d}?)-----END (?P=kind)-----)?" % PEM_MAX_BODY),
        PEM_MAX_BODY + 120, None, priority=100),
    SecretRule(
        "JWT", ("eyJ",),
        _c(r"(?P<h>eyJ(?<![" + _TOK + r"]eyJ)[A-Za-z0-9_\-]{10,4096})\."
           r"(?P<p>[A-Za-z0-9_\-]{4,12288})(?:\.[A-Za-z0-9_\-]{0,2048})?"
           r"(?![A-Za-z0-9_\-])"),
        4096 + 12288 + 2048 + 2, _jwt_ok, priority=90),
    SecretRule(
        "ANTHROPIC_KEY", ("sk-ant-",),
        _c(r"sk-ant-api(?<![" + _TOK + r"]sk-ant-api)\d\d-(?P<r>[A-Za-z0-9_\-]{93})AA"
           r"(?![" + _TOK + "])"),
        120, _random),
    SecretRule(
        "ANTHROPIC_ADMIN_KEY", ("sk-ant-",),
        _c(r"sk-ant-admin(?<![" + _TOK + r"]sk-ant-admin)\d\d-(?P<r>[A-Za-z0-9_\-]{93})AA"
           r"(?![" + _TOK + "])"),
        120, _random),
    SecretRule(
        "OPENAI_KEY", ("sk-",),
        # 'T3BlbkFJ' is base64 of 'OpenAI' and sits inside every user/project/service key;
        # newer project/service/admin keys are also caught by length and randomness alone
        _c(r"sk-(?<![" + _TOK + r"]sk-)(?!ant-)(?:(?:proj|svcacct|admin|None)-)?"
           r"(?:(?P<r>[A-Za-z0-9_\-]{10,200}T3BlbkFJ[A-Za-z0-9_\-]{10,200})"
           r"|(?<=(?:proj|svcacct|admin)-)(?P<r>[A-Za-z0-9_\-]{80,250}))"
           r"(?![" + _TOK + "])"),
        420, _random),
    SecretRule(
        "AWS_ACCESS_KEY", (),
        _c(r"A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])(?<![A-Za-z0-9]A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9]))"
           r"(?P<r>[A-Z2-7]{16})(?![A-Za-z0-9])"),
        20, _random),
    SecretRule(
        "AWS_BEDROCK_KEY", ("ABSK", "bedrock-api-key-"),
        # long-term keys: ABSK + base64("BedrockAPIKey-…"); short-term: bedrock-api-key- +
        # base64("bedrock.amazonaws.com/…")
        _c(r"(?:ABSKQmVkcm9ja0FQSUtleS(?<![A-Za-z0-9+/]ABSKQmVkcm9ja0FQSUtleS)"
           r"(?P<r>[A-Za-z0-9+/]{100,140}={0,2})"
           r"|bedrock-api-key-(?<![A-Za-z0-9+/]bedrock-api-key-)YmVkcm9jay5hbWF6b25hd3MuY29t"
           r"[A-Za-z0-9+/=%]{0,2048})(?![A-Za-z0-9+/=])"),
        2100, lambda m: m.group("r") is None or (len(m.group(0)) % 4 == 0
                                                  and not looks_placeholder(m.group("r")))),
    SecretRule(
        "GITHUB_TOKEN", ("_",),
        _c(r"gh(?:[pousr]_(?<![" + _TOK + r"]gh[pousr]_)(?P<r>[A-Za-z0-9]{36,251})"
           r"|ithub_pat_(?<![" + _TOK + r"]github_pat_)(?P<r>[A-Za-z0-9_]{82}))"
           r"(?![" + _TOK + "])"),
        260, _random),
    SecretRule(
        "SLACK_WEBHOOK", ("hooks.slack.com/",),
        _c(r"hooks\.slack\.com/(?:services|workflows|triggers)/"
           r"(?P<r>[A-Za-z0-9+/]{20,120})(?![A-Za-z0-9+/])"),
        160, _random),
    SecretRule(
        "SLACK_TOKEN", ("xox", "xapp-"),
        _c(r"x(?<![A-Za-z0-9]x)(?:"
           r"ox[abeoprs]-(?:\d-)?(?:\d{6,13}-)+(?P<r>[A-Za-z0-9]{10,120})"
           r"|(?:oxe\.xox[abeoprs]|ox[abeoprs])-\d-(?P<r>[A-Za-z0-9]{140,200})"
           r"|app-\d-[A-Z0-9]{8,14}-\d{8,16}-(?P<r>[a-z0-9]{32,100})"
           r")(?![A-Za-z0-9\-])"),
        300, _random),
    SecretRule(
        "GOOGLE_API_KEY", ("AIza",),
        _c(r"AIza(?<![" + _TOK + r"]AIza)(?P<r>[0-9A-Za-z_\-]{35})(?![" + _TOK + "])"),
        39, _random),
    SecretRule(
        "HUGGINGFACE_TOKEN", ("_",),
        _c(r"(?:hf_|api_org_)(?<![A-Za-z0-9_](?:hf_|api_org_))(?P<r>[A-Za-z]{34})"
           r"(?![A-Za-z0-9_])"),
        42, _random),
    SecretRule(
        "PERPLEXITY_KEY", ("pplx-",),
        _c(r"pplx-(?<![" + _TOK + r"]pplx-)(?P<r>[A-Za-z0-9]{48})(?![A-Za-z0-9])"),
        53, _random),
)

# AWS secret access keys have no prefix: 40 base64 characters, accepted only next to a word
# that names them and only when random enough.
AWS_SECRET_WORDS = ("aws", "secret")
AWS_SECRET = _c(r"(?<![A-Za-z0-9/+=])(?P<r>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")
AWS_SECRET_WINDOW = 80


def aws_secret_ok(value: str) -> bool:
    return (not looks_placeholder(value, 3.5)
            and any(c.isdigit() or c in "/+" for c in value)
            and any(c.islower() for c in value) and any(c.isupper() for c in value))
