"""Upstreams (default-deny egress) and credentials (strip + inject), addon-level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.egress.credentials import Credentials
from addons.egress.upstreams import Upstreams

RULES = """
upstreams:
  - name: openai
    hosts: [api.openai.com]
    dialect: openai
    credential: {header: Authorization, prefix: "Bearer ", env: AG_T_OPENAI}
  - name: anthropic
    hosts: [api.anthropic.com]
    dialect: anthropic
    credential: {header: x-api-key, env: AG_T_ANTHROPIC}
  - name: local
    hosts: [llm.internal]
    dialect: generic
    forward_to: https://127.0.0.1:9443
"""


@pytest.fixture
def holder(tmp_path: Path, monkeypatch) -> RulesHolder:
    (tmp_path / "r.yaml").write_text(RULES)
    monkeypatch.setenv("AG_T_OPENAI", "real-openai-secret")
    monkeypatch.setenv("AG_T_ANTHROPIC", "real-anthropic-secret")
    return RulesHolder(load_rules(tmp_path))


def flow_to(host: str, path: str = "/v1/chat/completions", **headers: str):
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.scheme = host, 443, "https"
    f.request.path = path
    f.request.headers.clear()
    f.request.headers["host"] = host
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    return f


def run(holder: RulesHolder, f) -> None:
    with taddons.context():
        Upstreams(holder).requestheaders(f)
        Credentials(holder).request(f)


def test_agent_credentials_stripped_and_real_one_injected(holder: RulesHolder) -> None:
    f = flow_to("api.openai.com", authorization="Bearer agent-token", x_api_key="agent-key",
                api_key="k", cookie="session=1", proxy_authorization="Basic abc",
                x_goog_api_key="g")
    run(holder, f)
    assert f.response is None
    h = f.request.headers
    assert h["authorization"] == "Bearer real-openai-secret"
    for gone in ("x-api-key", "api-key", "cookie", "proxy-authorization", "x-goog-api-key"):
        assert gone not in h
    assert f.metadata["upstream"]["name"] == "openai"


def test_anthropic_gets_x_api_key_only(holder: RulesHolder) -> None:
    f = flow_to("api.anthropic.com", "/v1/messages", x_api_key="agent-token",
                authorization="Bearer agent-token")
    run(holder, f)
    assert f.request.headers["x-api-key"] == "real-anthropic-secret"
    assert "authorization" not in f.request.headers


def test_credential_query_parameters_removed(holder: RulesHolder) -> None:
    f = flow_to("api.openai.com", "/v1/models?key=agent&limit=5&api_key=x")
    run(holder, f)
    assert f.request.path == "/v1/models?limit=5"


def test_undeclared_host_gets_403_json(holder: RulesHolder) -> None:
    f = flow_to("evil.example.org", authorization="Bearer agent-token")
    run(holder, f)
    assert f.response.status_code == 403
    body = json.loads(f.response.content)
    assert body["error"]["code"] == "destination_not_allowed"
    assert "evil.example.org" in body["error"]["message"]
    assert "agent-token" not in f.response.text


def test_undeclared_host_refused_at_connect(holder: RulesHolder) -> None:
    f = tflow.tflow()
    f.request.method, f.request.host, f.request.port = "CONNECT", "evil.example.org", 443
    with taddons.context():
        Upstreams(holder).http_connect(f)
    assert f.response.status_code == 403


def test_missing_real_credential_refuses_503_without_value(holder, monkeypatch) -> None:
    monkeypatch.delenv("AG_T_OPENAI")
    f = flow_to("api.openai.com", authorization="Bearer agent-token")
    run(holder, f)
    assert f.response.status_code == 503
    body = json.loads(f.response.content)
    assert body["error"]["code"] == "credential_missing"
    assert "AG_T_OPENAI" in body["error"]["message"]
    assert "agent-token" not in f.response.text


def test_forward_to_moves_the_connection(holder: RulesHolder) -> None:
    f = flow_to("llm.internal", authorization="Bearer agent-token")
    run(holder, f)
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "127.0.0.1", 9443)
    assert "authorization" not in f.request.headers
    assert f.metadata["upstream"]["forwarded_to"] == "https://127.0.0.1:9443"


def test_no_rules_refuses_everything() -> None:
    from addons.config.addon import RulesLoader
    f = flow_to("api.openai.com")
    with taddons.context():
        RulesLoader(RulesHolder()).requestheaders(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "no_rules"
