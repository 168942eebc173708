"""Test parts for the database path through the real gateway: a real PostgreSQL server
(addons/devkit/postgres.py: initdb in a temp dir, free port; here scram-sha-256 for every
login and a password role the gateway logs in as) and a mitmdump script that loads the
gateway with a statement-record double writing JSON lines (until PG-B's records hook lands,
the real one refuses).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time

import pytest

from addons.devkit.launch import free_port
from addons.devkit.postgres import Postgres, have_postgres, pg_bin

__all__ = ["ADMIN_PASSWORD", "DB_PASSWORD", "WAREHOUSE", "ScramServer", "free_port",
           "need_postgres", "pg_bin", "wait_port"]

DB_PASSWORD = "db-" + secrets.token_hex(12)   # the real credential: never on the agent side
ADMIN_PASSWORD = "admin-" + secrets.token_hex(12)

# The rules' start for the tests' database `warehouse` (a str.format template: fill
# standin_upstreams, identity, listen, pgport); a test appends the database's other keys.
WAREHOUSE = """
{standin_upstreams}
{identity}
databases:
  - name: warehouse
    listen: 127.0.0.1:{listen}
    upstream: 127.0.0.1:{pgport}
    database: analytics
    credential: {{user: agent_rw, password_env: WAREHOUSE_PASSWORD}}
    server_tls: {{mode: disable}}
"""


def need_postgres() -> None:
    if not have_postgres():
        pytest.skip("PostgreSQL server binaries (Debian package postgresql) not installed")


class ScramServer(Postgres):
    """addons/devkit/postgres.py's server with scram-sha-256 for every login, superuser
    admin / ADMIN_PASSWORD, role agent_rw / DB_PASSWORD owning database analytics with tables
    users and orders (what the database tests query)."""

    def __init__(self, tls: bool = False) -> None:
        super().__init__(superuser="admin", password=ADMIN_PASSWORD, tls=tls,
                         max_connections=60, prefix="agentgate-pga-",
                         init_sql=[f"CREATE ROLE agent_rw LOGIN PASSWORD '{DB_PASSWORD}'",
                                   "CREATE DATABASE analytics OWNER agent_rw"])

    def start(self) -> ScramServer:
        need_postgres()
        super().start()
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute("CREATE TABLE users (id int primary key, name text, email text)")
            c.execute("CREATE TABLE orders (id serial primary key, user_id int, total numeric)")
            c.execute("INSERT INTO users VALUES (1, 'Ann', 'ann@example.com'), "
                      "(2, 'Bob', 'bob@example.com')")
            c.execute("INSERT INTO orders (user_id, total) VALUES (1, 10), (2, 20)")
        return self

    def admin_dsn(self, db: str = "analytics") -> str:
        return self.conninfo(dbname=db)

    def dsn(self) -> str:
        return self.conninfo("agent_rw", DB_PASSWORD, "analytics")


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
