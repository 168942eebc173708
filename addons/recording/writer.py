"""Background writer for the audit store, and the local query socket.

It runs in the audit writer process (addons/recording/writerproc.py; the gateway's side is
remote.py), which submits every record the gateway sends it (a deque append, no I/O); one
thread builds the rows (redaction, decoding, hashing) and appends them to DuckDB in batches,
one transaction per batch. If a batch cannot be written it stays queued and is retried; while
the store is failing `failure` says why, and the recorder refuses new flows (fail closed).
`close()` writes everything still queued before it returns (mitmproxy calls the addon's
`done()` on SIGTERM / SIGINT).

DuckDB lets one process hold a database file open for writing and no other process may open
it meanwhile, not even read-only. So while the gateway runs, `agentgate audit …` talks to its
writer process over a Unix socket next to the database (`<db>.sock`, mode 0600, in the data
directory), which answers read-only requests from a second connection to the same database; when
the gateway is not running the CLI opens the file read-only itself. Queries run with
`enable_external_access=false` (no file reads/writes, no ATTACH, no extension installs) and
only SELECT/EXPLAIN statements are accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import socketserver
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb

from addons.recording import store

log = logging.getLogger("agentgate.recorder")


def _no_pandas_lookups() -> None:
    """Make DuckDB's parameter binding stop searching for pandas on every value.

    DuckDB's Python binding checks each bound Python value against pandas types by
    importing pandas; when pandas is not installed the failed import is not cached, so
    every value of every batch walked sys.path again (~50 us per value, ~2 ms of CPU per
    1 KB flow, all of it holding the GIL the event loop needs). Marking the absent module
    as absent makes that import fail at once (Python's documented sys.modules[name] = None).
    Only when pandas really is not installed: an installed pandas is imported and cached.
    """
    import importlib.util
    import sys
    if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:
        sys.modules["pandas"] = None  # type: ignore[assignment]


_no_pandas_lookups()

# DuckDB's defaults are a buffer pool of 80% of RAM and one worker thread per core: in a
# gateway that inserts all day the pool grows with the file (a 10-minute soak drifted 42%)
# and its threads compete with the event loop. Bounded and single-threaded instead.
# A store created now uses DuckDB's storage format v1.2.0, the first with ZSTD for strings
# (store.ZSTD_COLUMNS: the flow states take a tenth of the room); read by DuckDB >= 1.2. A
# file made earlier keeps its format (and its columns their compression).
# allocator_background_threads: DuckDB hands the memory its inserts and checkpoints freed
# back to the system from a thread of its own, instead of only when a later task ends:
# the writer process's RSS after a burst of 1 KB flows falls back ~20-50 MiB further than
# with malloc_trim alone (the Reporter's), for the same CPU.
# Row groups stay merged at checkpoints (DuckDB's max_vacuum_tasks, left at its default).
# Merging off removed a transient +25-45 MiB at merging checkpoints, but then every
# checkpoint added a row group whose metadata stays pinned and whose blocks stay loaded:
# the writer grew with uptime until memory_limit, where COMMIT fails ("failed to pin
# block", ~240 checkpoints in a replay) and the gateway refuses every flow.
# tests/recording/test_store_memory_layout.py keeps the row groups few.
# default_block_size 64 KiB (a store created now; a file keeps the block size it was made
# with): the rows appended since the last checkpoint live in one block per column being
# filled, and the flows table has ~40 columns with their validity masks, so with DuckDB's
# 256 KiB blocks those partly filled blocks alone held ~20 MiB. Replay of a 1 KB + 100 KB
# load: the file 6.7 -> 3.9 MB, CPU within noise; the writer's peak is set by the merges
# (160 -> 162 MiB, same), its resting size between them is lower (with merging off, where
# nothing else hid it: 147 -> 128 MiB). 16 KiB blocks lost again.
# memory_limit 32 MB (was 64): what DuckDB keeps loaded between checkpoints, and what a
# merging checkpoint loads back, is held to it; replay of a 1 KB + 100 KB load's frames
# (12,657 records, 3 rounds each): peak 164-186 -> 138-148 MiB, CPU within noise (a bit
# more system time: DuckDB evicts sooner). 250,000 bench rows with automatic checkpoints
# (two full row groups merged) wrote without an error; verify and export read windows of
# seq numbers (store.rows_by_seq), tested under 24 MB; a batch larger than the limit is
# written in halves (AuditWriter._write_rows).
DB_CONFIG = {"enable_external_access": False, "memory_limit": "32MB", "threads": 1,
             "storage_compatibility_version": "v1.2.0", "allocator_background_threads": True,
             "default_block_size": 65536}
# A batch (or a checkpoint) that does not fit the limit must not stop recording, which
# would refuse every flow until restart: the writer raises the limit, doubling, up to this
# (AuditWriter._grow_memory, logged); a single row that needs more is stored reduced.
MAX_MEMORY_LIMIT_MB = 128


def _base_limit_mb() -> int:
    """DB_CONFIG's memory_limit ("32MB") in MB."""
    return int(str(DB_CONFIG["memory_limit"]).upper().removesuffix("MB"))


def out_of_memory(error: BaseException) -> bool:
    """DuckDB ran out of its memory_limit (or a fatal error it reports was that: a
    checkpoint that could not pin its blocks invalidates the database)."""
    text = str(error).lower()
    return isinstance(error, duckdb.OutOfMemoryException) or any(
        m in text for m in ("out of memory", "failed to pin block", "could not allocate"))


# Readers need more than appends: verify's joins hold ~22 MB of their own whatever the
# store's size (a 32-row store failed verify under 24 MB). A reading connection (the CLI
# with the gateway stopped) gets this limit, and while an audit query or a lake shipment
# reads in the writer process, the instance has it (AuditWriter.reading).
READ_MEMORY_LIMIT_MB = 64

# A store made before 64 KiB blocks (DuckDB's default, 256 KiB) keeps its blocks, and a
# checkpoint pins about a block per column at once: under 32 MB its checkpoint failed
# FATAL ("failed to pin block of size 256.0 KiB (30.2 MiB/30.5 MiB used)"). Such a store
# is written with the limit it had, 64 MB.
LARGE_BLOCK_MEMORY_LIMIT_MB = 64


def writer_limit_mb(con: duckdb.DuckDBPyConnection) -> int:
    """The memory_limit (MB) the writer needs for the store `con` has open."""
    base = _base_limit_mb()
    size = con.execute("SELECT block_size FROM pragma_database_size() "
                       "WHERE database_name = current_database()").fetchone()[0]
    if size > int(DB_CONFIG["default_block_size"]):
        return max(base, LARGE_BLOCK_MEMORY_LIMIT_MB)
    return base


def socket_path(db_path: str | Path) -> str:
    """Where the gateway serving db_path listens; short enough for AF_UNIX (108 bytes)."""
    p = str(Path(db_path).resolve())
    candidate = p + ".sock"
    if len(candidate.encode()) < 100:
        return candidate
    digest = hashlib.sha256(p.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"agentgate-{os.getuid()}-{digest}.sock")


# The writer's rows go into row groups of 4,096 rows (DuckDB's default: 122,880). A
# checkpoint rewrites the row groups that changed since the last one, and merges
# consecutive ones that fit in fewer (vacuum): with the default size every checkpoint
# (every 16 MB of WAL, ~3,400 1 KB flows) rewrote the whole growing row group, so the
# writer's CPU per flow grew with the rows stored until the group filled — in process,
# 40,000 bench 1 KB rows in batches of 120: checkpoints 150 us of the 260 us per row, one
# of 2.5 s; DuckDB evicted the group's blocks to temporary files and read them back
# (~1,500 files per 8,000 rows) under the 32 MB limit. With 4,096-row groups a checkpoint
# rewrites at most one partial group: 18 us of 147 us per row, flat (2,048: more
# checkpoints rewriting partial groups, 48 us; 8,192 and 16,384 still merged large
# groups). The size is an option of ATTACH, not of connect() (and not kept in the file):
# the writing connection is an in-memory instance that attaches the store (open_db).
ROW_GROUP_SIZE = 4096
STORE_ALIAS = "audit"  # the attached store's name on the writing connection


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _attach_writing(path: str | Path) -> duckdb.DuckDBPyConnection:
    """The writing connection: an instance of its own (DB_CONFIG; its temporary files
    where DuckDB puts a file's, `<store>.tmp`) with the store attached, in use, and
    external access off once it is. Two opens of one file in one process are refused by
    DuckDB ("Unique file handle conflict"), as another process's are by its lock."""
    # (external access is on only for the ATTACH; no extension is loaded or installed for
    # it, and TYPE duckdb: a file of another format is refused, not opened through an
    # extension found on the machine)
    cfg = dict(DB_CONFIG, enable_external_access=True, temp_directory=f"{path}.tmp",
               autoload_known_extensions=False, autoinstall_known_extensions=False)
    con = duckdb.connect(":memory:", config=cfg)
    try:
        con.execute(f"ATTACH {_sql_text(str(path))} AS {STORE_ALIAS} "
                    f"(TYPE duckdb, ROW_GROUP_SIZE {ROW_GROUP_SIZE})")
        con.execute(f"USE {STORE_ALIAS}")
        con.execute("SET enable_external_access = false")
    except BaseException:
        con.close()
        raise
    return con


def store_cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Another connection to `con`'s instance (a cursor), using the same database: a new
    cursor starts in the instance's default database, which on the writing connection
    is its empty in-memory one (_attach_writing: `flows` is not found there)."""
    name = con.execute("SELECT current_database()").fetchone()[0]
    cur = con.cursor()
    try:
        cur.execute(f'USE "{name.replace(chr(34), chr(34) * 2)}"')
    except BaseException:
        cur.close()
        raise
    return cur


def open_db(path: str | Path, read_only: bool = False,
            memory_limit_mb: int | None = None) -> duckdb.DuckDBPyConnection:
    """`memory_limit_mb`: the writer's limit when it differs from DB_CONFIG's (raised, or
    the store's blocks need more: writer_limit_mb, the default for a writing connection).
    It is set after connecting: the process's other connections are cursors of this one
    (store_cursor) and share its instance."""
    if read_only:
        con = duckdb.connect(str(path), read_only=True, config=dict(DB_CONFIG))
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        con = _attach_writing(path)
    if memory_limit_mb is None:
        memory_limit_mb = READ_MEMORY_LIMIT_MB if read_only else writer_limit_mb(con)
    if memory_limit_mb != _base_limit_mb():
        con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MB'")
    if not read_only:
        store.init_schema(con)
    return con


def open_failure_hint(path: str | Path, error: BaseException) -> str:
    """What to do when DuckDB cannot open the audit store `path` (`error`: what it
    raised), for the gateway's and the CLI's message; "" when nothing useful is known."""
    text = str(error)
    aside = (f"move it aside with its WAL (mv {path} {path}.old; "
             f"mv {path}.wal {path}.old.wal if it exists): the gateway then starts a new "
             "store, whose hash chain starts over")
    if "version number" in text or "newer version" in text:
        return (f"the file was written by a newer DuckDB than this one ({duckdb.__version__}):"
                f" open it with the agentgate that wrote it, or {aside}")
    if any(m in text for m in ("not a valid DuckDB database", "Corrupt database",
                               "Could not read enough bytes", "checksum")):
        return (f"the file is damaged or not a DuckDB database (truncated, or another file "
                f"under that name): keep it for investigation and {aside}")
    if "lock" in text.lower():
        return ("another process has it open (a gateway using the same data directory?): "
                "stop it, or give this one its own AGENTGATE_DATA")
    return ""


# ---------------------------------------------------------------- read-only operations
def handle_op(con: duckdb.DuckDBPyConnection, req: dict[str, Any]) -> dict[str, Any]:
    """One read-only request (shared by the socket server and the CLI's direct mode)."""
    op = req.get("op")
    if op == "ping":
        return {"ok": True}
    if op == "query":
        cols, rows = store.run_query(con, str(req.get("sql", "")),
                                     int(req.get("max_rows", 100_000)))
        return {"columns": cols, "rows": rows}
    if op == "verify":
        return {"result": store.verify(con).to_dict()}
    if op == "sessions":
        cols, rows = store.sessions(con, int(req.get("limit", 50)), req.get("since"))
        return {"columns": cols, "rows": rows}
    if op == "export":
        if "limit" not in req:  # a CLI from before pages: everything in one answer
            return {"rows": store.export_rows(con, req.get("session"), req.get("since"))}
        after = req.get("after")
        rows, nxt = store.export_page(con, req.get("session"), req.get("since"),
                                      None if after is None else int(after),
                                      min(max(int(req["limit"]), 1), 10_000))
        return {"rows": rows, "next": nxt}
    raise ValueError(f"unknown operation {op!r}")


class _Handler(socketserver.StreamRequestHandler):
    server: QueryServer

    def handle(self) -> None:
        line = self.rfile.readline(1 << 20)
        try:
            req = json.loads(line)
            with self.server.lock:
                con = store_cursor(self.server.db)  # own connection to the same database
            try:
                with self.server.reading():
                    # One snapshot for multi-statement operations (verify), rolled back.
                    con.execute("BEGIN TRANSACTION")
                    try:
                        out = handle_op(con, req)
                    finally:
                        con.execute("ROLLBACK")
            finally:
                con.close()
        except Exception as e:  # noqa: BLE001 - report to the CLI, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(store.to_jsonable(out)).encode() + b"\n")


class QueryServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, db: duckdb.DuckDBPyConnection) -> None:
        self.db = store_cursor(db)  # only ever used to open one connection per request
        self.lock = threading.Lock()
        # held around each request (AuditWriter.reading: the readers' memory_limit)
        self.reading: Callable[[], contextlib.AbstractContextManager[Any]] = \
            contextlib.nullcontext
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale socket of a gateway that died; we hold the DB lock now
        old = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


def _check_owner(path: str, db_path: str | Path) -> None:
    """Refuse a socket that is not owned by the store's owner (the gateway's user): with a
    long store path the name is in the shared temporary directory, where another local
    user could bind it first, read every question (SQL) and answer anything ("OK")."""
    st = os.lstat(path)
    try:
        owner = os.stat(db_path).st_uid
    except OSError:
        owner = os.getuid()
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner:
        raise ConnectionError(f"{path} is not owned by the audit store's owner (uid {owner}, "
                              f"not {st.st_uid}) or is not a socket: not asked")


def ask_gateway(db_path: str | Path, req: dict[str, Any], timeout: float = 300
                ) -> dict[str, Any] | None:
    """Send a request to the gateway serving db_path; None when no gateway listens."""
    path = socket_path(db_path)
    if not os.path.exists(path):
        return None
    _check_owner(path, db_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        return None
    with s, s.makefile("rwb") as f:
        f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        line = f.readline()
    if not line:
        raise ConnectionError("the gateway closed the query socket without answering")
    return store.from_jsonable(json.loads(line))


# ---------------------------------------------------------------- writer
# Retention runs this often (seconds); before it deletes anything, the rows built ahead
# that wait in the queue are written, for at most RETENTION_DRAIN_SECONDS.
RETENTION_EVERY = 3600
RETENTION_DRAIN_SECONDS = 30


def row_bytes(row: dict[str, Any]) -> int:
    """About how many bytes a row takes (its text and blob values, and its new blobs)."""
    return sum(len(v) for v in row.values() if isinstance(v, str | bytes | bytearray)) + \
        sum(len(b[1] or b"") + 200 for b in row.get("_blobs") or ())


class AuditWriter(store.BacklogBound):
    """Appends pending flows to the store from one background thread."""

    def __init__(self, path: str | Path, *, build: Callable[[store.Pending], dict[str, Any]],
                 batch_size: int = 500, interval: float = 0.2, max_pending: int = 100_000,
                 retention_days: float = 0, serve_queries: bool = True,
                 max_batch_bytes: int = 8 * 1024 * 1024,
                 max_pending_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.build = build
        self.batch_size = batch_size
        self.interval = interval
        self.max_pending = max_pending
        self.retention_days = retention_days
        self.serve_queries = serve_queries
        # A batch is one INSERT of columnar lists: its size, not only its row count, must
        # stay well inside DuckDB's memory_limit (DB_CONFIG).
        self.max_batch_bytes = max_batch_bytes
        # Snapshots hold whole bodies until the writer caps them: the backlog is bounded in
        # bytes too, not only in records (fail closed: 503 while it is full).
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self.memory_limit_mb = _base_limit_mb()
        self._readers = 0  # audit queries and lake shipments reading now (reading())
        self._readers_lock = threading.Lock()
        self._settings: duckdb.DuckDBPyConnection | None = None  # for SET, off the thread
        self._limit_high = False  # the readers' limit could not be lowered yet
        self.failure: str | None = None
        self.written = 0
        self._queue: deque[store.Pending | store.Direct] = deque()
        self._retry: list[dict[str, Any]] = []  # built rows of a batch that failed to write
        self._cv = threading.Condition()
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._server: QueryServer | None = None
        self._head: tuple[int, str] = (0, store.GENESIS)
        self._known = store.BlobCache()  # blob addresses committed: not sent again
        # Held while a row is built (rows are built by the writer thread and, ahead of
        # their batch, by the writer process's reading thread: `prebuilt`; the build's
        # split cache is one per process) and while retention deletes blobs: a row built
        # ahead may leave out a blob the cache says is stored, so none may be deleted
        # under it. Re-entrant: retention writes the queued rows while holding it.
        self.build_lock = threading.RLock()
        # the batch INSERTs prepared on self._con (bound once, not per batch)
        self._stmts: store.BatchStatements | None = None
        self._last_retention = 0.0
        # audit_meta key under which each batch commits the highest `sub` it holds (the
        # gateway's record number, set by the writer process); None: not tracked
        self.progress_key: str | None = None
        # called on the writer thread after each batch was written or failed (`written`
        # or `failure` may have changed): the writer process acknowledges at once instead
        # of looking every few milliseconds
        self.on_progress: Callable[[], None] | None = None

    # -- lifecycle
    def start(self) -> None:
        """Open the store (raises on failure) and start the thread and the query socket."""
        self._con = open_db(self.path)
        self.memory_limit_mb = writer_limit_mb(self._con)
        self._settings = store_cursor(self._con)
        self._head = store.head(self._con)
        self._apply_retention()
        if self.serve_queries:
            try:
                self._server = QueryServer(socket_path(self.path), self._con)
                self._server.reading = self.reading
                # (the poll interval only bounds how long close() waits for the loop to
                # see its shutdown: 20 wake-ups a second cost the idle process ~1 ms/s)
                threading.Thread(target=self._server.serve_forever, args=(0.5,),
                                 name="agentgate-audit-query",
                                 daemon=True).start()
            except OSError as e:
                log.warning("agentgate: audit query socket unavailable (%s); `agentgate audit` "
                            "works only while the gateway is stopped", e)
                self._server = None
        self._thread = threading.Thread(target=self._run, name="agentgate-audit-writer",
                                        daemon=True)
        self._thread.start()
        log.info("agentgate: recording to %s (head seq %d)", self.path, self._head[0])

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._retry)

    def build_row(self, item: store.Pending) -> dict[str, Any]:
        """The row of a finished flow; a minimal record when building fails (a flow is
        never dropped)."""
        try:
            with self.build_lock:
                return self.build(item)
        except Exception as e:  # noqa: BLE001 - never drop a flow: minimal record
            log.error("agentgate: could not build the audit record of a flow (%s); "
                      "storing a minimal record", type(e).__name__)
            return store.fallback_row(item, f"record build failed: {type(e).__name__}")

    def prebuilt(self, item: store.Pending) -> store.Direct:
        """`item`'s row, built now rather than when its batch is written, as a record to
        submit in its place. The writer process builds each flow's row as it reads it:
        what waits for a batch is then the row, which keeps only what is new (a long
        conversation's turn re-sends ~120 KB of history and adds a few KB), not the whole
        snapshot: -4 to -7 MiB of the process's peak in the multi-turn bench. The price,
        ~50 us of the process's CPU a late turn there (+10 %): built earlier, a row finds
        fewer of the turns before it committed, so it lists their blobs too (the write
        drops the ones committed by then), and the two threads hand the GIL over."""
        row = self.build_row(item)
        return store.Direct(row=row, id=str(row.get("id") or ""), session=item.session,
                            size=row_bytes(row))

    def submit(self, item: store.Pending | store.Direct) -> None:
        """Queue a finished flow (or a record that is not a flow); never blocks on disk."""
        if self._closed:
            raise RuntimeError("audit writer is closed")
        self.pending_bytes += item.size
        self._queue.append(item)
        if self.full():
            with self._cv:
                self._cv.notify_all()

    def full(self) -> bool:
        """A whole batch is queued, by records or by bytes: write it now, not at the
        interval (a few large bodies fill a batch long before batch_size records do)."""
        return len(self._queue) >= self.batch_size or \
            self.pending_bytes >= self.max_batch_bytes

    def wait_room(self, timeout: float | None = None) -> bool:
        """Block while a whole batch already waits behind the one being written; True once
        there is room. The writer process reads its pipe only this far ahead, so what it
        holds stays near two batches (max_batch_bytes each) however far the store lags:
        the rest waits, as bytes, in the gateway's bounded backlog, which refuses flows
        when full (fail closed). It does not wait while the store is failing or closing
        (the gateway then refuses new flows, which bounds the total; and the process must
        still read its pipe to the end to notice that the gateway has gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.full() and not self.failure and not self._closing and (
                    self._thread is not None and self._thread.is_alive()):
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def flush(self, timeout: float = 30) -> bool:
        """Wait until everything submitted so far is written (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
        while self.backlog or self._busy:
            if time.monotonic() > deadline:
                return False
            with self._cv:
                self._cv.notify_all()
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 60) -> bool:
        """Write everything queued, then stop. True when nothing was left unwritten."""
        if self._closed:
            return True
        self._closing = True
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.backlog
        self._closed = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with contextlib.suppress(OSError):
                os.unlink(socket_path(self.path))
        if self._con is not None and (self._thread is None or not self._thread.is_alive()):
            with contextlib.suppress(Exception):
                self._con.execute("CHECKPOINT")
            if self._settings is not None:
                with contextlib.suppress(Exception):
                    self._settings.close()
            self._con.close()
        if left:
            log.error("agentgate: %d audit records could not be written before exit (%s)",
                      left, self.failure or "timeout")
        else:
            log.info("agentgate: audit store flushed and closed (%d records this run, "
                     "head seq %d hash %s)", self.written, self._head[0], self._head[1])
        return left == 0

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Another connection to the store's instance, for a reader of this process (the
        lake shipper, a round at a time: an instance is held while any of its connections
        is open, and a reopen cannot attach the store while the old one holds it). Made
        from the settings cursor under its lock, never from the writer thread's own."""
        with self._readers_lock:
            if self._settings is None:
                raise RuntimeError("the audit store is not open")
            return store_cursor(self._settings)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Held while an audit query or a lake shipment reads the store in this process:
        the instance's memory_limit is then the readers' (READ_MEMORY_LIMIT_MB, or the
        writer's if raised higher), and the writer's again once the last one is done."""
        with self._readers_lock:
            self._readers += 1
            if self._readers == 1:
                self._set_limit(self._wanted_limit())
        try:
            yield
        finally:
            with self._readers_lock:
                self._readers -= 1
                if self._readers == 0:
                    self._limit_high = not self._set_limit(self._wanted_limit())

    def _wanted_limit(self) -> int:
        """(under _readers_lock) The instance's limit now: the readers' while any reads."""
        return max(self.memory_limit_mb, READ_MEMORY_LIMIT_MB) if self._readers \
            else self.memory_limit_mb

    def _set_limit(self, mb: int) -> bool:
        """(under _readers_lock) A limit below what DuckDB holds is refused when it cannot
        evict enough: the higher one stays, the writer thread tries again after its next
        batch (_lower_limit), and recording goes on."""
        try:
            assert self._settings is not None
            self._settings.execute(f"SET memory_limit = '{int(mb)}MB'")
        except Exception as e:  # noqa: BLE001 - a setting, never a reason to fail
            log.debug("agentgate: audit store memory_limit not set to %d MB (%s)", mb,
                      type(e).__name__)
            return False
        return True

    def _lower_limit(self) -> None:
        """The writer's limit again, when lowering it after the last reader failed."""
        with self._readers_lock:
            if self._limit_high and not self._readers:
                self._limit_high = not self._set_limit(self._wanted_limit())

    # -- thread
    _busy = False

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue and not self._retry and not self._closing:
                    self._cv.wait(self.interval)
            if self._closing and not self._queue and not self._retry:
                return
            self._busy = True
            try:
                self._write_some()
            finally:
                self._busy = False
            if self.failure:
                if self._closing and self._retries_exhausted():
                    return
                time.sleep(0.5)  # the store is failing: retry, without spinning
            elif time.time() - self._last_retention > RETENTION_EVERY:
                self._apply_retention()
            if not self._closing and not self.full() and not self.failure:
                # Gather a batch for up to `interval`, unless it filled up meanwhile.
                with self._cv:
                    if not self.full():
                        self._cv.wait(self.interval)

    _fail_count = 0

    def _retries_exhausted(self) -> bool:
        return self._fail_count >= 10

    def _write_some(self) -> None:
        rows = self._retry
        self._retry = []
        size = sum(row_bytes(r) for r in rows)
        while len(rows) < self.batch_size and self._queue and (
                not rows or size < self.max_batch_bytes):
            item = self._queue.popleft()
            self.pending_bytes = max(0, self.pending_bytes - item.size)
            # No time.sleep(0) between rows: CPython's switch interval already bounds how
            # long this thread holds the GIL, and forced hand-offs cost ~7% throughput.
            row = dict(item.row) if isinstance(item, store.Direct) else self.build_row(item)
            sub = getattr(item, "sub", None)  # the gateway's number (writer process)
            if sub is not None:
                row["_sub"] = sub
            if row.get("_blobs"):
                # what the store already holds is not sent (nor counted against the
                # batch's bytes: a long conversation's row lists every blob of its
                # history, ~120 KB, of which a turn adds a few KB)
                row["_blobs"] = [b for b in row["_blobs"] if b[0] not in self._known]
            rows.append(row)
            size += row_bytes(row)
        with self._cv:
            self._cv.notify_all()  # room in the queue (wait_room)
        if not rows:
            return
        if self.failure and self._con_broken():
            # The connection itself may be what failed (e.g. invalidated after an I/O error):
            # reopen it, so the gateway recovers by itself once the store works again.
            self._reopen()
        try:
            left = self._write_rows(rows)
            if left:
                self._retry = left
                self._fail_count += 1
                return
            if self.failure:
                log.warning("agentgate: audit store writable again; accepting flows")
            self.failure = None
            self._fail_count = 0
        finally:
            if self._limit_high:
                self._lower_limit()
            if self.on_progress is not None:
                self.on_progress()

    def _append(self, rows: list[dict[str, Any]]) -> Exception | None:
        """One transaction; on failure the rows are un-chained again and the error returned."""
        try:
            assert self._con is not None
            # blobs already committed are not sent again (append adds this batch's to the
            # cache once it committed)
            for r in rows:
                if r.get("_blobs"):
                    r["_blobs"] = [b for b in r["_blobs"] if b[0] not in self._known]
            subs = [r["_sub"] for r in rows if r.get("_sub") is not None]
            marks = [(self.progress_key, str(max(subs)))] if subs and self.progress_key \
                else []
            if self._stmts is None or self._stmts.con is not self._con:
                self._stmts = store.BatchStatements(self._con)
            # (the cache: what the store holds, for append's choice of blob INSERT)
            self._head = store.append(self._con, rows, self._head, self._known,
                                      **({"marks": marks} if marks else {}),
                                      stmts=self._stmts)
        except Exception as e:  # noqa: BLE001 - the caller decides: split, reduce or retry
            for r in rows:  # re-chained from the last good head on the next attempt
                for k in ("seq", "prev_hash", "hash"):
                    r.pop(k, None)
            with contextlib.suppress(Exception):
                self._head = store.head(self._con)
            return e
        self.written += len(rows)
        return None

    def _write_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write rows in order; returns those left unwritten ([] when all were written).

        One bad row must not block every other flow forever (a poisoned batch used to be
        retried as a whole until restart): a failed batch is split in halves, written in
        order, down to the single row the store refuses; that row is stored reduced
        (bodies, headers and flow state dropped, with a note), then minimal. Only when even
        the minimal row fails is the store itself failing: everything from that row on stays
        queued, in order, and new flows are refused until a retry succeeds.
        """
        err = self._append(rows)
        if err is None:
            return []
        if out_of_memory(err) and self._grow_memory():
            if not self._con_broken():
                return self._write_rows(rows)  # the same batch again, with room
            self._failed(err)  # reopened, with the raised limit, on the next round
            return rows
        if len(rows) > 1:
            mid = len(rows) // 2
            left = self._write_rows(rows[:mid])
            if left:
                return left + rows[mid:]
            return self._write_rows(rows[mid:])
        row = rows[0]
        why = f"the store refused the full record ({type(err).__name__})"
        for minimal in (False, True):
            small = store.reduced_row(row, why, minimal=minimal)
            if row.get("_sub") is not None:
                small["_sub"] = row["_sub"]
            err2 = self._append([small])
            if err2 is None:
                log.error("agentgate: audit record of flow %s stored reduced: %s",
                          small.get("id"), why)
                return []
            err = err2
        self._failed(err)
        return rows

    def _failed(self, e: BaseException) -> None:
        msg = f"cannot write the audit store {self.path}: {type(e).__name__}: " \
              f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        if self.failure != msg:
            log.error("agentgate: %s; refusing new flows until it recovers", msg)
        self.failure = msg

    def _grow_memory(self) -> bool:
        """Double DuckDB's memory_limit (up to MAX_MEMORY_LIMIT_MB) for the rest of this
        run; False when it is at the maximum already."""
        new = min(self.memory_limit_mb * 2, MAX_MEMORY_LIMIT_MB)
        if new <= self.memory_limit_mb:
            return False
        log.warning("agentgate: the audit store needed more than DuckDB's memory_limit of "
                    "%d MB to write a batch; raised to %d MB for this run",
                    self.memory_limit_mb, new)
        with self._readers_lock:
            self.memory_limit_mb = new
            # (a connection the error invalidated: _reopen sets it)
            self._set_limit(self._wanted_limit())
        return True

    def _con_broken(self) -> bool:
        try:
            assert self._con is not None
            self._con.execute("SELECT 1").fetchall()
        except Exception:  # noqa: BLE001 - any failure: reopen
            return True
        return False

    def _reopen(self) -> None:
        """Close and reopen the database connection (and the query socket's handle)."""
        # The query socket's handle goes too, under its lock (a request waits): DuckDB
        # keeps a database instance while any connection to it is open, and connecting
        # again would join that one (an invalidated one stays invalid).
        with self._server.lock if self._server is not None else contextlib.nullcontext(), \
                self._readers_lock:
            for con in (self._server.db if self._server is not None else None,
                        self._settings, self._con):
                if con is not None:
                    with contextlib.suppress(Exception):
                        con.close()
            try:
                self._con = open_db(self.path, memory_limit_mb=self.memory_limit_mb)
                self._settings = store_cursor(self._con)
                if self._readers:
                    self._set_limit(self._wanted_limit())
                self._head = store.head(self._con)
            except Exception as e:  # noqa: BLE001 - still failing: retried on the next round
                self._con = None
                self._failed(e)
                return
            if self._server is not None:
                self._server.db = store_cursor(self._con)
        log.warning("agentgate: audit store connection reopened (head seq %d)", self._head[0])

    def _apply_retention(self) -> None:
        self._last_retention = time.time()
        if self.retention_days <= 0 or self._con is None:
            return
        with self.build_lock:  # no row is built ahead meanwhile (prebuilt)
            # Rows built ahead may leave out blobs the cache said were stored, which the
            # purge may delete (no stored record refers to them yet): they are written
            # first. New ones wait for the lock, and see the cleared cache.
            until = time.monotonic() + RETENTION_DRAIN_SECONDS
            while (self._queue or self._retry) and not self.failure and \
                    time.monotonic() < until:
                self._write_some()
            if self._queue or self._retry:
                # the store is failing, or records that need no build keep coming (SQL
                # statements): retention tries again in a minute
                self._last_retention = time.time() - RETENTION_EVERY + 60
                return
            try:
                n = store.apply_retention(self._con, self.retention_days)
                if n:
                    self._known.clear()  # unreferenced blobs were deleted with the rows
            except Exception as e:  # noqa: BLE001 - retention must not stop recording
                log.error("agentgate: audit retention failed (%s)", type(e).__name__)
                return
        if n:
            log.info("agentgate: retention purged %d audit records older than %s days", n,
                     self.retention_days)
