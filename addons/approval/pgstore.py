"""Approvals shared by every gateway replica, in Postgres (`AGENTGATE_STATE=postgresql://…`).

`PgApprovalStore` is an `ApprovalStore` whose in-memory dictionaries are a *mirror* of one
Postgres table that every replica reads and writes, so the addon, the reviewers' API and
page, Slack and the CLI use it unchanged:

- Opening a hold (`acreate`) and a reviewer's vote through the API or the page
  (`aapprove`/`adeny`) go to Postgres first, in one transaction: the global limits
  (`max_pending`, `max_pending_per_identity`) are counted there under an advisory lock, and
  a vote re-runs the in-memory store's own checks (groups, self-approval, one vote per
  reviewer, deny vetoes) on the row locked `FOR UPDATE`, so two replicas cannot both decide.
  Postgres unreachable: `ApprovalError(503, approval_store_unavailable)`; a hold is refused,
  never approved.
- Every change is announced with NOTIFY; each replica LISTENs and merges the row into its
  mirror. A decision merged into a hold this replica keeps releases the held flow through
  the store's ordinary `on_decided` (within milliseconds). A poll every `poll` seconds is the
  fallback for a lost LISTEN connection.
- Synchronous transitions (the addon's expiry and cancellation, mitmweb's commands) apply to
  the mirror at once and are replayed on the Postgres row in the background (the same
  checks, on the locked row); a replay Postgres refuses is logged and the mirror shows what
  Postgres keeps.
- Each replica holds a lease (`agentgate_replicas.lease_until`, renewed every `poll`
  seconds). Survivors cancel the pending holds of a replica whose lease ran out (killed,
  partitioned): nobody is left waiting for a decision that can no longer release anything.

Values stored are those reviewers see anyway: the masked preview and the names in `what`
(no credentials: the credentials addon runs after the approval, the query string is left
out of `what`). The DSN itself (which may hold a password) is never logged.
No mitmproxy import here: the store is usable and testable alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from addons.approval.store import (
    PENDING,
    STATES,
    VIA_API,
    ApprovalError,
    ApprovalSpec,
    ApprovalStore,
    PendingApproval,
    Vote,
)

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("agentgate.approval")

STATE_ENV = "AGENTGATE_STATE"
REPLICA_ENV = "AGENTGATE_REPLICA"
CHANNEL = "agentgate_approvals"
# pg_advisory_xact_lock keys: the schema set-up, and every hold's creation (the global
# counts are read and the row inserted under it, so two replicas cannot both take the
# last slot)
LOCK_SCHEMA = 0x61676174_0001
LOCK_CREATE = 0x61676174_0002
OP_TIMEOUT = 5.0  # one database operation; past it the hold is refused (503)
DECIDED_PREVIEW_CHARS = 16 * 1024
LATE = 30.0  # seconds past its deadline after which any replica expires a hold
CONNECT_TIMEOUT = 3  # seconds (libpq's connect_timeout)

SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS agentgate_approvals_seq",
    """CREATE TABLE IF NOT EXISTS agentgate_approvals (
         id text PRIMARY KEY,
         replica text NOT NULL,
         owner text NOT NULL,
         state text NOT NULL,
         record jsonb NOT NULL,
         seq bigint NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE INDEX IF NOT EXISTS agentgate_approvals_pending ON agentgate_approvals (owner) "
    "WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS agentgate_approvals_seq_idx ON agentgate_approvals (seq)",
    # sha256 of who asks what of whom under which rule (addon.intent_key): no content
    "ALTER TABLE agentgate_approvals ADD COLUMN IF NOT EXISTS intent text",
    "CREATE INDEX IF NOT EXISTS agentgate_approvals_intent ON agentgate_approvals (intent) "
    "WHERE state = 'pending'",
    """CREATE TABLE IF NOT EXISTS agentgate_replicas (
         replica text PRIMARY KEY,
         host text NOT NULL,
         started_at timestamptz NOT NULL DEFAULT now(),
         lease_until timestamptz NOT NULL)""",
]


def _load_psycopg() -> None:
    """Import psycopg into this module's globals on first use. A gateway whose approvals
    live in memory (no AGENTGATE_STATE, no `state:`) never needs it, and importing it costs
    ~9 MiB of RSS and ~70 ms. Every way into this module that touches Postgres (check_dsn,
    describe_dsn, PgApprovalStore) calls this first; a missing or broken psycopg is then a
    ValueError there, which the approval addon's configure() turns into an OptionsError:
    the gateway refuses to start rather than fall back to holds in one process."""
    global psycopg  # noqa: PLW0603 - bound once, read by every method below
    if "psycopg" in globals():
        return
    try:
        import psycopg
        import psycopg.conninfo  # noqa: F401 - _conninfo below
    except ImportError as e:
        raise ValueError(f"the shared approval store needs the psycopg package, which "
                         f"cannot be imported here ({e})") from None


def _conninfo(dsn: str) -> dict[str, Any]:
    _load_psycopg()
    return psycopg.conninfo.conninfo_to_dict(dsn)


def check_dsn(dsn: str) -> None:
    """Raise ValueError (without echoing the DSN: it may hold a password) when `dsn` is no
    Postgres connection string (or psycopg cannot be imported)."""
    if not dsn.startswith(("postgresql://", "postgres://")) and "=" not in dsn:
        raise ValueError("expected a postgresql://… URL or a libpq key=value string")
    _load_psycopg()
    try:
        _conninfo(dsn)
    except psycopg.ProgrammingError as e:
        # libpq's message names the bad part, not the password
        raise ValueError(f"not a valid Postgres connection string ({str(e).strip()})") from None


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, for logs (never the user or password)."""
    _load_psycopg()
    try:
        d = _conninfo(dsn)
    except psycopg.ProgrammingError:
        return "(invalid)"
    return f"{d.get('host') or 'localhost'}:{d.get('port') or 5432}/{d.get('dbname') or '-'}"


def to_record(a: PendingApproval) -> dict[str, Any]:
    s = a.spec
    # a decided hold keeps a short preview (as the addon does in memory): every replica
    # mirrors the row, and the table keeps decided rows for keep_seconds
    preview, cut = a.preview, a.preview_truncated
    if a.decided and len(preview) > DECIDED_PREVIEW_CHARS:
        preview, cut = preview[:DECIDED_PREVIEW_CHARS], True
    return {"id": a.id, "spec": {"rule": s.rule, "groups": list(s.groups),
                                 "min_approvals": s.min_approvals, "timeout": s.timeout,
                                 "on_timeout": s.on_timeout, "allow_mitmweb": s.allow_mitmweb,
                                 "message": s.message},
            "requester": a.requester, "what": a.what, "preview": preview,
            "preview_truncated": cut, "requested_at": a.requested_at,
            "expires_at": a.expires_at, "state": a.state,
            "votes": [v.to_dict() for v in a.votes], "reason": a.reason,
            "decided_at": a.decided_at, "owner": a.owner}


def from_record(r: dict[str, Any]) -> PendingApproval:
    s = r["spec"]
    spec = ApprovalSpec(rule=str(s["rule"]), groups=tuple(s["groups"]),
                        min_approvals=int(s["min_approvals"]), timeout=float(s["timeout"]),
                        on_timeout=str(s["on_timeout"]), allow_mitmweb=bool(s["allow_mitmweb"]),
                        message=str(s.get("message") or ""))
    state = r["state"]
    if state not in STATES:
        raise ValueError(f"unknown approval state {state!r}")
    return PendingApproval(
        id=str(r["id"]), spec=spec, requester=r.get("requester"), what=dict(r.get("what") or {}),
        preview=str(r.get("preview") or ""), preview_truncated=bool(r.get("preview_truncated")),
        requested_at=float(r["requested_at"]), expires_at=float(r["expires_at"]), state=state,
        votes=[Vote(v["sub"], v["decision"], float(v["at"]), v.get("via") or VIA_API,
                    v.get("reason") or "") for v in r.get("votes") or []],
        reason=str(r.get("reason") or ""), decided_at=r.get("decided_at"),
        owner=str(r.get("owner") or ""))  # (a record of an older replica: none, seen by none)


def _scratch(a: PendingApproval, clock: Callable[[], float]) -> ApprovalStore:
    """A one-approval in-memory store: the shared store's votes run the very checks of the
    in-memory one on the row read from Postgres."""
    s = ApprovalStore(clock=clock)
    if a.decided:
        s._decided[a.id] = a
    else:
        s._pending[a.id] = a
    return s


class PgApprovalStore(ApprovalStore):
    """The approval store of a replica sharing its approvals through Postgres (see module)."""

    shared = True

    def __init__(self, dsn: str, *, replica: str | None = None, lease: float = 10.0,
                 poll: float = 1.0, keep_seconds: float = 3600.0, **kw: Any) -> None:
        super().__init__(**kw)
        check_dsn(dsn)
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self.replica = replica or os.environ.get(REPLICA_ENV, "").strip() or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        self.lease = lease
        self.poll = poll
        self.keep_seconds = keep_seconds
        self._work: psycopg.AsyncConnection | None = None
        self._lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []
        self._replays: list[tuple[str, str, tuple, dict]] = []  # (op, id, args, kwargs)
        self._wake: asyncio.Event | None = None
        self._last_seq = 0
        self._last_ok = 0.0  # monotonic time of the last successful round trip
        self._started = False
        self._ever = False  # connected once: losing it later is an error, not a slow start
        self.listening = False

    # ------------------------------------------------------------ health
    @property
    def ready(self) -> bool:
        """Reachable lately: a round trip within the last lease (the heartbeat runs every
        `poll` seconds)."""
        return self._started and time.monotonic() - self._last_ok < max(self.lease / 2,
                                                                        3 * self.poll, 3.0)

    def health(self) -> dict[str, Any]:
        return {"kind": "postgres", "where": self.where, "replica": self.replica,
                "ready": self.ready, "listening": self.listening}

    # ------------------------------------------------------------ connections
    async def _connect(self, autocommit: bool = False) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT,
            application_name=f"agentgate {self.replica}"[:63])

    async def _run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[Any]],
                   what: str) -> Any:
        """Run `fn(conn)` in one transaction on the work connection, bounded by OP_TIMEOUT.
        A database error or timeout drops the connection (the next call reconnects) and
        becomes ApprovalError 503; an ApprovalError raised by `fn` rolls back and passes."""
        if self._lock is None:
            self._lock = asyncio.Lock()

        async def go() -> Any:
            async with self._lock:
                if self._work is None or self._work.closed:
                    self._work = await self._connect()
                async with self._work.transaction():
                    out = await fn(self._work)
                self._last_ok = time.monotonic()
                return out

        try:
            for attempt in range(3):
                try:
                    return await asyncio.wait_for(go(), OP_TIMEOUT)
                except (psycopg.errors.DeadlockDetected,
                        psycopg.errors.SerializationFailure):
                    # rolled back by Postgres, the connection is fine: run it again
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.01 * (attempt + 1))
        except ApprovalError:
            raise
        except asyncio.CancelledError:
            await self._drop()  # cancelled mid-query: the connection's state is unknown
            raise
        except (psycopg.Error, OSError, TimeoutError) as e:
            await self._drop()
            # a warning: an error logged while mitmdump starts makes it exit, and a replica
            # whose database is not up yet should wait (not ready), not die
            log.warning("agentgate: shared approval store %s unavailable (%s: %s) while %s",
                      self.where, type(e).__name__, str(e).splitlines()[0][:200] if str(e)
                      else "", what)
            raise ApprovalError(503, "approval_store_unavailable",
                                "the shared approval store is unavailable; the request "
                                "cannot be held for approval, try again later") from None

    async def _drop(self) -> None:
        conn, self._work = self._work, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the tables (once, under a lock), register this replica, and start the
        listener and the heartbeat/poll loop. Returns when Postgres answered once; while it
        does not, the loop keeps trying and `ready` stays False (holds refused)."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_loop()), loop.create_task(self._listen())]

    async def _setup(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SCHEMA,))
        for stmt in SCHEMA:
            await conn.execute(stmt)
        # Holds under this replica's name are an earlier process's (a restart under the same
        # AGENTGATE_REPLICA before its lease ran out): nobody waits for them any more.
        cur = await conn.execute(
            "SELECT record FROM agentgate_approvals WHERE state = 'pending' AND replica = %s "
            "FOR UPDATE", (self.replica,))
        for (rec,) in await cur.fetchall():
            a = from_record(rec)
            _scratch(a, self.clock).cancel(a.id, f"the gateway replica holding it "
                                                 f"({self.replica}) restarted")
            await self._write(conn, a)
            log.warning("agentgate: approval %s cancelled: it was held by an earlier process "
                        "of this replica (%s)", a.id, self.replica)

    @staticmethod
    async def _write(c: psycopg.AsyncConnection, a: PendingApproval) -> None:
        await c.execute(
            "UPDATE agentgate_approvals SET state = %s, record = %s, "
            "seq = nextval('agentgate_approvals_seq'), updated_at = now() WHERE id = %s",
            (a.state, json.dumps(to_record(a)), a.id))
        await c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, a.id))

    async def aclose(self) -> None:
        """Stop the loops, replay what is queued and give up this replica's lease."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        async def bye(c: psycopg.AsyncConnection) -> None:
            await c.execute("DELETE FROM agentgate_replicas WHERE replica = %s",
                            (self.replica,))

        with contextlib.suppress(ApprovalError):
            await self._replay_all()
            await self._run(bye, "leaving")
        await self._drop()
        self._started = False

    def close(self) -> None:
        """Synchronous last words (mitmproxy's `done`, the loop may be gone): replay the
        queued transitions (the holds this replica cancels as it stops) with a short
        blocking connection, and give up the lease."""
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        ops, self._replays = self._replays, []
        try:
            with psycopg.connect(self.dsn, connect_timeout=2, autocommit=False) as c:
                for op, approval_id, args, kw in ops:
                    with c.transaction():
                        self._replay_sync(c, op, approval_id, args, kw)
                c.execute("DELETE FROM agentgate_replicas WHERE replica = %s", (self.replica,))
                c.commit()
        except (psycopg.Error, OSError) as e:
            if not ops:
                log.debug("shared approval store: lease not given up (%s)", type(e).__name__)
                self._started = False
                return
            log.warning("agentgate: shared approval store %s: could not record %d "
                        "transition(s) on stopping (%s); survivors cancel this replica's "
                        "holds when its lease runs out", self.where, len(ops),
                        type(e).__name__)
        self._started = False

    def _replay_sync(self, c: psycopg.Connection, op: str, approval_id: str, args: tuple,
                     kw: dict) -> None:
        row = c.execute("SELECT record FROM agentgate_approvals WHERE id = %s FOR UPDATE",
                        (approval_id,)).fetchone()
        if row is None:
            return
        a = from_record(row[0])
        try:
            getattr(_scratch(a, self.clock), op)(approval_id, *args, **kw)
        except ApprovalError:
            return
        c.execute("UPDATE agentgate_approvals SET state = %s, record = %s, "
                  "seq = nextval('agentgate_approvals_seq'), updated_at = now() WHERE id = %s",
                  (a.state, json.dumps(to_record(a)), a.id))
        c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, a.id))

    # ------------------------------------------------------------ opening a hold
    def create(self, *a: Any, **kw: Any) -> PendingApproval:
        # every hold must be counted and written in Postgres first: the addon calls acreate
        raise ApprovalError(503, "approval_store_unavailable",
                            "holds of a shared approval store are opened with acreate")

    async def acreate(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
                      preview: str = "", preview_truncated: bool = False,
                      now: float | None = None, owner: str | None = None) -> PendingApproval:
        return (await self.aopen(spec, requester, what, preview, preview_truncated,
                                 owner=owner, now=now))[0]

    async def aopen(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
                    preview: str = "", preview_truncated: bool = False, *,
                    owner: str | None = None, intent: str | None = None,
                    now: float | None = None) -> tuple[PendingApproval, bool]:
        """Open a hold in Postgres, or join the pending hold another replica opened for the
        same intent (an SDK's retry that the balancer sent elsewhere): one approval, one
        notification, every copy released by the one decision."""
        if spec.min_approvals < 1:
            raise ValueError("min_approvals must be >= 1")
        if not self._started:
            raise ApprovalError(503, "approval_store_unavailable",
                                "the shared approval store is not connected yet; the request "
                                "cannot be held for approval, try again later")
        owner = owner if owner is not None else (requester or "")
        now = self.clock() if now is None else now
        a = PendingApproval(id=self.id_factory(), spec=spec, requester=requester,
                            what=dict(what), preview=preview,
                            preview_truncated=preview_truncated, requested_at=now,
                            expires_at=now + spec.timeout, owner=owner)

        async def insert(c: psycopg.AsyncConnection) -> dict[str, Any] | None:
            await c.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_CREATE,))
            if intent:
                cur = await c.execute(
                    "SELECT record FROM agentgate_approvals WHERE state = 'pending' AND "
                    "intent = %s AND replica <> %s LIMIT 1", (intent, self.replica))
                row = await cur.fetchone()
                if row is not None:
                    return row[0]
            cur = await c.execute(
                "SELECT count(*) FILTER (WHERE owner = %s), count(*) FROM agentgate_approvals "
                "WHERE state = 'pending'", (owner,))
            mine, total = await cur.fetchone()
            if mine >= self.max_pending_per_identity:
                raise ApprovalError(429, "approval_quota_exceeded",
                                    "too many of your requests are awaiting approval "
                                    f"({self.max_pending_per_identity} per identity)")
            if total >= self.max_pending:
                raise ApprovalError(429, "approval_queue_full",
                                    f"too many requests awaiting approval ({self.max_pending})")
            await c.execute(
                "INSERT INTO agentgate_approvals (id, replica, owner, intent, state, record, "
                "seq) VALUES (%s, %s, %s, %s, %s, %s, nextval('agentgate_approvals_seq'))",
                (a.id, self.replica, owner, intent, PENDING, json.dumps(to_record(a))))
            await c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, a.id))
            return None

        other = await self._run(insert, "opening a hold")
        if other is not None:
            self.merge(other)
            mine = self.get(other["id"])
            if mine is not None and not mine.decided:
                return mine, True
            # decided in between (here, not yet in Postgres): open our own hold
            return await self.aopen(spec, requester, what, preview, preview_truncated,
                                    owner=owner, now=now)  # no intent: no second join
        self._pending[a.id] = a
        self._owner_of[a.id] = owner
        self._owned[owner] = self._owned.get(owner, 0) + 1
        self.changed(a)
        return a, False

    # ------------------------------------------------------------ votes, first in Postgres
    async def _vote(self, op: str, approval_id: str, args: tuple, kw: dict) -> PendingApproval:
        async def vote(c: psycopg.AsyncConnection) -> dict[str, Any]:
            cur = await c.execute(
                "SELECT record FROM agentgate_approvals WHERE id = %s FOR UPDATE",
                (approval_id,))
            row = await cur.fetchone()
            if row is None:
                raise ApprovalError(404, "approval_not_found", f"no approval {approval_id!r}")
            a = from_record(row[0])
            getattr(_scratch(a, self.clock), op)(approval_id, *args, **kw)
            rec = to_record(a)
            await c.execute(
                "UPDATE agentgate_approvals SET state = %s, record = %s, "
                "seq = nextval('agentgate_approvals_seq'), updated_at = now() WHERE id = %s",
                (a.state, json.dumps(rec), a.id))
            await c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, a.id))
            return rec

        rec = await self._run(vote, f"recording a vote on {approval_id}")
        self.merge(rec)
        mine = self.get(approval_id)
        return mine if mine is not None else from_record(rec)

    async def aapprove(self, approval_id: str, sub: str, groups: Any = (), *,
                       via: str = VIA_API, reason: Any = None) -> PendingApproval:
        return await self._vote("approve", approval_id, (sub, groups),
                                {"via": via, "reason": reason})

    async def adeny(self, approval_id: str, sub: str, groups: Any = (), reason: Any = None,
                    *, via: str = VIA_API) -> PendingApproval:
        return await self._vote("deny", approval_id, (sub, groups, reason), {"via": via})

    # ------------------------------------------------------------ sync: mirror, then replay
    def approve(self, approval_id: str, *args: Any, **kw: Any) -> PendingApproval:
        a = super().approve(approval_id, *args, **kw)
        self._queue("approve", approval_id, args, {k: v for k, v in kw.items() if k != "now"})
        return a

    def deny(self, approval_id: str, *args: Any, **kw: Any) -> PendingApproval:
        a = super().deny(approval_id, *args, **kw)
        self._queue("deny", approval_id, args, {k: v for k, v in kw.items() if k != "now"})
        return a

    def expire(self, approval_id: str, now: float | None = None) -> PendingApproval:
        a = super().expire(approval_id, now)
        self._queue("expire", approval_id, (), {})
        return a

    def cancel(self, approval_id: str, reason: str, now: float | None = None
               ) -> PendingApproval | None:
        a = super().cancel(approval_id, reason, now)
        if a is not None:
            self._queue("cancel", approval_id, (reason,), {})
        return a

    def _queue(self, op: str, approval_id: str, args: tuple, kw: dict) -> None:
        self._replays.append((op, approval_id, args, kw))
        if self._wake is not None:
            self._wake.set()

    async def _replay_all(self) -> None:
        while self._replays:
            item = self._replays[0]
            await self._run(functools.partial(self._replay_one, item=item),
                            f"recording {item[0]} of {item[1]}")
            self._replays.pop(0)

    async def _replay_one(self, c: psycopg.AsyncConnection,
                          item: tuple[str, str, tuple, dict]) -> None:
        op, approval_id, args, kw = item
        cur = await c.execute("SELECT record FROM agentgate_approvals WHERE id = %s FOR UPDATE",
                              (approval_id,))
        row = await cur.fetchone()
        if row is None:
            return
        a = from_record(row[0])
        try:
            getattr(_scratch(a, self.clock), op)(approval_id, *args, **kw)
        except ApprovalError as e:
            log.warning("agentgate: approval %s: %s here was refused by the shared store "
                        "(%s); the store keeps %s", approval_id, op, e.message, a.state)
            mine = self.get(approval_id)
            if mine is not None and a.decided:  # show what the shared store says
                mine.state, mine.reason, mine.decided_at = a.state, a.reason, a.decided_at
                mine.votes = a.votes
                self.changed(mine)
            return
        await c.execute(
            "UPDATE agentgate_approvals SET state = %s, record = %s, "
            "seq = nextval('agentgate_approvals_seq'), updated_at = now() WHERE id = %s",
            (a.state, json.dumps(to_record(a)), a.id))
        await c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, a.id))

    # ------------------------------------------------------------ merging others' changes
    def merge(self, rec: dict[str, Any]) -> None:
        """Bring one row of the shared table into the mirror. A decision on a hold this
        replica keeps goes through `_decide`, hence `on_decided`: the held flow is released."""
        try:
            new = from_record(rec)
        except (KeyError, TypeError, ValueError) as e:
            log.error("agentgate: shared approval store: unreadable row %r (%s)",
                      rec.get("id") if isinstance(rec, dict) else None, e)
            return
        cur = self.get(new.id)
        if cur is None:
            if new.decided:
                self._decided[new.id] = new
                while len(self._decided) > self.keep_decided:
                    self._decided.popitem(last=False)
            else:
                self._pending[new.id] = new
            self.changed(new)
            return
        if cur.decided:
            return
        if new.decided:
            cur.votes = new.votes
            cur.preview, cur.preview_truncated = new.preview, new.preview_truncated  # short
            self._decide(cur, new.state, new.reason, new.decided_at or self.clock())
        elif [v.to_dict() for v in new.votes] != [v.to_dict() for v in cur.votes]:
            cur.votes = new.votes
            self.changed(cur)

    async def _fetch(self, ids: list[str]) -> set[str]:
        """Merge these rows; returns the ids found."""
        async def get(c: psycopg.AsyncConnection) -> list[Any]:
            cur = await c.execute("SELECT record FROM agentgate_approvals WHERE id = ANY(%s)",
                                  (ids,))
            return [r[0] for r in await cur.fetchall()]

        found = set()
        for rec in await self._run(get, "reading a changed approval"):
            found.add(rec.get("id"))
            self.merge(rec)
        return found

    # ------------------------------------------------------------ background loops
    async def _listen(self) -> None:
        """LISTEN for changes; a lost connection is retried (the poll covers the gap)."""
        while True:
            try:
                conn = await self._connect(autocommit=True)
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    if self._wake is not None:
                        self._wake.set()  # sync now: what changed before LISTEN took hold
                    async for n in conn.notifies():
                        try:
                            await self._fetch([n.payload])
                        except ApprovalError:
                            pass  # the poll picks it up when Postgres is back
                finally:
                    self.listening = False
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.debug("shared approval store: LISTEN connection lost (%s)",
                          type(e).__name__)
            except Exception:  # noqa: BLE001 - the listener must outlive one bad message
                log.exception("agentgate: shared approval store: LISTEN loop failed")
            await asyncio.sleep(min(self.poll, 1.0))

    async def _poll_loop(self) -> None:
        warned = False
        while True:
            try:
                if not self._started:
                    await self._run(self._setup, "creating the tables")
                    self._started = self._ever = True
                    log.info("agentgate: shared approval store %s ready (replica %s)",
                             self.where, self.replica)
                await self._tick()
                warned = False
            except asyncio.CancelledError:
                raise
            except ApprovalError:
                if not warned:
                    log.log(logging.ERROR if self._ever else logging.WARNING,
                            "agentgate: shared approval store %s unreachable: new holds are "
                            "refused until it is back", self.where)
                    warned = True
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round
                log.exception("agentgate: shared approval store: poll failed")
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()

    async def _tick(self) -> None:
        """Heartbeat, reap dead replicas' holds, replay queued transitions, sync the mirror,
        forget old decided rows."""
        now = self.clock()

        async def beat(c: psycopg.AsyncConnection) -> list[Any]:
            await c.execute(
                "INSERT INTO agentgate_replicas (replica, host, lease_until) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) ON CONFLICT (replica) "
                "DO UPDATE SET lease_until = excluded.lease_until",
                (self.replica, socket.gethostname(), self.lease))
            # a dead replica's holds (no live lease), and any hold LATE seconds past its
            # deadline (its replica should have expired it: a safety net, not the timer)
            cur = await c.execute(
                "SELECT a.record, a.replica, r.replica IS NULL FROM agentgate_approvals a "
                "LEFT JOIN agentgate_replicas r ON r.replica = a.replica AND r.lease_until > "
                "now() WHERE a.state = 'pending' AND (r.replica IS NULL OR "
                "(a.record->>'expires_at')::float8 < %s) FOR UPDATE OF a SKIP LOCKED",
                (now - LATE,))
            reaped = []
            for rec, replica, dead in await cur.fetchall():
                a = from_record(rec)
                scratch = _scratch(a, self.clock)
                if dead:
                    scratch.cancel(a.id, f"the gateway replica holding it ({replica}) stopped",
                                   now)
                else:
                    scratch.expire(a.id, now)
                await self._write(c, a)
                reaped.append((a.id, replica))
            await c.execute("DELETE FROM agentgate_replicas WHERE lease_until < now() - "
                            "make_interval(secs => %s)", (self.lease,))
            await c.execute("DELETE FROM agentgate_approvals WHERE state <> 'pending' AND "
                            "updated_at < now() - make_interval(secs => %s)",
                            (self.keep_seconds,))
            return reaped

        for approval_id, replica in await self._run(beat, "renewing the lease"):
            log.warning("agentgate: approval %s of replica %s closed here (its lease ran out, "
                        "or its deadline passed %gs ago)", approval_id, replica, LATE)
        await self._replay_all()
        await self._sync()

    async def _sync(self) -> None:
        """The poll: every pending row, every row changed since the last poll, and any hold
        pending here that is neither (decided in a commit that overtook the sequence)."""
        last = self._last_seq

        async def read(c: psycopg.AsyncConnection) -> list[Any]:
            cur = await c.execute(
                "SELECT record, seq FROM agentgate_approvals WHERE state = 'pending' "
                "OR seq > %s ORDER BY seq LIMIT 20000", (last,))
            return await cur.fetchall()

        rows = await self._run(read, "polling")
        seen = set()
        for rec, seq in rows:
            self._last_seq = max(self._last_seq, seq)
            seen.add(rec.get("id"))
            self.merge(rec)
        missing = [i for i in self._pending if i not in seen]
        if missing:
            found = await self._fetch(missing)
            for approval_id in missing:
                if approval_id not in found:  # gone from the table: nobody can decide it
                    ApprovalStore.cancel(self, approval_id,
                                         "removed from the shared approval store")


def state_store(dsn: str | None = None) -> PgApprovalStore | None:
    """The shared store when `AGENTGATE_STATE` (or `dsn`) names a Postgres database, else
    None (the in-memory store: one process, nothing to set up)."""
    dsn = (dsn if dsn is not None else os.environ.get(STATE_ENV, "")).strip()
    return PgApprovalStore(dsn) if dsn else None

