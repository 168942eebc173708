"""Pure token checks (addons/identity/jwt.py): the SECURITY.md attack battery without network."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwt import (
    TokenError,
    TokenVerifier,
    parse_jwks,
    parse_token,
    select_key,
    token_hash,
)
from tests.oidc_fixtures import LocalIssuer, attack_tokens, b64url, new_rsa_key, public_jwk


class StaticKeys:
    """Key lookup from in-memory JWKS documents; records every lookup."""

    def __init__(self, *issuers: LocalIssuer) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.lookups: list[tuple[str, str | None]] = []

    async def __call__(self, cfg: IssuerConfig, kid: str | None):
        self.lookups.append((cfg.issuer, kid))
        return select_key(parse_jwks(self.issuers[cfg.issuer].jwks()), kid)


@pytest.fixture(scope="module")
def issuers():
    # Not started: keys and signing only, no HTTP server needed for pure tests.
    a, b = LocalIssuer(), LocalIssuer(audience="other-service")
    yield a, b
    a._server.server_close()
    b._server.server_close()


def config(a: LocalIssuer, b: LocalIssuer, **kw) -> IdentityConfig:
    return IdentityConfig(issuers=(
        IssuerConfig(issuer=a.issuer, audiences=("agentgate",), leeway=30, **kw),
        IssuerConfig(issuer=b.issuer, audiences=("other-service",)),
    ))


def verify(v: TokenVerifier, token: str) -> dict:
    return asyncio.run(v.verify(token))


def test_valid_token_gives_identity(issuers) -> None:
    a, b = issuers
    v = TokenVerifier(config(a, b), StaticKeys(a, b))
    tok = a.token(sub="bot-7", groups=["support-bots", 3], roles="admin")
    ident = verify(v, tok)
    assert ident["sub"] == "bot-7" and ident["iss"] == a.issuer
    assert ident["groups"] == ["support-bots"]  # non-string members dropped
    assert ident["roles"] == ["admin"]
    assert ident["token_hash"] == token_hash(tok) and tok not in json.dumps(ident)
    assert isinstance(ident["exp"], int) and ident["jti"]


def test_attack_battery_none_accepted(issuers) -> None:
    a, b = issuers
    keys = StaticKeys(a, b)
    battery = attack_tokens(a, b)
    assert len(battery) >= 60
    v = TokenVerifier(config(a, b), keys)
    accepted, reasons = [], {}
    for name, tok in battery:
        try:
            verify(v, tok)
            accepted.append(name)
        except TokenError as e:
            reasons[name] = e.reason
            assert tok not in e.reason
    assert accepted == []
    # a few reasons, as the agent will read them
    assert reasons["expired"] == "token expired"
    assert "audience" in reasons["wrong-aud"] and "audience" in reasons["missing-aud"]
    assert "unknown issuer" in reasons["wrong-iss"]
    assert "alg none" in reasons["alg-None-with-sig"]
    assert "crit" in reasons["crit-unknown"]
    assert "too large" in reasons["oversized"] and "too large" in reasons["oversized-unsigned"]
    assert "signature" in reasons["kid-mismatch"]
    assert "not allowed" in reasons["key-confusion-HS256-pem"]
    assert "JWE" in reasons["jwe-five-parts"]
    assert "duplicate" in reasons["duplicate-claim"]
    assert "unknown signing key" in reasons["kid-traversal-attacker-key"]
    # key look-ups only ever for configured issuers, never a URL from a token
    assert {iss for iss, _ in keys.lookups} <= {a.issuer, b.issuer}


def test_signature_checked_even_when_claims_are_perfect(issuers) -> None:
    a, b = issuers
    v = TokenVerifier(config(a, b), StaticKeys(a, b))
    h, p, s = a.token().split(".")
    forged = json.loads(__import__("base64").urlsafe_b64decode(p + "=="))
    forged["sub"] = "admin"
    with pytest.raises(TokenError, match="signature"):
        verify(v, f"{h}.{b64url(json.dumps(forged))}.{s}")


def test_leeway_and_lifetime(issuers) -> None:
    a, b = issuers
    now = int(time.time())
    v = TokenVerifier(config(a, b, max_lifetime=600), StaticKeys(a, b))
    verify(v, a.sign(a.claims(exp=now - 10, iat=now - 100)))  # within 30 s leeway
    verify(v, a.sign(a.claims(iat=now + 10)))
    with pytest.raises(TokenError, match="expired"):
        verify(v, a.sign(a.claims(exp=now - 31, iat=now - 100)))
    with pytest.raises(TokenError, match="lifetime"):
        verify(v, a.sign(a.claims(exp=now + 3600)))


def test_azp_and_claim_mappings(issuers) -> None:
    a, b = issuers
    cfg = IdentityConfig(issuers=(IssuerConfig(
        issuer=a.issuer, audiences=("agentgate", "x"), azp=("runner",),
        groups_claim="kubernetes.io.namespace", roles_claim="realm_access.roles"),))
    v = TokenVerifier(cfg, StaticKeys(a))
    ident = verify(v, a.token(aud=["x", "y"], azp="runner", **{
        "kubernetes.io.namespace": "agents", "realm_access": {"roles": ["r1"]}}))
    assert ident["groups"] == ["agents"] and ident["roles"] == ["r1"]
    for azp in ("other", None):
        with pytest.raises(TokenError, match="azp"):
            verify(v, a.token(azp=azp))


def test_algorithms_pinned_per_issuer(issuers) -> None:
    a, b = issuers
    es_kid = a.add_key("ES256")
    tok = a.token(kid=es_kid)
    verify(TokenVerifier(config(a, b), StaticKeys(a, b)), tok)  # default: asymmetric set
    pinned = IdentityConfig(issuers=(IssuerConfig(issuer=a.issuer, audiences=("agentgate",),
                                                  algorithms=("RS256",)),))
    with pytest.raises(TokenError, match="algorithm ES256 is not allowed"):
        verify(TokenVerifier(pinned, StaticKeys(a)), tok)


def test_key_type_must_fit_algorithm(issuers) -> None:
    a, _ = issuers
    rsa_kid = a.kid
    keys = parse_jwks({"keys": [dict(public_jwk(a.keys[rsa_kid][0], rsa_kid), alg="RS384")]})
    assert not keys[rsa_kid].fits("RS256") and keys[rsa_kid].fits("RS384")
    assert not keys[rsa_kid].fits("ES256") and not keys[rsa_kid].fits("HS256")


def test_jwks_parsing_skips_unusable_keys() -> None:
    small = new_rsa_key(1024)
    big = new_rsa_key()
    doc = {"keys": [
        {"kty": "oct", "k": b64url(b"secret"), "kid": "hmac"},
        public_jwk(small, "weak"),
        dict(public_jwk(big, "enc"), use="enc"),
        public_jwk(big, "good"),
        public_jwk(big, "good"),  # duplicate kid: first kept
        "junk",
    ]}
    assert list(parse_jwks(doc)) == ["good"]
    with pytest.raises(ValueError):
        parse_jwks({"nokeys": []})


def test_no_kid_with_single_key_is_accepted(issuers) -> None:
    a, _ = issuers
    single = LocalIssuer()
    single._server.server_close()
    cfg = IdentityConfig(issuers=(IssuerConfig(issuer=single.issuer,
                                               audiences=("agentgate",)),))
    from jose import jwt as jose_jwt

    from tests.oidc_fixtures import private_pem
    tok = jose_jwt.encode(single.claims(), private_pem(single.keys[single.kid][0]).decode(),
                          "RS256")
    assert verify(TokenVerifier(cfg, StaticKeys(single)), tok)["sub"] == "agent-1"


def test_no_issuers_configured() -> None:
    v = TokenVerifier(IdentityConfig(), StaticKeys())
    with pytest.raises(TokenError) as e:
        verify(v, "a.b.c")
    assert e.value.code == "identity_not_configured"


def test_cache_hits_until_exp_only(issuers) -> None:
    a, b = issuers
    now = [time.time()]
    keys = StaticKeys(a, b)
    v = TokenVerifier(config(a, b), keys, clock=lambda: now[0])
    tok = a.token(expires_in=60)
    verify(v, tok)
    verify(v, tok)
    assert (v.hits, v.misses, len(keys.lookups)) == (1, 1, 1)
    now[0] += 61  # past exp, still inside the leeway: re-verified, not served from cache
    verify(v, tok)
    assert v.misses == 2
    now[0] += 60
    with pytest.raises(TokenError, match="expired"):
        verify(v, tok)


def test_cache_is_bounded(issuers) -> None:
    a, b = issuers
    cfg = IdentityConfig(issuers=config(a, b).issuers, cache_size=3)
    v = TokenVerifier(cfg, StaticKeys(a, b))
    for i in range(10):
        verify(v, a.token(sub=f"s{i}"))
    assert len(v._cache) == 3


def test_parse_token_rejects_before_decoding() -> None:
    with pytest.raises(TokenError, match="too large"):
        parse_token("x" * 9000, 8192)
    with pytest.raises(TokenError) as e:
        parse_token("")
    assert e.value.code == "token_missing"


def test_string_lists_are_refused_in_issuer_config() -> None:
    # "RS" in "RS256" / set("agentgate"): never let a bare string become a substring test
    with pytest.raises(TypeError, match="algorithms"):
        IssuerConfig(issuer="https://x", audiences=("a",), algorithms="RS256")  # type: ignore
    with pytest.raises(TypeError, match="audiences"):
        IssuerConfig(issuer="https://x", audiences="agentgate")  # type: ignore
    with pytest.raises(TypeError, match="audiences"):
        IssuerConfig(issuer="https://x", audiences=())


def test_uses_python_jose_cryptography_backend() -> None:
    import jose

    from addons.identity import jwt as jwt_verify
    assert tuple(int(x) for x in jose.__version__.split(".")[:2]) >= (3, 4)
    assert jwt_verify.CryptographyRSAKey.__module__ == "jose.backends.cryptography_backend"


def test_attacker_text_in_reasons_is_sanitised(issuers) -> None:
    a, b = issuers
    v = TokenVerifier(config(a, b), StaticKeys(a, b))
    tok = a.sign(a.claims(), headers={"alg": "RS256\nFORGED LOG LINE"})
    with pytest.raises(TokenError) as e:
        verify(v, tok)
    assert "\n" not in e.value.reason and "not allowed" in e.value.reason
