"""One agent connection through a Postgres listener: TLS, token login, the gateway's own
login to the server, then the relay with SQL policy, approval, masking and records.

No mitmproxy import: the addon (addon.py) owns the listeners and hands each accepted
connection to `serve()` with a `Context`.

Order on a connection (fail closed: any exception closes both sides, nothing half-checked
is forwarded):
1. Startup: SSLRequest → `S` + TLS with the gateway's certificate (bytes pipelined behind the
   SSLRequest are refused, CVE-2021-23214), GSSENCRequest → `N`, CancelRequest → mapped to the
   server's key (the client only ever sees the gateway's own BackendKeyData). Protocol 3.x:
   a minor above 0 (3.2) or `_pq_.` options get NegotiateProtocolVersion (3.0).
2. Token login: AuthenticationCleartextPassword only over TLS or from loopback; the password
   is an OIDC token verified by the identity concern's verifier; allow_groups/subjects.
   Refusals are FATAL ErrorResponses 28P01 / 28000 / 3D000.
3. Server login with the real credential (SCRAM-SHA-256 with the server's signature checked;
   md5/cleartext only over TLS or to loopback), server TLS verified where configured. Only
   allow-listed startup parameters pass (no `options`, `role`, `search_path` … smuggling);
   client_encoding is always UTF8 (SQL and rows are read as UTF-8).
4. Relay. Every Query and Parse is parsed (sqlfacts) and judged (policy). A refused statement
   is replaced by a statement the server rejects (a syntax error carrying a per-connection
   marker), and the server's ErrorResponse for it is replaced by the gateway's (42501 naming
   the rule, 42601 for unparseable SQL). Why: the server then does exactly what it does for
   any failed statement — rolls back the implicit transaction or aborts the explicit one,
   discards the extended-protocol pipeline up to Sync, answers ReadyForQuery with the true
   transaction status — and the error lands in order behind the answers to everything sent
   before it. `approve` holds the statement (simple Query at Query; extended protocol at
   each Execute of the portal, so every execution is reviewed); only this connection waits.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import logging
import secrets
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from addons.config.schema import read_secret
from addons.database import depends
from addons.database import protocol as pg
from addons.database.config import Database
from addons.database.depends import CATALOG_KINDS, Resolved
from addons.database.hooks import MaskerFactory
from addons.database.policy import Verdict, evaluate
from addons.database.scram import MECHANISM, ScramClient, ScramError, md5_password
from addons.database.sqlfacts import SqlError, Statement, analyze
from addons.frame import offload
from addons.frame.hosts import is_loopback_host
from addons.frame.principal import principal
from addons.masking import cost as mask_cost
from addons.masking.masker import SessionStore, session_key

log = logging.getLogger("agentgate.database")

# startup parameters passed on to the server; everything else is dropped (and logged)
PASSED_PARAMS = ("application_name", "DateStyle", "TimeZone", "extra_float_digits",
                 "IntervalStyle")
PARSE_IN_THREAD = 16 * 1024   # SQL longer than this is parsed off the event loop
# libpg_query's tree-to-JSON step recurses in C once per nesting level: ~60k nested terms
# overflow the 8 MiB main stack and crash the process (measured with pgparse 1.0.3). Long
# SQL is therefore parsed in a thread with a large stack, two at a time (the JSON of a
# 256 KiB statement peaks near 200 MB), and SQL above `max_sql_bytes` is refused unparsed.
PARSE_STACK = 512 * 1024 * 1024
_stack_lock = threading.Lock()
LOGIN_MESSAGE_LIMIT = 64 * 1024
WRITE_HIGH_WATER = 1 << 20
# a connection streaming a big masked result gives the event loop back after this much
# masking time: reads of already-buffered server bytes never suspend, so without it one
# 100k-row result held every other connection (and every HTTP flow) for its whole burst
YIELD_AFTER_S = 0.001
# A result row whose masking is not small work (masking/cost.py: e.g. a DataRow of 60 KB of
# e-mail addresses, or a 64 MiB one) is masked in a worker thread, in the identity's share
# of frame/offload's pool, so the event loop keeps serving every other flow meanwhile; rows
# stay in order (the server loop awaits each). Under this size a row is always small work.
HEAVY_ROW_MIN = 2048
MARKER = "agentgate_refused_"


class Refused(Exception):
    """Close the client connection after sending it this FATAL error."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class KeyMap:
    """The gateway's BackendKeyData per client → the server's, for CancelRequest."""

    entries: dict[int, tuple[bytes, Database, int, bytes, Callable[[], None]]] = field(
        default_factory=dict)

    def issue(self, db: Database, server_pid: int, server_key: bytes,
              on_cancel: Callable[[], None]) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbits(31) or 1
            if pid not in self.entries:
                break
        key = secrets.token_bytes(4)
        self.entries[pid] = (key, db, server_pid, server_key, on_cancel)
        return pid, key

    def lookup(self, pid: int, key: bytes
               ) -> tuple[Database, int, bytes, Callable[[], None]] | None:
        e = self.entries.get(pid)
        if e is None or not hmac.compare_digest(e[0], key):
            return None
        return e[1], e[2], e[3], e[4]

    def drop(self, pid: int) -> None:
        self.entries.pop(pid, None)


@dataclass
class Context:
    """What a connection needs from the gateway (built by the addon per connection)."""

    db: Database
    verify: Callable[[str], Awaitable[dict[str, Any]]]   # token -> identity; raises
    rules: Callable[[], Any]                              # the rules in force (or None)
    hold: Callable[..., Awaitable[Any]]                   # Approval.hold-like
    approval_spec: Callable[[Verdict], Any]               # Verdict -> approval.store spec
    record: Callable[[dict[str, Any]], None]
    masker_factory: MaskerFactory
    catalog_query: Callable[[set[int]], Awaitable[list[tuple[Any, ...]]]] | None
    client_tls: ssl.SSLContext | None
    keys: KeyMap
    current: Callable[[], Database | None] = lambda: None  # this database in the rules now
    big_parses: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    conn_id: str = ""
    # the masking addon's masker and placeholder store ({"masker", "sessions"}), so a
    # result's [EMAIL_1] is the agent's LLM traffic's [EMAIL_1] in the same session
    placeholders: Callable[[], dict[str, Any]] | None = None
    # statement -> the relations and functions it reaches through views, functions and
    # triggers (depends.py, over the catalog login); None: statements a rule on tables or
    # functions could judge are refused (nothing to resolve them with)
    resolve: Callable[[Statement], Awaitable[Resolved]] | None = None
    # DDL went through: forget the resolutions cached from the catalog before it
    forget: Callable[[], None] | None = None


@dataclass
class Token:
    """One statement execution, for policy, the masker's results and the record."""

    statement: Statement | None
    verdict: Verdict | None
    started: float
    approval: dict[str, Any] | None = None
    refused: bytes | None = None      # the gateway's ErrorResponse if it refused it
    error: str | None = None


def server_tls_context(db: Database) -> ssl.SSLContext | None:
    if db.server_tls == "disable":
        return None
    ctx = ssl.create_default_context(cafile=db.server_ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def read_message(reader: asyncio.StreamReader, limit: int,
                       allowed: frozenset[int] | None = None) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    n = pg.message_length(head, limit, allowed)
    return head[:1], await reader.readexactly(n) if n else b""


def _buffered(reader: asyncio.StreamReader) -> int:
    buf = getattr(reader, "_buffer", None)
    if buf is None:  # the stdlib changed: refuse rather than risk CVE-2021-23214
        raise pg.ProtocolError("cannot check for bytes behind SSLRequest")
    return len(buf)


@functools.lru_cache(maxsize=2048)
def _analyze_cached(sql: str) -> Statement:
    """Agents repeat the same statements (unprepared, with parameters): parse each once.
    Statement is immutable; SqlError is not cached (raised again each time)."""
    return analyze(sql)


async def _analyze_in_big_stack(sql: str) -> Statement:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Statement] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run() -> None:
        try:
            result = analyze(sql)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    with _stack_lock:  # stack_size is process-wide: set it just for this thread
        old = threading.stack_size(PARSE_STACK)
        try:
            threading.Thread(target=run, name="agentgate-sql-parse", daemon=True).start()
        finally:
            threading.stack_size(old)
    return await fut


# ---------------------------------------------------------------- server side
@dataclass
class ServerConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    params: list[tuple[str, str]]
    pid: int
    key: bytes
    status: bytes


async def open_server(db: Database) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP (+ verified TLS) to the database server."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(db.upstream_host, db.upstream_port), db.connect_timeout)
    tls = server_tls_context(db)
    if tls is not None:
        writer.write(pg.ssl_request())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(1), db.connect_timeout)
        if answer != b"S":
            writer.close()
            raise Refused("08006", f"database {db.name}: the server does not offer TLS, which "
                                   "the rules require")
        if _buffered(reader):
            writer.close()
            raise Refused("08006", f"database {db.name}: server sent data before TLS")
        try:
            await asyncio.wait_for(writer.start_tls(tls, server_hostname=db.upstream_host),
                                   db.connect_timeout)
        except ssl.SSLCertVerificationError as e:
            writer.close()
            log.warning("agentgate: database %s: the server's certificate did not verify: %s",
                        db.name, e.verify_message)
            raise Refused("08006", f"database {db.name}: the database server's TLS "
                                   f"certificate did not verify ({e.verify_message})") from None
    return reader, writer


async def login_server(db: Database, params: list[tuple[str, str]]) -> ServerConn:
    password = read_secret(db.password_env, db.password_file)
    if not password:
        src = f"env {db.password_env}" if db.password_env else f"file {db.password_file}"
        raise Refused("08006", f"database {db.name}: the gateway's credential is missing "
                               f"({src})")
    reader, writer = await open_server(db)
    try:
        return await asyncio.wait_for(_login(db, reader, writer, params, password),
                                      db.login_timeout)
    except ScramError as e:
        writer.close()
        log.warning("agentgate: database %s: SCRAM login failed: %s", db.name, e)
        raise Refused("28000", f"database {db.name}: the gateway could not log in to the "
                               "database server") from None
    except BaseException:
        writer.close()
        raise


async def _login(db: Database, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 params: list[tuple[str, str]], password: str) -> ServerConn:
    protected = server_tls_context(db) is not None or is_loopback_host(db.upstream_host)
    startup = [("user", db.user), ("database", db.database), ("client_encoding", "UTF8"),
               *params]
    writer.write(pg.startup_message(startup))
    await writer.drain()
    scram: ScramClient | None = None
    status: list[tuple[str, str]] = []
    pid, key = 0, b""
    while True:
        t, payload = await read_message(reader, LOGIN_MESSAGE_LIMIT)
        if t == b"R":
            r = pg.Reader(payload)
            code = r.int32()
            if code == pg.AUTH_OK:
                continue
            if code == pg.AUTH_SASL:
                mechs = []
                while True:
                    m = r.cstr()
                    if not m:
                        break
                    mechs.append(m)
                if MECHANISM not in mechs:
                    raise Refused("28000", f"database {db.name}: server offers no "
                                           f"{MECHANISM} ({', '.join(mechs)})")
                scram = ScramClient(password)
                first = scram.first()
                writer.write(pg.password_message(pg.cstr(MECHANISM)
                                                 + struct.pack("!i", len(first)) + first))
            elif code == pg.AUTH_SASL_CONTINUE and scram is not None:
                writer.write(pg.password_message(scram.final(r.rest())))
            elif code == pg.AUTH_SASL_FINAL and scram is not None:
                scram.verify(r.rest())
                continue
            elif code == pg.AUTH_CLEARTEXT and protected:
                writer.write(pg.password_message(pg.cstr(password)))
            elif code == pg.AUTH_MD5 and protected:
                writer.write(pg.password_message(md5_password(db.user, password, r.take(4))
                                                 + b"\x00"))
            else:
                raise Refused("28000", f"database {db.name}: the server asks for an "
                                       f"authentication the gateway does not use ({code})")
            await writer.drain()
        elif t == b"S":
            r = pg.Reader(payload)
            status.append((r.cstr(), r.cstr()))
        elif t == b"K":
            r = pg.Reader(payload)
            pid, key = r.int32(), r.rest()
        elif t == b"Z":
            return ServerConn(reader, writer, status, pid, key, payload[:1] or b"I")
        elif t == b"E":
            fields = pg.parse_fields(payload)
            log.warning("agentgate: database %s: the server refused the gateway's login: %s %s",
                        db.name, fields.get("C", ""), fields.get("M", "")[:200])
            raise Refused("28000", f"database {db.name}: the gateway could not log in to the "
                                   "database server")
        elif t in (b"N", b"v"):
            continue
        else:
            raise pg.ProtocolError(f"unexpected {t!r} from the server during login")


async def send_cancel(db: Database, pid: int, key: bytes) -> None:
    reader, writer = await open_server(db)
    try:
        writer.write(pg.cancel_request(pid, key))
        await writer.drain()
    finally:
        writer.close()


# ---------------------------------------------------------------- prepared statements
@dataclass
class _Op:
    gen: int                 # Syncs/Queries sent before it: the ReadyForQuery that ends it
    kind: str                # parse | prepare | close_s | close_p | deallocate
    name: str | None
    entry: tuple[Statement, Verdict] | None = None


class Prepared:
    """Named statements as the *server* has them, so an execution is judged by the SQL the
    server will run. Protocol Parse and SQL PREPARE share one namespace on the server (Bind
    reaches SQL-PREPAREd statements, SQL EXECUTE reaches Parsed ones) and they are not
    transactional. A definition counts once the server acknowledged it (ParseComplete,
    CommandComplete PREPARE/DEALLOCATE, CloseComplete); an op the server skipped or refused
    is dropped at the ReadyForQuery that ends its pipeline. Before that, `view()` gives the
    pending definition and the pipeline it belongs to: the relay waits for that pipeline's
    outcome when a later one uses the name (a Parse skipped after an error must not make a
    later Bind judged by SQL the server never prepared)."""

    def __init__(self) -> None:
        self.committed: dict[str, tuple[Statement, Verdict] | None] = {}
        self.pending: collections.deque[_Op] = collections.deque()
        self.sent = 0   # Syncs + Queries forwarded
        self.seen = 0   # ReadyForQuery received (after login)

    def op(self, kind: str, name: str | None,
           entry: tuple[Statement, Verdict] | None = None) -> None:
        self.pending.append(_Op(self.sent, kind, name, entry))

    def view(self, name: str) -> tuple[tuple[Statement, Verdict] | None, int | None]:
        entry, gen = self.committed.get(name), None
        for op in self.pending:
            if op.kind in ("parse", "prepare") and op.name == name:
                entry, gen = op.entry, op.gen
            elif op.kind in ("close_s", "deallocate") and op.name in (name, "*"):
                entry, gen = None, op.gen
        return entry, gen

    def _ack(self, kinds: tuple[str, ...], want: str | None = None) -> _Op | None:
        for op in self.pending:
            if op.kind in kinds and (want is None or (op.name == "*") == (want == "*")):
                self.pending.remove(op)
                return op
        return None

    def server(self, t: bytes, payload: bytes) -> bool:
        """Follow one server message; True on ReadyForQuery."""
        if t == b"1":
            op = self._ack(("parse",))
            if op is not None and op.name is not None:
                self.committed[op.name] = op.entry
        elif t == b"3":
            op = self._ack(("close_s", "close_p"))
            if op is not None and op.kind == "close_s" and op.name is not None:
                self.committed.pop(op.name, None)
        elif t == b"C":
            tag = payload.rstrip(b"\x00")
            if tag == b"PREPARE":
                op = self._ack(("prepare",))
                if op is not None and op.name is not None:
                    self.committed[op.name] = op.entry
            elif tag in (b"DEALLOCATE ALL", b"DISCARD ALL"):
                if self._ack(("deallocate",), "*") is not None:
                    self.committed.clear()
            elif tag == b"DEALLOCATE":
                op = self._ack(("deallocate",), "")
                if op is not None and op.name is not None:
                    self.committed.pop(op.name, None)
        elif t == b"Z":
            self.seen += 1
            while self.pending and self.pending[0].gen < self.seen:
                op = self.pending.popleft()
                if op.kind == "parse" and op.name == "":
                    # a failed Parse of the unnamed statement drops the old one first,
                    # a skipped one keeps it: either way it is unknown now
                    self.committed.pop("", None)
            return True
        return False


# ---------------------------------------------------------------- the connection
class Session:
    def __init__(self, ctx: Context, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_host = str(peer[0])
        self.tls = False
        self.identity: dict[str, Any] = {}
        self.session_id: str | None = None
        self.server: ServerConn | None = None
        self.masker: Any = None
        self.masking: Any = None
        # the masker is one object for both directions: while a heavy row is masked in a
        # thread, the loop's own calls into it (client messages, the session's map) wait
        # for it (they first await _masker_idle; the lock is the guarantee)
        self._mask_lock = threading.Lock()
        self._server_job: asyncio.Future[Any] | None = None
        self.our_pid = 0
        self.nonce = secrets.token_hex(8)
        self.refusals: dict[str, bytes] = {}
        self.counter = 0
        self.prepared = Prepared()
        # the ReadyForQuery count that ends the pipeline of the last DDL this session sent
        # (None: none pending): until a ReadyForQuery at or past it says the transaction is
        # idle, the catalog login cannot see what that DDL changed (uncommitted)
        self.ddl_until: int | None = None
        self.ready = asyncio.Event()  # set at each ReadyForQuery (replaced after)
        self.portals: dict[str, tuple[Statement, Verdict]] = {}
        self.holding = False
        self.cancel_requested = False
        self.placeholder_store: SessionStore | None = None  # the masking addon's, in memory

    # ------------------------------------------------------------ startup + login
    async def startup(self) -> pg.Startup:
        ssl_done = False
        while True:
            head = await self.reader.readexactly(4)
            n = pg.startup_length(head)
            st = pg.parse_startup(head + await self.reader.readexactly(n - 4))
            if st.code == pg.SSL_REQUEST and not ssl_done:
                ssl_done = True
                if self.ctx.client_tls is None:
                    self.writer.write(b"N")
                    continue
                if _buffered(self.reader):
                    raise pg.ProtocolError("bytes pipelined behind SSLRequest")
                self.writer.write(b"S")
                await self.writer.drain()
                await asyncio.wait_for(self.writer.start_tls(self.ctx.client_tls),
                                       self.db.login_timeout)
                self.tls = True
                continue
            if st.code == pg.GSSENC_REQUEST and not ssl_done:
                self.writer.write(b"N")
                continue
            if st.code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST):
                raise pg.ProtocolError("second encryption request")
            return st

    async def login(self, st: pg.Startup) -> list[tuple[str, str]]:
        if st.param("replication") not in (None, "false", "0", "off", "no"):
            raise Refused("28000", "replication connections are not allowed through the "
                                   "gateway")
        unknown = [k for k, _ in st.params if k.startswith("_pq_.")]
        if st.minor > 0 or unknown:
            self.writer.write(pg.negotiate_protocol_version(0, unknown))
        wanted = st.param("database") or st.param("user") or ""
        if wanted not in (self.db.database, self.db.name):
            raise Refused("3D000", f"database {wanted!r} is not served here (this listener "
                                   f"serves {self.db.database!r})")
        if self.db.client_tls_required and not self.tls:
            raise Refused("28000", "this listener requires TLS (sslmode=require): the "
                                   "password is your token")
        if not self.tls and not is_loopback_host(self.peer_host):
            raise Refused("28000", "a token is accepted over TLS only (sslmode=require)")
        self.writer.write(pg.auth_request(pg.AUTH_CLEARTEXT))
        await self.writer.drain()
        t, payload = await asyncio.wait_for(
            read_message(self.reader, 16 * 1024, frozenset(b"p")), self.db.login_timeout)
        token = pg.parse_password(payload)
        try:
            ident = await self.ctx.verify(token)
        except Exception as e:  # noqa: BLE001 - TokenError or any failure: refused
            reason = getattr(e, "reason", None) or type(e).__name__
            log.info("agentgate: database %s: token refused from %s: %s", self.db.name,
                     self.peer, reason)
            raise Refused("28P01", f"token refused: {reason}") from None
        if self.db.allow_groups and not set(ident.get("groups") or ()) & set(
                self.db.allow_groups):
            raise Refused("28000", f"identity not in a group allowed to use database "
                                   f"{self.db.name}")
        if self.db.allow_subjects and ident.get("sub") not in self.db.allow_subjects:
            raise Refused("28000", f"identity not allowed to use database {self.db.name}")
        self.identity = ident
        params = []
        for k, v in st.params:
            if k in PASSED_PARAMS:
                params.append((k, v[:256]))
            elif k not in ("user", "database", "client_encoding", "replication") \
                    and not k.startswith("_pq_."):
                log.info("agentgate: database %s: startup parameter %r dropped", self.db.name,
                         k[:64])
        app = st.param("application_name")
        self.session_id = _clean_session(app) or f"pg-{self.ctx.conn_id}"
        return params

    # ------------------------------------------------------------ relay helpers
    def _record(self, tok: Token, *, rows: int | None = None, tag: str | None = None,
                error: str | None = None, findings: int = 0,
                entities: dict[str, Any] | None = None) -> None:
        st, v = tok.statement, tok.verdict
        ended = time.time()
        event = {
            "db": self.db.name, "upstream": self.db.upstream, "database": self.db.database,
            "identity": {k: self.identity.get(k) for k in ("sub", "iss", "groups", "roles",
                                                            "jti", "token_hash")},
            "session": self.session_id, "peer": self.peer,
            "sql": st.masked if st else None, "kinds": list(st.kinds) if st else [],
            "tables": list(st.tables) if st else [],
            "functions": list(st.functions) if st else [],
            "decision": v.action if v else "allow", "rule": v.rule if v else None,
            "approval": tok.approval, "rows": rows, "command": tag,
            "error": tok.error or error, "findings": findings,
            "findings_by_entity": dict(entities) if entities else None,
            "started": tok.started, "ended": ended,
            "duration_ms": round((ended - tok.started) * 1000, 3)}
        try:
            self.ctx.record(event)
        except Exception as e:
            if tok.refused is None:
                raise  # a statement that ran and cannot be recorded ends the connection
            # nothing ran: the refusal is logged; the caller already has its ErrorResponse
            log.warning("agentgate: database %s: refused statement not recorded: %s",
                        self.db.name, type(e).__name__)

    def _recorder_down(self) -> bytes | None:
        """An ErrorResponse when the audit store cannot take this statement's record now:
        nothing runs unrecorded (as HTTP flows get 503), and the session stays usable."""
        check = getattr(self.ctx.record, "unavailable", None)
        if check is None:
            return None
        try:
            why = check()
        except Exception as e:  # noqa: BLE001 - a recorder that cannot answer is down
            why = f"{type(e).__name__}"
        if not why:
            return None
        return pg.error_response(
            "58000", f"agentgate: the audit recorder cannot record this statement now "
                     f"({str(why)[:200]}); it was not sent — retry later")

    async def _judge(self, sql: str) -> tuple[Statement | None, Verdict, bytes | None]:
        """(statement, verdict, refusal ErrorResponse or None)."""
        if len(sql) > self.db.max_sql_bytes:
            return None, Verdict("block", "too_long"), pg.error_response(
                "54000", f"agentgate: the statement is longer than this database's "
                         f"max_sql_bytes ({self.db.max_sql_bytes}); it was not sent")
        try:
            if len(sql) > PARSE_IN_THREAD:
                async with self.ctx.big_parses:
                    st = await _analyze_in_big_stack(sql)
            else:
                # the cache holds at most 2048 × 4 KiB of SQL (+ facts)
                st = _analyze_cached(sql) if len(sql) <= 4096 else analyze(sql)
        except SqlError as e:
            return None, Verdict("block", "unparseable"), pg.error_response(
                "42601", f"agentgate: the statement could not be parsed ({e}); it was not "
                         "sent")
        if st.executes is None and (st.relation_refs or st.function_refs
                                    or st.operator_refs or st.type_refs
                                    or st.attribute_refs) \
                and depends.needed(self.db):
            stale = self._stale_catalog(st)
            if stale is not None:
                return st, Verdict("block", "guard:dependencies"), pg.error_response(
                    "42501", f"agentgate: blocked by rule guard:dependencies: {stale}; "
                             "it was not sent")
            st, refusal = await self._reach(st)
            if refusal is not None:
                return st, Verdict("block", refusal[0]), refusal[1]
        if st.executes is not None:
            # SQL EXECUTE runs a statement prepared earlier (SQL PREPARE or a protocol
            # Parse share one namespace): judge what it runs; one the gateway never saw
            # (prepared inside a server function) cannot be judged and is refused
            known = await self._lookup(st.executes)
            if known is None:
                v = Verdict("block", "guard:unknown_statement")
                return st, v, pg.error_response(
                    "42501", "agentgate: blocked by rule guard:unknown_statement: EXECUTE of "
                             "a prepared statement the gateway has not seen")
            (inner, iv), refusal = await self._rejudge(known)
            if refusal is not None:
                return inner, iv, refusal
            st = Statement(sql=st.sql, masked=st.masked, count=st.count,
                           kinds=("EXECUTE", *inner.kinds), tables=inner.tables,
                           functions=inner.functions, unbounded=inner.unbounded,
                           guards=inner.guards, executes=st.executes)
        v = evaluate(self.db, st, self.identity)
        if v.action == "block":
            return st, v, self._blocked(v)
        return st, v, None

    async def _rejudge(self, entry: tuple[Statement, Verdict]
                       ) -> tuple[tuple[Statement, Verdict], bytes | None]:
        """A statement judged at PREPARE / Parse, about to run (EXECUTE, Bind): PostgreSQL
        parses it again when the catalog under it changed, so its `okf()` runs whatever
        is named okf by then (a function renamed, a view replaced since). What it reaches
        is looked up again (cached CACHE_TTL_S) and the rules judge it again; (entry,
        refusal or None)."""
        st, v = entry
        if not ((st.relation_refs or st.function_refs or st.operator_refs or st.type_refs
                 or st.attribute_refs)
                and depends.needed(self.db)):
            return entry, None
        stale = self._stale_catalog(st)
        if stale is not None:
            return (st, Verdict("block", "guard:dependencies")), pg.error_response(
                "42501", f"agentgate: blocked by rule guard:dependencies: {stale}; it was not "
                         "sent")
        st, refusal = await self._reach(st)
        if refusal is not None:
            return (st, Verdict("block", refusal[0])), refusal[1]
        v = evaluate(self.db, st, self.identity)
        if v.action == "block":
            return (st, v), self._blocked(v)
        return (st, v), None

    def _stale_catalog(self, st: Statement) -> str | None:
        """Why what `st` reaches cannot be read from the catalog login now, or None. Its
        look-up runs on another connection: DDL of this session that is not committed
        (inside BEGIN, earlier in a pipeline, or before `st` in one multi-statement query)
        is invisible to it — `ALTER FUNCTION leak() RENAME TO ok` names nothing a rule
        sees, and `SELECT ok()` would then be judged as the old `ok`."""
        if self.ddl_until is not None:
            return ("this session changed the catalog (DDL) in a transaction that has not "
                    "ended, and the gateway cannot see what names reach inside it; commit "
                    "or roll back first")
        if st.count > 1 and CATALOG_KINDS & set(st.kinds):
            return ("DDL and other statements in one query are judged before any of it "
                    "runs; send the DDL on its own")
        return None

    def _catalog_changing(self, st: Statement | None) -> None:
        """`st` (forwarded now) may change what names reach: forget the cached look-ups
        now and again once its transaction ended (see server_loop)."""
        if st is None or not CATALOG_KINDS & set(st.kinds):
            return
        self.ddl_until = self.prepared.sent + 1
        if self.ctx.forget is not None:
            self.ctx.forget()

    async def _reach(self, st: Statement) -> tuple[Statement, tuple[str, bytes] | None]:
        """`st` widened by what its views, functions and triggers reach, so a rule on
        `tables: [secret]` also judges `SELECT * FROM a_view_of_secret`; (rule, refusal)
        when that cannot be known: a function in a language the gateway cannot read, or a
        catalog that does not answer (fail closed)."""
        why = None
        if self.ctx.resolve is None:
            why = "nothing to resolve views and functions with"
        else:
            try:
                r = await self.ctx.resolve(st)
            except Exception as e:  # noqa: BLE001 - any failure refuses the statement
                log.warning("agentgate: database %s: catalog look-up of a statement's "
                            "dependencies failed: %s", self.db.name, str(e)[:200])
                why = "the catalog look-up of what it reaches failed"
            else:
                st = depends.widen(st, r)
                if not r.unresolved:
                    return st, None
                rule = "guard:opaque_dependency"
                return st, (rule, pg.error_response(
                    "42501", f"agentgate: blocked by rule {rule}: it reaches what the gateway "
                             f"cannot see into ({', '.join(r.unresolved)[:300]}) while this "
                             "database has rules on tables or functions; it was not sent"))
        rule = "guard:dependencies"
        return st, (rule, pg.error_response(
            "42501", f"agentgate: blocked by rule {rule}: {why}; it was not sent"))

    def _blocked(self, v: Verdict) -> bytes:
        what = f"blocked by rule {v.rule}" if v.rule else "blocked by this database's sql_default"
        text = f"agentgate: {what}" + (f": {v.message}" if v.message else "")
        return pg.error_response("42501", text)

    def _marker(self, refusal: bytes) -> str:
        self.counter += 1
        m = f"{MARKER}{self.nonce}_{self.counter}"
        self.refusals[m] = refusal
        return m

    async def _approve(self, tok: Token) -> bytes | None:
        """Hold the statement; None when approved, else the ErrorResponse to send."""
        st, v = tok.statement, tok.verdict
        assert st is not None and v is not None
        spec = self.ctx.approval_spec(v)
        what = {"kind": "sql", "upstream": self.db.name, "database": self.db.database,
                "sql": st.masked, "statement_kind": st.kind, "tables": list(st.tables)}
        sub = self.identity.get("sub")
        owner = f"id:{self.identity.get('iss') or ''}|{sub}" if sub else f"client:{self.peer_host}"
        self.holding, self.cancel_requested = True, False
        try:
            a = await self.ctx.hold(spec, sub, what, st.masked, owner=owner, gone=self._gone)
        finally:
            self.holding = False
        state = getattr(a, "state", "denied")
        tok.approval = {"id": getattr(a, "id", None), "state": state}
        if state == "approved" or (state == "timeout" and spec.on_timeout == "allow"):
            return None
        if self.cancel_requested:  # the client's CancelRequest ended the hold
            tok.error = "cancelled by the client"
            return pg.error_response("57014", "canceling statement due to user request")
        reason = getattr(a, "reason", "") or ""
        tok.error = f"approval {state}"
        return pg.error_response("42501", f"agentgate: rule {v.rule} needs approval, which was "
                                          f"{'not given in time' if state == 'timeout' else state}"
                                 + (f" ({reason[:200]})" if reason else ""))

    async def _lookup(self, name: str) -> tuple[Statement, Verdict] | None:
        """The statement `name` the server will run, once any earlier pipeline that
        (re)defines it has ended."""
        while True:
            entry, gen = self.prepared.view(name)
            if gen is None or gen >= self.prepared.sent or self.prepared.seen > gen:
                return entry
            await self.ready.wait()

    def _effects(self, st: Statement | None, v: Verdict) -> None:
        """An executed PREPARE / DEALLOCATE / DISCARD ALL changes the statement namespace."""
        if st is None:
            return
        if st.prepared is not None:
            self.prepared.op("prepare", st.prepared, (st, v))
        if st.deallocates is not None:
            self.prepared.op("deallocate", st.deallocates)

    def _refresh(self) -> None:
        """Statements are judged by the rules in force, not those of the login: a reload
        applies to open connections. A change the connection cannot follow (the database
        removed, another server or credential, other masking, the identity no longer
        allowed) ends it; the client reconnects under the new rules."""
        self._renew_placeholders()
        masking = getattr(self.ctx.rules(), "masking", None)
        if masking is not self.masking:
            if masking != self.masking:  # the masker was built with the old detectors
                raise Refused("57P01", "agentgate: the masking rules changed; reconnect")
            self.masking = masking
        db = self.ctx.current()
        if db is self.db:
            return
        old = self.db
        if db is None:
            raise Refused("57P01", f"agentgate: database {old.name} was removed from the rules")
        if (db.upstream, db.database, db.user, db.password_env, db.password_file,
                db.server_tls, db.server_ca_file, db.mask, db.mask_columns) != (
                old.upstream, old.database, old.user, old.password_env, old.password_file,
                old.server_tls, old.server_ca_file, old.mask, old.mask_columns):
            raise Refused("57P01", f"agentgate: the rules of database {db.name} changed; "
                                   "reconnect")
        groups = set(self.identity.get("groups") or ())
        if (db.allow_groups and not groups & set(db.allow_groups)) or (
                db.allow_subjects and self.identity.get("sub") not in db.allow_subjects):
            raise Refused("28000", f"agentgate: identity no longer allowed to use database "
                                   f"{db.name}")
        self.db = db

    def _renew_placeholders(self) -> None:
        """The session's map as the masking addon has it now, before each statement: the
        store drops a session idle past its TTL (or the least recent beyond max_sessions),
        and the LLM traffic then numbers values in a new map — a result masked by the old
        one would hand out numbers that now mean other values. Asking also keeps the
        session alive while the connection works."""
        store = self.placeholder_store
        if store is None or self.masker is None:
            return
        current = store.get(session_key(principal(self.identity), str(self.session_id)))
        if getattr(self.masker, "session", current) is not current:
            with self._mask_lock:
                self.masker.session = current

    async def _masker_idle(self) -> None:
        """Until no heavy row of this connection is being masked in a thread."""
        while (job := self._server_job) is not None and not job.done():
            await asyncio.wait({job})

    def _mask_server(self, t: bytes, payload: bytes) -> list[tuple[bytes, bytes]]:
        with self._mask_lock:
            return self.masker.server(t, payload)

    async def _mask_heavy_row(self, t: bytes, payload: bytes) -> list[tuple[bytes, bytes]]:
        job = asyncio.ensure_future(offload.POOL.run(principal(self.identity),
                                                     self._mask_server, t, payload))
        self._server_job = job
        try:
            return await job
        except offload.Busy as e:
            # nothing of the row was forwarded: the connection ends (fail closed)
            raise Refused("53000", f"agentgate: the gateway is busy masking results "
                                   f"({e.status}); retry later") from None
        finally:
            self._server_job = None

    def _expired(self) -> bool:
        exp = self.identity.get("exp")
        return isinstance(exp, int | float) and time.time() >= exp

    def _gone(self) -> bool:
        return (self.cancel_requested or bool(getattr(self.reader, "_eof", False))
                or self.writer.is_closing())

    def _on_cancel(self) -> None:
        if self.holding:  # a statement held for approval is cancelled at the gateway
            self.cancel_requested = True

    def _forward(self, t: bytes, payload: bytes, token: Token | None) -> None:
        assert self.server is not None
        with self._mask_lock:
            self.masker.client(t, payload, token)
        self.server.writer.write(pg.message(t, payload))
        if t in (b"S", b"Q"):  # each ends with exactly one ReadyForQuery
            self.prepared.sent += 1

    def _refuse_in_band(self, t: bytes, tok: Token, refusal: bytes) -> None:
        """Send the server a statement it rejects in place of the refused one; the refusal
        is recorded now (the masker's results never carry the stand-in statement)."""
        tok.refused = refusal
        marker = self._marker(refusal)
        if t == b"Q":
            self._forward(b"Q", pg.cstr(marker), None)
        else:  # Parse / Execute inside the extended protocol
            self._forward(b"P", pg.cstr("") + pg.cstr(marker) + b"\x00\x00", None)
            self.prepared.op("parse", "", None)  # the server drops its unnamed statement
        f = pg.parse_fields(refusal[5:])
        self._record(tok, error=f"{f.get('C', '')} {f.get('M', '')}")

    # ------------------------------------------------------------ the two directions
    async def client_loop(self) -> None:
        assert self.server is not None
        allowed = frozenset(pg.CLIENT_TYPES - {ord("p")})
        while True:
            t, payload = await read_message(self.reader, self.db.max_message_bytes, allowed)
            await self._masker_idle()
            if t in (b"Q", b"P", b"E", b"F"):
                self._refresh()
            if t in (b"Q", b"P", b"E", b"F") and self._expired():
                # the token was the password: once it expires the connection ends, as an
                # HTTP tunnel does at exp (pools reconnect with a fresh token)
                raise Refused("28P01", "agentgate: the identity token of this connection "
                                       "expired; reconnect with a fresh token")
            if t == b"Q":
                await self._simple(payload)
            elif t == b"P":
                await self._parse(payload)
            elif t == b"B":
                b = pg.parse_bind(payload)
                entry = await self._lookup(b.statement)
                refusal = None
                if entry is not None:
                    entry, refusal = await self._rejudge(entry)
                await self._masker_idle()
                if refusal is not None and entry is not None:
                    # the Bind is not sent: the server errors on the stand-in and skips
                    # to Sync, the client reads this refusal in place of BindComplete
                    self.portals.pop(b.portal, None)
                    tok = Token(entry[0], entry[1], time.time())
                    self._refuse_in_band(b"B", tok, refusal)
                    self._log(tok)
                elif entry is None:
                    self.portals.pop(b.portal, None)
                else:
                    self.portals[b.portal] = entry
                self._forward(t, payload, None)
            elif t == b"E":
                await self._execute(payload)
            elif t == b"C":
                kind, name = pg.parse_target(payload)
                if kind == "P":
                    self.portals.pop(name, None)
                self.prepared.op("close_s" if kind == "S" else "close_p", name)
                self._forward(t, payload, None)
            elif t == b"D":
                pg.parse_target(payload)
                self._forward(t, payload, None)
            elif t == b"F":
                # fast-path function call by OID (lo_export & co): never judged, refused
                tok = Token(None, Verdict("block", "guard:function_call"), time.time())
                self._refuse_in_band(b"Q", tok, pg.error_response(
                    "42501", "agentgate: blocked by rule guard:function_call: fast-path "
                             "function calls are not allowed"))
            elif t == b"X":
                self._forward(t, payload, None)
                await self.server.writer.drain()
                return
            else:  # S H d c f
                self._forward(t, payload, None)
            await self.server.writer.drain()

    async def _simple(self, payload: bytes) -> None:
        sql = pg.parse_query(payload)
        st, v, refusal = await self._judge(sql)
        tok = Token(st, v, time.time())
        if refusal is None:
            refusal = self._recorder_down()
        if refusal is None and v.action == "approve":
            refusal = await self._approve(tok)
        if refusal is None:
            refusal = self._recorder_down()  # it may have gone down during the hold
        await self._masker_idle()
        if refusal is not None:
            self._refuse_in_band(b"Q", tok, refusal)
            self._log(tok)
            return
        self._effects(st, v)
        self._catalog_changing(st)
        self._log(tok)
        self._forward(b"Q", payload, tok)

    async def _parse(self, payload: bytes) -> None:
        p = pg.parse_parse(payload)
        st, v, refusal = await self._judge(p.query)
        await self._masker_idle()
        if refusal is not None:
            tok = Token(st, v, time.time())
            self._refuse_in_band(b"P", tok, refusal)
            self._log(tok)
            return
        assert st is not None
        self.prepared.op("parse", p.name, (st, v))
        self._forward(b"P", payload, None)

    async def _execute(self, payload: bytes) -> None:
        portal, _ = pg.parse_execute(payload)
        entry = self.portals.get(portal)
        if entry is None:
            # no Bind the gateway judged made this portal (a failed Bind, or a cursor
            # declared inside a server function): nothing unjudged runs
            tok = Token(None, Verdict("block", "guard:unknown_statement"), time.time())
            self._refuse_in_band(b"E", tok, pg.error_response(
                "42501", "agentgate: blocked by rule guard:unknown_statement: Execute of a "
                         "portal the gateway has not seen bound"))
            return
        st, v = entry
        tok = Token(st, v, time.time())
        refusal = self._recorder_down()
        if refusal is None and v.action == "approve":
            refusal = await self._approve(tok)
            if refusal is None:
                refusal = self._recorder_down()
            await self._masker_idle()
        if refusal is not None:
            self._refuse_in_band(b"E", tok, refusal)
            self._log(tok)
            return
        self._effects(st, v)
        self._catalog_changing(st)
        self._log(tok)
        self._forward(b"E", payload, tok)

    def _log(self, tok: Token) -> None:
        v, st = tok.verdict, tok.statement
        if v is None:
            return
        if tok.refused is not None or v.action in ("observe", "approve"):
            log.info("agentgate: database %s: %s %s by %s (rule %s)%s", self.db.name,
                     st.kind if st else "statement",
                     "refused" if tok.refused is not None else v.action,
                     self.identity.get("sub") or "-", v.rule or "-",
                     f": {st.masked[:200]}" if st else "")

    async def server_loop(self) -> None:
        assert self.server is not None
        sr = self.server.reader
        catalog = getattr(self.masker, "catalog", None)
        wanted = None
        if catalog is not None and self.ctx.catalog_query is not None:
            from addons.database import rowmask  # PG-B's module: present when catalog is
            wanted = rowmask.wanted_tables
        clock = time.monotonic
        since = clock()
        while True:
            t, payload = await read_message(sr, self.db.max_server_message_bytes)
            if clock() - since > YIELD_AFTER_S:
                await asyncio.sleep(0)
                since = clock()
            if t == b"T" and wanted is not None:
                missing = catalog.missing(wanted(t, payload))
                if missing:
                    catalog.put(missing, await self.ctx.catalog_query(missing))
            refusal = None
            if t == b"E":
                refusal = self._our_refusal(payload)
            if self.prepared.server(t, payload):
                self.ready.set()
                self.ready = asyncio.Event()
                if self.ddl_until is not None and self.prepared.seen >= self.ddl_until \
                        and payload[:1] == b"I":
                    # committed or rolled back: the catalog login sees it now; a look-up
                    # cached while it was open read the old catalog
                    self.ddl_until = None
                    if self.ctx.forget is not None:
                        self.ctx.forget()
            if t == b"D" and len(payload) >= HEAVY_ROW_MIN and mask_cost.heavy(payload):
                out = await self._mask_heavy_row(t, payload)
            else:
                out = self.masker.server(t, payload)
            for ot, op in out:
                if ot == b"E" and refusal is not None:
                    self.writer.write(refusal)
                else:
                    self.writer.write(pg.message(ot, op))
            self._drain_results()
            # write a batch of rows, then drain: when the server's bytes are all read, or
            # when the client reads slower than the server sends (bounded memory)
            if not getattr(sr, "_buffer", None) or \
                    self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.writer.drain()

    def _our_refusal(self, payload: bytes) -> bytes | None:
        try:
            text = pg.parse_fields(payload).get("M", "")
        except pg.ProtocolError:
            return None
        i = text.find(MARKER + self.nonce + "_")
        if i < 0:
            return None
        end = i + len(MARKER) + len(self.nonce) + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        return self.refusals.pop(text[i:end], None)

    def _drain_results(self) -> None:
        results = getattr(self.masker, "results", None)
        if not results:
            return
        done = list(results)
        results.clear()
        for r in done:
            tok = getattr(r, "token", None)
            if not isinstance(tok, Token):
                continue
            err = getattr(r, "error", None)
            self._record(tok, rows=getattr(r, "rows", None), tag=getattr(r, "tag", None),
                         error=err, findings=int(getattr(r, "findings", 0) or 0),
                         entities=getattr(r, "entities", None))

    # ------------------------------------------------------------ run
    async def run(self) -> None:
        try:
            st = await asyncio.wait_for(self.startup(), self.db.login_timeout)
            if st.code == pg.CANCEL_REQUEST:
                await self._cancel(st)
                return
            params = await self.login(st)
            self.masking = getattr(self.ctx.rules(), "masking", None)
            shared = self.ctx.placeholders() if self.ctx.placeholders is not None else {}
            self.masker = self.ctx.masker_factory(self.db, self.masking, self.identity,
                                                  session=self.session_id, **shared)
            store = shared.get("sessions")
            self.placeholder_store = store if isinstance(store, SessionStore) else None
            placeholders = getattr(self.masker, "session", None)
            if callable(getattr(placeholders, "prefetch", None)):
                # a replica-shared map (Postgres I/O): loaded off the event loop; a failure
                # refuses the connection as the masking addon refuses the flow
                await asyncio.to_thread(placeholders.prefetch)
            self.server = await login_server(self.db, params)
        except Refused as e:
            await self._fatal(e.code, e.text)
            return
        except (pg.ProtocolError, asyncio.IncompleteReadError, ConnectionError, TimeoutError,
                ssl.SSLError) as e:
            log.info("agentgate: database %s: connection from %s closed during startup: %s",
                     self.db.name, self.peer, type(e).__name__ if not isinstance(
                         e, pg.ProtocolError) else e)
            return
        except Exception as e:
            log.exception("agentgate: database %s: startup failed", self.db.name)
            await self._fatal("08006", f"agentgate: the gateway refused the connection "
                                       f"({type(e).__name__})")
            return
        self.our_pid, our_key = self.ctx.keys.issue(self.db, self.server.pid, self.server.key,
                                                    self._on_cancel)
        out = pg.auth_request(pg.AUTH_OK)
        for k, v in self.server.params:
            out += pg.parameter_status(k, v)
        out += pg.backend_key_data(self.our_pid, our_key)
        out += pg.ready_for_query(self.server.status)
        self.writer.write(out)
        log.info("agentgate: database %s: %s logged in from %s%s", self.db.name,
                 self.identity.get("sub") or "-", self.peer, " (TLS)" if self.tls else "")
        await self._relay()

    async def _relay(self) -> None:
        assert self.server is not None
        tasks = [asyncio.create_task(self.client_loop()), asyncio.create_task(self.server_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is None or isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                    continue
                if isinstance(exc, Refused):
                    log.info("agentgate: database %s: connection from %s closed: %s",
                             self.db.name, self.peer, exc.text)
                    self.writer.write(pg.fatal(exc.code, exc.text))
                    await self._fatal_drain()
                    continue
                if isinstance(exc, pg.ProtocolError):
                    log.info("agentgate: database %s: connection from %s closed: %s",
                             self.db.name, self.peer, exc)
                else:
                    log.error("agentgate: database %s: connection from %s closed: %s: %s",
                              self.db.name, self.peer, type(exc).__name__, str(exc)[:200])
                    try:
                        self.writer.write(pg.fatal("08006", "agentgate: the gateway closed the "
                                                            "connection (internal error)"))
                    except Exception:  # noqa: BLE001, S110 - best effort before closing
                        pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.ctx.keys.drop(self.our_pid)

    async def _cancel(self, st: pg.Startup) -> None:
        hit = self.ctx.keys.lookup(st.cancel_pid, st.cancel_key)
        if hit is None:
            log.info("agentgate: database %s: cancel request with an unknown key from %s",
                     self.db.name, self.peer)
            return
        db, pid, key, on_cancel = hit
        on_cancel()
        await send_cancel(db, pid, key)
        log.info("agentgate: database %s: cancel request forwarded", db.name)

    async def _fatal_drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), 5)
        except (ConnectionError, TimeoutError, RuntimeError):
            pass

    async def _fatal(self, code: str, text: str) -> None:
        try:
            self.writer.write(pg.fatal(code, text))
            await asyncio.wait_for(self.writer.drain(), 5)
        except (ConnectionError, TimeoutError, RuntimeError):
            pass

    async def close(self) -> None:
        for w in (self.writer, self.server.writer if self.server else None):
            if w is None:
                continue
            try:
                w.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken transport
                pass


def _clean_session(value: str | None) -> str | None:
    if not value:
        return None
    out = "".join(c if c.isalnum() or c in "._:@/+=#-" else "_" for c in value.strip())[:128]
    return out or None


async def serve(ctx: Context, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    s = Session(ctx, reader, writer)
    try:
        await s.run()
    finally:
        await s.close()
