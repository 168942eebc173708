"""The connector's proxy: loopback HTTP proxy in, the gateway (with a fresh token) out.

Per client connection:
- `CONNECT host:port`: a new connection to the gateway, `CONNECT host:port` with
  `Proxy-Authorization: Basic base64("agent:<token>")` (the token fetched for this connection),
  then bytes relayed both ways as they are: no TLS on the agent side, the agent's TLS session
  ends at the gateway, which inspects it.
- an absolute-form plain-HTTP request (`GET http://host/path HTTP/1.1`): forwarded with the
  header added, ONE request per connection: `Connection: close` towards the gateway and back to
  the client, so every request opens a new connection and gets a fresh token (clients reconnect
  on their own after a `close`).
- anything else: 400.

Failures never open a tunnel: a token source failure or an expired token answers 503, an
unreachable gateway 502, each with a plain-text reason (one line also goes to the log). What the
gateway answers to a refused CONNECT (407, 403 …) goes back to the client as it is.

Bounded: at most `max_connections` clients at once (503 beyond), `max_header_bytes` of request
head, `idle_timeout` seconds without a byte either way closes a connection; token sources that
block (file read, command) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from addons.connect.tokens import TokenSource, TokenSourceError

log = logging.getLogger("agentgate.connect")

# request-head limits (the client's head and the gateway's answer head)
MAX_HEADER_LINES = 100
# a refused CONNECT's body (the gateway's 407/403 text) passed back at most this large
MAX_REFUSAL_BODY = 64 * 1024
RELAY_CHUNK = 64 * 1024
# lingering close after an error answer: discard at most this much for at most this long
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 2.0
# over the connection cap, a few more clients still get a clear 503; beyond those, closed
OVERFLOW_ANSWERS = 64
# the same failure reason is logged at most once per this many seconds (an agent retrying in a
# tight loop must not flood stderr); the next line says how many were left out
LOG_REPEAT_SECONDS = 10.0
# hop-by-hop headers the connector owns: the client's are dropped, never forwarded
_OWN_HEADERS = {b"proxy-authorization", b"proxy-connection", b"connection", b"keep-alive"}


@dataclass(frozen=True)
class ConnectConfig:
    gateway_host: str
    gateway_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 8888
    max_connections: int = 256
    max_header_bytes: int = 32 * 1024
    idle_timeout: float = 300.0
    header_timeout: float = 30.0    # the client's request head must arrive within this
    connect_timeout: float = 10.0   # TCP connect + the gateway's answer to CONNECT
    token_timeout: float = 30.0     # the token source (a slow command) must answer within this
    user: str = "agent"             # the proxy user name; the gateway reads the password


def parse_gateway(url: str) -> tuple[str, int]:
    """`http://host:port` → (host, port). Only plain-HTTP gateways (the agent's TLS goes
    through the tunnel to the gateway); no path, query or credentials in the URL."""
    u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if u.scheme != "http":
        raise ValueError(f"--gateway must be an http:// URL (got scheme {u.scheme!r})")
    if u.username or u.password:
        raise ValueError("--gateway must not carry credentials: the connector adds the token")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError("--gateway is host:port only (no path, query or fragment)")
    if not u.hostname:
        raise ValueError("--gateway has no host")
    try:
        port = u.port or 8080
    except ValueError as e:
        raise ValueError(f"--gateway port: {e}") from None
    return u.hostname, port


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be host:port (got {text!r})")
    return host.strip("[]") or "127.0.0.1", int(port)



def proxy_authorization(user: str, token: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{token}".encode("ascii"))


class HeadError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
            503: "Service Unavailable", 408: "Request Timeout"}


def error_response(status: int, reason: str) -> bytes:
    body = f"agentgate connect: {reason}\n".encode("utf-8", "replace")
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Proxy-Agent: agentgate-connect\r\n\r\n").encode() + body


async def read_head(reader: asyncio.StreamReader, timeout: float
                    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(start line, [(name, value)]) of one HTTP message head, bounded by the reader's limit
    (max_header_bytes), MAX_HEADER_LINES and `timeout`."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.LimitOverrunError:
        raise HeadError(431, "request head too large") from None
    except TimeoutError:
        raise HeadError(408, "request head not received in time") from None
    except asyncio.IncompleteReadError:
        raise HeadError(400, "connection closed before a complete request head") from None
    lines = raw[:-4].split(b"\r\n")
    if len(lines) > MAX_HEADER_LINES + 1:
        raise HeadError(431, "too many header lines")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or any(c <= 32 or c > 126 for c in name):
            raise HeadError(400, "malformed header line")
        if any(c < 32 and c != 9 or c == 127 for c in value):
            raise HeadError(400, "control character in a header value")
        headers.append((name, value.strip()))
    return lines[0], headers


def _valid_authority(target: bytes) -> bool:
    host, sep, port = target.rpartition(b":")
    return (bool(sep) and bool(host) and port.isdigit() and 0 < int(port) <= 65535
            and all(33 <= c <= 126 for c in target))


class Connector:
    def __init__(self, cfg: ConnectConfig, source: TokenSource) -> None:
        self.cfg = cfg
        self.source = source
        self._active = 0
        self._overflow = 0
        self._server: asyncio.Server | None = None
        self.port = cfg.listen_port
        self._tasks: set[asyncio.Task[None]] = set()
        # token sources block (file read, a command); their own pool, so a hung command can
        # never starve the loop's default executor (which also resolves the gateway's name)
        self._token_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="connect-token")
        self._last_log: dict[str, tuple[float, int]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._client, self.cfg.listen_host, self.cfg.listen_port,
            limit=self.cfg.max_header_bytes)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # open connections first: wait_closed() waits for every one of them to end
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        self._token_pool.shutdown(wait=False, cancel_futures=True)

    def _log_failure(self, reason: str) -> None:
        """One stderr line per failure, the same reason at most once per LOG_REPEAT_SECONDS."""
        now = time.monotonic()
        key = re.sub(r"\d+", "#", reason)  # "expired 12 s ago" and "13 s ago" are one reason
        last, left_out = self._last_log.get(key, (-LOG_REPEAT_SECONDS, 0))
        if now - last < LOG_REPEAT_SECONDS:
            self._last_log[key] = (last, left_out + 1)
            return
        if len(self._last_log) > 256:  # bounded: reasons may carry names of any kind
            self._last_log.clear()
        self._last_log[key] = (now, 0)
        more = f" ({left_out} more like this left out)" if left_out else ""
        log.error("%s%s", reason, more)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._active >= self.cfg.max_connections:
                # bounded: beyond the cap a client is answered at once, never queued; a flood
                # beyond that is simply closed
                if self._overflow < OVERFLOW_ANSWERS:
                    self._overflow += 1
                    try:
                        await _answer(writer, error_response(
                            503, f"too many connections (at most "
                                 f"{self.cfg.max_connections})"), reader)
                    finally:
                        self._overflow -= 1
                return
            self._active += 1
            try:
                await self._handle(reader, writer)
            finally:
                self._active -= 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one broken connection must not stop the connector
            log.exception("connection failed")
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            start, headers = await read_head(reader, self.cfg.header_timeout)
            parts = start.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                raise HeadError(400, "malformed request line")
            method, target, version = parts
            if method == b"CONNECT":
                if not _valid_authority(target):
                    raise HeadError(400, "CONNECT needs host:port")
                tunnel = True
            elif target.lower().startswith(b"http://") and all(33 <= c <= 126 for c in target):
                tunnel = False
            else:
                raise HeadError(400, "this is a proxy: send CONNECT host:port or an "
                                     "absolute http:// URL")
        except HeadError as e:
            await _answer(writer, error_response(e.status, e.reason), reader)
            return

        token = await self._token()
        if isinstance(token, bytes):  # the error answer
            await _answer(writer, token, reader)
            return
        up = await self._open_gateway()
        if isinstance(up, bytes):
            await _answer(writer, up, reader)
            return
        up_reader, up_writer = up
        try:
            kept = [(n, v) for n, v in headers if n.lower() not in _OWN_HEADERS]
            if not tunnel:
                kept.append((b"Connection", b"close"))
            head = start + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in kept)
            head += b"Proxy-Authorization: " + proxy_authorization(self.cfg.user, token)
            up_writer.write(head + b"\r\n\r\n")
            if tunnel:
                await self._tunnel(reader, writer, up_reader, up_writer)
            else:
                await self._plain(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    async def _token(self) -> str | bytes:
        """A fresh token, or the client's error answer (the reason is also logged)."""
        try:
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(loop.run_in_executor(self._token_pool, self.source.get),
                                          self.cfg.token_timeout)
        except TokenSourceError as e:
            reason = str(e)
        except TimeoutError:
            reason = f"{self.source.describe} did not answer within {self.cfg.token_timeout:g} s"
        self._log_failure(f"no token, connection refused: {reason}")
        return error_response(503, f"no token for the gateway: {reason}")

    async def _open_gateway(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | bytes:
        where = f"{self.cfg.gateway_host}:{self.cfg.gateway_port}"
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self.cfg.gateway_host, self.cfg.gateway_port,
                                        limit=self.cfg.max_header_bytes),
                self.cfg.connect_timeout)
        except TimeoutError:
            reason = f"gateway {where} did not accept the connection in time"
        except OSError as e:
            reason = f"gateway {where} unreachable: {e.strerror or type(e).__name__}"
        self._log_failure(reason)
        return error_response(502, reason)

    async def _gateway_head(self, up_reader: asyncio.StreamReader
                            ) -> tuple[bytes, list[tuple[bytes, bytes]]] | bytes:
        try:
            return await read_head(up_reader, self.cfg.connect_timeout)
        except HeadError as e:
            reason = f"the gateway sent no valid answer ({e.reason})"
            self._log_failure(reason)
            return error_response(502, reason)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        got = await self._gateway_head(up_reader)
        if isinstance(got, bytes):
            await _answer(writer, got, reader)
            return
        start, headers = got
        writer.write(_head_bytes(start, headers))
        parts = start.split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"200":
            # refused (407, 403, 502 …): pass the gateway's answer back as it is, no tunnel
            await self._refusal_body(headers, up_reader, reader, writer)
            return
        await _relay(reader, writer, up_reader, up_writer, self.cfg.idle_timeout)

    async def _refusal_body(self, headers: list[tuple[bytes, bytes]],
                            up_reader: asyncio.StreamReader, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        length = next((v for n, v in headers if n.lower() == b"content-length"), None)
        try:
            if length is not None and length.isdigit():
                body = await asyncio.wait_for(
                    up_reader.readexactly(min(int(length), MAX_REFUSAL_BODY)),
                    self.cfg.connect_timeout)
            else:
                body = await asyncio.wait_for(up_reader.read(MAX_REFUSAL_BODY),
                                              self.cfg.connect_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            body = b""
        await _answer(writer, body, reader)

    async def _plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        # the request body (if any) flows while the answer head is awaited
        upload = asyncio.create_task(_pump(reader, up_writer, _Idle(self.cfg.idle_timeout)))
        try:
            got = await self._gateway_head(up_reader)
            if isinstance(got, bytes):
                await _answer(writer, got)
                return
            start, headers = got
            # one request per connection: the client learns the connection ends here
            kept = [(n, v) for n, v in headers if n.lower() not in (b"connection", b"keep-alive")]
            kept.append((b"Connection", b"close"))
            writer.write(_head_bytes(start, kept))
            await _pump(up_reader, writer, _Idle(self.cfg.idle_timeout))
        finally:
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upload


def _head_bytes(start: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return start + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


async def _answer(writer: asyncio.StreamWriter, data: bytes,
                  reader: asyncio.StreamReader | None = None) -> None:
    """Send a final answer. With `reader`: a lingering close (half-close, then discard what
    the client still sends, briefly and bounded), because closing a socket with unread bytes
    resets it, and a reset can destroy the answer before the client reads it."""
    with contextlib.suppress(ConnectionError, TimeoutError, OSError):
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 10)
        if reader is None:
            return
        if writer.can_write_eof():
            writer.write_eof()
        left = LINGER_BYTES
        deadline = time.monotonic() + LINGER_SECONDS
        while left > 0 and (t := deadline - time.monotonic()) > 0:
            chunk = await asyncio.wait_for(reader.read(min(left, RELAY_CHUNK)), t)
            if not chunk:
                break
            left -= len(chunk)


class _Idle:
    """Activity shared by both directions of one connection: idle means no byte either way."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def remaining(self) -> float:
        return self.last + self.timeout - time.monotonic()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idle: _Idle) -> None:
    """Copy until EOF or idleness; then half-close `dst` so the other side sees the EOF."""
    while True:
        left = idle.remaining()
        if left <= 0:
            raise TimeoutError
        try:
            data = await asyncio.wait_for(src.read(RELAY_CHUNK), left)
        except TimeoutError:
            continue  # re-checked above: the other direction may have been active meanwhile
        if not data:
            break
        idle.touch()
        dst.write(data)
        await dst.drain()  # backpressure: never buffer more than the socket takes
        idle.touch()
    if dst.can_write_eof():
        with contextlib.suppress(OSError):
            dst.write_eof()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                 idle_timeout: float) -> None:
    idle = _Idle(idle_timeout)
    down = asyncio.create_task(_pump(up_reader, writer, idle))
    up = asyncio.create_task(_pump(reader, up_writer, idle))
    try:
        # both directions to EOF; an error in either (reset, idle) ends the whole connection
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in (down, up):
            t.cancel()
        for t in (down, up):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
