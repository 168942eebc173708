"""Hostile: duplicate keys in a WebSocket JSON event, through a real mitmdump. For HTTP
bodies the gateway refuses duplicate keys (parsers disagree on which one wins: the upstream
could read the one policy did not judge). A Realtime `session.update` naming a forbidden
model first and an allowed one second was judged by the second (Python's json keeps the
last) and forwarded as it was: an upstream that keeps the first got the forbidden model.
A rule that reads the event's structure must not be answered from one reading of several:
an event with duplicate keys closes the socket with 1008 (as an HTTP body with them is
refused with 400), nothing upstream."""

from __future__ import annotations

import json

import pytest

from tests.hostile import test_websocket as wskit

pytestmark = pytest.mark.integration

RULE = """policies:
  - name: no-forbidden-model
    match: {model: ["gpt-forbidden*"]}
    action: block
"""
EVENTS = {
    "forbidden first": '{"type":"session.update","session":{"model":"gpt-forbidden-1"},'
                       '"session":{"model":"gpt-4o"}}',
    "forbidden last": '{"type":"session.update","session":{"model":"gpt-4o"},'
                      '"session":{"model":"gpt-forbidden-1"}}',
    "nested duplicate": '{"type":"session.update","session":{"model":"gpt-forbidden-1",'
                        '"model":"gpt-4o"}}',
    "escaped duplicate": '{"type":"session.update","session":{"model":"gpt-forbidden-1"},'
                         '"sess\\u0069on":{"model":"gpt-4o"}}',
    "plain": '{"type":"session.update","session":{"model":"gpt-forbidden-1"}}',
}


@pytest.mark.parametrize("what", list(EVENTS))
def test_duplicate_keys_in_an_event_never_pass_a_structure_rule(gateway_factory, standin,
                                                                 monkeypatch, what) -> None:
    from websockets.exceptions import ConnectionClosed
    monkeypatch.setattr(wskit, "RULES", wskit.RULES.replace("policies:\n", RULE))
    with wskit.live(gateway_factory, standin) as (gw, up):
        with wskit.client(gw) as ws:
            ok = json.dumps({"type": "session.update", "session": {"model": "gpt-4o"}})
            ws.send(ok)
            assert ws.recv(timeout=30) == ok  # the rule lets an allowed model through
            ws.send(EVENTS[what])
            with pytest.raises(ConnectionClosed) as exc:
                ws.recv(timeout=30)
        rcvd = exc.value.rcvd
        assert rcvd is not None and rcvd.code == 1008, (what, rcvd)
        assert all("gpt-forbidden" not in s for s in up.seen), (what, up.seen)
        wskit.assert_healthy(gw, standin)
