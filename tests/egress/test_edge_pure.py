"""Pure edge logic: address vetting, path normalisation/matching, host:port matching,
first-bytes classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.egress.addresses import refusal
from addons.egress.config import host_matches
from addons.egress.edge import classify
from addons.egress.paths import PathError, normalise, path_allowed

NONE: set = set()


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe",
    "2001:0:4136:e378:8000:63bf:f5fe:56f6",  # Teredo for 10.1.169.9 -> private
    "192.0.2.1", "198.18.0.1", "240.0.0.1",
])
def test_non_public_addresses_refused(ip: str) -> None:
    assert refusal(ip, 443, explicit=NONE, allow_private=False, listeners=NONE)
    assert refusal(ip, 443, explicit=NONE, allow_private=True, listeners=NONE) is None


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip: str) -> None:
    assert refusal(ip, 443, explicit=NONE, allow_private=False, listeners=NONE) is None


def test_literal_declaration_and_own_listeners() -> None:
    assert refusal("127.0.0.1", 9443, explicit={("127.0.0.1", 9443)}, allow_private=False,
                   listeners=NONE) is None
    assert refusal("127.0.0.1", 9444, explicit={("127.0.0.1", 9443)}, allow_private=False,
                   listeners=NONE)
    for ip in ("127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1", "10.0.0.5"):
        why = refusal(ip, 8081, explicit={(ip, 8081)}, allow_private=True,
                      listeners={("0.0.0.0", 8081)})
        assert why and "own listeners" in why


@pytest.mark.parametrize("path", [
    "/v1/chat/completions/../files", "/v1/%2e%2e/files", "/v1/./x", "/v1/a%2fb", "/v1/a%5cb",
    "/v1/a%00", "/v1/%252e%252e/x", "/v1//x", "/v1/a b", "/v1/a\\b", "/v1/%zz", "v1/x",
    "/v1/%2E%2E/x",
])
def test_ambiguous_paths_refused(path: str) -> None:
    with pytest.raises(PathError):
        normalise(path)


def test_paths_per_dialect() -> None:
    ok = [("openai", "/v1/chat/completions?x=1"), ("openai", "/v1/files/file-1/content"),
          ("openai", "/openai/deployments/gpt4o/chat/completions"),
          ("openai", "/v1/batches/b1/cancel"), ("anthropic", "/v1/messages/batches/m1/results"),
          ("webhook", "/anything"), ("generic", "/")]
    for dialect, p in ok:
        assert path_allowed(dialect, None, normalise(p)), p
    bad = [("openai", "/v1/organization/admin_api_keys"), ("openai", "/v1/chat/completionsX"),
           ("openai", "/openai/deployments/a/b/chat/completions"),
           ("anthropic", "/v1/chat/completions"), ("anthropic", "/v1/messages/x/y")]
    for dialect, p in bad:
        assert not path_allowed(dialect, None, normalise(p)), p
    assert path_allowed("webhook", ("/in/**",), "/in/a/b")
    assert not path_allowed("webhook", ("/in/*",), "/in/a/b")
    assert path_allowed("openai", ("/v1/vector_stores/**",), "/v1/vector_stores/vs/files")


@pytest.mark.parametrize("pattern,host,port,default,ok", [
    ("api.openai.com", "api.openai.com", 443, 443, True),
    ("api.openai.com", "api.openai.com", 22, 443, False),
    ("api.openai.com", "api.openai.com", 80, 443, False),
    ("ollama.lan", "ollama.lan", 80, 80, True),
    ("ollama.lan", "ollama.lan", 443, 80, False),
    ("*.example.com", "a.example.com", 8443, 443, False),
    ("[::1]:9000", "[::1]", 9000, 443, True),
])
def test_host_without_port_is_the_default_port_only(pattern, host, port, default, ok) -> None:
    assert host_matches(pattern, host, port, default) is ok


@pytest.mark.parametrize("data,kind", [
    (b"", "more"), (b"\x16", "more"), (b"\x16\x03", "more"), (b"\x16\x03\x01\x02\x00", "more"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", "tls"),
    (b"\x16\x03\x01\x00\x20\xff\xff\xff\xff", "refuse"),  # not a ClientHello
    (b"\x16\x03\x01\x40\x00\x01\xff\xff\xff", "refuse"),  # a 16 MiB ClientHello
    (b"GET", "more"), (b"GET / HTTP/1.1\r\n", "http"), (b"PRI * HTTP/2.0\r\n", "http"),
    (b"SSH-2.0-x\r\n", "refuse"), (b"\x05\x01\x00", "refuse"), (b"get / HTTP/1.1\r\n", "refuse"),
    (b"GET " + b"a" * 20000, "refuse"), (b"\x17\x03\x03", "refuse"),
])
def test_first_bytes_classification(data: bytes, kind: str) -> None:
    assert classify(data) == kind


@pytest.mark.parametrize("text,reason", [
    ("{name: a, hosts: [a.example.com], scheme: http, credential: {header: X, env: A}}",
     "clear text"),
    ("{name: a, hosts: [a.example.com], forward_to: 'http://10.0.0.1:80', "
     "credential: {header: X, env: A}}", "clear text"),
    ("{name: a, hosts: [a.example.com], scheme: ftp}", "https or http"),
    ("{name: a, hosts: [a.example.com], paths: [v1/x]}", "starts with '/'"),
])
def test_upstream_key_errors(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "r.yaml").write_text(f"upstreams:\n  - {text}\n")
    with pytest.raises(ConfigError, match=reason):
        load_rules(tmp_path)


def test_cleartext_credential_to_loopback_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "upstreams:\n  - {name: a, hosts: ['127.0.0.1:8000'], scheme: http, "
        "credential: {header: X, env: A}}\n")
    (up,) = load_rules(tmp_path).upstreams
    assert up.scheme == "http" and up.matches("127.0.0.1", 8000)
