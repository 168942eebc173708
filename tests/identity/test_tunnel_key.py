"""A tunnel's token is hashed once (addons/identity/addon.py _Tunnel.key), not on every
request: the key it passes to the verifier is exactly token_hash of its own token, and a
verification with it answers exactly as one without it (the cache, expiry, a token not
seen before)."""

from __future__ import annotations

import asyncio
import time

import pytest

from addons.identity import jwt
from addons.identity.addon import _Tunnel
from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwt import TokenError, TokenVerifier, token_hash
from tests.identity.test_jwt import StaticKeys
from tests.oidc_fixtures import LocalIssuer


@pytest.fixture(scope="module")
def issuer():
    a = LocalIssuer()
    yield a
    a._server.server_close()


def test_the_key_is_the_hash_of_the_tunnels_own_token(issuer) -> None:
    for tok in (issuer.token(sub="a"), "  " + issuer.token(sub="b") + "\n"):
        t = _Tunnel(tok, {"exp": time.time() + 60})
        assert t.key == token_hash(tok.strip())
    assert _Tunnel("x", {}).key != _Tunnel("y", {}).key


def test_a_kept_key_answers_as_hashing_would(issuer, monkeypatch) -> None:
    now = [time.time()]
    cfg = IdentityConfig(issuers=(IssuerConfig(issuer=issuer.issuer,
                                               audiences=("agentgate",), leeway=30),))
    v = TokenVerifier(cfg, StaticKeys(issuer), clock=lambda: now[0])
    tok, other = issuer.token(sub="alice", expires_in=60), issuer.token(sub="bob")
    first = asyncio.run(v.verify(tok))
    hashed: list[str] = []
    real = jwt.token_hash
    monkeypatch.setattr(jwt, "token_hash", lambda t: hashed.append(t) or real(t))
    again = asyncio.run(v.verify(tok, first["token_hash"]))
    assert again == first and hashed == [] and v.hits == 1
    # a token the cache does not hold is verified (and hashed) in full
    assert asyncio.run(v.verify(other, real(other)))["sub"] == "bob"
    # past exp: never served from the cache, key or not
    now[0] += 61
    asyncio.run(v.verify(tok, first["token_hash"]))
    assert v.misses == 3
    now[0] += 60
    with pytest.raises(TokenError, match="expired"):
        asyncio.run(v.verify(tok, first["token_hash"]))
