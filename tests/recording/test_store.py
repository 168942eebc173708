"""Pure audit-store logic: record building, redaction, hash chain, tamper detection,
retention, read-only queries (DuckDB in a temp dir, no mitmproxy)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest

from addons.recording import store

SECRET = "sk-proj-GATEWAYREALKEY0000000000000000000000000000000000"


def state(i: int = 0, *, body: bytes = b'{"model":"gpt-4o-mini","messages":[]}',
          headers=None, resp: bool = True, meta=None, t: float | None = None) -> dict:
    t = time.time() if t is None else t
    return {
        "id": f"flow-{i}", "type": "http", "is_replay": None, "comment": "", "marked": "",
        "timestamp_created": t, "metadata": meta or {}, "error": None,
        "client_conn": {"peername": ("127.0.0.1", 5000 + i), "id": "c1"},
        "server_conn": {"address": ("127.0.0.1", 9443)},
        "request": {"host": "127.0.0.1", "port": 9443, "method": b"POST", "scheme": b"https",
                    "authority": b"", "path": b"/v1/chat/completions",
                    "http_version": b"HTTP/1.1",
                    "headers": tuple(headers or ((b"content-type", b"application/json"),
                                                 (b"authorization", f"Bearer {SECRET}".encode()))),
                    "content": body, "trailers": None, "timestamp_start": t,
                    "timestamp_end": t + 0.001},
        "response": {"status_code": 200, "reason": b"OK", "http_version": b"HTTP/1.1",
                     "headers": ((b"content-type", b"application/json"),
                                 (b"set-cookie", b"sid=abc")),
                     "content": b'{"model":"gpt-4o-mini","choices":[]}', "trailers": None,
                     "timestamp_start": t + 0.01, "timestamp_end": t + 0.02} if resp else None,
    }


def pending(i: int = 0, **kw) -> store.Pending:
    session = kw.pop("session", "s1")
    return store.Pending(state=state(i, **kw), session=session,
                         origin_url="https://api.openai.com/v1/chat/completions",
                         secrets=(SECRET, f"Bearer {SECRET}"),
                         redact=store.REDACT_HEADERS)


@pytest.fixture
def con(tmp_path: Path):
    c = duckdb.connect(str(tmp_path / "a.duckdb"))
    store.init_schema(c)
    yield c
    c.close()


def fill(con, n: int, t0: float | None = None, step: float = 0.0) -> tuple[int, str]:
    head = store.head(con)
    rows = []
    for i in range(n):
        t = None if t0 is None else t0 + i * step
        rows.append(store.build_row(pending(i, t=t)))
    return store.append(con, rows, head)


# ---------------------------------------------------------------- records
def test_build_row_redacts_and_describes() -> None:
    p = pending(1, body=f'{{"model":"gpt-4o-mini","echo":"{SECRET}"}}'.encode(),
                meta={"identity": {"sub": "agent-1", "iss": "https://idp", "groups": ["bots"]},
                      "upstream": {"name": "openai", "dialect": "openai"},
                      "decision": {"action": "allow", "rule": "r1"},
                      "findings": {"EMAIL": {"count": 2, "strategy": "placeholder"},
                                   "PHONE": {"count": 1}},
                      "approval": {"id": "ap1", "state": "approved", "rule": "bulk",
                                   "approvers": ["alice"], "reason": "ok",
                                   "decided_at": time.time()}})
    row = store.build_row(p)
    assert row["url"] == "https://api.openai.com/v1/chat/completions"
    assert row["upstream_url"] == "https://127.0.0.1:9443/v1/chat/completions"
    assert row["host"] == "api.openai.com" and row["model"] == "gpt-4o-mini"
    assert row["identity_sub"] == "agent-1" and row["identity_groups"] == ["bots"]
    assert json.loads(row["findings"]) == {"EMAIL": 2, "PHONE": 1}
    assert row["findings_total"] == 3 and row["approval_id"] == "ap1"
    assert row["outcome"] == "forwarded" and row["status"] == 200
    hdrs = dict(json.loads(row["request_headers"]))
    assert hdrs["authorization"] == store.REDACTED
    assert dict(json.loads(row["response_headers"]))["set-cookie"] == store.REDACTED
    assert SECRET.encode() not in row["request_body"]
    assert SECRET.encode() not in row["flow_state"]
    # the state's header blocks are the header columns' (stored once): redacted there too
    st = store.row_state(row)
    assert dict(map(tuple, st["request"]["headers"]))[b"authorization"] == b"[REDACTED]"
    assert dict(map(tuple, st["response"]["headers"]))[b"set-cookie"] == b"[REDACTED]"
    assert abs(row["latency_ms"] - 20.0) < 1


def test_secret_in_compressed_body_is_scrubbed() -> None:
    import gzip

    def gz(b: bytes, enc: str) -> bytes:
        assert enc == "gzip"
        return gzip.decompress(b)

    hdrs = ((b"content-encoding", b"gzip"), (b"content-type", b"application/json"))
    p = pending(2, body=gzip.compress(f'{{"k":"{SECRET}"}}'.encode()), headers=hdrs)
    row = store.build_row(p, decode=gz)
    assert SECRET.encode() not in row["request_body"]
    assert row["request_body"] == b'{"k":"[REDACTED]"}'
    st = store.row_state(row)
    assert b"content-encoding" not in [k for k, _ in st["request"]["headers"]]
    assert st["request"]["content"] == b'{"k":"[REDACTED]"}'


def test_state_roundtrip_is_exact() -> None:
    st = state(5, body=b"\xff\x00binary", meta={"session": "s", "n": 1.0, "b": b"x"})
    row = store.build_row(store.Pending(st, "s"))
    back = store.row_state(row)
    assert back["request"]["content"] == b"\xff\x00binary"
    assert back["request"]["method"] == b"POST" and back["request"]["host"] == "127.0.0.1"
    assert back["metadata"] == {"session": "s", "n": 1.0, "b": b"x"}
    assert [tuple(h) for h in back["response"]["headers"]][0] == \
        (b"content-type", b"application/json")


def test_outcomes() -> None:
    st = state(3, resp=False)
    st["error"] = {"msg": "Connection killed.", "timestamp": time.time()}
    assert store.build_row(store.Pending(st, "s")).get("outcome") == "killed"
    st["error"] = {"msg": "upstream reset", "timestamp": time.time()}
    assert store.build_row(store.Pending(st, "s"))["outcome"] == "error"
    refused = state(4, meta={"refusal": {"status": 403, "code": "blocked", "step": "policy",
                                         "rule": "no-pii"}})
    row = store.build_row(store.Pending(refused, "s"))
    assert (row["outcome"], row["rule"], row["refusal_code"]) == ("refused", "no-pii", "blocked")


def test_redact_query() -> None:
    assert store.redact_query("https://x/y?key=abc&q=1") == "https://x/y?key=[REDACTED]&q=1"
    assert store.redact_query("https://x/y") == "https://x/y"


# ---------------------------------------------------------------- chain and tampering
def test_chain_verifies(con) -> None:
    head = fill(con, 10)
    r = store.verify(con)
    assert r.ok and r.count == 10 and (r.head_seq, r.head_hash) == head


def test_edit_body_is_caught(con) -> None:
    fill(con, 6)
    con.execute("UPDATE flows SET response_body = 'forged' WHERE seq = 4")
    r = store.verify(con)
    assert not r.ok and r.seq == 4 and r.problem.startswith("edited")
    assert r.count == 3


def test_edit_with_recomputed_hash_is_caught(con) -> None:
    fill(con, 6)
    con.execute("UPDATE flows SET status = 201 WHERE seq = 3")
    row = dict(zip(store.COLUMN_NAMES, con.execute(
        f"SELECT {store.SELECT_FOR_VERIFY} FROM flows WHERE seq = 3").fetchone(), strict=True))
    con.execute("UPDATE flows SET hash = ? WHERE seq = 3", [store.chain_hash(row["prev_hash"],
                                                                          row)])
    r = store.verify(con)
    assert not r.ok and r.seq == 4 and "edited or deleted" in r.problem


def test_delete_is_caught(con) -> None:
    fill(con, 6)
    con.execute("DELETE FROM flows WHERE seq = 3")
    r = store.verify(con)
    assert not r.ok and r.seq == 4 and r.problem.startswith("deleted")


def test_delete_last_is_caught(con) -> None:
    fill(con, 6)
    con.execute("DELETE FROM flows WHERE seq = 6")
    r = store.verify(con)
    assert not r.ok and "end" in r.problem


def test_swap_two_rows_is_caught(con) -> None:
    fill(con, 6)
    # swap the positions of records 2 and 5
    con.execute("UPDATE flows SET seq = -1 WHERE seq = 2")
    con.execute("UPDATE flows SET seq = 2 WHERE seq = 5")
    con.execute("UPDATE flows SET seq = 5 WHERE seq = -1")
    r = store.verify(con)
    assert not r.ok and r.seq == 2 and r.problem.startswith("reordered")


def test_swap_contents_is_caught(con) -> None:
    fill(con, 6)
    cols = [c for c in store.COLUMN_NAMES if c != "seq"]
    a = con.execute(f"SELECT {', '.join(cols)} FROM flows WHERE seq = 2").fetchone()
    b = con.execute(f"SELECT {', '.join(cols)} FROM flows WHERE seq = 3").fetchone()
    sets = ", ".join(f"{c} = ?" for c in cols)
    con.execute(f"UPDATE flows SET {sets} WHERE seq = 2", list(b))
    con.execute(f"UPDATE flows SET {sets} WHERE seq = 3", list(a))
    r = store.verify(con)
    assert not r.ok and r.seq == 2


def test_approval_table_edit_is_caught(con) -> None:
    meta = {"approval": {"id": "ap9", "state": "approved", "rule": "bulk",
                         "approvers": ["bob"], "reason": "fine"}}
    store.append(con, [store.build_row(store.Pending(state(1, meta=meta), "s"))],
                 store.head(con))
    assert store.verify(con).ok
    assert con.execute("SELECT decision, approvers FROM approvals").fetchall() == \
        [("approved", ["bob"])]
    con.execute("UPDATE approvals SET decision = 'denied'")
    r = store.verify(con)
    assert not r.ok and "approval ap9" in r.problem


# ---------------------------------------------------------------- retention
def test_retention_keeps_the_chain_provable(con) -> None:
    now = time.time()
    fill(con, 5, t0=now - 10 * 86400, step=1)  # old
    fill(con, 3, t0=now - 60, step=1)  # recent
    assert store.apply_retention(con, 7, now=now) == 5
    assert con.execute("SELECT min(seq), count(*) FROM flows").fetchone() == (6, 3)
    r = store.verify(con)
    assert r.ok and r.count == 3 and r.checkpoint_seq == 5
    # appending continues the chain after retention
    fill(con, 2)
    assert store.verify(con).ok
    # deleting the first kept record is still caught
    con.execute("DELETE FROM flows WHERE seq = 6")
    assert not store.verify(con).ok


def test_retention_of_everything_and_nothing(con) -> None:
    now = time.time()
    fill(con, 3, t0=now - 30 * 86400, step=1)
    assert store.apply_retention(con, 0, now=now) == 0  # 0 days: keep forever
    assert store.apply_retention(con, 7, now=now) == 3
    assert store.verify(con).ok
    head = store.head(con)
    assert head[0] == 3
    fill(con, 1)
    r = store.verify(con)
    assert r.ok and r.count == 1 and r.head_seq == 4


# ---------------------------------------------------------------- queries
def test_read_only_queries(con) -> None:
    fill(con, 2)
    cols, rows = store.run_query(con, "SELECT count(*) AS n FROM flows")
    assert cols == ["n"] and rows == [(2,)]
    for sql in ("DELETE FROM flows", "UPDATE flows SET status = 1", "DROP TABLE flows",
                "COPY flows TO 'x.csv'", "ATTACH 'x.duckdb'", "SELECT 1; DELETE FROM flows",
                "PRAGMA enable_profiling", "SET threads = 1", "CHECKPOINT"):
        with pytest.raises(ValueError):
            store.run_query(con, sql)
    assert store.verify(con).ok


def test_sessions_summary(con) -> None:
    rows = [store.build_row(pending(i, session="a")) for i in range(3)]
    blocked = state(9, meta={"refusal": {"code": "blocked", "status": 403},
                             "findings": {"EMAIL": {"count": 4}}})
    rows.append(store.build_row(store.Pending(blocked, "b")))
    store.append(con, rows, store.head(con))
    cols, out = store.sessions(con)
    res = {r[0]: dict(zip(cols, r, strict=True)) for r in out}
    assert res["a"]["flows"] == 3 and res["a"]["blocks"] == 0
    assert res["b"]["blocks"] == 1 and res["b"]["findings"] == 4
    assert [r[0] for r in store.export_rows(con, "a")] == ["flow-0", "flow-1", "flow-2"]


def test_restored_response_is_stored_masked() -> None:
    st = state(6, meta={"masked_response": b'{"text":"<EMAIL_1>"}',
                        "findings": {"EMAIL": {"count": 1}}})
    st["response"]["content"] = b'{"text":"jane@example.com"}'
    row = store.build_row(store.Pending(st, "s"))
    assert row["response_body"] == b'{"text":"<EMAIL_1>"}'
    assert b"jane@example.com" not in row["flow_state"]
    assert "masked_response" not in row["metadata"]
    assert "restored" in row["response_body_note"]
