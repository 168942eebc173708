"""Test parts for the database path through the real gateway: a real PostgreSQL server
(initdb in a temp dir, free port, scram-sha-256 for every TCP login, a password role the
gateway logs in as) and a mitmdump script that loads the gateway with a statement-record
double writing JSON lines (until PG-B's records hook lands, the real one refuses).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DB_PASSWORD = "db-" + secrets.token_hex(12)   # the real credential: never on the agent side
ADMIN_PASSWORD = "admin-" + secrets.token_hex(12)


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else None


def need_postgres() -> None:
    if not pg_bin("initdb") or not pg_bin("postgres"):
        pytest.skip("PostgreSQL server binaries (Debian package postgresql) not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScramServer:
    """postgres on 127.0.0.1:<free port>, scram-sha-256 only; role agent_rw / DB_PASSWORD
    owning database analytics with tables users and orders."""

    def __init__(self, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-pga-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.ca: Path | None = None

    def _cmd(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> ScramServer:
        need_postgres()
        data = self.dir / "data"
        pw = self.dir / "pw"
        pw.write_text(ADMIN_PASSWORD + "\n")
        tls_args: list[str] = []
        if self.tls:  # a server certificate for localhost/127.0.0.1 from a throwaway CA
            from addons.devkit.standin import make_test_ca
            self.ca, leaf, key = make_test_ca(self.dir / "tls")
            tls_args = ["-c", "ssl=on", "-c", f"ssl_cert_file={leaf}",
                        "-c", f"ssl_key_file={key}"]
        if os.geteuid() == 0:
            for p in [self.dir, pw, *((self.dir / "tls").glob("*"))]:
                shutil.chown(p, "postgres")
            if self.tls:
                shutil.chown(self.dir / "tls", "postgres")
        subprocess.run(self._cmd([pg_bin("initdb"), "-D", str(data), "-U", "admin",
                                  "--pwfile", str(pw), "--auth-host=scram-sha-256",
                                  "--auth-local=scram-sha-256", "--no-sync", "-E", "UTF8",
                                  "--locale=C"]),
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            self._cmd([pg_bin("postgres"), "-D", str(data), "-p", str(self.port), "-h",
                       "127.0.0.1,127.0.0.2" if self.tls else "127.0.0.1", "-k", str(self.dir),
                       "-c", "fsync=off",
                       "-c", "max_connections=60", "-c", "password_encryption=scram-sha-256",
                       *tls_args]),
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))  # noqa: SIM115
        import psycopg
        deadline = time.monotonic() + 30
        while True:
            try:
                con = psycopg.connect(self.admin_dsn("postgres"), connect_timeout=2,
                                      autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start: "
                                       + (self.dir / "log").read_text()[-2000:]) from None
                time.sleep(0.1)
        with con:
            con.execute(f"CREATE ROLE agent_rw LOGIN PASSWORD '{DB_PASSWORD}'")
            con.execute("CREATE DATABASE analytics OWNER agent_rw")
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute("CREATE TABLE users (id int primary key, name text, email text)")
            c.execute("CREATE TABLE orders (id serial primary key, user_id int, total numeric)")
            c.execute("INSERT INTO users VALUES (1, 'Ann', 'ann@example.com'), "
                      "(2, 'Bob', 'bob@example.com')")
            c.execute("INSERT INTO orders (user_id, total) VALUES (1, 10), (2, 20)")
        return self

    def admin_dsn(self, db: str = "analytics") -> str:
        return (f"host=127.0.0.1 port={self.port} user=admin password={ADMIN_PASSWORD} "
                f"dbname={db}")

    def dsn(self) -> str:
        return (f"host=127.0.0.1 port={self.port} user=agent_rw password={DB_PASSWORD} "
                "dbname=analytics")

    def log(self) -> str:
        return (self.dir / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
