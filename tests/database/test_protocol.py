"""protocol: framing limits and the parsers of the messages the relay reads."""

from __future__ import annotations

import struct

import pytest

from addons.database import protocol as pg


def startup(params: list[tuple[str, str]], code: int = pg.PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", code) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                              for k, v in params) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def test_startup_parsed() -> None:
    st = pg.parse_startup(startup([("user", "agent"), ("database", "analytics")]))
    assert (st.major, st.minor) == (3, 0) and st.param("database") == "analytics"
    st = pg.parse_startup(startup([("user", "a")], code=(3 << 16) | 2))
    assert st.minor == 2
    assert pg.parse_startup(struct.pack("!II", 8, pg.SSL_REQUEST)).code == pg.SSL_REQUEST
    c = pg.parse_startup(struct.pack("!IIII", 16, pg.CANCEL_REQUEST, 7, 9))
    assert c.cancel_pid == 7 and c.cancel_key == struct.pack("!I", 9)


@pytest.mark.parametrize("packet", [
    struct.pack("!II", 8, 2 << 16),                                   # protocol 2
    struct.pack("!II", 9, pg.SSL_REQUEST) + b"x",                     # body on SSLRequest
    startup([("user", "a"), ("user", "b")]),                          # repeated parameter
    startup([("user", "a")])[:-1],                                    # length mismatch
    struct.pack("!II", 13, pg.PROTOCOL_3_0) + b"user\0",              # odd pairs, unterminated
    struct.pack("!II", 12, pg.PROTOCOL_3_0) + b"\xff\0\0\0",          # not UTF-8
    struct.pack("!II", 12, pg.CANCEL_REQUEST) + b"1234",              # short cancel
])
def test_bad_startup(packet: bytes) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.parse_startup(packet)


@pytest.mark.parametrize("n", [0, 7, pg.MAX_STARTUP + 1, 2**31])
def test_startup_length_bounds(n: int) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.startup_length(struct.pack("!I", n))


def test_message_length_limits() -> None:
    assert pg.message_length(b"Q\0\0\0\x09", 100) == 5
    with pytest.raises(pg.ProtocolError, match="above the limit"):
        pg.message_length(b"Q\0\0\x10\x00", 100)
    with pytest.raises(pg.ProtocolError, match="below 4"):
        pg.message_length(b"Q\0\0\0\x03", 100)
    with pytest.raises(pg.ProtocolError, match="unexpected message type"):
        pg.message_length(b"Z\0\0\0\x04", 100, pg.CLIENT_TYPES)


def test_extended_messages() -> None:
    p = pg.parse_parse(b"s1\0SELECT $1\0" + struct.pack("!hi", 1, 23))
    assert p == pg.Parse("s1", "SELECT $1", (23,))
    bind = (b"p1\0s1\0" + struct.pack("!hh", 1, 0) + struct.pack("!h", 2)
            + struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1) + struct.pack("!hh", 1, 1))
    assert pg.parse_bind(bind) == pg.Bind("p1", "s1", (1,))
    assert pg.parse_target(b"S" + b"s1\0") == ("S", "s1")
    assert pg.parse_execute(b"p1\0" + struct.pack("!i", 10)) == ("p1", 10)


@pytest.mark.parametrize("payload", [
    b"p1\0s1\0" + struct.pack("!h", -1),                               # negative count
    b"p1\0s1\0" + struct.pack("!hh", 0, 1) + struct.pack("!i", 99),    # value beyond end
    b"p1\0s1\0" + struct.pack("!hhh", 0, 0, 1) + struct.pack("!h", 7),  # bad format code
    b"p1\0s1\0" + struct.pack("!hhh", 0, 0, 0) + b"extra",             # trailing bytes
    b"p1",                                                             # unterminated
])
def test_bad_bind(payload: bytes) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.parse_bind(payload)


def test_error_response_round_trip() -> None:
    msg = pg.error_response("42501", "agentgate: blocked by rule x", detail="d")
    assert msg[:1] == b"E"
    assert struct.unpack("!I", msg[1:5])[0] == len(msg) - 1
    f = pg.parse_fields(msg[5:])
    assert f["C"] == "42501" and f["M"] == "agentgate: blocked by rule x" and f["S"] == "ERROR"
    # NUL in a text cannot cut the message short
    f = pg.parse_fields(pg.error_response("XX000", "a\0b")[5:])
    assert f["M"] == "ab"


def test_command_rows() -> None:
    assert pg.command_rows("SELECT 5") == 5
    assert pg.command_rows("INSERT 0 3") == 3
    assert pg.command_rows("BEGIN") is None
