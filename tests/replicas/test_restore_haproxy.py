"""Issue 17 through the replicas example (addons/devkit/replicas.py: Debian's postgres, two
mitmdump gateways, HAProxy in front): one conversation whose turns HAProxy spreads over both
replicas keeps its placeholders restored on every turn, and the audit of both replicas lands
in one DuckLake (catalog in the same postgres, Parquet in a temp directory), where
`agentgate audit verify --lake` verifies both chains and `audit sessions --lake` sees the
whole conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from addons.devkit.replicas import LocalPostgres, start_cluster
from tests.conftest import GATEWAY_ENV
from tests.recording.test_restore_record_e2e import rules

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EMAIL = "haproxy.turns@example.com"
SECRET = "replicas-share-this-secret-0123456789"


def test_conversation_over_haproxy_restored_and_audited_in_one_lake(
        tmp_path: Path, gateway_confdir: Path, standin) -> None:
    pg = LocalPostgres().start()
    cluster = None
    try:
        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(
            rules(standin) + f"audit_lake:\n  catalog: {pg.dsn}\n  data: {tmp_path / 'pq'}\n"
            "  interval_s: 0.2\n")
        cluster = start_cluster(2, rules_dir, gateway_confdir, tmp_path / "data", dsn=pg.dsn,
                                standin_ca=standin.ca_path,
                                gateway_env={**GATEWAY_ENV, "AGENTGATE_SECRET": SECRET})
        ca = cluster.replicas[0].gateway.ca_cert
        standin.clear()

        def turn(text: str) -> str:
            # a new client per turn: a new connection, so HAProxy picks a replica
            c = openai.OpenAI(api_key="x", max_retries=0, timeout=60,
                              default_headers={"X-Agent-Session": "conv-ha"},
                              http_client=openai.DefaultHttpxClient(
                                  proxy=f"http://127.0.0.1:{cluster.port}", verify=str(ca)))
            return c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            ).choices[0].message.content

        assert turn(f"mail {EMAIL}") == f"echo: mail {EMAIL}"
        for i in range(5):
            assert turn(f"[EMAIL_1] turn {i}") == f"echo: {EMAIL} turn {i}"
        sent = [json.loads(r["body"])["messages"][0]["content"] for r in standin.requests]
        assert sent[0] == "mail [EMAIL_1]" and all(EMAIL not in s for s in sent)
        served = {r.name: r.gateway.logs().count("/v1/chat/completions")
                  for r in cluster.replicas}
        assert all(n > 0 for n in served.values()), served  # the turns used both replicas
    finally:
        if cluster is not None:
            cluster.stop()  # also removes its work directory (logs, haproxy.cfg)
    try:
        env = {**os.environ, "AGENTGATE_RULES": "/nonexistent"}
        v = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "verify", "--lake",
                            pg.dsn], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=env)
        assert v.returncode == 0, v.stdout + v.stderr
        assert "OK: replica gw1:" in v.stdout and "OK: replica gw2:" in v.stdout
        s = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "sessions", "--lake",
                            pg.dsn, "--format", "json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env)
        assert s.returncode == 0, s.stderr
        by = {r["session_id"]: r for r in map(json.loads, s.stdout.splitlines())}
        assert by["conv-ha"]["llm_calls"] == 6
        assert pg.password not in v.stdout + v.stderr + s.stdout + s.stderr
    finally:
        pg.stop()
