"""OAuth client-credentials upstream credentials: the rules keys, the token cache against a real
local token endpoint (devkit TokenServer), and the credentials addon's use of it."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest
from mitmproxy.test import tflow

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.config.schema import ConfigError, Where
from addons.devkit.mcpserver import TokenServer
from addons.egress import credentials
from addons.egress.config import parse_upstream
from addons.egress.oauth import OAuthClient, TokenCache, TokenError, fetch_token
from addons.frame import logscrub

SECRET = "cs-GATEWAY-OAUTH-CLIENT-SECRET-000000"


@pytest.fixture
def tokens(tmp_path: Path):
    with TokenServer({"agentgate": SECRET}, certdir=tmp_path / "certs", lifetime=60) as ts:
        yield ts


def client(ts: TokenServer, **kw) -> OAuthClient:
    base = dict(token_url=ts.token_url, client_id="agentgate", secret_env="AG_T_OAUTH_SECRET",
                ca_file=str(ts.ca_path), timeout=5.0)
    return OAuthClient(**{**base, **kw})


# ---------------------------------------------------------------- rules
def up(credential: dict) -> dict:
    return {"name": "crm", "hosts": ["mcp.crm.example"], "dialect": "generic",
            "credential": credential}


def test_oauth_credential_parses_with_defaults() -> None:
    u = parse_upstream(up({"oauth": {"token_url": "https://auth.example/oauth/token",
                                     "client_id": "gw", "client_secret_env": "CRM_SECRET",
                                     "scope": "mcp:tools", "audience": "crm"}}),
                       Where("rules.yaml", "upstreams[0]"))
    ref = u.credential
    assert ref.header == "authorization" and ref.prefix == "Bearer "
    assert ref.env is None and ref.file is None
    assert ref.oauth.scope == "mcp:tools" and ref.oauth.audience == "crm"
    assert ref.oauth.auth_method == "basic" and ref.oauth.refresh_margin == 60
    assert "OAuth client 'gw'" in ref.describe()


@pytest.mark.parametrize("cred, key, reason", [
    ({"oauth": {"client_id": "gw", "client_secret_env": "S"}},
     "credential.oauth.token_url", "required key is missing"),
    ({"oauth": {"token_url": "http://auth.example/t", "client_id": "gw",
                "client_secret_env": "S"}},
     "credential.oauth.token_url", "clear text"),
    ({"oauth": {"token_url": "ftp://auth.example/t", "client_id": "gw",
                "client_secret_env": "S"}},
     "credential.oauth.token_url", "expected https://"),
    ({"oauth": {"token_url": "https://auth.example/t", "client_id": "gw"}},
     "credential.oauth", "exactly one of 'client_secret_env'"),
    ({"oauth": {"token_url": "https://auth.example/t", "client_id": "gw",
                "client_secret_env": "S", "client_secret": "inline"}},
     "credential.oauth.client_secret", "unknown key"),
    ({"oauth": {"token_url": "https://auth.example/t", "client_id": "gw",
                "client_secret_env": "S", "auth_method": "jwt"}},
     "credential.oauth.auth_method", "basic"),
    ({"oauth": {"token_url": "https://auth.example/t", "client_id": "gw",
                "client_secret_env": "S", "timeout": 0}},
     "credential.oauth.timeout", ">= 0.5"),
    ({"env": "X", "oauth": {"token_url": "https://auth.example/t", "client_id": "gw",
                            "client_secret_env": "S"}},
     "credential", "not both"),
    ({"env": "X"}, "credential.header", "required key is missing"),
])
def test_bad_oauth_rules_name_key_and_reason(cred: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_upstream(up(cred), Where("rules.yaml", "upstreams[0]"))
    msg = str(e.value)
    assert "rules.yaml" in msg and f"upstreams[0].{key}" in msg and reason in msg, msg


# ---------------------------------------------------------------- the fetch
@pytest.mark.parametrize("method", ["basic", "post"])
def test_fetch_token_from_a_real_endpoint(tokens: TokenServer, monkeypatch, method) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    token, lifetime = fetch_token(client(tokens, auth_method=method, scope="mcp:tools",
                                         audience="crm", resource="https://mcp.crm.example"))
    assert lifetime == 60 and tokens.valid(f"Bearer {token}")
    g = tokens.grants[-1]
    assert (g["auth"], g["scope"], g["audience"], g["resource"]) == (
        method, "mcp:tools", "crm", "https://mcp.crm.example")


def test_fetch_failures_say_why_without_the_secret(tokens: TokenServer, monkeypatch) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", "wrong-" + SECRET)
    with pytest.raises(TokenError) as e:
        fetch_token(client(tokens))
    assert str(e.value) == "token endpoint answered HTTP 401 (invalid_client)"
    monkeypatch.delenv("AG_T_OAUTH_SECRET")
    with pytest.raises(TokenError, match="env AG_T_OAUTH_SECRET is not set"):
        fetch_token(client(tokens))
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    tokens.fail_next = 1
    with pytest.raises(TokenError, match="HTTP 500"):
        fetch_token(client(tokens))
    with pytest.raises(TokenError, match="unreachable"):  # not our CA: TLS refuses
        fetch_token(client(tokens, ca_file=None))
    assert not tokens.grants


# ---------------------------------------------------------------- the cache
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_one_fetch_for_many_waiters_then_refresh_ahead_then_expiry(
        tokens: TokenServer, monkeypatch) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    clock = Clock()
    cache = TokenCache(clock=clock)
    c = client(tokens, refresh_margin=10)
    tokens.delay = 0.2  # all 20 arrive while the first fetch is in flight

    async def go() -> None:
        got = await asyncio.gather(*(cache.ensure(c) for _ in range(20)))
        assert len(set(got)) == 1 and got[0] and len(tokens.grants) == 1
        first = got[0]
        tokens.delay = 0
        clock.t += 45  # inside neither margin: cached
        assert await cache.ensure(c) == first and len(tokens.grants) == 1
        clock.t += 10  # 55 s of 60, inside the 10 s margin: refreshed ahead, old one served
        assert await cache.ensure(c) == first
        for _ in range(50):
            if len(tokens.grants) == 2 and cache.current(c) != first:
                break
            await asyncio.sleep(0.05)
        second = cache.current(c)
        assert len(tokens.grants) == 2 and second != first
        assert set(cache.known(c)) == {first, second}
        clock.t += 61  # expired, endpoint down: nothing, and no hammering within RETRY_AFTER
        tokens.fail_next = 100
        assert cache.current(c) is None
        assert await cache.ensure(c) is None and await cache.ensure(c) is None
        assert tokens.fail_next == 99 and "HTTP 500" in cache.reason(c)
        tokens.fail_next = 0
        clock.t += 3
        third = await cache.ensure(c)
        assert third and third not in (first, second)
        cache.invalidate(c)
        assert cache.current(c) is None and cache.due(c)
    asyncio.run(asyncio.wait_for(go(), 30))


def test_short_lifetime_is_not_refreshed_on_every_request(tokens: TokenServer,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    tokens.lifetime = 30  # shorter than the default 60 s margin
    clock = Clock()
    cache = TokenCache(clock=clock)
    c = client(tokens)

    async def go() -> None:
        await cache.ensure(c)
        for _ in range(5):
            clock.t += 2
            await cache.ensure(c)
        assert len(tokens.grants) == 1
    asyncio.run(go())


# ---------------------------------------------------------------- the addon
def test_addon_injects_a_marker_and_refuses_without_a_token(tokens: TokenServer,
                                                            tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(textwrap.dedent(f"""\
        identity: {{required: false}}
        upstreams:
          - name: crm
            hosts: [mcp.crm.example]
            dialect: generic
            credential:
              oauth:
                token_url: {tokens.token_url}
                client_id: agentgate
                client_secret_env: AG_T_OAUTH_SECRET
                ca_file: {tokens.ca_path}
        """))
    holder = RulesHolder(load_rules(rules))
    addon = credentials.Credentials(holder)
    credentials.install_wire_substitution()

    def flow():
        f = tflow.tflow()
        f.request.host, f.request.port, f.request.path = "mcp.crm.example", 443, "/mcp"
        f.request.headers["authorization"] = "Bearer agent-own-token"
        f.metadata["upstream"] = {"name": "crm", "dialect": "generic"}
        return f

    async def run(f) -> None:
        res = addon.request(f)
        if res is not None:
            await res

    f = flow()
    asyncio.run(run(f))
    assert f.response is None
    value = f.request.headers["authorization"]
    assert credentials.carries_marker(value) and "agent-own-token" not in value
    wire = dict(credentials.substitute([(b"authorization", value.encode())]))
    real = wire[b"authorization"].decode()
    assert real.startswith("Bearer at-") and tokens.valid(real)
    # the token and the client secret are known to the log scrubber
    assert real[7:] in logscrub.secrets_known() and SECRET in logscrub.secrets_known()

    # the upstream refuses the token: forgotten, the next request gets a new one
    f.response = tflow.tresp(status_code=401)
    addon.response(f)
    g = flow()
    asyncio.run(run(g))
    real2 = dict(credentials.substitute(
        [(b"authorization", g.request.headers["authorization"].encode())]))[b"authorization"]
    assert real2.decode() != real and len(tokens.grants) == 2

    # the endpoint is down and the token gone: 503 naming the upstream, nothing injected
    from addons.egress.oauth import TOKENS
    TOKENS.invalidate(holder.rules.upstream_named("crm").credential.oauth)
    tokens.fail_next = 100
    h = flow()
    asyncio.run(run(h))
    assert h.response is not None and h.response.status_code == 503
    body = json.loads(h.response.content)
    assert "crm" in json.dumps(body) and "HTTP 500" in json.dumps(body)
    assert h.metadata["refusal"]["code"] == "credential_unavailable"
    assert SECRET not in h.response.text and "at-" not in h.response.text


@pytest.mark.parametrize("answer, reason", [
    (b"<html>not json</html>", "not JSON"),
    (b'{"token_type": "Bearer", "expires_in": 60}', "no usable access_token"),
    (b'{"access_token": "a\\r\\nX-Injected: 1", "expires_in": 60}', "no usable access_token"),
    (b'{"access_token": 42, "expires_in": 60}', "no usable access_token"),
    (b'{"access_token": "tok-0000000", "token_type": "mac", "expires_in": 60}', "bearer"),
    (b'{"access_token": "tok-0000000", "expires_in": -5}', "expires_in"),
    (b'{"access_token": "tok-0000000", "expires_in": true}', "expires_in"),
    (b'{"access_token": "' + b"x" * 70000 + b'"}', "too large"),
    (b"[]", "no usable access_token"),
])
def test_hostile_token_answers_are_refused(tokens: TokenServer, monkeypatch, answer: bytes,
                                           reason: str) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    tokens.raw_answer = answer
    with pytest.raises(TokenError, match=reason) as e:
        fetch_token(client(tokens))
    assert SECRET not in str(e.value) and "tok-" not in str(e.value)


def test_token_rotation_keeps_the_log_scrubber_bounded(tokens: TokenServer, tmp_path: Path,
                                                       monkeypatch) -> None:
    monkeypatch.setenv("AG_T_OAUTH_SECRET", SECRET)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(textwrap.dedent(f"""\
        identity: {{required: false}}
        upstreams:
          - name: crm
            hosts: [mcp.crm.example]
            credential:
              oauth: {{token_url: "{tokens.token_url}", client_id: agentgate,
                       client_secret_env: AG_T_OAUTH_SECRET, ca_file: "{tokens.ca_path}"}}
        """))
    holder = RulesHolder(load_rules(rules))
    addon = credentials.Credentials(holder)
    credentials.install_wire_substitution()
    oauth = holder.rules.upstream_named("crm").credential.oauth
    static = "sk-some-static-key-rotated-0000000000"
    logscrub.add_secret(static)

    def one() -> str:
        f = tflow.tflow()
        f.request.host, f.request.path = "mcp.crm.example", "/mcp"
        f.metadata["upstream"] = {"name": "crm", "dialect": "generic"}

        async def go() -> None:
            res = addon.request(f)
            if res is not None:
                await res
        asyncio.run(go())
        assert f.response is None
        wire = credentials.substitute([(b"authorization",
                                        f.request.headers["authorization"].encode())])
        return dict(wire)[b"authorization"].decode()[len("Bearer "):]

    from addons.egress.oauth import TOKENS
    seen = []
    for _ in range(6):
        seen.append(one())
        TOKENS.invalidate(oauth)
    known = set(logscrub.secrets_known())
    assert len(set(seen)) == 6
    assert seen[-1] in known and seen[-2] in known  # current and previous
    assert not any(t in known for t in seen[:-2])   # older ones forgotten
    assert static in known and SECRET in known       # everything else kept
