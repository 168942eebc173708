"""Identity through a real mitmdump: a real OIDC provider, real SDK clients, every attack.

Acceptance (issue 3): a token issued by oidc-provider-mock lets a real `openai` client through
(the stand-in receives the gateway's key, never the token); expired / other-audience /
foreign-key tokens are refused; the SECURITY.md battery is refused at CONNECT and on inner
requests; key rotation works without restart; a kid flood causes at most one JWKS fetch per
interval; an expired token stops the next request on a kept-alive tunnel.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import subprocess
import sys
import time

import anthropic
import httpx2
import openai
import pytest

from tests.conftest import REAL_OPENAI_KEY, Gateway
from tests.oidc_fixtures import OIDCProvider, attack_tokens, new_rsa_key, sign_jws

pytestmark = pytest.mark.integration

DUMMY = "sk-agent-dummy-key-0000"


def oa(gw: Gateway, *, proxy_token: str | None = None, api_key: str = DUMMY) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(proxy_token),
                                                               verify=str(gw.ca_cert)))


def chat(client: openai.OpenAI, text: str = "hi") -> str:
    r = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content


def connect_status(gw: Gateway, proxy_auth: str | None) -> int:
    """Raw CONNECT with an optional Proxy-Authorization value; returns the status code."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        head = "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
        if proxy_auth is not None:
            head += f"Proxy-Authorization: {proxy_auth}\r\n"
        s.sendall((head + "\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return 0
            data += chunk
    return int(data.split(b" ", 2)[1])


def no_token_anywhere(gw: Gateway, tokens: list[str]) -> None:
    blobs = [gw.logs()]
    for p in gw.data_dir.rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes().decode("latin-1"))
    for tok in tokens:
        assert not any(tok in b for b in blobs)


# ---------------------------------------------------------------- acceptance: real provider
def test_real_provider_token_lets_openai_through(gateway_factory, oidc_provider, standin
                                                 ) -> None:
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                          "identity.yaml": oidc_provider.identity_yaml()})
    tok = oidc_provider.token(sub="agent-7", groups=["bots"])
    standin.clear()
    # 1. token as the proxy password (HTTPS_PROXY=http://agent:<token>@gw)
    assert chat(oa(gw, proxy_token=tok), "via proxy") == "echo: via proxy"
    # 2. token as the API key: OpenAI(api_key=<token>)
    assert chat(oa(gw, api_key=tok), "via key") == "echo: via key"
    reqs = standin.requests
    assert len(reqs) == 2
    for r in reqs:
        assert dict(r["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
        assert tok not in json.dumps(r) and DUMMY not in json.dumps(r)
    # 3. a separate process configured by the environment alone
    code = ("import openai; c = openai.OpenAI(api_key='unused', max_retries=0);"
            "r = c.chat.completions.create(model='m', messages=[{'role':'user',"
            "'content':'env'}]); print(r.choices[0].message.content)")
    p = subprocess.run([sys.executable, "-c", code], env=gw.client_env(tok),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "echo: env"

    now = int(time.time())
    foreign = new_rsa_key()
    claims = {"iss": oidc_provider.issuer, "sub": "agent-7", "aud": "agentgate",
              "iat": now, "exp": now + 300}
    refused = {
        "expired": oidc_provider.token(expires_in=-600, iat=now - 1200),
        "other audience": oidc_provider.token(aud="another-app"),
        "foreign key, provider's kid": sign_jws(
            {"alg": "RS256", "kid": oidc_provider.current_kid()}, claims, foreign),
        "foreign key, own kid": sign_jws({"alg": "RS256", "kid": "attacker"}, claims, foreign),
    }
    expected = {"expired": "token expired", "other audience": "wrong audience",
                "foreign key, provider's kid": "signature verification failed",
                "foreign key, own kid": "unknown signing key"}
    standin.clear()
    for name, bad in refused.items():
        with pytest.raises(openai.AuthenticationError) as e:
            chat(oa(gw, api_key=bad))
        assert e.value.status_code == 401
        assert expected[name] in e.value.message, (name, e.value.message)
        assert bad not in e.value.message
        with pytest.raises(openai.APIConnectionError):  # 407 at CONNECT
            chat(oa(gw, proxy_token=bad))
        assert connect_status(gw, f"Bearer {bad}") == 407
    assert standin.requests == []
    no_token_anywhere(gw, [tok, *refused.values()])


# ---------------------------------------------------------------- attack battery
def test_attack_battery_through_proxy(gateway_factory, make_local_issuer, standin) -> None:
    a, b, bait = make_local_issuer(), make_local_issuer("other-service"), make_local_issuer()
    identity = f"""
identity:
  issuers:
    - {{issuer: "{a.issuer}", audience: agentgate}}
    - {{issuer: "{b.issuer}", audience: other-service}}
"""
    # built first: it publishes a second key for A (kid/key mismatch, kid-less token)
    battery = attack_tokens(a, b, "other-service", bait_url=bait.jwks_uri)
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}", "identity.yaml": identity})
    assert chat(oa(gw, api_key=a.token())) == "echo: hi"  # the set-up itself works
    standin.clear()
    accepted = []
    with httpx2.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as client:
        for name, tok in battery:
            status = connect_status(gw, f"Bearer {tok}")
            if status == 200:
                accepted.append(f"CONNECT {name}")
            try:
                r = client.post("https://api.openai.com/v1/chat/completions",
                                headers={"authorization": f"Bearer {tok}".encode()},
                                json={"model": "m", "messages": [{"role": "user",
                                                                  "content": "x"}]})
                if r.status_code < 400:
                    accepted.append(f"inner {name}")
                elif r.status_code == 401:
                    assert r.json()["error"]["type"] == "authentication_error"
            except httpx2.HTTPError:
                pass  # refused at the protocol level (e.g. an oversized header)
    assert accepted == [], accepted
    assert standin.requests == []
    assert bait.fetches == {"discovery": 0, "jwks": 0}
    assert gw.proc.poll() is None


# ---------------------------------------------------------------- tunnels
def test_expired_token_stops_kept_alive_tunnel(gateway_factory, make_local_issuer) -> None:
    li = make_local_issuer()
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                          "identity.yaml": li.identity_yaml(leeway=0)})
    tok = li.token(sub="short", expires_in=3)
    exp = time.time() + 3
    url = "https://api.openai.com/v1/chat/completions"
    payload = {"model": "m", "messages": [{"role": "user", "content": "one"}]}
    with httpx2.Client(proxy=gw.proxy_url(tok), verify=str(gw.ca_cert), timeout=30) as c:
        assert c.post(url, json=payload).status_code == 200
        time.sleep(max(0.0, exp - time.time()) + 1.2)
        # The gateway retired the tunnel (its response carried Connection: close, the idle
        # tunnel is closed at exp; tests/identity/test_retire.py), so the client reconnects,
        # and a CONNECT with the expired token is refused. The 401 a request racing the close
        # would get on the old tunnel: tests/identity/test_addon.py.
        with pytest.raises(httpx2.ProxyError, match="407"):
            c.post(url, json=payload)
    with pytest.raises(openai.APIConnectionError):
        chat(oa(gw, proxy_token=tok))


# ---------------------------------------------------------------- rotation and floods
def test_key_rotation_and_kid_flood(gateway_factory, standin) -> None:
    provider = OIDCProvider().start()
    try:
        gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                              "identity.yaml": provider.identity_yaml(jwks_refresh_interval=1)})
        assert chat(oa(gw, api_key=provider.token(sub="before"))) == "echo: hi"
        assert provider.fetches["jwks"] == 1
        provider.rotate_key()
        time.sleep(1.1)
        # a token signed by the new key works without restarting the gateway
        assert chat(oa(gw, api_key=provider.token(sub="after"))) == "echo: hi"
        assert provider.fetches["jwks"] == 2

        # flood: tokens with random kids (valid claims, attacker key)
        key = new_rsa_key()
        now = int(time.time())
        claims = {"iss": provider.issuer, "sub": "x", "aud": "agentgate", "iat": now,
                  "exp": now + 300}
        forged = [sign_jws({"alg": "RS256", "kid": secrets.token_hex(6)}, claims, key)
                  for _ in range(60)]
        before = provider.fetches["jwks"]
        t0 = time.monotonic()
        with httpx2.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
            for f in forged:
                r = c.post("https://api.openai.com/v1/chat/completions",
                           headers={"authorization": f"Bearer {f}"}, json={})
                assert r.status_code == 401 and "unknown signing key" in r.text
        elapsed = time.monotonic() - t0
        fetched = provider.fetches["jwks"] - before
        assert fetched <= math.ceil(elapsed / 1.0) + 1, (fetched, elapsed)
    finally:
        provider.stop()


# ---------------------------------------------------------------- scoping and config
def test_upstream_allow_groups(gateway_factory, local_issuer, standin) -> None:
    ups = f"""
upstreams:
  - name: anthropic
    hosts: [api.anthropic.com]
    dialect: anthropic
    forward_to: {standin.url}
    credential: {{header: x-api-key, env: ANTHROPIC_API_KEY}}
    allow_groups: [support-bots]
"""
    gw = gateway_factory({"upstreams.yaml": ups, "identity.yaml": local_issuer.identity_yaml()})

    def client(tok: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=tok, max_retries=0,
            http_client=anthropic.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                     verify=str(gw.ca_cert)))

    def ask(tok: str) -> str:
        m = client(tok).messages.create(model="claude", max_tokens=20,
                                        messages=[{"role": "user", "content": "yo"}])
        return m.content[0].text

    assert ask(local_issuer.token(groups=["support-bots"])) == "echo: yo"
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        ask(local_issuer.token(sub="intruder", groups=["sales"]))
    assert "'anthropic'" in e.value.message and "intruder" in e.value.message


def test_no_issuer_configured_refuses_with_reason(gateway_factory) -> None:
    gw = gateway_factory("{standin_upstreams}")  # default identity: required, no issuers
    with pytest.raises(openai.AuthenticationError) as e:
        chat(oa(gw))
    assert "no token issuer is configured" in e.value.message
    assert connect_status(gw, "Bearer a.b.c") == 407


def test_opt_out_needs_no_token(gateway_factory, no_identity) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity)
    assert chat(oa(gw)) == "echo: hi"


# ---------------------------------------------------------------- plain-HTTP proxy requests
def test_plain_http_proxy_requests(gateway_factory, local_issuer, standin) -> None:
    """http:// through the proxy: the token rides in Proxy-Authorization on each request."""
    import http.client
    gw = gateway_factory({"upstreams.yaml": "{standin_upstreams}",
                          "identity.yaml": local_issuer.identity_yaml()})
    tok = local_issuer.token(sub="hook-bot")

    def post(proxy_auth: str | None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        headers = {"content-type": "application/json", "host": "hooks.example.com"}
        if proxy_auth:
            headers["proxy-authorization"] = proxy_auth
        conn.request("POST", "http://hooks.example.com/notify", body=b'{"x": 1}',
                     headers=headers)
        resp = conn.getresponse()
        resp.body = resp.read()
        conn.close()
        return resp

    standin.clear()
    import base64
    ok = post("Basic " + base64.b64encode(f"agent:{tok}".encode()).decode())
    assert ok.status == 200, ok.body
    assert post(f"Bearer {tok}").status == 200
    assert len(standin.requests) == 2
    for r in standin.requests:
        assert tok not in json.dumps(r)
    missing = post(None)
    assert missing.status == 407
    assert missing.headers.get_all("Proxy-Authenticate") == [
        'Basic realm="agentgate"', 'Bearer realm="agentgate"']
    bad = post("Bearer " + local_issuer.token(aud="elsewhere"))
    assert bad.status == 407 and b"wrong audience" in bad.body


def test_https_issuer_with_private_ca_option(gateway_factory, make_local_issuer, standin
                                             ) -> None:
    """An https issuer signed by a private CA (e.g. the Kubernetes API server)."""
    ca = standin.ca_path
    li = make_local_issuer(tls=(ca.parent / "leaf.pem", ca.parent / "leaf.key"))
    rules = {"upstreams.yaml": "{standin_upstreams}", "identity.yaml": li.identity_yaml()}
    gw = gateway_factory(rules, extra_args=("--set", f"agentgate_identity_ca={ca}"))
    assert chat(oa(gw, api_key=li.token())) == "echo: hi"
    plain = gateway_factory(rules)  # system CAs only: the issuer's certificate is unknown
    with pytest.raises(openai.InternalServerError) as e:
        chat(oa(plain, api_key=li.token()))
    assert e.value.status_code == 503 and "keys unavailable" in e.value.message
