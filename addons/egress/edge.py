"""Every byte is an inspected HTTP flow or the connection is refused.

mitmproxy's defaults relay what it cannot read: `rawtcp` turns a tunnel whose first bytes
are not TLS/HTTP into a raw TCP relay, `ignore_hosts`/`allow_hosts`/`tcp_hosts`/`udp_hosts`
pass connections through untouched, and a tunnel whose first segment is shorter than three
bytes is "not TLS" (`starts_like_tls_record` needs 3 bytes), so a ClientHello split after
its first byte or two went into that raw relay and on to the upstream end-to-end.

Two mechanisms close the class:
- `EdgeOptions.configure` refuses (OptionsError) the options that ask for pass-through and
  forces the ones whose defaults allow it (`rawtcp` off, `connection_strategy` lazy so no
  upstream TLS handshake happens before the request is checked).
- `LayerGuard.next_layer` runs after mitmproxy's own NextLayer (it is appended to the
  master's chain: scripts run *before* the built-in NextLayer) and decides every layer from
  the bytes itself: TLS (which the gateway terminates) or an HTTP request line, else the
  connection is closed; while the bytes seen so far cannot decide (a split ClientHello, half
  a request line) the decision is deferred instead of guessed.

A third closes the error-page class: mitmproxy answers some requests itself, below every
addon hook, with an HTML page naming mitmproxy and quoting request data (413 from
`body_size_limit`, 400 for a malformed head or a refused CONNECT inside a tunnel, 502 when
the upstream connection fails). `install_error_pages` replaces, version-pinned, the two
places those pages are built (HTTP/1's `make_error_response`, HTTP/2's
ResponseProtocolError branch) with a JSON error in the caller's dialect: same status, a
fixed message per status (never mitmproxy's text, which can quote the request).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
import weakref
from collections.abc import Iterator

from mitmproxy import ctx, exceptions, http, version
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import _events, _http1, _http2
from mitmproxy.proxy.mode_specs import RegularMode
from mitmproxy.tls import ClientHelloData

from addons.frame.errors import error_body, guess_dialect
from addons.frame.guard import dialect_of, guarded

log = logging.getLogger("agentgate.edge")

# Options that would let bytes pass without becoming an inspected flow.
PASS_THROUGH_OPTIONS = ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts")
# Forced values: mitmproxy's defaults here would relay or pre-connect, or (onboarding) answer
# requests from the gateway itself: mitmproxy's onboarding app runs before every hook of
# ours at `request`, so a request for its host (mitm.it, a declared upstream or not) got
# mitmproxy's page instead of the pipeline — and the check ran on every request.
FORCED = {"rawtcp": False, "connection_strategy": "lazy", "onboarding": False}

# A request line we can read: METHOD SP target SP HTTP/x[.y] (HTTP/2's preface included).
_REQUEST_LINE = re.compile(rb"[A-Z]{3,20} [\x21-\x7e]{1,8192} HTTP/\d(?:\.\d)?\r?\n")
# What can still become a request line (no newline yet): wait for more bytes.
_REQUEST_LINE_PREFIX = re.compile(rb"[A-Z]{0,20}(?: [\x21-\x7e]{0,8192}(?: [HTP/0-9.]{0,8}\r?)?)?")
MAX_UNDECIDED = 16 * 1024  # bytes we wait for before giving up on deciding
MAX_CLIENT_HELLO = 64 * 1024  # real ones are < 2 KiB (post-quantum key shares included)


def classify(data: bytes) -> str:
    """'tls', 'http', 'more' (cannot decide yet) or 'refuse' for a connection's first bytes."""
    if starts_like_tls_record(data):
        # Record header (5) + handshake header (4): it must announce a ClientHello of a sane
        # size, or mitmproxy buffers up to the 16 MiB the header claims before giving up.
        if len(data) < 9:
            return "more"
        if data[5] != 0x01 or int.from_bytes(data[6:9], "big") > MAX_CLIENT_HELLO:
            return "refuse"
        return "tls"
    if len(data) < 3 and data[:1] in (b"", b"\x16") and data[1:2] in (b"", b"\x03"):
        return "more"  # a TLS record header split after its first byte(s)
    if _REQUEST_LINE.match(data):
        return "http"
    if len(data) < MAX_UNDECIDED and _REQUEST_LINE_PREFIX.fullmatch(data):
        return "more"
    return "refuse"


class RefuseLayer(layer.Layer):
    """Closes the client connection (and any server connection) without relaying a byte."""

    def __init__(self, context, reason: str) -> None:
        super().__init__(context)
        self.reason = reason
        self.closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.closed:
            return
        if isinstance(event, (events.Start, events.DataReceived, events.ConnectionClosed)):
            self.closed = True
            peer = self.context.client.peername
            log.warning("agentgate: closing connection from %s: %s", peer, self.reason)
            if self.context.server.connected:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


def _chosen(first: layer.Layer | None) -> Iterator[layer.Layer]:
    cur = first
    while cur is not None:
        yield cur
        cur = getattr(cur, "child_layer", None)


# A NextLayer below TLS decides (through this guard again) what runs inside the TLS.
ALLOWED_LAYERS = (layers.ServerTLSLayer, layers.ClientTLSLayer, layers.HttpLayer, layer.NextLayer)


class LayerGuard:
    """Appended to the end of the master's addon chain (after the built-in NextLayer)."""

    name = "agentgate_layer_guard"

    @guarded("edge")
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            self._decide(nextlayer)
        except Exception:  # noqa: BLE001 - fail closed: refuse rather than relay
            log.exception("agentgate: layer decision failed; closing the connection")
            self._replace(nextlayer, "internal error while deciding the protocol")

    @staticmethod
    def _drop(nextlayer: layer.NextLayer) -> None:
        # Layers register themselves in context.layers when built: take back what the
        # built-in chose before putting our own decision in its place.
        for lyr in _chosen(nextlayer.layer):
            if lyr in nextlayer.context.layers:
                nextlayer.context.layers.remove(lyr)
        nextlayer.layer = None

    def _replace(self, nextlayer: layer.NextLayer, reason: str) -> None:
        self._drop(nextlayer)
        nextlayer.layer = RefuseLayer(nextlayer.context, reason)

    def _decide(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if isinstance(nextlayer.layer, RefuseLayer):
            return
        if context.client.transport_protocol != "tcp":
            self._replace(nextlayer, "only TCP (HTTP/1, HTTP/2 over TLS) is served")
            return
        if not isinstance(context.layers[0], modes.HttpProxy):
            self._replace(nextlayer, f"proxy mode {type(context.layers[0]).__name__} is not "
                          "served; only the regular HTTP(S) proxy mode")
            return
        if nextlayer.data_server():
            self._replace(nextlayer, "the server spoke first (not HTTP or TLS)")
            return
        data = nextlayer.data_client()
        kind = classify(data)
        if kind == "more":
            self._drop(nextlayer)  # wait for more bytes instead of guessing
            return
        # TLS the gateway already terminated inside this tunnel (TLS to the proxy itself,
        # before the CONNECT, is a different hop and allowed).
        chosen = list(_chosen(nextlayer.layer))
        below = [x for x in context.layers if not any(x is c for c in chosen)]
        last_http = max((i for i, x in enumerate(below)
                         if isinstance(x, layers.HttpLayer)), default=-1)
        in_tls = any(isinstance(x, layers.ClientTLSLayer) for x in below[last_http + 1:])
        if kind == "refuse" or (kind == "tls" and in_tls):
            why = "TLS inside TLS" if kind == "tls" else "neither TLS nor an HTTP request"
            self._replace(nextlayer, f"connection starts with {why}")
            return
        if not chosen or not all(isinstance(x, ALLOWED_LAYERS) for x in chosen) or (
                kind == "http" and not isinstance(chosen[0], layers.HttpLayer)) or (
                kind == "tls" and isinstance(chosen[0], layers.HttpLayer)):
            names = ", ".join(type(x).__name__ for x in chosen) or "none"
            self._replace(nextlayer, f"refusing the {names} layer for a {kind} connection")

    @guarded("edge")
    def tls_clienthello(self, data: ClientHelloData) -> None:
        # No addon may turn an intercepted TLS connection into a pass-through.
        data.ignore_connection = False

    # The guard runs last in the chain: upstream metadata is set by now. Remember the
    # dialect for the error pages mitmproxy may still send on this tunnel / for this request.
    @guarded("edge", skip_answered=False)
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if isinstance(flow.metadata.get("upstream"), dict):
            _BY_CONN[flow.client_conn.id] = dialect_of(flow)

    @guarded("edge", skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        if flow.request is not None:
            _BY_REQUEST[flow.request] = dialect_of(flow)

    @guarded("edge", skip_answered=False)
    def client_disconnected(self, client) -> None:
        _BY_CONN.pop(client.id, None)


class EdgeOptions:
    """Refuses the mitmproxy options that relay uninspected bytes; installs the LayerGuard."""

    def __init__(self) -> None:
        self.guard = LayerGuard()

    def load(self, loader) -> None:
        install_error_pages()
        attach_layer_guard(getattr(ctx, "master", None), self.guard)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        for name in PASS_THROUGH_OPTIONS:
            if name in updated and getattr(opts, name, None):
                raise exceptions.OptionsError(
                    f"{name} is refused by agentgate: every connection must be an inspected "
                    "HTTP flow (no pass-through, no raw TCP/UDP)")
        if "mode" in updated:
            for spec in opts.mode:
                if not isinstance(_parse_mode(spec), RegularMode):
                    raise exceptions.OptionsError(
                        f"mode {spec!r} is refused by agentgate: only the regular HTTP(S) "
                        "proxy mode is inspected")
        force = {k: v for k, v in FORCED.items()
                 if (k in updated or not hasattr(self, "_forced")) and hasattr(opts, k)
                 and getattr(opts, k) != v}
        self._forced = True
        if force:
            log.info("agentgate: forcing %s", ", ".join(f"{k}={v}" for k, v in force.items()))
            opts.update(**force)


def attach_layer_guard(master, guard: LayerGuard | None = None) -> None:
    """Append the LayerGuard to the master's chain once; it stays across script reloads
    (and when the script fails to load), so the edge never opens."""
    install_error_pages()
    addons = getattr(master, "addons", None)
    if addons is None or addons.get(LayerGuard.name) is not None:
        return
    guard = guard or LayerGuard()
    addons.register(guard)
    addons.chain.append(guard)


def _parse_mode(spec: str):
    from mitmproxy.proxy.mode_specs import ProxyMode
    return ProxyMode.parse(spec)


# -- mitmproxy's own error pages, answered in the caller's dialect -----------------------

PINNED_MITMPROXY = "12."
# status -> (message, code): fixed texts; mitmproxy's message can quote request bytes.
MITM_ERRORS: dict[int, tuple[str, str]] = {
    400: ("malformed or invalid HTTP request", "bad_request"),
    413: ("request body larger than the gateway's limit", "body_too_large"),
    502: ("the upstream could not be reached or answered invalidly", "upstream_unreachable"),
}
_BY_CONN: dict[str, str] = {}  # client connection id -> dialect of its tunnel's upstream
_BY_REQUEST: weakref.WeakKeyDictionary[http.Request, str] = weakref.WeakKeyDictionary()
# The HTTP/1 server connection whose code is running right now (set per generator step).
_CURRENT: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "agentgate_error_conn", default=None)


def dialect_error(dialect: str, status: int) -> tuple[dict[str, str], bytes]:
    """Headers and body of the answer that replaces mitmproxy's page for `status`."""
    message, code = MITM_ERRORS.get(status, ("request refused by the gateway", "refused"))
    return ({"content-type": "application/json", "x-agentgate-refused": code,
             "connection": "close"}, error_body(dialect, status, message, code))


def conn_dialect(conn: object) -> str:
    """Dialect for an answer on a client-side HTTP connection (no flow at hand): the
    request's declared upstream, else the tunnel's, else a guess from host and path."""
    req = getattr(conn, "request", None)
    if req is not None and req in _BY_REQUEST:
        return _BY_REQUEST[req]
    context = getattr(conn, "context", None)
    client = getattr(context, "client", None)
    if client is not None and client.id in _BY_CONN:
        return _BY_CONN[client.id]
    host, path = "", ""
    if req is not None:
        host, path = req.host or req.host_header or "", req.path or ""
    if not host and context is not None:
        address = context.server.address
        host = str(address[0]) if address else ((client.sni or "") if client else "")
    return guess_dialect(host, path)


def _make_error_response(status_code: int, message: str = "") -> bytes:
    """Stands in for `_http1.make_error_response` (same signature); `message` dropped."""
    headers, body = dialect_error(conn_dialect(_CURRENT.get()), status_code)
    return assemble_response(http.Response.make(status_code, body, headers))


def _first_step(method):
    """Run a generator method with _CURRENT set to its connection while its first step
    runs, and reset after it (other connections run while it waits on a hook). The first
    step is the only one in which mitmproxy 12's Http1Server.send and read_headers build
    an error page: `make_error_response(...)` is the argument of their first `yield` on
    that path (tests/egress/test_error_pages.py fails if it is not). The rest of the
    generator is delegated natively (`yield from`): no Python work per later step."""
    def wrapper(self, event):
        gen = method(self, event)
        token = _CURRENT.set(self)
        try:
            cmd = next(gen)
        except StopIteration as stop:
            return stop.value
        finally:
            _CURRENT.reset(token)
        sent = yield cmd
        if sent is None:  # what the layer sends back for these commands
            return (yield from gen)
        while True:
            try:
                cmd = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            sent = yield cmd
    wrapper.__name__ = method.__name__
    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _send(method):
    """Http1Server.send: only a ResponseProtocolError can build an error page; every other
    event (headers, data, end of message: three per response) goes straight through."""
    stepped = _first_step(method)

    def send(self, event):
        if isinstance(event, _events.ResponseProtocolError):
            return stepped(self, event)
        return method(self, event)
    send.__name__ = method.__name__
    send.__wrapped__ = method  # type: ignore[attr-defined]
    return send


def _h2_handle_event(original):
    """Http2Server._handle_event with mitmproxy's ResponseProtocolError answer (text/html
    and a page) replaced by ours; everything else goes to the original."""
    def _handle_event(self, event):
        status = event.code.http_status_code() \
            if isinstance(event, _events.ResponseProtocolError) else None
        if status is not None and not self.is_closed(event.stream_id) \
                and self.is_open_for_us(event.stream_id) \
                and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent:
            headers, body = dialect_error(conn_dialect(self), status)
            self.h2_conn.send_headers(event.stream_id, [(b":status", b"%d" % status)] + [
                (k.encode(), v.encode()) for k, v in headers.items() if k != "connection"])
            self.h2_conn.send_data(event.stream_id, body, end_stream=True)
            data = self.h2_conn.data_to_send()
            if data:
                yield commands.SendData(self.conn, data)
            return
        return (yield from original(self, event))
    _handle_event.__wrapped__ = original  # type: ignore[attr-defined]
    return _handle_event


# Source fragments the replacement relies on: if mitmproxy changes them, refuse to start.
_PINS = (
    ((_http1.Http1Server, "send"), "make_error_response(status, event.message)"),
    ((_http1.Http1Server, "read_headers"), "make_error_response(400, str(e))"),
    ((_http2.Http2Connection, "_handle_event"), "format_error(status, event.message)"),
    ((_http2.Http2Connection, "_handle_event"), "stream.state_machine.headers_sent"),
    ((_http2.Http2Server, "_handle_event"), "super()._handle_event(event)"),
)


def check_pins() -> list[str]:
    """What no longer matches the mitmproxy internals the error pages rely on."""
    bad = []
    if not version.VERSION.startswith(PINNED_MITMPROXY):
        bad.append(f"mitmproxy {version.VERSION} is not {PINNED_MITMPROXY}x")
    for (cls, name), fragment in _PINS:
        fn = inspect.unwrap(getattr(cls, name))  # our wrappers (and limits') set __wrapped__
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            src = ""
        if fragment not in src:
            bad.append(f"{cls.__name__}.{name} no longer contains {fragment!r}")
    fn = inspect.unwrap(_http1.make_error_response)
    if list(inspect.signature(fn).parameters) != ["status_code", "message"]:
        bad.append("_http1.make_error_response changed its signature")
    return bad


def install_error_pages() -> None:
    """Install once per process; raises if mitmproxy's internals moved (fail closed)."""
    if getattr(_http1.make_error_response, "agentgate_errors", False):
        return
    bad = check_pins()
    if bad:
        raise RuntimeError("agentgate cannot replace mitmproxy's error pages: " + "; ".join(bad))
    server = _http1.Http1Server
    server.send = _send(server.send)  # type: ignore[method-assign]
    server.read_headers = _first_step(server.read_headers)  # type: ignore[method-assign]
    _make_error_response.__wrapped__ = _http1.make_error_response  # type: ignore[attr-defined]
    _make_error_response.agentgate_errors = True  # type: ignore[attr-defined]
    _http1.make_error_response = _make_error_response
    _http2.Http2Server._handle_event = _h2_handle_event(  # type: ignore[method-assign]
        _http2.Http2Server._handle_event)
