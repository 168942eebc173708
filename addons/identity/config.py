"""Parse the `identity` section of the rules: trusted OIDC issuers and how tokens are checked.

```yaml
identity:
  required: true                # default; `false` is an explicit opt-out (no token needed)
  sources: [proxy, bearer, x-api-key]
  cache_size: 10000
  retire_before: 30s            # close a CONNECT tunnel this long before its token's exp
  issuers:
    - issuer: https://token.actions.githubusercontent.com
      audience: agentgate       # string or list; required
      algorithms: [RS256]       # asymmetric only
      claims: {groups: groups, roles: roles}
```

No mitmproxy import: the CLI and the tests use the same parser as the gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from addons.config.schema import (
    MapSection,
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_str,
    expect_str_list,
)
from addons.frame.hosts import is_loopback_host

# python-jose 3.5.0 signs/verifies these asymmetric algorithms (no PS*/EdDSA there).
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
SYMMETRIC_ALGORITHMS = ("HS256", "HS384", "HS512")
SOURCES = ("proxy", "bearer", "x-api-key")
DEFAULT_MAX_TOKEN_BYTES = 8192
HARD_MAX_TOKEN_BYTES = 65536

IDENTITY_KEYS = {"required", "issuers", "sources", "cache_size", "retire_before"}
ISSUER_KEYS = {"issuer", "name", "audience", "jwks_uri", "algorithms", "azp", "claims",
               "leeway", "max_token_bytes", "max_lifetime", "jwks_refresh_interval",
               "jwks_max_age", "fetch_timeout"}
CLAIM_KEYS = {"subject", "groups", "roles"}
DEFAULT_RETIRE_BEFORE = 30
MAX_RETIRE_BEFORE = 3600


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    name: str = ""
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    azp: tuple[str, ...] = ()
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    roles_claim: str = "roles"
    leeway: int = 30
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    max_lifetime: int = 0                 # 0: no limit on exp - iat
    jwks_refresh_interval: int = 30       # min seconds between refreshes on an unknown kid
    jwks_max_age: int = 3600              # refresh known keys in the background after this
    fetch_timeout: int = 5

    def __post_init__(self) -> None:
        # A bare string here would turn membership tests into substring tests
        # ("RS" in "RS256", set("agentgate") -> letters): python-jose's own pitfall.
        for name in ("audiences", "algorithms", "azp"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"IssuerConfig.{name} must be a tuple of strings")
        if not self.audiences:
            raise TypeError("IssuerConfig.audiences must not be empty")

    @property
    def label(self) -> str:
        return self.name or self.issuer


@dataclass(frozen=True)
class IdentityConfig:
    required: bool = True
    issuers: tuple[IssuerConfig, ...] = ()
    sources: tuple[str, ...] = SOURCES
    cache_size: int = 10000
    # Seconds before the exp of the token bound at CONNECT from which the tunnel is retired
    # (responses carry `Connection: close`, an idle tunnel is closed), so a pooled client
    # opens a new connection with a fresh token instead of meeting a 401 on the old one.
    retire_before: int = DEFAULT_RETIRE_BEFORE

    def issuer_for(self, iss: str) -> IssuerConfig | None:
        for i in self.issuers:
            if i.issuer == iss:
                return i
        return None

    @property
    def max_token_bytes(self) -> int:
        """Size cap applied before any parsing (the issuer is not known yet)."""
        if not self.issuers:
            return DEFAULT_MAX_TOKEN_BYTES
        return max(i.max_token_bytes for i in self.issuers)

    def describe(self) -> str:
        if not self.required and not self.issuers:
            return "not required (explicit opt-out), no issuers"
        head = "required" if self.required else "optional (explicit opt-out)"
        if not self.issuers:
            return f"{head}; NO issuer configured: every request is refused"
        names = ", ".join(f"{i.issuer} (aud {'/'.join(i.audiences)})" for i in self.issuers)
        return f"{head}; {len(self.issuers)} issuer(s): {names}; sources {', '.join(self.sources)}"



def _url(value: Any, where: Where, what: str) -> str:
    text = expect_str(value, where).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise where.error(f"{what} must be an https:// URL, got {text!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        # Keys fetched over plain HTTP could be swapped in transit: loopback only.
        raise where.error(f"{what} must use https (plain http only for 127.0.0.1/localhost)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise where.error(f"{what} must not contain a query, fragment or credentials")
    return text


def _claim_name(value: Any, where: Where) -> str:
    text = expect_str(value, where)
    if not re.fullmatch(r"[A-Za-z0-9_:./-]{1,128}", text):
        raise where.error(f"not a claim name or dotted path: {text!r}")
    return text


def parse_issuer(raw: Any, where: Where) -> IssuerConfig:
    d = expect_map(raw, where, ISSUER_KEYS, required=("issuer", "audience"))
    issuer = _url(d["issuer"], where.child("issuer"), "issuer")
    audiences = expect_str_list(d["audience"], where.child("audience"))
    if not audiences:
        raise where.child("audience").error("at least one audience is required")
    name = expect_str(d.get("name", ""), where.child("name"), nonempty=False)
    jwks_uri = None
    if d.get("jwks_uri") is not None:
        jwks_uri = _url(d["jwks_uri"], where.child("jwks_uri"), "jwks_uri")
    algorithms = ASYMMETRIC_ALGORITHMS
    if "algorithms" in d:
        aw = where.child("algorithms")
        algorithms = expect_str_list(d["algorithms"], aw)
        if not algorithms:
            raise aw.error("at least one algorithm is required")
        for i, alg in enumerate(algorithms):
            if alg in SYMMETRIC_ALGORITHMS or alg.lower() == "none":
                raise aw.child(i).error(
                    f"{alg} is not allowed: tokens are verified with the issuer's public keys "
                    "(use RS256/ES256/…)")
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise aw.child(i).error(
                    f"unsupported algorithm {alg!r} (allowed: {', '.join(ASYMMETRIC_ALGORITHMS)})")
    azp = expect_str_list(d.get("azp", []), where.child("azp"))
    cw = where.child("claims")
    claims = expect_map(d.get("claims", {}), cw, CLAIM_KEYS)
    subject_claim = _claim_name(claims.get("subject", "sub"), cw.child("subject"))
    groups_claim = _claim_name(claims.get("groups", "groups"), cw.child("groups"))
    roles_claim = _claim_name(claims.get("roles", "roles"), cw.child("roles"))
    return IssuerConfig(
        issuer=issuer,
        audiences=audiences,
        name=name,
        jwks_uri=jwks_uri,
        algorithms=algorithms,
        azp=azp,
        subject_claim=subject_claim,
        groups_claim=groups_claim,
        roles_claim=roles_claim,
        leeway=expect_int(d.get("leeway", 30), where.child("leeway"), minimum=0, maximum=300),
        max_token_bytes=expect_int(d.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES),
                                   where.child("max_token_bytes"), minimum=256,
                                   maximum=HARD_MAX_TOKEN_BYTES),
        max_lifetime=expect_int(d.get("max_lifetime", 0), where.child("max_lifetime"),
                                minimum=0),
        jwks_refresh_interval=expect_int(d.get("jwks_refresh_interval", 30),
                                         where.child("jwks_refresh_interval"), minimum=1,
                                         maximum=86400),
        jwks_max_age=expect_int(d.get("jwks_max_age", 3600), where.child("jwks_max_age"),
                                minimum=10, maximum=7 * 86400),
        fetch_timeout=expect_int(d.get("fetch_timeout", 5), where.child("fetch_timeout"),
                                 minimum=1, maximum=60),
    )


def parse_duration(value: Any, where: Where, *, minimum: int, maximum: int) -> int:
    """Whole seconds from an int or a string such as `30`, `30s`, `2m`, `1h`."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,7})\s*([smh]?)\s*", value)
        if m is None:
            raise where.error(f"expected seconds or a duration like 30s / 2m, got {value!r}")
        value = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        if not minimum <= value <= maximum:
            raise where.error(f"must be between {minimum}s and {maximum}s, got {value}s")
        return value
    return expect_int(value, where, minimum=minimum, maximum=maximum)


def parse_identity(section: MapSection) -> IdentityConfig:
    d = expect_map(section.data, section.where(), IDENTITY_KEYS)
    required = expect_bool(d.get("required", True), section.where("required"))
    issuers: list[IssuerConfig] = []
    if d.get("issuers") is not None:
        iw = section.where("issuers")
        raw = d["issuers"]
        if not isinstance(raw, list):
            raise iw.error(f"expected a list of issuers, got {type(raw).__name__}")
        seen: set[str] = set()
        for i, item in enumerate(raw):
            cfg = parse_issuer(item, iw.child(i))
            if cfg.issuer in seen:
                raise iw.child(i).child("issuer").error(
                    f"issuer {cfg.issuer!r} is listed twice (give one entry several audiences)")
            seen.add(cfg.issuer)
            issuers.append(cfg)
    sources = SOURCES
    if "sources" in d:
        sw = section.where("sources")
        sources = expect_str_list(d["sources"], sw)
        for i, s in enumerate(sources):
            if s not in SOURCES:
                raise sw.child(i).error(f"unknown token source {s!r} "
                                        f"(allowed: {', '.join(SOURCES)})")
        if not sources:
            raise sw.error("at least one token source is required")
    cache_size = expect_int(d.get("cache_size", 10000), section.where("cache_size"),
                            minimum=0, maximum=1_000_000)
    retire_before = parse_duration(d.get("retire_before", DEFAULT_RETIRE_BEFORE),
                                   section.where("retire_before"), minimum=0,
                                   maximum=MAX_RETIRE_BEFORE)
    return IdentityConfig(required=required, issuers=tuple(issuers), sources=tuple(sources),
                          cache_size=cache_size, retire_before=retire_before)
