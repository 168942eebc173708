"""The event loop writes audit frames into the writer process's pipe itself
(addons/recording/remote.py WriterProcess._send): non-blocking, and only when nothing is
queued before the frame; what does not fit goes to the sender thread. These tests stop the
real process (SIGSTOP) so the pipe fills and both paths take turns, and kill it so direct
writes hit a dead pipe: every record must be stored exactly once, in submission order, the
caller must never wait for the process, and new flows are refused while it is gone."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import duckdb
from mitmproxy.test import tflow

from addons.recording import store
from addons.recording.addon import ConnStates, flow_state
from addons.recording.remote import WriterProcess


def pending(session: str, pad: int) -> store.Pending:
    f = tflow.tflow(resp=True)
    # bodies of uneven sizes, some over PIPE_BUF: a non-blocking write may then take
    # only part of a frame, and the rest must follow it before anything else
    f.request.content = (session.encode() + b"-") * (pad // (len(session) + 1) + 1)
    return store.Pending(state=flow_state(f, ConnStates()), session=session, size=pad)


def sessions(db: Path) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        ok = store.verify(con)
        assert ok.ok, ok.problem
        return [r[0] for r in con.execute("SELECT session_id FROM flows ORDER BY seq").fetchall()]
    finally:
        con.close()


def _run_bounded(fn, timeout: float) -> None:
    """Run fn on a thread; fail (instead of hanging the suite) when it does not return."""
    err: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            err.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "submit() waited for the stopped writer process"
    if err:
        raise err[0]


def test_a_full_pipe_neither_blocks_nor_loses_reorders_or_duplicates(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, batch_size=64, interval=0.05, serve_queries=False)
    w.start()
    pid = w.pid
    assert pid is not None
    expected: list[str] = []
    sizes = (300, 5000, 40, 9000, 1200, 70_000)
    try:
        def burst(start: int, count: int) -> None:
            for i in range(start, start + count):
                expected.append(f"s{i}")
                w.submit(pending(f"s{i}", sizes[i % len(sizes)]))
                if i % 97 == 0:
                    w.reconfigure()  # control frames interleave with records

        burst(0, 100)  # the process reads: frames go straight into the pipe
        os.kill(pid, signal.SIGSTOP)
        try:
            # ~2.8 MB while nobody reads: far past the pipe's buffer, so writes fail or
            # take part of a frame and the rest waits for the sender; submit must return
            _run_bounded(lambda: burst(100, 200), 60)
            assert w.backlog >= 200 and w.overloaded() is None
        finally:
            os.kill(pid, signal.SIGCONT)
        burst(300, 100)  # while the sender still drains what queued up
        assert w.flush(60), "not everything was acknowledged"
        burst(400, 50)  # the pipe is empty again: direct writes resume
    finally:
        assert w.close(60)
    assert sessions(db) == expected
    assert w.restarts == 0


def test_frames_written_to_a_dead_process_are_sent_again_and_flows_refused(
        tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    # nothing is committed before the kill: a batch waits for 100000 rows or 60 s
    w = WriterProcess(db, batch_size=100_000, interval=60, serve_queries=False)
    w.start()
    first = w.pid
    assert first is not None
    expected = []
    for i in range(30):
        expected.append(f"s{i}")
        w.submit(pending(f"s{i}", 500))
    os.kill(first, signal.SIGKILL)
    # while it is dead, before and after the gateway notices: the direct write meets a
    # closed pipe (EPIPE) and must neither raise nor drop the record
    for i in range(30, 40):
        expected.append(f"s{i}")
        w.submit(pending(f"s{i}", 3000))
    deadline = time.monotonic() + 10
    while w.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.failure and "writer process exited" in w.failure
    assert w.overloaded()  # new flows are refused while it is gone
    for i in range(40, 45):
        expected.append(f"s{i}")
        w.submit(pending(f"s{i}", 100))
    deadline = time.monotonic() + 30
    while (w.pid == first or w.failure) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.pid != first and w.failure is None and w.restarts == 1
    for i in range(45, 60):
        expected.append(f"s{i}")
        w.submit(pending(f"s{i}", 2000))
    assert w.close(60)
    assert sessions(db) == expected  # each once, in order


def _feed(fd: int, data: bytes, cuts: list[int]) -> None:
    """Write data to a pipe in pieces cut at the given offsets, then close it."""
    at = 0
    for cut in [*cuts, len(data)]:
        view = memoryview(data)[at:cut]
        while view:
            view = view[os.write(fd, view):]
        at = cut
    os.close(fd)


def test_the_writer_reads_every_frame_whatever_the_pieces_it_arrives_in() -> None:
    import random

    from addons.recording import wire
    rnd = random.Random(16)
    msgs = [("flow", i, b"x" * rnd.choice((0, 1, 3, 700, 4096, 70_000, 300_000)),
             {"k": "v" * (i % 7)}) for i in range(1, 60)]
    data = b"".join(wire.frame(m) for m in msgs)
    for cuts in ([], sorted(rnd.sample(range(1, len(data)), 40)), list(range(1, 200))):
        r, w = os.pipe()
        t = threading.Thread(target=_feed, args=(w, data, cuts), daemon=True)
        t.start()
        reader = wire.FrameReader(r, nap=0.001, chunk=4096)
        got = []
        while (item := reader.next()) is not None:
            got.append(item)
        t.join(10)
        os.close(r)
        assert [m for m, _ in got] == msgs  # each once, in order, none torn
        assert [n for _, n in got] == [len(wire.frame(m)) for m in msgs]
    # a stream cut inside a frame ends there: the partial message is never used
    r, w = os.pipe()
    _feed(w, wire.frame(("ack", 1, None)) + wire.frame(("ack", 2, None))[:-1], [])
    reader = wire.FrameReader(r)
    assert reader.next() == (("ack", 1, None), len(wire.frame(("ack", 1, None))))
    assert reader.next() is None
    os.close(r)
