"""How the audit writer process batches and acknowledges (addons/recording/writer.py,
writerproc.py, remote.py), through the real process and a real DuckDB store:

- an acknowledgement never runs ahead of the commit: whatever the gateway has been told is
  written is in the store (read back over the process's own query socket meanwhile);
- a gathering (or stalled) store is a backlog: records stay unacknowledged, the gateway
  refuses new flows at its bound, and accepts again once the batch is committed;
- batches cut anywhere in a conversation that re-sends its history (blobs the store holds
  are neither sent nor counted again) keep every record once, in order, with every blob
  its bodies need: verify passes and the bodies read back are the bodies sent.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import duckdb
from mitmproxy.test import tflow

from addons.recording import store, writer, writerproc
from addons.recording.addon import ConnStates, flow_state
from addons.recording.remote import WriterProcess


def pending(fid: str, body: bytes, session: str = "s") -> store.Pending:
    f = tflow.tflow(resp=True)
    f.request.content = body
    st = flow_state(f, ConnStates())
    st["id"] = fid
    return store.Pending(state=st, session=session, size=len(body))


def committed(db: Path) -> int:
    """Rows in the store now, asked of the running writer process (its query socket: a
    second connection, so only what is committed)."""
    got = writer.ask_gateway(db, {"op": "query", "sql": "SELECT count(*) FROM flows"}, 30)
    assert got is not None and "error" not in got, got
    return int(got["rows"][0][0])


def test_an_acknowledgement_never_runs_ahead_of_the_commit(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, batch_size=40, interval=0.02, serve_queries=True)
    w.start()
    total = 600
    done = threading.Event()

    def feed() -> None:
        for i in range(total):
            w.submit(pending(f"f{i}", b"x" * (200 + (i * 7919) % 30_000)))
            if i % 50 == 49:
                time.sleep(0.05)  # bursts and pauses: batches of every size
        done.set()

    t = threading.Thread(target=feed)
    t.start()
    checks = seen_mid = 0
    try:
        while not done.is_set() or w.backlog:
            acked = w._acked  # noqa: SLF001 - what the gateway was told is written
            rows = committed(db)
            assert rows >= acked, f"acknowledged {acked} records, {rows} committed"
            checks += 1
            seen_mid += 0 < acked < total
            if done.is_set():
                assert w.flush(60)
    finally:
        t.join(60)
        assert w.close(60)
    assert checks > 5 and seen_mid > 0  # the invariant was looked at mid-stream
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert store.verify(con).ok
        ids = [r[0] for r in con.execute("SELECT id FROM flows ORDER BY seq").fetchall()]
    finally:
        con.close()
    assert ids == [f"f{i}" for i in range(total)]


def test_a_gathering_store_is_a_backlog_and_flows_are_refused_at_its_bound(
        tmp_path: Path) -> None:
    """The process reads every record at once but commits nothing yet (a batch gathers for
    60 s): nothing may be acknowledged, so the gateway's backlog reaches its bound and new
    flows are refused; once the batch is committed, every record is acknowledged and flows
    are accepted again. An acknowledgement on receipt would never refuse."""
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, batch_size=100_000, interval=60, serve_queries=False,
                      max_pending=50)
    w.start()
    try:
        n = 0
        while w.overloaded() is None:
            assert n < 50, "50 records unacknowledged and flows still accepted"
            w.submit(pending(f"f{n}", b"y" * 500))
            n += 1
        assert n == 50 and "backlog is full" in (w.overloaded() or "")
        time.sleep(0.3)  # the process has read them all by now: still none acknowledged
        assert w.backlog == 50 and w.written == 0
        assert w.flush(60)  # the writer commits what it gathered
        assert w.overloaded() is None and w.backlog == 0 and w.written == 50
        w.submit(pending("f50", b"z" * 500))
    finally:
        assert w.close(60)
    con = duckdb.connect(str(db), read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT id FROM flows ORDER BY seq").fetchall()]
    finally:
        con.close()
    assert ids == [f"f{i}" for i in range(51)]


def _turns(agent: int, turns: int) -> list[bytes]:
    """A chat conversation that re-sends its history, one body per turn (> INLINE_MAX from
    the second turn: stored as blobs, most of them the earlier turns')."""
    messages: list[dict[str, str]] = []
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"agent {agent} turn {t} " * 60})
        out.append(json.dumps({"model": "m", "messages": messages}).encode())
        messages.append({"role": "assistant", "content": f"answer {agent}.{t} " * 80})
    return out


def test_batches_cut_anywhere_in_a_conversation_keep_every_record_and_blob(
        tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    convs = [_turns(a, 14) for a in range(3)]
    # small batches, by bytes and by rows, so that cuts fall inside the turns of a round
    w = WriterProcess(db, batch_size=5, interval=0.01, serve_queries=False,
                      max_batch_bytes=24 * 1024)
    w.start()
    sent: list[tuple[str, bytes]] = []
    try:
        for t in range(14):
            for a in range(3):
                fid = f"a{a}-t{t}"
                sent.append((fid, convs[a][t]))
                w.submit(pending(fid, convs[a][t], f"agent-{a}"))
            if t % 4 == 3:
                assert w.flush(60)  # some turns find their history committed, some not
    finally:
        assert w.close(60)
    con = duckdb.connect(str(db), read_only=True)
    try:
        result = store.verify(con)
        assert result.ok, result.problem
        got = con.execute("SELECT f.id, b.request_body FROM flows f JOIN flow_bodies b "
                          "USING (seq) ORDER BY f.seq").fetchall()
        refs = con.execute("SELECT count(*) FROM flows WHERE request_body_ref IS NOT NULL"
                           ).fetchone()
    finally:
        con.close()
    assert [(i, bytes(b)) for i, b in got] == sent  # each once, in order, bodies exact
    assert refs is not None and refs[0] >= 36  # the bodies went to blobs


def test_history_of_a_turn_stored_reduced_goes_with_the_next_turn(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The writer leaves out of a row the blobs of the history the store holds (writerproc
    wires the BlobCache into build_row). A turn the store refused and stored reduced (no
    bodies, no blobs) is in the split cache all the same: the next turn must carry the
    blobs that turn would have stored, or its body cannot be read back."""
    db = tmp_path / "a.duckdb"
    w = writer.AuditWriter(db, build=writerproc.build, serve_queries=False, interval=0.01,
                           batch_size=3)
    w.build = functools.partial(writerproc.build, known=w._known)  # noqa: SLF001 - as main()
    real = store.append

    def refuse_turn_3(con, rows, *a, **kw):  # noqa: ANN001, ANN202
        if any(r.get("id") == "t3" and r.get("flow_state") is not None for r in rows):
            raise duckdb.OutOfMemoryException("refused (test)")
        return real(con, rows, *a, **kw)

    monkeypatch.setattr(store, "append", refuse_turn_3)
    bodies = _turns(7, 8)
    w.start()
    try:
        for t, body in enumerate(bodies):
            w.submit(pending(f"t{t}", body, "reduced-history"))
            if t % 2:
                assert w.flush(60)  # turn 3 is committed (reduced) before turn 4 is built
        assert w.flush(60)
        con = w._con  # noqa: SLF001
        assert con is not None
        result = store.verify(con)
        assert result.ok, result.problem
        got = dict(con.execute("SELECT f.id, b.request_body FROM flows f JOIN flow_bodies b "
                               "USING (seq)").fetchall())
        note = con.execute("SELECT error FROM flows WHERE id = 't3'").fetchone()
    finally:
        w.close()
    assert note is not None and "reduced" in (note[0] or "")
    for t, body in enumerate(bodies):
        if t != 3:
            assert bytes(got[f"t{t}"]) == body, t
