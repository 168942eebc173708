"""The Postgres path end to end: real postgres (scram-sha-256), the real gateway (mitmdump
with the suite), psql and psycopg 3 as the agent's clients, OIDC tokens from a local issuer.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.database.pgkit import DB_PASSWORD, ScramServer, free_port, wait_port

PSQL = "/usr/bin/psql"


@pytest.fixture(scope="module")
def pgserver() -> Iterator[ScramServer]:
    s = ScramServer().start()
    yield s
    s.stop()


RULES = """
{standin_upstreams}
{identity}
approvals:
  default_timeout: 30
databases:
  - name: warehouse
    listen: 127.0.0.1:{listen}
    upstream: 127.0.0.1:{pgport}
    database: analytics
    credential: {{user: agent_rw, password_env: WAREHOUSE_PASSWORD}}
    server_tls: {{mode: disable}}
    sql:
      - {{name: no-ddl, action: block, match: {{kinds: [DDL, DCL]}},
         message: schema changes go through migrations}}
      - {{name: no-unbounded-writes, action: block, match: {{unbounded: true}}}}
      - {{name: orders-writes-reviewed, action: approve, approvers: [dba],
         match: {{kinds: [INSERT, UPDATE, DELETE], tables: [orders]}}}}
      - {{name: watch-users, action: observe, match: {{tables: [users]}}}}
"""


def _msg(t: bytes, payload: bytes) -> bytes:
    return t + struct.pack("!I", len(payload) + 4) + payload


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _exact(sock, 5)
    (n,) = struct.unpack("!I", head[1:])
    return head[:1], _exact(sock, n - 4)


def _exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def fields(payload: bytes) -> dict[str, str]:
    out = {}
    for part in payload.rstrip(b"\0").split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode()
    return out


def raw_login(port: int, token: str, database: str = "analytics",
              extra: tuple[tuple[str, str], ...] = ()) -> tuple[socket.socket, list]:
    """Cleartext (loopback) login by hand; returns the socket and the messages up to
    ReadyForQuery or the first ErrorResponse."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    params = [("user", "agent"), ("database", database), *extra]
    body = struct.pack("!I", 3 << 16) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    got = []
    while True:
        t, payload = _read(s)
        got.append((t, payload))
        if t == b"R" and payload[:4] == struct.pack("!I", 3):
            s.sendall(_msg(b"p", token.encode() + b"\0"))
        elif t in (b"Z", b"E"):
            return s, got


def raw_query(s: socket.socket, sql: str) -> list[tuple[bytes, bytes]]:
    s.sendall(_msg(b"Q", sql.encode() + b"\0"))
    got = []
    while True:
        t, payload = _read(s)
        got.append((t, payload))
        if t == b"Z":
            return got


class Env:
    def __init__(self, gw: Any, port: int, issuer: Any, records: Path,
                 pg: ScramServer) -> None:
        self.gw, self.port, self.issuer, self.records, self.pg = gw, port, issuer, records, pg

    def token(self, **kw: Any) -> str:
        kw.setdefault("sub", "agent-7")
        kw.setdefault("groups", ["agents"])
        return self.issuer.token(**kw)

    def dsn(self, token: str | None = None, **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "dbname": "analytics",
                 "user": "agent", "password": token or self.token(), "connect_timeout": "10"}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, token: str | None = None, **extra: Any) -> psycopg.Connection:
        return psycopg.connect(self.dsn(token), autocommit=True, **extra)

    def psql(self, sql: str, token: str | None = None, sslmode: str = "prefer"
             ) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = token or self.token()
        return subprocess.run(
            [PSQL, f"host=127.0.0.1 port={self.port} dbname=analytics user=agent "
                   f"sslmode={sslmode}", "-X", "-v", "ON_ERROR_STOP=0", "-c", sql],
            capture_output=True, text=True, env=env, timeout=60)

    def record_lines(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(line) for line in self.records.read_text().splitlines()]


@pytest.fixture
def env(gateway_factory, local_issuer, pgserver: ScramServer, tmp_path: Path) -> Env:
    port = free_port()
    records = tmp_path / "records.jsonl"
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port)
    gw = gateway_factory(rules, env={"WAREHOUSE_PASSWORD": DB_PASSWORD,
                                     "AGENTGATE_TEST_PG_RECORDS": str(records)},
                         script=Path(__file__).with_name("gateway_records.py"))
    wait_port(port)
    return Env(gw, port, local_issuer, records, pgserver)


def test_token_login_and_refusals(env: Env) -> None:
    with env.connect() as c:
        assert c.execute("SELECT name FROM users ORDER BY id").fetchall() == [("Ann",),
                                                                              ("Bob",)]
        assert c.execute("SELECT current_user").fetchone() == ("agent_rw",)
        assert c.info.parameter_status("client_encoding") == "UTF8"
    # psql over TLS with the gateway's certificate, verified against the gateway's CA
    ca = env.gw.confdir / "mitmproxy-ca-cert.pem"
    p = env.psql("SELECT 40 + 2", sslmode=f"verify-full sslrootcert={ca}")
    assert p.returncode == 0 and "42" in p.stdout, p.stderr
    # refused: expired, wrong audience, garbage, other issuer's claims
    for bad, why in [(env.token(expires_in=-60), "expired"),
                     (env.token(aud="someone-else"), "audience"),
                     ("not-a-token", "")]:
        with pytest.raises(psycopg.OperationalError) as e:
            env.connect(bad)
        assert "token refused" in str(e.value) and why in str(e.value).lower()
        s, got = raw_login(env.port, bad)
        s.close()
        assert got[-1][0] == b"E" and fields(got[-1][1])["C"] == "28P01", got
    # the database name must be the one served; startup `options` are not passed on
    s, got = raw_login(env.port, env.token(), database="postgres")
    s.close()
    assert fields(got[-1][1])["C"] == "3D000"
    s, got = raw_login(env.port, env.token(),
                       extra=(("options", "-c search_path=pg_catalog"),
                              ("search_path", "evil"), ("application_name", "lg-thread-9")))
    assert got[-1][0] == b"Z", got
    # our own BackendKeyData, not the server's
    pids = [struct.unpack("!I", p[:4])[0] for t, p in got if t == b"K"]
    rows = raw_query(s, "SELECT current_setting('search_path'), pg_backend_pid()")
    s.close()
    data = [p for t, p in rows if t == b"D"]
    assert data and b"pg_catalog" not in data[0] and b"evil" not in data[0]
    assert b'"$user", public' in data[0]
    assert str(pids[0]).encode() not in data[0]
    # the agent side never sees the real password; neither do the gateway's logs
    assert DB_PASSWORD not in env.gw.logs()


def test_blocked_statements_leave_the_session_usable(env: Env) -> None:
    with env.connect() as c:
        for sql, code, rule in [
            ("CREATE TABLE x (a int)", "42501", "no-ddl"),
            ("DELETE FROM orders", "42501", "no-unbounded-writes"),
            ("UPDATE users SET name = 'z' WHERE 1 = 1", "42501", "no-unbounded-writes"),
            ("SELECT 1; DELETE FROM orders WHERE id = 1", "42501", "guard:multi_statement"),
            ("SELECT pg_read_file('/etc/passwd')", "42501", "guard:dangerous_function"),
            ("COPY users TO PROGRAM 'id'", "42501", "guard:copy_program"),
            ("SELEC 1", "42601", None),
        ]:
            with pytest.raises(psycopg.Error) as e:
                c.execute(sql)
            assert e.value.sqlstate == code, (sql, e.value)
            if rule:
                assert f"rule {rule}" in str(e.value), (sql, str(e.value))
            assert c.execute("SELECT count(*) FROM orders").fetchone() == (2,), sql
        # inside an explicit transaction a refusal aborts it like any error (the server's
        # own state), and ROLLBACK makes the session usable again
        c.execute("BEGIN")
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DROP TABLE users")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.execute("ROLLBACK")
        assert c.execute("SELECT count(*) FROM users").fetchone() == (2,)
    # psql (simple query protocol): refusal then the next command on the same connection
    p = env.psql("DROP TABLE users")
    assert "rule no-ddl" in p.stderr and "migrations" in p.stderr, p.stderr
    with psycopg.connect(env.pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM users").fetchone() == (2,)
    recs = env.record_lines()
    blocked = [r for r in recs if r["decision"] == "block"]
    assert {r["rule"] for r in blocked} >= {"no-ddl", "no-unbounded-writes",
                                           "guard:multi_statement"}
    assert all(r["identity"]["sub"] == "agent-7" for r in recs)
    observed = [r for r in recs if r["rule"] == "watch-users"]
    assert observed and observed[0]["decision"] == "observe"
