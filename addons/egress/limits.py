"""Resource limits at the edge: header size and count, body size, slow and idle clients.

One agent must not be able to hold the gateway's memory or connections:
- Request heads: mitmproxy's HTTP/1 server buffers a head until its blank line with no bound
  (a 64 MiB header was read and forwarded). A version-pinned wrapper around
  `Http1Server.read_headers` answers 431 and closes as soon as the buffered head exceeds
  `agentgate_max_header_bytes`; `requestheaders` also refuses too many headers (431), for
  every HTTP version.
- Bodies: a declared Content-Length above `agentgate_max_body_bytes` is refused with 413 at
  `requestheaders`, before any of the upload is read; mitmproxy's `body_size_limit` is held
  at the same value so a chunked body is cut (413) once that many bytes were buffered, never
  more.
- Slow and idle clients: an asyncio watchdog closes a connection whose next request head has
  not arrived within `agentgate_head_timeout` seconds of connecting or of the last answer
  (idle keep-alive, slowloris heads, a silent CONNECT tunnel) and one whose body has not
  finished within `agentgate_body_timeout` seconds. Time waiting on the upstream or an
  approval is not the client's and is not limited here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.utils import human

from addons.frame.errors import error_body, guess_dialect
from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate.limits")

STEP = "limits"
DEFAULTS = {"agentgate_max_header_bytes": 64 * 1024, "agentgate_max_headers": 100,
            "agentgate_max_body_bytes": 64 * 1024 * 1024, "agentgate_head_timeout": 60,
            "agentgate_body_timeout": 300}
HTTP_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/3"})
_state = {"max_header_bytes": DEFAULTS["agentgate_max_header_bytes"]}


def _install_head_limit() -> None:
    """Wrap Http1Server.read_headers once (mitmproxy 12.x: `self.buf` is the receive buffer
    holding the head being read)."""
    server = _http1.Http1Server
    if getattr(server.read_headers, "agentgate_limited", False):
        return
    original = server.read_headers

    def read_headers(self, event: events.ConnectionEvent):
        if isinstance(event, events.DataReceived):
            limit = _state["max_header_bytes"]
            buf = self.buf
            if len(buf) > limit and bytes(buf)[:limit + 4].find(b"\r\n\r\n") < 0:
                log.warning("agentgate: request head over %d bytes from %s; closing",
                            limit, self.conn.peername)
                yield commands.SendData(self.conn, _head_too_large(self, limit))
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from original(self, event)

    read_headers.agentgate_limited = True  # type: ignore[attr-defined]
    read_headers.__wrapped__ = original  # type: ignore[attr-defined]
    server.read_headers = read_headers  # type: ignore[method-assign]


def _head_too_large(server: _http1.Http1Server, limit: int) -> bytes:
    """A 431 in the caller's dialect (guessed from the tunnel's target: no request yet)."""
    address = server.context.server.address
    dialect = guess_dialect(str(address[0]) if address else "", "")
    body = error_body(dialect, 431, f"request head larger than {limit} bytes",
                      "headers_too_large")
    resp = http.Response.make(431, body, {"content-type": "application/json",
                                          "x-agentgate-refused": "headers_too_large",
                                          "connection": "close"})
    return assemble_response(resp)


@dataclass
class _Conn:
    idle_since: float | None  # waiting for a request head since (None: a request is active)
    bodies: dict[str, float] = field(default_factory=dict)  # flow id -> head received at
    active: set[str] = field(default_factory=set)  # flows the client is not responsible for


class EdgeLimits:
    def __init__(self) -> None:
        self.conns: dict[str, _Conn] = {}
        self._task: asyncio.Task | None = None
        # The per-request limits, read in configure(): every ctx.options read deep-copies
        # the value (twice for a default), three times on every request otherwise.
        self._limits: tuple[int, int, int] | None = None

    def _request_limits(self) -> tuple[int, int, int]:
        """(max_headers, max_header_bytes, max_body_bytes) as the options say now."""
        if self._limits is None:
            opts = ctx.options
            self._limits = (opts.agentgate_max_headers, opts.agentgate_max_header_bytes,
                            opts.agentgate_max_body_bytes)
        return self._limits

    def load(self, loader) -> None:
        _install_head_limit()
        loader.add_option("agentgate_max_header_bytes", int,
                          DEFAULTS["agentgate_max_header_bytes"],
                          "Largest request head (request line + headers) in bytes (431).")
        loader.add_option("agentgate_max_headers", int, DEFAULTS["agentgate_max_headers"],
                          "Most request header fields (431).")
        loader.add_option("agentgate_max_body_bytes", int, DEFAULTS["agentgate_max_body_bytes"],
                          "Largest request/response body in bytes (413); also held as "
                          "mitmproxy's body_size_limit.")
        loader.add_option("agentgate_head_timeout", int, DEFAULTS["agentgate_head_timeout"],
                          "Seconds a client connection may be idle or take to send a request "
                          "head before it is closed.")
        loader.add_option("agentgate_body_timeout", int, DEFAULTS["agentgate_body_timeout"],
                          "Seconds a client may take to send a request body.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        for name in DEFAULTS:
            if name in updated and getattr(opts, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be a positive number")
        self._limits = None  # read again (any option change reaches here)
        self._request_limits()
        _state["max_header_bytes"] = opts.agentgate_max_header_bytes
        # mitmproxy's own limit bounds what it buffers of a chunked body: never above ours.
        current = human.parse_size(opts.body_size_limit) if opts.body_size_limit else None
        if current is None or current > opts.agentgate_max_body_bytes:
            opts.update(body_size_limit=str(opts.agentgate_max_body_bytes))

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # -- connection bookkeeping (client ids are stable across a connection's flows)
    def client_connected(self, client) -> None:
        self.conns[client.id] = _Conn(idle_since=time.monotonic())

    def client_disconnected(self, client) -> None:
        self.conns.pop(client.id, None)

    def _conn(self, flow: http.HTTPFlow) -> _Conn | None:
        return self.conns.get(flow.client_conn.id)

    @guarded(STEP, skip_answered=False)
    def http_connect(self, flow: http.HTTPFlow) -> None:
        c = self._conn(flow)
        if c is not None:
            c.idle_since = time.monotonic()  # the tunnel's first head is due in time

    @guarded(STEP)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = self._conn(flow)
        if c is not None:
            c.idle_since = None
            c.bodies[flow.id] = time.monotonic()
        max_headers, max_header_bytes, max_body_bytes = self._request_limits()
        if flow.request.http_version not in HTTP_VERSIONS:
            # mitmproxy parses any "HTTP/x.y" and would forward it as such: an upstream
            # reading an unknown version its own way is a framing disagreement.
            refuse(flow, 505, "HTTP version not supported", "http_version_not_supported",
                   STEP, headers={"connection": "close"})
            return
        # one pass over the fields for what len(headers) (distinct names, lower-cased),
        # the size and get_all("content-length") would each walk them for
        names: set[bytes] = set()
        size = 0
        raw_lengths: list[bytes] = []
        for k, v in flow.request.headers.fields:
            lk = k.lower()
            names.add(lk)
            size += len(k) + len(v) + 4
            if lk == b"content-length":
                raw_lengths.append(v)
        if len(names) > max_headers:
            refuse(flow, 431, f"more than {max_headers} request headers",
                   "headers_too_large", STEP)
            return
        if size > max_header_bytes:
            refuse(flow, 431, f"request headers larger than {max_header_bytes} "
                   "bytes", "headers_too_large", STEP)
            return
        if raw_lengths:
            lengths = [v.decode("utf-8", "surrogateescape") for v in raw_lengths]
            try:
                declared = {int(v.strip()) for v in lengths}
            except ValueError:
                refuse(flow, 400, "malformed Content-Length", "bad_content_length", STEP)
                return
            if len(declared) > 1 or min(declared) < 0:
                refuse(flow, 400, "conflicting Content-Length headers", "bad_content_length",
                       STEP)
                return
            if declared.pop() > max_body_bytes:
                refuse(flow, 413, f"request body larger than {max_body_bytes} "
                       "bytes", "body_too_large", STEP, headers={"connection": "close"})

    @guarded(STEP, skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        c = self._conn(flow)
        if c is not None:
            c.bodies.pop(flow.id, None)
            c.active.add(flow.id)

    def _finished(self, flow: http.HTTPFlow) -> None:
        c = self._conn(flow)
        if c is None:
            return
        c.bodies.pop(flow.id, None)
        c.active.discard(flow.id)
        if not c.bodies and not c.active:
            c.idle_since = time.monotonic()

    @guarded(STEP, skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._finished(flow)

    @guarded(STEP, skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    @guarded(STEP, skip_answered=False)
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        c = self._conn(flow)
        if c is not None:  # an open WebSocket is not an idle connection
            c.active.add(flow.id)
            c.idle_since = None

    @guarded(STEP, skip_answered=False)
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self._sweep(time.monotonic())
            except Exception:  # noqa: BLE001 - the watchdog must keep running
                log.exception("agentgate: connection watchdog sweep failed")

    def _sweep(self, now: float) -> None:
        opts = ctx.options
        for cid, c in list(self.conns.items()):
            why = None
            if c.idle_since is not None and not c.active and not c.bodies \
                    and now - c.idle_since > opts.agentgate_head_timeout:
                why = f"no request head within {opts.agentgate_head_timeout}s (idle or slow)"
            elif any(now - t > opts.agentgate_body_timeout for t in c.bodies.values()):
                why = f"request body not received within {opts.agentgate_body_timeout}s"
            if why:
                self.conns.pop(cid, None)
                self._close(cid, why)

    @staticmethod
    def _close(client_id: str, why: str) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = getattr(proxyserver, "connections", {}).get(client_id)
        if handler is None:
            return
        log.warning("agentgate: closing client connection %s: %s",
                    handler.client.peername, why)
        handler.close_connection(handler.client)
