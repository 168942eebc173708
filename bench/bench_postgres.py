"""The Postgres path beside direct connections, in the same run: pgbench's select-only script
(`pgbench -S`) direct vs through the gateway (TPS ratio, p50/p99 latency added), and rows/s
of a masked 100k-row SELECT (through the gateway and, for the masker's own cost, the result
masker alone on the same rows).

Real parts: Debian's PostgreSQL (addons/devkit/postgres.py, scram-sha-256), the real gateway
(mitmdump with addons/gateway.py: token login, SQL policy, result masking, DuckDB records),
a local OIDC provider for the token, pgbench and psycopg as clients. Both sides use
sslmode=disable on loopback (the gateway accepts a cleartext token on loopback), so the
comparison is the relay's cost, not TLS's.

Run alone: `python -m bench.bench_postgres [--quick]`.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from addons.devkit.postgres import Postgres, pg_bin
from bench import harness as h

ROWS = 100_000
CLIENTS, THREADS = 4, 2
DB_PASSWORD = "bench-" + secrets.token_hex(8)
ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)


def start_server() -> Postgres:
    """addons/devkit/postgres.py's server: scram-sha-256, superuser admin, role agent_rw
    owning `analytics` (what pgbench and the gateway log in as)."""
    return Postgres(superuser="admin", password=ADMIN_PASSWORD, max_connections=60,
                    prefix="agentgate-bench-pgsrv-",
                    init_sql=[f"CREATE ROLE agent_rw LOGIN PASSWORD '{DB_PASSWORD}'",
                              "CREATE DATABASE analytics OWNER agent_rw"]).start()


def dsn(server: Postgres, user: str = "agent_rw", password: str = DB_PASSWORD,
        db: str = "analytics", port: int | None = None) -> str:
    # cleartext on loopback on both sides: the comparison is the relay's cost, not TLS's
    return server.conninfo(user, password, db, port) + " sslmode=disable"


def pgbench(port: int, user: str, password: str, seconds: int, logdir: Path, tag: str,
            protocol: str = "simple") -> dict[str, Any]:
    """`pgbench -S` for `seconds`; TPS from its summary, latency percentiles from its
    per-transaction log (-l)."""
    prefix = logdir / tag
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable", PGHOST="127.0.0.1",
               PGPORT=str(port), PGUSER=user, PGDATABASE="analytics")
    p = subprocess.run([pg_bin("pgbench") or "pgbench", "-S", "-n", "-c", str(CLIENTS),
                        "-j", str(THREADS), "-T", str(seconds), "-M", protocol, "-l",
                        f"--log-prefix={prefix}"], capture_output=True, text=True, env=env,
                       timeout=seconds + 120, cwd=str(logdir))
    if p.returncode != 0:
        raise RuntimeError(f"pgbench ({tag}) failed: {p.stderr.strip()[-800:]}")
    tps = None
    for line in p.stdout.splitlines():
        if line.startswith("tps =") and tps is None:
            tps = float(line.split("=")[1].split()[0])
    lat: list[float] = []
    for f in glob.glob(f"{prefix}.*"):
        for line in Path(f).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6:
                lat.append(int(parts[2]) / 1000.0)  # µs -> ms
    lat.sort()
    return {"tps": tps, "transactions": len(lat),
            "p50_ms": statistics.median(lat) if lat else None,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] if lat else None}


def fetch_all(dsn: str, sql: str, binary: bool) -> tuple[float, int, Any]:
    import psycopg
    with psycopg.connect(dsn) as con:
        t0 = time.perf_counter()
        rows = con.cursor(binary=binary).execute(sql).fetchall()
        secs = time.perf_counter() - t0
    return secs, len(rows), rows[0]


SELECT = "SELECT id, email, card, note FROM masked_rows"


def stall(dsn: str, sql: str) -> dict[str, Any]:
    """`SELECT 1` in a loop on a second connection through the gateway while the first
    fetches `sql` (a big masked result): the worst and p99 latency show whether the relay
    streaming one result stalls the other connections (they share one event loop)."""
    import threading

    import psycopg
    lat: list[float] = []
    done = threading.Event()
    with psycopg.connect(dsn, autocommit=True) as probe:
        probe.execute("SELECT 1")

        def big() -> None:
            try:
                fetch_all(dsn, sql, False)
            finally:
                done.set()
        t = threading.Thread(target=big, daemon=True)
        t.start()
        while not done.is_set():
            t0 = time.perf_counter()
            probe.execute("SELECT 1").fetchone()
            lat.append((time.perf_counter() - t0) * 1000)
        t.join()
    lat.sort()
    return {"probes": len(lat), "max_ms": lat[-1] if lat else None,
            "p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] if lat else None,
            "p50_ms": statistics.median(lat) if lat else None}


def masker_alone(n: int) -> dict[str, Any]:
    """The result masker in-process on n DataRows shaped like the table's (no I/O)."""
    from addons.database import rowmask
    from addons.masking.config import MaskingConfig
    fields = [rowmask.Field(b"id", 0, 0, 23, 4, -1, 0)] + [
        rowmask.Field(name, 0, 0, 25, -1, -1, 0) for name in (b"email", b"card", b"note")]
    rd = rowmask.build_row_description(fields)
    rows = [rowmask.build_data_row([str(i).encode(), f"user{i}@example.com".encode(),
                                    b"4111 1111 1111 1111",
                                    f"customer {i} asked for a refund on order {i * 7}".encode()])
            for i in range(n)]
    m = rowmask.ResultMasker(rowmask.masker_for(MaskingConfig()), None,
                             rowmask.ColumnRules([rowmask.ColumnRule("card", "partial")]))
    m.client(b"Q", SELECT.encode() + b"\0", None)
    t0 = time.perf_counter()
    m.server(b"T", rd)
    first = m.server(b"D", rows[0])
    for r in rows[1:]:
        m.server(b"D", r)
    m.server(b"C", b"SELECT %d\0" % n)
    m.server(b"Z", b"I")
    secs = time.perf_counter() - t0
    shown = [v.decode() if v is not None else None
             for v in rowmask.parse_data_row(first[0][1])]
    return {"rows": n, "seconds": secs, "rows_per_s": n / secs, "first_row": shown}


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run(quick: bool = False) -> dict[str, Any]:
    from addons.devkit.idp import DemoIdP
    from addons.devkit.launch import start_gateway

    if not pg_bin("pgbench"):
        raise RuntimeError("pgbench not installed (apt-get install postgresql-contrib / "
                           "postgresql)")
    seconds = 3 if quick else 10
    rows_n = 20_000 if quick else ROWS
    tmp = Path(tempfile.mkdtemp(prefix="agentgate-bench-pg-"))
    server = idp = gw = None
    try:
        server = start_server()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=DB_PASSWORD)
        subprocess.run([pg_bin("pgbench") or "pgbench", "-i", "-s", "1", "-q", "-h",
                        "127.0.0.1", "-p", str(server.port), "-U", "agent_rw", "analytics"],
                       check=True, capture_output=True, env=env, timeout=300)
        import psycopg
        with psycopg.connect(dsn(server), autocommit=True) as con:
            con.execute("CREATE TABLE masked_rows (id int, email text, card text, note text)")
            con.execute("INSERT INTO masked_rows SELECT i, 'user' || i || '@example.com', "
                        "'4111 1111 1111 1111', 'customer ' || i || ' asked for a refund on "
                        "order ' || (i * 7) FROM generate_series(1, %s) i", [rows_n])
        idp = DemoIdP().start()
        listen = h.free_port()
        rules_dir = tmp / "rules"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(
            "upstreams: []\n" + idp.identity_yaml() +
            f"databases:\n  - name: warehouse\n    listen: 127.0.0.1:{listen}\n"
            f"    upstream: 127.0.0.1:{server.port}\n    database: analytics\n"
            "    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}\n"
            "    server_tls: {mode: disable}\n"
            "    mask_columns:\n      - {column: masked_rows.card, strategy: partial}\n")
        gw = start_gateway(rules_dir, h.make_confdir(tmp / "conf"), tmp / "data",
                           tmp / "gateway.log", env={"WAREHOUSE_PASSWORD": DB_PASSWORD})
        _wait_port(listen)
        token = idp.token(sub="bench-agent", groups=["bench"], expires_in=3600)
        out: dict[str, Any] = {"seconds_per_run": seconds, "clients": CLIENTS,
                               "threads": THREADS, "rows": rows_n, "pgbench": {}}
        for proto in ("simple", "prepared"):
            direct = pgbench(server.port, "agent_rw", DB_PASSWORD, seconds, tmp,
                             f"direct-{proto}", proto)
            via = pgbench(listen, "agent", token, seconds, tmp, f"gateway-{proto}", proto)
            out["pgbench"][proto] = {
                "direct": direct, "gateway": via,
                "tps_ratio": (via["tps"] / direct["tps"]) if direct["tps"] and via["tps"]
                else None,
                "added_p50_ms": (via["p50_ms"] - direct["p50_ms"])
                if via["p50_ms"] is not None and direct["p50_ms"] is not None else None}
        gdsn = dsn(server, "agent", token, port=listen)
        sel: dict[str, Any] = {}
        for binary in (False, True):
            fmt = "binary" if binary else "text"
            d_s, d_n, _ = fetch_all(dsn(server), SELECT, binary)
            g_s, g_n, first = fetch_all(gdsn, SELECT, binary)
            if d_n != rows_n or g_n != rows_n:
                raise RuntimeError(f"row count mismatch: {d_n} direct, {g_n} gateway")
            if "@example.com" in str(first[1]) or "4111 1111 1111 1111" == first[2]:
                raise RuntimeError(f"rows not masked through the gateway: {first!r}")
            sel[fmt] = {"direct_s": d_s, "gateway_s": g_s, "direct_rows_per_s": d_n / d_s,
                        "gateway_rows_per_s": g_n / g_s, "first_row": [str(v) for v in first]}
        out["masked_select"] = sel
        out["stall"] = stall(gdsn, SELECT)
        out["masker_alone"] = masker_alone(rows_n)
        return out
    finally:
        if gw is not None:
            gw.stop()
        if idp is not None:
            idp.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return fmt.format(v) if isinstance(v, int | float) else "n/a"


def markdown(res: dict[str, Any]) -> str:
    out = [f"## Postgres path: pgbench -S and a masked {res['rows']:,}-row SELECT "
           "(bench/bench_postgres.py)", "",
           f"Real PostgreSQL, the real gateway (token login, SQL policy, result masking, "
           f"DuckDB records), sslmode=disable on loopback both ways. pgbench: select-only "
           f"script, {res['clients']} clients, {res['threads']} threads, "
           f"{res['seconds_per_run']} s per run, direct and through the gateway back to back.",
           "", "| protocol | direct TPS | gateway TPS | ratio | direct p50 ms | gateway p50 ms "
           "| added p50 ms | direct p99 ms | gateway p99 ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for proto, r in res["pgbench"].items():
        d, g = r["direct"], r["gateway"]
        out.append(f"| {proto} | {_f(d['tps'])} | {_f(g['tps'])} | "
                   f"{_f(r['tps_ratio'], '{:.2f}')} | {_f(d['p50_ms'], '{:.3f}')} | "
                   f"{_f(g['p50_ms'], '{:.3f}')} | {_f(r['added_p50_ms'], '{:.3f}')} | "
                   f"{_f(d['p99_ms'], '{:.3f}')} | {_f(g['p99_ms'], '{:.3f}')} |")
    out += ["", f"Masked SELECT of {res['rows']:,} rows (id, email, card under a `partial` "
            "column rule, a free-text note), fetched whole with psycopg:", "",
            "| format | direct rows/s | gateway rows/s (masked) | gateway s |", "|---|---|---|---|"]
    for fmt, r in res["masked_select"].items():
        out.append(f"| {fmt} | {_f(r['direct_rows_per_s'], '{:,.0f}')} | "
                   f"{_f(r['gateway_rows_per_s'], '{:,.0f}')} | {_f(r['gateway_s'], '{:.2f}')} |")
    st = res.get("stall")
    if st:
        out += ["", f"Another connection's `SELECT 1` in a loop while the masked SELECT streams "
                f"(text) through the same gateway: p50 {_f(st['p50_ms'], '{:.2f}')} ms, p99 "
                f"{_f(st['p99_ms'], '{:.2f}')} ms, worst {_f(st['max_ms'], '{:.2f}')} ms "
                f"({st['probes']} probes; the relay yields the event loop after each ms of "
                f"masking)."]
    m = res["masker_alone"]
    first = res["masked_select"].get("text", {}).get("first_row")
    out += ["", f"The result masker alone (rowmask.ResultMasker, same rows, in-process, one "
            f"core): {_f(m['rows_per_s'], '{:,.0f}')} rows/s.",
            f"First row as the agent got it: `{json.dumps(first)}`."]
    return "\n".join(out)


if __name__ == "__main__":
    r = run(quick="--quick" in sys.argv)
    print(markdown(r))
