"""What the audit store holds for a fixed set of flows, byte for byte, as before.

A fixed set of flows (chat bodies inline and content-addressed, a conversation re-sending
its history, gzip bodies with and without a secret, metadata with floats the two JSON
encoders spell differently, NaN, bytes, sets, integers past 64 bits, secrets in values,
keys and headers, errors, refusals, certificates, WebSocket messages, an earlier copy of
the flow, a record that is not a flow) goes through the real writer process. The digests of
every table (flows by seq, blobs, approvals, chain checkpoints), of `verify` and of the
export of every session were taken with the store's code at 9216710, before the writer's
CPU work (PERF-AL): the faster code must store exactly the same, in the same order, each
record once — a record lost, reordered, written twice or stored differently changes them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from addons.recording import store
from addons.recording.remote import WriterProcess
from addons.recording.writer import open_db

SECRET = "sk-live-GOLDEN-00000000000000000000000001"
ODD = 'od"d\\se\u00e9cret\u2028xyzw'  # a secret JSON escapes
T0 = 1796212223.612595

# The digests of 9216710's store for flows() (see the module docstring), but for one
# change on purpose: the metadata {SECRET: …} of one flow kept its key whole in the metadata
# column (Scrubber.walk scrubbed values only; tests/recording/test_scrub_keys.py): it is
# [REDACTED] now, which changes that row, so the chain after it, verify's head and the
# export. Blobs and approvals are as they were.
GOLDEN = {
    "flows": "267b0e4634cbf63cdc8bd3f84a47f118f8d6a98f6c7d8dc6644148e455e8aaa0",
    "blobs": "fdb5c22b22251ff83c022f6b60863d441a3a864edc6844ac4476dbce538080ae",
    "approvals": "c58f6f9334792ff0484cfb0801e1cb23075eee22d3eca324174b703345889ee2",
    "verify": "5563821fbf17ce3fa8b956828dd4f484e7d6bc0eaed7cde1d78f75c62196d411",
    "export": "691a2668b6eeae3b250ffab40284d31e030ffda0cf573a5798c3eb29c9d209e7",
}


def _state(i: int, body: bytes, resp: bytes | None, meta: dict[str, Any]) -> dict[str, Any]:
    t = T0 + i
    return {
        "id": f"golden-{i}", "type": "http", "version": 21, "is_replay": None,
        "comment": f"flow {i}", "marked": "", "intercepted": False, "backup": None,
        "timestamp_created": t, "metadata": meta, "error": None, "websocket": None,
        "client_conn": {"id": f"c-{i % 3}", "peername": ("127.0.0.1", 40000 + i),
                        "sockname": ("127.0.0.1", 8080), "tls": True, "alpn": b"",
                        "certificate_list": [], "timestamp_start": t - 0.5},
        "server_conn": {"id": f"s-{i % 3}", "address": ("api.example", 443), "sni":
                        "api.example", "alpn": b"h2", "timestamp_start": t - 0.4,
                        "certificate_list": [b"-----BEGIN CERTIFICATE-----\n" + b"QUJD" * 120
                                             + b"\n-----END CERTIFICATE-----\n"]},
        "request": {"host": "api.example", "port": 443, "method": b"POST", "scheme": b"https",
                    "authority": b"", "path": b"/v1/chat/completions?token=abc&x=1",
                    "http_version": b"HTTP/1.1",
                    "headers": ((b"Content-Type", b"application/json"),
                                (b"authorization", f"Bearer {SECRET}".encode()),
                                (b"User-Agent", b"golden/1.0")),
                    "content": body, "trailers": None, "timestamp_start": t,
                    "timestamp_end": t + 0.001},
        "response": None if resp is None else {
            "status_code": 200, "reason": b"OK", "http_version": b"HTTP/1.1",
            "headers": ((b"Content-Type", b"application/json"), (b"Server", b"golden")),
            "content": resp, "trailers": None, "timestamp_start": t + 0.01,
            "timestamp_end": t + 0.0123456},
    }


def _meta(i: int, **more: Any) -> dict[str, Any]:
    return {"identity": {"sub": f"agent-{i % 4}", "iss": "https://idp.example",
                         "groups": ["agents"]},
            "decision": {"action": "allow", "rule": "models"},
            "findings": {"EMAIL": {"count": i % 3, "strategy": "placeholder"}},
            "upstream": {"name": "openai", "dialect": "openai"},
            "session": f"sess-{i % 4}", **more}


def _chat(messages: list[dict[str, Any]]) -> bytes:
    return json.dumps({"model": "gpt-golden", "messages": messages}).encode()


def flows() -> list[store.Pending | store.Direct]:
    answer = json.dumps({"id": "x", "model": "gpt-golden", "choices": [
        {"message": {"role": "assistant", "content": "ok " * 200}}]}).encode()
    out: list[store.Pending | store.Direct] = []

    def add(st: dict[str, Any], **kw: Any) -> None:
        kw.setdefault("secrets", (f"Bearer {SECRET}", SECRET))
        out.append(store.Pending(state=st, session=st["metadata"].get("session", "none")
                                 if isinstance(st.get("metadata"), dict) else "none",
                                 origin_url="https://api.openai.com/v1/chat/completions",
                                 recorded_at=st["timestamp_created"] + 0.02, **kw))

    history: list[dict[str, Any]] = [{"role": "system", "content": "be brief " * 40}]
    metas: list[dict[str, Any]] = [
        {}, {"score": 1e-05, "tiny": [3.5e-07, 4.05e-05], "big": 1e300, "neg": -0.0},
        {"nan": math.nan, "inf": math.inf}, {"huge": 2 ** 70},
        {"raw": b"\xff\xfebytes", "text": b"plain bytes"}, {"tags": {"only"}},
        {"note": f"holds {SECRET} inside"}, {SECRET: "a secret as a key"},
        {"odd": f"x {ODD} y"}, {"uni": "caf\u00e9 \u4e2d \U0001f600 \x00\x1f\x7f\u2029"},
        {"hook": {"$bytes": "x"}}, {"lone": "a\udc80b"},
        {"approval": {"id": "ap-1", "state": "approved", "approvers": ["ops"],
                      "reason": "ok", "rule": "hold", "requested_at": T0, "decided_at": T0 + 3,
                      "votes": [{"who": "ops", "via": "cli", "at": T0 + 3}]}},
        {"refusal": {"code": "policy", "step": "policy", "rule": "deny-x"}},
        {"recorder": {"streamed": True}}, {"masked_response": b'{"masked": "[EMAIL_1]"}'},
    ]
    for i in range(40):
        history.append({"role": "user", "content": f"turn {i}: " + "words and more " * 30})
        if i % 3 == 0:
            body = _chat(history)  # a conversation: the history again, growing
        elif i % 3 == 1:
            body = _chat([{"role": "user", "content": f"short {i} {SECRET if i % 7 == 1 else ''}"}])
        else:
            body = bytes(range(256)) * (i + 1)  # not JSON, not text
        st = _state(i, body, answer, _meta(i, **metas[i % len(metas)]))
        if i % 5 == 4:
            st["response"]["content"] = gzip.compress(answer.replace(b"ok", SECRET.encode(), 1)
                                                      if i % 10 == 4 else answer, mtime=0)
            st["response"]["headers"] += ((b"Content-Encoding", b"gzip"),)
        if i % 11 == 3:
            st["response"] = None
            st["error"] = {"msg": "Connection killed.", "timestamp": T0 + i + 0.5}
        if i % 13 == 5:
            st["websocket"] = {"messages": [(1, b"hello " + SECRET.encode(), True, T0 + i, False),
                                            (2, b"\x00\xff", False, T0 + i + 0.1, False)],
                               "closed_by_client": True, "close_code": 1000,
                               "close_reason": "", "timestamp_end": T0 + i + 1}
        if i % 17 == 6:
            st["backup"] = dict(_state(i, b"{}", None, {"old": SECRET}), backup=None)
        if i % 9 == 8:
            st["request"]["headers"] += ((b"X-Odd", b'q"uo\\te \xe9\xff'),
                                         (b"Cookie", b"c=" + SECRET.encode()))
        kw: dict[str, Any] = {}
        if i % 8 == 7:
            kw["secrets"] = (SECRET, ODD, "short")
        if i % 19 == 10:
            kw["max_body"] = 2000  # cut: notes with the sha256 of the whole
        add(st, **({"kind": "connect_error"} if i == 15 else {}), **kw)
        if i % 10 == 9:
            out.append(store.Direct(
                row={"id": f"sql-{i}", "session_id": "db", "started": int(T0 * 1e6) + i,
                     "ended": int(T0 * 1e6) + i + 100, "identity_groups": ["db"],
                     "method": "QUERY", "url": "postgres://db/app", "outcome": "forwarded",
                     "findings": "{}", "findings_total": 0, "latency_ms": 0.5,
                     "request_body": f"SELECT {i}".encode(),
                     "metadata": json.dumps({"rows": i, "f": 1e-05})},
                id=f"sql-{i}", session="db", method="QUERY", url="postgres://db/app",
                recorded_at=T0 + i, size=100))
    return out


def _digest(rows: Any) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(row).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def digests(db: Path) -> dict[str, str]:
    con = open_db(db, read_only=True)
    try:
        out = {
            "flows": _digest(con.execute(
                "SELECT * EXCLUDE (started, ended), epoch_us(started), epoch_us(ended) "
                "FROM flows ORDER BY seq").fetchall()),
            "blobs": _digest(con.execute("SELECT * FROM blobs ORDER BY hash").fetchall()),
            "approvals": _digest(con.execute(
                "SELECT * EXCLUDE (requested_at, decided_at), epoch_us(requested_at), "
                "epoch_us(decided_at) FROM approvals ORDER BY id, flow_id").fetchall()),
            "verify": _digest([store.verify(con).to_dict()]),
        }
        sessions = [r[0] for r in con.execute(
            "SELECT DISTINCT session_id FROM flows ORDER BY 1").fetchall()]
        exported = []
        for s in sessions:
            try:
                exported.append(store.export_rows(con, s))
            except Exception as e:  # noqa: BLE001 - a failure is part of what is compared
                exported.append((s, type(e).__name__, str(e)))
        out["export"] = _digest(exported)
        return out
    finally:
        con.close()


def record(db: Path) -> None:
    """The flows through the real writer process, batches as its defaults cut them."""
    w = WriterProcess(db, interval=0.05, serve_queries=False)
    w.start()
    try:
        for p in flows():
            w.submit(p)
        assert w.flush(120), "the writer process did not write everything"
    finally:
        w.close()


def test_the_store_holds_what_it_held_before(tmp_path: Path) -> None:
    db = tmp_path / "audit.duckdb"
    record(db)
    assert digests(db) == GOLDEN
    con = open_db(db, read_only=True)
    try:  # no text column holds the real secret (a key of the metadata did)
        texts = con.execute("SELECT metadata, request_headers, response_headers FROM flows"
                            ).fetchall()
    finally:
        con.close()
    assert not [t for row in texts for t in row if t and SECRET in t]
