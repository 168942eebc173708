"""The identity addon on mitmproxy test flows (taddons/tflow): sources, refusals, tunnels."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

import addons.identity.addon as identity_mod
from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.identity.addon import Identity, verify_token
from addons.identity.jwt import TokenError

UPSTREAMS = """
upstreams:
  - name: openai
    hosts: [api.openai.com]
    dialect: openai
  - name: anthropic
    hosts: [api.anthropic.com]
    dialect: anthropic
    allow_groups: [support-bots]
    allow_subjects: [vip-agent]
"""


def holder_for(tmp_path: Path, identity_yaml: str) -> RulesHolder:
    (tmp_path / "upstreams.yaml").write_text(UPSTREAMS)
    (tmp_path / "identity.yaml").write_text(identity_yaml)
    return RulesHolder(load_rules(tmp_path))


def flow(host: str = "api.openai.com", headers: dict[str, str] | None = None,
         tls: bool = True, method: str = "POST", client_conn=None):
    f = tflow.tflow(client_conn=client_conn)
    f.request.host, f.request.port = host, 443
    f.request.scheme = "https"
    f.request.method = method
    f.request.path = "/v1/chat/completions" if "openai" in host else "/v1/messages"
    for k, v in (headers or {}).items():
        f.request.headers[k] = v
    if not tls:
        f.client_conn.timestamp_tls_setup = None
        f.request.scheme = "http"
    name = "openai" if "openai" in host else "anthropic"
    f.metadata["upstream"] = {"name": name, "dialect": name}
    return f


def basic(token: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def body(f) -> dict:
    return json.loads(f.response.content)


@pytest.fixture
def addon(tmp_path, local_issuer):
    holder = holder_for(tmp_path, local_issuer.identity_yaml())
    a = Identity(holder)
    with taddons.context(a):
        yield a


def run(coro):
    return asyncio.run(coro)


def test_inner_bearer_binds_identity_and_strips_token(addon, local_issuer) -> None:
    tok = local_issuer.token(sub="bot-1", groups=["g1"])
    f = flow(headers={"authorization": f"Bearer {tok}"})
    run(addon.requestheaders(f))
    assert f.response is None
    ident = f.metadata["identity"]
    assert ident["sub"] == "bot-1" and ident["groups"] == ["g1"] and ident["source"] == "bearer"
    assert set(ident) == {"sub", "iss", "groups", "roles", "jti", "token_hash", "exp", "source"}
    assert tok not in json.dumps(f.metadata) and "authorization" not in f.request.headers


def test_x_api_key_source(addon, local_issuer) -> None:
    f = flow(host="api.anthropic.com",
             headers={"x-api-key": local_issuer.token(groups=["support-bots"])})
    run(addon.requestheaders(f))
    assert f.response is None and f.metadata["identity"]["source"] == "x-api-key"
    assert "x-api-key" not in f.request.headers


def test_missing_token_inner_is_401_in_dialect(addon) -> None:
    f = flow()
    run(addon.requestheaders(f))
    assert f.response.status_code == 401
    err = body(f)["error"]
    assert err["code"] == "token_missing" and "proxy password" in err["message"]
    assert f.response.headers["WWW-Authenticate"].startswith("Bearer")
    f = flow(host="api.anthropic.com", headers={"x-api-key": "sk-dummy"})
    run(addon.requestheaders(f))
    assert f.response.status_code == 401 and body(f)["type"] == "error"
    assert "malformed token" in body(f)["error"]["message"]
    assert "sk-dummy" not in f.response.text


def test_plain_proxy_request_gets_407_challenge(addon, local_issuer) -> None:
    f = flow(tls=False)
    run(addon.requestheaders(f))
    assert f.response.status_code == 407
    assert f.response.headers.get_all("Proxy-Authenticate") == [
        'Basic realm="agentgate"', 'Bearer realm="agentgate"']
    f = flow(tls=False, headers={"proxy-authorization": basic(local_issuer.token())})
    run(addon.requestheaders(f))
    assert f.response is None and "proxy-authorization" not in f.request.headers
    expired = local_issuer.token(expires_in=-3600, iat=int(time.time()) - 7200)
    f = flow(tls=False, headers={"proxy-authorization": basic(expired)})
    run(addon.requestheaders(f))
    assert f.response.status_code == 407 and "token expired" in body(f)["error"]["message"]
    assert expired not in f.response.text


def test_connect_then_tunnel_requests_rechecked(addon, local_issuer) -> None:
    tok = local_issuer.token(sub="tunnel", expires_in=60)
    c = flow(method="CONNECT", headers={"proxy-authorization": basic(tok)})
    run(addon.http_connect(c))
    assert c.response is None and c.metadata["identity"]["sub"] == "tunnel"
    assert "proxy-authorization" not in c.request.headers
    inner = flow(client_conn=c.client_conn)
    run(addon.requestheaders(inner))
    assert inner.response is None and inner.metadata["identity"]["source"] == "proxy"
    # the token expires while the tunnel stays open: the next request is refused
    addon.state.verifier.clock = lambda: time.time() + 3600
    inner2 = flow(client_conn=c.client_conn)
    run(addon.requestheaders(inner2))
    assert inner2.response.status_code == 401
    assert "token expired" in body(inner2)["error"]["message"]
    assert "reconnect" in body(inner2)["error"]["message"]
    addon.client_disconnected(c.client_conn)
    assert c.client_conn.id not in addon._conns


def test_connect_bearer_and_user_only_basic(addon, local_issuer) -> None:
    c = flow(method="CONNECT", headers={"proxy-authorization": f"Bearer {local_issuer.token()}"})
    run(addon.http_connect(c))
    assert c.response is None and c.client_conn.id in addon._conns
    c = flow(method="CONNECT", headers={"proxy-authorization": "Basic " + base64.b64encode(
        f"{local_issuer.token()}:".encode()).decode()})
    run(addon.http_connect(c))
    assert c.response is None


@pytest.mark.parametrize("value,reason", [
    ("Digest abc", "unsupported proxy credential scheme"),
    ("Basic !!!", "malformed Basic"),
    ("Basic " + base64.b64encode(b"agent:not-a-jwt").decode(), "malformed token"),
])
def test_connect_bad_credentials_407(addon, value, reason) -> None:
    c = flow(method="CONNECT", headers={"proxy-authorization": value})
    run(addon.http_connect(c))
    assert c.response.status_code == 407 and reason in body(c)["error"]["message"]
    assert len(c.response.headers.get_all("Proxy-Authenticate")) == 2
    assert c.metadata["refusal"]["step"] == "identity"


def test_connect_without_credentials_defers_to_inner_request(addon) -> None:
    c = flow(method="CONNECT")
    run(addon.http_connect(c))
    assert c.response is None and c.client_conn.id not in addon._conns


def test_upstream_allow_lists(addon, local_issuer) -> None:
    f = flow(host="api.anthropic.com", headers={"x-api-key": local_issuer.token(groups=["x"])})
    run(addon.requestheaders(f))
    assert f.response.status_code == 403
    b = body(f)
    assert b["type"] == "error" and "'anthropic'" in b["error"]["message"]
    assert b["error"]["code"] == "identity_not_allowed"
    for tok in (local_issuer.token(groups=["x", "support-bots"]),
                local_issuer.token(sub="vip-agent")):
        f = flow(host="api.anthropic.com", headers={"x-api-key": tok})
        run(addon.requestheaders(f))
        assert f.response is None


def test_opt_out_mode(tmp_path, local_issuer) -> None:
    holder = holder_for(tmp_path, "identity:\n  required: false\n")
    a = Identity(holder)
    with taddons.context(a):
        f = flow(headers={"authorization": "Bearer sk-dummy"})
        run(a.requestheaders(f))
        assert f.response is None and "identity" not in f.metadata
        assert f.request.headers["authorization"] == "Bearer sk-dummy"  # credentials strips
        f = flow(host="api.anthropic.com")
        run(a.requestheaders(f))
        assert f.response.status_code == 403 and "requires an identity" in f.response.text
        c = flow(method="CONNECT", headers={"proxy-authorization": basic("junk")})
        run(a.http_connect(c))
        assert c.response is None


def test_opt_out_with_issuer_still_binds_valid_tokens(tmp_path, local_issuer) -> None:
    text = local_issuer.identity_yaml().replace("required: true", "required: false")
    a = Identity(holder_for(tmp_path, text))
    with taddons.context(a):
        f = flow(headers={"authorization": f"Bearer {local_issuer.token(sub='opt')}"})
        run(a.requestheaders(f))
        assert f.metadata["identity"]["sub"] == "opt"
        f = flow(headers={"authorization": "Bearer garbage"})
        run(a.requestheaders(f))
        assert f.response is None and "identity" not in f.metadata


def test_required_without_issuers_refuses_everything(tmp_path) -> None:
    a = Identity(holder_for(tmp_path, "identity:\n  required: true\n"))
    with taddons.context(a):
        c = flow(method="CONNECT")
        run(a.http_connect(c))
        assert c.response is None  # the inner request gets the readable 401
        c = flow(method="CONNECT", headers={"proxy-authorization": "Bearer a.b.c"})
        run(a.http_connect(c))
        assert c.response.status_code == 407
        assert "no token issuer is configured" in body(c)["error"]["message"]
        f = flow()
        run(a.requestheaders(f))
        assert f.response.status_code == 401
        assert body(f)["error"]["code"] == "identity_not_configured"


def test_issuer_unavailable_is_503(tmp_path, make_local_issuer) -> None:
    li = make_local_issuer()
    li.down = True
    a = Identity(holder_for(tmp_path, li.identity_yaml()))
    with taddons.context(a):
        f = flow(headers={"authorization": f"Bearer {li.token()}"})
        run(a.requestheaders(f))
        assert f.response.status_code == 503
        assert body(f)["error"]["code"] == "issuer_unavailable"


def test_hook_exception_fails_closed(addon, local_issuer, monkeypatch) -> None:
    async def boom(holder, token):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(identity_mod, "verify_token", boom)
    f = flow(headers={"authorization": f"Bearer {local_issuer.token()}"})
    run(addon.requestheaders(f))
    assert f.response.status_code == 503 and f.metadata["refusal"]["step"] == "identity"
    assert "kaboom" not in f.response.text


def test_verify_token_for_other_addons(addon, local_issuer) -> None:
    ident = run(verify_token(addon.holder, local_issuer.token(sub="reviewer", roles=["r"])))
    assert ident["sub"] == "reviewer" and ident["roles"] == ["r"]
    with pytest.raises(TokenError) as e:
        run(verify_token(addon.holder, local_issuer.token(aud="nope")))
    assert e.value.code == "wrong_audience"
    assert run(verify_token(RulesHolder(addon.holder.rules), local_issuer.token()))["sub"]


def test_rules_reload_rebuilds_verifier(tmp_path, local_issuer) -> None:
    holder = holder_for(tmp_path, local_issuer.identity_yaml())
    tok = local_issuer.token()
    run(verify_token(holder, tok))
    (tmp_path / "identity.yaml").write_text(local_issuer.identity_yaml(audience="other"))
    holder.install(load_rules(tmp_path))
    with pytest.raises(TokenError, match="wrong audience"):  # cache did not survive
        run(verify_token(holder, tok))


def test_ca_option_validated(tmp_path, local_issuer) -> None:
    a = Identity(holder_for(tmp_path, local_issuer.identity_yaml()))
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="no such file"):
            tctx.configure(a, agentgate_identity_ca=str(tmp_path / "missing.pem"))
        ca = tmp_path / "ca.pem"
        ca.write_text("x")
        tctx.configure(a, agentgate_identity_ca=str(ca))
        assert a.state.store.ca_file == str(ca)


def test_keys_prefetched_at_start_and_on_reload(tmp_path, make_local_issuer) -> None:
    li, li2 = make_local_issuer(), make_local_issuer()
    holder = holder_for(tmp_path, li.identity_yaml())
    a = Identity(holder)

    async def go():
        a.running()
        for _ in range(100):
            if li.fetches["jwks"]:
                break
            await asyncio.sleep(0.02)
        (tmp_path / "identity.yaml").write_text(li2.identity_yaml())
        holder.install(load_rules(tmp_path))
        for _ in range(100):
            if li2.fetches["jwks"]:
                break
            await asyncio.sleep(0.02)
        # an unrelated reload keeps the verifier (and its cache)
        v = a.state.verifier
        holder.install(load_rules(tmp_path))
        assert a.state.verifier is v

    with taddons.context(a):
        run(go())
    assert li.fetches["jwks"] == 1 and li2.fetches["jwks"] == 1
