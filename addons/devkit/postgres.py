"""A throwaway PostgreSQL server: initdb in a temp dir, postgres on 127.0.0.1:<free port>,
waited for until it accepts a login, stopped and its directory removed by stop().

One class for every user (the `replicas` command without $AGENTGATE_STATE, the database and
replicas tests, bench/bench_postgres.py), parameterised for what they differ in: the
superuser's name, the auth method (scram-sha-256 with a password, as the gateway meets real
servers, or trust where the test is about rows not logins), TLS with a throwaway CA, and SQL
run as the superuser once it is up (roles, databases). Debian's server binaries
(/usr/lib/postgresql/<ver>/bin, not on PATH) are found by pg_bin(). Never imported by the
gateway.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from addons.devkit.launch import free_port


def pg_bin(name: str) -> str | None:
    """Newest Debian server binary, else one on PATH (other distributions)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def have_postgres() -> bool:
    return bool(pg_bin("initdb") and pg_bin("postgres"))


class Postgres:
    """One throwaway server. `password=None` means trust auth (loopback only, no password);
    otherwise scram-sha-256 for every login. `init_sql` runs as the superuser on database
    `postgres` (autocommit, so CREATE DATABASE works) right after start."""

    def __init__(self, *, superuser: str | None = None, password: str | None = None,
                 tls: bool = False, init_sql: Sequence[str] = (), max_connections: int = 100,
                 prefix: str = "agentgate-pg-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = free_port()
        # trust auth logs in as the superuser by name: initdb's default when not root is the
        # login user, and as root the server runs as `postgres`
        self.superuser = superuser or ("postgres" if os.geteuid() == 0
                                       else os.environ.get("USER") or "postgres")
        self.password = password
        self.tls = tls
        self.ca: Path | None = None
        self.init_sql = list(init_sql)
        self.max_connections = max_connections
        self.proc: subprocess.Popen | None = None

    def _cmd(self, argv: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def conninfo(self, user: str | None = None, password: str | None = None,
                 dbname: str = "postgres", port: int | None = None) -> str:
        """libpq key=value string; the superuser (and its password) by default."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        s = f"host=127.0.0.1 port={port or self.port} user={user} dbname={dbname}"
        return s + (f" password={password}" if password is not None else "")

    def start(self) -> Postgres:
        initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
        if not initdb or not postgres:
            raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install "
                               "postgresql)")
        data = self.dir / "data"
        auth: list[str] = ["-A", "trust"]
        settings: list[str] = ["-c", "fsync=off", "-c", f"max_connections={self.max_connections}"]
        owned = [self.dir]
        pw = self.dir / "pw"
        if self.password is not None:
            pw.write_text(self.password + "\n")  # a file: never on a command line (ps)
            owned.append(pw)
            auth = ["--pwfile", str(pw), "--auth=scram-sha-256"]
            settings += ["-c", "password_encryption=scram-sha-256"]
        hosts = "127.0.0.1"
        if self.tls:  # a server certificate for localhost/127.0.0.1 from a throwaway CA
            from addons.devkit.standin import make_test_ca
            self.ca, leaf, key = make_test_ca(self.dir / "tls")
            settings += ["-c", "ssl=on", "-c", f"ssl_cert_file={leaf}",
                         "-c", f"ssl_key_file={key}"]
            owned += [self.dir / "tls", *(self.dir / "tls").glob("*")]
            hosts = "127.0.0.1,127.0.0.2"  # a second address: a name the cert does not cover
        if os.geteuid() == 0:
            for p in owned:
                shutil.chown(p, "postgres")
        subprocess.run(self._cmd([initdb, "-D", str(data), "-U", self.superuser, *auth,
                                  "--no-sync", "-E", "UTF8", "--locale=C"]),
                       check=True, capture_output=True, timeout=120)
        pw.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self._cmd([postgres, "-D", str(data), "-p", str(self.port), "-h", hosts,
                       "-k", str(self.dir), *settings]),
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))  # noqa: SIM115
        import psycopg
        deadline = time.monotonic() + 30
        while True:
            try:
                con = psycopg.connect(self.conninfo(), connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start: " + self.log()[-2000:]) from None
                time.sleep(0.1)
        with con:
            for sql in self.init_sql:
                con.execute(sql)
        return self

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
