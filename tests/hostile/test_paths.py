"""Default-deny paths per dialect (the path part of class 6).

Unknown endpoints on an LLM upstream are refused in the dialect unless the upstream's
`paths:` allows them; paths are decoded once and ambiguous forms (dot segments, encoded
slashes, double encoding) are refused, so what is matched is what the upstream routes.
"""

from __future__ import annotations

import json

import pytest

from tests.hostile.edgekit import CHAT, assert_healthy, http_req, status_of, tls_request

pytestmark = pytest.mark.integration


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory("{standin_upstreams}identity:\n  required: false\n")


def send(gw, host: str, method: str, path: str, body: bytes = b"") -> bytes:
    return tls_request(gw, f"{host}:443", http_req(method, path, host, body), sni=host)


@pytest.mark.parametrize("host,path,status,code", [
    ("api.openai.com", "/v1/admin/keys", 404, "path_not_allowed"),
    ("api.openai.com", "/v1/organization/users", 404, "path_not_allowed"),
    ("api.openai.com", "/v2/chat/completions", 404, "path_not_allowed"),
    ("api.anthropic.com", "/v1/chat/completions", 404, "path_not_allowed"),
    ("api.anthropic.com", "/v1/organizations/api_keys", 404, "path_not_allowed"),
    ("api.openai.com", "/v1/chat/completions/../../v1/admin", 400, "ambiguous_path"),
    ("api.openai.com", "/v1/chat/completions/%2e%2e/%2e%2e/admin", 400, "ambiguous_path"),
    ("api.openai.com", "/v1/chat/completions/./", 400, "ambiguous_path"),
    ("api.openai.com", "/v1/files%2fsecret", 400, "ambiguous_path"),
    ("api.openai.com", "/v1/chat%252fcompletions", 400, "ambiguous_path"),
    ("api.openai.com", "/v1//chat/completions", 400, "ambiguous_path"),
    ("api.openai.com", "/v1/chat\\completions", 400, "ambiguous_path"),
])
def test_unknown_or_ambiguous_paths_refused(gw, standin, host, path, status, code) -> None:
    standin.clear()
    answer = send(gw, host, "POST", path, CHAT)
    assert status_of(answer) == status, answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert code in json.dumps(body)
    if host == "api.anthropic.com":
        assert body["type"] == "error"  # the caller's dialect
    assert standin.requests == []
    assert_healthy(gw, standin)


@pytest.mark.parametrize("host,path", [
    ("api.openai.com", "/v1/embeddings"),
    ("api.openai.com", "/v1/models/gpt-4o-mini"),
    ("api.openai.com", "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
    ("api.openai.com", "/v1/ch%61t/completions"),  # decoded once: a known endpoint
    ("api.anthropic.com", "/v1/messages/count_tokens"),
    ("hooks.example.com", "/any/path/at/all"),
])
def test_known_endpoints_pass(gw, standin, host, path) -> None:
    standin.clear()
    answer = send(gw, host, "POST", path, b'{"input": "x", "model": "m"}')
    assert status_of(answer) == 200, answer[:300]
    assert len(standin.requests) == 1


def test_paths_globs_extend_and_restrict(gateway_factory, standin) -> None:
    gw = gateway_factory(
        "upstreams:\n"
        "  - name: openai\n    hosts: [api.openai.com]\n    dialect: openai\n"
        f"    forward_to: {standin.url}\n    paths: ['/v1/vector_stores/**']\n"
        "  - name: hooks\n    hosts: [hooks.example.com]\n    dialect: webhook\n"
        f"    forward_to: {standin.url}\n    paths: ['/in/*']\n"
        "identity:\n  required: false\n")
    standin.clear()
    assert status_of(send(gw, "api.openai.com", "POST", "/v1/vector_stores/vs_1/files",
                          b"{}")) == 200
    assert status_of(send(gw, "hooks.example.com", "POST", "/in/event", b"{}")) == 200
    assert status_of(send(gw, "hooks.example.com", "POST", "/in/a/b", b"{}")) == 404
    assert status_of(send(gw, "hooks.example.com", "POST", "/out", b"{}")) == 404
    assert len(standin.requests) == 2
