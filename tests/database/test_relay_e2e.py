"""The Postgres path end to end: real postgres (scram-sha-256), the real gateway (mitmdump
with the suite), psql and psycopg 3 as the agent's clients, OIDC tokens from a local issuer.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.database.pgkit import DB_PASSWORD, WAREHOUSE, ScramServer, free_port, wait_port

PSQL = "/usr/bin/psql"


@pytest.fixture(scope="module")
def pgserver() -> Iterator[ScramServer]:
    s = ScramServer().start()
    yield s
    s.stop()


RULES = WAREHOUSE.replace("databases:\n", "approvals:\n  default_timeout: 30\ndatabases:\n",
                          1) + """    max_connections: 4
    sql:
      - {{name: no-ddl, action: block, match: {{kinds: [DDL, DCL]}},
         message: schema changes go through migrations}}
      - {{name: no-unbounded-writes, action: block, match: {{unbounded: true}}}}
      - {{name: orders-writes-reviewed, action: approve, approvers: [dba],
         match: {{kinds: [INSERT, UPDATE, DELETE], tables: [orders]}}}}
      - {{name: watch-users, action: observe, match: {{tables: [users]}}}}
  - name: warehouse-tls
    listen: 127.0.0.1:{listen_tls}
    upstream: 127.0.0.1:{pgport}
    database: analytics
    credential: {{user: agent_rw, password_env: WAREHOUSE_PASSWORD}}
    server_tls: {{mode: disable}}
    client_tls: {{required: true}}
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
              extra: tuple[tuple[str, str], ...] = (), minor: int = 0
              ) -> tuple[socket.socket, list]:
    """Cleartext (loopback) login by hand; returns the socket and the messages up to
    ReadyForQuery or the first ErrorResponse."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    params = [("user", "agent"), ("database", database), *extra]
    body = struct.pack("!I", (3 << 16) | minor) + b"".join(
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
                 pg: ScramServer, tls_port: int = 0) -> None:
        self.gw, self.port, self.issuer, self.records, self.pg = gw, port, issuer, records, pg
        self.tls_port = tls_port

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
def env(gateway_factory, local_issuer, pgserver: ScramServer, tmp_path: Path
        ) -> Iterator[Env]:
    port, tls_port = free_port(), free_port()
    records = tmp_path / "records.jsonl"
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port, listen_tls=tls_port)
    gw = gateway_factory(rules, env={"WAREHOUSE_PASSWORD": DB_PASSWORD,
                                     "AGENTGATE_TEST_PG_RECORDS": str(records)},
                         script=Path(__file__).with_name("gateway_records.py"))
    wait_port(port)
    wait_port(tls_port)
    yield Env(gw, port, local_issuer, records, pgserver, tls_port)
    # shown only when the test failed (captured output)
    print("---- gateway log\n" + gw.logs()[-6000:])


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


def _api_url(gw: Any) -> str:
    import re
    deadline = time.monotonic() + 10
    while not (m := re.search(r"approvals API listening at (http://\S+)", gw.logs())):
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.05)
    return m.group(1)


def _api(url: str, method: str, path: str, token: str,
         body: dict[str, Any] | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _pending(url: str, token: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, out = _api(url, "GET", "/approvals", token)
        assert status == 200, out
        if out["approvals"]:
            return out["approvals"][0]
        time.sleep(0.1)
    raise AssertionError("no pending approval")


def test_held_write_approved_and_denied(env: Env) -> None:
    url = _api_url(env.gw)
    dba = env.issuer.token(sub="dora", groups=["dba"])
    result: dict[str, Any] = {}

    def write(key: str, sql: str, params: tuple[Any, ...]) -> None:
        try:
            with env.connect() as c:
                c.execute(sql, params)
                result[key] = c.execute("SELECT count(*) FROM orders").fetchone()[0]
        except psycopg.Error as e:
            result[key] = e

    # approved: the INSERT (extended protocol, a bound value) waits, then runs
    t = threading.Thread(target=write, args=("ok", "INSERT INTO orders (user_id, total) "
                                             "VALUES (%s, 99.5)", (1,)))
    t.start()
    a = _pending(url, dba)
    assert a["rule"] == "orders-writes-reviewed" and a["requester"] == "agent-7"
    assert a["what"]["kind"] == "sql" and a["what"]["upstream"] == "warehouse"
    assert a["what"]["statement_kind"] == "INSERT" and a["what"]["tables"] == ["orders"]
    assert "99.5" not in json.dumps(a)  # literals masked for reviewers
    # meanwhile another connection is not held
    with env.connect() as other:
        assert other.execute("SELECT count(*) FROM users").fetchone() == (2,)
    assert t.is_alive()
    assert _api(url, "POST", f"/approvals/{a['id']}/approve", dba)[0] == 200
    t.join(20)
    assert result["ok"] == 3
    # denied: the agent gets 42501 with the reason, nothing written, session usable
    t = threading.Thread(target=write, args=("no", "DELETE FROM orders WHERE total > %s",
                                             (50,)))
    t.start()
    a = _pending(url, dba)
    assert _api(url, "POST", f"/approvals/{a['id']}/deny", dba,
                {"reason": "not during the audit"})[0] == 200
    t.join(20)
    err = result["no"]
    assert isinstance(err, psycopg.errors.InsufficientPrivilege), err
    assert "denied" in str(err) and "not during the audit" in str(err)
    with psycopg.connect(env.pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM orders").fetchone() == (3,)
        direct.execute("DELETE FROM orders WHERE total = 99.5")
        direct.commit()
    recs = [r for r in env.record_lines() if r["rule"] == "orders-writes-reviewed"]
    assert [r["approval"]["state"] for r in recs] == ["approved", "denied"], recs


def test_cancel_request_reaches_the_server(env: Env) -> None:
    with env.connect() as c:
        done: dict[str, Any] = {}

        def slow() -> None:
            try:
                c.execute("SELECT count(*) FROM generate_series(1, 2000000000)")
                done["r"] = "finished"
            except psycopg.Error as e:
                done["r"] = e
        t = threading.Thread(target=slow)
        t.start()
        with psycopg.connect(env.pg.admin_dsn(), autocommit=True) as watch:  # until it runs
            deadline = time.monotonic() + 30
            while not watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query "
                    "LIKE '%generate_series(1, 2000000000)%' AND pid <> pg_backend_pid()"
            ).fetchone()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        c.cancel()
        t.join(30)
        assert isinstance(done.get("r"), psycopg.errors.QueryCanceled), done
        assert c.execute("SELECT 1").fetchone() == (1,)
    # a statement held for approval is cancelled at the gateway (Ctrl-C in psql)
    with env.connect() as c:
        got: dict[str, Any] = {}

        def held() -> None:
            try:
                c.execute("INSERT INTO orders (user_id, total) VALUES (1, 5)")
                got["r"] = "ran"
            except psycopg.Error as e:
                got["r"] = e
        t = threading.Thread(target=held)
        t.start()
        deadline = time.monotonic() + 10
        while "holding sql for approval" not in env.gw.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        c.cancel()
        t.join(15)
        assert isinstance(got.get("r"), psycopg.errors.QueryCanceled), got
        assert c.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    # a cancel request with a wrong key is dropped (nothing to cancel, nothing leaks)
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    s.sendall(struct.pack("!IIII", 16, 80877102, 12345, 67890))
    assert s.recv(100) == b""
    s.close()


def test_bad_wire_bytes_close_with_nothing_forwarded(env: Env) -> None:
    insert = _msg(b"Q", b"INSERT INTO users VALUES (77, 'x', 'x@example.com')\0")
    cases = {
        "unknown type first": b"Z\0\0\0\x04" + insert,
        "length below 4": b"Q\0\0\0\x02" + insert,
        "above the limit": b"Q\x7f\xff\xff\xff" + insert[5:],
        "password after login": _msg(b"p", b"x\0") + insert,
        "truncated bind": _msg(b"B", b"\0\0\0\x01") + _msg(b"E", b"\0\0\0\0\0") + insert,
        "query not NUL-terminated": _msg(b"Q", b"INSERT INTO users VALUES (78, 'y', 'y')")
                                    + insert,
    }
    log_start = len(env.pg.log())
    for name, data in cases.items():
        s, got = raw_login(env.port, env.token())
        assert got[-1][0] == b"Z", got
        s.sendall(data)
        rest = b""
        try:
            while chunk := s.recv(65536):
                rest += chunk
        except (ConnectionError, TimeoutError):
            pass
        s.close()
        assert b"INSERT" not in rest, name
    # garbage before login: closed, the server never sees a connection from the gateway
    for data in (b"GET / HTTP/1.1\r\n\r\n", struct.pack("!II", 9, 80877103) + b"x",
                 struct.pack("!II", 100000, 196608)):
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        s.sendall(data)
        try:
            while s.recv(65536):
                pass
        except (ConnectionError, TimeoutError):
            pass
        s.close()
    with psycopg.connect(env.pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM users WHERE id > 2").fetchone() == (0,)
    # the server saw none of it: a forwarded bad message would be a protocol error there
    server_log = env.pg.log()[log_start:]
    assert "invalid" not in server_log and "unexpected" not in server_log, server_log
    assert "Traceback" not in env.gw.logs()
    with env.connect() as c:  # the gateway keeps serving
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_pipeline_and_prepared_statements(env: Env) -> None:
    with env.connect() as c:
        # server-side prepared statements (psycopg prepares after prepare_threshold uses)
        for i in range(3):
            cur = c.execute("SELECT name FROM users WHERE id = %s", (1 + i % 2,), prepare=True)
            assert cur.fetchone()[0] in ("Ann", "Bob")
        # pipeline mode: a refusal in the middle fails what follows up to the sync, as the
        # server does for any error, and the connection carries on
        with pytest.raises(psycopg.errors.InsufficientPrivilege), c.pipeline() as p:
            c1 = c.execute("SELECT 1")
            c.execute("DROP TABLE orders")
            c.execute("SELECT 2")
            p.sync()
        assert c1.fetchone() == (1,)
        with c.pipeline():
            a = c.execute("SELECT count(*) FROM users")
            b = c.execute("SELECT count(*) FROM orders")
        assert a.fetchone() == (2,) and b.fetchone() == (2,)
        # SQL-level PREPARE/EXECUTE is judged by what it runs
        c.execute("PREPARE wipe AS DELETE FROM users WHERE id = $1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("PREPARE wipe_all AS DELETE FROM users")
        assert c.execute("SELECT count(*) FROM users").fetchone() == (2,)


def test_huge_and_deeply_nested_sql_refused_and_the_gateway_lives(env: Env) -> None:
    """~70k nested terms crash libpg_query's JSON output on an 8 MiB stack (a process
    crash = every agent's connections gone): long SQL is parsed in a big-stack thread, and
    SQL above max_sql_bytes (256 KiB) is refused unparsed."""
    with env.connect() as c:
        with pytest.raises(psycopg.errors.SyntaxError, match="deeply nested"):
            c.execute("SELECT " + "1+" * 100_000 + "1")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="max_sql_bytes"):
            c.execute("SELECT " + "1+" * 140_000 + "1")
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_connection_ends_when_its_token_expires(env: Env) -> None:
    exp = time.time() + 8
    with env.connect(env.token(expires_in=8)) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
        time.sleep(max(0.0, exp - time.time()) + 1.0)
        with pytest.raises(psycopg.OperationalError, match="expired"):
            c.execute("SELECT 2")


def test_max_connections(env: Env) -> None:
    conns = [env.connect() for _ in range(4)]
    try:
        s, got = raw_login(env.port, env.token())
        s.close()
        assert got[-1][0] == b"E" and fields(got[-1][1])["C"] == "53300", got
    finally:
        for c in conns:
            c.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back once the gateway saw the closes
        try:
            with env.connect() as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_missing_hook_refuses_connections(gateway_factory, local_issuer,
                                          pgserver: ScramServer) -> None:
    """Fail closed: without the statement-record hook nothing is served unrecorded."""
    port = free_port()
    rules = RULES.format(standin_upstreams="{standin_upstreams}",
                         identity=local_issuer.identity_yaml(), listen=port,
                         pgport=pgserver.port, listen_tls=free_port())
    gateway_factory(rules, env={"WAREHOUSE_PASSWORD": DB_PASSWORD,
                                "AGENTGATE_TEST_PG_RECORDS": "missing"},
                    script=Path(__file__).with_name("gateway_records.py"))
    wait_port(port)
    s, got = raw_login(port, local_issuer.token(sub="agent-7", groups=["agents"]))
    s.close()
    assert got[-1][0] == b"E", got
    f = fields(got[-1][1])
    assert f["C"] == "08006" and "not installed" in f["M"], f


def test_startup_negotiation(env: Env) -> None:
    # GSSENCRequest -> N, then an ordinary startup on the same connection
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(struct.pack("!II", 8, 80877104))
    assert s.recv(1) == b"N"
    s.close()
    # bytes pipelined behind an SSLRequest would be read as if they came over TLS
    # (CVE-2021-23214): refused, no 'S'
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(struct.pack("!II", 8, 80877103) + _msg(b"Q", b"SELECT 1\0"))
    try:
        answer = s.recv(100)
    except ConnectionError:
        answer = b""
    s.close()
    assert answer == b"", answer
    # protocol 3.2 and a _pq_ option: NegotiateProtocolVersion(3.0, [option]) first
    s, got = raw_login(env.port, env.token(), extra=(("_pq_.future", "1"),), minor=2)
    s.close()
    assert got[0][0] == b"v", got
    newest, n = struct.unpack("!II", got[0][1][:8])
    assert newest == 0 and n == 1 and got[0][1][8:] == b"_pq_.future\0"
    assert got[-1][0] == b"Z"
    # a TLS-only listener: no password asked in clear text, TLS works
    s, got = raw_login(env.tls_port, env.token())
    s.close()
    assert fields(got[-1][1])["C"] == "28000" and "TLS" in fields(got[-1][1])["M"]
    assert not any(t == b"R" for t, _ in got)
    with psycopg.connect(env.dsn().replace(f"port={env.port}", f"port={env.tls_port}")
                         + " sslmode=require") as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_copy_from_stdin(env: Env) -> None:
    with env.connect() as c:
        with c.cursor().copy("COPY users (id, name, email) FROM STDIN") as cp:
            cp.write_row((50, "Cy", "cy@example.com"))
        assert c.execute("SELECT name FROM users WHERE id = 50").fetchone() == ("Cy",)
        c.execute("DELETE FROM users WHERE id = 50")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="copy_server_file"):
            c.execute("COPY users FROM '/etc/passwd'")


def _until_ready(s: socket.socket) -> list[tuple[bytes, bytes]]:
    got = []
    while True:
        t, payload = _read(s)
        got.append((t, payload))
        if t == b"Z":
            return got


def test_nothing_unjudged_executes(env: Env) -> None:
    """A statement runs only if the gateway judged its SQL: a portal it never saw bound, or
    SQL EXECUTE of a statement it never saw prepared, is refused (the connection stays
    usable)."""
    s, got = raw_login(env.port, env.token())
    assert got[-1][0] == b"Z"
    s.sendall(_msg(b"E", b"nope\0" + struct.pack("!i", 0)) + _msg(b"S", b""))
    got = _until_ready(s)
    errs = [fields(p) for t, p in got if t == b"E"]
    assert errs and errs[0]["C"] == "42501" and "unknown_statement" in errs[0]["M"], got
    got = raw_query(s, "EXECUTE nosuch(1)")
    errs = [fields(p) for t, p in got if t == b"E"]
    assert errs and errs[0]["C"] == "42501" and "unknown_statement" in errs[0]["M"], got
    # SQL EXECUTE of a statement prepared with Parse is judged by the Parse's SQL
    s.sendall(_msg(b"P", b"wipe_all\0DELETE FROM users\0\0\0") + _msg(b"S", b""))
    assert any(t == b"E" for t, _ in _until_ready(s))  # refused at Parse: never prepared
    s.sendall(_msg(b"P", b"one\0SELECT name FROM users WHERE id = $1\0\0\0")
              + _msg(b"S", b""))
    assert [t for t, _ in _until_ready(s)] == [b"1", b"Z"]
    got = raw_query(s, "EXECUTE one(1)")
    assert any(t == b"D" and b"Ann" in p for t, p in got), got
    s.close()
    watched = [r for r in env.record_lines() if r["sql"] and r["sql"].startswith("EXECUTE")]
    assert watched and watched[-1]["rule"] == "watch-users"  # the Parse's tables count


def test_skipped_parse_does_not_decide_a_later_bind(env: Env) -> None:
    """A Parse the server skipped (an earlier message of its pipeline failed) defines
    nothing: when the name is later PREPAREd in SQL, a Bind of it is judged by the PREPARE —
    here an INSERT on orders, so each execution is held for approval again."""
    url = _api_url(env.gw)
    dba = env.issuer.token(sub="dora", groups=["dba"])
    s, got = raw_login(env.port, env.token())
    assert got[-1][0] == b"Z"
    s.sendall(_msg(b"P", b"\0SELECT 1/0\0\0\0") + _msg(b"B", b"\0\0\0\0\0\0\0\0")
              + _msg(b"E", b"\0\0\0\0\0") + _msg(b"P", b"s\0SELECT 1\0\0\0") + _msg(b"S", b""))
    assert any(t == b"E" for t, _ in _until_ready(s))  # division by zero; Parse s skipped
    # PREPARE s in SQL: held (INSERT on orders), approved
    s.sendall(_msg(b"Q", b"PREPARE s AS INSERT INTO orders (user_id, total) VALUES (1, 3)\0"))
    a = _pending(url, dba)
    assert _api(url, "POST", f"/approvals/{a['id']}/approve", dba)[0] == 200
    assert _until_ready(s)[-1][0] == b"Z"
    # Bind s + Execute: judged as the INSERT it is, so held again; denied, nothing written
    s.sendall(_msg(b"B", b"\0s\0\0\0\0\0\0\0") + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
    a2 = _pending(url, dba)
    assert a2["id"] != a["id"] and a2["what"]["statement_kind"] == "PREPARE"
    assert _api(url, "POST", f"/approvals/{a2['id']}/deny", dba, {"reason": "no"})[0] == 200
    # (the result masker does not follow Binds of SQL-PREPAREd statements and closes the
    # connection there, fail closed; what matters here is that the execution was held)
    rest = b""
    try:
        while chunk := s.recv(65536):
            rest += chunk
            if b"Z\0\0\0\x05" in rest:
                break
    except (ConnectionError, TimeoutError):
        pass
    s.close()
    assert b"INSERT 0 1" not in rest
    with psycopg.connect(env.pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM orders").fetchone() == (2,)


def test_a_slow_reader_keeps_the_gateway_bounded(env: Env) -> None:
    """The server's rows are read only as fast as the agent takes them: a 300 MB result to
    a client that does not read leaves the gateway's memory near where it was."""
    from tests.hostile.edgekit import rss_kb
    s, got = raw_login(env.port, env.token())
    assert got[-1][0] == b"Z"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    before = rss_kb(env.gw)
    s.sendall(_msg(b"Q", b"SELECT repeat('x', 150) FROM generate_series(1, 2000000)\0"))
    time.sleep(4)
    grown = rss_kb(env.gw) - before
    s.close()
    assert grown < 80_000, f"gateway grew by {grown} KiB while the client did not read"
    with env.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_a_rules_reload_applies_to_open_connections(env: Env) -> None:
    with env.connect() as c, env.connect() as other:
        assert c.execute("SELECT count(*) FROM orders").fetchone() == (2,)
        rules = env.gw.rules_dir / "rules.yaml"
        text = rules.read_text()
        version = env.gw.logs().count("rules reloaded")
        rules.write_text(text.replace(
            "      - {name: no-ddl,",
            "      - {name: orders-closed, action: block, match: {tables: [orders]}}\n"
            "      - {name: no-ddl,", 1))
        deadline = time.monotonic() + 20
        while env.gw.logs().count("rules reloaded") == version:
            assert time.monotonic() < deadline, env.gw.logs()[-2000:]
            time.sleep(0.1)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="orders-closed"):
            c.execute("SELECT count(*) FROM orders")
        assert c.execute("SELECT count(*) FROM users").fetchone() == (2,)
        # the database's server side changed: open connections end, new ones follow
        rules.write_text(rules.read_text().replace("max_connections: 4",
                                                   "max_connections: 5", 1)
                         .replace("credential: {user: agent_rw, password_env: "
                                  "WAREHOUSE_PASSWORD}\n    server_tls: {mode: disable}\n"
                                  "    max_connections: 5",
                                  "credential: {user: agent_rw, password_env: "
                                  "WAREHOUSE_PASSWORD}\n    server_tls: {mode: disable}\n"
                                  "    max_connections: 5\n    mask: false", 1))
        version += 1
        deadline = time.monotonic() + 20
        while env.gw.logs().count("rules reloaded") == version:
            assert time.monotonic() < deadline, env.gw.logs()[-2000:]
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError, match="changed; reconnect"):
            other.execute("SELECT 1")
    # the masking detectors changed: open connections (masker built with the old) end
    with env.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
        (env.gw.rules_dir / "masking.yaml").write_text(
            "masking:\n  custom:\n    - {name: TICKET, pattern: 'TCK-[0-9]{6}'}\n")
        version += 1
        deadline = time.monotonic() + 20
        while env.gw.logs().count("rules reloaded") == version:
            assert time.monotonic() < deadline, env.gw.logs()[-2000:]
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError, match="masking rules changed"):
            c.execute("SELECT 1")
    with env.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_statements_refused_while_the_recorder_is_down(env: Env) -> None:
    """Nothing runs that cannot be recorded: with the audit store down every statement
    (simple and extended protocol) is refused in band with 58000 naming the recorder,
    nothing reaches the table, and the same session works once the store is back."""
    down = Path(str(env.records) + ".down")
    with env.connect() as c:
        before = c.execute("SELECT count(*) FROM users").fetchone()
        down.touch()
        try:
            for sql, params in [("INSERT INTO users (id, name) VALUES (901, 'x')", None),
                                ("INSERT INTO users (id, name) VALUES (%s, %s)", (902, "y")),
                                ("SELECT 1", None)]:
                with pytest.raises(psycopg.Error) as e:
                    c.execute(sql, params)
                assert e.value.sqlstate == "58000", (sql, e.value)
                assert "audit recorder" in str(e.value)
        finally:
            down.unlink()
        assert c.execute("SELECT count(*) FROM users").fetchone() == before
        assert c.execute("SELECT %s::int", (5,)).fetchone() == (5,)
    with psycopg.connect(env.pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM users WHERE id > 900").fetchone() == (0,)


def test_records_carry_findings_per_entity(env: Env) -> None:
    with env.connect() as c:
        row = c.execute("SELECT 'ann@example.com' AS a, 'bo@example.org' AS b, "
                        "'4111 1111 1111 1111' AS c").fetchone()
    assert row[0].startswith("[EMAIL") and "4111 1111 1111 1111" not in row
    rec = [r for r in env.record_lines() if r["kinds"] == ["SELECT"] and r["rows"] == 1][-1]
    assert rec["findings"] == 3
    by = rec["findings_by_entity"]
    assert by["EMAIL"]["count"] == 2 and sum(e["count"] for e in by.values()) == 3, by


def test_sql_prepared_statement_bound_by_the_protocol(env: Env) -> None:
    """SQL PREPARE then a protocol Bind of that name: rows come back masked when the portal
    is described (libpq does), refused in band when nothing described them, and the
    connection is never closed; a name re-PREPAREd with other columns is not masked by the
    columns a Parse + Describe gave the old one."""
    s, got = raw_login(env.port, env.token())
    assert got[-1][0] == b"Z"
    assert raw_query(s, "PREPARE byid AS SELECT name, email FROM users WHERE id = $1")[-1][0] \
        == b"Z"
    one = struct.pack("!hh", 1, 0) + struct.pack("!h", 1) + struct.pack("!i", 1) + b"1" \
        + struct.pack("!h", 0)
    # Bind + Describe portal + Execute: masked rows
    s.sendall(_msg(b"B", b"\0byid\0" + one) + _msg(b"D", b"P\0")
              + _msg(b"E", b"\0" + struct.pack("!i", 0)) + _msg(b"S", b""))
    got = _until_ready(s)
    rows = [p for t, p in got if t == b"D"]
    assert [t for t, _ in got] == [b"2", b"T", b"D", b"C", b"Z"], got
    assert b"ann@example.com" not in rows[0] and b"[EMAIL_" in rows[0]
    # Bind + Execute without any Describe: refused in band, the session goes on
    s.sendall(_msg(b"B", b"\0byid\0" + one) + _msg(b"E", b"\0" + struct.pack("!i", 0))
              + _msg(b"S", b""))
    got = _until_ready(s)
    errs = [fields(p) for t, p in got if t == b"E"]
    assert errs and errs[0]["C"] == "0A000" and "described" in errs[0]["M"], got
    assert not any(b"ann@example.com" in p for _, p in got)
    # a Parse + Describe of a name, then SQL DEALLOCATE + PREPARE with other columns, then a
    # Bind: the old description must not decide how the new rows are read
    s.sendall(_msg(b"P", b"swap\0SELECT id, name FROM users WHERE id = $1\0\0\0")
              + _msg(b"D", b"Sswap\0") + _msg(b"S", b""))
    assert _until_ready(s)[-1][0] == b"Z"
    raw_query(s, "DEALLOCATE swap")
    raw_query(s, "PREPARE swap AS SELECT email, id FROM users WHERE id = $1")
    binary = one[:-2] + struct.pack("!hh", 1, 1)  # results in binary format
    s.sendall(_msg(b"B", b"\0swap\0" + binary) + _msg(b"E", b"\0" + struct.pack("!i", 0))
              + _msg(b"S", b""))
    got = _until_ready(s)
    assert not any(b"ann@example.com" in p for _, p in got), got
    assert any(t == b"E" and "described" in fields(p)["M"] for t, p in got), got
    got = raw_query(s, "SELECT 1")
    assert any(t == b"D" for t, _ in got)
    s.close()
