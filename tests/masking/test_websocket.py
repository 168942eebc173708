"""Masking of WebSocket messages (addons/masking/websocket.py), with the real detectors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.egress.websocket import CLOSE_INTERNAL, SLOT_MARKER
from addons.masking.addon import Masking
from addons.masking.websocket import WebSocketMasking

EMAIL = "ann.lee@example.com"
CARD = "4111 1111 1111 1111"
RULES = """
upstreams:
  - {name: live, hosts: [ws.example.com], dialect: webhook, websocket: true}
  - {name: back, hosts: [wr.example.com], dialect: webhook, websocket: true, restore: true}
  - {name: raw, hosts: [wx.example.com], dialect: webhook, websocket: true, mask: false}
"""


MAX = [64 << 20]


class EdgeOpts:
    """The one edge option the WebSocket steps read (EdgeLimits wants core options)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def load(self, loader: Any) -> None:
        loader.add_option("agentgate_max_body_bytes", int, self.limit, "message cap")


@pytest.fixture
def addon(tmp_path: Path) -> WebSocketMasking:
    (tmp_path / "r.yaml").write_text(RULES)
    return WebSocketMasking(Masking(RulesHolder(load_rules(tmp_path))))


def ws_flow(upstream: str = "live") -> Any:
    f = tflow.twebsocketflow(messages=False)
    f.metadata["upstream"] = {"name": upstream, "dialect": "webhook"}
    f.metadata["websocket"] = {"to_server": 0, "to_client": 0, "bytes": 0}
    return f


def drop_stale_log_handlers() -> None:
    """taddons leaves its master's log handler on the root logger; once its loop is closed
    (asyncio.run per message here), the next record would raise inside it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        loop = getattr(getattr(h, "master", None), "event_loop", None)
        if loop is not None and loop.is_closed():
            root.removeHandler(h)


def send(addon: WebSocketMasking, f: Any, content: str | bytes, from_client: bool = True,
         binary: bool = False, injected: bool = False) -> WebSocketMessage:
    data = content.encode() if isinstance(content, str) else content
    m = WebSocketMessage(Opcode.BINARY if binary else Opcode.TEXT, from_client, data,
                         injected=injected)
    f.websocket.messages.append(m)

    async def go() -> None:
        with taddons.context(EdgeOpts(MAX[0])):
            await addon.websocket_message(f)
    asyncio.run(go())
    drop_stale_log_handlers()
    return m


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def test_realtime_item_text_is_masked(addon: WebSocketMasking) -> None:
    item = {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": f"mail {EMAIL} now"}]}}
    f = ws_flow()
    m = send(addon, f, json.dumps(item))
    out = json.loads(m.content)
    assert EMAIL not in m.text and out["item"]["content"][0]["text"].startswith("mail [EMAIL")
    assert f.metadata["findings"]


def test_value_split_across_two_text_messages_is_masked(addon: WebSocketMasking) -> None:
    f = ws_flow()
    a = send(addon, f, "card 4111 1111 ")
    b = send(addon, f, "1111 1111 thanks")
    c = send(addon, f, " and then some more words")
    sent = "".join(m.text for m in (a, b, c) if not m.dropped)
    assert "4111111111111111" not in digits(sent)
    assert "[CREDIT_CARD" in sent and "thanks" in sent
    assert "4111" not in a.text  # the start of the value was held back, not sent


@pytest.mark.parametrize("from_client", [True, False])
def test_binary_json_is_masked_and_non_utf8_closes(addon: WebSocketMasking,
                                                  from_client: bool) -> None:
    f = ws_flow()
    m = send(addon, f, json.dumps({"type": "x.y", "note": EMAIL}).encode(), from_client,
             binary=True)
    assert EMAIL.encode() not in m.content and not m.dropped
    bad = send(addon, f, b"\xff\xfe" + EMAIL.encode(), from_client, binary=True)
    assert bad.dropped
    assert f.metadata["websocket_close"]["code"] == CLOSE_INTERNAL
    assert "not UTF-8" in f.metadata["websocket_close"]["reason"]


def test_audio_passes_other_fields_masked(addon: WebSocketMasking) -> None:
    audio = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA="
    f = ws_flow()
    m = send(addon, f, json.dumps({"type": "input_audio_buffer.append",
                                   "event_id": EMAIL, "audio": audio}))
    out = json.loads(m.content)
    assert out["audio"] == audio and EMAIL not in m.text


def test_upstream_deltas_hold_back_and_flush_in_order(addon: WebSocketMasking,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def delta(text: str) -> str:
        return json.dumps({"type": "response.text.delta", "output_index": 0,
                           "content_index": 0, "delta": text})
    injected: list[tuple[bool, bytes]] = []
    monkeypatch.setattr(WebSocketMasking, "_inject_slot", staticmethod(
        lambda f, to_client, is_text: injected.append((to_client, SLOT_MARKER))))
    f = ws_flow()
    a = send(addon, f, delta("Your card is 4111 1111 "), from_client=False)
    b = send(addon, f, delta("1111 1111"), from_client=False)
    done = json.dumps({"type": "response.text.done", "output_index": 0,
                       "content_index": 0, "text": f"Your card is {CARD}"})
    c = send(addon, f, done, from_client=False)
    # the held tail came out in this slot; the done event is owed to a slot
    assert injected == [(True, SLOT_MARKER)]
    slot = send(addon, f, SLOT_MARKER, from_client=False, injected=True)
    spare = send(addon, f, SLOT_MARKER, from_client=False, injected=True)
    events = [json.loads(m.content) for m in (a, b, c, slot)]
    assert [e["type"] for e in events] == ["response.text.delta"] * 3 + ["response.text.done"]
    streamed = "".join(e["delta"] for e in events[:3])
    assert streamed == events[3]["text"] and "[CREDIT_CARD" in streamed
    assert spare.dropped  # a slot with nothing owed sends nothing


def test_restore_for_the_agent_record_keeps_masked(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    addon = WebSocketMasking(Masking(RulesHolder(load_rules(tmp_path))))
    f = ws_flow("back")
    out = send(addon, f, json.dumps({"type": "x.note", "text": f"to {EMAIL}"}))
    placeholder = json.loads(out.content)["text"][3:]
    assert placeholder.startswith("[EMAIL")
    back = send(addon, f, json.dumps({"type": "x.reply", "text": f"ok {placeholder}"}),
                from_client=False)
    assert EMAIL in back.text  # the agent gets its value back
    addon.websocket_end(f)
    assert EMAIL not in back.text and placeholder in back.text  # what the recorder stores


def test_mask_false_upstream_passes(addon: WebSocketMasking) -> None:
    f = ws_flow("raw")
    m = send(addon, f, f"card {CARD}")
    assert m.text == f"card {CARD}"


def test_message_over_the_limit_closes(addon: WebSocketMasking) -> None:
    MAX[0] = 1000
    try:
        f = ws_flow()
        m = send(addon, f, "x" * 1001)
    finally:
        MAX[0] = 64 << 20
    assert m.dropped and f.metadata["websocket_close"]["code"] == 1009


@pytest.mark.parametrize("first,second", [("card 4111 1111 ", "1111 1111 thanks"),
                                          ("card 41111111", "11111111"),
                                          ("mail ann.lee@exam", "ple.com")])
def test_value_split_across_two_json_events_closes(addon: WebSocketMasking, first: str,
                                                   second: str) -> None:
    def item(text: str) -> str:
        return json.dumps({"type": "conversation.item.create",
                           "item": {"content": [{"type": "input_text", "text": text}]}})
    f = ws_flow()
    a = send(addon, f, item(first))
    b = send(addon, f, item(second))
    assert not a.dropped and b.dropped  # the second half never leaves
    assert f.metadata["websocket_close"]["code"] == 1008
    assert "split" in f.metadata["websocket_close"]["reason"]


def test_unrelated_json_events_pass(addon: WebSocketMasking) -> None:
    def item(text: str) -> str:
        return json.dumps({"type": "conversation.item.create",
                           "item": {"content": [{"type": "input_text", "text": text}]}})
    f = ws_flow()
    msgs = [send(addon, f, item(t)) for t in ("order 1234", "5678 items", "call at 10",
                                              "room 42")]
    assert not any(m.dropped for m in msgs) and "websocket_close" not in f.metadata


def test_large_message_is_masked_in_a_worker_thread(addon: WebSocketMasking) -> None:
    f = ws_flow()
    body = json.dumps({"type": "conversation.item.create",
                       "item": {"content": [{"type": "input_text",
                                             "text": "x " * 40_000 + f"card {CARD}"}]}})
    m = send(addon, f, body)
    assert len(m.content) > 64 * 1024 and "[CREDIT_CARD" in m.text
    assert "4111111111111111" not in digits(m.text)


def test_small_message_dense_with_values_is_masked_in_a_worker_thread(
        addon: WebSocketMasking, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masking cost follows the values (masking/cost.py LOOP_BUDGET_US): ~16 KB of e-mail addresses
    held the event loop tens of ms when only messages over THREAD_MIN_BYTES left it. Same
    bytes either way (compared with the same message masked on the loop, budget raised)."""
    from addons.masking import addon as masking_addon
    from addons.masking import cost
    from tests.frame.threadcount import count_to_thread

    text = " ".join(f"user{i}.x@example.com" for i in range(700))
    body = json.dumps({"type": "conversation.item.create",
                       "item": {"content": [{"type": "input_text", "text": text}]}})
    assert len(body) < masking_addon.THREAD_MIN_BYTES
    threaded = count_to_thread(monkeypatch, masking_addon)
    m = send(addon, ws_flow(), body)
    assert len(threaded) == 1 and "@example.com" not in m.text
    monkeypatch.setattr(cost, "LOOP_BUDGET_US", 10**9)
    inline = send(addon, ws_flow(), body)
    assert len(threaded) == 1 and inline.content == m.content
