"""`./run_proxy.sh replicas 2`: the one command, as a user runs it — a throwaway postgres,
two gateways, HAProxy on AGENTGATE_LISTEN; a conversation whose turns land on both replicas
gets its masked value restored on every turn (the command generated the shared secret: 0600,
never printed), and the audit command it prints verifies both replicas' chains in the lake it
set up; Ctrl-C / SIGTERM stops everything (no process, no temp database left behind)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from addons.devkit.launch import free_port
from tests.conftest import ROOT
from tests.recording.test_restore_record_e2e import rules as restore_rules

pytestmark = pytest.mark.integration


def _postmaster_port(state_dir: Path) -> str | None:
    try:  # postmaster.pid: pid, data directory, start time, port, …
        return (state_dir / "data" / "postmaster.pid").read_text().splitlines()[3].strip()
    except (OSError, IndexError):
        return None


def test_run_proxy_replicas(tmp_path: Path, standin) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(restore_rules(standin))  # emails masked, restored
    port = free_port()
    before = set(glob.glob("/tmp/agentgate-state-*"))
    env = {**os.environ, "AGENTGATE_LISTEN": f"127.0.0.1:{port}",
           "AGENTGATE_RULES": str(rules), "AGENTGATE_DATA": str(tmp_path / "data"),
           "OPENAI_API_KEY": "sk-test-not-real-0000000000000000000000"}
    for k in ("AGENTGATE_STATE", "AGENTGATE_SECRET", "AGENTGATE_SECRET_FILE"):
        env.pop(k, None)
    log = open(tmp_path / "out.log", "wb")  # noqa: SIM115 - closed below
    p = subprocess.Popen([str(ROOT / "run_proxy.sh"), "replicas", "2", "--", "--set",
                          f"ssl_verify_upstream_trusted_ca={standin.ca_path}"], env=env,
                         stdout=log,
                         stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in (tmp_path / "out.log").read_text():
            assert p.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "out.log").read_text()
            time.sleep(0.2)
        out = (tmp_path / "out.log").read_text()
        assert "2 replicas behind HAProxy" in out and "throwaway postgres" in out
        probes = re.findall(r"probes (http://\S+/readyz)", out)
        assert len(probes) == 2
        deadline = time.monotonic() + 30
        while not all(httpx.get(u, timeout=2).status_code == 200 for u in probes):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.2)  # HAProxy's health checks see both
        ca = ROOT / "certs" / "mitmproxy-ca-cert.pem"
        email = "run.replicas@example.com"

        def turn(text: str) -> str:
            # a new client per turn: a new connection, so HAProxy picks the next replica
            with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=str(ca),
                              headers={"X-Agent-Session": "run-replicas"}) as c:
                r = c.post("https://api.openai.com/v1/chat/completions", timeout=60,
                           json={"model": "gpt-4o-mini",
                                 "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        standin.clear()
        assert turn(f"mail {email}") == f"echo: mail {email}"
        for i in range(4):  # [EMAIL_1] comes back as the address on either replica
            assert turn(f"[EMAIL_1] turn {i}") == f"echo: {email} turn {i}"
        sent = [json.loads(r["body"])["messages"][0]["content"] for r in standin.requests]
        assert sent[0] == "mail [EMAIL_1]" and all(email not in x for x in sent), sent
        logs = [Path(x).read_text(errors="replace") for x in re.findall(r", log (\S+)", out)]
        assert len(logs) == 2
        assert all(lg.count("/v1/chat/completions") > 0 for lg in logs)  # both replicas served
        secret_file = tmp_path / "data" / "replicas-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        # the audit command the startup lines print: both replicas' chains, verified
        cmd = re.search(r"^\s*(AGENTGATE_RULES=\S+ \./run_proxy\.sh cli audit verify --lake)$",
                        out, re.M)
        assert cmd, out
        rules_env, *argv = shlex.split(cmd.group(1))
        # this run's throwaway state database: the new one serving the catalog's port (a
        # parallel test may start and stop its own agentgate-state-* meanwhile)
        lake_text = "".join(f.read_text() for f in Path(rules_env.split("=", 1)[1]).iterdir()
                            if f.is_file())
        pg_port = re.findall(r"postgresql://agentgate:[^@\s]*@127\.0\.0\.1:(\d+)/", lake_text)
        assert pg_port, lake_text[:2000]
        ours = [d for d in set(glob.glob("/tmp/agentgate-state-*")) - before
                if _postmaster_port(Path(d)) == pg_port[0]]
        assert len(ours) == 1, ours
        venv = {**env, rules_env.split("=", 1)[0]: rules_env.split("=", 1)[1]}
        deadline = time.monotonic() + 60
        while True:  # the shippers run every second
            v = subprocess.run(argv, cwd=str(ROOT), env=venv, capture_output=True, text=True,
                               timeout=120)
            if v.returncode == 0 and "OK: replica gw1:" in v.stdout \
                    and "OK: replica gw2:" in v.stdout:
                break
            assert time.monotonic() < deadline, v.stdout + v.stderr
            time.sleep(1)
        for text in [out, v.stdout, v.stderr, *logs]:
            assert secret not in text
            assert "postgresql://agentgate:" not in text  # the throwaway DSN's password
        p.send_signal(signal.SIGTERM)
        assert p.wait(90) == 0
        assert "stopping (replicas drain)" in (tmp_path / "out.log").read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        log.close()
    assert not Path(ours[0]).exists()  # the temp database is gone
    assert not (tmp_path / "data" / "lake").exists()  # its catalog went with that database
    assert not Path(rules_env.split("=", 1)[1]).exists()  # the rules with the DSN, removed
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(port) not in ps  # HAProxy (bound to the port) is gone


def test_lake_rules_overlay_follows_the_users_rules(tmp_path: Path) -> None:
    """The rules the replicas load when the command adds the lake: the user's files as links
    (edits, new and removed files follow), plus a 0600 `audit_lake:` the real loader reads;
    a user's own `audit_lake:` is used as it is."""
    from addons.config.loader import load_rules
    from addons.devkit.replicas import LAKE_RULES_FILE, lake_rules, sync_overlay
    user = tmp_path / "rules"
    user.mkdir()
    (user / "a.yaml").write_text("identity:\n  required: false\n")
    (user / "notes.txt").write_text("not rules")
    work = tmp_path / "work"
    work.mkdir()
    dsn = "postgresql://agentgate:pw-in-file-only@127.0.0.1:5/postgres?connect_timeout=3"
    out = lake_rules(user, dsn, tmp_path / "data" / "lake", work)
    assert out == work / "rules" and (tmp_path / "data" / "lake").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["a.yaml", LAKE_RULES_FILE]
    assert stat.S_IMODE((out / LAKE_RULES_FILE).stat().st_mode) == 0o600
    lake = load_rules(out).audit_lake
    assert lake is not None and lake.catalog == dsn
    assert lake.data == str((tmp_path / "data" / "lake").resolve())
    assert load_rules(out).identity.required is False  # the user's file, through its link
    (user / "a.yaml").write_text("identity:\n  required: true\n  issuers: []\n")
    (user / "b.yaml").write_text("masking:\n  enabled: true\n")
    sync_overlay(user, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.yaml", "b.yaml", LAKE_RULES_FILE]
    assert (out / "a.yaml").read_text() == (user / "a.yaml").read_text()  # edits show
    (user / "b.yaml").unlink()
    sync_overlay(user, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.yaml", LAKE_RULES_FILE]
    # the user's own lake wins: their directory is loaded as it is
    (user / "lake.yaml").write_text(f"audit_lake:\n  catalog: {tmp_path / 'x.ducklake'}\n")
    work2 = tmp_path / "work2"
    work2.mkdir()
    assert lake_rules(user, dsn, tmp_path / "data" / "lake", work2) == user
    assert not (work2 / "rules").exists()
