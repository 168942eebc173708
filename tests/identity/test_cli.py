"""`agentgate token verify`: the attack battery against the CLI, and its output contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from addons.cli import main
from tests.oidc_fixtures import attack_tokens

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trio(make_local_issuer):
    """issuer A (aud agentgate), trusted issuer B (aud other-service), untrusted bait."""
    return make_local_issuer(), make_local_issuer("other-service"), make_local_issuer()


def rules_dir(tmp_path: Path, a, b) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "identity.yaml").write_text(f"""
identity:
  issuers:
    - issuer: {a.issuer}
      audience: agentgate
    - issuer: {b.issuer}
      audience: other-service
""")
    return d


def test_valid_token_prints_identity(tmp_path, trio, capsys) -> None:
    a, b, _ = trio
    tok = a.token(sub="ci-bot", groups=["builders"])
    assert main(["token", "verify", "--rules", str(rules_dir(tmp_path, a, b)), tok]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sub"] == "ci-bot" and out["groups"] == ["builders"] and out["iss"] == a.issuer
    assert tok not in json.dumps(out)


def test_attack_battery_against_cli(tmp_path, trio, capsys) -> None:
    a, b, bait = trio
    d = rules_dir(tmp_path, a, b)
    battery = attack_tokens(a, b, "other-service", bait_url=bait.jwks_uri)
    accepted = []
    for name, tok in battery:
        if main(["token", "verify", "--rules", str(d), tok]) != 1:
            accepted.append(name)
        cap = capsys.readouterr()
        assert cap.out == "" and "token refused:" in cap.err
        assert tok not in cap.err or len(tok) < 20
    assert accepted == []
    assert bait.fetches == {"discovery": 0, "jwks": 0}  # jku/x5u never followed


@pytest.mark.integration
def test_stdin_and_real_entry_point(tmp_path, trio) -> None:
    a, b, _ = trio
    d = rules_dir(tmp_path, a, b)
    cmd = [sys.executable, "-m", "addons.cli", "token", "verify", "--rules", str(d), "-"]
    ok = subprocess.run(cmd, input=a.token(sub="piped") + "\n", capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sub"] == "piped"
    bad = subprocess.run(cmd, input=a.token(aud="elsewhere"), capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "wrong audience (expected agentgate)" in bad.stderr
    assert '"aud": "elsewhere"' in bad.stderr  # unverified facts help debugging


def test_no_issuer_and_bad_rules(tmp_path, capsys) -> None:
    d = tmp_path / "r"
    d.mkdir()
    assert main(["token", "verify", "--rules", str(d), "a.b.c"]) == 1
    assert "no token issuer is configured" in capsys.readouterr().err
    (d / "x.yaml").write_text("identity:\n  issuers: 3\n")
    assert main(["token", "verify", "--rules", str(d), "a.b.c"]) == 1
    assert "invalid rules" in capsys.readouterr().err


def test_unreachable_issuer_reason(tmp_path, make_local_issuer, capsys) -> None:
    a = make_local_issuer()
    d = rules_dir(tmp_path, a, make_local_issuer("other-service"))
    tok = a.token()
    a.stop()
    assert main(["token", "verify", "--rules", str(d), tok]) == 1
    assert "keys unavailable" in capsys.readouterr().err
