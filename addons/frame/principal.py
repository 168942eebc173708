"""Who an agent is, as every per-identity cache and map keys it. Pure; imports nothing of
ours.

An OIDC subject is unique only within its issuer (OpenID Connect Core 1.0, section 2: `sub`
is "locally unique and never reassigned within the Issuer"): with two issuers trusted,
`sub: alice` from each is two principals, so a key by `sub` alone would hand one the
other's placeholder map (and, with `restore: true`, her originals)."""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import Any

ANONYMOUS = "-"


def principal(ident: Any) -> str:
    """The identity's key: issuer and subject, JSON-written (no NUL or other control
    character, which the session keys use as separators); "-" without a subject."""
    if not isinstance(ident, dict):
        return ANONYMOUS
    sub = ident.get("sub")
    if not isinstance(sub, str) or not sub:
        return ANONYMOUS
    iss = ident.get("iss")
    # exactly json.dumps([iss, sub]) (ensure_ascii, ", " between items: a test holds it to
    # that), without the encoder set up on every call (two or three keys per request)
    return f'[{encode_basestring_ascii(iss if isinstance(iss, str) else "")}, ' \
        f'{encode_basestring_ascii(sub)}]'


SESSION_HEADER = "x-agent-session"


def flow_session_key(flow: Any) -> str:
    """The agent's session as every per-session store keys it (masking's placeholder maps
    and message caches, the parse memos, policy's histories): principal AND session id (the
    recorder's, else the X-Agent-Session header, else the connection), NUL-separated."""
    sid = flow.metadata.get("session") or flow.request.headers.get(SESSION_HEADER) \
        or f"conn:{flow.client_conn.id}"
    return f"{principal(flow.metadata.get('identity'))}\x00{sid}"
