"""The gateway's side of the audit writer process (addons/recording/remote.py), with the real
process: records survive the process's death, the backlog is bounded in bytes, a snapshot
that is not plain data still leaves a record, and nothing DuckDB is loaded on this side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from mitmproxy.test import tflow

from addons.recording import store, wire
from addons.recording.addon import ConnStates, flow_state
from addons.recording.remote import WriterProcess, WriterStartError

FAULT = Path(__file__).resolve().parents[1] / "hostile" / "_store_fault"


def pending(session: str, **meta: object) -> store.Pending:
    f = tflow.tflow(resp=True)
    f.metadata.update(meta)
    return store.Pending(state=flow_state(f, ConnStates()), session=session, size=100)


def stored(db: Path) -> tuple[list[tuple], store.VerifyResult]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT session_id, outcome FROM flows ORDER BY seq").fetchall()
        return rows, store.verify(con)
    finally:
        con.close()


def test_records_queued_in_a_killed_process_are_written_by_the_next(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    # nothing is written before the kill: a batch waits for 100000 rows or 60 s
    w = WriterProcess(db, batch_size=100_000, interval=60, serve_queries=False)
    w.start()
    first = w.pid
    for i in range(50):
        w.submit(pending(f"s{i}"))
    time.sleep(0.3)  # they reached the process (and sit in its queue)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while w.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.failure and "writer process exited" in w.failure
    assert w.overloaded()  # fail closed while it is down
    deadline = time.monotonic() + 30
    while (w.pid == first or w.failure) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.pid != first and w.failure is None and w.restarts == 1
    for i in range(50, 60):
        w.submit(pending(f"s{i}"))
    assert w.close(60)
    rows, ok = stored(db)
    assert ok.ok, ok.problem
    assert [r[0] for r in rows] == [f"s{i}" for i in range(60)]  # each once, in order


def test_backlog_is_bounded_in_bytes_and_drains(tmp_path: Path) -> None:
    w = WriterProcess(tmp_path / "a.duckdb", batch_size=100_000, interval=60,
                      serve_queries=False, max_pending_bytes=20_000)
    w.start()
    try:
        while w.overloaded() is None:
            w.submit(pending("s"))
        assert "bytes waiting" in (w.overloaded() or "")
        assert w.flush(30) and w.overloaded() is None and w.pending_bytes == 0
    finally:
        assert w.close(30)


def test_a_snapshot_that_is_not_plain_data_leaves_a_minimal_record(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, interval=0.01, serve_queries=False)
    w.start()
    w.submit(pending("odd", odd=object()))
    w.submit(pending("plain"))
    assert w.close(30)
    rows, ok = stored(db)
    assert ok.ok
    assert rows[0] == ("odd", "record_error")
    assert rows[1][0] == "plain" and rows[1][1] != "record_error" and len(rows) == 2


def test_a_store_that_cannot_be_opened_is_a_start_error(tmp_path: Path) -> None:
    (tmp_path / "dir.duckdb").mkdir()  # a directory where the file should be
    w = WriterProcess(tmp_path / "dir.duckdb", serve_queries=False)
    with pytest.raises(WriterStartError, match="cannot open the audit store"):
        w.start()


def test_frames_round_trip_and_refuse_objects() -> None:
    p = pending("s", x={"a": (1, 2.5, b"\xff", None, True, {"k"})})
    n, back = wire.record_of(wire.read_frame(_stream(wire.frame(wire.pending_msg(7, p)))))
    assert n == 7 and back.state == p.state and back.session == "s"
    with pytest.raises(ValueError):
        wire.frame(("flow", 1, object()))
    assert wire.read_frame(_stream(wire.frame(("ack", 1, None))[:-1])) is None  # cut: end


def _stream(data: bytes):
    import io
    return io.BytesIO(data)


def test_the_gateway_side_loads_no_duckdb() -> None:
    code = ("import sys; import addons.recording.addon, addons.recording.remote; "
            "import addons.gateway; print('duckdb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_an_addons_package_in_the_working_directory_is_not_the_writer(tmp_path: Path) -> None:
    # a gateway started from a directory holding another `addons` package (an older
    # checkout, a user's own) must still run its own writer code
    decoy = tmp_path / "cwd" / "addons" / "recording"
    decoy.mkdir(parents=True)
    (decoy.parent / "__init__.py").write_text("")
    (decoy / "__init__.py").write_text("")
    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); "
            "from addons.recording.remote import WriterProcess; "
            f"w = WriterProcess({str(tmp_path / 'a.duckdb')!r}, serve_queries=False); "
            "w.start(); print('closed', w.close(30))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path / "cwd", timeout=120)
    assert "closed True" in out.stdout, out.stderr[-2000:]


def test_a_crash_between_commit_and_acknowledgement_writes_nothing_twice(
        tmp_path: Path, monkeypatch) -> None:
    # tests/hostile/_store_fault (the process's sitecustomize): the first batch commits,
    # then the process dies before it can say so; the gateway re-sends what it had not
    # acknowledged to the restarted process, which must skip what was committed
    die = tmp_path / "die"
    die.write_text("x")
    monkeypatch.setenv("AGENTGATE_TEST_DIE_AFTER_COMMIT", str(die))
    monkeypatch.setenv("PYTHONPATH", str(FAULT))
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, batch_size=100_000, interval=0.3, serve_queries=False)
    w.start()
    first = w.pid
    for i in range(20):
        w.submit(pending(f"s{i}"))
    deadline = time.monotonic() + 30
    while (w.restarts == 0 or w.failure) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.restarts == 1 and w.pid != first and not die.exists()
    for i in range(20, 25):
        w.submit(pending(f"s{i}"))
    assert w.close(60)
    rows, ok = stored(db)
    assert ok.ok, ok.problem
    assert [r[0] for r in rows] == [f"s{i}" for i in range(25)]  # each once, in order
