"""A new user's rules file with a key written twice in one mapping: YAML keeps the last
and drops the first without a word, so a second `policies:` further down a file silently
discarded every rule above it (the gateway started, `rules check` said OK). Refused now,
naming the file, the key path and both lines — by `agentgate rules check` (which
`./run_proxy.sh` runs before starting) and by a running gateway's reload (the previous
rules stay in force). Aliases are looked at once (a self-referencing one, a fan-out)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from addons.devkit.launch import BIN
from tests.conftest import Gateway

UPSTREAMS = """upstreams:
  - name: openai
    hosts: [api.openai.com]
    dialect: openai
    credential:
      header: Authorization
      prefix: "Bearer "
      env: OPENAI_API_KEY
"""
TWO_POLICIES = """policies:
  - name: no-secret
    match: {prompt: {words: [project bluebird]}}
    action: block
# ... more rules, written later
policies:
  - name: watch
    match: {prompt: {words: [zzz]}}
    action: observe
"""


def check(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "agentgate"), "rules", "check", str(d)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name,text,key,lines", [
    ("policies twice", UPSTREAMS + TWO_POLICIES, "policies", (14, 9)),
    ("a nested key twice", UPSTREAMS.replace('      prefix: "Bearer "\n',
                                             '      prefix: "Bearer "\n      prefix: x\n'),
     "upstreams[0].credential.prefix", (8, 7)),
    ("a flow mapping", UPSTREAMS + "identity: {required: true, required: false}\n",
     "identity.required", (9, 9)),
])
def test_rules_check_refuses_a_key_given_twice(tmp_path: Path, name, text, key,
                                                lines) -> None:
    (tmp_path / "rules.yaml").write_text(text)
    r = check(tmp_path)
    assert r.returncode == 1, (name, r.stdout, r.stderr)
    err = r.stdout + r.stderr
    assert f"{tmp_path / 'rules.yaml'}: {key}: line {lines[0]}" in err, err
    assert f"already given on line {lines[1]}" in err, err


def test_merge_keys_and_equal_keys_in_separate_mappings_are_fine(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS + """\
  - name: anthropic
    hosts: [api.anthropic.com]
    dialect: anthropic
    credential: &cred
      header: x-api-key
      env: ANTHROPIC_API_KEY
  - name: other
    hosts: [api.example.com]
    credential:
      <<: *cred
      env: OTHER_KEY
""")
    r = check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("text", [
    "mcp: &x\n  a: [*x]\n",
    "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    .join(["a0: &a0 [x, x, x, x, x, x, x, x, x]\n", "mcp: {x: *a9}\n"]),
], ids=["self reference", "fan-out"])
def test_aliases_are_walked_once(tmp_path: Path, text: str) -> None:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS + text)
    t0 = time.monotonic()
    r = check(tmp_path)
    assert r.returncode == 1 and "invalid rules" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.integration
def test_a_reload_with_a_key_twice_keeps_the_rules_in_force(gateway_factory, no_identity,
                                                            standin) -> None:
    reload_is_refused(gateway_factory, no_identity, TWO_POLICIES,
                      "policy.yaml: policies: line 6: the key is already given on line 1")


def reload_is_refused(gateway_factory, no_identity: str, text: str, logged: str) -> None:
    """A gateway blocking 'project bluebird' (one policy file) reloads `text` as that
    file: refused with `logged` in its log, and the block still in force."""
    gw: Gateway = gateway_factory({"rules.yaml": "{standin_upstreams}" + no_identity,
                                   "policy.yaml": TWO_POLICIES.split("# ...")[0]})
    url = "https://api.openai.com/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                  "content": "about project bluebird"}]}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        assert c.post(url, json=body).status_code == 403
        (gw.rules_dir / "policy.yaml").write_text(text)
        deadline = time.monotonic() + 30
        while "rules change rejected" not in gw.logs():
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.1)
        assert logged in gw.logs()
        assert c.post(url, json=body).status_code == 403  # the block rule is still there
