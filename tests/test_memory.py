"""Memory through a real mitmdump: what a default gateway never loads, and a configured
feature whose (lazy) import fails refuses at start instead of at its first use.

A library the default configuration does not use costs RSS in every gateway (psycopg
~9 MiB); it is imported where the feature is configured. "Lazy" must not mean "fails open
later": with AGENTGATE_STATE set and psycopg unimportable, mitmdump must refuse to start
and say why.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BIN, Gateway

pytestmark = pytest.mark.integration

# A second script after the gateway's: after every response it writes the interpreter's
# module list, so anything the suite imports at configure, running or the first flow shows.
PROBE = '''\
import json, os, sys

class Probe:
    def _dump(self):
        with open(os.environ["AGENTGATE_TEST_MODULES"], "w") as f:
            json.dump(sorted(sys.modules), f)

    def running(self):
        self._dump()

    def response(self, flow):
        self._dump()

addons = [Probe()]
'''

# Top-level packages a default configuration (no AGENTGATE_STATE / state:, no databases:,
# no mcp upstream) must not load in the gateway process (DuckDB lives in the audit writer
# process, addons/recording/remote.py).
NOT_BY_DEFAULT = ("psycopg", "psycopg_binary", "psycopg_c", "mcp", "duckdb", "_duckdb",
                  "pgparse")


def _chat(gw: Gateway) -> int:
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": gw.proxy_url()}),
        urllib.request.HTTPSHandler(context=ctx))
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    req = urllib.request.Request("https://api.openai.com/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with opener.open(req, timeout=30) as r:
        return r.status


def test_default_gateway_does_not_load_unused_libraries(gateway_factory, no_identity,
                                                        tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    modules = tmp_path / "modules.json"
    gw = gateway_factory("{standin_upstreams}" + no_identity,
                         env={"AGENTGATE_TEST_MODULES": str(modules)},
                         extra_args=("-s", str(probe)))
    assert _chat(gw) == 200
    loaded = {m.split(".")[0] for m in json.loads(modules.read_text())}
    assert "addons" in loaded  # the probe saw the suite's interpreter
    assert not loaded & set(NOT_BY_DEFAULT), sorted(loaded & set(NOT_BY_DEFAULT))


def test_shared_state_without_psycopg_refuses_to_start(gateway_factory, no_identity,
                                                       tmp_path: Path) -> None:
    # psycopg that cannot be imported (a broken install), first on the path
    shadow = tmp_path / "shadow" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('psycopg is broken here')\n")
    dsn = "postgresql://agentgate:hunter2-not-logged@127.0.0.1:1/state"
    gw = gateway_factory("{standin_upstreams}" + no_identity, wait=False,
                         env={"AGENTGATE_STATE": dsn,
                              "PYTHONPATH": str(shadow.parent)})
    try:
        rc = gw.proc.wait(30)
    except subprocess.TimeoutExpired:
        gw.proc.kill()  # not started, not stopped by SIGTERM: it must not run on
        gw.proc.wait(10)
        pytest.fail("mitmdump neither served nor exited within 30 s with an unusable "
                    "AGENTGATE_STATE")
    logs = gw.logs()[:20000]
    assert rc != 0, logs
    assert "AGENTGATE_STATE" in logs and "psycopg" in logs, logs
    assert "hunter2" not in gw.logs()


DATABASES = """\
identity:
  required: false
databases:
  - name: warehouse
    listen: 127.0.0.1:15432
    upstream: 127.0.0.1:5432
    database: analytics
    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}
    server_tls: {mode: disable}
"""


def test_databases_without_the_sql_parser_are_refused_naming_file_and_key(
        tmp_path: Path) -> None:
    # pgparse that cannot be imported, first on the path; the real `agentgate rules check`
    # (run_proxy.sh runs it before starting; the gateway loads rules the same way)
    shadow = tmp_path / "shadow" / "pgparse"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pgparse is broken here')\n")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "db.yaml").write_text(DATABASES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(shadow.parent)
    p = subprocess.run([str(BIN / "agentgate"), "rules", "check", str(rules)], env=env,
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "db.yaml" in out and "databases[0]" in out and "pgparse" in out, out


def test_invalid_state_url_exits_at_start_with_one_clear_error(gateway_factory, no_identity
                                                               ) -> None:
    # not a URL at all: refused once at start (mitmdump exits), never the rollback loop that
    # re-raised it on every options update (RecursionError, GBs of log, SIGTERM ignored)
    gw = gateway_factory("{standin_upstreams}" + no_identity, wait=False,
                         env={"AGENTGATE_STATE": "not a dsn"})
    try:
        rc = gw.proc.wait(30)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait(10)
        pytest.fail("mitmdump neither exited nor stopped within 30 s with a bad AGENTGATE_STATE")
    logs = gw.logs()
    assert rc != 0, logs[:5000]
    assert "AGENTGATE_STATE" in logs, logs[:5000]
    assert "RecursionError" not in logs and logs.count("AGENTGATE_STATE") < 5, logs[:5000]
