"""How any step closes a live WebSocket (addons/egress/websocket.py)."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.test import tflow

from addons.egress.websocket import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    _close_request,
    close_websocket,
    is_slot,
)
from addons.frame.guard import refuse


def test_close_request_drops_the_message_and_first_close_wins() -> None:
    f = tflow.twebsocketflow()
    close_websocket(f, CLOSE_POLICY, "agentgate: blocked by rule " + "r" * 200)
    close_websocket(f, CLOSE_INTERNAL, "later")
    assert f.websocket.messages[-1].dropped
    spec = _close_request(f)
    assert spec is not None and spec["code"] == CLOSE_POLICY
    assert len(spec["reason"].encode()) <= 123  # RFC 6455: a close reason fits a control frame


def test_a_failed_hook_closes_the_socket() -> None:
    # guarded answers a failed hook with an error response: on a live socket that is a close
    f = tflow.twebsocketflow()
    assert _close_request(f) is None
    refuse(f, 502, "internal error in masking (websocket_message)", "gateway_error", "masking")
    spec = _close_request(f)
    assert spec is not None and spec["code"] == CLOSE_INTERNAL


def test_only_injected_markers_are_slots() -> None:
    from addons.egress.websocket import SLOT_MARKER
    f = tflow.twebsocketflow()
    m = f.websocket.messages[-1]
    m.content = SLOT_MARKER
    assert not is_slot(m)  # the agent cannot send a slot (and cannot know the marker)
    m.injected = True
    assert is_slot(m)
    assert isinstance(f.response, http.Response) and f.response.status_code == 101
