"""The audit writer process builds a large flow's row as soon as it reads the flow
(writer.AuditWriter.prebuilt): what waits for a batch is the row, which keeps only what is
new in a conversation's turn, not the whole snapshot. Retention never deletes a blob a row
built ahead left out because the store held it."""

from __future__ import annotations

import functools
import io
import time
from pathlib import Path

import duckdb
from mitmproxy.test import tflow

from addons.recording import store, wire, writerproc
from addons.recording.addon import ConnStates, flow_state
from addons.recording.writer import AuditWriter
from tests.recording.test_batching import _turns
from tests.recording.test_writer_memory import pump_frames


def pending(fid: str, body: bytes, session: str, at: float | None = None) -> store.Pending:
    f = tflow.tflow(resp=True)
    f.request.content = body
    if at is not None:
        f.request.timestamp_start = f.request.timestamp_end = at
        f.response.timestamp_start = f.response.timestamp_end = at + 0.01
    st = flow_state(f, ConnStates())
    st["id"] = fid
    p = store.Pending(state=st, session=session, size=len(body))
    if at is not None:
        p.recorded_at = at + 0.01
    return p


def writer(db: Path, **kw: object) -> AuditWriter:
    w = AuditWriter(db, build=writerproc.build, serve_queries=False, **kw)  # type: ignore[arg-type]
    w.build = functools.partial(writerproc.build, known=w._known)  # noqa: SLF001 - as main()
    return w


def bodies_of(db: Path) -> dict[str, bytes]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        result = store.verify(con)
        assert result.ok, result.problem
        return {i: bytes(b) for i, b in con.execute(
            "SELECT f.id, b.request_body FROM flows f JOIN flow_bodies b USING (seq)"
        ).fetchall()}
    finally:
        con.close()


def test_the_process_queues_rows_that_keep_only_what_a_turn_adds(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Two conversations of 30 turns (bodies up to ~90 KB) through the process's reading
    loop, with a store slower than the gateway: everything queued is a built row, and a
    late turn's row is a small part of its frame. Before, the queue held each snapshot
    with its whole body until its batch was built. Every body reads back exactly."""
    real = store.append

    def slow_append(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.02)  # a store that lags the gateway
        return real(*a, **kw)

    monkeypatch.setattr(store, "append", slow_append)
    db = tmp_path / "a.duckdb"
    w = writer(db, batch_size=4, interval=0.01, max_batch_bytes=48 * 1024)
    writerproc.configure(w, {})
    w.start()
    rep = writerproc.Reporter(io.BytesIO(), w)
    convs = [_turns(s, 30) for s in range(2)]
    sent = {f"s{s}-t{t}": convs[s][t] for t in range(30) for s in range(2)}
    frames = [wire.frame(wire.pending_msg(n + 1, pending(fid, body, fid.split("-")[0])))
              for n, (fid, body) in enumerate(sent.items())]
    seen: dict[str, int] = {}
    snapshots: set[str] = set()  # flows queued as snapshots (not built yet)

    def sample() -> None:
        for item in list(w._queue):  # noqa: SLF001
            if isinstance(item, store.Pending):
                snapshots.add(str(item.state.get("id")))
            else:
                seen[str(item.row.get("id"))] = item.size

    pump_frames(w, rep, db, frames, sample)
    assert w.close(60)
    # only the small first turns (frames under writerproc.FRAME_KEEP) wait unbuilt
    assert all(len(sent[fid]) < writerproc.FRAME_KEEP for fid in snapshots), snapshots
    late = [fid for fid in seen if int(fid.split("-t")[1]) >= 20]
    assert late, seen  # the store lagged: late turns waited in the queue
    for fid in late:
        # the frame carries the whole history (~60-90 KB); the row what this turn added,
        # and what the turns before it added that the store has not committed yet
        assert seen[fid] < len(sent[fid]) // 2, (fid, seen[fid], len(sent[fid]))
    assert bodies_of(db) == sent


def test_retention_writes_rows_built_ahead_before_it_deletes_blobs(tmp_path: Path) -> None:
    """A turn's row built ahead leaves out the history the store holds (its blobs). If
    retention then purged the old turn that stored them, and the blobs with it (no stored
    record refers to them yet), the new row would refer to blobs that are gone: its body
    could never be read back, and the chain would not verify. Retention writes such rows
    first."""
    db = tmp_path / "a.duckdb"
    w = writer(db, batch_size=100, interval=60, retention_days=5)
    w.start()
    try:
        body0, body1 = _turns(3, 6)[4:]  # (stored as blobs: over store.INLINE_MAX)
        old = time.time() - 10 * 86400
        w.submit(pending("old", body0, "s", at=old))
        assert w.flush(30)
        now = time.time()
        ahead = w.prebuilt(pending("new", body1, "s", at=now))
        # it did leave the history out (else this test would prove nothing)
        whole = store.build_row(pending("new", body1, "s", at=now))
        assert len(ahead.row["_blobs"]) < len(whole["_blobs"])
        ahead.sub = None  # type: ignore[attr-defined]
        w.submit(ahead)  # queued; the writer thread waits for its interval (60 s)
        w._apply_retention()  # noqa: SLF001 - as the writer thread does once an hour
        assert w.flush(30)
        con = w._con  # noqa: SLF001
        assert con is not None
        ids = [x[0] for x in con.execute("SELECT id FROM flows ORDER BY seq").fetchall()]
    finally:
        assert w.close(30)
    assert ids == ["new"]  # the old turn was purged
    assert bodies_of(db) == {"new": body1}
