"""`state:` in the rules (the same shared store as $AGENTGATE_STATE): the URL form, the
mapping forms, errors naming file and key without echoing a password, a real gateway whose
holds land in Postgres from the rules alone, and a configured-but-unusable state that stops
the gateway instead of silently keeping holds in memory."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from pathlib import Path

import openai
import psycopg
import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.devkit.launch import free_port
from tests.conftest import BIN, ROOT
from tests.database.pgkit import ScramServer


def rules(tmp_path: Path, text: str) -> Path:
    d = tmp_path / f"r{time.monotonic_ns()}"
    d.mkdir()
    (d / "10.yaml").write_text("identity:\n  required: false\n" + text)
    return d


def test_state_forms_and_errors(tmp_path: Path) -> None:
    r = load_rules(rules(tmp_path, "state: postgresql://gw@db.internal:5432/agentgate\n"))
    assert r.state.url == "postgresql://gw@db.internal:5432/agentgate"
    r = load_rules(rules(tmp_path, "state: {url_env: GW_STATE}\n"))
    assert r.state.url_env == "GW_STATE" and r.state.url == ""
    assert load_rules(rules(tmp_path, "")).state is None
    for text, key in (("state: {url: 'postgresql://u:s3cr3t@h/db?nope=1'}\n", "state.url"),
                      ("state: {url: postgresql://h/db, url_env: X}\n", "state"),
                      ("state: {url_env: 'not a name'}\n", "state.url_env"),
                      ("state: {dsn: postgresql://h/db}\n", "state"),
                      ("state: 'nothing like a dsn'\n", "state.url")):
        with pytest.raises(ConfigError) as e:
            load_rules(rules(tmp_path, text))
        assert e.value.key.startswith(key) and "10.yaml" in e.value.file, (text, e.value)
        assert "s3cr3t" not in str(e.value)


@pytest.mark.integration
def test_state_from_the_rules_holds_in_postgres(gateway_factory, standin) -> None:
    pg = ScramServer().start()
    try:
        gw = gateway_factory("{standin_upstreams}identity:\n  required: false\n"
                             "policies:\n  - name: bulk\n    match: {model: [bulk-one]}\n"
                             "    action: approve\n    approvers: [reviewers]\n"
                             f"state: {{url: '{pg.admin_dsn('postgres')}'}}\n")
        deadline = time.monotonic() + 15
        while "shared approval store" not in gw.logs():  # connected (until then: 503)
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.05)
        assert "ready (replica" in gw.logs()
        client = openai.OpenAI(api_key="unused", max_retries=0, timeout=30,
                               http_client=openai.DefaultHttpxClient(
                                   proxy=gw.proxy_url(), verify=str(gw.ca_cert)))
        fut = concurrent.futures.ThreadPoolExecutor(1).submit(
            client.chat.completions.create, model="bulk-one",
            messages=[{"role": "user", "content": "x"}])
        deadline = time.monotonic() + 15
        rows: list = []
        while not rows:
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.1)
            with psycopg.connect(pg.admin_dsn("postgres")) as c:
                try:
                    rows = c.execute("SELECT id FROM agentgate_approvals WHERE state = "
                                     "'pending'").fetchall()
                except psycopg.errors.UndefinedTable:
                    rows = []
        # decided straight in the table by another replica's store: released here
        import asyncio

        from addons.approval.pgstore import PgApprovalStore

        async def decide() -> None:
            other = PgApprovalStore(pg.admin_dsn("postgres"), replica="other")
            await other.start()
            while not other.ready:
                await asyncio.sleep(0.05)
            await other.adeny(rows[0][0], "rev", ["reviewers"], "from elsewhere")
            await other.aclose()

        asyncio.run(decide())
        with pytest.raises(openai.PermissionDeniedError) as e:
            fut.result(10)
        assert "from elsewhere" in str(e.value)
        assert pg.admin_dsn("postgres").split("password=")[1].split()[0] not in gw.logs()
        gw.stop()
    finally:
        pg.stop()


def test_state_configured_but_unusable_stops_the_gateway(tmp_path: Path,
                                                         gateway_confdir: Path) -> None:
    d = rules(tmp_path, "state: {url_env: AGENTGATE_TEST_UNSET_STATE}\n")
    p = subprocess.run([str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "gateway.py"),
                        "--listen-port", str(free_port()), "--set", f"confdir={gateway_confdir}",
                        "--set", f"agentgate_rules={d}", "--set", f"agentgate_data={tmp_path}",
                        "--set", f"agentgate_approvals_listen=127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "AGENTGATE_TEST_UNSET_STATE" in p.stdout + p.stderr


