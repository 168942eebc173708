"""The gateway's own login to a TLS database server: verified against the CA the rules
name (verify-full: chain and host name), refused when the server's certificate does not
verify, SCRAM over it; the agent's connection never carries the server's password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from addons.devkit.standin import make_test_ca
from tests.database.pgkit import DB_PASSWORD, ScramServer, free_port, wait_port


@pytest.fixture(scope="module")
def tls_server() -> Iterator[ScramServer]:
    s = ScramServer(tls=True).start()
    yield s
    s.stop()


def _rules(issuer, port: int, pgport: int, ca: Path, pwfile: Path,
           host: str = "localhost") -> str:
    return f"""
{{standin_upstreams}}
{issuer.identity_yaml()}
databases:
  - name: secure
    listen: 127.0.0.1:{port}
    upstream: {host}:{pgport}
    database: analytics
    credential: {{user: agent_rw, password_file: {pwfile}}}
    server_tls: {{mode: verify-full, ca_file: {ca}}}
"""


def test_verified_server_tls(gateway_factory, local_issuer, tls_server: ScramServer,
                             tmp_path: Path) -> None:
    assert tls_server.ca is not None
    pwfile = tmp_path / "dbpw"
    pwfile.write_text(DB_PASSWORD + "\n")
    port = free_port()
    gw = gateway_factory(_rules(local_issuer, port, tls_server.port, tls_server.ca, pwfile),
                         script=Path(__file__).with_name("gateway_records.py"),
                         env={"AGENTGATE_TEST_PG_RECORDS": str(tmp_path / "r.jsonl")})
    wait_port(port)
    dsn = (f"host=127.0.0.1 port={port} dbname=analytics user=agent "
           f"password={local_issuer.token()}")
    with psycopg.connect(dsn) as c:
        # the gateway's session on the server is encrypted
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                         ).fetchone() == (True,)
    # another CA: the server's certificate does not verify, the agent is refused
    other_ca, _, _ = make_test_ca(tmp_path / "other")
    port2 = free_port()
    gateway_factory(_rules(local_issuer, port2, tls_server.port, other_ca, pwfile),
                    script=Path(__file__).with_name("gateway_records.py"),
                    env={"AGENTGATE_TEST_PG_RECORDS": str(tmp_path / "r2.jsonl")})
    wait_port(port2)
    with pytest.raises(psycopg.OperationalError, match="certificate did not verify"):
        psycopg.connect(dsn.replace(f"port={port}", f"port={port2}"), connect_timeout=10)
    # the right CA but an address the certificate does not name (the server listens on
    # 127.0.0.2 too; verify-full checks the name)
    port3 = free_port()
    gateway_factory(_rules(local_issuer, port3, tls_server.port, tls_server.ca,
                           pwfile, host="127.0.0.2"),
                    script=Path(__file__).with_name("gateway_records.py"),
                    env={"AGENTGATE_TEST_PG_RECORDS": str(tmp_path / "r3.jsonl")})
    wait_port(port3)
    with pytest.raises(psycopg.OperationalError, match="IP address mismatch"):
        psycopg.connect(dsn.replace(f"port={port}", f"port={port3}"), connect_timeout=10)
    assert DB_PASSWORD not in gw.logs()
