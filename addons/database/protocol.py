"""PostgreSQL frontend/backend protocol 3.0: framing with hard size limits, startup-packet
parsing, the few client messages the relay reads, and the server messages the gateway
writes itself. Pure: no I/O, no mitmproxy.

Every length read from the wire is checked before anything is buffered: a startup packet
above MAX_STARTUP bytes (PostgreSQL's own limit) or a message above the caller's limit is a
`ProtocolError`, and the connection is closed with nothing forwarded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_STARTUP = 10_000  # src/include/libpq/pqcomm.h MAX_STARTUP_PACKET_LENGTH
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3_0 = 3 << 16
MAX_CANCEL_KEY = 256  # protocol 3.2 allows secret keys up to 256 bytes

# client message types the relay knows; anything else is refused
CLIENT_TYPES = frozenset(b"QPBDECSHXdcfpF")


class ProtocolError(Exception):
    """Bytes that are not the protocol, or beyond a limit: close, forward nothing."""


@dataclass(frozen=True)
class Startup:
    code: int
    params: tuple[tuple[str, str], ...] = ()
    cancel_pid: int = 0
    cancel_key: bytes = b""

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF

    def param(self, name: str) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return None


def startup_length(head: bytes) -> int:
    """Total length of a startup packet from its first four bytes (checked)."""
    (n,) = struct.unpack("!I", head)
    if n < 8 or n > MAX_STARTUP:
        raise ProtocolError(f"startup packet length {n} out of range")
    return n


def parse_startup(packet: bytes) -> Startup:
    """A whole startup packet (length included)."""
    if len(packet) < 8 or struct.unpack("!I", packet[:4])[0] != len(packet):
        raise ProtocolError("startup packet length mismatch")
    (code,) = struct.unpack("!I", packet[4:8])
    body = packet[8:]
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if body:
            raise ProtocolError("SSL/GSS request with a body")
        return Startup(code)
    if code == CANCEL_REQUEST:
        if len(body) < 8 or len(body) > 4 + MAX_CANCEL_KEY:
            raise ProtocolError("bad cancel request")
        (pid,) = struct.unpack("!I", body[:4])
        return Startup(code, cancel_pid=pid, cancel_key=bytes(body[4:]))
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported protocol {code >> 16}.{code & 0xFFFF}")
    if not body.endswith(b"\x00"):
        raise ProtocolError("startup parameters not terminated")
    parts = body[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolError("startup parameters not in name/value pairs")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(0, len(parts), 2):
        try:
            k, v = parts[i].decode("utf-8"), parts[i + 1].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("startup parameter is not UTF-8") from None
        if not k or k in seen:
            raise ProtocolError("empty or repeated startup parameter")
        seen.add(k)
        params.append((k, v))
    return Startup(code, tuple(params))


def message_length(head: bytes, limit: int, allowed: frozenset[int] | None = None) -> int:
    """Payload length from a 5-byte message head (type + int32 length incl. itself)."""
    t = head[0]
    if allowed is not None and t not in allowed:
        raise ProtocolError(f"unexpected message type {bytes([t])!r}")
    (n,) = struct.unpack("!I", head[1:5])
    if n < 4:
        raise ProtocolError("message length below 4")
    if n - 4 > limit:
        raise ProtocolError(f"message of {n - 4} bytes above the limit of {limit}")
    return n - 4


class Reader:
    """Cursor over a message payload; every read is bounds-checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise ProtocolError("message truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def int16(self) -> int:
        return struct.unpack("!h", self.take(2))[0]

    def uint16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError("message truncated")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def cstr(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolError("string not terminated")
        raw = self.buf[self.pos:end]
        self.pos = end + 1
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def rest(self) -> bytes:
        out = self.buf[self.pos:]
        self.pos = len(self.buf)
        return bytes(out)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes in message")


# ---------------------------------------------------------------- client messages
@dataclass(frozen=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    result_formats: tuple[int, ...]


def parse_query(payload: bytes) -> str:
    r = Reader(payload)
    q = r.cstr()
    r.end()
    return q


def parse_parse(payload: bytes) -> Parse:
    r = Reader(payload)
    name, query = r.cstr(), r.cstr()
    n = r.int16()
    if n < 0:
        raise ProtocolError("negative parameter count")
    types = tuple(r.int32() for _ in range(n))
    r.end()
    return Parse(name, query, types)


def parse_bind(payload: bytes) -> Bind:
    r = Reader(payload)
    portal, stmt = r.cstr(), r.cstr()
    nf = r.int16()
    if nf < 0:
        raise ProtocolError("negative format count")
    for _ in range(nf):
        if r.int16() not in (0, 1):
            raise ProtocolError("bad parameter format code")
    np_ = r.int16()
    if np_ < 0:
        raise ProtocolError("negative parameter count")
    for _ in range(np_):
        n = r.int32()
        if n < -1:
            raise ProtocolError("bad parameter length")
        if n > 0:
            r.take(n)
    nr = r.int16()
    if nr < 0:
        raise ProtocolError("negative result format count")
    formats = tuple(r.int16() for _ in range(nr))
    if any(f not in (0, 1) for f in formats):
        raise ProtocolError("bad result format code")
    r.end()
    return Bind(portal, stmt, formats)


def parse_target(payload: bytes) -> tuple[str, str]:
    """Describe / Close: ('S' | 'P', name)."""
    r = Reader(payload)
    kind = chr(r.byte())
    if kind not in ("S", "P"):
        raise ProtocolError("Describe/Close target must be S or P")
    name = r.cstr()
    r.end()
    return kind, name


def parse_execute(payload: bytes) -> tuple[str, int]:
    r = Reader(payload)
    portal = r.cstr()
    maxrows = r.int32()
    r.end()
    return portal, maxrows


def parse_password(payload: bytes) -> str:
    r = Reader(payload)
    pw = r.cstr()
    r.end()
    return pw


def parse_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields (type letter -> value)."""
    r = Reader(payload)
    out: dict[str, str] = {}
    while True:
        t = r.byte()
        if t == 0:
            break
        b = bytes([t])
        out[b.decode("latin-1")] = r.cstr()
    r.end()
    return out


def command_rows(tag: str) -> int | None:
    """Row count of a CommandComplete tag (`SELECT 5`, `INSERT 0 3`, `UPDATE 2`, …)."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in tag else None


# ---------------------------------------------------------------- builders
def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def cstr(s: str) -> bytes:
    return s.replace("\x00", "").encode("utf-8") + b"\x00"


def error_response(code: str, text: str, *, severity: str = "ERROR", detail: str = "",
                   hint: str = "") -> bytes:
    fields = (b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(code)
              + b"M" + cstr(text))
    if detail:
        fields += b"D" + cstr(detail)
    if hint:
        fields += b"H" + cstr(hint)
    return message(b"E", fields + b"\x00")


def fatal(code: str, text: str, hint: str = "") -> bytes:
    return error_response(code, text, severity="FATAL", hint=hint)


def auth_request(code: int, extra: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!I", code) + extra)


AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    return message(b"K", struct.pack("!I", pid) + key)


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    return message(b"v", struct.pack("!II", newest_minor, len(unrecognized))
                   + b"".join(cstr(o) for o in unrecognized))


def startup_message(params: list[tuple[str, str]]) -> bytes:
    body = struct.pack("!I", PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params)
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST)


def cancel_request(pid: int, key: bytes) -> bytes:
    return struct.pack("!II", 12 + len(key), CANCEL_REQUEST) + struct.pack("!I", pid) + key


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def parse_message(name: str, sql: str) -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))
