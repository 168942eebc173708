"""The gateway's side of the audit writer process (no DuckDB in the gateway process).

`WriterProcess` has the interface the recorder addon needs (start, submit, overloaded,
flush, close, backlog, failure): `submit()` serialises a snapshot (addons/recording/wire.py,
a few µs, on the event loop) and writes the frame to the process's stdin itself — the pipe
is non-blocking, so the write either goes into the pipe's buffer at once or not at all.
Only what does not fit (the pipe is full: the process is behind), or what must wait for
earlier frames still queued, goes to the outbox and wakes the sender thread, which waits
for room (poll, GIL released) and writes it. Waking a thread per flow cost the event loop's
thread more than the write itself (a condition variable's notify, then the GIL handed back
and forth), and the order of the stream is kept: a frame is written directly only when
nothing is queued before it and the sender is not writing. A reader thread takes the
process's acknowledgements.

Fail closed, bounded:
- Every record stays in memory, as bytes, until the writer process says it is written
  (`_unacked`). The backlog — records and bytes not yet acknowledged — is bounded by
  recorder.max_pending / max_pending_bytes; over either, new flows are refused (503).
- While the store fails (the process reports why) or the process is not running, new flows
  are refused. A process that exits is restarted with a bounded back-off (0.5 s doubling to
  30 s); every record it had not acknowledged is sent to the new one, in order, so nothing
  accepted is lost. Each batch commits the highest record number it holds (`audit_meta`,
  key `writer-run:<run id>`, in the same transaction); the new process reports it, so a
  record committed in the instant before the exit is neither lost nor written twice.
- `close()` (the addon's `done`, SIGTERM / SIGINT) sends what is queued, closes the pipe and
  waits for the process to write it all and exit. If the gateway dies without `close()` (even
  SIGKILL), the pipe closes with it: the process writes what it read and exits by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from addons.recording import store, wire

log = logging.getLogger("agentgate.recorder")

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the addons package
START_TIMEOUT = 60.0  # seconds for the process to open the store (a WAL replay may take time)
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
PIPE_SIZE = 1 << 20  # bytes the pipe to the process may hold (where the system allows)
# Frames up to this size are written by submit() itself: below it the sender's wake-up
# costs more than the copy into the pipe; above it (a long conversation's history) the
# copy dominates and is better done by the sender, beside the event loop (GIL released)
DIRECT_MAX = 32 * 1024
# the writer process's DuckDB allocator (see _spawn): freed pages back within ~1 s
JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"


def _write_all(fd: int, data: bytes) -> None:
    """Write all of data to a non-blocking pipe, waiting for room (GIL released) when it is
    full; OSError when the reader is gone. poll, not select: no FD_SETSIZE limit."""
    view = memoryview(data)
    waiter: select.poll | None = None
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if waiter is None:
                waiter = select.poll()
                waiter.register(fd, select.POLLOUT)
            waiter.poll(1000)


class WriterStartError(RuntimeError):
    """The writer process could not open the store (the message says why) or did not start."""


class WriterProcess(store.BacklogBound):
    def __init__(self, path: str | Path, *, batch_size: int = 500, interval: float = 0.2,
                 max_pending: int = 100_000, retention_days: float = 0,
                 serve_queries: bool = True, max_batch_bytes: int = 8 * 1024 * 1024,
                 max_pending_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.interval = interval
        self.max_pending = max_pending
        self.retention_days = retention_days
        self.serve_queries = serve_queries
        self.max_batch_bytes = max_batch_bytes
        self.max_pending_bytes = max_pending_bytes
        self.failure: str | None = None  # the store's, or the process's
        self.pending_bytes = 0
        self.written = 0
        self.restarts = 0
        self.run = uuid.uuid4().hex  # this gateway run's records, numbered 1, 2, 3 …
        self._n = 0  # records submitted
        self._acked = 0  # records the process wrote (every one up to this number)
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._outbox: deque[tuple[int, bytes]] = deque()  # not yet sent to this process
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # acknowledgements, restarts, closing
        # the sender waits on its own condition: an acknowledgement does not wake it
        self._send_cv = threading.Condition(self._lock)
        self._sending = False  # the sender holds frames taken from the outbox (not yet written)
        self._fd = -1  # the current process's stdin (non-blocking), -1 when none
        self._proc: subprocess.Popen[bytes] | None = None
        self._gen = 0  # which process the outbox is for
        self._closing = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._lake: tuple[dict[str, Any], str] | None = None

    # -- process
    def _config(self) -> dict[str, Any]:
        return {"run": self.run, "batch_size": self.batch_size, "interval": self.interval,
                "max_batch_bytes": self.max_batch_bytes,
                "retention_days": self.retention_days, "serve_queries": self.serve_queries}

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int, int]:
        """Start the process and wait until its store is open; raises with its reason."""
        env = dict(os.environ)
        # DuckDB allocates through the jemalloc linked into it, which keeps freed pages for
        # DuckDB's decay time before giving them back: the writer's inserts and
        # checkpoints free and allocate all day, and its RSS stood ~30-40 MiB above what
        # it uses (8,000 1 KB rows in process: peak 203 -> 168 MiB at 100 ms, same CPU
        # per row; at 0 ms 155 MiB but +15 % CPU). 1,000 ms, not 100: a gateway's batches
        # come every ~0.2 s, and at 100 ms each batch found its pages given back and
        # faulted them in again (1 KB chat flows at 650/s: 15 faults a flow, 294 us of
        # writer CPU; at 1,000 ms 6.7 faults, 257 us; peak 89-93 -> 92-93 MiB; replaying
        # a 1 KB + 100 KB load back to back: 125 -> 140-145 MiB). An operator's own
        # setting is kept.
        env.setdefault("DUCKDB_JE_MALLOC_CONF", JEMALLOC_CONF)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.Popen(
            # -P: not the working directory first on sys.path (an `addons` package there
            # would be imported instead of ours); ROOT leads PYTHONPATH: the same code runs
            [sys.executable, "-P", "-m", "addons.recording.writerproc", str(self.path),
             json.dumps(self._config())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, bufsize=0)
        assert proc.stdout is not None and proc.stdin is not None
        # the event loop writes frames itself and must never wait for the process
        os.set_blocking(proc.stdin.fileno(), False)
        # a larger pipe (Linux; up to fs.pipe-max-size, 1 MiB by default) holds what
        # arrives while the process naps between reads (writerproc.READ_NAP): the direct
        # write keeps succeeding and the sender thread stays asleep
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        first: list[tuple[Any, ...] | None] = []
        t = threading.Thread(target=lambda: first.append(wire.read_frame(proc.stdout)),
                             daemon=True)
        t.start()
        t.join(START_TIMEOUT)
        msg = first[0] if first else None
        if msg is None or msg[0] != "ready":
            with contextlib.suppress(Exception):
                proc.kill()
            proc.wait(10)
            if msg is not None and msg[0] == "fatal":
                raise WriterStartError(str(msg[1]))
            raise WriterStartError(f"cannot open the audit store {self.path}: the audit "
                                   f"writer process did not start (exit code "
                                   f"{proc.returncode})")
        return proc, int(msg[1]), int(msg[3])  # head seq, records of this run committed

    def start(self) -> None:
        """Start the writer process (raises when the store cannot be opened)."""
        proc, seq, head = self._spawn()
        with self._lock:
            self._proc = proc
            self._fd = proc.stdin.fileno() if proc.stdin is not None else -1
            self._gen += 1
        for target, name in ((self._send_loop, "agentgate-audit-send"),
                             (self._read_loop, "agentgate-audit-acks")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("agentgate: recording to %s (head seq %d; writer process %d)", self.path, seq,
                 proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backlog(self) -> int:
        return self._n - self._acked

    def submit(self, item: store.Pending | store.Direct) -> None:
        """Send a record (serialised now: later changes to the flow cannot race). It stays
        in the backlog until the process acknowledges it."""
        with self._lock:
            # under the lock: numbered, kept and sent in one step, never after close()
            # let the sender close the pipe
            if self._closed or self._closing:
                raise RuntimeError("audit writer is closed")
            n = self._n + 1
            data = self._encode(n, item)
            self._n = n
            self.pending_bytes += len(data)
            self._unacked.append((n, data))
            self._send(data)

    def _encode(self, n: int, item: store.Pending | store.Direct) -> bytes:
        if isinstance(item, store.Direct):
            data = wire.frame(wire.direct_msg(n, item))
        else:
            try:
                data = wire.frame(wire.pending_msg(n, item))
            except ValueError as e:
                # an object that is not plain data in the snapshot: the row could not be
                # built from it anyway (store.dump_state refuses it too): minimal record
                log.error("agentgate: could not build the audit record of a flow (%s); "
                          "storing a minimal record", type(e).__name__)
                row = store.fallback_row(item, "record build failed: TypeError")
                d = store.Direct(row=row, id=row["id"], session=item.session,
                                 recorded_at=item.recorded_at, size=item.size)
                data = wire.frame(wire.direct_msg(n, d))
        return data

    def _send(self, data: bytes) -> None:
        """Write a frame to the process now, or queue it for the sender (lock held).

        Directly only when it is small (DIRECT_MAX), nothing is queued before it and the
        sender holds nothing: the stream's order is the order of the calls. A write that
        fails (the process is gone) is not retried here: the reader restarts the process
        and re-sends every record not acknowledged, this one included; a control frame is
        re-sent as the new process's configuration. A partial write leaves the rest first
        in the outbox."""
        if len(data) <= DIRECT_MAX and not self._outbox and not self._sending \
                and self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0  # the pipe is full: the sender waits for room
            except OSError:
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._outbox.append((0, data))
        if not self._sending:
            self._send_cv.notify()

    def set_lake(self, lake: dict[str, Any], replica: str) -> None:
        """Have the process ship its store to this audit lake (kept across restarts)."""
        with self._lock:
            self._lake = (lake, replica)
            self._send(wire.frame(("lake", lake, replica)))

    def reconfigure(self) -> None:
        """Send the current batch settings to the process (after the rules changed)."""
        with self._lock:
            self._send(wire.frame(("cfg", self._config())))

    def flush(self, timeout: float = 30) -> bool:
        """Wait until everything submitted so far is written (True) or timeout (False)."""
        target = self._n
        deadline = time.monotonic() + timeout
        with self._lock:
            self._send(wire.frame(("flush",)))
            while self._acked < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = 60) -> bool:
        """Send everything queued, let the process write it and exit. True when nothing
        was left unwritten."""
        if self._closed:
            return True
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True
            self._cv.notify_all()
            self._send_cv.notify_all()
        # the sender closes the pipe once the outbox is empty; the process then drains
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                log.error("agentgate: the audit writer process did not finish in %.0f s; "
                          "stopping it", timeout)
                proc.kill()
                proc.wait(10)
        self._closed = True
        left = self.backlog
        if left:
            log.error("agentgate: %d audit records could not be written before exit (%s)",
                      left, self.failure or "timeout")
        else:
            log.info("agentgate: audit store flushed and closed (%d records this run)",
                     self.written)
        return left == 0

    # -- threads
    def _send_loop(self) -> None:
        """Write what submit() could not (the pipe was full, or frames were queued before
        it) to the current process; close its stdin at shutdown."""
        while True:
            with self._lock:
                self._sending = False
                while not self._outbox and not self._closing:
                    self._send_cv.wait()
                if not self._outbox and self._closing:
                    proc = self._proc
                    break
                proc, gen, fd = self._proc, self._gen, self._fd
                chunk = []
                size = 0
                while self._outbox and size < 1 << 20:
                    n, data = self._outbox.popleft()
                    chunk.append(data)
                    size += len(data)
                self._sending = True  # submit() queues behind these until they are written
            try:
                _write_all(fd, b"".join(chunk))
            except (OSError, ValueError):
                # the process died: the reader restarts it and re-queues what it had not
                # acknowledged (this chunk included); wait for that
                with self._lock:
                    while self._gen == gen and not self._closed:
                        if self._closing and self._proc is proc and proc is not None \
                                and proc.poll() is not None:
                            self._sending = False
                            return
                        self._cv.wait(0.5)
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()

    def _read_loop(self) -> None:
        """Take acknowledgements; when the process exits unexpectedly, restart it."""
        backoff = BACKOFF_MIN
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            while True:
                try:
                    msg = wire.read_frame(proc.stdout)
                except (OSError, ValueError):
                    msg = None
                if msg is None:
                    break
                if msg[0] == "ack":
                    self._acked_upto(int(msg[1]), msg[2])
                    backoff = BACKOFF_MIN
            code = proc.wait()
            if self._closing:
                return
            why = f"the audit writer process exited (code {code}); restarting it"
            log.error("agentgate: %s; refusing new flows until it runs", why)
            self.failure = why
            while not self._closing:
                time.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                try:
                    new, seq, done = self._spawn()
                except Exception as e:  # noqa: BLE001 - keep trying, bounded back-off
                    self.failure = f"the audit writer process cannot start: {e}"
                    log.error("agentgate: %s; retrying in %.1f s", self.failure, backoff)
                    continue
                self._acked_upto(done, None)  # committed just before the exit: not resent
                with self._lock:
                    self._proc = new
                    self._fd = new.stdin.fileno() if new.stdin is not None else -1
                    self._gen += 1
                    # everything not acknowledged goes to the new process, in order
                    self._outbox = deque(self._unacked)
                    self._outbox.appendleft((0, wire.frame(("cfg", self._config()))))
                    if self._lake is not None:
                        self._outbox.appendleft((0, wire.frame(("lake", *self._lake))))
                    self.restarts += 1
                    self._cv.notify_all()
                    self._send_cv.notify_all()
                self.failure = None
                log.warning("agentgate: audit writer process restarted (pid %d, head seq %d, "
                            "%d records sent again)", new.pid, seq, len(self._unacked))
                break
            else:
                return

    def _acked_upto(self, n: int, failure: Any) -> None:
        with self._lock:
            while self._unacked and self._unacked[0][0] <= n:
                _, data = self._unacked.popleft()
                self.pending_bytes -= len(data)
                self.written += 1
            if n > self._acked:
                self._acked = n
            self._cv.notify_all()
        if failure:
            if self.failure != failure:
                self.failure = str(failure)
        elif self.failure and not self.failure.startswith("the audit writer process"):
            self.failure = None
