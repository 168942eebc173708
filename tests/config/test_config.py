"""Rules loading: typed objects, and errors that name file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.cli import main as cli_main
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.egress.config import host_matches

ROOT = Path(__file__).resolve().parents[2]


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


def test_default_rules_load() -> None:
    rules = load_rules(ROOT / "rules")
    names = [u.name for u in rules.upstreams]
    assert names[:2] == ["openai", "anthropic"]
    assert rules.upstream_for("api.openai.com", 443).dialect == "openai"
    assert rules.upstream_for("evil.example.org", 443) is None


def test_upstream_fields(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """
upstreams:
  - name: local
    hosts: ["*.internal", "llm.example.com:8443"]
    dialect: openai
    forward_to: http://127.0.0.1:11434
    credential: {header: Authorization, prefix: "Bearer ", file: /run/secrets/x}
    allow_groups: [bots]
    restore: true
""")
    up = load_rules(tmp_path).upstreams[0]
    assert up.forward_to == ("http", "127.0.0.1", 11434)
    assert up.credential.header == "authorization" and up.credential.file == "/run/secrets/x"
    assert up.allow_groups == ("bots",) and up.restore is True and up.mask is True
    assert up.matches("a.internal", 443) and not up.matches("internal", 443)
    assert up.matches("llm.example.com", 8443) and not up.matches("llm.example.com", 443)


@pytest.mark.parametrize("pattern,host,port,ok", [
    ("api.openai.com", "api.openai.com", 443, True),
    ("api.openai.com", "api.openai.com.evil.org", 443, False),
    ("api.openai.com", "xapi.openai.com", 443, False),
    ("*.example.com", "a.b.example.com", 443, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "evilexample.com", 443, False),
    ("127.0.0.1:9000", "127.0.0.1", 9000, True),
    ("127.0.0.1:9000", "127.0.0.1", 9001, False),
    ("[::1]:9000", "::1", 9000, True),
])
def test_host_matching(pattern: str, host: str, port: int, ok: bool) -> None:
    assert host_matches(pattern, host, port) is ok


@pytest.mark.parametrize("text,key,reason", [
    ("upstreams:\n  - {name: a, hosts: [x.com], dialect: soap}\n",
     "upstreams[0].dialect", "must be one of"),
    ("upstreams:\n  - {name: a}\n", "upstreams[0].hosts", "required"),
    ("upstreams:\n  - {name: a, hosts: [x.com], colour: red}\n", "upstreams[0].colour",
     "unknown key"),
    ("upstreams:\n  - {name: a, hosts: ['http://x.com']}\n", "upstreams[0].hosts[0]",
     "not a host name"),
    ("upstreams:\n  - {name: a, hosts: [x.com], credential: {header: Authorization}}\n",
     "upstreams[0].credential", "exactly one of 'env'"),
    ("upstreams:\n  - {name: a, hosts: [x.com], credential: {header: X, env: A, file: /f}}\n",
     "upstreams[0].credential", "exactly one of 'env'"),
    ("upstreams:\n  - {name: a, hosts: [x.com], forward_to: 'ftp://h'}\n",
     "upstreams[0].forward_to", "scheme://host"),
    ("upstreams:\n  - {name: a, hosts: [x.com]}\n  - {name: a, hosts: [y.com]}\n",
     "upstreams[1].name", "already defined"),
    ("upstream:\n  - {name: a, hosts: [x.com]}\n", "upstream", "unknown section"),
    ("upstreams: {name: a}\n", "upstreams", "expected a list"),
    ("upstreams:\n  - name: a\n   hosts: [x]\n", "<yaml>", "line"),
    ("- just a list\n", "<top>", "mapping of sections"),
])
def test_errors_name_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    f = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as ei:
        load_rules(tmp_path)
    assert ei.value.file == str(f)
    assert ei.value.key == key
    assert reason in ei.value.reason
    assert str(f) in str(ei.value) and key in str(ei.value)


def test_mapping_key_twice_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "identity:\n  required: false\n")
    b = write(tmp_path, "b.yaml", "identity:\n  required: true\n")
    with pytest.raises(ConfigError) as ei:
        load_rules(tmp_path)
    assert ei.value.file == str(b) and ei.value.key == "identity.required"
    assert "a.yaml" in ei.value.reason


def test_lists_concatenate_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "upstreams:\n  - {name: a, hosts: [a.com]}\n")
    write(tmp_path, "b.yml", "upstreams:\n  - {name: b, hosts: [b.com]}\n")
    write(tmp_path, "notes.txt", "not rules")
    assert [u.name for u in load_rules(tmp_path).upstreams] == ["a", "b"]


def test_secret_ref_resolves_env_and_file(tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "s"
    secret.write_text("file-secret\n")
    write(tmp_path, "a.yaml", f"""
upstreams:
  - {{name: e, hosts: [e.com], credential: {{header: X-Key, env: AG_TEST_KEY}}}}
  - {{name: f, hosts: [f.com], credential: {{header: X-Key, prefix: "Bearer ", file: {secret}}}}}
""")
    rules = load_rules(tmp_path)
    monkeypatch.delenv("AG_TEST_KEY", raising=False)
    assert rules.upstreams[0].credential.resolve() is None
    monkeypatch.setenv("AG_TEST_KEY", "env-secret")
    assert rules.upstreams[0].credential.resolve() == "env-secret"
    assert rules.upstreams[1].credential.resolve() == "Bearer file-secret"
    # describe() names where the secret lives, never the value
    assert "env-secret" not in rules.upstreams[0].credential.describe()


def test_rules_check_cli(tmp_path: Path, capsys) -> None:
    assert cli_main(["rules", "check", str(ROOT / "rules")]) == 0
    assert "upstream openai" in capsys.readouterr().out
    bad = write(tmp_path, "bad.yaml", "upstreams:\n  - {name: a, hosts: [x.com], dialect: soap}\n")
    assert cli_main(["rules", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "upstreams[0].dialect" in err and "must be one of" in err
    assert cli_main(["rules", "check", str(tmp_path / "missing")]) == 1
