"""The `identity` rules section (addons/identity/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.identity.config import ASYMMETRIC_ALGORITHMS

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str):
    (tmp_path / "identity.yaml").write_text(text)
    return load_rules(tmp_path).identity


def test_default_rules_directory_requires_tokens() -> None:
    ident = load_rules(ROOT / "rules").identity
    assert ident.required is True
    assert "NO issuer configured" in ident.describe()


def test_empty_section_defaults(tmp_path: Path) -> None:
    ident = load(tmp_path, "")
    assert ident.required and ident.issuers == () and ident.cache_size == 10000


def test_explicit_opt_out(tmp_path: Path) -> None:
    ident = load(tmp_path, "identity:\n  required: false\n")
    assert ident.required is False and "opt-out" in ident.describe()


def test_full_issuer(tmp_path: Path) -> None:
    ident = load(tmp_path, """
identity:
  sources: [proxy, bearer]
  cache_size: 50
  issuers:
    - issuer: https://sso.example.com/realms/agents
      name: keycloak
      audience: [agentgate, gw2]
      jwks_uri: https://sso.example.com/realms/agents/certs
      algorithms: [RS256, ES256]
      azp: [runner]
      claims: {subject: preferred_username, groups: groups, roles: realm_access.roles}
      leeway: 10
      max_token_bytes: 4096
      max_lifetime: 3600
      jwks_refresh_interval: 60
      jwks_max_age: 600
      fetch_timeout: 3
    - issuer: http://127.0.0.1:9400
      audience: agentgate
""")
    a, b = ident.issuers
    assert a.audiences == ("agentgate", "gw2") and a.algorithms == ("RS256", "ES256")
    assert a.roles_claim == "realm_access.roles" and a.subject_claim == "preferred_username"
    assert (a.leeway, a.max_token_bytes, a.max_lifetime) == (10, 4096, 3600)
    assert b.algorithms == ASYMMETRIC_ALGORITHMS and b.jwks_uri is None
    assert ident.sources == ("proxy", "bearer") and ident.issuer_for(b.issuer) is b
    assert "2 issuer(s)" in ident.describe()


@pytest.mark.parametrize("issuer_yaml,key,reason", [
    ("{issuer: https://x.example}", "audience", "required key is missing"),
    ("{audience: a}", "issuer", "required key is missing"),
    ("{issuer: http://idp.example.com, audience: a}", "issuer", "https"),
    ("{issuer: ftp://idp.example.com, audience: a}", "issuer", "https"),
    ("{issuer: 'https://idp.example.com?x=1', audience: a}", "issuer", "query"),
    ("{issuer: https://x.example, audience: []}", "audience", "at least one"),
    ("{issuer: https://x.example, audience: a, algorithms: [HS256]}", "algorithms[0]",
     "public keys"),
    ("{issuer: https://x.example, audience: a, algorithms: [none]}", "algorithms[0]",
     "not allowed"),
    ("{issuer: https://x.example, audience: a, algorithms: [PS256]}", "algorithms[0]",
     "unsupported"),
    ("{issuer: https://x.example, audience: a, algorithms: RS256x}", "algorithms[0]",
     "unsupported"),
    ("{issuer: https://x.example, audience: a, leeway: 3600}", "leeway", "<= 300"),
    ("{issuer: https://x.example, audience: a, max_token_bytes: 10}", "max_token_bytes",
     ">= 256"),
    ("{issuer: https://x.example, audience: a, jwks_uri: 'http://evil.example/k'}",
     "jwks_uri", "https"),
    ("{issuer: https://x.example, audience: a, claims: {group: g}}", "claims.group",
     "unknown key"),
    ("{issuer: https://x.example, audience: a, claims: {groups: 'a b'}}", "claims.groups",
     "claim name"),
    ("{issuer: https://x.example, audience: a, color: red}", "color", "unknown key"),
])
def test_issuer_errors_name_file_key_reason(tmp_path: Path, issuer_yaml: str, key: str,
                                            reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"identity:\n  issuers:\n    - {issuer_yaml}\n")
    assert e.value.file.endswith("identity.yaml")
    assert e.value.key == f"identity.issuers[0].{key}"
    assert reason in e.value.reason


@pytest.mark.parametrize("text,key,reason", [
    ("identity:\n  required: maybe\n", "identity.required", "true or false"),
    ("identity:\n  sources: [cookie]\n", "identity.sources[0]", "unknown token source"),
    ("identity:\n  issuers: {issuer: x}\n", "identity.issuers", "list"),
    ("identity:\n  cache_size: -1\n", "identity.cache_size", ">= 0"),
    ("identity:\n  issuer: https://x.example\n", "identity.issuer", "unknown key"),
    ("identity:\n  issuers:\n    - {issuer: 'https://x.example', audience: a}\n"
     "    - {issuer: 'https://x.example', audience: b}\n", "identity.issuers[1].issuer",
     "listed twice"),
])
def test_section_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert e.value.key == key and reason in e.value.reason


def test_issuers_split_across_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("identity:\n  required: true\n")
    (tmp_path / "b.yaml").write_text("identity:\n  required: false\n")
    with pytest.raises(ConfigError, match="already set"):
        load_rules(tmp_path)


def test_fixture_yaml_parses(tmp_path: Path, local_issuer) -> None:
    ident = load(tmp_path, local_issuer.identity_yaml(leeway=0, jwks_refresh_interval=1))
    (i,) = ident.issuers
    assert i.issuer == local_issuer.issuer and i.leeway == 0 and i.jwks_refresh_interval == 1
