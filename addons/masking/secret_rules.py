"""Shapes of provider secrets (API keys, tokens, private keys, JWTs).

Each rule: entity, optional gate literals (a cheap `in` test skips a slow regex when absent),
the regex (starting with its literal, so the engine skips to it quickly), the part whose
randomness is checked (group "r"), and the
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

from addons.masking.validators import looks_placeholder

# characters that continue a token: a match must not be preceded or followed by one
_TOK = r"A-Za-z0-9_\-"


@dataclass(frozen=True, slots=True)
class SecretRule:
    entity: str
    # every match contains one of these. Short texts test them with `in` before running the
    # regex (cheaper than setting up a scan); long texts run the regex directly, which starts
    # with the literal and so skips through the text as fast as `in` would.
    literals: tuple[str, ...]
    pattern: regex.Pattern
    max_len: int
    check: Callable[[regex.Match], bool] | None = None
    priority: int = 80
    always_gate: bool = False   # test the literals whatever the text's length


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


# Where a line starts and ends: every line break Python's str.splitlines knows (CR alone,
# VT, FF, FS/GS/RS, NEL, U+2028/2029), not only LF: '^'/'$' in multi-line mode see LF
# alone, so an env line or a key block's header lines ended by a bare CR or U+2028 went
# out unmasked.
_LINE_BREAKS = "\\n\\r\\x0b\\x0c\\x1c-\\x1e\\x85\\u2028\\u2029"
_LINE_START = r"(?:^|(?<=[" + _LINE_BREAKS + r"]))"
_LINE_END = r"(?=[" + _LINE_BREAKS + r"]|$)"


_BREAK = r"(?>\r\n|[" + _LINE_BREAKS + r"])"  # atomic: CR LF is one break, never two
_BLANK_LINE = regex.compile(_BREAK + r"[ \t]*" + _BREAK)


_PEM_HEADER_LINE = regex.compile(_LINE_START + r"[ \t]*[A-Za-z][A-Za-z0-9\-]*:[^"
                              + _LINE_BREAKS + r"]*" + _LINE_END)
_PEM_NOISE = regex.compile(r"\\[nr]|[\s\"'`+,\x1c-\x1e]")  # FS/GS/RS: breaks, not \s
_B64 = regex.compile(r"[A-Za-z0-9+/=]+")


def pem_body_ok(body: str) -> bool:
    """The body of a key block looks like one: base64 (after removing the quotes, `\\n`
    escapes and `+` of a key written as a string literal in code, and `Proc-Type:` style
    header lines), at least 32 characters, with upper case, lower case and digits. A header
    followed by prose or code is a mention of a key, not a key."""
    clean = _PEM_NOISE.sub("", _PEM_HEADER_LINE.sub("", body))
    if len(clean) < 32 or not _B64.fullmatch(clean):
        return False
    return (any(c.isupper() for c in clean) and any(c.islower() for c in clean)
            and any(c.isdigit() for c in clean))


def pem_end(m: regex.Match, text: str) -> int | None:
    """End of the private-key block whose BEGIN line `m` matched, or None when what follows
    is not a key body: through `-----END <same kind>-----` when it follows within
    PEM_MAX_BODY characters, else through the line before the next blank line."""
    start = m.end()
    limit = min(len(text), start + PEM_MAX_BODY)
    # a body never holds another BEGIN line: stop there (keeps a text of BEGIN lines linear)
    nxt = text.find("-----BEGIN ", start, limit)
    if nxt != -1:
        limit = nxt
    footer = "-----END " + m.group("kind") + "-----"
    i = text.find(footer, start, limit + len(footer))
    if i != -1:
        return i + len(footer) if pem_body_ok(text[start:i]) else None
    blank = _BLANK_LINE.search(text, start, limit)
    end = blank.start() if blank else limit
    while end > start and text[end - 1].isspace():
        end -= 1
    if end <= start:
        return None
    # a truncated block: keep the base64 lines (the body may be cut anywhere)
    return end if pem_body_ok(text[start:end]) else None


PEM_MAX_BODY = 32 * 1024

# Every pattern starts with its literal (then a look-behind for the character before it):
# the regex engine then skips through text quickly to that literal.
SECRET_RULES: tuple[SecretRule, ...] = (
    SecretRule(
        "PRIVATE_KEY", ("-----BEGIN ",),
        # the BEGIN line; pem_end finds the end of the block
        _c(r"-----BEGIN (?P<kind>(?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?)-----"),
        PEM_MAX_BODY + 120, None, priority=100),
    SecretRule(
        "JWT", ("eyJ",),
        _c(r"(?P<h>eyJ(?<![" + _TOK + r"]eyJ)[A-Za-z0-9_\-]{10,4096})\."
           r"(?P<p>[A-Za-z0-9_\-]{4,12288})(?:\.[A-Za-z0-9_\-]{0,2048})?"
           r"(?![A-Za-z0-9_\-])"),
        4096 + 12288 + 2048 + 2, _jwt_ok, priority=90, always_gate=True),
    SecretRule(
        "ANTHROPIC_KEY", ("sk-",),
        _c(r"sk-ant-api(?<![" + _TOK + r"]sk-ant-api)\d\d-(?P<r>[A-Za-z0-9_\-]{93})AA"
           r"(?![" + _TOK + "])"),
        120, _random),
    SecretRule(
        "ANTHROPIC_ADMIN_KEY", ("sk-",),
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
        420, _random, always_gate=True),
    SecretRule(
        "AWS_ACCESS_KEY", (),
        _c(r"A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])(?<![A-Za-z0-9]A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9]))"
           r"(?P<r>[A-Z2-7]{16})(?![A-Za-z0-9])"),
        20, _random),
    # long-term Bedrock keys: ABSK + base64("BedrockAPIKey-…")
    SecretRule(
        "AWS_BEDROCK_KEY", ("ABSK",),
        _c(r"ABSKQmVkcm9ja0FQSUtleS(?<![A-Za-z0-9+/]ABSKQmVkcm9ja0FQSUtleS)"
           r"(?P<r>[A-Za-z0-9+/]{100,140}={0,2})(?![A-Za-z0-9+/=])"),
        170, lambda m: len(m.group(0)) % 4 == 0 and not looks_placeholder(m.group("r"))),
    # short-term Bedrock keys: bedrock-api-key- + base64("bedrock.amazonaws.com/…")
    SecretRule(
        "AWS_BEDROCK_KEY", ("bedrock-api-key-",),
        _c(r"bedrock-api-key-(?<![A-Za-z0-9+/]bedrock-api-key-)YmVkcm9jay5hbWF6b25hd3MuY29t"
           r"[A-Za-z0-9+/=%]{0,2048}(?![A-Za-z0-9+/=])"),
        2100),
    # GitHub and Hugging Face: the scan starts at the rare '_' and looks back for the prefix
    # (group "pre" gives the real start of the token)
    SecretRule(
        "GITHUB_TOKEN", ("_",),
        _c(r"_(?<=(?<![" + _TOK + r"])(?P<pre>gh[pousr]|github_pat)_)"
           r"(?:(?<=gh[pousr]_)(?P<r>[A-Za-z0-9]{36,251})|(?<=github_pat_)(?P<r>[A-Za-z0-9_]{82}))"
           r"(?![" + _TOK + "])"),
        260, _random),
    SecretRule(
        "SLACK_WEBHOOK", ("hooks.slack.com/",),
        _c(r"hooks\.slack\.com/(?:(?<=(?P<pre>https?://)hooks\.slack\.com/))?"
           r"(?:services|workflows|triggers)/"
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
        _c(r"_(?<=(?<![A-Za-z0-9_])(?P<pre>hf|api_org)_)(?P<r>[A-Za-z]{34})(?![A-Za-z0-9_])"),
        42, _random),
    SecretRule(
        "STRIPE_KEY", ("k_",),
        _c(r"k_(?<=(?<![" + _TOK + r"])(?P<pre>[rs])k_)(?:live|test)_(?P<r>[0-9A-Za-z]{20,247})"
           r"(?![" + _TOK + "])"),
        260, _random),
    SecretRule(
        "GITLAB_TOKEN", ("glpat-",),
        _c(r"glpat-(?<![" + _TOK + r"]glpat-)(?P<r>[0-9A-Za-z_\-]{20,64})(?![" + _TOK + "])"),
        70, _random, always_gate=True),
    SecretRule(
        "NPM_TOKEN", ("npm_",),
        _c(r"npm_(?<![" + _TOK + r"]npm_)(?P<r>[A-Za-z0-9]{36})(?![" + _TOK + "])"),
        40, _random, always_gate=True),
    SecretRule(
        "PYPI_TOKEN", ("pypi-Ag",),
        _c(r"pypi-Ag(?<![" + _TOK + r"]pypi-Ag)(?P<r>[A-Za-z0-9_\-]{50,400})(?![" + _TOK + "])"),
        410, _random),
    SecretRule(
        "SENDGRID_KEY", ("SG.",),
        _c(r"SG\.(?<![" + _TOK + r"]SG\.)(?P<r>[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43})"
           r"(?![" + _TOK + "])"),
        69, _random),
    SecretRule(
        "PERPLEXITY_KEY", ("pplx-",),
        _c(r"pplx-(?<![" + _TOK + r"]pplx-)(?P<r>[A-Za-z0-9]{48})(?![A-Za-z0-9])"),
        53, _random, always_gate=True),
)

# AWS secret access keys have no prefix: 40 base64 characters, accepted only next to a word
# that names them and only when random enough.
# the context words in the casings people write them
AWS_SECRET_WORDS = ("aws", "AWS", "Aws", "secret", "SECRET", "Secret")
AWS_SECRET = _c(r"(?<![A-Za-z0-9/+])(?P<r>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")
AWS_SECRET_WINDOW = 80


def aws_secret_ok(value: str) -> bool:
    """40 random base64 characters have mixed case and several digits (or '/' '+'); a
    CamelCase identifier such as 'V1OrganizationExternalKeysPostRequestGcp' has not."""
    digits = sum(c.isdigit() for c in value)
    return (not looks_placeholder(value, 3.5)
            and (digits >= 2 or (digits >= 1 and ("/" in value or "+" in value)))
            and any(c.islower() for c in value) and any(c.isupper() for c in value))


# ---------------------------------------------------------------------------- passwords
# scheme://user:PASSWORD@host — the password only is the finding
URL_PASSWORD = _c(r"://(?<=[A-Za-z][A-Za-z0-9+.\-]{0,20}://)[^\s:/@?#\[\]\"'<>]{1,64}:"
                  r"(?P<v>[^\s@/?#\"'<>]{1,128})@(?=[A-Za-z0-9\[])")
# key = "value" / "key": "value" / key: 'value' / key => "value" for password-like keys
# (quoted values only), and KEY=value lines of env files (upper-case keys, unquoted
# values). Both scans start at '=' or ':' (rare in prose) and look back for the key.
# the key must END with one of these words (db_password, client_secret, access_token,
# OPENAI_API_KEY, password2) — 'token_endpoint' or 'secret_name' do not name a secret
_PW_KEY = (r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|api[_\-]?key|apikey|access[_\-]?key|"
           r"private[_\-]?key|credentials?)[0-9]{0,2}")


def _assignment(op: str) -> regex.Pattern:
    """Both forms for one operator character; a scan that starts with one literal character
    is ten times faster than one that starts with a class. '==' (a comparison) is not an
    assignment."""
    o = regex.escape(op)
    return _c(
        o + r"(?<![=!<>]" + o + r")(?:(?<=(?<![A-Za-z0-9_\-])(?i:[a-z0-9_\-]{0,30}" + _PW_KEY
        + r")[\"']?[ \t]{0,3}" + o + r")(?:>|(?<=:)=)?(?!=)[ \t]{0,3}"
        r"(?P<q>[\"'`])(?P<v>[^\"'`\s\\]{6,256})(?P=q)"
        r"|(?<=" + _LINE_START
        + r"[ \t]*(?:export[ \t]+)?[A-Z0-9_]{0,40}(?:PASSWORD|PASSWD|PASSPHRASE|SECRET|"
        r"TOKEN|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)[0-9]{0,2}[ \t]*" + o
        + r")(?!=)[ \t]*(?P<v>[^\s\"'`#$<{\x1c-\x1e]{6,256})[ \t]*" + _LINE_END + ")")


PASSWORD_ASSIGNMENTS = (_assignment("="), _assignment(":"))
# values that are names, paths or stand-ins rather than secrets: env-var names, attribute
# paths, URLs and paths, templates, 'xxxx' / '****'
_NOT_A_VALUE = regex.compile(
    r"[A-Z0-9_]+|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|.*(?:xxxx|XXXX|\*\*\*).*|"
    r"/.*|[a-z][a-z0-9+.\-]*://.*|"
    r"(?i:changeme|change_me|password|passwd|secret|your[_\-].*|my[_\-].*|example.*|"
    r"redacted|placeholder|none|null|true|false|undefined|<.*>|\$\{.*\}|%\(.*)")
# a secret value has a digit or a symbol: plain words and identifiers ('client_secret_basic',
# 'invalidCredentials', 'X-API-Key') are names in code, not passwords
_HAS_DIGIT_OR_SYMBOL = regex.compile(r"[^A-Za-z_\-.]")


def password_ok(value: str) -> bool:
    """A real-looking secret value: a digit or symbol in it, not an env-var name, attribute
    path, template or well-known stand-in, and not low-entropy."""
    value = value.rstrip(",;")  # 'KEY: SomeName,' is code, the comma is not part of it
    if len(value) < 6 or value[:1] in "$<{%" or _NOT_A_VALUE.fullmatch(value):
        return False
    if _HAS_DIGIT_OR_SYMBOL.search(value) is None:
        return False
    return not looks_placeholder(value, 2.5)


# Authorization values pasted into text: 'Bearer <token>' (JWTs are found as JWT)
BEARER = _c(r"(?i:bearer)[ \t]+(?P<v>[A-Za-z0-9._~+/\-]{16,4096}=*)(?![A-Za-z0-9._~+/=\-])")


def bearer_ok(value: str) -> bool:
    return (not _NOT_A_VALUE.fullmatch(value) and not looks_placeholder(value, 3.0)
            and any(c.isdigit() for c in value))
