"""SQL policy: guards first (no rule can allow them), then the first fitting rule, then
sql_default."""

from __future__ import annotations

from pathlib import Path

from addons.config.loader import load_rules
from addons.database.policy import evaluate
from addons.database.sqlfacts import analyze

RULES = """
databases:
  - name: w
    listen: 127.0.0.1:15432
    upstream: 127.0.0.1:5432
    database: analytics
    credential: {user: u, password_env: P}
    server_tls: {mode: disable}
    sql_default: block
    sql:
      - {name: allow-everything-for-admins, action: allow, match: {groups: [admins]}}
      - {name: no-unbounded, action: block, match: {unbounded: true}}
      - {name: hr-only, action: block, match: {tables: ["hr.*"]}}
      - {name: no-crypto, action: block, match: {functions: ["pgp_*"]}}
      - {name: reviewed-writes, action: approve, approvers: [dba],
         match: {kinds: [INSERT, UPDATE, DELETE, MERGE]}}
      - {name: reads, action: observe, match: {kinds: [SELECT], subjects: [agent-1]}}
"""
AGENT = {"sub": "agent-1", "groups": ["agents"]}
ADMIN = {"sub": "root", "groups": ["admins"]}


def db(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(RULES)
    return load_rules(tmp_path).databases[0]


def test_order_and_defaults(tmp_path: Path) -> None:
    d = db(tmp_path)

    def v(sql: str, ident: dict = AGENT) -> tuple[str, str | None]:
        r = evaluate(d, analyze(sql), ident)
        return r.action, r.rule

    assert v("SELECT * FROM t") == ("observe", "reads")
    assert v("SELECT * FROM t", {"sub": "agent-2", "groups": []}) == ("block", None)
    assert v("DELETE FROM t") == ("block", "no-unbounded")
    assert v("DELETE FROM t", ADMIN) == ("allow", "allow-everything-for-admins")
    assert v("SELECT * FROM hr.salaries") == ("block", "hr-only")
    assert v("SELECT pgp_sym_decrypt(x, 'k') FROM t") == ("block", "no-crypto")
    assert v("INSERT INTO t VALUES (1)") == ("approve", "reviewed-writes")
    # a data-modifying CTE is a write, whatever the top-level SELECT says
    assert v("WITH x AS (UPDATE t SET a = 1 WHERE id = 2 RETURNING 1) SELECT * FROM x") \
        == ("approve", "reviewed-writes")
    assert evaluate(d, analyze("INSERT INTO t VALUES (1)"), AGENT).approval is not None


def test_guards_beat_every_rule(tmp_path: Path) -> None:
    d = db(tmp_path)
    for sql, guard in [("SELECT 1; SELECT 2", "guard:multi_statement"),
                       ("SELECT pg_read_file('/etc/passwd')", "guard:dangerous_function"),
                       ("COPY t TO PROGRAM 'id'", "guard:copy_program"),
                       ("DO $$ BEGIN END $$", "guard:opaque_code")]:
        r = evaluate(d, analyze(sql), ADMIN)  # admins are allowed everything else
        assert (r.action, r.rule) == ("block", guard), sql
