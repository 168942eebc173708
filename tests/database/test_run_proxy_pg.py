"""`./run_proxy.sh` (the real script, the project's venv) with a rules directory holding
`databases:` starts the Postgres listener beside the HTTP proxy: psql logs in through it
with a token and reads masked rows from a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.database.pgkit import DB_PASSWORD, ScramServer, free_port, pg_bin, wait_port


def test_run_proxy_starts_the_database_listener(tmp_path: Path, local_issuer) -> None:
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps").exists():
        pytest.skip("needs the venv made by ./run_proxy.sh")
    server = ScramServer().start()
    proc = None
    try:
        pg_port, http_port, api_port = free_port(), free_port(), free_port()
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(
            "upstreams: []\n" + local_issuer.identity_yaml() +
            f"databases:\n  - name: warehouse\n    listen: 127.0.0.1:{pg_port}\n"
            f"    upstream: 127.0.0.1:{server.port}\n    database: analytics\n"
            "    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}\n"
            "    server_tls: {mode: disable}\n")
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
               "AGENTGATE_VENV": str(venv), "AGENTGATE_LISTEN": f"127.0.0.1:{http_port}",
               "AGENTGATE_RULES": str(rules), "AGENTGATE_DATA": str(tmp_path / "data"),
               "WAREHOUSE_PASSWORD": DB_PASSWORD}
        log = (tmp_path / "gateway.log").open("wb")
        proc = subprocess.Popen(
            ["/bin/bash", str(ROOT / "run_proxy.sh"), "--set",
             f"agentgate_approvals_listen=127.0.0.1:{api_port}"],
            env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            wait_port(pg_port)
        except Exception:
            pytest.fail("no database listener: " + (tmp_path / "gateway.log").read_text()[-3000:])
        penv = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        penv["PGPASSWORD"] = local_issuer.token(sub="agent-7", groups=["agents"])
        p = subprocess.run([pg_bin("psql") or "/usr/bin/psql",
                            f"host=127.0.0.1 port={pg_port} dbname=analytics user=agent",
                            "-X", "-At", "-c", "SELECT email FROM users WHERE id = 1"],
                           capture_output=True, text=True, env=penv, timeout=60)
        assert p.returncode == 0, p.stderr + (tmp_path / "gateway.log").read_text()[-3000:]
        assert p.stdout.strip() == "[EMAIL_1]"
        out = (tmp_path / "gateway.log").read_text()
        assert "database warehouse: listen 127.0.0.1:" in out  # rules check at start
        assert DB_PASSWORD not in out
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        server.stop()
