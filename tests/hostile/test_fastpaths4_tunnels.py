"""Hostile: identity's per-tunnel token hash (identity._Tunnel.key: the token given at
CONNECT hashed once, the verifier's cache looked up with it on every request of the
tunnel). Through a real mitmdump and a real (local) issuer: two keep-alive tunnels, one
CONNECTed with alice's token and one with bob's, send interleaved requests to an upstream
only alice may use. Each request is judged as its own tunnel's subject, every time; a
request inside bob's tunnel carrying alice's token as its own Proxy-Authorization is
alice's for that request only (the tunnel's token does not rotate: bob's next request is
refused again), and a garbage token inside alice's tunnel is refused rather than falling
back to the tunnel's identity. Nothing refused reaches the upstream."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from tests.conftest import standin_upstreams_yaml

pytestmark = pytest.mark.integration

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def tunnel(gw, token: str) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    c = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=30)
    c.set_tunnel("api.openai.com", 443, headers={"Proxy-Authorization": f"Bearer {token}"})
    return c


def post(c: http.client.HTTPSConnection, tag: str, headers: dict[str, str] | None = None
         ) -> tuple[int, str]:
    c.request("POST", "/v1/chat/completions", body=BODY.replace("hi", tag),
              headers={"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    assert not r.will_close, "the tunnel must stay open for the next request"
    return r.status, text


def test_each_request_is_its_own_tunnels_subject(gateway_factory, make_local_issuer,
                                                 standin) -> None:
    iss = make_local_issuer()
    ups = standin_upstreams_yaml(standin).replace(
        "    dialect: openai\n", "    dialect: openai\n    allow_subjects: [alice]\n", 1)
    identity = (f"identity:\n  required: true\n  issuers:\n"
                f"    - {{issuer: \"{iss.issuer}\", audience: agentgate}}\n")
    gw = gateway_factory({"rules.yaml": ups, "id.yaml": identity})
    alice, bob = iss.token(sub="alice"), iss.token(sub="bob")
    a, b = tunnel(gw, alice), tunnel(gw, bob)
    standin.clear()
    try:
        for i in range(4):  # interleaved: every request a cache hit of its own tunnel's
            status, _ = post(a, f"alice-{i}")
            assert status == 200, i
            status, text = post(b, f"bob-{i}")
            assert status == 403 and "identity_not_allowed" in text, (i, text[:300])
        # bob's tunnel, alice's token on one request: hers for that request only
        status, _ = post(b, "bob-as-alice", {"Proxy-Authorization": f"Bearer {alice}"})
        assert status == 200
        status, text = post(b, "bob-again")
        assert status == 403 and "identity_not_allowed" in text, text[:300]
        # alice's tunnel, a token that does not verify on one request: refused, not hers
        status, _ = post(a, "alice-garbage", {"Proxy-Authorization": "Bearer not.a.token"})
        assert status in (401, 407), status
    except http.client.RemoteDisconnected:
        pytest.fail("the gateway closed a tunnel")
    finally:
        a.close()
        b.close()
    got = [json.loads(r["body"])["messages"][0]["content"] for r in standin.requests]
    assert got == [f"alice-{i}" for i in range(4)] + ["bob-as-alice"], got
