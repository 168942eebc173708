"""The audit writer process: `python -m addons.recording.writerproc <db> <config json>`.

The gateway (addons/recording/remote.py) starts this process and feeds it flow snapshots
over its stdin (frames, addons/recording/wire.py); this process owns the DuckDB connection:
it builds each flow's row (redaction, decoding, capping, blobs; a large flow's as soon as it
reads it), then chains and appends the rows in batches (addons/recording/writer.py's
AuditWriter, on its thread here) and serves the `agentgate audit` query socket and, with
`audit_lake:`, ships the store to the lake (lake.py's shipper, beside the writer's DuckDB
instance). Row building and inserts (~0.3 ms of Python per 1 KB flow) no longer hold the
gateway's GIL, and DuckDB's memory lives here.

It reports on stdout: ("ready", seq, hash, n_committed_earlier) once the store is open (or
("fatal", why) and exit 1), then ("ack", n, failure) whenever the number of records
written or the store's failure changes.

Its life is its stdin: end of stream means the gateway closed it (shutdown) or died (even
SIGKILL closes the pipe). Either way it writes everything it has read, checkpoints, closes
the store and exits — never an orphan, and no accepted record is dropped. SIGINT / SIGTERM
are ignored for that reason: a Ctrl-C or a process-group signal reaches the gateway too, and
the gateway decides when the writer stops (it closes the pipe after its own drain).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Container
from typing import IO, Any

from addons.frame import decode as body_decode
from addons.frame import logscrub
from addons.frame.pages import drop_library_pages
from addons.recording import lake, store, wire
from addons.recording.writer import AuditWriter, open_db, open_failure_hint

log = logging.getLogger("agentgate.recorder")

# The writer thread wakes the reporter after each batch (AuditWriter.on_progress); it
# also looks this often by itself (a heap trim is due once the queue is empty).
REPORT_INTERVAL = 0.5
# Read the pipe at most this often while it is quiet (wire.FrameReader): frames arrive one
# per flow, rows are written every `interval` (0.2 s) — one wake-up per nap, not per flow.
READ_NAP = 0.01
DRAIN_TIMEOUT = 120.0  # seconds to write what is queued once the gateway is gone
# Give freed heap back after this many bytes of records went through (and the queue is
# empty), at most once per TRIM_EVERY seconds.
TRIM_AFTER_BYTES = 4 * 1024 * 1024
TRIM_EVERY = 1.0
# Frames up to this size are looked at for their row's build (store.Pending.frame): a 1 KB
# chat flow's is ~5 KB; at the default max_body (256 KiB) a state read from a frame of up
# to ~16 KB needs no measuring of its own (store.LEAF_GROWTH)
FRAME_KEEP = 16 * 1024


# the cuts of each session's last bodies: a turn that re-sends the history is parsed and
# hashed only past it (rows are built under the writer's build_lock, by either thread)
SPLITS = store.SplitCache()


def build(pending: store.Pending, known: Container[str] | None = None) -> dict[str, Any]:
    # the one bounded decoder, as in the gateway (a bomb must not blow up the writer)
    return store.build_row(pending, decode=body_decode.decompress, splits=SPLITS,
                           known=known)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class Reporter:
    """Sends ("ack", n, failure) when progress or failure changes; all writes to stdout.

    Between reports it gives the heap back after a burst: each batch's rows, JSON text and
    DuckDB's parse of it are freed once committed, but glibc keeps the freed chunks, so the
    process's RSS would stay at its busiest moment for good. Once the queue is empty after
    TRIM_AFTER_BYTES of records, malloc_trim returns the free pages (a few ms, off the
    writer thread; ctypes releases the GIL)."""

    def __init__(self, out: IO[bytes], writer: AuditWriter) -> None:
        self.out = out
        self.writer = writer
        self.received = 0  # bytes of records read from the pipe (main thread)
        self.trimmed_at = 0  # `received` at the last trim
        self.trims = 0
        self._trim = _malloc_trim()
        self._last_trim = 0.0
        self.base = 0  # n of the record before the first one this process received
        self.lock = threading.Lock()
        self.sent: tuple[int, str | None] | None = None
        self.gone = False  # the gateway stopped reading: keep writing, stop reporting
        self.stop = threading.Event()
        self._wake = threading.Event()
        writer.on_progress = self._wake.set

    def send(self, msg: tuple[Any, ...]) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                self.out.write(wire.frame(msg))
                self.out.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.gone = True

    def report(self) -> None:
        state = (self.base + self.writer.written, self.writer.failure)
        if state != self.sent:
            self.sent = state
            self.send(("ack", *state))

    def run(self) -> None:
        """Acknowledge what each batch wrote as soon as it is written (woken by the writer
        thread), not by looking 50 times a second: an idle writer process used ~3 ms of
        CPU per second on the looking alone."""
        while not self.stop.is_set():
            self._wake.wait(REPORT_INTERVAL)
            self._wake.clear()
            self.report()
            self.maybe_trim()

    def close(self) -> None:
        self.stop.set()
        self._wake.set()

    def maybe_trim(self) -> None:
        w = self.writer
        if (self._trim is None or self.received - self.trimmed_at < TRIM_AFTER_BYTES
                or w.backlog or w._busy  # noqa: SLF001 - idle: nothing being built
                or time.monotonic() - self._last_trim < TRIM_EVERY):
            return
        self.trimmed_at = self.received
        self._last_trim = time.monotonic()
        self._trim(0)
        self.trims += 1


def configure(w: AuditWriter, cfg: dict[str, Any]) -> None:
    for key in ("batch_size", "interval", "max_batch_bytes", "retention_days"):
        if key in cfg:
            setattr(w, key, cfg[key])
    # the gateway bounds the backlog (it refuses flows); here nothing may be refused
    w.max_pending = 1 << 62
    w.max_pending_bytes = 1 << 62


def _local_store(w: AuditWriter, db: str) -> Any:
    """The lake shipper's connection to the store, for one round: a cursor of the writer's
    instance while it is open; once it closed (the last shipment, after its last write),
    the file read by a connection of its own."""
    if w.closed:
        return open_db(db, read_only=True)
    return w.cursor()


def pump(inp: wire.FrameReader, w: AuditWriter, rep: Reporter, done: int, db: str,
         shippers: list[lake.LakeShipper]) -> None:
    """Read the gateway's messages until the end of the stream and hand the records to the
    writer, reading no further ahead than one batch behind the one being written."""
    first = True
    while True:
        got = inp.next()
        if got is None:
            return
        msg, nbytes = got
        kind = msg[0]
        if kind in ("flow", "row"):
            n, item = wire.record_of(msg)
            if n <= done:
                continue  # committed by the process before this one
            if first:
                rep.base, first = n - 1, False
            item.sub = n  # type: ignore[union-attr] - committed with its batch
            if inp.frame is not None and isinstance(item, store.Pending):
                item.frame = (nbytes, store.frame_plain(inp.frame))
            # what it holds here: at least its frame (metadata, headers, bodies)
            item.size = max(item.size, nbytes)
            rep.received += nbytes
            if isinstance(item, store.Pending) and inp.frame is None:
                # A large snapshot (a conversation's turn with its whole history) is built
                # now: the queue holds its row, which keeps only what the turn added. A
                # small one (its frame kept, FRAME_KEEP) waits as it is: building it here
                # would only add a hand-off between the threads (+~20 us of a 1 KB flow).
                item = w.prebuilt(item)
                item.sub = n  # type: ignore[attr-defined]
            w.submit(item)
            # Backpressure: while a whole batch waits behind the one being written, stop
            # reading; the pipe fills and the gateway's sender waits, its backlog bounded.
            w.wait_room()
        elif kind == "cfg":
            configure(w, msg[1])
        elif kind == "lake" and not shippers:
            shipper = lake.LakeShipper(lake.LakeConfig(**msg[1]), str(msg[2]),
                                       functools.partial(_local_store, w, db),
                                       reading=w.reading)
            shipper.start()
            shippers.append(shipper)
        elif kind == "flush":
            with w._cv:  # noqa: SLF001 - write what is queued now, not at the interval
                w._cv.notify_all()  # noqa: SLF001


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    logscrub.install()
    db, cfg = argv[0], json.loads(argv[1])
    # before opening the store too: the import's pages are not added to the open's
    drop_library_pages()
    inp = wire.FrameReader(sys.stdin.fileno(), nap=READ_NAP, keep=FRAME_KEEP)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # nothing else may write into the message stream (a stray print would corrupt it)
    sys.stdout = sys.stderr
    w = AuditWriter(db, build=build, serve_queries=bool(cfg.get("serve_queries", True)))
    # the history a turn re-sends that the store already holds is not copied into its row
    w.build = functools.partial(build, known=w._known)  # noqa: SLF001
    configure(w, cfg)
    rep = Reporter(out, w)
    try:
        w.start()
    except Exception as e:  # noqa: BLE001 - the gateway says why and refuses flows
        hint = open_failure_hint(db, e)
        rep.send(("fatal", f"cannot open the audit store {db}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}"
                           + (f" — {hint}" if hint else "")))
        return 1
    seq, head = store.head(w._con) if w._con is not None else (0, store.GENESIS)  # noqa: SLF001
    # What an earlier writer process of this gateway run committed (its batches record
    # their highest record number): those records are not written again when the gateway
    # re-sends what was not acknowledged — a crash between commit and acknowledgement
    # leaves no duplicate.
    done = 0
    run = cfg.get("run")
    if isinstance(run, str) and run:
        w.progress_key = f"writer-run:{run}"
        got = w._con.execute("SELECT value FROM audit_meta WHERE key = ?",  # noqa: SLF001
                             [w.progress_key]).fetchone() if w._con is not None else None  # noqa: SLF001
        done = int(got[0]) if got else 0
    rep.base = done
    rep.send(("ready", seq, head, done))
    log.debug("agentgate: audit writer: %d KiB of library pages dropped after open",
              drop_library_pages())
    threading.Thread(target=rep.run, name="agentgate-audit-report", daemon=True).start()
    shippers: list[lake.LakeShipper] = []
    try:
        pump(inp, w, rep, done, db, shippers)
    finally:
        # the gateway closed the pipe or died: write everything read, then exit
        ok = w.close(DRAIN_TIMEOUT)
        log.info("agentgate: audit writer: %d of %d split bodies cut past an earlier turn; "
                 "%d heap trims", SPLITS.resumed, SPLITS.cuts, rep.trims)
        rep.close()
        rep.report()
        for shipper in shippers:
            shipper.stop()  # ships what the last batches added
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
