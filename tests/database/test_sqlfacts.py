"""sqlfacts: what a statement does, from PostgreSQL's own parser."""

from __future__ import annotations

import pytest

from addons.database.sqlfacts import SqlError, analyze


@pytest.mark.parametrize(("sql", "kinds", "tables"), [
    ("SELECT a FROM s.t WHERE x = 1", ("SELECT",), ("s.t",)),
    ("insert into a.b select * from c where e = 'x'", ("INSERT", "SELECT"), ("a.b", "c")),
    ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
     ("SELECT", "DELETE"), ("t",)),
    ("EXPLAIN ANALYZE DELETE FROM t WHERE id = 2", ("EXPLAIN", "DELETE"), ("t",)),
    ("SELECT * INTO newt FROM t", ("SELECT", "DDL"), ("newt", "t")),
    ("CREATE TABLE x (a int)", ("DDL",), ("x",)),
    ("GRANT ALL ON t TO bob", ("DCL",), ("t",)),
    ("TRUNCATE t", ("TRUNCATE",), ("t",)),
    ("COPY t FROM STDIN", ("COPY",), ("t",)),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", ("MERGE", ), ("t", "s")),
    ("BEGIN", ("TRANSACTION",), ()),
    ("", (), ()),
])
def test_kinds_and_tables(sql: str, kinds: tuple[str, ...], tables: tuple[str, ...]) -> None:
    st = analyze(sql)
    assert st.kinds[:len(kinds)] == kinds and set(st.tables) == set(tables)


@pytest.mark.parametrize(("sql", "unbounded"), [
    ("DELETE FROM t", True),
    ("DELETE FROM t WHERE true", True),
    ("UPDATE t SET a = 1 WHERE 1 = 1", True),
    ("UPDATE t SET a = 1 WHERE 'x' = 'x' OR false", True),
    ("WITH d AS (DELETE FROM t RETURNING 1) SELECT 1", True),
    ("DELETE FROM t WHERE id = $1", False),
    ("DELETE FROM t WHERE id IN (SELECT id FROM u)", False),
    ("UPDATE t SET a = 1 WHERE a > 3", False),
])
def test_unbounded_writes(sql: str, unbounded: bool) -> None:
    assert bool(analyze(sql).unbounded) is unbounded


@pytest.mark.parametrize(("sql", "guard"), [
    ("COPY t TO PROGRAM 'id'", "copy_program"),
    ("COPY t FROM PROGRAM 'curl x'", "copy_program"),
    ("COPY t TO '/tmp/x'", "copy_server_file"),
    ("SELECT pg_read_file('/etc/passwd')", "dangerous_function"),
    ("SELECT * FROM PG_CATALOG.pg_ls_dir('.')", "dangerous_function"),
    ("SELECT lo_export(1, '/tmp/x')", "dangerous_function"),
    ("SELECT query_to_xml('delete from t', true, true, '')", "dangerous_function"),
    ("SELECT x FROM t WHERE y = (SELECT pg_read_binary_file('/x'))", "dangerous_function"),
    ("DO $$ BEGIN DELETE FROM t; END $$", "opaque_code"),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DELETE FROM t'", "opaque_code"),
    ("SET client_encoding TO 'LATIN1'", "client_encoding"),
    ("SET NAMES 'SJIS'", "client_encoding"),
    ("RESET ALL", "client_encoding"),
    ("SET ROLE admin", "change_role"),
    ("LOAD 'plpgsql'", "load_library"),
    ("SET search_path TO other, public", "search_path"),
    ("SET LOCAL search_path = other", "search_path"),
    ("SELECT set_config('search_path', 'other', false)", "dangerous_function"),
    ("SELECT set_config('role', 'admin', false)", "dangerous_function"),
    ("SELECT set_config('session_authorization', 'admin', true)", "dangerous_function"),
    ("SELECT set_config('client_encoding', 'LATIN1', false)", "dangerous_function"),
    ("SELECT set_config('app.tenant_id', '2', false)", "dangerous_function"),
    ("SELECT set_config($1, 'off', false)", "dangerous_function"),
    ("SELECT set_config(lower('JIT'), 'off', false)", "dangerous_function"),
    ("SELECT myschema.set_config('jit', 'off', false)", "dangerous_function"),
])
def test_guards(sql: str, guard: str) -> None:
    assert guard in analyze(sql).guards


@pytest.mark.parametrize("sql", [
    # asyncpg's type introspection turns jit off and back
    "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
    "SELECT set_config('jit', $1, false)",
    "SELECT pg_catalog.set_config('statement_timeout', '5s', true)",
    "SELECT set_config('JIT'::text, 'on', false)",
    "SELECT current_setting('search_path')",
])
def test_safe_settings_pass_the_guard(sql: str) -> None:
    assert analyze(sql).guards == ()


def test_multi_statement_and_masked_literals() -> None:
    st = analyze("SELECT 1; DELETE FROM t WHERE email = 'ann@example.com'")
    assert st.multi and st.count == 2
    assert "ann@example.com" not in st.masked and "$" in st.masked


def test_cte_names_are_not_tables() -> None:
    st = analyze("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent JOIN s.recent r "
                 "ON true")
    assert set(st.tables) == {"orders", "s.recent"}


@pytest.mark.parametrize(("sql", "tables"), [
    # a non-recursive CTE's body reads the real table of its own name
    ("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret", {"secret"}),
    # a CTE inside a subquery does not hide the table beside it
    ("SELECT * FROM secret, (WITH secret AS (SELECT 1) SELECT * FROM secret) s", {"secret"}),
    # the target of a write is always a table, whatever the WITH names
    ("WITH secret AS (SELECT 1) DELETE FROM secret WHERE id = 1", {"secret"}),
    ("WITH secret AS (SELECT 1) UPDATE secret SET a = 1 WHERE id = 1", {"secret"}),
    # a later CTE is not visible to an earlier one without RECURSIVE ...
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", {"b"}),
    # ... and is with it
    ("WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", set()),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", set()),
])
def test_cte_names_hide_tables_only_in_their_scope(sql: str, tables: set[str]) -> None:
    assert set(analyze(sql).tables) == tables


def test_names_keep_their_case_for_the_catalog() -> None:
    st = analyze('SELECT "Pub"."Leak"(1), lower(x) FROM "Sec"."T" JOIN u ON true')
    assert st.relation_refs == (("Sec", "T"), ("u",))
    assert st.function_refs == (("Pub", "Leak"), ("lower",))
    assert set(st.tables) == {"sec.t", "u"}
    assert analyze("SELECT 1 OPERATOR(public.===) 2 WHERE a = b").operator_refs == (
        ("public", "==="), ("=",))


def test_functions_named() -> None:
    st = analyze("SELECT lower(name), pg_catalog.now() FROM t")
    assert set(st.functions) == {"lower", "pg_catalog.now"}


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT (", "SELECT 'unterminated",
                                 "SELECT 1\x00; DROP TABLE t"])
def test_unparseable_is_an_error(sql: str) -> None:
    with pytest.raises(SqlError):
        analyze(sql)


def test_prepare_and_execute_names() -> None:
    assert analyze("PREPARE p AS DELETE FROM t WHERE id = $1").prepared == "p"
    assert analyze("EXECUTE p(1)").executes == "p"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    assert analyze("SELECT " + "1+" * 3000 + "1").kinds == ("SELECT",)
    with pytest.raises(SqlError, match="deeply nested"):
        analyze("SELECT " + "1+" * 8000 + "1")


@pytest.mark.parametrize(("sql", "secret"), [
    ("EXECUTE p('ann@example.com', 4111111111111111)", "ann@example.com"),
    ("EXECUTE p('ann@example.com', 4111111111111111)", "4111111111111111"),
    ("COPY t TO PROGRAM 'curl http://x/?k=sk-live-123'", "sk-live-123"),
    ("NOTIFY ch, 'payload-secret'", "payload-secret"),
    ("COMMENT ON TABLE t IS 'bob@example.com'", "bob@example.com"),
    ("CREATE TABLE t1 (a text DEFAULT E'd\\'x@e.f')", "x@e.f"),
    ("PREPARE p AS SELECT $q$q@w.e$q$, $1", "q@w.e"),
    ("SELECT 1 -- card 4111111111111111", "4111111111111111"),
    ("SELECT /* a@b.c /* nested */ */ 1", "a@b.c"),
    ("CREATE USER bob PASSWORD 'hunter2'", "hunter2"),
    ("SELECT * FROM t WHERE email = 'ann@example.com'", "ann@example.com"),
])
def test_masked_sql_keeps_no_value(sql: str, secret: str) -> None:
    assert secret not in analyze(sql).masked


def test_masked_sql_keeps_names_and_parameters() -> None:
    m = analyze('SELECT t1.a2, "Col 9" FROM s3.t1 WHERE id = $1 LIMIT 10').masked
    assert "t1.a2" in m and '"Col 9"' in m and "s3.t1" in m and "$1" in m and "10" not in m


@pytest.mark.parametrize("sql", [
    "SET standard_conforming_strings = off", "SET LOCAL standard_conforming_strings TO off",
    "SET SESSION \"Standard_Conforming_Strings\" = 'off'", "RESET standard_conforming_strings",
    "SET standard_conforming_strings TO DEFAULT",
    "ALTER ROLE CURRENT_USER SET standard_conforming_strings = off",
    "ALTER ROLE agent IN DATABASE analytics SET standard_conforming_strings = off",
    "ALTER DATABASE analytics SET standard_conforming_strings TO off",
    "ALTER SYSTEM SET standard_conforming_strings = off"])
def test_changing_how_strings_are_read_is_a_guard(sql: str) -> None:
    """The parser reads string literals as standard_conforming_strings = on does; a session
    with it off reads 'a\\''; SELECT … --' as a quote and a second statement
    (tests/database/test_string_syntax_e2e.py)."""
    assert "string_syntax" in analyze(sql).guards
