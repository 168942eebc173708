"""Masking of WebSocket messages (both directions) for upstreams with `websocket: true`.

Runs right after Masking (and after policy's WebSocket step) in the chain, with the same
session Masker as the flow's HTTP bodies (`Masking._session`: placeholders agree with the
upgrade request and every other flow of the session).

Each text message, and each binary message that decodes as UTF-8, is one event of a
per-direction `StreamMasker` (addons/masking/sse.py), so WebSocket text gets exactly the
stream masking SSE gets:
- OpenAI Realtime server events (`response.text.delta`, `response.audio_transcript.delta`,
  `response.function_call_arguments.delta`, …) are the Responses stream's `response.*`
  events: the delta text is one channel per output item / content part, the tail a match
  could still grow into is held back and released with the next delta, or, at the
  channel's `*.done` / `response.done`, in a synthetic delta just before it; the done events
  (full `text` / `transcript`) are masked as JSON documents with the same placeholders.
- other `*.delta` events (e.g. input transcription) are a channel per event type, flushed
  by the matching `*.done` / `*.completed`;
- other JSON events with a `type` (`session.update`, `conversation.item.create`,
  `response.create`, …) are masked whole as JSON documents (`item.content[].text`,
  `instructions`, tool arguments …), never held back: each is a message of its own; a value
  that starts in one such event and ends in the next closes the socket (1008) before the
  second half leaves (`_check_split`, bounded);
- audio events (`input_audio_buffer.append`, `response.audio.delta`,
  `response.output_audio.delta`) carry base64 audio that cannot be masked; their other
  fields are masked, the audio passes (documented in rules/README.md);
- plain text and JSON of no known shape: one text channel per direction (a value split
  across two messages is seen whole before any of it leaves).

A message may come out as nothing (all of it held back: it is dropped and its text goes out
with the next one), or as two messages (held text + the closing event). The extra
messages keep their order through a per-direction FIFO: for each, masking injects an empty
"slot" (`SLOT_MARKER`) that takes the head of the FIFO when it passes through this hook.
Held text still pending when the socket closes is never sent (it was never sent raw either).

With `restore: true`, messages to the agent get this session's originals back; the masked
text is kept and, at `websocket_end` (before the recorder records the messages), put back
into `flow.websocket.messages`, so the record holds the masked messages only.

Fail closed: a binary message that is not UTF-8, or one that cannot be parsed or masked
(or any error here) drops the message and closes the socket (1011, reason says why); a
message over the size cap or held text over `masking.max_body_bytes` closes it too.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import deque
from typing import Any

from mitmproxy import ctx, http

from addons.egress.websocket import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    SLOT_MARKER,
    admissible,
    close_websocket,
    closing,
    is_slot,
)
from addons.frame.guard import guarded
from addons.frame.offload import Busy, run_heavy
from addons.masking.addon import THREAD_MIN_BYTES, Masking, _heavy
from addons.masking.bodies import Masked, loads
from addons.masking.masker import merge
from addons.masking.sse import SSEEvent, StreamMasker

log = logging.getLogger("agentgate.masking")

STEP = "masking"
CLOSE_TRY_AGAIN = 1013  # RFC 6455 registry: try again later (the heavy-work queue is full)
# event type -> the field holding base64 audio (passed; every other field is masked)
AUDIO_FIELDS = {"input_audio_buffer.append": "audio", "response.audio.delta": "delta",
                "response.output_audio.delta": "delta"}
_CHANNEL_END = (".done", ".completed", ".failed")
SPLIT_STRINGS = 8  # strings per event compared across two whole-document events


class _Direction:
    """One direction of one WebSocket: its stream masker and the FIFO of messages owed."""

    __slots__ = ("stream", "fifo", "owed", "tail")

    def __init__(self, stream: StreamMasker) -> None:
        self.stream = stream
        self.fifo: deque[tuple[bytes, bytes]] = deque()  # (to send, to record)
        self.owed = 0  # slots injected and not yet through this hook
        # the end of the previous whole-document event's text (raw, memory only): a value
        # split across two such events (each masked whole, never held back) is caught here
        self.tail: list[str] = []


class SplitValue(Exception):
    """A value straddles two whole-document events: its first part already left."""


class _State:
    __slots__ = ("dirs", "kept", "findings")

    def __init__(self, findings: dict) -> None:
        self.dirs: dict[bool, _Direction] = {}
        self.kept: list[tuple[Any, bytes]] = []  # (message, masked content) when restored
        self.findings = findings


class WebSocketMasking:
    def __init__(self, masking: Masking) -> None:
        self.masking = masking
        self._states: weakref.WeakKeyDictionary[http.HTTPFlow, _State] = \
            weakref.WeakKeyDictionary()

    # -- per flow
    def _direction(self, flow: http.HTTPFlow, from_client: bool, up: Any, cfg: Any
                   ) -> tuple[_State, _Direction]:
        st = self._states.get(flow)
        if st is None:
            st = self._states[flow] = _State({})
        d = st.dirs.get(from_client)
        if d is None:
            m = self.masking
            mctx = Masked(m.masker(), m._session(flow), st.findings,  # noqa: SLF001
                          restorable=from_client,
                          restore=bool(not from_client and up is not None and up.restore),
                          dialect=m._dialect(flow, up))  # noqa: SLF001
            d = st.dirs[from_client] = _Direction(
                StreamMasker(mctx, max_event=cfg.max_body_bytes,
                             max_masked_copy=cfg.max_body_bytes))
        return st, d

    # -- hooks
    @guarded(STEP, skip_answered=False)
    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if closing(flow):
            return
        try:
            await self._message(flow, message)
        except Exception as exc:  # noqa: BLE001 - fail closed: never forward it raw
            log.error("agentgate: masking a WebSocket message failed (%s); closing",
                      type(exc).__name__)
            close_websocket(flow, CLOSE_INTERNAL, "agentgate: message could not be masked")

    async def _message(self, flow: http.HTTPFlow, message: Any) -> None:
        plan = self.masking._plan(flow)  # noqa: SLF001
        st_slot = self._states.get(flow)
        if is_slot(message):
            d = st_slot.dirs.get(message.from_client) if st_slot else None
            if d is None or not d.fifo:
                message.drop()
            else:
                d.owed = max(0, d.owed - 1)
                self._send(st_slot, d, message)
            return
        why = admissible(flow, message)
        if why is not None:
            close_websocket(flow, *why)
            return
        if plan is None:
            return  # mask: false upstream, or masking disabled
        cfg, up = plan
        try:
            text = message.content.decode("utf-8")
        except UnicodeDecodeError:
            close_websocket(flow, CLOSE_INTERNAL,
                            "agentgate: binary message that is not UTF-8 text cannot be masked")
            return
        st, d = self._direction(flow, message.from_client, up, cfg)
        try:
            if len(message.content) >= THREAD_MIN_BYTES or _heavy(message.content):
                # a large message, or one dense with values (masking cost follows them,
                # masking/cost.py LOOP_BUDGET_US), is masked in a worker thread, in this identity's
                # share of them (frame/offload.py): other flows keep moving (this socket
                # waits: mitmproxy runs the hook before the next message)
                outs = await run_heavy(flow, self._mask, d, text)
            else:
                outs = self._mask(d, text)
            d.fifo.extend(outs)
        except Busy as e:
            close_websocket(flow, CLOSE_TRY_AGAIN, f"agentgate: {e.message}")
            return
        except SplitValue:
            close_websocket(flow, CLOSE_POLICY,
                            "agentgate: a value split across two messages cannot be masked")
            return
        held = sum(ch.pending for ch in d.stream.channels.values())
        if held > cfg.max_body_bytes:
            close_websocket(flow, CLOSE_TOO_BIG,
                            "agentgate: held-back text above masking.max_body_bytes")
            return
        if d.fifo:
            self._send(st, d, message)
        else:
            message.drop()  # all held back: it goes out with the next message
        extra = len(d.fifo) - d.owed
        for _ in range(max(0, extra)):
            self._inject_slot(flow, not message.from_client, message.is_text)
            d.owed += 1
        if st.findings:
            merge(self.masking._findings(flow), st.findings)  # noqa: SLF001
            st.findings.clear()

    @staticmethod
    def _inject_slot(flow: http.HTTPFlow, to_client: bool, is_text: bool) -> None:
        ctx.master.commands.call("inject.websocket", flow, to_client, SLOT_MARKER, is_text)

    @staticmethod
    def _send(st: _State, d: _Direction, message: Any) -> None:
        shown, kept = d.fifo.popleft()
        message.content = shown
        if kept != shown:
            st.kept.append((message, kept))

    @guarded(STEP, skip_answered=False)
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        st = self._states.pop(flow, None)
        if st is None:
            return
        # the agent got restored values; the record (next in the chain) keeps them masked
        for message, kept in st.kept:
            message.content = kept
        st.kept.clear()

    # -- one message through the stream masker
    def _mask(self, d: _Direction, text: str) -> list[tuple[bytes, bytes]]:
        sm = d.stream
        whole_doc = False
        try:
            out, whole_doc = self._mask_event(d, sm, text)
        finally:
            if not whole_doc:
                d.tail = []  # the stream channels see splits around other messages
        return out

    def _mask_event(self, d: _Direction, sm: StreamMasker, text: str
                    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        obj: Any = None
        if text.lstrip()[:1] == "{":
            try:
                obj = loads(text)
            except (ValueError, RecursionError):
                obj = None  # not JSON after all: masked as text
        typ = obj.get("type") if isinstance(obj, dict) else None
        if isinstance(typ, str):
            field = AUDIO_FIELDS.get(typ)
            if field is not None and isinstance(obj.get(field), str):
                _check_split(d, sm, obj, skip=field)
                return [_audio(sm, obj, field, text)], True
            if typ.startswith("response."):
                pre = sm.flush(lambda key: True) if typ == "response.done" else []
                return [*map(_pair, pre), *self._events(sm, obj_text=text)], False
            if typ.endswith(".delta"):
                return self._events(sm, obj_text=text, name=typ), False
            ends = [s for s in _CHANNEL_END if typ.endswith(s)]
            pre = []
            if ends:
                stem = typ[:-len(ends[0])]
                pre = sm.flush(lambda key: key[0] == "json"
                               and isinstance(key[1], str) and key[1].startswith(stem))
            _check_split(d, sm, obj)
            return [*map(_pair, pre), _whole(sm, obj, text)], True
        return self._events(sm, obj_text=text), False

    @staticmethod
    def _events(sm: StreamMasker, obj_text: str, name: str | None = None
                ) -> list[tuple[bytes, bytes]]:
        head = f"event: {name}\n" if name else ""
        raw = head + "".join(f"data: {ln}\n" for ln in obj_text.split("\n")) + "\n"
        return [_pair(b) for b in sm.event(raw.encode("utf-8", "surrogateescape"))]


def _strings(node: Any, out: list[str], skip: str | None, depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k != skip or depth:
                _strings(v, out, skip, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _strings(v, out, skip, depth + 1)


def _check_split(d: _Direction, sm: StreamMasker, obj: Any, skip: str | None = None) -> None:
    """Raise SplitValue when a value starts in a string of the previous whole-document event
    and ends in a string of this one (neither part alone is a finding, so masking each event
    whole misses it). Bounded: the last SPLIT_STRINGS strings of the previous event against
    the first SPLIT_STRINGS of this one (structure strings such as `type` excluded)."""
    parts: list[str] = []
    _strings(obj, parts, skip)
    texts = [t for t in parts if len(t) > 1 and t != obj.get("type")]
    masker = sm.ctx.masker
    keep = masker.context_len
    prev = d.tail
    d.tail = [t[-keep:] for t in texts[-SPLIT_STRINGS:]]
    if not prev or not texts:
        return
    for head in (t[:keep] for t in texts[:SPLIT_STRINGS]):
        for tail in prev:
            for sep in ("", " "):  # the two parts read as one word, or as two
                cut = len(tail) + len(sep) // 2
                if any(f.start < cut < f.end for f in masker.find(tail + sep + head)):
                    raise SplitValue


def _data(event: bytes) -> bytes:

    data = SSEEvent(event).data
    return (data or "").encode("utf-8", "surrogateescape")


def _pair(event: bytes) -> tuple[bytes, bytes]:
    """(message for the peer, message for the record) from one event of the masker."""
    shown = _data(bytes(event))
    kept = getattr(event, "masked", None)
    return shown, (_data(kept) if kept is not None else shown)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _whole(sm: StreamMasker, obj: Any, text: str) -> tuple[bytes, bytes]:
    """A JSON event masked as one document (restored for the agent when restoring)."""
    kept = _dump(obj) if sm.plain.json_obj(obj) else text.encode()
    if sm.restorer is not None and sm.restorer.json_obj(obj):
        return _dump(obj), kept
    return kept, kept


def _audio(sm: StreamMasker, obj: dict, field: str, text: str) -> tuple[bytes, bytes]:
    audio = obj.pop(field)
    changed = sm.plain.json_obj(obj)
    if not changed:
        return text.encode(), text.encode()
    obj[field] = audio
    out = _dump(obj)
    return out, out
