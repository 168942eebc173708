"""Server-Sent Events as an MCP stream carries them: JSON-RPC messages in `data`. Pure.

Chunks are cut anywhere; events are reassembled as the WHATWG event-stream parser reads
them (CRLF, LF and CR line ends, freely mixed; a blank line ends an event; a BOM at the
start is dropped) and each comes out canonical (LF line ends), so the client cannot split
what we pass differently from how we judged it. One event is bounded (`max_event`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(ValueError):
    pass


class Splitter:
    """Complete raw events (their lines, without the blank line) from arbitrary chunks."""

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        self.buf = b""
        self.lines: list[bytes] = []
        self.size = 0
        self.started = False
        self.pending_cr = False
        # pieces of a line without a line end yet (the first is `buf` as it was), and
        # their length beyond it
        self._parts: list[bytes] = []
        self._pending = 0

    def feed(self, data: bytes) -> list[list[bytes]]:
        if not self.started:
            self.buf += data
            if len(self.buf) < 3 and b"\xef\xbb\xbf".startswith(self.buf):
                return []
            self.started = True
            data = self.buf[3:] if self.buf.startswith(b"\xef\xbb\xbf") else self.buf
            self.buf = b""
        if self.pending_cr and data.startswith(b"\n"):
            data = data[1:]  # the LF of a CRLF cut between chunks
        self.pending_cr = False
        if self._parts or (data and _LINE_END.search(data) is None):
            # No line end in the new part (a long line arriving in pieces): keep the
            # pieces and look at the new bytes only, instead of copying and scanning the
            # whole line again for every chunk (quadratic in the line's length, on the
            # event loop: one max_event_bytes line in 64 KB chunks rescanned MBs per chunk)
            if not self._parts:
                self._parts.append(self.buf)
            self._parts.append(data)
            self._pending += len(data)
            if self.size + len(self._parts[0]) + self._pending > self.max_event:
                raise EventTooLarge(f"an SSE event over {self.max_event} bytes")
            if _LINE_END.search(data) is None:
                return []
            data = b"".join(self._parts)
            self._parts, self._pending, self.buf = [], 0, b""
        self.buf += data
        out: list[list[bytes]] = []
        pos = 0
        for m in _LINE_END.finditer(self.buf):
            if m.group() == b"\r" and m.end() == len(self.buf):
                self.pending_cr = True  # maybe a CRLF whose LF is in the next chunk
            line = self.buf[pos:m.start()]
            pos = m.end()
            if line == b"":
                if self.lines:
                    out.append(self.lines)
                self.lines, self.size = [], 0
            else:
                self.size += len(line)
                if self.size > self.max_event:
                    raise EventTooLarge(f"an SSE event over {self.max_event} bytes")
                self.lines.append(line)
        self.buf = self.buf[pos:]
        if self.size + len(self.buf) > self.max_event:
            raise EventTooLarge(f"an SSE event over {self.max_event} bytes")
        return out

    def pending(self) -> bool:
        """Is part of an event held (lines or a line without its end yet)?"""
        return bool(self.buf or self.lines or self._parts)

    def end(self) -> list[list[bytes]]:
        """What is left when the stream ends (an event without its blank line)."""
        rest = b"".join(self._parts) if self._parts else self.buf
        lines = self.lines + ([rest] if rest else [])
        self.lines, self.buf, self._parts, self._pending = [], b"", [], 0
        return [lines] if lines else []


@dataclass
class Event:
    """One event's fields. `data` is None for an event without data (comments only,
    id/retry only, keep-alives)."""

    lines: list[bytes]
    data: str | None = None
    other: list[bytes] = field(default_factory=list)
    name: str | None = None  # the `event:` field

    @classmethod
    def parse(cls, lines: list[bytes]) -> Event:
        ev = cls(lines)
        data: list[str] = []
        for line in lines:
            name, sep, value = line.partition(b":")
            v = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(v.decode("utf-8", "replace"))
            else:
                if name == b"event":
                    ev.name = v.decode("utf-8", "replace")
                ev.other.append(line)
        if data:
            ev.data = "\n".join(data)
        return ev

    def render(self, data: str | None = None) -> bytes:
        """The event with LF line ends; `data` replaces the data lines (one line each)."""
        if data is None:
            return b"\n".join(self.lines) + b"\n\n"
        out = [line for line in self.other]
        out.extend(b"data: " + line.encode() for line in data.split("\n"))
        return b"\n".join(out) + b"\n\n"
