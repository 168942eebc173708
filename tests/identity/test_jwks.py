"""JWKS discovery, caching, refresh limits and outages (identity/jwks.py), local issuer."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from addons.identity import jwks as jwks_mod
from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwks import FetchError, JwksStore, _check_url, fetch_json, make_verifier
from addons.identity.jwt import TokenError
from tests.oidc_fixtures import new_rsa_key, sign_jws


def cfg_for(li, **kw) -> IdentityConfig:
    return IdentityConfig(issuers=(IssuerConfig(issuer=li.issuer, audiences=("agentgate",),
                                                **kw),))


def run(coro):
    return asyncio.run(coro)


def random_kid_token(li) -> str:
    return sign_jws({"alg": "RS256", "kid": secrets.token_hex(8)}, li.claims(),
                    new_rsa_key_cached())


_KEY = []


def new_rsa_key_cached():
    if not _KEY:
        _KEY.append(new_rsa_key())
    return _KEY[0]


def test_discovery_then_jwks_once(make_local_issuer) -> None:
    li = make_local_issuer()
    v = make_verifier(cfg_for(li))

    async def go():
        for _ in range(5):
            await v.verify(li.token(sub=secrets.token_hex(3)))
    run(go())
    assert li.fetches == {"discovery": 1, "jwks": 1}


def test_explicit_jwks_uri_skips_discovery(make_local_issuer) -> None:
    li = make_local_issuer()
    v = make_verifier(cfg_for(li, jwks_uri=li.jwks_uri))
    assert run(v.verify(li.token()))["sub"] == "agent-1"
    assert li.fetches == {"discovery": 0, "jwks": 1}


def test_kid_flood_is_rate_limited(make_local_issuer) -> None:
    li = make_local_issuer()
    v = make_verifier(cfg_for(li, jwks_refresh_interval=1))
    run(v.verify(li.token()))
    assert li.fetches["jwks"] == 1

    forged = [random_kid_token(li) for _ in range(40)]

    async def flood(seconds: float) -> int:
        refused = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batch = [v.verify(t) for t in forged]
            for r in await asyncio.gather(*batch, return_exceptions=True):
                assert isinstance(r, TokenError) and "unknown signing key" in r.reason
                refused += 1
            await asyncio.sleep(0.05)
        return refused

    refused = run(flood(2.2))
    assert refused >= 100
    # one initial load + at most one refresh per started 1 s interval
    assert li.fetches["jwks"] <= 1 + 3, li.fetches


def test_concurrent_unknown_kids_share_one_fetch(make_local_issuer) -> None:
    li = make_local_issuer()
    li.jwks_delay = 0.3
    v = make_verifier(cfg_for(li, jwks_refresh_interval=30))

    async def go():
        results = await asyncio.gather(*(v.verify(li.token(sub=f"s{i}")) for i in range(30)))
        assert len(results) == 30
    run(go())
    assert li.fetches["jwks"] == 1


def test_key_rotation_without_restart(make_local_issuer) -> None:
    li = make_local_issuer()
    v = make_verifier(cfg_for(li, jwks_refresh_interval=1))
    old_tok = li.token(sub="old")
    run(v.verify(old_tok))
    old_kid = li.kid
    li.rotate()
    new_tok = li.token(sub="new")
    time.sleep(1.05)
    assert run(v.verify(new_tok))["sub"] == "new"
    assert li.fetches["jwks"] == 2
    # the old key is no longer published: an old-key token not seen before is refused
    with pytest.raises(TokenError, match="unknown signing key"):
        run(v.verify(li.token(sub="old2", kid=old_kid)))


def test_issuer_down_keeps_last_good_keys(make_local_issuer) -> None:
    li = make_local_issuer()
    store = JwksStore()
    v = make_verifier(cfg_for(li, jwks_refresh_interval=1), store)
    run(v.verify(li.token()))
    li.down = True
    time.sleep(1.05)
    with pytest.raises(TokenError, match="unknown signing key"):
        run(v.verify(random_kid_token(li)))  # triggers a refresh, which fails
    (status,) = store.status()
    assert status["loaded"] and status["keys"] == 1 and "503" in status["error"]
    assert run(v.verify(li.token(sub="still-works")))["sub"] == "still-works"


def test_no_keys_ever_loaded_refuses(make_local_issuer, monkeypatch) -> None:
    monkeypatch.setattr(jwks_mod, "NEVER_LOADED_RETRY", 1.0)
    li = make_local_issuer()
    li.down = True
    v = make_verifier(cfg_for(li))
    tok = li.token()
    with pytest.raises(TokenError) as e:
        run(v.verify(tok))
    assert e.value.code == "issuer_unavailable" and e.value.status == 503
    with pytest.raises(TokenError):  # within the retry interval: no new fetch
        run(v.verify(tok))
    assert li.fetches["discovery"] == 1
    li.down = False
    time.sleep(1.05)
    assert run(v.verify(tok))["sub"] == "agent-1"


def test_unreachable_issuer(make_local_issuer) -> None:
    li = make_local_issuer()
    li.stop()
    v = make_verifier(cfg_for(li, fetch_timeout=2))
    with pytest.raises(TokenError) as e:
        run(v.verify(li.token()))
    assert e.value.code == "issuer_unavailable" and "JWKS not loaded" in e.value.reason


def test_discovery_must_name_the_same_issuer(make_local_issuer) -> None:
    li = make_local_issuer()
    alias = f"http://localhost:{li.port}"  # same server; its discovery names 127.0.0.1
    v = make_verifier(IdentityConfig(issuers=(IssuerConfig(issuer=alias,
                                                           audiences=("agentgate",)),)))
    with pytest.raises(TokenError, match="JWKS not loaded: discovery document names another"):
        run(v.verify(li.sign(li.claims(iss=alias))))
    assert li.fetches["jwks"] == 0


def test_fetch_does_not_block_the_event_loop(make_local_issuer) -> None:
    li = make_local_issuer()
    li.jwks_delay = 0.5
    v = make_verifier(cfg_for(li))
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def go():
        t = asyncio.create_task(ticker())
        await v.verify(li.token())
        t.cancel()
    run(go())
    assert len(ticks) >= 15
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.2


def test_https_issuer_needs_the_configured_ca(make_local_issuer, standin) -> None:
    ca = standin.ca_path
    li = make_local_issuer(tls=(ca.parent / "leaf.pem", ca.parent / "leaf.key"))
    assert li.issuer.startswith("https://")
    with pytest.raises(TokenError, match="JWKS not loaded"):
        run(make_verifier(cfg_for(li)).verify(li.token()))  # system CAs only
    v = make_verifier(cfg_for(li), JwksStore(ca_file=str(ca)))
    assert run(v.verify(li.token()))["iss"] == li.issuer


def test_fetch_refuses_plain_http_and_redirects() -> None:
    with pytest.raises(FetchError, match="non-https"):
        _check_url("http://idp.example.com/jwks")
    with pytest.raises(FetchError, match="non-https"):
        fetch_json("file:///etc/passwd", 1)
    assert _check_url("http://127.0.0.1:1/x") and _check_url("https://idp.example.com/x")


def test_redirect_is_not_followed(tmp_path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class R(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("location", "http://169.254.169.254/latest")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), R)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchError, match="redirect"):
            fetch_json(f"http://127.0.0.1:{srv.server_address[1]}/jwks", 2)
    finally:
        srv.shutdown()
        srv.server_close()
