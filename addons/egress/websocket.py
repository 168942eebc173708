"""WebSockets to upstreams that opted in (`websocket: true`): per-message checks, and the
one way any step closes a live WebSocket.

The upgrade itself is refused by `upstreams` unless the upstream opts in. For an opted-in
upstream, every message re-checks the caller's token expiry (identity's
`flow.metadata["identity"]["exp"]`): a tunnel outliving its token is closed, not trusted on.
Messages are counted per direction for the recorder (`flow.metadata["websocket"]`), and a
message above `agentgate_max_body_bytes` closes the connection.

Policy (`addons.policy.websocket`) and masking (`addons.masking.websocket`) inspect every
message before it leaves; they run before this addon in the chain and close through
`close_websocket` below.

Closing: mitmproxy 12's WebSocket layer ignores `flow.kill()` (the message is sent and the
socket stays open; mitmproxy#4711), so a version-pinned wrapper around
`WebsocketLayer.relay_messages` honours `flow.metadata["websocket_close"]` right after the
`websocket_message` hooks ran: the message is not sent, both sides get a close frame with
the code and reason, both connections are closed and `websocket_end` runs.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import wsproto.events
from mitmproxy import ctx, http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import websocket as _ws_layer
from wsproto.connection import ConnectionState

from addons.config.holder import RulesHolder
from addons.frame.guard import guarded

log = logging.getLogger("agentgate.websocket")

STEP = "websocket"
CLOSE_POLICY = 1008    # RFC 6455: policy violation
CLOSE_TOO_BIG = 1009   # message too big
CLOSE_INTERNAL = 1011  # the gateway could not inspect the message
# Content of the empty "slot" messages masking injects to keep its output in order (a
# message whose held text and closing event come out as two messages); per process, so
# an agent cannot forge one. Every step passes them through untouched.
SLOT_MARKER = b"\x00agentgate-slot:" + secrets.token_hex(16).encode()


def close_websocket(flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Drop the current message and close the WebSocket on both sides with `code` and
    `reason` (the reason reaches the agent: never put a value or a secret in it)."""
    if flow.websocket is not None and flow.websocket.messages:
        flow.websocket.messages[-1].drop()
    if "websocket_close" not in flow.metadata:
        # a close frame's reason is at most 123 bytes (RFC 6455 5.5)
        raw = reason.encode()[:123]
        flow.metadata["websocket_close"] = {"code": code,
                                            "reason": raw.decode("utf-8", "ignore")}
    if flow.killable:
        flow.kill()  # the flow's error says so too (mitmweb, the record)


def closing(flow: http.HTTPFlow) -> bool:
    """True when an earlier step already asked to close: later steps leave the message."""
    return "websocket_close" in flow.metadata


def is_slot(message: Any) -> bool:
    return bool(message.injected and message.content == SLOT_MARKER)


def _install_close() -> None:
    """Wrap WebsocketLayer.relay_messages once (mitmproxy 12.x: the generator yields one
    WebsocketMessageHook per finished message, then sends `message.content` unless
    dropped; `client_ws`/`server_ws` hold the wsproto connections)."""
    layer = _ws_layer.WebsocketLayer
    if getattr(layer.relay_messages, "agentgate_close", False):
        return
    original = layer.relay_messages

    def relay_messages(self, event):
        gen = original(self, event)
        try:
            cmd = next(gen)
        except StopIteration:
            cmd = None
        while cmd is not None:
            reply = yield cmd
            if isinstance(cmd, _ws_layer.WebsocketMessageHook):
                spec = _close_request(self.flow)
                if spec is not None:
                    gen.close()
                    yield from _close_both(self, spec)
                    return
            try:
                cmd = gen.send(reply)
            except StopIteration:
                break
        # mitmproxy joins a message's frames in `frame_buf` before any hook sees it: a
        # message that never ends would grow without bound. Checked after each received
        # chunk, so at most the limit plus one read is ever buffered.
        if self._handle_event != self.done:
            limit = ctx.options.agentgate_max_body_bytes
            for side in (self.client_ws, self.server_ws):
                if sum(len(b) for b in side.frame_buf) > limit:
                    log.warning("agentgate: WebSocket message above the body limit while "
                                "buffering; closing")
                    yield from _close_both(self, {"code": CLOSE_TOO_BIG, "reason":
                                                  "agentgate: message above "
                                                  "agentgate_max_body_bytes"}, drop=False)
                    return

    relay_messages.agentgate_close = True  # type: ignore[attr-defined]
    layer.relay_messages = relay_messages  # type: ignore[method-assign]


def _close_request(flow: http.HTTPFlow) -> dict | None:
    """The close a step asked for, or one for a hook that failed: `guarded` answers a
    failed hook with an error response, which cannot reach a live socket's client (the
    101 went out long ago), so a replaced 101 means "closed, internal error"."""
    spec = flow.metadata.get("websocket_close")
    if isinstance(spec, dict):
        return spec
    if flow.response is None or flow.response.status_code != 101:
        return {"code": CLOSE_INTERNAL, "reason": "agentgate: internal error"}
    return None


def _close_both(layer: Any, spec: dict, drop: bool = True):
    code, reason = int(spec.get("code", CLOSE_POLICY)), str(spec.get("reason", ""))
    flow = layer.flow
    ws = flow.websocket
    if drop and ws.messages:
        ws.messages[-1].drop()  # never forwarded, whatever a step set
    ws.timestamp_end = time.time()
    ws.closed_by_client = False
    ws.close_code = code
    ws.close_reason = reason
    for conn in (layer.server_ws, layer.client_ws):
        if conn.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
            yield conn.send2(wsproto.events.CloseConnection(code=code, reason=reason))
        yield commands.CloseConnection(conn.conn)
    yield _ws_layer.WebsocketEndHook(flow)
    flow.live = False
    layer._handle_event = layer.done  # noqa: SLF001 - what the layer does on a close frame


class WebSockets:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def load(self, loader: Any) -> None:
        _install_close()

    def _opted_in(self, flow: http.HTTPFlow) -> bool:
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        return bool(up is not None and up.websocket)

    @guarded(STEP, skip_answered=False)
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if not self._opted_in(flow):  # upstreams refuses the upgrade; never trust that alone
            log.warning("agentgate: WebSocket to an upstream without websocket: true; closing")
            close_websocket(flow, CLOSE_POLICY, "agentgate: WebSockets not allowed")
            return
        flow.metadata["websocket"] = {"to_server": 0, "to_client": 0, "bytes": 0}

    @guarded(STEP, skip_answered=False)
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if is_slot(message):
            return
        reason = admissible(flow, message)
        if reason is not None:
            close_websocket(flow, *reason)
            return
        stats = flow.metadata.setdefault("websocket", {"to_server": 0, "to_client": 0,
                                                       "bytes": 0})
        stats["to_server" if message.from_client else "to_client"] += 1
        stats["bytes"] += len(message.content)


def admissible(flow: http.HTTPFlow, message: Any) -> tuple[int, str] | None:
    """(close code, reason) when the message must close the socket (token expired, message
    over `agentgate_max_body_bytes`), else None. Policy and masking run before this addon
    and call it first, so nothing inspects (or buffers a copy of) what is refused anyway."""
    ident = flow.metadata.get("identity")
    exp = ident.get("exp") if isinstance(ident, dict) else None
    if isinstance(exp, (int, float)) and time.time() >= exp:
        log.warning("agentgate: token expired during a WebSocket; closing it")
        return CLOSE_POLICY, "agentgate: identity token expired"
    if len(message.content) > ctx.options.agentgate_max_body_bytes:
        log.warning("agentgate: WebSocket message above the body limit; closing")
        return CLOSE_TOO_BIG, "agentgate: message above agentgate_max_body_bytes"
    return None

