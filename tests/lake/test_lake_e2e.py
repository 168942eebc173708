"""Two real gateways (mitmdump) ship to one DuckLake whose catalog is in Debian's postgresql
(started here) and whose data is Parquet in a temp directory; `agentgate audit … --lake`
then sees both replicas: one session whose calls went to both, every chain verified across
its segments. The catalog's password appears in no log, no CLI output and no lake row."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
import psycopg
import pytest

from addons.recording import lake
from tests.database.pgkit import ADMIN_PASSWORD, ScramServer
from tests.recording.test_e2e import rules, sdk

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg():
    s = ScramServer().start()
    with psycopg.connect(s.admin_dsn("postgres"), autocommit=True) as c:
        c.execute("CREATE DATABASE lake OWNER admin")
    yield s
    s.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", "audit", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AGENTGATE_RULES": "/nonexistent"})


def test_two_gateways_one_lake_on_postgres(pg, gateway_factory, tmp_path: Path) -> None:
    catalog = f"postgresql://admin:{ADMIN_PASSWORD}@127.0.0.1:{pg.port}/lake"
    data = tmp_path / "parquet"
    gws = []
    for name in ("gw-a", "gw-b"):
        gws.append(gateway_factory(rules(
            f"audit_lake:\n  catalog: {catalog}\n  data: {data}\n  replica: {name}\n"
            "  interval_s: 0.2\n  segment_rows: 3\n")))
    clients = [sdk(gw.proxy_url(), gw.ca_cert, session="thread-1") for gw in gws]
    for i in range(8):  # one conversation spread over both replicas, as a balancer would
        r = clients[i % 2].chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"turn {i}"}])
        assert r.choices[0].message.content == f"echo: turn {i}"
    with pytest.raises(openai.APIConnectionError):  # refused at CONNECT: a record too
        clients[1].with_options(base_url="https://evil.example.org/v1").models.list()

    # live: the shippers send while the gateways run (no restart needed to see records)
    deadline = time.monotonic() + 30
    while True:
        q = cli("query", "--lake", catalog, "--format", "json",
                "SELECT replica, count(*) AS n FROM flows GROUP BY 1 ORDER BY 1")
        counts = ({r["replica"]: r["n"] for r in map(json.loads, q.stdout.splitlines())}
                  if q.returncode == 0 else {})
        if counts == {"gw-a": 4, "gw-b": 5} or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counts == {"gw-a": 4, "gw-b": 5}, (q.stdout, q.stderr)
    for gw in gws:
        assert gw.stop() == 0

    v = cli("verify", "--lake", catalog)
    assert v.returncode == 0, v.stderr
    # segments close every interval_s or at segment_rows (3): how many depends on timing
    assert re.search(r"OK: replica gw-a: 4 records in [2-4] segments", v.stdout), v.stdout
    assert re.search(r"OK: replica gw-b: 5 records in [2-5] segments", v.stdout), v.stdout
    s = cli("sessions", "--lake", catalog, "--format", "json")
    assert s.returncode == 0, s.stderr
    by = {r["session_id"]: r for r in map(json.loads, s.stdout.splitlines())}
    assert by["thread-1"]["llm_calls"] == 8
    exp = cli("query", "--lake", catalog, "--format", "json",
              "SELECT replica, seq FROM flows WHERE session_id = 'thread-1' ORDER BY started")
    order = [(r["replica"], r["seq"]) for r in map(json.loads, exp.stdout.splitlines())]
    assert [rep for rep, _ in order] == ["gw-a", "gw-b"] * 4

    out = tmp_path / "thread-1.mitm"
    e = subprocess.run([sys.executable, "-m", "addons.cli", "export", "--lake", catalog,
                        "--session", "thread-1", "-o", str(out)], cwd=ROOT, text=True,
                       capture_output=True, timeout=120,
                       env={**os.environ, "AGENTGATE_RULES": "/nonexistent"})
    assert e.returncode == 0, e.stderr
    from mitmproxy import io as mio
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert sorted(json.loads(f.request.content)["messages"][0]["content"] for f in flows) \
        == [f"turn {i}" for i in range(8)]

    # tamper with the lake in Postgres + Parquet as its owner could: drop gw-b's first segment
    lk = lake.connect(lake.LakeConfig(catalog=catalog, data=str(data)))
    last = lk.execute("SELECT last_seq FROM lake.segments WHERE replica = 'gw-b' "
                      "AND first_seq = 1").fetchone()[0]
    lk.execute("DELETE FROM lake.flows WHERE replica = 'gw-b' AND seq <= ?", [last])
    lk.execute("DELETE FROM lake.segments WHERE replica = 'gw-b' AND first_seq = 1")
    lk.close()
    v = cli("verify", "--lake", catalog)
    assert v.returncode == 1
    assert (f"replica gw-b: missing segment: records seq 1..{last} are not in the lake"
            in v.stderr)
    assert "OK: replica gw-a" in v.stdout

    # the catalog's password: in no gateway log, no CLI output
    for gw in gws:
        assert ADMIN_PASSWORD not in gw.logs()
    for out in (v, s, exp):
        assert ADMIN_PASSWORD not in out.stdout + out.stderr
    bad = cli("verify", "--lake", catalog.replace(ADMIN_PASSWORD, ADMIN_PASSWORD + "x"))
    assert bad.returncode == 2 and "cannot attach the audit lake" in bad.stderr
    assert ADMIN_PASSWORD not in bad.stderr
