"""Hostile, end to end (real postgres, the real gateway, psycopg as the agent): the agent
changes what a name reaches with DDL that names nothing a rule sees, then calls the name
while the gateway's catalog login still sees the old catalog.

`ALTER FUNCTION leak() RENAME TO fresh` names no relation and no called function, so the
rule on `secret` has nothing to judge in it. The catalog look-up of a later `SELECT fresh()`
runs over the gateway's own catalog login, another connection: it cannot see the agent's
uncommitted DDL (inside BEGIN, or earlier in the same multi-statement query) and, for 2 s,
the dependency cache keeps what `fresh` reached before. Each way the SSN came back before;
now the statement is refused (42501 guard:dependencies or the deny rule) and the server
never ran it. ALTER ROLE / DATABASE … SET search_path (every later session's, the catalog
login's included) is refused as SET search_path is, and so is UPDATE pg_settings (its
rule runs set_config: the agent's session would resolve names in another search_path than
the catalog login).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.database.pgkit import ScramServer

# test_depends_e2e's gateway (its rule no-secrets on `secret`) over this module's pgserver
from tests.database.test_depends_e2e import Env, env  # noqa: F401 - fixture

SSN = "078-05-1120"
LEAK = "LANGUAGE sql AS 'SELECT ssn FROM secret LIMIT 1'"
SETUP = [
    "CREATE TABLE secret (id int, ssn text)",
    f"INSERT INTO secret VALUES (1, '{SSN}')",
    "ALTER TABLE secret OWNER TO agent_rw",
    "ALTER TABLE users OWNER TO agent_rw",
    *(f"CREATE FUNCTION {n}() RETURNS text {LEAK}" for n in ("leak_tx", "leak_multi",
                                                            "leak_cache", "leak_pipe")),
    *(f"CREATE FUNCTION {n}() RETURNS text LANGUAGE sql AS 'SELECT name FROM users LIMIT 1'"
      for n in ("okf", "okf_sql", "okf_proto")),
    *(f"CREATE FUNCTION {n}() RETURNS text {LEAK}" for n in ("leak_sqlprep", "leak_proto")),
    *(f"ALTER FUNCTION {n}() OWNER TO agent_rw"
      for n in ("leak_tx", "leak_multi", "leak_cache", "leak_pipe", "okf", "okf_sql",
                "okf_proto", "leak_sqlprep", "leak_proto")),
    # names a statement reaches a function by without a call in its text
    "CREATE FUNCTION leakf(users) RETURNS text LANGUAGE sql AS "
    "'SELECT ssn FROM secret LIMIT 1'",
    "CREATE FUNCTION leakany(anyelement) RETURNS text LANGUAGE sql AS "
    "'SELECT ssn FROM secret LIMIT 1'",
    "CREATE PROCEDURE leakp(INOUT s text) LANGUAGE sql AS 'SELECT ssn FROM secret LIMIT 1'",
    "CREATE FUNCTION initial(users) RETURNS text LANGUAGE sql AS 'SELECT left($1.name, 1)'",
    "CREATE TYPE ticket AS (id int, ssn text)",
    "CREATE FUNCTION ticket_of(int) RETURNS ticket LANGUAGE sql AS "
    "'SELECT id, ssn FROM secret WHERE id = $1'",
    "CREATE CAST (int AS ticket) WITH FUNCTION ticket_of(int) AS IMPLICIT",
    "CREATE FUNCTION show_ticket(ticket) RETURNS text LANGUAGE sql AS 'SELECT ($1).ssn'",
    "CREATE TABLE tix (t ticket)",
    "ALTER TABLE tix OWNER TO agent_rw",
    # what a write runs beside the table it names
    "CREATE FUNCTION ssn_gt(int) RETURNS boolean LANGUAGE sql IMMUTABLE AS "
    "'SELECT (SELECT ssn FROM secret LIMIT 1)::int > $1'",
    "CREATE DOMAIN leaky_id AS int CHECK (ssn_gt(VALUE))",
    "CREATE DOMAIN leaky_id2 AS leaky_id",
    "CREATE DOMAIN leaky_id3 AS leaky_id2",
    "CREATE TABLE dtab (id leaky_id3)",
    "CREATE FUNCTION takes_leaky(leaky_id) RETURNS int LANGUAGE sql AS 'SELECT $1::int'",
    "CREATE FUNCTION ssn_plus(int) RETURNS int LANGUAGE sql IMMUTABLE AS "
    "'SELECT (SELECT ssn FROM secret LIMIT 1)::int + $1'",
    "CREATE TABLE itab (x int)",
    "CREATE INDEX ON itab (ssn_plus(x))",
    "CREATE TABLE parent (id int PRIMARY KEY)",
    "INSERT INTO parent VALUES (1)",
    "ALTER TABLE secret ADD FOREIGN KEY (id) REFERENCES parent (id) ON DELETE CASCADE",
    *(f"ALTER TABLE {t} OWNER TO agent_rw" for t in ("dtab", "itab", "parent")),
    "CREATE FUNCTION okf_ddl() RETURNS text LANGUAGE sql AS 'SELECT name FROM users LIMIT 1'",
    f"CREATE FUNCTION leak_ddl() RETURNS text {LEAK}",
    "CREATE FUNCTION swap_names() RETURNS void LANGUAGE sql AS 'ALTER FUNCTION okf_ddl() "
    "RENAME TO okf_ddl_old; ALTER FUNCTION leak_ddl() RENAME TO okf_ddl'",
    *(f"ALTER FUNCTION {n}() OWNER TO agent_rw" for n in ("okf_ddl", "leak_ddl", "swap_names")),
    "ALTER SYSTEM SET log_statement = 'all'",
    "SELECT pg_reload_conf()",
]


@pytest.fixture(scope="module")
def pgserver() -> Iterator[ScramServer]:  # (the env fixture's server, with this SETUP)
    server = ScramServer().start()
    try:
        with psycopg.connect(server.admin_dsn(), autocommit=True) as admin:
            list(map(admin.execute, SETUP))
        yield server
    finally:
        server.stop()


def _refused(c: psycopg.Connection, sql: str) -> str:
    with pytest.raises(psycopg.Error) as e:
        row = c.execute(sql).fetchall()
        raise AssertionError(f"ran: {sql} -> {row}")
    assert e.value.sqlstate == "42501", (sql, e.value)
    assert SSN not in str(e.value)
    return str(e.value)


def test_ddl_renaming_a_function_never_lets_a_stale_catalog_judge_it(env: Env) -> None:  # noqa: F811 - the fixture
    with env.connect() as c:
        # 1. inside a transaction: the catalog login cannot see the uncommitted rename
        c.execute("BEGIN")
        c.execute("ALTER FUNCTION leak_tx() RENAME TO fresh_tx")
        msg = _refused(c, "SELECT fresh_tx()")
        assert "guard:dependencies" in msg or "no-secrets" in msg, msg
        c.execute("ROLLBACK")
        # after the transaction ended the name is judged by the catalog again
        assert c.execute("SELECT okf()").fetchone() == ("Ann",)

        # 2. the rename and the call in one multi-statement query (one implicit
        # transaction, judged before any of it ran)
        _refused(c, "ALTER FUNCTION leak_multi() RENAME TO fresh_multi; SELECT fresh_multi()")

        # 3. autocommit, within the dependency cache's 2 s: okf() was judged a moment ago
        # as reaching users only; the agent swaps a leaking function in under its name
        assert c.execute("SELECT okf()").fetchone() == ("Ann",)
        c.execute("ALTER FUNCTION okf() RENAME TO okf_old")
        c.execute("ALTER FUNCTION leak_cache() RENAME TO okf")
        msg = _refused(c, "SELECT okf()")
        assert "no-secrets" in msg, msg

        # 4. an explicit transaction's rename, committed, then the call at once
        c.execute("BEGIN")
        c.execute("ALTER FUNCTION okf() RENAME TO leak_cache")
        c.execute("ALTER FUNCTION okf_old() RENAME TO okf")
        c.execute("COMMIT")
        assert c.execute("SELECT okf()").fetchone() == ("Ann",)
        c.execute("BEGIN")
        c.execute("ALTER FUNCTION okf() RENAME TO okf_old")
        c.execute("ALTER FUNCTION leak_pipe() RENAME TO okf")
        c.execute("COMMIT")
        _refused(c, "SELECT okf()")

        # 5. a later session's search_path (the catalog login's, the agent's after it
        # reconnects): refused like SET search_path
        for sql in ("ALTER ROLE agent_rw SET search_path = s2, public",
                    "ALTER ROLE agent_rw IN DATABASE analytics SET search_path = s2",
                    "ALTER DATABASE analytics SET search_path = s2, public"):
            assert "guard:search_path" in _refused(c, sql), sql
        # the same through pg_settings' update rule (it runs set_config): refused, and a
        # read of pg_settings still runs
        for sql in ("UPDATE pg_settings SET setting = 's2, public' WHERE name = 'search_path'",
                    "UPDATE pg_catalog.pg_settings SET setting = 'x' WHERE name = 'role'"):
            assert "guard:dangerous_function" in _refused(c, sql), sql
        assert c.execute("SELECT setting FROM pg_settings WHERE name = 'search_path'"
                         ).fetchone() == ('"$user", public',)
        # the connection keeps serving
        assert c.execute("SELECT count(*) FROM users").fetchone() == (2,)
    server_log = env.pg.log()
    for text in ("SELECT fresh_tx()", "SELECT fresh_multi()"):
        assert text not in server_log, text
    assert server_log.count("statement: SELECT okf()") == 3, server_log[-3000:]
    assert "SET search_path" not in server_log
    assert len([r for r in env.record_lines() if r.get("decision") == "block"]) >= 4


def test_a_statement_prepared_before_the_ddl_is_judged_again(env: Env) -> None:  # noqa: F811 - the fixture
    """PostgreSQL parses a prepared statement again when the catalog under it changed, so
    `okf` in a statement prepared while it was harmless calls whatever is named okf by
    the time it runs: judged once at PREPARE / Parse, it ran the leak unjudged. (libpq
    calls, not psycopg's execute: psycopg itself deallocates everything after DDL.)"""
    from psycopg.pq import ExecStatus

    with env.connect() as c:
        pq = c.pgconn

        def run(res: Any) -> list[Any]:
            if res.status == ExecStatus.FATAL_ERROR:
                msg = (res.error_message or b"").decode()
                assert SSN not in msg
                return [("error", msg)]
            return [res.get_value(i, 0) for i in range(res.ntuples)]

        assert run(pq.exec_(b"PREPARE p AS SELECT okf_sql()")) == []
        assert run(pq.exec_(b"EXECUTE p")) == [b"Ann"]
        assert run(pq.prepare(b"s1", b"SELECT okf_proto()")) == []
        assert run(pq.exec_prepared(b"s1", [])) == [b"Ann"]
        for ok, leak in (("okf_sql", "leak_sqlprep"), ("okf_proto", "leak_proto")):
            assert run(pq.exec_(f"ALTER FUNCTION {ok}() RENAME TO {ok}_old".encode())) == []
            assert run(pq.exec_(f"ALTER FUNCTION {leak}() RENAME TO {ok}".encode())) == []
        for res in (pq.exec_(b"EXECUTE p"), pq.exec_prepared(b"s1", [])):
            got = run(res)
            assert len(got) == 1 and isinstance(got[0], tuple), f"ran: {got}"
            assert "no-secrets" in got[0][1], got
            assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501", got
        assert run(pq.exec_(b"SELECT count(*) FROM users")) == [b"2"]


def test_functions_reached_without_a_call_in_the_text(env: Env) -> None:  # noqa: F811 - the fixture
    """`u.leakf` (attribute notation: PostgreSQL calls leakf(u) when users has no column
    leakf), CALL of a SQL procedure (CALL's call was never read as one) and an implicit
    cast's function reached `secret` unjudged: the SSN came back. Attribute notation over
    a harmless function, and plain columns, still run."""
    refused = ("SELECT u.leakf FROM users u", "SELECT (u).leakf FROM users u",
               "SELECT users.leakf FROM users", "SELECT (u.*).leakf FROM users u",
               "SELECT u.leakany FROM users u", "CALL leakp(NULL)", "CALL public.leakp(NULL)",
               # an implicit cast's function (int -> ticket reads secret): no cast written
               "SELECT show_ticket(1)", "INSERT INTO tix VALUES (1) RETURNING (t).ssn")
    with env.connect() as c:
        for sql in refused:
            assert "no-secrets" in _refused(c, sql), sql
        assert c.execute("SELECT u.initial, u.name FROM users u ORDER BY u.id").fetchall() \
            == [("A", "Ann"), ("B", "Bob")]
    server_log = env.pg.log()  # (the catalog login's look-ups name leakf as a parameter)
    assert "SELECT u.initial, u.name" in server_log
    for sql in refused:
        assert sql not in server_log, sql


def test_what_a_write_runs_beside_the_table_it_names(env: Env) -> None:  # noqa: F811 - the fixture
    """A domain's CHECK (a column's type, nested domains, a function's argument), an index
    expression and a foreign key's ON DELETE CASCADE run on a write to an allowed table:
    the first three read secret (the SSN came back in the cast error's message), the last
    deleted its rows. Refused now; the secret table keeps its row."""
    refused = ("INSERT INTO dtab VALUES (1)", "SELECT takes_leaky(1)",
               "INSERT INTO itab VALUES (1)", "DELETE FROM parent WHERE id = 1")
    with env.connect() as c:
        for sql in refused:
            assert "no-secrets" in _refused(c, sql), sql
        assert c.execute("SELECT count(*) FROM parent").fetchone() == (1,)
    with psycopg.connect(env.pg.admin_dsn()) as admin:
        assert admin.execute("SELECT ssn FROM secret").fetchall() == [(SSN,)]
    server_log = env.pg.log()
    for sql in refused:
        assert sql not in server_log, sql


def test_ddl_inside_a_sql_function_forgets_the_cache_too(env: Env) -> None:  # noqa: F811
    """SELECT swap_names() runs the renames in its SQL body: the statement's own text has
    no DDL, so the dependency cache kept okf_ddl's harmless look-up for 2 s and the leak
    ran under its name. The DDL in a body now counts as the statement's (kinds) and the
    cache is forgotten as for DDL sent directly."""
    with env.connect() as c:
        assert c.execute("SELECT okf_ddl()").fetchone() == ("Ann",)
        c.execute("SELECT swap_names()")
        assert "no-secrets" in _refused(c, "SELECT okf_ddl()")
