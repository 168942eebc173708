"""The gateway reads SQL with PostgreSQL's parser as a server with the default
`standard_conforming_strings = on` does (libpg_query has no other mode). An agent that turns
it off in its session makes the server read a backslash before a quote as an escape: then
`SELECT 'a\\''; SELECT ssn FROM secret; --'` is one string literal to the gateway (its `''`
an escaped quote) and two statements to the server, the second reading the denied table
unjudged (hostile, end to end: real postgres, the real gateway, psycopg's simple query
protocol). Changing it is a guard, like client_encoding: the gateway reads SQL as the
server reads it, or not at all."""

from __future__ import annotations

import psycopg
import pytest

from tests.database.test_depends_e2e import Env, env, pgserver  # noqa: F401 - fixtures

SMUGGLED = "SELECT 'a\\''; SELECT ssn FROM secret; --'"


@pytest.mark.parametrize("change", [
    "SET standard_conforming_strings = off",
    "SET SESSION standard_conforming_strings TO 'off'",
    "SET LOCAL standard_conforming_strings = off",
    "ALTER ROLE CURRENT_USER SET standard_conforming_strings = off",
    "RESET standard_conforming_strings",
])
def test_string_syntax_cannot_move_under_the_parser(env: Env, change: str) -> None:  # noqa: F811 - the fixture
    with env.connect(cursor_factory=psycopg.ClientCursor) as c:
        try:
            c.execute(change)
            refused = ""
        except psycopg.errors.InsufficientPrivilege as e:
            refused = str(e)
        try:
            cur = c.execute(SMUGGLED)
            rows = [cur.fetchall()]
            while cur.nextset():
                rows.append(cur.fetchall())
        except psycopg.Error as e:
            rows = [str(e)]
        assert "078-05-1120" not in str(rows), rows  # the denied table's value
        assert "guard:string_syntax" in refused, change
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
