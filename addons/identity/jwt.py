"""Pure token checks for OIDC JWTs, on python-jose 3.5.0 with the `cryptography` backend.

No mitmproxy import. python-jose's high-level `jwt.decode` accepts things the gateway must
refuse (SECURITY.md "Token verification"): a `kid` naming one key while another verifies, an
unknown `crit`, a future `iat`, a missing `exp`/`aud`, any token size, HMAC with a public key
as secret, `algorithms` as a substring. So this module parses the compact JWS itself (strictly),
selects exactly one key by `kid`, checks the key type against the pinned algorithm, and only
then asks python-jose's cryptography key classes to verify the signature. Nothing inside a
token (jku, x5u, jwk, x5c) is ever used to find a key, so no token causes a network call.

`TokenVerifier` composes the checks with a key source (identity/jwks.py JwksStore in the gateway,
a static dict in unit tests) and a bounded cache of verified tokens (by sha256, until `exp`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jose
from jose.backends.cryptography_backend import CryptographyECKey, CryptographyRSAKey
from jose.exceptions import JOSEError

from addons.identity.config import HARD_MAX_TOKEN_BYTES, IdentityConfig, IssuerConfig

log = logging.getLogger("agentgate.identity")

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_KID = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
# header parameters that would tell a verifier where to get a key: never used
KEY_HINT_HEADERS = ("jku", "x5u", "jwk", "x5c")
EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
MIN_RSA_BITS = 2048


# CVE-2024-33663 (key confusion) and CVE-2024-33664/29370 (JWE bombs) are fixed in 3.4.0.
# Importing the cryptography key classes above also guarantees the `cryptography` backend
# (the `ecdsa` fallback has an unfixed timing attack, CVE-2024-23342).
if tuple(int(x) for x in jose.__version__.split(".")[:2]) < (3, 4):  # pragma: no cover
    raise ImportError(f"python-jose {jose.__version__} is too old: agentgate needs >= 3.4.0")


class TokenError(Exception):
    """A token is refused. `reason` is short, safe to show the caller (never the token)."""

    def __init__(self, reason: str, code: str = "invalid_token", status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status


def token_hash(token: str) -> str:
    """A stable, non-reversible handle for a token (records, logs, cache keys)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# ---------------------------------------------------------------- parsing
def _b64decode(segment: str, what: str) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise TokenError(f"malformed token: {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"malformed token: {what} is not base64url") from None
    # Only the canonical encoding: one token, one spelling (cache keys, replay detection).
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != segment:
        raise TokenError(f"malformed token: {what} is not canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Two parsers could read different values: refuse instead of picking one.
            raise TokenError(f"malformed token: duplicate member {k[:40]!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise TokenError("malformed token: NaN/Infinity are not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant)
    except TokenError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenError(f"malformed token: {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError(f"malformed token: {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class ParsedToken:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes
    alg: str
    kid: str | None
    iss: str


def parse_token(token: str, max_bytes: int = HARD_MAX_TOKEN_BYTES) -> ParsedToken:
    """Strictly split and decode a compact JWS; nothing is trusted yet."""
    if not isinstance(token, str) or not token:
        raise TokenError("no token", "token_missing")
    if len(token) > max_bytes:
        raise TokenError(f"token too large ({len(token)} bytes, limit {max_bytes})")
    if not token.isascii():
        raise TokenError("malformed token: not ASCII")
    parts = token.split(".")
    if len(parts) == 5:
        raise TokenError("encrypted tokens (JWE) are not accepted")
    if len(parts) != 3:
        raise TokenError("malformed token: expected header.payload.signature")
    h64, p64, s64 = parts
    if not h64 or not p64:
        raise TokenError("malformed token: empty header or payload")
    if not s64:
        raise TokenError("token is not signed (empty signature)")
    header = _json_object(_b64decode(h64, "header"), "header")
    signature = _b64decode(s64, "signature")
    claims = _json_object(_b64decode(p64, "payload"), "payload")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise TokenError("malformed token: header has no alg")
    if alg.lower() == "none":
        raise TokenError("unsigned tokens (alg none) are not accepted")
    if "crit" in header:
        # RFC 7515 4.1.11: a verifier must refuse critical extensions it does not know;
        # we implement none.
        raise TokenError("critical header extensions (crit) are not supported")
    if "zip" in header:
        raise TokenError("compressed tokens are not accepted")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not _KID.fullmatch(kid)):
        raise TokenError("malformed token: invalid kid")
    if "b64" in header:
        raise TokenError("unencoded payload (b64) is not accepted")
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise TokenError("token has no issuer (iss)", "unknown_issuer")
    return ParsedToken(header=header, claims=claims,
                       signing_input=f"{h64}.{p64}".encode("ascii"), signature=signature,
                       alg=alg, kid=kid, iss=iss)


# ---------------------------------------------------------------- keys
@dataclass
class VerifyKey:
    """One public key from an issuer's JWKS, prepared for the algorithms it fits."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    public: dict[str, str]
    _prepared: dict[str, Any] = field(default_factory=dict, repr=False)

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False  # a key pinned to one algorithm is used only with it
        if alg.startswith("RS"):
            return self.kty == "RSA"
        if alg in EC_CURVES:
            return self.kty == "EC" and self.crv == EC_CURVES[alg]
        return False

    def verifier(self, alg: str) -> Any:
        key = self._prepared.get(alg)
        if key is None:
            cls = CryptographyRSAKey if self.kty == "RSA" else CryptographyECKey
            key = cls(self.public, alg)
            self._prepared[alg] = key
        return key


def _b64_int_bits(value: str) -> int:
    raw = _b64decode(value, "key")
    return int.from_bytes(raw, "big").bit_length()


def parse_jwk(d: Any) -> VerifyKey | None:
    """A signing key from a JWKS entry, or None when it is not usable (skipped, logged)."""
    if not isinstance(d, dict):
        return None
    kty = d.get("kty")
    use = d.get("use")
    if use is not None and use != "sig":
        return None
    ops = d.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return None
    kid = d.get("kid")
    if kid is not None and (not isinstance(kid, str) or not _KID.fullmatch(kid)):
        return None
    alg = d.get("alg")
    if alg is not None and not isinstance(alg, str):
        return None
    try:
        if kty == "RSA":
            n, e = d.get("n"), d.get("e")
            if not isinstance(n, str) or not isinstance(e, str):
                return None
            if _b64_int_bits(n) < MIN_RSA_BITS:
                log.warning("agentgate: JWKS key %s skipped: RSA key shorter than %d bits",
                            kid, MIN_RSA_BITS)
                return None
            public = {"kty": "RSA", "n": n, "e": e}
            crv = None
        elif kty == "EC":
            crv, x, y = d.get("crv"), d.get("x"), d.get("y")
            if crv not in EC_CURVES.values() or not isinstance(x, str) or not isinstance(y, str):
                return None
            public = {"kty": "EC", "crv": crv, "x": x, "y": y}
        else:
            return None  # symmetric ("oct") and unknown key types are never used
        key = VerifyKey(kid=kid, kty=kty, crv=crv, alg=alg, public=public)
        # Construct once now so a broken key is dropped at load time, not per request.
        for a in ((alg,) if alg else (("RS256",) if kty == "RSA" else (_alg_for(crv),))):
            if key.fits(a):
                key.verifier(a)
        return key
    except (TokenError, JOSEError, ValueError, TypeError):
        return None


def _alg_for(crv: str | None) -> str:
    for alg, c in EC_CURVES.items():
        if c == crv:
            return alg
    return "ES256"


def parse_jwks(doc: Any) -> dict[str | None, VerifyKey]:
    """kid -> key. Keys without kid are kept under None (used only when alone)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    out: dict[str | None, VerifyKey] = {}
    for entry in doc["keys"]:
        key = parse_jwk(entry)
        if key is None:
            continue
        if key.kid in out:
            log.warning("agentgate: JWKS lists kid %r twice; keeping the first", key.kid)
            continue
        out[key.kid] = key
    return out


def select_key(keys: dict[str | None, VerifyKey], kid: str | None) -> VerifyKey | None:
    """Exactly one key: by exact kid; without kid only when the JWKS holds a single key."""
    if kid is not None:
        return keys.get(kid)
    if len(keys) == 1:
        return next(iter(keys.values()))
    return None


def verify_signature(parsed: ParsedToken, key: VerifyKey) -> None:
    if not key.fits(parsed.alg):
        raise TokenError(f"key {parsed.kid or '(no kid)'} does not fit algorithm {parsed.alg}")
    try:
        ok = key.verifier(parsed.alg).verify(parsed.signing_input, parsed.signature)
    except (JOSEError, ValueError, TypeError):
        ok = False
    if not ok:
        raise TokenError("signature verification failed")


# ---------------------------------------------------------------- claims
def _number(claims: dict[str, Any], name: str, required: bool) -> float | None:
    v = claims.get(name)
    if v is None:
        if required:
            raise TokenError(f"token has no {name} claim")
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TokenError(f"malformed token: {name} is not a number")
    return v


def claim_path(claims: dict[str, Any], path: str) -> Any:
    """A claim by exact name, else by dotted path (`realm_access.roles`)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        # Non-string members grant nothing: drop them rather than stringify.
        return [v for v in value if isinstance(v, str)][:256]
    return []


def check_claims(parsed: ParsedToken, cfg: IssuerConfig, now: float) -> dict[str, Any]:
    """Registered-claim checks; returns the identity (without token_hash)."""
    c = parsed.claims
    leeway = cfg.leeway
    exp = _number(c, "exp", True)
    iat = _number(c, "iat", True)
    nbf = _number(c, "nbf", False)
    assert exp is not None and iat is not None
    if now > exp + leeway:
        raise TokenError("token expired", "token_expired")
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token not yet valid (nbf in the future)")
    if iat > now + leeway:
        raise TokenError("token issued in the future (iat)")
    if exp <= iat:
        raise TokenError("malformed token: exp is not after iat")
    if cfg.max_lifetime and exp - iat > cfg.max_lifetime:
        raise TokenError(f"token lifetime exceeds {cfg.max_lifetime} s (exp - iat)")
    aud = c.get("aud")
    if aud is None or aud == [] or aud == "":
        raise TokenError("token has no audience (aud)", "wrong_audience")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
        raise TokenError("malformed token: aud is not a string or list of strings")
    if not set(auds) & set(cfg.audiences):
        raise TokenError(f"wrong audience (expected {' or '.join(cfg.audiences)})",
                         "wrong_audience")
    if cfg.azp:
        azp = c.get("azp")
        if not isinstance(azp, str) or azp not in cfg.azp:
            raise TokenError("wrong or missing authorized party (azp)")
    sub = claim_path(c, cfg.subject_claim)
    if not isinstance(sub, str) or not sub:
        raise TokenError(f"token has no subject ({cfg.subject_claim})")
    jti = c.get("jti")
    return {
        "sub": sub[:512],
        "iss": parsed.iss,
        "groups": _str_list(claim_path(c, cfg.groups_claim)),
        "roles": _str_list(claim_path(c, cfg.roles_claim)),
        "jti": jti[:256] if isinstance(jti, str) else "",
        "exp": int(exp),
    }


# ---------------------------------------------------------------- the verifier
KeyLookup = Callable[[IssuerConfig, "str | None"], Awaitable[VerifyKey | None]]


class TokenVerifier:
    """Verify tokens against an IdentityConfig; `key_lookup` finds an issuer's key by kid.

    The key lookup may fetch (JWKS refresh on an unknown kid); it is only reached after the
    token parsed cleanly, named a configured issuer and a pinned algorithm.
    """

    def __init__(self, config: IdentityConfig, key_lookup: KeyLookup,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.key_lookup = key_lookup
        self.clock = clock
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear_cache(self) -> None:
        self._cache.clear()

    def cached(self, token: str, key: str | None = None) -> dict[str, Any] | None:
        """A previously verified identity for this exact token, if it has not expired.
        `key`: token_hash(token), when the caller keeps it (a tunnel's token, verified
        again on every request: SHA-256 of ~1 KB not repeated)."""
        if not self.config.cache_size:
            return None
        h = key or token_hash(token)
        ident = self._cache.get(h)
        if ident is None:
            return None
        if self.clock() >= ident["exp"]:
            # never past exp (the leeway applies only to a full verification)
            self._cache.pop(h, None)
            return None
        self._cache.move_to_end(h)
        self.hits += 1
        return dict(ident, groups=list(ident["groups"]), roles=list(ident["roles"]))

    async def verify(self, token: str, key: str | None = None) -> dict[str, Any]:
        """The identity of a valid token (raises TokenError). `key`: token_hash(token),
        if the caller has it (see cached)."""
        ident = self.cached(token, key)
        if ident is not None:
            return ident
        self.misses += 1
        cfg = self.config
        if not cfg.issuers:
            raise TokenError("no token issuer is configured on this gateway "
                             "(rules: identity.issuers)", "identity_not_configured")
        parsed = parse_token(token, cfg.max_token_bytes)
        issuer = cfg.issuer_for(parsed.iss)
        if issuer is None:
            raise TokenError("unknown issuer (not trusted by this gateway)", "unknown_issuer")
        if len(token) > issuer.max_token_bytes:
            raise TokenError(f"token too large ({len(token)} bytes, "
                             f"limit {issuer.max_token_bytes})")
        if parsed.alg not in issuer.algorithms:
            # alg is attacker text: printable ASCII only in a message that reaches logs
            alg = re.sub(r"[^\x21-\x7e]", "?", parsed.alg[:20])
            raise TokenError(f"algorithm {alg} is not allowed for this issuer")
        # Claims first: an expired or foreign-audience token never triggers a key fetch.
        ident = check_claims(parsed, issuer, self.clock())
        key = await self.key_lookup(issuer, parsed.kid)
        if key is None:
            raise TokenError("unknown signing key (kid not in the issuer's JWKS)"
                             if parsed.kid is not None else
                             "token has no kid and the issuer publishes several keys")
        verify_signature(parsed, key)
        ident["token_hash"] = token_hash(token)
        self._remember(ident)
        return dict(ident, groups=list(ident["groups"]), roles=list(ident["roles"]))

    def verify_sync(self, token: str) -> dict[str, Any]:
        """For callers without an event loop (the CLI)."""
        return asyncio.run(self.verify(token))

    def _remember(self, ident: dict[str, Any]) -> None:
        size = self.config.cache_size
        if not size:
            return
        self._cache[ident["token_hash"]] = ident
        self._cache.move_to_end(ident["token_hash"])
        while len(self._cache) > size:
            self._cache.popitem(last=False)


def unverified_summary(token: str) -> dict[str, Any]:
    """For debugging output only: header/claims facts of an UNVERIFIED token (no secrets)."""
    try:
        p = parse_token(token.strip())
    except TokenError:
        return {}
    c = p.claims
    return {"alg": p.alg, "kid": p.kid, "iss": p.iss, "aud": c.get("aud"), "sub": c.get("sub"),
            "exp": c.get("exp"), "iat": c.get("iat")}
