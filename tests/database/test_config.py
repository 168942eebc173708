"""The databases: rules section: every error names file, key path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.database.config import table_matches

GOOD = """
databases:
  - name: warehouse
    listen: 127.0.0.1:15432
    upstream: 127.0.0.1:5432
    database: analytics
    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}
    server_tls: {mode: disable}
    sql:
      - {name: no-ddl, action: block, match: {kinds: [DDL]}}
      - {name: review, action: approve, approvers: [dba], timeout: 60,
         match: {kinds: [INSERT], tables: [orders]}}
    mask_columns:
      - {column: "*.users.email", strategy: redact}
"""


def load(tmp_path: Path, text: str):
    (tmp_path / "r.yaml").write_text(text)
    return load_rules(tmp_path)


def test_good(tmp_path: Path) -> None:
    db = load(tmp_path, GOOD).databases[0]
    assert (db.listen_host, db.listen_port, db.upstream) == ("127.0.0.1", 15432,
                                                             "127.0.0.1:5432")
    assert db.sql[1].approval is not None and db.sql[1].approval.groups == ("dba",)
    assert db.client_tls_required is False  # loopback listener
    assert db.mask_columns == (("*.users.email", "redact"),)


@pytest.mark.parametrize(("change", "key", "reason"), [
    (("listen: 127.0.0.1:15432", "listen: nowhere"), "databases[0].listen", "host:port"),
    (("upstream: 127.0.0.1:5432", "upstream: db.internal:5432"),
     "databases[0].server_tls.mode", "loopback"),
    (("password_env: WAREHOUSE_PASSWORD", "password_env: A, password_file: /x"),
     "databases[0].credential", "exactly one"),
    (("kinds: [DDL]", "kinds: [DROP]"), "databases[0].sql[0].match.kinds", "unknown kind"),
    (("action: block", "action: deny"), "databases[0].sql[0].action", "must be one of"),
    (("approvers: [dba], ", ""), "databases[0].sql[1].approvers", "approver"),
    (("strategy: redact", "strategy: rot13"), "databases[0].mask_columns[0].strategy",
     "must be one of"),
    (("    database: analytics\n", "    database: analytics\n    port: 1\n"),
     "databases[0].port", "unknown key"),
    (("listen: 127.0.0.1:15432", "listen: 0.0.0.0:15432\n    client_tls: {required: false}"),
     "databases[0].client_tls.required", "TLS"),
])
def test_errors_name_key_and_reason(tmp_path: Path, change: tuple[str, str], key: str,
                                    reason: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert e.value.key == key and reason in e.value.reason, e.value
    assert e.value.file.endswith("r.yaml")


def test_duplicate_name_and_listen(tmp_path: Path) -> None:
    entry = GOOD.split("databases:\n", 1)[1]
    with pytest.raises(ConfigError, match="already used"):
        load(tmp_path, GOOD + entry)


def test_table_patterns() -> None:
    assert table_matches("users", "users") and table_matches("users", "crm.users")
    assert table_matches("public.users", "users")
    assert not table_matches("crm.users", "users")
    assert table_matches("crm.*", "crm.users") and not table_matches("crm.*", "hr.users")
    assert table_matches("*.users", "db.crm.users")


def test_rules_check_lists_databases_and_mcp(tmp_path: Path) -> None:
    """`agentgate rules check` (the real CLI) shows each database (name, listen, upstream,
    database, rules count, where its password comes from, never the password) and the mcp
    section's summary next to the upstreams."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "r.yaml").write_text(GOOD + "mcp:\n  unknown_methods: allow\n")
    env = {k: v for k, v in os.environ.items() if k != "WAREHOUSE_PASSWORD"}
    env["PYTHONPATH"] = str(root)

    def run(extra: dict[str, str]) -> str:
        p = subprocess.run([sys.executable, "-m", "addons.cli", "rules", "check", str(tmp_path)],
                           capture_output=True, text=True, timeout=60, cwd=root,
                           env={**env, **extra})
        assert p.returncode == 0, p.stderr
        return p.stdout
    out = run({})
    line = next(x for x in out.splitlines() if x.strip().startswith("database warehouse:"))
    for part in ("listen 127.0.0.1:15432", "-> 127.0.0.1:5432", "database analytics",
                 "user agent_rw", "env WAREHOUSE_PASSWORD", "2 sql rules", "1 column rules",
                 "[password not set in this environment]"):
        assert part in line, (part, line)
    assert "mcp: unknown methods allow" in out
    out = run({"WAREHOUSE_PASSWORD": "s3cret-db-pass"})
    assert "s3cret-db-pass" not in out and "not set in this environment" not in out
