"""A deny rule on a table holds whatever name the agent reaches it by (hostile, end to end:
real postgres, the real gateway, psycopg as the agent): a view over it (nested views too),
a partition through its parent, an operator whose function reads it,
a SQL function reading it (string body and BEGIN ATOMIC), a plpgsql function (opaque:
refused), a CTE named like the table that reads it, a CTE in a subquery beside the real
table, DELETE through a CTE's name, COPY of a query over the view, a protocol Parse of the
view (psycopg's prepared statements) and an INSERT into an allowed table whose trigger
writes to the denied one. Each is refused with a Postgres ErrorResponse naming the rule,
recorded, and nothing of it reached the server (the table is unchanged, the server's own
statement log has none of them). Statements that only reach allowed tables still run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.database.pgkit import DB_PASSWORD, WAREHOUSE, ScramServer, free_port, wait_port

RULES = WAREHOUSE + """    max_connections: 4
    sql:
      - {{name: no-secrets, action: block, match: {{tables: [secret, hidden_*]}},
         message: the secret table is off limits}}
"""

SETUP = [
    "CREATE TABLE secret (id int, ssn text)",
    "INSERT INTO secret VALUES (1, '078-05-1120')",
    "CREATE VIEW secret_v AS SELECT id, ssn FROM secret",
    "CREATE VIEW secret_vv AS SELECT * FROM secret_v",
    "CREATE VIEW users_v AS SELECT id, name FROM users",
    "CREATE FUNCTION leak_sql() RETURNS SETOF text LANGUAGE sql AS 'SELECT ssn FROM secret'",
    "CREATE FUNCTION leak_atomic() RETURNS text LANGUAGE sql "
    "BEGIN ATOMIC SELECT ssn FROM secret LIMIT 1; END",
    "CREATE FUNCTION leak_pl() RETURNS text LANGUAGE plpgsql AS "
    "$$ BEGIN RETURN (SELECT ssn FROM secret LIMIT 1); END $$",
    "CREATE FUNCTION via_other() RETURNS SETOF text LANGUAGE sql AS 'SELECT leak_sql()'",
    "CREATE FUNCTION user_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM users'",
    "CREATE TABLE notes (id int, body text)",
    "CREATE FUNCTION notes_to_secret() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN INSERT INTO secret VALUES (NEW.id, NEW.body); RETURN NEW; END $$",
    "CREATE TRIGGER notes_copy AFTER INSERT ON notes FOR EACH ROW "
    "EXECUTE FUNCTION notes_to_secret()",
    "CREATE TABLE memo (id int, body text)",
    "CREATE RULE memo_copy AS ON INSERT TO memo DO ALSO INSERT INTO secret VALUES "
    "(NEW.id, NEW.body)",
    "CREATE FUNCTION peek(int, int) RETURNS boolean LANGUAGE sql AS "
    "'SELECT EXISTS (SELECT 1 FROM secret WHERE id = $1 AND length(ssn) > $2)'",
    "CREATE OPERATOR public.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = peek)",
    "CREATE TYPE ticket AS (id int, ssn text)",
    "CREATE FUNCTION ticket_of(int) RETURNS ticket LANGUAGE sql AS "
    "'SELECT id, ssn FROM secret WHERE id = $1'",
    "CREATE CAST (int AS ticket) WITH FUNCTION ticket_of(int)",
    "CREATE FUNCTION has_ssn(int) RETURNS boolean LANGUAGE plpgsql AS "
    "$$ BEGIN RETURN EXISTS (SELECT 1 FROM secret WHERE id = $1); END $$",
    "CREATE DOMAIN known_id AS int CHECK (has_ssn(VALUE))",
    "CREATE TABLE logs (id int, ssn text) PARTITION BY RANGE (id)",
    "CREATE TABLE hidden_2026 PARTITION OF logs FOR VALUES FROM (0) TO (100)",
    "INSERT INTO logs VALUES (1, '219-09-9999')",
    "GRANT ALL ON secret, secret_v, secret_vv, users_v, notes, memo, logs, hidden_2026 "
    "TO agent_rw",
    "ANALYZE secret",
    "ALTER SYSTEM SET log_statement = 'all'",
    "SELECT pg_reload_conf()",
]


@pytest.fixture(scope="module")
def pgserver() -> Iterator[ScramServer]:
    s = ScramServer().start()
    with psycopg.connect(s.admin_dsn(), autocommit=True) as c:
        for sql in SETUP:
            c.execute(sql)
    yield s
    s.stop()


class Env:
    def __init__(self, gw: Any, port: int, issuer: Any, records: Path, pg: ScramServer):
        self.gw, self.port, self.issuer, self.records, self.pg = gw, port, issuer, records, pg

    def connect(self, **kw: Any) -> psycopg.Connection:
        token = self.issuer.token(sub="agent-7", groups=["agents"])
        return psycopg.connect(f"host=127.0.0.1 port={self.port} dbname=analytics "
                               f"user=agent password={token} connect_timeout=10",
                               autocommit=True, **kw)

    def record_lines(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(line) for line in self.records.read_text().splitlines()]

    def secret_rows(self) -> int:
        with psycopg.connect(self.pg.admin_dsn()) as c:
            return c.execute("SELECT count(*) FROM secret").fetchone()[0]


@pytest.fixture
def env(gateway_factory, local_issuer, pgserver: ScramServer, tmp_path: Path
        ) -> Iterator[Env]:
    port = free_port()
    records = tmp_path / "records.jsonl"
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port)
    gw = gateway_factory(rules, env={"WAREHOUSE_PASSWORD": DB_PASSWORD,
                                     "AGENTGATE_TEST_PG_RECORDS": str(records)},
                         script=Path(__file__).with_name("gateway_records.py"))
    wait_port(port)
    yield Env(gw, port, local_issuer, records, pgserver)
    print("---- gateway log\n" + gw.logs()[-6000:])


REFUSED = [
    ("SELECT ssn FROM secret_v", "no-secrets"),
    ("SELECT * FROM secret_vv", "no-secrets"),
    ("SELECT * FROM public.secret_vv WHERE id = 1", "no-secrets"),
    ("SELECT leak_sql()", "no-secrets"),
    ("SELECT * FROM leak_sql()", "no-secrets"),
    ("SELECT via_other()", "no-secrets"),
    ("SELECT leak_atomic()", "no-secrets"),
    ("SELECT leak_pl()", "guard:opaque_dependency"),
    ("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret", "no-secrets"),
    ("SELECT * FROM secret, (WITH secret AS (SELECT 1) SELECT * FROM secret) s",
     "no-secrets"),
    ("WITH secret AS (SELECT 1 AS id) DELETE FROM secret WHERE id = 1", "no-secrets"),
    ("INSERT INTO notes VALUES (7, 'planted')", "guard:opaque_dependency"),
    ("INSERT INTO memo VALUES (8, 'planted')", "no-secrets"),
    ("PREPARE peek_v AS SELECT * FROM secret_v", "no-secrets"),
    ("EXPLAIN ANALYZE SELECT * FROM secret_vv", "no-secrets"),
    ("CALL nothing_here()", None),                       # no such procedure: the server's
    ("SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'secret'",
     "guard:opaque_dependency"),                        # the planner's sample of secret
    ("SELECT * FROM pg_catalog.pg_stats", "guard:opaque_dependency"),
    ("SELECT 1 === 5", "no-secrets"),                   # an operator's function
    ("SELECT (1::ticket).ssn", "no-secrets"),            # a cast's function
    ("SELECT 1::known_id", "guard:opaque_dependency"),   # a domain's CHECK function
    ("SELECT ssn FROM logs", "no-secrets"),             # a denied partition via its parent
]


def test_deny_rule_holds_through_views_functions_ctes_and_triggers(env: Env) -> None:
    before = env.secret_rows()
    with env.connect() as c:
        for sql, rule in REFUSED:
            with pytest.raises(psycopg.Error) as e:
                c.execute(sql)
                raise AssertionError(f"ran: {sql}")
            if rule is None:  # nothing to resolve: judged as written, refused by the server
                assert e.value.sqlstate == "42883", (sql, e.value)
                continue
            assert e.value.sqlstate == "42501", (sql, e.value)
            assert f"rule {rule}" in str(e.value), (sql, str(e.value))
            assert "078-05-1120" not in str(e.value) and "219-09" not in str(e.value)
            # the connection keeps serving after each refusal
            assert c.execute("SELECT count(*) FROM users").fetchone() == (2,), sql
        # COPY out of a query over the view (the copy protocol)
        for sql in ("COPY (SELECT * FROM secret_v) TO STDOUT",
                    "COPY (SELECT leak_sql()) TO STDOUT"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e, \
                    c.cursor() as cur, cur.copy(sql) as copy:
                rows = [bytes(r) for r in copy]
                raise AssertionError(f"{sql}: {rows}")
            assert "rule no-secrets" in str(e.value)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unknown_statement"):
            c.execute("EXECUTE peek_v")  # its PREPARE was refused: nothing to execute
        # a protocol Parse (psycopg prepares it on the server) of the view, reused by name
        for _ in range(3):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT ssn FROM secret_v WHERE id = %s", (1,), prepare=True)
        # what reaches only allowed tables still runs, through the same kinds of names
        assert c.execute("SELECT name FROM users_v ORDER BY id").fetchall() == [
            ("Ann",), ("Bob",)]
        assert c.execute("SELECT user_count()").fetchone() == (2,)
        assert c.execute("WITH u AS (SELECT * FROM users) SELECT count(*) FROM u"
                         ).fetchone() == (2,)
        assert c.execute("SELECT id FROM users_v WHERE id = %s", (1,), prepare=True
                         ).fetchone() == (1,)
        assert c.execute("SELECT now() IS NOT NULL, lower('A')").fetchone() == (True, "a")
    # nothing of the refused statements ran: no rows planted, none in the server's log
    assert env.secret_rows() == before
    server_log = env.pg.log()
    assert "statement: SELECT count(*) FROM users" in server_log  # log_statement = all
    for text in ("FROM secret_v", "leak_sql()", "leak_pl()", "leak_atomic()", "via_other()",
                 "planted", "DELETE FROM secret"):
        assert text not in server_log, text
    recs = env.record_lines()
    blocked = [r for r in recs if r.get("decision") == "block"]
    rules = {r.get("rule") for r in blocked}
    assert {"no-secrets", "guard:opaque_dependency"} <= rules, rules
    # the record names the table the statement really reached
    view = next(r for r in blocked if "secret_v" in str(r.get("tables")))
    assert "public.secret" in view["tables"], view


def test_protocol_statement_names_reused_never_run_the_view(env: Env) -> None:
    """Extended protocol by hand: a name defined with allowed SQL, then redefined (after a
    Close, and as the unnamed statement) with SQL over the denied table's view, bound and
    executed in the same pipeline: the redefinition is refused at Parse, the Bind and
    Execute behind it never run it, and no row of the denied table comes back."""
    from tests.database.test_relay_e2e import _msg, _until_ready, fields, raw_login
    s, got = raw_login(env.port, env.issuer.token(sub="agent-7", groups=["agents"]))
    assert got[-1][0] == b"Z"
    describe = _msg(b"D", b"P\0")  # the result masker needs the columns described
    bind_run = (_msg(b"B", b"\0s1\0\0\0\0\0\0\0") + describe + _msg(b"E", b"\0\0\0\0\0")
                + _msg(b"S", b""))
    s.sendall(_msg(b"P", b"s1\0SELECT name FROM users WHERE id = 1\0\0\0") + bind_run)
    got = _until_ready(s)
    assert any(t == b"D" and b"Ann" in p for t, p in got), got
    s.sendall(_msg(b"C", b"Ss1\0") + _msg(b"S", b""))
    assert _until_ready(s)[-1][0] == b"Z"
    for name in (b"s1", b""):
        s.sendall(_msg(b"P", name + b"\0SELECT ssn FROM secret_v\0\0\0")
                  + _msg(b"B", b"\0" + name + b"\0\0\0\0\0\0\0") + describe
                  + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
        got = _until_ready(s)
        errs = [fields(p) for t, p in got if t == b"E"]
        assert errs and errs[0]["C"] == "42501" and "no-secrets" in errs[0]["M"], got
        assert not [p for t, p in got if t == b"D"], got
        # the name again on its own: nothing the gateway let through is behind it
        s.sendall(_msg(b"B", b"\0" + name + b"\0\0\0\0\0\0\0") + describe
                  + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
        got = _until_ready(s)
        assert not [p for t, p in got if t == b"D"], got
        assert b"078-05" not in b"".join(p for _, p in got)
    s.close()
