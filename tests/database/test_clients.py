"""The client matrix through the real gateway (mitmdump with addons/gateway.py: the real
result masker and the real statement records in DuckDB) in front of a real PostgreSQL
(scram-sha-256, the gateway's own login): psql, psycopg 3 (sync, async, pipeline mode,
server-side prepared statements, text and binary), asyncpg (binary, prepared statements);
emails and cards masked in every one of them; every statement recorded in DuckDB, chained
with the HTTP flows, and `agentgate audit verify` passing; a LangGraph agent whose SQL tool
writes its results through the gateway, its LLM calls and its SQL in one session."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

from tests.database.pgkit import DB_PASSWORD, WAREHOUSE, ScramServer, free_port, pg_bin, wait_port

ROOT = Path(__file__).resolve().parents[2]
EMAIL = "carol.jones@example.com"
CARD = "4111 1111 1111 1111"
SECRET = "vault-launch-code-77"
THREAD = "thread-sql-agent-1"

RULES = WAREHOUSE + """    mask_columns:
      - {{column: "customers.secret", strategy: redact}}
      - {{column: "*.customers.card", strategy: partial}}
"""


@pytest.fixture(scope="module")
def pgserver() -> Iterator[ScramServer]:
    s = ScramServer().start()
    with psycopg.connect(s.dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE customers (id int PRIMARY KEY, email text, card text, "
                  "secret text, card_num bigint, doc jsonb, note text)")
        c.execute("INSERT INTO customers VALUES (1, %s, %s, %s, 4111111111111111, %s, %s), "
                  "(2, 'dave@example.org', '5500 0000 0000 0004', 'x', 7, '{}', 'none')",
                  [EMAIL, CARD, SECRET, json.dumps({"mail": EMAIL}), f"reach {EMAIL}"])
        c.execute("CREATE TABLE results (id serial PRIMARY KEY, summary text)")
        c.execute("CREATE TYPE mood AS ENUM ('calm', 'angry')")
        c.execute("CREATE TABLE moods (id int, m mood, note text)")
        c.execute("INSERT INTO moods VALUES (1, 'calm', %s)", [EMAIL])
    yield s
    s.stop()


class Env:
    def __init__(self, gw: Any, port: int, issuer: Any) -> None:
        self.gw, self.port, self.issuer = gw, port, issuer

    def token(self) -> str:
        return self.issuer.token(sub="agent-7", groups=["agents"])

    def dsn(self, **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "dbname": "analytics",
                 "user": "agent", "password": self.token(), "connect_timeout": "10",
                 "application_name": THREAD, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    @property
    def db(self) -> Path:
        return self.gw.data_dir / "agentgate.duckdb"


@pytest.fixture
def env(gateway_factory, local_issuer, pgserver: ScramServer) -> Env:
    port = free_port()
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port)
    gw = gateway_factory(rules, env={"WAREHOUSE_PASSWORD": DB_PASSWORD})
    wait_port(port)
    return Env(gw, port, local_issuer)


SELECT = "SELECT email, card, secret AS s, card_num, doc, note FROM customers WHERE id = %s"


def _check_row(row: Any) -> None:
    email, card, secret, card_num, doc, note = row
    assert email == "[EMAIL_1]"
    assert card == "**** **** **** 1111"
    assert secret == "[REDACTED_SECRET]"
    assert card_num is None
    doc = json.loads(doc) if isinstance(doc, str) else doc
    assert doc == {"mail": "[EMAIL_1]"}
    assert note == "reach [EMAIL_1]"


async def _psycopg_async(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as con:
        cur = await con.execute(SELECT, [1])
        _check_row(await cur.fetchone())
        async with con.cursor(binary=True) as bcur:
            await bcur.execute(SELECT, [1])
            _check_row(await bcur.fetchone())


async def _asyncpg(env: Env) -> None:
    import asyncpg
    con = await asyncpg.connect(host="127.0.0.1", port=env.port, user="agent",
                                password=env.token(), database="analytics",
                                server_settings={"application_name": THREAD})
    try:
        stmt = await con.prepare(SELECT.replace("%s", "$1"))
        for _ in range(3):
            _check_row(tuple(await stmt.fetchrow(1)))
        rows = await con.fetch("SELECT id, email FROM customers ORDER BY id")
        assert [r["email"] for r in rows] == ["[EMAIL_1]", "[EMAIL_2]"]
        assert await con.fetchval("SELECT note FROM moods") == "[EMAIL_1]"
    finally:
        await con.close()


def _records(env: Env) -> list[dict[str, Any]]:
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        cur = con.execute("SELECT seq, method, url, upstream, session_id, decision, outcome, "
                          "identity_sub, CAST(request_body AS VARCHAR) AS sql, metadata, "
                          "findings_total FROM flows ORDER BY seq")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        everything = repr(con.execute("SELECT * FROM flows").fetchall())
    finally:
        con.close()
    assert EMAIL not in everything and SECRET not in everything
    assert "4111 1111" not in everything and DB_PASSWORD not in everything
    return rows


def _verify(env: Env) -> None:
    out = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "verify", "--db",
                          str(env.db), "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr


def test_client_matrix_masked_and_recorded(env: Env) -> None:
    # psql: simple query protocol, text format
    penv = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    penv["PGPASSWORD"] = env.token()
    p = subprocess.run([pg_bin("psql") or "/usr/bin/psql",
                        f"host=127.0.0.1 port={env.port} dbname=analytics user=agent "
                        f"application_name={THREAD}", "-X", "-At", "-c",
                        SELECT.replace("%s", "1")], capture_output=True, text=True, env=penv,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ('[EMAIL_1]|**** **** **** 1111|[REDACTED_SECRET]||'
                                '{"mail":"[EMAIL_1]"}|reach [EMAIL_1]')
    # psycopg sync: text, binary, server-side prepared, pipeline
    with psycopg.connect(env.dsn(), autocommit=True, prepare_threshold=0) as con:
        _check_row(con.execute(SELECT, [1]).fetchone())
        _check_row(con.cursor(binary=True).execute(SELECT, [1]).fetchone())
        for _ in range(2):  # prepared on first use, then Bind/Execute only
            _check_row(con.execute(SELECT, [1], prepare=True).fetchone())
        # computed columns of a table with column rules: the gateway cannot tell what they
        # derive from, so text ones get the table's strictest rule; numbers stay
        row = con.execute("SELECT lower(secret), secret || '' AS secret2, "
                          "count(*) OVER () AS n FROM customers WHERE id = %s", [1]).fetchone()
        assert row == ("[REDACTED_LOWER]", "[REDACTED_SECRET2]", 1)
        for binary in (False, True):  # arrays and records of a ruled column: NULL
            row = con.cursor(binary=binary).execute(
                "SELECT array_agg(secret ORDER BY id), max(row(secret)::text), "
                "array_agg(id ORDER BY id) FROM customers").fetchone()
            assert row == (None, "[REDACTED_MAX]", [1, 2])
        with con.pipeline():
            c1 = con.execute(SELECT, [1])
            c2 = con.cursor(binary=True).execute(SELECT, [1])
            c3 = con.execute("SELECT email FROM customers ORDER BY id")
        _check_row(c1.fetchone())
        _check_row(c2.fetchone())
        assert [r[0] for r in c3.fetchall()] == ["[EMAIL_1]", "[EMAIL_2]"]
        # an enum's binary form cannot be inspected: refused in band, the session goes on
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="result refused") as e:
            con.cursor(binary=True).execute("SELECT m, note FROM moods").fetchall()
        assert EMAIL not in str(e.value)
        assert con.execute("SELECT m::text, note FROM moods").fetchone() == ("calm",
                                                                             "[EMAIL_1]")
    asyncio.run(_psycopg_async(env.dsn()))
    asyncio.run(_asyncpg(env))

    env.gw.stop()  # flushes the recorder
    rows = _records(env)
    sql = [r for r in rows if r["method"] == "SQL"]
    assert len(sql) >= 12
    for r in sql:
        assert r["url"] == "postgresql://warehouse/analytics" and r["upstream"] == "warehouse"
        assert r["session_id"] == THREAD and r["identity_sub"] == "agent-7"
        assert json.loads(r["metadata"])["kind"] == "pg"
    selects = [r for r in sql if json.loads(r["metadata"])["pg"]["statement_kind"] == "SELECT"
               and "customers" in json.loads(r["metadata"])["pg"]["tables"]]
    assert selects and all(r["outcome"] == "forwarded" for r in selects)
    assert any(json.loads(r["metadata"])["pg"]["rows"] == 1 and r["findings_total"] >= 3
               for r in selects)
    refused = [r for r in sql if r["outcome"] == "refused"]
    assert len(refused) == 1 and "moods" in json.loads(refused[0]["metadata"])["pg"]["tables"]
    _verify(env)


AGENT = textwrap.dedent('''
    """A LangGraph agent whose tool stores the model's summary in Postgres, through the
    gateway (token as the password), and reads back what the table holds."""
    import json, os, sys
    from typing import Annotated, TypedDict

    import psycopg
    from langchain_core.messages import AnyMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.graph import START, StateGraph
    from langgraph.graph.message import add_messages
    from langgraph.prebuilt import ToolNode, tools_condition

    THREAD = os.environ["AGENT_THREAD"]

    def save_result(summary: str) -> str:
        """Store the summary of the user's request in the results table."""
        with psycopg.connect(os.environ["AGENT_PG_DSN"], autocommit=True) as con:
            con.execute("INSERT INTO results (summary) VALUES (%s)", [summary])
            n, last = con.execute("SELECT count(*), max(summary) FROM results").fetchone()
        return f"stored {n}: {last}"

    class State(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]

    t = tool(save_result)
    llm = ChatOpenAI(model="gpt-4o-mini", api_key="managed-by-agentgate", max_retries=0,
                     timeout=60, default_headers={"X-Agent-Session": THREAD}).bind_tools([t])
    g = StateGraph(State)
    g.add_node("model", lambda s: {"messages": [llm.invoke(s["messages"])]})
    g.add_node("tools", ToolNode([t]))
    g.add_edge(START, "model")
    g.add_conditional_edges("model", tools_condition)
    g.add_edge("tools", "model")
    out = g.compile().invoke({"messages": [("user", sys.argv[1])]})
    print(json.dumps({"answer": out["messages"][-1].content}))
''')


def test_langgraph_agent_sql_tool(env: Env, standin, pgserver: ScramServer,
                                  tmp_path: Path) -> None:
    script = tmp_path / "sql_agent.py"
    script.write_text(AGENT)
    agent_env = env.gw.client_env(env.token())
    agent_env.update(AGENT_PG_DSN=env.dsn(), AGENT_THREAD=THREAD,
                     PYTHONPATH=str(ROOT))
    standin.clear()
    question = f"weekly report sent to {EMAIL}"
    p = subprocess.run([sys.executable, str(script), question], env=agent_env,
                       capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    answer = json.loads(p.stdout.strip().splitlines()[-1])["answer"]
    # the model saw the masked question and passed it to the tool; the row was written
    # through the gateway, and what the tool read back came through the masker
    assert answer.startswith("done: stored 1: weekly report sent to ")
    assert EMAIL not in json.dumps(standin.requests)
    with psycopg.connect(pgserver.dsn()) as con:
        stored = con.execute("SELECT summary FROM results").fetchall()
    assert len(stored) == 1 and stored[0][0].startswith("weekly report sent to ")

    env.gw.stop()
    rows = [r for r in _records(env) if r["session_id"] == THREAD]
    kinds = [(r["method"], r["upstream"]) for r in rows]
    assert kinds.count(("POST", "openai")) == 2
    sql = [json.loads(r["metadata"])["pg"]["statement_kind"] for r in rows
           if r["method"] == "SQL"]
    assert "INSERT" in sql and "SELECT" in sql
    _verify(env)
    out = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "sessions", "--db",
                          str(env.db), "--session", THREAD], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "INSERT" in out.stdout and "SQL" in out.stdout.upper()


def test_connector_to_the_real_gateway(env: Env, tmp_path: Path) -> None:
    """`agentgate connect --postgres` in front of the real gateway: TLS verified against the
    gateway's CA, the token from the file as the password, a DSN without any secret; a
    rotated token is used by the next connection."""
    from tests.database.test_connect_pg import _connector, _stop
    token_file = tmp_path / "token"
    token_file.write_text(env.token() + "\n")
    proc, port = _connector(tmp_path, env.port, env.gw.ca_cert, token_file)
    dsn = (f"host=127.0.0.1 port={port} dbname=analytics user=agent sslmode=disable "
           f"application_name={THREAD}-connector")
    try:
        with psycopg.connect(dsn) as con:
            assert con.execute("SELECT email FROM customers WHERE id = 1").fetchone() == \
                ("[EMAIL_1]",)
        token_file.write_text(env.issuer.token(sub="agent-8", groups=["agents"]) + "\n")
        with psycopg.connect(dsn) as con:
            assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        _stop(proc)
    env.gw.stop()
    subs = [r["identity_sub"] for r in _records(env)
            if r["method"] == "SQL" and r["session_id"] == f"{THREAD}-connector"]
    # BEGIN, SELECT, COMMIT per connection (psycopg outside autocommit)
    assert subs and subs == sorted(subs) and set(subs) == {"agent-7", "agent-8"}


def test_sql_results_share_placeholders_with_llm_traffic(env: Env, standin) -> None:
    """A value an agent's LLM call masked as [EMAIL_1] is [EMAIL_1] in its SQL results of the
    same session (the masking addon's map), and another session's map is its own."""
    import httpx
    session = "thread-shared-ph"
    standin.clear()
    with httpx.Client(proxy=env.gw.proxy_url(env.token()), verify=str(env.gw.ca_cert),
                      timeout=30) as c:
        r = c.post("https://api.openai.com/v1/chat/completions",
                   headers={"x-agent-session": session},
                   json={"model": "gpt-4o", "messages": [
                       {"role": "user", "content": "write to ann.lee@example.com"}]})
    assert r.status_code == 200, r.text
    seen = json.dumps(standin.requests)
    assert "ann.lee@example.com" not in seen and "[EMAIL_1]" in seen
    sql = "SELECT 'zed.q@example.net' AS a, 'ann.lee@example.com' AS b"
    with psycopg.connect(env.dsn(application_name=session), autocommit=True) as con:
        # ann is the LLM traffic's [EMAIL_1]; zed is new in this session: [EMAIL_2]
        assert con.execute(sql).fetchone() == ("[EMAIL_2]", "[EMAIL_1]")
    with psycopg.connect(env.dsn(application_name="thread-other"), autocommit=True) as con:
        assert con.execute(sql).fetchone() == ("[EMAIL_1]", "[EMAIL_2]")


def test_asyncpg_enum_introspection(env: Env) -> None:
    """asyncpg introspects a user-defined type (an enum) with set_config('jit', …) around its
    catalog query: the dangerous-function guard lets those settings through (and keeps
    refusing search_path, role, …)."""
    import asyncpg

    async def run() -> None:
        con = await asyncpg.connect(host="127.0.0.1", port=env.port, user="agent",
                                    password=env.token(), database="analytics",
                                    server_settings={"application_name": THREAD})
        try:
            # the enum parameter makes asyncpg introspect the type (jit off, then back)
            rows = await con.fetch("SELECT id, note FROM moods WHERE m = $1", "calm")
            assert [(r["id"], r["note"]) for r in rows] == [(1, "[EMAIL_1]")]
            # an enum's binary form is refused under masking (test above); asyncpg reads it
            # in text format with a text codec
            await con.set_type_codec("mood", encoder=str, decoder=str, schema="public",
                                     format="text")
            rows = await con.fetch("SELECT id, m, note FROM moods WHERE m = $1", "calm")
            assert [(r["id"], r["m"], r["note"]) for r in rows] == [(1, "calm", "[EMAIL_1]")]
            for sql in ("SELECT set_config('search_path', 'pg_catalog', false)",
                        "SET search_path TO pg_catalog", "SELECT set_config('role', 'x', false)"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await con.execute(sql)
            assert await con.fetchval("SELECT count(*) FROM moods") == 1
        finally:
            await con.close()
    asyncio.run(run())


def test_sql_results_share_replica_placeholders(gateway_factory, local_issuer, standin,
                                                pgserver: ScramServer) -> None:
    """With replica-shared placeholders (AGENTGATE_STATE), a SQL result uses the map every
    replica has for that identity + session: a value the LLM traffic numbered keeps its
    number, a value first met in a result is `[EMAIL]` (never a number another value holds)."""
    import httpx
    port = free_port()
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port)
    gw = gateway_factory(rules, env={
        "WAREHOUSE_PASSWORD": DB_PASSWORD, "AGENTGATE_STATE": pgserver.dsn(),
        "AGENTGATE_SECRET": "replica-secret-for-tests-0123456789"})
    wait_port(port)
    env = Env(gw, port, local_issuer)
    session = "thread-replica-ph"
    with httpx.Client(proxy=gw.proxy_url(env.token()), verify=str(gw.ca_cert),
                      timeout=30) as c:
        r = c.post("https://api.openai.com/v1/chat/completions",
                   headers={"x-agent-session": session},
                   json={"model": "gpt-4o", "messages": [
                       {"role": "user", "content": "write to ann.lee@example.com"}]})
    assert r.status_code == 200, r.text
    assert "[EMAIL_1]" in json.dumps(standin.requests[-1])
    sql = "SELECT 'zed.q@example.net' AS a, 'ann.lee@example.com' AS b"
    with psycopg.connect(env.dsn(application_name=session), autocommit=True) as con:
        assert con.execute(sql).fetchone() == ("[EMAIL]", "[EMAIL_1]")
    with psycopg.connect(env.dsn(application_name="thread-other-r"), autocommit=True) as con:
        assert con.execute(sql).fetchone() == ("[EMAIL]", "[EMAIL]")
