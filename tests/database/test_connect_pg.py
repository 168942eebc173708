"""`agentgate connect --postgres`: the real connector (its CLI, as a process) between psql /
psycopg and a TLS database listener that asks for a cleartext password (a minimal stand-in
for the gateway's listener in front of a real PostgreSQL): the token is the password, a
rotated token file is used by the next connection, the client's own password never leaves
the agent side, a listener whose certificate does not verify never gets the token, and a
missing token gives the client a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from addons.devkit.standin import make_test_ca
from tests.database.pgkit_b import PgServer, free_port, pg_bin

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PASSWORD = "client-side-password-never-sent"


class ListenerDouble:
    """TLS, asks for a cleartext password, records it, then relays to a real postgres."""

    def __init__(self, pg: PgServer, certdir: Path) -> None:
        self.pg = pg
        self.ca, leaf, key = make_test_ca(certdir)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(leaf, key)
        self.port = free_port()
        self.passwords: list[str] = []
        self.received = bytearray()
        self.cancels = 0
        self.auth_code = 3  # AuthenticationCleartextPassword; 5 = MD5, 10 = SASL
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ListenerDouble:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._conn, "127.0.0.1", self.port), self.loop).result(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            (n,) = struct.unpack("!I", await r.readexactly(4))
            body = await r.readexactly(n - 4)
            if struct.unpack("!I", body[:4])[0] == 80877102:
                self.cancels += 1
                return
            assert struct.unpack("!I", body[:4])[0] == 80877103, "expected SSLRequest"
            w.write(b"S")
            await w.drain()
            await w.start_tls(self.ctx)
            (n,) = struct.unpack("!I", await r.readexactly(4))
            startup = struct.pack("!I", n) + await r.readexactly(n - 4)
            salt = b"salt" if self.auth_code == 5 else b""
            w.write(b"R" + struct.pack("!II", 8 + len(salt), self.auth_code) + salt)
            await w.drain()
            head = await r.readexactly(5)
            pw = await r.readexactly(struct.unpack("!I", head[1:])[0] - 4)
            self.passwords.append(pw.rstrip(b"\0").decode())
            self.received += startup + head + pw
            sr, sw = await asyncio.open_connection("127.0.0.1", self.pg.port)
            sw.write(startup)

            async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter, rec: bool) -> None:
                while data := await a.read(65536):
                    if rec:
                        self.received += data
                    b.write(data)
                    await b.drain()
            await asyncio.gather(pump(r, sw, True), pump(sr, w, False),
                                 return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    if not pg_bin("initdb"):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    s = PgServer().start()
    yield s
    s.stop()


@pytest.fixture()
def listener(pg: PgServer, tmp_path: Path) -> Iterator[ListenerDouble]:
    d = ListenerDouble(pg, tmp_path / "certs").start()
    yield d
    d.stop()


def _connector(tmp_path: Path, gw_port: int, ca: Path | None, token_file: Path
               ) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, "-m", "addons.cli", "connect", "--gateway",
            f"http://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0",
            "--token-file", str(token_file), "--postgres",
            f"127.0.0.1:{port}=127.0.0.1:{gw_port}"]
    if ca is not None:
        argv += ["--postgres-ca", str(ca)]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on http://" in line:
            return proc, port
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("connector did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _dsn(port: int, pg: PgServer) -> str:
    return (f"host=127.0.0.1 port={port} user={pg.user} dbname=postgres "
            f"password={CLIENT_PASSWORD} sslmode=prefer")


def test_token_is_the_password_and_rotates(pg: PgServer, listener: ListenerDouble,
                                           tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("opaque-token-generation-1\n")
    proc, port = _connector(tmp_path, listener.port, listener.ca, token_file)
    try:
        with psycopg.connect(_dsn(port, pg)) as con:
            assert con.execute("SELECT 40 + 2").fetchone() == (42,)
        token_file.write_text("opaque-token-generation-2\n")
        time.sleep(0.05)
        with psycopg.connect(_dsn(port, pg)) as con:
            assert con.execute("SELECT 'second'").fetchone() == ("second",)
        if pg_bin("psql"):
            out = subprocess.run([pg_bin("psql") or "psql", _dsn(port, pg), "-Atc", "SELECT 7"],
                                 capture_output=True, text=True, timeout=30,
                                 env={**os.environ, "PGPASSWORD": CLIENT_PASSWORD})
            assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    finally:
        _stop(proc)
    assert listener.passwords[:2] == ["opaque-token-generation-1", "opaque-token-generation-2"]
    assert CLIENT_PASSWORD.encode() not in bytes(listener.received)


def test_unverified_listener_never_gets_the_token(pg: PgServer, listener: ListenerDouble,
                                                  tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("opaque-token-secret\n")
    other_ca = make_test_ca(tmp_path / "other")[0]
    proc, port = _connector(tmp_path, listener.port, other_ca, token_file)
    try:
        with pytest.raises(psycopg.OperationalError, match="unreachable.*(certificate|SSL)"):
            psycopg.connect(_dsn(port, pg), connect_timeout=10)
    finally:
        _stop(proc)
    assert listener.passwords == []


def test_no_token_clear_error(pg: PgServer, listener: ListenerDouble, tmp_path: Path) -> None:
    proc, port = _connector(tmp_path, listener.port, listener.ca, tmp_path / "missing")
    try:
        with pytest.raises(psycopg.OperationalError, match="no token for the gateway"):
            psycopg.connect(_dsn(port, pg), connect_timeout=10)
    finally:
        _stop(proc)
    assert listener.passwords == []


def test_remote_listen_needs_opt_in() -> None:
    out = subprocess.run([sys.executable, "-m", "addons.cli", "connect", "--gateway",
                          "http://127.0.0.1:1", "--token-env", "X", "--postgres",
                          "0.0.0.0:5432=gw:15432"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "not loopback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "addons.cli", "connect", "--gateway",
                          "http://127.0.0.1:1", "--token-env", "X", "--postgres", "5432"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "LISTEN=GATEWAY_HOST:PORT" in out.stderr


def test_other_auth_methods_never_get_the_token(pg: PgServer, listener: ListenerDouble,
                                                tmp_path: Path) -> None:
    """A listener (or something in its place) asking for MD5 would get a hash it could
    replay elsewhere; the connector answers only a cleartext request, over verified TLS."""
    listener.auth_code = 5
    token_file = tmp_path / "token"
    token_file.write_text("opaque-token-md5-probe\n")
    proc, port = _connector(tmp_path, listener.port, listener.ca, token_file)
    try:
        with pytest.raises(psycopg.OperationalError, match="authentication method 5"):
            psycopg.connect(_dsn(port, pg), connect_timeout=10)
    finally:
        _stop(proc)
    assert listener.passwords == []
    assert b"opaque-token-md5-probe" not in bytes(listener.received)
