"""The connector's Postgres side: a loopback listener the agent's DSN points at, which logs
in to the gateway's database listener with a fresh token as the password.

Per client connection:
- the client's SSLRequest / GSSENCRequest is answered `N` (the client talks to loopback;
  TLS starts at the connector), its startup packet is read (protocol 3.x, at most 10000
  bytes, like the server's own limit);
- a fresh token is fetched for this connection (the token source runs in a worker thread);
- the gateway is dialled and asked for TLS (SSLRequest); its certificate is verified
  against `--postgres-ca` (else the system store / SSL_CERT_FILE) and its name. A gateway that
  declines TLS gets the token only on loopback; elsewhere the connection is refused, since
  the token is a password in clear;
- the client's startup parameters go to the gateway as they are; the gateway's
  AuthenticationCleartextPassword is answered by the connector with the token. The client
  is never asked for a password: whatever it has (a DSN password, PGPASSWORD, .pgpass) is
  never read nor sent. Any other authentication request from the gateway is refused (the
  connector never answers SCRAM/MD5 with a token);
- after AuthenticationOk the bytes go both ways as they are (bounded by the idle timeout).
- a CancelRequest is forwarded to the gateway as it is (its key data is the gateway's own).

Failures answer the client with a FATAL ErrorResponse it shows (SQLSTATE 08001 cannot
reach / 28000 no token), never a tunnel without a token. Imports nothing of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from addons.connect.forwarder import _relay
from addons.connect.tokens import TokenSource, TokenSourceError
from addons.frame.hosts import is_loopback_host

log = logging.getLogger("agentgate.connect")

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10_000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
MAX_AUTH_MESSAGE = 64 * 1024
AUTH_OK, AUTH_CLEARTEXT = 0, 3


@dataclass(frozen=True)
class PgRoute:
    listen_host: str
    listen_port: int
    gateway_host: str
    gateway_port: int


def parse_route(text: str) -> PgRoute:
    """`[LISTEN_HOST:]LISTEN_PORT=GATEWAY_HOST:GATEWAY_PORT`."""
    left, sep, right = text.partition("=")
    if not sep:
        raise ValueError(f"--postgres {text!r}: expected LISTEN=GATEWAY_HOST:PORT, e.g. "
                         "127.0.0.1:5432=gateway:15432")
    lhost, _, lport = left.rpartition(":")
    ghost, _, gport = right.rpartition(":")
    try:
        lp, gp = int(lport), int(gport)
    except ValueError:
        raise ValueError(f"--postgres {text!r}: ports must be numbers") from None
    if not ghost or not (0 <= lp < 65536) or not (0 < gp < 65536):
        raise ValueError(f"--postgres {text!r}: expected LISTEN=GATEWAY_HOST:PORT")
    return PgRoute(lhost.strip("[]") or "127.0.0.1", lp, ghost.strip("[]"), gp)


def _message(t: bytes, payload: bytes) -> bytes:
    return t + struct.pack("!I", len(payload) + 4) + payload


def fatal(code: str, text: str) -> bytes:
    fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + \
        text.encode("utf-8", "replace").replace(b"\0", b"") + b"\0\0"
    return _message(b"E", fields)


class PgForwarder:
    """One loopback listener forwarding to one gateway database listener."""

    def __init__(self, route: PgRoute, source: TokenSource, *, ca_file: str | None = None,
                 idle_timeout: float = 300.0, connect_timeout: float = 10.0,
                 token_timeout: float = 30.0, max_connections: int = 256) -> None:
        self.route = route
        self.source = source
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.token_timeout = token_timeout
        self.max_connections = max_connections
        self.port = route.listen_port
        self._tls = ssl.create_default_context(cafile=ca_file)
        self._server: asyncio.Server | None = None
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="connect-pg-token")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.route.listen_host,
                                                  self.route.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._active >= self.max_connections:
                writer.write(fatal("53300", f"agentgate connect: too many connections (at most "
                                            f"{self.max_connections})"))
                return
            self._active += 1
            try:
                await self._handle(reader, writer)
            finally:
                self._active -= 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one broken connection must not stop the connector
            log.exception("postgres connection failed")
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> bytes | None:
        """The client's startup packet (length included); None after a CancelRequest."""
        for _ in range(3):  # SSLRequest, GSSENCRequest, then the real one
            head = await asyncio.wait_for(reader.readexactly(4), self.connect_timeout)
            (n,) = struct.unpack("!I", head)
            if n < 8 or n > MAX_STARTUP:
                raise ConnectionError("bad startup packet length")
            body = await asyncio.wait_for(reader.readexactly(n - 4), self.connect_timeout)
            (code,) = struct.unpack("!I", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")  # loopback: no TLS between the agent and its connector
                await writer.drain()
                continue
            if code == CANCEL_REQUEST:
                await self._cancel(head + body)
                return None
            if code >> 16 != 3:
                writer.write(fatal("08P01", f"agentgate connect: unsupported protocol "
                                            f"{code >> 16}.{code & 0xFFFF}"))
                return None
            return head + body
        raise ConnectionError("too many startup requests")

    async def _cancel(self, packet: bytes) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            _, w = await asyncio.wait_for(asyncio.open_connection(
                self.route.gateway_host, self.route.gateway_port), self.connect_timeout)
            w.write(packet)
            await w.drain()
            w.close()

    async def _token(self) -> str | None:
        try:
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(loop.run_in_executor(self._pool, self.source.get),
                                          self.token_timeout)
        except TokenSourceError as e:
            log.error("no token, postgres connection refused: %s", e)
        except TimeoutError:
            log.error("no token, postgres connection refused: %s did not answer within %g s",
                      self.source.describe, self.token_timeout)
        return None

    async def _open_gateway(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.route.gateway_host, self.route.gateway_port
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        w.write(struct.pack("!II", 8, SSL_REQUEST))
        await w.drain()
        answer = await asyncio.wait_for(r.readexactly(1), self.connect_timeout)
        if answer == b"S":
            await asyncio.wait_for(w.start_tls(self._tls, server_hostname=host),
                                   self.connect_timeout)
        elif answer == b"N":
            if not is_loopback_host(host):
                w.close()
                raise ssl.SSLError(f"the gateway {host}:{port} declined TLS; the token is a "
                                   "password and is sent in clear only to loopback")
        else:
            w.close()
            raise ConnectionError(f"the gateway {host}:{port} does not speak the Postgres "
                                  "protocol")
        return r, w

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        startup = await self._startup(reader, writer)
        if startup is None:
            return
        token = await self._token()
        if token is None:
            writer.write(fatal("28000", "agentgate connect: no token for the gateway (see "
                                        "the connector's log)"))
            return
        where = f"{self.route.gateway_host}:{self.route.gateway_port}"
        try:
            up_r, up_w = await self._open_gateway()
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.error("postgres gateway %s unreachable: %s", where, reason)
            writer.write(fatal("08001", f"agentgate connect: gateway {where} unreachable: "
                                        f"{reason}"))
            return
        try:
            up_w.write(startup)
            if not await self._login(up_r, up_w, writer, token):
                return
            await _relay(reader, writer, up_r, up_w, self.idle_timeout)
        finally:
            up_w.close()

    async def _login(self, up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                     writer: asyncio.StreamWriter, token: str) -> bool:
        """Answer the gateway's password request with the token; True at AuthenticationOk
        (which is passed on to the client, with everything after it)."""
        while True:
            head = await asyncio.wait_for(up_r.readexactly(5), self.connect_timeout * 3)
            t = head[:1]
            (n,) = struct.unpack("!I", head[1:])
            if n < 4 or n > MAX_AUTH_MESSAGE:
                writer.write(fatal("08P01", "agentgate connect: bad message from the gateway"))
                return False
            payload = await asyncio.wait_for(up_r.readexactly(n - 4), self.connect_timeout)
            if t == b"R" and len(payload) >= 4:
                (code,) = struct.unpack("!I", payload[:4])
                if code == AUTH_CLEARTEXT:
                    up_w.write(_message(b"p", token.encode() + b"\0"))
                    await up_w.drain()
                    continue
                if code == AUTH_OK:
                    writer.write(head + payload)
                    return True
                writer.write(fatal("28000", f"agentgate connect: the gateway asked for "
                                            f"authentication method {code}; the connector "
                                            "answers only a cleartext password request"))
                return False
            writer.write(head + payload)  # an ErrorResponse, NegotiateProtocolVersion, notice
            if t == b"E":
                return False
