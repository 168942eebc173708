"""addons/database/records.py + the recorder's records that are not HTTP flows: SQL statements
land in the same DuckDB `flows` table as HTTP flows, one hash chain across both, which
`agentgate audit verify` (the real CLI) walks and which detects an edited SQL row; gateway
secrets never reach the store; a store that is not open refuses (fail closed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
from mitmproxy.test import tflow

from addons.config.holder import RulesHolder
from addons.database.records import make_statement_recorder, statement_row
from addons.recording import store
from addons.recording.addon import Recorder, RecorderUnavailable

ROOT = Path(__file__).resolve().parents[2]
DB_PASSWORD = "pg-real-password-0000000000"


def _stmt(**kw: object) -> dict:
    base = {
        "db": "warehouse", "upstream": "db.internal:5432", "database": "analytics",
        "identity": {"sub": "agent-7", "iss": "https://idp.example", "groups": ["analysts"]},
        "session": "thread-42", "peer": "127.0.0.1:50000",
        "sql": "SELECT email FROM users WHERE id = $1", "kinds": ["SELECT"],
        "tables": ["users"], "functions": [], "decision": "allow", "rule": None,
        "approval": None, "rows": 3, "command": "SELECT 3", "error": None,
        "findings": {"EMAIL": {"count": 3, "strategy": "placeholder"}},
        "started": 1_800_000_000.0, "ended": 1_800_000_000.25, "duration_ms": 250.0}
    base.update(kw)
    return base


@pytest.fixture()
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    monkeypatch.setenv("WAREHOUSE_PASSWORD", DB_PASSWORD)
    holder = RulesHolder()
    rules = SimpleNamespace(upstreams=(), databases=(SimpleNamespace(
        password_env="WAREHOUSE_PASSWORD", password_file=None),))
    holder.rules = rules  # type: ignore[assignment]
    rec = Recorder(holder)
    rec.start(tmp_path / "audit.duckdb")
    assert rec.writer is not None
    yield rec
    rec.done()


def _verify(db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", "audit", "verify", "--db",
                           str(db), "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sql_rows_chain_with_http_flows(recorder: Recorder, tmp_path: Path) -> None:
    record = make_statement_recorder(recorder)
    assert record.unavailable() is None
    flow = tflow.tflow(resp=True)
    flow.metadata["session"] = "thread-42"
    recorder.response(flow)  # an HTTP flow through the recorder's own hook
    record(_stmt())
    record(_stmt(sql="DELETE FROM users", kinds=["DELETE"], decision="block",
                 rule="no-unbounded-delete", rows=None, command=None,
                 error="42501: blocked by rule no-unbounded-delete", findings=0))
    record(_stmt(sql="UPDATE users SET email = $1 WHERE id = $2", kinds=["UPDATE"],
                 decision="approve", rule="writes-need-approval",
                 approval={"id": "ap-1", "state": "denied", "approvers": ["rev@x"],
                           "reason": "no", "rule": "writes-need-approval"}))
    record(_stmt(sql=f"SELECT '{DB_PASSWORD}'", error=f"XX000: bad {DB_PASSWORD}"))
    flow2 = tflow.tflow(resp=True)
    recorder.response(flow2)
    assert recorder.writer is not None and recorder.writer.flush(30)
    recorder.done()

    db = tmp_path / "audit.duckdb"
    out = _verify(db)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res.get("ok", res.get("result", {}).get("ok")) is True

    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT method, url, upstream, session_id, decision, rule, outcome, "
                       "refusal_code, error, identity_sub, latency_ms, "
                       "CAST(request_body AS VARCHAR), metadata, approval_id, findings_total "
                       "FROM flows ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["GET", "SQL", "SQL", "SQL", "SQL", "GET"]
    sel = rows[1]
    assert sel[1] == "postgresql://warehouse/analytics" and sel[2] == "warehouse"
    assert sel[3] == "thread-42" and sel[4] == "allow" and sel[6] == "forwarded"
    assert sel[9] == "agent-7" and sel[10] == 250.0 and sel[14] == 3
    assert sel[11] == "SELECT email FROM users WHERE id = $1"
    meta = json.loads(sel[12])
    assert meta["kind"] == "pg" and meta["pg"]["statement_kind"] == "SELECT"
    assert meta["pg"]["tables"] == ["users"] and meta["pg"]["rows"] == 3
    assert rows[2][6] == "refused" and rows[2][7] == "sql_blocked"
    assert rows[3][6] == "refused" and rows[3][13] == "ap-1"
    appr = con.execute("SELECT id, decision, approvers FROM approvals").fetchall()
    assert appr == [("ap-1", "denied", ["rev@x"])]
    # the gateway's database password never lands in the store
    dump = con.execute("SELECT * FROM flows").fetchall()
    assert DB_PASSWORD not in repr(dump)
    con.close()

    # export writes the HTTP flows (a statement is not a mitmproxy flow) and still works
    mitm = tmp_path / "all.mitm"
    out = subprocess.run([sys.executable, "-m", "addons.cli", "export", "--db", str(db),
                          "--all", "-o", str(mitm)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    from mitmproxy import io as mio
    with mitm.open("rb") as f:
        flows = list(mio.FlowReader(f).stream())
    assert [fl.request.method for fl in flows] == ["GET", "GET"]

    # an edited SQL row breaks the chain
    con = duckdb.connect(str(db))
    con.execute("UPDATE flows SET request_body = 'SELECT 1' WHERE seq = 2")
    con.close()
    out = _verify(db)
    assert out.returncode == 1 and "seq 2" in out.stdout


def test_store_not_open_refuses(tmp_path: Path) -> None:
    holder = RulesHolder()
    holder.rules = SimpleNamespace(upstreams=(), databases=())  # type: ignore[assignment]
    rec = Recorder(holder)  # never started: no writer
    record = make_statement_recorder(rec)
    assert record.unavailable()  # the relay asks before it forwards a statement
    with pytest.raises(RecorderUnavailable):
        record(_stmt())


def test_row_is_bounded() -> None:
    big = "SELECT " + "x" * 100_000
    row = statement_row(_stmt(sql=big, tables=[f"t{i}" for i in range(5000)]), (), 1024)
    assert len(row["request_body"]) == 1024 and "sha256" in row["request_body_note"]
    assert row["request_size"] == len(big)
    assert len(json.loads(row["metadata"])["pg"]["tables"]) == 200
    assert set(row) == set(store.COLUMN_NAMES) - {"seq", "prev_hash", "hash"}
