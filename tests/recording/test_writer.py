"""The audit writer cannot be poisoned (issue 11, class 9): oversized values are capped,
a batch the store refuses is split down to the one bad row (stored reduced), and a failing
store recovers by itself. Real DuckDB in a temp dir, no mitmproxy."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from addons.recording import store, writer
from addons.recording.writer import AuditWriter
from tests.recording.test_store import SECRET, pending, state


def make_writer(tmp_path: Path, **kw: Any) -> AuditWriter:
    w = AuditWriter(tmp_path / "a.duckdb", build=store.build_row, serve_queries=False,
                    interval=0.01, **kw)
    w.start()
    return w


def read(w: AuditWriter, sql: str) -> list[tuple]:
    assert w._con is not None
    return w._con.execute(sql).fetchall()


def verify(w: AuditWriter) -> store.VerifyResult:
    assert w._con is not None
    return store.verify(w._con)


# ---------------------------------------------------------------- capping
def test_large_bodies_are_stored_as_prefix_size_and_sha256() -> None:
    body = b'{"model":"gpt-4o-mini","x":"' + b"A" * 300_000 + b'"}'
    p = pending(1, body=body)
    row = store.build_row(p)
    assert p.max_body == 256 * 1024  # the default
    assert store.row_body(row, "request") == body[:p.max_body]
    note = row["request_body_note"]
    assert f"{len(body)} bytes" in note and hashlib.sha256(body).hexdigest() in note
    assert row["request_size"] == len(body)
    # the flow state keeps the same prefix and lists the cut with the whole's sha256
    st = store.row_state(row)
    assert st["request"]["content"] == body[:p.max_body]
    (cut,) = st["metadata"]["agentgate_truncated"]
    assert cut == {"path": ".request.content", "size": len(body), "kept": p.max_body,
                   "sha256": hashlib.sha256(body).hexdigest()}


def test_every_copy_of_a_body_in_the_state_is_capped() -> None:
    big = b"B" * 5000
    st = state(2, meta={"blob": big, "text": "t" * 5000})
    st["backup"] = {"request": dict(st["request"], content=big)}
    st["websocket"] = {"messages": [[1, True, big, 0.0]]}
    st["request"] = dict(st["request"], headers=((b"x-huge", big),))
    row = store.build_row(store.Pending(state=st, session="s", max_body=1000))
    assert len(row["flow_state"]) < 10_000
    stored = store.load_state(row["flow_state"])
    paths = {c["path"] for c in stored["metadata"]["agentgate_truncated"]}
    assert {".backup.request.content", ".websocket.messages[0][2]", ".metadata.blob",
            ".metadata.text", ".request.headers[0][1]"} <= paths
    meta = json.loads(row["metadata"])
    assert len(meta["blob"]) == 1000 and meta["agentgate_truncated"]


def test_secret_is_scrubbed_before_the_cut() -> None:
    # a secret straddling the cut must not survive as a prefix
    body = b"x" * 990 + f"Bearer {SECRET}".encode() + b"y" * 100
    row = store.build_row(store.Pending(state=state(3, body=body), session="s",
                                        secrets=(SECRET,), max_body=1000))
    assert SECRET[:10].encode() not in row["request_body"]
    assert SECRET[:10].encode() not in row["flow_state"]


# ---------------------------------------------------------------- poisoned rows
def test_a_row_the_store_refuses_is_stored_reduced_and_nothing_is_blocked(
        tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    try:
        # Bigger than DuckDB's memory_limit (64 MB) once inside the columnar INSERT: the
        # record the old default (16 MiB body + whole flow state) made from a 12 MB request.
        huge = b'{"model":"m","x":"' + b"Z" * (40 * 1024 * 1024) + b'"}'
        for i in range(3):
            w.submit(pending(i))
        w.submit(store.Pending(state=state(3, body=huge), session="s1",
                               max_body=64 * 1024 * 1024))
        for i in range(4, 8):
            w.submit(pending(i))
        assert w.flush(60), w.failure
        assert w.failure is None and w.overloaded() is None
        ids = [r[0] for r in read(w, "SELECT id FROM flows ORDER BY seq")]
        assert ids == [f"flow-{i}" for i in range(8)]  # 0 records lost, order kept
        (bad,) = read(w, "SELECT request_body, flow_state, request_body_note, error, "
                         "request_size FROM flows WHERE id = 'flow-3'")
        assert bad[0] is None and bad[1] is None
        assert "not stored" in bad[2] and "audit record reduced" in bad[3]
        assert bad[4] == len(huge)
        assert verify(w).ok
    finally:
        w.close()


def test_a_row_that_fails_even_reduced_stays_queued_in_order(tmp_path: Path,
                                                            monkeypatch) -> None:
    w = make_writer(tmp_path)
    real = store.append
    broken = {"on": True}

    def flaky(con, rows, last, *more, **kw):
        if broken["on"]:
            raise duckdb.IOException("injected: the disk went away")
        return real(con, rows, last, *more, **kw)

    try:
        monkeypatch.setattr(store, "append", flaky)
        for i in range(5):
            w.submit(pending(i))
        with w._cv:
            w._cv.notify()
        assert not w.flush(1)
        assert w.failure and "injected" in w.failure
        assert "injected" in (w.overloaded() or "")  # the addon refuses flows: 503
        assert w.backlog == 5
        broken["on"] = False
        assert w.flush(30)
        assert w.failure is None and w.overloaded() is None
        ids = [r[0] for r in read(w, "SELECT id FROM flows ORDER BY seq")]
        assert ids == [f"flow-{i}" for i in range(5)]
        assert read(w, "SELECT count(*) FROM flows WHERE request_body IS NULL") == [(0,)]
        assert verify(w).ok
    finally:
        w.close()


def test_a_dead_connection_is_reopened(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    try:
        w.submit(pending(0))
        assert w.flush(30)
        assert w._con is not None
        w._con.close()  # what an invalidated database looks like to the writer
        for i in range(1, 4):
            w.submit(pending(i))
        assert w.flush(30), w.failure
        assert w.failure is None
        ids = [r[0] for r in read(w, "SELECT id FROM flows ORDER BY seq")]
        assert ids == [f"flow-{i}" for i in range(4)]
        assert verify(w).ok
    finally:
        w.close()


def test_batches_are_bounded_by_bytes(tmp_path: Path, monkeypatch) -> None:
    w = AuditWriter(tmp_path / "a.duckdb", build=store.build_row, serve_queries=False,
                    interval=0.01, max_batch_bytes=300_000)
    sizes: list[int] = []
    real = store.append

    def spy(con, rows, last, *more, **kw):
        sizes.append(sum(writer.row_bytes(r) for r in rows))
        return real(con, rows, last, *more, **kw)

    monkeypatch.setattr(store, "append", spy)
    for i in range(6):  # queued before the thread starts: one gathering pass
        # distinct bodies: a blob the store already holds is not sent, nor counted
        body = b'{"x":"' + bytes([97 + i]) * 200_000 + b'"}'
        w.submit(pending(i, body=body))
    w.start()
    try:
        assert w.flush(30)
        assert len(sizes) >= 3 and max(sizes) < 300_000 + 2 * 256 * 1024 + 65536
    finally:
        w.close()


def test_reduced_row_is_small_and_well_formed() -> None:
    row = store.build_row(pending(1))
    row["url"] = "https://h/" + "u" * 100_000
    small = store.reduced_row(row, "why")
    assert small["request_body"] is None and small["flow_state"] is None
    assert len(small["url"]) == 4096 and small["findings"] is not None
    assert set(small) == set(store.COLUMN_NAMES)
    minimal = store.reduced_row(row, "why", minimal=True)
    assert minimal["identity_groups"] == [] and minimal["approval"] is None


@pytest.mark.parametrize("value", [0, 4 * 1024 * 1024])
def test_max_body_bytes_bounds(tmp_path: Path, value: int) -> None:
    from addons.config.loader import load_rules
    (tmp_path / "r.yaml").write_text(f"recorder:\n  max_body_bytes: {value}\n")
    assert load_rules(tmp_path).recorder.max_body_bytes == value


def test_max_body_bytes_above_the_bound_is_refused(tmp_path: Path) -> None:
    from addons.config.loader import load_rules
    from addons.config.schema import ConfigError
    (tmp_path / "r.yaml").write_text("recorder:\n  max_body_bytes: 100000000\n")
    with pytest.raises(ConfigError):
        load_rules(tmp_path)


def test_a_real_store_failure_refuses_then_recovers(tmp_path: Path) -> None:
    """A real DuckDB write failure, no mocks: the write-ahead log cannot be created (its
    path is taken by a directory — what an unwritable data directory does to DuckDB, which
    root cannot reproduce with permissions). Nothing is lost, nothing is reduced."""
    w = make_writer(tmp_path)
    wal = tmp_path / "a.duckdb.wal"
    try:
        w.submit(pending(0))
        assert w.flush(30)
        assert w._con is not None
        w._con.execute("CHECKPOINT")  # the WAL is gone until the next write
        wal.mkdir()
        for i in range(1, 4):
            w.submit(pending(i))
        with w._cv:
            w._cv.notify()
        assert not w.flush(1)
        assert w.failure and "wal" in w.failure.lower()
        assert w.overloaded()  # new flows: 503
        wal.rmdir()
        assert w.flush(30), w.failure
        assert w.failure is None and w.overloaded() is None
        ids = [r[0] for r in read(w, "SELECT id FROM flows ORDER BY seq")]
        assert ids == [f"flow-{i}" for i in range(4)]
        assert read(w, "SELECT count(*) FROM flows WHERE flow_state IS NULL") == [(0,)]
        assert verify(w).ok
    finally:
        with contextlib.suppress(OSError):
            wal.rmdir()
        w.close()


def test_backlog_is_bounded_in_bytes(tmp_path: Path) -> None:
    w = AuditWriter(tmp_path / "a.duckdb", build=store.build_row, serve_queries=False,
                    max_pending_bytes=1000)
    w.submit(store.Pending(state=state(0), session="s", size=600))
    assert w.overloaded() is None
    w.submit(store.Pending(state=state(1), session="s", size=600))
    assert "bytes waiting" in (w.overloaded() or "")
    w.start()
    try:
        assert w.flush(30)
        assert w.pending_bytes == 0 and w.overloaded() is None
    finally:
        w.close()
