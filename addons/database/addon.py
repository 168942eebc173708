"""The database addon: a Postgres listener per `databases:` entry, started with the gateway.

Why an asyncio listener owned by this addon and not mitmproxy's TCP layer (the spike):
Postgres negotiates TLS *inside* its protocol — an 8-byte SSLRequest, a one-byte `S`, then
the TLS handshake — and mitmproxy's layers detect TLS only from a ClientHello at the start
of a connection (or after an HTTP CONNECT); a `reverse:tcp://` mode would see the SSLRequest
as opaque bytes and either relay the TLS handshake untouched (no inspection at all) or, with
the gateway's layer guard, close it. mitmproxy has no Postgres layer (its STARTTLS support is
none: TCP messages after the upgrade stay encrypted), the edge forbids raw TCP modes
(addons/egress/edge.py), and `tcp_message` hooks cannot answer a message in the client's
protocol, hold one statement while others flow, or hand the server a replacement statement.
So: `asyncio.start_server` per listener in `running`, closed in `done`, and each connection
served by addons/database/session.py. These connections are not mitmproxy flows (not shown
in mitmweb); every statement is recorded in DuckDB (PG-B's records hook) instead.

Fail closed: a listener that cannot bind is logged as an error (mitmproxy stops during
startup); a connection arriving while the rules are not loaded, or whose hooks (result
masking, records) are not installed, is refused with a FATAL ErrorResponse.

The Postgres path itself (the wire protocol, the session relay, SQL facts, row masking,
dependency resolution: ~2 MiB of modules) is not imported with the gateway: most gateways
have no `databases:` and this addon then only watches the rules. Rules that declare a
database import it while they are parsed (config/loader.py: a failure is a rules error);
`_load` makes sure of it before a listener opens (a failure is logged as an error and no
listener opens), never on a connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import struct
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx

from addons.approval.addon import Approval, spec_from_decision
from addons.approval.config import ApprovalsConfig
from addons.config.holder import RulesHolder
from addons.frame import listeners
from addons.identity.addon import verify_token
from addons.masking.sessionstore import SharedSession

if TYPE_CHECKING:  # the Postgres path proper: imported by Databases._load
    from addons.database.config import Database
    from addons.database.depends import Resolved
    from addons.database.hooks import MaskerFactory, RecorderFactory
    from addons.database.policy import Verdict
    from addons.database.session import KeyMap
    from addons.database.sqlfacts import Statement

log = logging.getLogger("agentgate.database")


class _Catalog:
    """One gateway login per database for the masker's catalog look-ups (table OID →
    schema/table/column names), serialized; reopened after any failure."""

    def __init__(self, db: Database) -> None:
        from addons.database import depends  # loaded (Databases._load)
        self.db = db
        self.lock = asyncio.Lock()
        self.conn: Any = None
        self.depends = depends.Cache()

    async def query(self, oids: set[int]) -> list[tuple[Any, ...]]:
        from addons.database.rowmask import CATALOG_SQL  # PG-B's module
        arr = "{" + ",".join(str(int(o)) for o in sorted(oids)) + "}"
        return await self.fetch(CATALOG_SQL, [arr])

    async def fetch(self, sql: str, params: list[str]) -> list[tuple[Any, ...]]:
        """Rows (text values) of one catalog statement with text parameters."""
        from addons.database.session import login_server  # loaded (Databases._load)
        async with self.lock:
            try:
                if self.conn is None:
                    self.conn = await login_server(self.db, [("application_name",
                                                              "agentgate-catalog")])
                return await asyncio.wait_for(self._run(sql, params),
                                              self.db.connect_timeout)
            except BaseException:
                self.close()
                raise

    async def resolve(self, st: Statement) -> Resolved:
        """What `st` reaches through views, functions and triggers (depends.py), cached."""
        return await self.depends.resolve(st, self.fetch)

    async def _run(self, sql: str, params: list[str]) -> list[tuple[Any, ...]]:
        from addons.database import protocol as pg  # loaded (Databases._load)
        r, w = self.conn.reader, self.conn.writer
        binds = b"".join(struct.pack("!i", len(v.encode())) + v.encode() for v in params)
        w.write(pg.message(b"P", pg.cstr("") + pg.cstr(sql) + b"\x00\x00")
                + pg.message(b"B", b"\x00\x00" + struct.pack("!hh", 0, len(params)) + binds
                             + struct.pack("!h", 0))
                + pg.message(b"E", b"\x00" + struct.pack("!i", 0)) + pg.message(b"S"))
        await w.drain()
        rows: list[tuple[Any, ...]] = []
        error = None
        while True:
            head = await r.readexactly(5)
            n = pg.message_length(head, self.db.max_server_message_bytes)
            payload = await r.readexactly(n)
            t = head[:1]
            if t == b"D":
                rd = pg.Reader(payload)
                vals = []
                for _ in range(rd.int16()):
                    ln = rd.int32()
                    vals.append(rd.take(ln).decode() if ln >= 0 else None)
                rows.append(tuple(vals))
            elif t == b"E":
                error = pg.parse_fields(payload).get("M", "error")
            elif t == b"Z":
                break
        if error:
            raise RuntimeError(f"catalog query failed: {error[:200]}")
        return rows

    def close(self) -> None:
        if self.conn is not None:
            self.conn.writer.close()
            self.conn = None


class _SharedSessions:
    """A `SessionStore`-like view of the masking addon's replica-shared placeholder map."""

    def __init__(self, shared: Any) -> None:
        self.shared = shared

    def get(self, key: str) -> Any:
        return SharedSession(self.shared, key)


class Databases:
    def __init__(self, holder: RulesHolder, approval: Approval, recorder: Any, *,
                 masker_factory: MaskerFactory | None = None,
                 record_factory: RecorderFactory | None = None,
                 masking: Any = None) -> None:
        self.holder = holder
        # the masking addon (addons/masking/addon.py): its masker and placeholder sessions
        # are the result masker's, so SQL results and LLM traffic of one agent session share
        # placeholders; None (tests of this concern alone): rowmask's own per-session maps
        self.masking = masking
        self.approval = approval
        self.recorder = recorder
        self.masker_factory = masker_factory
        self.record_factory = record_factory
        self.servers: dict[str, tuple[tuple[str, int], asyncio.Server]] = {}
        self.catalogs: dict[str, _Catalog] = {}
        self.keys: KeyMap | None = None  # with the Postgres path (_load)
        self.big_parses: asyncio.Semaphore | None = None  # shared by every connection
        self.tls: dict[str, ssl.SSLContext] = {}
        self._tasks: set[asyncio.Task] = set()
        self._conns: set[asyncio.Task] = set()
        self._lock: asyncio.Lock | None = None
        self._running = False
        self._record: Any = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._conn_seq = 0
        self.active: dict[str, int] = {}
        holder.on_change(lambda _rules: self._spawn(self._sync()) if self._running else None)

    def _placeholders(self) -> dict[str, Any]:
        """The masking addon's masker and session store for a new connection's result masker.
        Raises (the connection is refused) when masking refuses its flows too."""
        m = self.masking
        if getattr(m, "shared_error", None):
            raise RuntimeError(m.shared_error)
        if getattr(m, "shared", None) is not None:
            # replica-shared placeholders: the session's map as every replica has it (the
            # relay prefetches it in a worker thread before the first statement); a value it
            # meets first in a result gets `[LABEL]`, as on the event loop in HTTP masking
            return {"masker": m.masker(), "sessions": _SharedSessions(m.shared)}
        return {"masker": m.masker(), "sessions": m.sessions}

    # `running` and `done` are sync on purpose (see approval/addon.py: script reloads)
    def running(self) -> None:
        self._running = True
        self._spawn(self._sync())

    def done(self) -> None:
        self._running = False
        for _, server in self.servers.values():
            server.close()
            listeners.unregister(server)
        self.servers.clear()
        for task in list(self._conns):
            task.cancel()
        for c in self.catalogs.values():
            c.close()
        self.catalogs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _databases(self) -> tuple[Database, ...]:
        return tuple(getattr(self.holder.rules, "databases", ()) or ())

    def _load(self) -> bool:
        """Import the Postgres path, once the rules declare a database and before any of its
        listeners opens (never on a connection). False, logged as an error (mitmproxy stops
        during startup; on a reload no listener opens), when it cannot be imported."""
        try:
            from addons.database import depends, hooks, protocol, session  # noqa: F401
        except Exception as e:  # noqa: BLE001 - whatever breaks it, no listener opens
            log.error("agentgate: databases: the Postgres path cannot be loaded, no listener "
                      "opens: %s: %s", type(e).__name__, e)
            return False
        if self.keys is None:
            self.keys = session.KeyMap()
        return True

    async def _sync(self) -> None:
        """Listeners follow the rules: new entries start, removed ones stop."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            wanted = {db.name: db for db in self._databases()}
            if wanted and not self._load():
                return
            for name, (addr, server) in list(self.servers.items()):
                db = wanted.get(name)
                if db is None or (db.listen_host, db.listen_port) != addr:
                    server.close()
                    listeners.unregister(server)
                    del self.servers[name]
                    cat = self.catalogs.pop(name, None)
                    if cat is not None:
                        cat.close()
                    log.info("agentgate: database %s: listener on %s:%d stopped", name, *addr)
            for name, db in wanted.items():
                if name in self.servers:
                    continue
                try:
                    self.tls[name] = self._client_tls(db)
                    server = await asyncio.start_server(
                        lambda r, w, n=name: self._serve(n, r, w), db.listen_host,
                        db.listen_port, reuse_address=True)
                except (OSError, ValueError, ssl.SSLError) as e:
                    # an error at startup makes mitmproxy stop: fail closed
                    log.error("agentgate: database %s cannot listen on %s: %s", name,
                              db.listen, e)
                    continue
                self.servers[name] = ((db.listen_host, db.listen_port), server)
                listeners.register(server, server.sockets)  # never an upstream (egress)
                log.info("agentgate: database %s: Postgres listener on %s -> %s (database %s)",
                         name, db.listen, db.upstream, db.database)

    def _client_tls(self, db: Database) -> ssl.SSLContext:
        """The certificate agents see after SSLRequest: the rules' own, or one issued by the
        gateway's CA (the mitmproxy confdir CA agents already trust) for the listen host."""
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        if db.client_cert_file and db.client_key_file:
            tls.load_cert_chain(db.client_cert_file, db.client_key_file)
            return tls
        tlsconfig = ctx.master.addons.get("tlsconfig")
        store = getattr(tlsconfig, "certstore", None)
        if store is None:
            raise ValueError("the gateway's certificate store is not loaded")
        import ipaddress
        sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(db.listen_host)))
        except ValueError:
            sans.append(x509.DNSName(db.listen_host))
        entry = store.get_cert(db.listen_host, sans)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentgate-pg-")
            os.chmod(self._tmp.name, 0o700)
        cert = Path(self._tmp.name) / f"{db.name}.pem"
        key = Path(self._tmp.name) / f"{db.name}.key"
        key.touch(mode=0o600)
        key.write_bytes(entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert.write_bytes(entry.cert.to_pem())
        tls.load_cert_chain(str(cert), str(key))
        key.unlink()  # loaded: the key stays in memory only
        return tls

    async def _serve(self, name: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        # loaded before this listener opened (_load)
        from addons.database import protocol as pg
        from addons.database.hooks import HookMissing, resolve_hooks
        from addons.database.session import Context, Refused, serve
        task = asyncio.current_task()
        if task is not None:  # cancelled in done()
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)
        self._conn_seq += 1
        db = next((d for d in self._databases() if d.name == name), None)
        try:
            if db is None or self.holder.rules is None:
                raise Refused("08006", "agentgate: this database is not in the rules in force")
            if self.masker_factory is None or self.record_factory is None:
                masker, recorder = resolve_hooks()  # on first use: a gateway without
                self.masker_factory = self.masker_factory or masker  # databases needs none
                self.record_factory = self.record_factory or recorder
            if self._record is None:
                self._record = self.record_factory(self.recorder)
            catalog = self.catalogs.get(name)
            if catalog is None or catalog.db is not db:
                if catalog is not None:
                    catalog.close()
                catalog = self.catalogs[name] = _Catalog(db)
            context = Context(
                db=db, verify=lambda token: verify_token(self.holder, token),
                rules=lambda: self.holder.rules, hold=self.approval.hold,
                approval_spec=self._approval_spec, record=self._record,
                masker_factory=self.masker_factory, catalog_query=catalog.query,
                resolve=catalog.resolve, forget=catalog.depends.forget,
                client_tls=self.tls.get(name), keys=self.keys, big_parses=self._parses(),
                current=lambda n=name: next((d for d in self._databases() if d.name == n),
                                            None),
                conn_id=str(self._conn_seq),
                placeholders=self._placeholders if self.masking is not None else None)
        except (Refused, HookMissing) as e:
            code = e.code if isinstance(e, Refused) else "08006"
            text = e.text if isinstance(e, Refused) else f"agentgate: {e}: refused"
            log.error("agentgate: database %s: connection refused: %s", name, text)
            try:
                # answer after the client's first packet would be nicer; a FATAL now is
                # what a server that cannot serve does
                writer.write(pg.fatal(code, text))
                await writer.drain()
            except (ConnectionError, RuntimeError):
                pass
            writer.close()
            return
        if self.active.get(name, 0) >= db.max_connections:
            log.warning("agentgate: database %s: max_connections (%d) reached, connection "
                        "refused", name, db.max_connections)
            try:
                writer.write(pg.fatal("53300", f"agentgate: too many connections to database "
                                               f"{name} (max_connections {db.max_connections})"))
                await writer.drain()
            except (ConnectionError, RuntimeError):
                pass
            writer.close()
            return
        self.active[name] = self.active.get(name, 0) + 1
        try:
            await serve(context, reader, writer)
        finally:
            self.active[name] -= 1

    def _parses(self) -> asyncio.Semaphore:
        if self.big_parses is None:
            self.big_parses = asyncio.Semaphore(2)
        return self.big_parses

    def _approval_spec(self, v: Verdict) -> Any:
        cfg = getattr(self.holder.rules, "approvals", None)
        if not isinstance(cfg, ApprovalsConfig):
            cfg = ApprovalsConfig()
        dec: dict[str, Any] = {"rule": v.rule, "message": v.message,
                               "approval": v.approval.to_metadata() if v.approval else {}}
        return spec_from_decision(dec, cfg)
