"""The pipe between the gateway and its audit writer process (pure: no DuckDB, no mitmproxy).

Every message is one frame: a 4-byte big-endian length, then the message as `marshal` data.
marshal, not pickle: it carries exactly the plain types a flow snapshot is made of (dict,
list, tuple, set, str, bytes, int, float, bool, None), its C encoder costs a few µs for a
1 KB flow on the event loop, and loading it cannot construct arbitrary objects or run code.
A snapshot holding anything else is refused by `dumps` (the recorder then stores the flow's
minimal record, as a row that could not be built always was).

Gateway → writer: ("flow", n, <Pending fields>), ("row", n, <Direct fields>), ("cfg", {…}),
("lake", {…}, replica), ("flush",). `n` numbers the records of one gateway run, 1, 2, 3 …
in submission order. Writer → gateway: ("ready", head_seq, head_hash, n_committed_earlier),
("fatal", why), ("ack", n_written, failure_or_None). Records are written strictly in order,
so one number acknowledges every record up to it.
"""

from __future__ import annotations

import marshal
import os
import struct
import time
from typing import IO, Any

from addons.recording import store

HEADER = struct.Struct("!I")
MAX_FRAME = 0xFFFF_FFFF  # what the length field can say; the byte bound keeps real ones far below
MARSHAL_VERSION = 4


def frame(msg: tuple[Any, ...]) -> bytes:
    """One message as a frame; ValueError when it holds a non-plain object."""
    data = marshal.dumps(msg, MARSHAL_VERSION)
    if len(data) > MAX_FRAME:
        raise ValueError(f"message of {len(data)} bytes is larger than a frame may be")
    return HEADER.pack(len(data)) + data


def _read_exact(f: IO[bytes], size: int) -> bytes | None:
    # an unbuffered pipe may return less than asked for: read until size or end of stream
    parts = []
    while size > 0:
        part = f.read(size)
        if not part:
            return None
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def read_frame(f: IO[bytes]) -> tuple[Any, ...] | None:
    """The next message, or None at end of stream (the other side closed or died).
    A stream cut inside a frame is also its end: a partial message is never used."""
    got = read_frame_sized(f)
    return None if got is None else got[0]


def read_frame_sized(f: IO[bytes]) -> tuple[tuple[Any, ...], int] | None:
    """(the next message, its frame's size in bytes), or None at end of stream."""
    head = _read_exact(f, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    data = _read_exact(f, size)
    if data is None:
        return None
    msg = marshal.loads(data)  # noqa: S302 - a private pipe between our own processes
    if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
        raise ValueError("malformed message on the audit writer pipe")
    return msg, HEADER.size + size


class FrameReader:
    """Frames from a pipe's file descriptor, as many per read(2) as have arrived.

    After a read that found less than `nap_below` bytes waiting, the next read waits `nap`
    seconds first, so the frames the gateway writes one per flow are taken a batch at a
    time: one wake-up of this process (and one system call) per nap at 1 KB flows, instead
    of one per flow. Records are only written in batches (every `interval`, 0.2 s by
    default), so the nap delays nothing that anyone waits for; the pipe holds what arrives
    meanwhile (the gateway keeps every record until it is acknowledged, bounded). A busy
    pipe (a read found nap_below bytes or more), or a frame half read, is read again at
    once."""

    def __init__(self, fd: int, *, nap: float = 0.0, nap_below: int = 64 * 1024,
                 chunk: int = 256 * 1024, keep: int = 0) -> None:
        self.fd = fd
        # a frame of at most `keep` bytes is kept (as `frame`) until the next one is read:
        # the writer process looks at a small flow's marshal data (store.frame_plain)
        self.keep = keep
        self.frame: bytes | None = None
        self.nap = nap
        self.nap_below = nap_below
        self.chunk = chunk
        # read(2) goes straight into this buffer (readv): a frame's bytes are copied once
        # from the kernel, then decoded in place; grown for a larger frame, shrunk after
        self._buf = bytearray(chunk)
        self._start = 0  # the next frame's first byte
        self._end = 0  # one past the last byte read
        self._last = chunk  # the size of the last read: no nap before the first
        self.reads = 0

    def next(self) -> tuple[tuple[Any, ...], int] | None:
        """(the next message, its frame's size), or None at end of stream; a stream cut
        inside a frame is also its end (a partial message is never used)."""
        while True:
            buf, start = self._buf, self._start
            have = self._end - start
            need = HEADER.size
            if have >= HEADER.size:
                need += HEADER.unpack_from(buf, start)[0]
                if have >= need:
                    with memoryview(buf) as view, view[start + HEADER.size:start + need] as data:
                        msg = marshal.loads(data)  # noqa: S302 - our own pipe
                        self.frame = bytes(data) if need <= self.keep else None
                    self._start = start + need
                    if self._start == self._end:
                        self._start = self._end = 0
                        if len(buf) > self.chunk:  # a large frame passed: give it back
                            self._buf = bytearray(self.chunk)
                    if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
                        raise ValueError("malformed message on the audit writer pipe")
                    return msg, need
            if start + need > len(buf) or (start and len(buf) - self._end < len(buf) // 4):
                # the partial frame moves to the front (of a larger buffer if it needs one)
                if need > len(buf):
                    grown = bytearray(need)
                    grown[:have] = buf[start:self._end]
                    self._buf = buf = grown
                else:
                    buf[:have] = buf[start:self._end]
                self._start, self._end = 0, have
            if self.nap and not have and self._last < self.nap_below:  # not mid-frame
                time.sleep(self.nap)
            with memoryview(buf) as view, view[self._end:] as free:
                got = os.readv(self.fd, [free])
            self.reads += 1
            if not got:
                return None
            self._last = got
            self._end += got


def pending_msg(n: int, p: store.Pending) -> tuple[Any, ...]:
    return ("flow", n, p.state, p.session, p.origin_url, p.kind, p.recorded_at,
            tuple(p.secrets), tuple(sorted(p.redact)), p.max_body, p.size)


def direct_msg(n: int, d: store.Direct) -> tuple[Any, ...]:
    return ("row", n, d.row, d.id, d.session, d.method, d.url, d.recorded_at, d.size)


def record_of(msg: tuple[Any, ...]) -> tuple[int, store.Pending | store.Direct]:
    """(n, record) of a "flow" or "row" message."""
    if msg[0] == "flow":
        (_, n, state, session, origin, kind, at, secrets, redact, max_body, size) = msg
        return n, store.Pending(state=state, session=session, origin_url=origin, kind=kind,
                                recorded_at=at, secrets=tuple(secrets),
                                redact=frozenset(redact), max_body=max_body, size=size)
    if msg[0] == "row":
        (_, n, row, rid, session, method, url, at, size) = msg
        return n, store.Direct(row=row, id=rid, session=session, method=method, url=url,
                               recorded_at=at, size=size)
    raise ValueError(f"not a record message: {msg[0]!r}")
