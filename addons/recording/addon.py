"""The recorder addon: every finished flow becomes a hash-chained row in DuckDB.

Hooks (all guarded, fail closed):
- `requestheaders`: names the flow's session early (so annotate shows it in mitmweb) from
  the agent's session header, else the client connection; remembers the URL the agent asked
  for (credentials may re-route the request with `forward_to`); refuses new flows with 503
  `recorder_unavailable` while the store cannot be written or its backlog is full.
- a session named in the JSON body (`metadata.thread_id` …) when no header did is read by
  addons/recording/sessions.py's `request` hook, which runs before policy and masking (masking keys
  its placeholder map by session, so it must know the session before it masks).
- `response` (also reached by flows another addon answered: blocked, denied, timed-out
  approvals, refusals), `error` (upstream failures, killed flows, client aborts) and
  `http_connect_error` (CONNECT refused, e.g. default-deny egress): snapshot the flow with
  `flow.get_state()` and queue it; the writer process (addons/recording/writerproc.py)
  redacts, hashes and stores it.
- `done` (mitmproxy calls it on SIGTERM/SIGINT too): write everything queued, then close.

Pure logic lives in addons/recording/store.py; the gateway's side of the writer process in
addons/recording/remote.py, the process itself in writerproc.py (with writer.py's batching).
No DuckDB in the gateway process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy import version as mitmproxy_version

from addons.config.holder import RulesHolder
from addons.frame import decode as body_decode
from addons.frame.guard import already_answered, guarded, refuse
from addons.recording import store
from addons.recording.config import RecorderConfig
from addons.recording.remote import WriterProcess, WriterStartError
from addons.recording.sessions import clean_session

log = logging.getLogger("agentgate.recorder")

DB_NAME = "agentgate.duckdb"
SECRETS_TTL = 5.0  # seconds; credential files may be rotated while we run


def _decode(content: bytes, enc: str) -> bytes:
    # the one bounded decoder (a bomb in a refused flow must not blow up the writer);
    # on failure the store keeps the raw bytes and says so
    return body_decode.decompress(content, enc)


def build_row(pending: store.Pending) -> dict[str, Any]:
    return store.build_row(pending, decode=_decode)


# what a connection state costs beyond its certificates' PEM (a dict of ~20 small values)
_STATE_BYTES = 1024


class ConnStates:
    """Serialised connection states, reused across the flows of a kept-alive connection.

    `flow.get_state()` re-serialises both connections for every flow, including their
    certificate chains as PEM; on the event loop that was the largest part of recording.
    A state is reused while nothing that `get_state` reports can have changed (the key).
    The cached dicts are shared, so they are treated as read-only (the store copies on
    write).
    """

    # Bounded by count and by bytes: a state with a two-certificate chain is ~4.5 KB, so the
    # count alone let 4096 states hold ~18 MiB once that many connections had been served.
    def __init__(self, size: int = 4096, max_bytes: int = 4 << 20) -> None:
        self._cache: OrderedDict[tuple, tuple[dict[str, Any], int]] = OrderedDict()
        self._size = size
        self._max_bytes = max_bytes
        self.bytes = 0

    def get(self, conn: connection.Connection) -> dict[str, Any]:
        key = (conn.id, conn.state, conn.error, conn.timestamp_start, conn.timestamp_end,
               conn.timestamp_tls_setup, conn.tls_version, len(conn.certificate_list),
               conn.sni, conn.alpn, conn.peername, conn.sockname,
               getattr(conn, "timestamp_tcp_setup", None), getattr(conn, "address", None),
               getattr(conn, "via", None))
        hit = self._cache.get(key)
        if hit is not None:
            return hit[0]
        st = conn.get_state()
        cost = _STATE_BYTES + sum(len(c) for c in st.get("certificate_list") or ())
        self._cache[key] = (st, cost)
        self.bytes += cost
        while self._cache and (len(self._cache) > self._size or self.bytes > self._max_bytes):
            self.bytes -= self._cache.popitem(last=False)[1][1]
        return st


def flow_state(flow: http.HTTPFlow, conns: ConnStates, copy_metadata: bool = True
               ) -> dict[str, Any]:
    """Exactly `flow.get_state()` (a test holds it to that), with cached connections.
    `copy_metadata=False`: the flow's metadata dict itself, not a deep copy — only for a
    caller that serialises the state before any other code runs (Recorder._record: the
    writer's `submit` marshals it at once), so nothing can change it under the record."""
    state: dict[str, Any] = {
        "version": mitmproxy_version.FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": conns.get(flow.client_conn),
        "server_conn": conns.get(flow.server_conn),
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": copy.deepcopy(flow.metadata) if copy_metadata else flow.metadata,
        "comment": flow.comment,
        "timestamp_created": flow.timestamp_created,
    }
    backup = flow._backup  # noqa: SLF001 - mirrors Flow.get_state
    state["backup"] = copy.deepcopy(backup) if backup is not None and backup != state \
        else None
    state["request"] = flow.request.get_state()
    state["response"] = flow.response.get_state() if flow.response else None
    state["websocket"] = flow.websocket.get_state() if flow.websocket else None
    return state


def _snapshot_size(flow: http.HTTPFlow) -> int:
    size = len(flow.request.raw_content or b"")
    if flow.response is not None:
        size += len(flow.response.raw_content or b"")
    return size


@functools.lru_cache(maxsize=8)
def _header_keys(names: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    """(name, the name as mitmproxy compares it), encoded once per configured list (one
    per rules load) rather than on every request."""
    return tuple((n, n.encode("utf-8", "surrogateescape").lower()) for n in names)


class RecorderUnavailable(Exception):
    """The audit store cannot take a record now (the message says why)."""


class Recorder:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.writer: WriterProcess | None = None
        self.start_error: str | None = None
        self._recorded: OrderedDict[str, None] = OrderedDict()
        self._secrets: tuple[str, ...] = ()
        self._secrets_at = 0.0
        self._redact: frozenset[str] = store.REDACT_HEADERS
        self._running = False
        self._conns = ConnStates()
        self._lake: tuple[dict[str, Any], str] | None = None
        holder.on_change(self._rules_changed)

    # ------------------------------------------------------------ configuration
    @property
    def cfg(self) -> RecorderConfig:
        rules = self.holder.rules
        cfg = getattr(rules, "recorder", None) if rules is not None else None
        return cfg if isinstance(cfg, RecorderConfig) else RecorderConfig()

    def _rules_changed(self, rules: Any) -> None:
        cfg = self.cfg
        names = set(store.REDACT_HEADERS) | {h.lower() for h in cfg.redact_headers}
        for up in getattr(rules, "upstreams", ()):
            if up.credential is not None:
                names.add(up.credential.header.lower())
        self._redact = frozenset(names)
        self._secrets_at = 0.0  # re-resolve
        w = self.writer
        if w is None and cfg.enabled and self._running:
            # Recording switched on by a rules change: open the store now (until it is
            # open, flows are refused).
            self.start(self.db_path(cfg))
            return
        if w is not None:
            w.batch_size = cfg.batch_size
            w.interval = cfg.batch_interval_ms / 1000
            w.max_pending = cfg.max_pending
            w.retention_days = cfg.retention_days
            w.max_batch_bytes = cfg.max_batch_bytes
            w.max_pending_bytes = cfg.max_pending_bytes
            w.reconfigure()
            if self.db_path(cfg) != w.path:
                log.warning("agentgate: recorder.path changed; restart the gateway to record "
                            "to the new file (still writing %s)", w.path)

    def db_path(self, cfg: RecorderConfig | None = None) -> Path:
        cfg = cfg or self.cfg
        try:
            data = Path(ctx.options.agentgate_data)
        except (AttributeError, KeyError):
            data = Path("data")
        if cfg.path:
            p = Path(cfg.path).expanduser()
            return p if p.is_absolute() else data / p
        return data / DB_NAME

    def _secret_values(self) -> tuple[str, ...]:
        """The real upstream credentials, so they can be scrubbed by value anywhere."""
        now = time.monotonic()
        if now - self._secrets_at < SECRETS_TTL:
            return self._secrets
        vals: set[str] = set()
        rules = self.holder.rules
        for up in getattr(rules, "upstreams", ()) if rules is not None else ():
            ref = up.credential
            if ref is None:
                continue
            value = ref.resolve()
            if value:
                vals.add(value)
                if ref.prefix and value.startswith(ref.prefix):
                    vals.add(value[len(ref.prefix):])
        self._secrets = tuple(sorted(vals))
        self._secrets_at = now
        return self._secrets

    # ------------------------------------------------------------ lifecycle
    def running(self) -> None:
        self._running = True
        cfg = self.cfg
        if not cfg.enabled:
            log.warning("agentgate: recording is OFF (recorder.enabled: false)")
            return
        if not ctx.options.store_streamed_bodies:
            # Streamed bodies (SSE) are otherwise not kept on the flow: record them too.
            ctx.options.update(store_streamed_bodies=True)
        self.start(self.db_path(cfg))

    def start(self, path: str | Path) -> None:
        cfg = self.cfg
        writer = WriterProcess(path, batch_size=cfg.batch_size,
                               interval=cfg.batch_interval_ms / 1000,
                               max_pending=cfg.max_pending, retention_days=cfg.retention_days,
                               serve_queries=cfg.query_socket,
                               max_batch_bytes=cfg.max_batch_bytes,
                               max_pending_bytes=cfg.max_pending_bytes)
        try:
            writer.start()
        except WriterStartError as e:  # fail closed: refuse flows, say why (the process's)
            self.start_error = str(e)
            log.error("agentgate: %s; every flow will be refused", self.start_error)
            return
        except Exception as e:  # noqa: BLE001 - fail closed: refuse flows, say why
            self.start_error = (f"cannot open the audit store {path}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            log.error("agentgate: %s; every flow will be refused", self.start_error)
            return
        self.start_error = None
        self.writer = writer
        if self._lake is not None:
            writer.set_lake(*self._lake)

    def ship_to_lake(self, lake: Any, replica: str) -> None:
        """Ship the store to an audit lake (addons/recording/lake.py's LakeShipping calls
        this): the shipper runs in the writer process, beside the DuckDB instance."""
        self._lake = (dataclasses.asdict(lake), replica)
        if self.writer is not None:
            self.writer.set_lake(*self._lake)

    def done(self) -> None:
        # Synchronous on purpose: while we flush, the event loop produces no new responses
        # that could escape unrecorded; mitmproxy exits right after `done`.
        if self.writer is not None:
            self.writer.close()

    def unavailable(self) -> str | None:
        if not self.cfg.enabled:
            return None
        if self.writer is None:
            return self.start_error or "the audit store is not open"
        return self.writer.overloaded()

    def secret_values(self) -> tuple[str, ...]:
        """The gateway's real upstream credentials (scrubbed by value from every record)."""
        return self._secret_values()

    def record(self, item: store.Direct) -> None:
        """Queue a record that is not an HTTP flow (a SQL statement: addons/database/
        records.py); it is chained with every flow. Raises RecorderUnavailable when it
        cannot be stored (the caller refuses: fail closed); a no-op with recording off."""
        if not self.cfg.enabled:
            return
        writer = self.writer
        if writer is None or writer.closed:
            raise RecorderUnavailable(self.unavailable() or "the audit store is not open")
        writer.submit(item)

    # ------------------------------------------------------------ hooks
    @guarded("recorder", skip_answered=False)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live:
            # loaded from a file (`mitmweb -r`, `mitmdump -r`): recorded when it happened;
            # recording it again would add a second, newer row for the same exchange
            self._recorded[flow.id] = None
            return
        cfg = self.cfg
        # the credentials step may already have stripped credential query parameters;
        # it leaves the agent's URL (values redacted) in metadata for the record
        origin = flow.metadata.get("origin_redacted")
        info: dict[str, Any] = {"origin": origin if isinstance(origin, str)
                                else store.redact_query(flow.request.url)}
        session = None
        # headers.get() scans every field and raises KeyError inside for an absent name:
        # the names present, lowercased as mitmproxy compares them, are read once instead
        present = {k.lower() for k, _ in flow.request.headers.fields}
        for name, key in _header_keys(cfg.session_headers):
            if key not in present:
                continue  # headers.get(name) would be None
            session = clean_session(flow.request.headers.get(name))
            if session:
                info["session_source"] = f"header:{name}"
                break
        if not session:
            session = f"conn-{flow.client_conn.id}"
            info["session_source"] = "connection"
        flow.metadata["session"] = session
        flow.metadata["recorder"] = info
        if already_answered(flow):
            return
        why = self.unavailable()
        if why:
            refuse(flow, 503, f"audit store unavailable, request refused (fail closed): {why}",
                   "recorder_unavailable", "recorder")

    @guarded("recorder", skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "response")

    @guarded("recorder", skip_answered=False)
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        # The upgrade was recorded at `response`, before any message: record the flow
        # again with its (masked) messages, as a second row.
        self._recorded.pop(flow.id, None)
        self._record(flow, "websocket")

    @guarded("recorder", skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "error")

    @guarded("recorder", skip_answered=False)
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "connect_error")

    # ------------------------------------------------------------ recording
    def _record(self, flow: http.HTTPFlow, kind: str) -> None:
        cfg = self.cfg
        if not cfg.enabled or flow.id in self._recorded:
            return
        writer = self.writer
        if writer is None or writer.closed:
            # Cannot be recorded (store never opened, or already closed at shutdown): the
            # client must not get an answer that is not in the audit trail.
            if kind == "response" and flow.response is not None and flow.live:
                log.error("agentgate: audit store not writable; killing an unrecordable flow")
                flow.kill()
            return
        meta = flow.metadata
        session = meta.get("session")
        if not isinstance(session, str) or not session:
            session = f"conn-{flow.client_conn.id}"
            meta["session"] = session
        info = meta.get("recorder")
        if not isinstance(info, dict):
            info = meta["recorder"] = {"session_source": "connection"}
        if flow.response is not None and flow.response.stream:
            info["streamed"] = True
        # a snapshot: WriterProcess.submit serialises it (marshal) before it returns, and
        # nothing runs in between, so later changes cannot race the writer without a deep
        # copy of the metadata first (marshal refuses what is not plain data: a minimal
        # record, as a deep copy of it would have been refused by store.dump_state)
        state = flow_state(flow, self._conns, copy_metadata=False)
        origin = info.get("origin")
        pending = store.Pending(state=state, session=session,
                                origin_url=origin if isinstance(origin, str) else None,
                                kind=kind, secrets=self._secret_values(),
                                redact=self._redact, max_body=cfg.max_body_bytes,
                                size=_snapshot_size(flow))
        writer.submit(pending)
        self._recorded[flow.id] = None
        if len(self._recorded) > 10_000:
            self._recorded.popitem(last=False)


build = build_row  # the builder the writer uses (tests and the benchmark)
