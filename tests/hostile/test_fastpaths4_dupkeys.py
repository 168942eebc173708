"""Hostile: a key given twice inside what a YAML merge key (`<<`) merges. YAML keeps the
last of the two and drops the first without a word, exactly as for a key twice in a plain
mapping, but the duplicate-key check skipped every `<<` value: `<<: {hosts: [a], hosts:
[b]}` (or a list of such mappings, or an anchored one) passed `rules check` and a reload,
and one of the two values silently vanished. Refused now, by `agentgate rules check` and
by a running gateway's reload (the previous rules stay in force), naming the file, the
key path under `<<` and both lines. A merge that overrides a merged key with an explicit
one (YAML's own way to override) is still fine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.test_newuser_rules import UPSTREAMS, check, reload_is_refused

CASES = {
    "inline mapping": (UPSTREAMS + "  - name: other\n    hosts: [api.example.com]\n"
                       "    <<: {dialect: openai, dialect: anthropic}\n",
                       "upstreams[1].<<.dialect", (11, 11)),
    "list of mappings": (UPSTREAMS + "  - name: other\n    <<:\n"
                         "      - {dialect: openai}\n"
                         "      - hosts: [api.example.com]\n"
                         "        hosts: [evil.example]\n",
                         "upstreams[1].<<[1].hosts", (13, 12)),
    "anchored in place": (UPSTREAMS + "  - name: other\n    hosts: [api.example.com]\n"
                          "    <<: &cred\n      credential:\n        header: x-api-key\n"
                          "        env: A_KEY\n        env: B_KEY\n",
                          "upstreams[1].<<.credential.env", (15, 14)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rules_check_refuses_a_key_twice_inside_a_merge(tmp_path: Path, name: str) -> None:
    text, key, lines = CASES[name]
    (tmp_path / "rules.yaml").write_text(text)
    r = check(tmp_path)
    err = r.stdout + r.stderr
    assert r.returncode == 1, (name, err)
    assert f"{tmp_path / 'rules.yaml'}: {key}: line {lines[0]}" in err, err
    assert f"already given on line {lines[1]}" in err, err
    assert "Traceback" not in err


def test_an_explicit_key_over_a_merged_one_is_fine(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        UPSTREAMS + "  - name: other\n    hosts: [api.example.com]\n"
        "    <<: [{dialect: openai}, {dialect: anthropic}]\n    dialect: openai\n")
    r = check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


MERGED_TWICE = """policies:
  - name: no-secret
    <<: {match: {prompt: {words: [project bluebird]}}, match: {prompt: {words: [zzz]}}}
    action: block
"""


@pytest.mark.integration
def test_a_reload_with_a_key_twice_in_a_merge_keeps_the_rules_in_force(
        gateway_factory, no_identity, standin) -> None:
    # the merged mapping's second `match` would replace the first: bluebird allowed
    reload_is_refused(gateway_factory, no_identity, MERGED_TWICE,
                      "policy.yaml: policies[0].<<.match: line 3: the key is already given "
                      "on line 3")
