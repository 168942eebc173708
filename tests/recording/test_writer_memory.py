"""What the audit writer process holds in memory: it reads the gateway's pipe no further
ahead than one batch behind the one being written (the rest waits in the gateway's bounded
backlog), and it gives its heap back after a burst."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
from mitmproxy.test import tflow

from addons.recording import store, wire, writerproc
from addons.recording.addon import ConnStates, flow_state
from addons.recording.remote import WriterProcess
from addons.recording.writer import AuditWriter


def pending(i: int, body: bytes, session: str | None = None) -> store.Pending:
    f = tflow.tflow(resp=True)
    f.request.content = body
    st = flow_state(f, ConnStates())
    st["id"] = f"flow-{i}"
    return store.Pending(state=st, session=session or f"s{i}", size=len(body))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def pump_frames(w: AuditWriter, rep: writerproc.Reporter, db: Path, frames: list[bytes],
                sample: Callable[[], None]) -> None:
    """`frames` through a pipe into the process's reading loop (writerproc.pump) until the
    end of the stream, calling `sample` every 0.5 ms meanwhile; every frame was written."""
    r, wfd = os.pipe()
    fed = threading.Event()

    def feed() -> None:
        with os.fdopen(wfd, "wb", buffering=0) as out:
            for f in frames:
                out.write(f)  # blocks while the pipe is full: the gateway's sender waits
        fed.set()

    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            sample()
            time.sleep(0.0005)

    threads = [threading.Thread(target=feed), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    try:
        # as the process reads its stdin: a batch at a time, napping while it is quiet
        writerproc.pump(wire.FrameReader(r, nap=writerproc.READ_NAP), w, rep, 0, str(db), [])
    finally:
        stop.set()  # the sampler ends even when pump fails
        os.close(r)
    for t in threads:
        t.join(10)
    assert fed.is_set()


def test_the_writer_reads_no_further_than_one_batch_ahead(tmp_path: Path,
                                                          monkeypatch) -> None:
    """A store slower than the gateway: the process's queue stays within one batch (in
    bytes) however much the gateway has sent, and every record is still written, once, in
    order. Before, it read the pipe to the end into its queue (here ~1.3 MB)."""
    real = store.append

    def slow_append(con, rows, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(0.003 * len(rows))  # a store that lags the gateway
        return real(con, rows, *a, **kw)

    monkeypatch.setattr(store, "append", slow_append)
    db = tmp_path / "a.duckdb"
    w = AuditWriter(db, build=writerproc.build, serve_queries=False, batch_size=500,
                    interval=0.05, max_batch_bytes=64 * 1024)
    writerproc.configure(w, {})  # as in the process: the gateway bounds the backlog
    w.start()
    rep = writerproc.Reporter(io.BytesIO(), w)
    frames = [wire.frame(wire.pending_msg(i + 1, pending(i, b"x" * 8000))) for i in range(150)]
    peak = {"bytes": 0, "records": 0}

    def sample() -> None:
        peak["bytes"] = max(peak["bytes"], w.pending_bytes)
        peak["records"] = max(peak["records"], len(w._queue))  # noqa: SLF001

    pump_frames(w, rep, db, frames, sample)
    assert w.close(60)
    frame_max = max(len(f) for f in frames)
    assert peak["bytes"] <= 64 * 1024 + frame_max, peak
    assert peak["records"] <= (64 * 1024) // (frame_max - 200) + 2, peak
    con = duckdb.connect(str(db), read_only=True)
    try:
        ids = [x[0] for x in con.execute("SELECT id FROM flows ORDER BY seq").fetchall()]
        assert store.verify(con).ok
    finally:
        con.close()
    assert ids == [f"flow-{i}" for i in range(150)]


def test_the_writer_does_not_wait_for_room_while_the_store_fails(tmp_path: Path) -> None:
    """Backpressure must not stop the process from reading its pipe to the end when the
    store fails (it would never notice that the gateway has gone): wait_room returns."""
    w = AuditWriter(tmp_path / "a.duckdb", build=writerproc.build, serve_queries=False,
                    batch_size=2, interval=60)
    writerproc.configure(w, {})
    w.start()
    try:
        w.failure = "cannot write the audit store: disk full"
        w._queue.extend([pending(0, b"a"), pending(1, b"b"), pending(2, b"c")])  # noqa: SLF001
        assert w.full()
        t0 = time.monotonic()
        assert w.wait_room(5)
        assert time.monotonic() - t0 < 1
        w.failure = None
        w._queue.clear()  # noqa: SLF001
    finally:
        w.close(10)


def test_a_burst_leaves_the_writer_near_its_resting_memory(tmp_path: Path) -> None:
    """40 MB of 100 KB flows at once through the real writer process (one body: stored
    once, so DuckDB's own memory stays out of it; one session, so one entry of the split
    cache): its RSS grows by about two batches, not
    by the burst (the rest waits in the gateway's backlog), and once written its heap goes
    back to the OS. Before: it read the whole burst into its queue (+40 MB)."""
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"y" * 100_000 + b'"}]}'
    w = WriterProcess(tmp_path / "a.duckdb", serve_queries=False, interval=0.05,
                      max_batch_bytes=2 * 1024 * 1024)
    w.start()
    try:
        assert w.pid is not None
        for i in range(40):  # warm: DuckDB's first inserts, the pages every batch uses
            w.submit(pending(i, body, "burst"))
        assert w.flush(60)
        time.sleep(1.5)
        rest = rss_mib(w.pid)
        peak = rest
        for i in range(40, 440):
            w.submit(pending(i, body, "burst"))
            if i % 20 == 0:
                peak = max(peak, rss_mib(w.pid))
        while w.backlog:
            peak = max(peak, rss_mib(w.pid))
            time.sleep(0.01)
        assert w.flush(60)
        time.sleep(2.0)  # the next trim (at most one a second, once the queue is empty)
        after = rss_mib(w.pid)
    finally:
        assert w.close(60)
    assert peak - rest < 30, (rest, peak)  # before: +44-48 MiB, now +17-18
    assert after - rest < 25, (rest, peak, after)  # before: +43-44 MiB, now +13-14


def test_rows_without_the_cap_walk_are_the_rows_with_it(monkeypatch) -> None:  # noqa: ANN001
    """store.fits lets build_row skip the cap walks when nothing can be cut: the rows are
    the same, byte for byte, as with the walks — small flows, a body over max_body, a huge
    header, a long metadata string, non-ASCII and bytes in metadata, a tiny limit."""
    big = b'{"messages":[{"role":"user","content":"' + "é".encode() * 3000 + b'"}]}'
    cases = []
    for body, meta, max_body in ((b'{"a":1}', {}, 256 * 1024), (big, {}, 4096),
                                 (big, {"note": "x" * 5000}, 4096),
                                 (b"plain", {"raw": b"\xff" * 300, "t": "ü" * 100}, 200),
                                 (b"plain", {"hdr": "y"}, 10), (big, {}, 0)):
        f = tflow.tflow(resp=True)
        f.request.content = body
        f.request.headers["x-long"] = "h" * 6000
        f.metadata.update(meta)
        cases.append(store.Pending(state=flow_state(f, ConnStates()), session="s",
                                   max_body=max_body, secrets=("sk-secret-value-1",)))
    fast = [store.build_row(p) for p in cases]
    assert any(store.fits(p.state, p.max_body) for p in cases)
    assert not all(store.fits(p.state, p.max_body) for p in cases)
    monkeypatch.setattr(store, "fits", lambda v, limit: False)
    slow = [store.build_row(p) for p in cases]
    assert fast == slow


def test_the_writer_process_gives_duckdbs_freed_pages_back_soon(tmp_path: Path,
                                                                monkeypatch) -> None:  # noqa: ANN001
    """The writer process runs DuckDB's jemalloc with a short decay (remote.JEMALLOC_CONF:
    bench_recorder and BENCHMARKS.md have what it saves); an operator's own
    DUCKDB_JE_MALLOC_CONF is left as it is."""
    from addons.recording import remote

    def child_conf(env_value: str | None) -> str | None:
        if env_value is None:
            monkeypatch.delenv("DUCKDB_JE_MALLOC_CONF", raising=False)
        else:
            monkeypatch.setenv("DUCKDB_JE_MALLOC_CONF", env_value)
        w = WriterProcess(tmp_path / f"a{env_value is None}.duckdb", serve_queries=False)
        w.start()
        try:
            assert w.pid is not None
            env = Path(f"/proc/{w.pid}/environ").read_bytes().split(b"\0")
        finally:
            assert w.close(30)
        got = [e.split(b"=", 1)[1].decode() for e in env
               if e.startswith(b"DUCKDB_JE_MALLOC_CONF=")]
        return got[0] if got else None

    assert child_conf(None) == remote.JEMALLOC_CONF
    assert "dirty_decay_ms" in remote.JEMALLOC_CONF
    assert child_conf("dirty_decay_ms:5000") == "dirty_decay_ms:5000"
