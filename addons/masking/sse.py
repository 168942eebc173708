"""Incremental masking of Server-Sent Event streams (pure: no mitmproxy import).

Network chunks are cut anywhere, so bytes are first reassembled into complete SSE events
exactly as the WHATWG event-stream rules read them: a line ends with CRLF, LF or CR, freely
mixed (`\n\r\n` is a line end then a blank line); a blank line ends an event; a UTF-8 BOM at
the start of the stream is dropped. Events go out with LF line endings only, so the agent's
parser cannot split them differently from ours. Every line that is not `data` (comments,
`event:`, `id:`, `retry:`, unknown fields) is masked as text on its own. Each event is then
handled by what it carries:

- a text delta (OpenAI chat `choices[i].delta.content` / `refusal` / `tool_calls[j].
  function.arguments`; OpenAI responses `response.*.delta`; Anthropic
  `content_block_delta` `text_delta` / `input_json_delta` / `thinking_delta`) feeds a
  per-channel text buffer (one channel per choice and field, tool call, output item and
  content part, or content block). A channel emits, rewritten into the same event, all
  text except the last `hold` characters (the longest possible detector match), so a
  value split across events or chunks is seen whole before any of it leaves; a finding
  that straddles the boundary is emitted masked as a whole.
- the end of a channel (OpenAI `finish_reason`, `[DONE]`; responses `*.done`,
  `response.output_item.done`, `response.completed`; Anthropic `content_block_stop`,
  `message_delta`, `message_stop`; the end of the stream) flushes it: the held text goes
  out in one synthetic delta event, cloned from the channel's last delta, just before the
  closing event.
- any other event of a known dialect (message_start, response.completed with the full
  text …) is masked as a JSON document (`addons.masking.bodies`), with the same session
  placeholders, so the full text and the streamed deltas agree.
- an `mcp` upstream's stream: each event's data is one JSON-RPC message, masked as a JSON
  document (with restore, restored the same way), never held back across events.
- a stream of no known dialect is a text channel too: plain-text `data` (one channel per
  event name), and in JSON events of unknown shape every string under a text-like key
  (STREAM_TEXT_KEYS: content, text, delta, response, token, …; one channel per JSON path)
  is held back and joined across events like a delta; the rest of such an event is masked
  as a JSON document.

With restore on, known placeholders in the model's text are replaced by the originals
(JSON-escaped in tool-call argument streams); the emit boundary never splits a
placeholder. Nothing is buffered beyond one event plus the held tail per channel.

Restore is a second step over the masked text: each emitted event is rendered masked
first, then restored for the agent. With restore on, the masked rendering of the whole
stream is kept as well (`masked_copy()`, at most `max_masked_copy` bytes): the audit
store records it instead of the restored stream, so no original reaches it.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable
from typing import Any

from addons.masking.bodies import Masked, Unparseable, json_escape, loads
from addons.masking.masker import MAX_PLACEHOLDER_LEN, PARTIAL_PLACEHOLDER_RE, count

log = logging.getLogger("agentgate.masking")

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
# keys whose string values are the streamed text of an unknown JSON shape (Ollama
# `message.content` / `response` / `thinking`, legacy completions `choices[].text`, generic
# token streams)
STREAM_TEXT_KEYS = frozenset({
    "content", "text", "delta", "response", "token", "thinking", "reasoning",
    "reasoning_content", "output", "output_text", "completion", "generated_text",
    "partial_json", "arguments", "message", "chunk", "data", "value", "answer",
})


class StreamTooLarge(Exception):
    """One SSE event grew beyond the limit without ending."""


# ---------------------------------------------------------------- bytes -> events
class EventSplitter:
    """Complete SSE events from arbitrary chunks, read as the WHATWG event-stream parser
    reads them (CR, LF, CRLF and mixes; BOM at the start dropped). Each event comes out
    canonical: its lines joined by LF, ended by a blank line. A blank line with no event
    before it comes out as a bare LF (a keep-alive)."""

    def __init__(self, max_event: int) -> None:
        self.buf = bytearray()
        self.max_event = max_event
        self.lines: list[bytes] = []
        self.size = 0
        self.started = False  # past the stream's first bytes (BOM decided)

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        if not self.started:
            if len(self.buf) < len(_BOM) and _BOM.startswith(bytes(self.buf)):
                return []  # could still be a BOM
            self.started = True
            if self.buf.startswith(_BOM):
                del self.buf[:len(_BOM)]
        out: list[bytes] = []
        pos = 0
        buf = self.buf
        n = len(buf)
        for m in _LINE_END.finditer(buf):
            if m.group() == b"\r" and m.end() == n:
                break  # a CR at the end of the chunk may be the first half of a CRLF
            line = bytes(buf[pos:m.start()])
            pos = m.end()
            self._line(line, out)
        if pos:
            del buf[:pos]
        if len(buf) + self.size > self.max_event:
            raise StreamTooLarge
        return out

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line:
            self.lines.append(line)
            self.size += len(line) + 1
            return
        if self.lines:
            out.append(b"\n".join(self.lines) + b"\n\n")
            self.lines, self.size = [], 0
        else:
            out.append(b"\n")

    def rest(self) -> bytes:
        """The unterminated last event at the end of the stream (canonical), or b""."""
        if not self.started and self.buf:
            self.started = True
            if self.buf.startswith(_BOM):
                del self.buf[:len(_BOM)]
        tail = bytes(self.buf)
        self.buf = bytearray()
        for line in _LINE_END.split(tail):
            if line:
                self.lines.append(line)
        lines, self.lines, self.size = self.lines, [], 0
        return b"\n".join(lines) + b"\n\n" if lines else b""


class SSEEvent:
    """One parsed event: its field lines, and the data joined by newlines."""

    __slots__ = ("raw", "name", "data", "lines", "obj")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw  # canonical (EventSplitter): LF line ends, one blank line at the end
        text = raw.decode("utf-8", "surrogateescape")
        self.lines = [ln for ln in text.split("\n") if ln != ""]
        self._parse()
        self.obj: Any = None

    def _parse(self) -> None:
        self.name: str | None = None
        data: list[str] = []
        for ln in self.lines:
            field, sep, value = ln.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if field == "event":
                self.name = value
            elif field == "data":
                data.append(value)
        self.data: str | None = "\n".join(data) if data else None

    def mask_fields(self, mask: Callable[[str], str]) -> None:
        """Mask every line that is not a `data` line (comments, event, id, retry, unknown
        fields: the agent's parser or the record may see any of them) as text of its own."""
        changed = False
        for i, ln in enumerate(self.lines):
            if ln.partition(":")[0] == "data":
                continue
            new = mask(ln)
            if new != ln:
                # a replacement never holds a line end; keep it on one line regardless
                self.lines[i] = new.replace("\r", " ").replace("\n", " ")
                changed = True
        if changed:
            self._parse()
            self.raw = ("\n".join(self.lines) + "\n\n").encode("utf-8", "surrogateescape")

    def render(self, data: str) -> bytes:
        """The event with its data replaced; other fields (event, id, retry) kept."""
        out: list[str] = []
        placed = False
        for ln in self.lines:
            field = ln.partition(":")[0]
            if field == "data":
                if not placed:
                    out.extend(f"data: {d}" for d in data.split("\n"))
                    placed = True
                continue
            out.append(ln)
        if not placed:
            out.extend(f"data: {d}" for d in data.split("\n"))
        return ("\n".join(out) + "\n\n").encode("utf-8", "surrogateescape")


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Dual:
    """Text of a channel as the agent gets it (restored) and as masked (recorded)."""

    __slots__ = ("shown", "kept")

    def __init__(self, shown: str, kept: str) -> None:
        self.shown = shown
        self.kept = kept

    def __repr__(self) -> str:  # never show the restored originals
        return f"<_Dual {len(self.kept)} chars>"


class _Pair(bytes):
    """An event as the agent gets it (the bytes themselves) and as masked (`.masked`)."""

    masked: bytes


def _pair(shown: bytes, kept: bytes) -> bytes:
    if shown == kept:
        return shown
    out = _Pair(shown)
    out.masked = kept
    return out


def _kept(o: Any) -> str:
    if isinstance(o, _Dual):
        return o.kept
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dumps(obj: Any) -> tuple[str, str | None]:
    """(JSON as the agent gets it, JSON as masked, or None when both are the same)."""
    dual = False

    def shown(o: Any) -> str:
        nonlocal dual
        if isinstance(o, _Dual):
            dual = True
            return o.shown
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=shown)
    if not dual:
        return text, None
    return text, json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_kept)


def _event(name: str | None, obj: Any) -> bytes:
    head = f"event: {name}\n" if name else ""
    text, kept = _dumps(obj)
    out = (head + f"data: {text}\n\n").encode()
    return out if kept is None else _pair(out, (head + f"data: {kept}\n\n").encode())


def _render(ev: SSEEvent, obj: Any) -> bytes:
    text, kept = _dumps(obj)
    out = ev.render(text)
    return out if kept is None else _pair(out, ev.render(kept))


# ---------------------------------------------------------------- one text channel
class TextChannel:
    """Incremental masking of one reassembled text (one choice / block / tool call)."""

    __slots__ = ("ctx", "hold", "escape", "buf", "done", "template", "left")

    def __init__(self, ctx: Masked, hold: int | None = None, json_mode: bool = False) -> None:
        self.ctx = ctx
        self.hold = hold    # fixed hold-back, or None: ask the detectors per buffer
        self.left = ctx.masker.context_len
        self.escape = json_escape if json_mode else None
        self.buf = ""       # left context (already emitted) + text not yet emitted
        self.done = 0       # how much of buf was already emitted
        self.template: Callable[[str], bytes] | None = None  # builds a flush event

    @property
    def pending(self) -> int:
        return len(self.buf) - self.done

    def feed(self, text: str, final: bool = False) -> str | _Dual:
        """Add text; return the masked text that is safe to emit now (a _Dual when
        restoring changed it: restored for the agent, masked for the record)."""
        if text:
            self.buf += text
        buf = self.buf
        ctx = self.ctx
        if final:
            cut = len(buf)
        elif self.hold is not None:
            cut = len(buf) - self.hold
        else:
            cut = len(buf) - ctx.masker.holdback(buf)
        if cut <= self.done:
            return ""
        found = ctx.masker.find(buf)
        if not final:
            for f in found:
                if f.start < cut < f.end:
                    # it reaches into the tail that may still grow: hold all of it
                    cut = f.start
                    break
            if ctx.restore:
                lo = max(self.done, cut - MAX_PLACEHOLDER_LEN)
                m = PARTIAL_PLACEHOLDER_RE.search(buf, lo, cut)
                if m and m.end() == cut:
                    cut = m.start()  # never emit half a placeholder
                    for f in found:
                        if f.start < cut < f.end:
                            cut = f.start
            if cut <= self.done:
                return ""
        out = self._render(buf, found, self.done, cut)
        keep = max(0, cut - self.left)
        self.buf = buf[keep:]
        self.done = cut - keep
        return out

    def _render(self, buf: str, found: list[Any], lo: int, hi: int) -> str | _Dual:
        ctx = self.ctx
        session, escape = ctx.session, self.escape
        out: list[str] = []
        pos = lo
        for f in found:
            if f.end <= pos:
                continue  # emitted earlier
            if f.start >= hi:
                break
            out.append(buf[pos:max(pos, f.start)])
            repl = ctx.masker.replacement(f.entity, f.value, session, ctx.restorable)
            out.append(escape(repl) if escape else repl)
            count(ctx.findings, f.entity, ctx.masker.strategy(f.entity))
            pos = f.end
        out.append(buf[pos:hi])
        masked = "".join(out)
        if ctx.restore and session is not None and "[" in masked:
            # feed() never cuts through a placeholder when restoring: each is whole here
            shown = session.restore(masked, escape)
            if shown != masked:
                return _Dual(shown, masked)
        return masked


# ---------------------------------------------------------------- incremental decoding
class StreamDecoder:
    """Undo a Content-Encoding chunk by chunk (the stream is re-sent as identity)."""

    def __init__(self, encoding: str) -> None:
        self.steps: list[Callable[[bytes], bytes]] = []
        for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
            if coding == "identity":
                continue
            if coding in ("gzip", "x-gzip"):
                self.steps.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress)
            elif coding == "deflate":
                self.steps.append(_Deflate().decompress)
            elif coding == "br":
                import brotli
                self.steps.append(brotli.Decompressor().process)
            elif coding == "zstd":
                import zstandard
                self.steps.append(zstandard.ZstdDecompressor().decompressobj().decompress)
            else:
                raise Unparseable(f"unsupported content-encoding {coding[:40]!r}", 415)

    def __call__(self, data: bytes) -> bytes:
        for step in self.steps:
            if not data:
                break
            data = step(data)
        return data


class _Deflate:
    """zlib-wrapped deflate, falling back to raw deflate (both are seen in the wild)."""

    def __init__(self) -> None:
        self._d: Any = None

    def decompress(self, data: bytes) -> bytes:
        if self._d is None:
            self._d = zlib.decompressobj(zlib.MAX_WBITS)
            try:
                return self._d.decompress(data)
            except zlib.error:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._d.decompress(data)


# ---------------------------------------------------------------- the stream masker
class StreamMasker:
    """`flow.response.stream` callable: bytes in, masked bytes out, never the whole stream.

    mitmproxy calls it with each chunk and with b"" at the end of the body. Mid-stream it
    returns a list (possibly empty: an empty bytes chunk would end a chunked response).
    """

    def __init__(self, ctx: Masked, hold: int | None = None, max_event: int = 16 << 20,
                 decoder: StreamDecoder | None = None, max_masked_copy: int = 16 << 20
                 ) -> None:
        self.ctx = ctx
        # With restore: contexts that mask without restoring, and restore without
        # detecting (for whole events); and the masked copy of the stream for the record.
        self.plain = ctx.variant(restore=False) if ctx.restore else ctx
        self.restorer = ctx.variant(detect=False) if ctx.restore else None
        self.masked: bytearray | None = bytearray() if ctx.restore else None
        self.max_masked_copy = max_masked_copy
        self.masked_over = False
        self.restored = False  # the agent got something the masked copy does not have
        # None: the detectors tell per buffer how much to keep (a few characters in
        # prose); a number: a fixed hold-back (tests, detectors without an estimate).
        self.hold = hold
        if hold is not None and ctx.restore:
            self.hold = max(hold, MAX_PLACEHOLDER_LEN)
        self.splitter = EventSplitter(max_event)
        self.decoder = decoder
        self.channels: dict[tuple, TextChannel] = {}
        self.ended = False

    # -- mitmproxy's interface
    def __call__(self, data: bytes) -> list[bytes] | bytes:
        if data == b"":
            return self.end()
        return self.feed(data)

    def feed(self, data: bytes) -> list[bytes]:
        if self.decoder is not None:
            data = self.decoder(data)
        out: list[bytes] = []
        for raw in self.splitter.feed(data):
            out.extend(self.event(raw))
        return self._emit(out)

    def end(self) -> list[bytes]:
        if self.ended:
            return []
        self.ended = True
        out: list[bytes] = []
        rest = self.splitter.rest()
        if rest.strip():
            out.extend(self.event(rest))
        out.extend(self.flush(lambda key: True))
        return self._emit(out)

    # -- the masked copy (restore on)
    def _emit(self, out: list[bytes]) -> list[bytes]:
        if self.masked is None:
            return [b for b in out if b]
        res: list[bytes] = []
        for b in out:
            if not b:
                continue
            if type(b) is _Pair:
                self.restored = True
                self._keep(b.masked)
                res.append(bytes(b))
            else:
                self._keep(b)
                res.append(b)
        return res

    def _keep(self, data: bytes) -> None:
        copy = self.masked
        if copy is None or self.masked_over:
            return
        if len(copy) + len(data) > self.max_masked_copy:
            # Bounded: the record gets the masked stream up to here and this note, never
            # the restored rest (the agent's stream itself goes on).
            self.masked_over = True
            copy += (f": agentgate: masked copy truncated at {len(copy)} bytes "
                     f"(masking.max_body_bytes)\n\n").encode()
            return
        copy += data

    def masked_copy(self) -> bytes | None:
        """The stream as masked, before restore (None when restore is off)."""
        return None if self.masked is None else bytes(self.masked)

    # -- channels
    def channel(self, key: tuple, json_mode: bool = False) -> TextChannel:
        ch = self.channels.get(key)
        if ch is None:
            ch = self.channels[key] = TextChannel(self.ctx, self.hold, json_mode)
        return ch

    def flush(self, which: Callable[[tuple], bool], skip: set | None = None) -> list[bytes]:
        out = []
        for key, ch in list(self.channels.items()):
            if which(key) and not (skip and key in skip):
                if ch.pending:
                    text = ch.feed("", final=True)
                    if text and ch.template is not None:
                        out.append(ch.template(text))
                del self.channels[key]
        return out

    # -- one event
    def event(self, raw: bytes) -> list[bytes]:
        ev = SSEEvent(raw)
        ev.mask_fields(self.plain.text)
        if ev.data is None:
            return [ev.raw]  # comments, keep-alives, id/retry-only events (masked)
        data = ev.data
        stripped = data.strip()
        if stripped == "[DONE]":
            return [*self.flush(lambda key: True), ev.raw]
        if stripped[:1] not in ("{", "["):
            return self._text_event(ev, data)
        try:
            obj = loads(data)
        except (ValueError, RecursionError):  # incl. duplicate keys: mask it as raw text
            return self._text_event(ev, data)
        if self.ctx.mcp:
            # an MCP event is one whole JSON-RPC message (a tool result, a server request):
            # masked as a document, never held back or split into synthetic delta events,
            # so the agent gets each message once, as valid JSON, with its id
            return self._generic(ev, obj)
        if isinstance(obj, dict):
            typ = obj.get("type")
            if isinstance(obj.get("choices"), list):
                return self._chat(ev, obj)
            if isinstance(typ, str):
                if typ.startswith("response."):
                    return self._responses(ev, obj, typ)
                if typ in ("content_block_delta", "content_block_stop", "message_delta",
                           "message_stop"):
                    return self._anthropic(ev, obj, typ)
                if typ in ("message_start", "content_block_start", "ping", "error"):
                    return self._generic(ev, obj)
        return self._unknown_json(ev, obj)

    def _text_event(self, ev: SSEEvent, data: str) -> list[bytes]:
        """Plain-text data: one text channel per event name, held back like a delta (a
        value split across events is seen whole); nothing goes out until some text is safe."""
        ch = self.channel(("text", ev.name))
        ch.template = lambda text, e=ev: _render_text(e, text)
        out = ch.feed(data)
        if not out:
            return []
        return [_render_text(ev, out)]

    def _unknown_json(self, ev: SSEEvent, obj: Any) -> list[bytes]:
        """A JSON event of no known dialect: every string under a text-like key is a
        channel of its own (by JSON path), the rest of the event is masked as a document."""
        leaves: list[tuple[tuple, Any, Any]] = []
        _text_leaves(obj, (), leaves, 0)
        if leaves:
            snapshot = _dump(obj)
            for path, holder, key in leaves:
                ch = self.channel(("json", ev.name, path))
                ch.template = _leaf_template(ev, snapshot, path, [p for p, _, _ in leaves])
                holder[key] = ch.feed(holder[key])
        return self._generic(ev, obj, force=bool(leaves))

    def _generic(self, ev: SSEEvent, obj: Any, force: bool = False) -> list[bytes]:
        if force:  # channel text inside (maybe _Dual: restored and masked renderings)
            self.plain.json_obj(obj)
            kept = ev.render(json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                        default=_kept))
            if self.restorer is None:
                return [kept]
            # the masked rendering is taken before the other fields are restored in place
            self.restorer.json_obj(obj)
            return [_pair(bytes(_render(ev, obj)), kept)]
        kept = ev.render(_dump(obj)) if self.plain.json_obj(obj) else ev.raw
        if self.restorer is not None and self.restorer.json_obj(obj):
            return [_pair(ev.render(_dump(obj)), kept)]
        return [kept]

    # -- OpenAI chat completions chunks
    def _chat(self, ev: SSEEvent, obj: dict) -> list[bytes]:
        pre: list[bytes] = []
        base = {k: obj[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                if k in obj}
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            closing = choice.get("finish_reason") is not None
            fed: set[tuple] = set()
            if choice.get("logprobs"):
                choice["logprobs"] = None  # per-token output: cannot be masked, dropped
            if isinstance(choice.get("text"), str):  # legacy completions stream
                key = ("chat", idx, "text")
                ch = self.channel(key)
                ch.template = _legacy_template(base, idx, ev.name)
                choice["text"] = ch.feed(choice["text"], closing)
                fed.add(key)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for field in ("content", "refusal", "reasoning_content", "reasoning"):
                    v = delta.get(field)
                    if isinstance(v, str):
                        key = ("chat", idx, field)
                        ch = self.channel(key)
                        ch.template = _chat_template(base, idx, field, None, ev.name)
                        delta[field] = ch.feed(v, closing)
                        fed.add(key)
                for field, sub in (("function_call", "arguments"), ("audio", "transcript")):
                    holder = delta.get(field)
                    if isinstance(holder, dict) and isinstance(holder.get(sub), str):
                        key = ("chat", idx, field)
                        ch = self.channel(key, json_mode=field == "function_call")
                        ch.template = _chat_template(base, idx, field, None, ev.name, sub)
                        holder[sub] = ch.feed(holder[sub], closing)
                        fed.add(key)
                for tc in delta.get("tool_calls") or ():
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        tidx = tc.get("index", 0)
                        key = ("chat", idx, "tool", tidx)
                        ch = self.channel(key, json_mode=True)
                        ch.template = _chat_template(base, idx, "tool", tidx, ev.name)
                        fn["arguments"] = ch.feed(fn["arguments"], closing)
                        fed.add(key)
            if closing:
                pre += self.flush(lambda key, idx=idx: key[0] == "chat" and key[1] == idx,
                                  skip=fed)
                for key in fed:
                    self.channels.pop(key, None)
        return [*pre, _render(ev, obj)]

    # -- OpenAI responses events
    def _responses(self, ev: SSEEvent, obj: dict, typ: str) -> list[bytes]:
        if typ.endswith(".delta") and isinstance(obj.get("delta"), str):
            kind = typ[:-len(".delta")]
            if obj.get("logprobs"):
                obj["logprobs"] = []  # per-token output: cannot be masked, dropped
            key = ("resp", kind, obj.get("output_index"), obj.get("content_index"),
                   obj.get("summary_index"))
            ch = self.channel(key, json_mode="arguments" in kind or "input" in kind)
            template = dict(obj)
            ch.template = lambda text, t=template, n=ev.name: _event(n, {**t, "delta": text})
            obj["delta"] = ch.feed(obj["delta"])
            return [_render(ev, obj)]
        pre: list[bytes] = []
        if typ.endswith(".done") and typ != "response.output_item.done":
            kind = typ[:-len(".done")]
            oi, ci = obj.get("output_index"), obj.get("content_index")
            pre = self.flush(lambda key: key[0] == "resp" and key[1] == kind and key[2] == oi
                             and (ci is None or key[3] == ci))
        elif typ == "response.output_item.done":
            oi = obj.get("output_index")
            pre = self.flush(lambda key: key[0] == "resp" and key[2] == oi)
        elif typ in ("response.completed", "response.failed", "response.incomplete",
                     "response.error", "error"):
            pre = self.flush(lambda key: True)
        return [*pre, *self._generic(ev, obj)]

    # -- Anthropic messages events
    def _anthropic(self, ev: SSEEvent, obj: dict, typ: str) -> list[bytes]:
        if typ == "content_block_delta":
            delta = obj.get("delta")
            idx = obj.get("index", 0)
            if isinstance(delta, dict):
                dtype = delta.get("type")
                field = {"text_delta": "text", "input_json_delta": "partial_json",
                         "thinking_delta": "thinking"}.get(dtype or "")
                if field and isinstance(delta.get(field), str):
                    ch = self.channel(("an", idx), json_mode=field == "partial_json")
                    ch.template = lambda text, i=idx, d=dtype, f=field, n=ev.name: _event(
                        n, {"type": "content_block_delta", "index": i,
                            "delta": {"type": d, f: text}})
                    delta[field] = ch.feed(delta[field])
                    return [_render(ev, obj)]
            return self._generic(ev, obj)
        if typ == "content_block_stop":
            idx = obj.get("index", 0)
            pre = self.flush(lambda key: key == ("an", idx))
        else:  # message_delta, message_stop
            pre = self.flush(lambda key: True)
        return [*pre, *self._generic(ev, obj)]


def _render_text(ev: SSEEvent, text: str | _Dual) -> bytes:
    if isinstance(text, _Dual):
        return _pair(ev.render(text.shown), ev.render(text.kept))
    return ev.render(text)


def _text_leaves(node: Any, path: tuple, out: list, depth: int) -> None:
    """(path, container, key) of the strings under STREAM_TEXT_KEYS, in document order."""
    if depth > 64:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                if k in STREAM_TEXT_KEYS:
                    out.append(((*path, k), node, k))
            elif isinstance(v, dict | list):
                _text_leaves(v, (*path, k), out, depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict | list):
                _text_leaves(v, (*path, i), out, depth + 1)


def _leaf_template(ev: SSEEvent, snapshot: str, path: tuple,
                   siblings: list[tuple]) -> Callable[[str], bytes]:
    """A flush event for one channel of an unknown shape: the event as it came, with this
    path's text set to the held text and the other channels' texts emptied."""
    def make(text: str) -> bytes:
        obj = json.loads(snapshot)
        for p in siblings:
            node = obj
            for k in p[:-1]:
                node = node[k]
            node[p[-1]] = text if p == path else ""
        return _render(ev, obj)
    return make


def _legacy_template(base: dict, idx: int, name: str | None) -> Callable[[str], bytes]:
    def make(text: str) -> bytes:
        return _event(name, {**base, "choices": [{"index": idx, "text": text,
                                                  "finish_reason": None}]})
    return make


def _chat_template(base: dict, idx: int, field: str, tidx: int | None,
                   name: str | None, sub: str | None = None) -> Callable[[str], bytes]:
    def make(text: str) -> bytes:
        if field == "tool":
            delta: dict = {"tool_calls": [{"index": tidx, "function": {"arguments": text}}]}
        elif sub is not None:
            delta = {field: {sub: text}}
        else:
            delta = {field: text}
        return _event(name, {**base, "choices": [{"index": idx, "delta": delta,
                                                  "finish_reason": None}]})
    return make
