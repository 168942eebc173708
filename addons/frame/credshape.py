"""What a credential looks like: query keys, token shapes, header values.

Pure (standard library only) and shared by every place that must keep credentials out of an
artifact: the credentials addon strips them before the upstream, the recorder redacts them
in what it stores, the log scrubber removes them from every log record. One definition, so
the three cannot disagree about what counts as a credential.

Classes, not lists of names: a query key is a credential when any of its words (split on
`_ - .` and camelCase) ends in token / secret / key / signature / password / credential(s),
or is one of a few short forms (sig, jwt, pwd, auth, …); a value is one when it is
JWT-shaped, whatever its key.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "[REDACTED]"
# What the gateway puts on a flow in place of an upstream's real credential (followed by a
# private tag; addons/egress/credentials.py). Logs show this text without the tag.
INJECTED = "[injected by agentgate]"

# Whole words that name a credential.
_WORDS = frozenset({"sig", "jwt", "jws", "jwe", "pwd", "pass", "auth", "authorization",
                    "bearer", "assertion", "otp", "hmac", "apikey", "passphrase"})
# Word endings that name a credential: access_token, idToken, apikey, subscription-key,
# x-amz-signature, client_secret, x-amz-credential …
# (Plurals are left out on purpose: max_tokens, sort keys are not credentials.)
_ENDINGS = ("token", "secret", "key", "signature", "password", "passwd", "credential",
            "credentials")
_SPLIT = re.compile(r"[_\-.\s\[\]]+|(?<=[a-z0-9])(?=[A-Z])")

# Three base64url segments, the first a JSON object header ('{"' -> "eyJ"). Also matches
# inside percent-encoded or JSON-escaped text.
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def is_credential_key(name: str) -> bool:
    """True for a query/form key that names a credential (case-insensitive, by class)."""
    name = unquote_plus(name).strip()
    if not name:
        return False
    low = name.lower()
    if low in _WORDS or low.endswith(_ENDINGS):
        return True
    for word in _SPLIT.split(name):
        w = word.lower()
        if w and (w in _WORDS or w.endswith(_ENDINGS)):
            return True
    return False


def is_token_value(value: str) -> bool:
    """True for a value that is itself a bearer token (JWT-shaped), whatever its key."""
    return bool(JWT_RE.search(unquote_plus(value)))


def is_credential_param(name: str, value: str) -> bool:
    return is_credential_key(name) or is_token_value(value)


def redact_query_string(query: str) -> str:
    """`a=1&token=x` -> `a=1&token=[REDACTED]` (keys kept, order kept, bytes untouched
    otherwise). A credential-like key without `=` (`?sig`) keeps no value anyway."""
    parts = []
    for item in query.split("&"):
        k, eq, v = item.partition("=")
        if eq and is_credential_param(k, v):
            item = f"{k}={REDACTED}"
        elif not eq and is_token_value(k):
            item = REDACTED
        parts.append(item)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """The URL (or request path) with credential-like query values redacted; a fragment
    is redacted the same way (OAuth implicit flows put tokens there)."""
    base, sep, query = url.partition("?")
    frag = ""
    if sep:
        query, hsep, fragment = query.partition("#")
        frag = hsep + redact_query_string(fragment) if hsep else ""
        return base + "?" + redact_query_string(query) + frag
    base, hsep, fragment = url.partition("#")
    return base + hsep + redact_query_string(fragment) if hsep else url


# ---------------------------------------------------------------- free text (logs)
# A header line or repr naming an auth header, up to the end of its value.
_AUTH_HEADER_RE = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key|api-key|x-goog-api-key|x-auth-token|"
    r"x-access-token|ocp-apim-subscription-key|x-amz-security-token|cookie|set-cookie)"
    r"(['\"]?\s*[:=,]\s*\(?\s*(?:b?['\"])?)"
    r"([^\r\n'\"\\]+)")
# An auth scheme and its credentials, anywhere (Basic base64 hides the token inside).
_SCHEME_RE = re.compile(r"(?i)\b(bearer|basic|digest|token)(\s+)([A-Za-z0-9._~+/=-]{8,})")
# key=value pairs in URLs or text whose key names a credential.
_PARAM_RE = re.compile(r"([?&;\s]|^)([A-Za-z0-9_.\-\[\]]{1,64})=([^&?\s'\"#\\]+)")
# Well-known secret key prefixes (OpenAI, Anthropic, GitHub, Slack, AWS, Google).
_KEY_RE = re.compile(r"\b(?:sk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{16,}|"
                     r"gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|"
                     r"AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,})")


def _auth_header(m: re.Match[str]) -> str:
    shown = INJECTED if m.group(3).startswith(INJECTED) else REDACTED
    return m.group(1) + m.group(2) + shown


def _param(m: re.Match[str]) -> str:
    if is_credential_key(m.group(2)) or is_token_value(m.group(3)):
        return f"{m.group(1)}{m.group(2)}={REDACTED}"
    return m.group(0)


def scrub_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Free text (a log line, an exception) with every credential removed: the given secret
    values (longest first), auth header values, auth-scheme credentials, JWT-shaped strings,
    credential-like key=value pairs and well-known API key shapes."""
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    text = _AUTH_HEADER_RE.sub(_auth_header, text)
    text = _SCHEME_RE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = JWT_RE.sub(REDACTED, text)
    text = _PARAM_RE.sub(_param, text)
    return _KEY_RE.sub(REDACTED, text)
