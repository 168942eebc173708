"""Policy on WebSocket messages (addons/policy/websocket.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.egress.websocket import SLOT_MARKER
from addons.policy.addon import Policy
from addons.policy.websocket import WebSocketPolicy

RULES = """
upstreams:
  - {name: live, hosts: [ws.example.com], dialect: webhook, websocket: true}
policies:
  - name: no-exfil
    match: {prompt: {regex: ['exfiltrat(e|ion)']}}
    action: block
  - name: no-mini
    match: {model: ['*-mini-*']}
    action: block
  - name: hold-wire
    match: {prompt: {words: [wire transfer]}}
    action: approve
    approvers: [reviewers]
  - name: only-realtime-path
    match: {not: {path: [/v1/realtime]}, prompt: {words: [offpath]}}
    action: block
"""


class EdgeOpts:
    """The one edge option the WebSocket steps read (EdgeLimits wants core options)."""

    def load(self, loader: Any) -> None:
        loader.add_option("agentgate_max_body_bytes", int, 64 << 20, "message cap")


@pytest.fixture
def addon(tmp_path: Path) -> WebSocketPolicy:
    (tmp_path / "r.yaml").write_text(RULES)
    return WebSocketPolicy(RulesHolder(load_rules(tmp_path)))


def ws_flow(path: str = "/v1/realtime") -> Any:
    f = tflow.twebsocketflow(messages=False)
    f.request.path = path
    f.metadata["upstream"] = {"name": "live", "dialect": "webhook"}
    f.metadata["identity"] = {"sub": "agent-1", "exp": 4102444800}
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


def send(addon: WebSocketPolicy, f: Any, content: str | bytes, from_client: bool = True,
         injected: bool = False) -> WebSocketMessage:
    data = content.encode() if isinstance(content, str) else content
    m = WebSocketMessage(Opcode.TEXT, from_client, data, injected=injected)
    f.websocket.messages.append(m)

    async def go() -> None:
        with taddons.context(EdgeOpts(), Policy(addon.holder)):
            await addon.websocket_message(f)
    asyncio.run(go())
    drop_stale_log_handlers()
    return m


@pytest.mark.parametrize("content", [
    "please exfiltrate the data",
    json.dumps({"type": "conversation.item.create",
                "item": {"content": [{"type": "input_text", "text": "exfiltration now"}]}}),
    json.dumps({"type": "response.create", "response": {"instructions": "EXFILTRATE"}}),
])
def test_blocked_keyword_closes_with_1008_naming_the_rule(addon: WebSocketPolicy,
                                                          content: str) -> None:
    f = ws_flow()
    m = send(addon, f, content)
    assert m.dropped
    close = f.metadata["websocket_close"]
    assert close["code"] == 1008 and "no-exfil" in close["reason"]
    assert f.metadata["decision"]["rule"] == "no-exfil"


def test_model_in_session_update_is_judged(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    m = send(addon, f, json.dumps({"type": "session.update",
                                   "session": {"model": "gpt-4o-mini-realtime"}}))
    assert m.dropped and "no-mini" in f.metadata["websocket_close"]["reason"]


def test_approve_on_a_message_is_a_block_saying_so(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    m = send(addon, f, "do a wire transfer")
    close = f.metadata["websocket_close"]
    assert m.dropped and close["code"] == 1008
    assert "hold-wire" in close["reason"] and "approval" in close["reason"]
    assert "approval" not in f.metadata["decision"]  # nothing is held


def test_upgrade_path_is_a_fact(addon: WebSocketPolicy) -> None:
    f = ws_flow("/v1/other")
    assert send(addon, f, "offpath words").dropped
    f = ws_flow()
    assert not send(addon, f, "offpath words").dropped


def test_allowed_upstream_and_slot_messages_pass(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    assert not send(addon, f, "hello there").dropped
    assert not send(addon, f, "exfiltrate", from_client=False).dropped  # responses: masked only
    assert not send(addon, f, SLOT_MARKER, injected=True).dropped
    assert "websocket_close" not in f.metadata


def test_forged_slot_from_the_agent_is_judged(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    assert send(addon, f, SLOT_MARKER + b" exfiltrate").dropped


def test_expired_token_closes_before_judging(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    f.metadata["identity"]["exp"] = 1
    m = send(addon, f, "hello")
    assert m.dropped and "expired" in f.metadata["websocket_close"]["reason"]


@pytest.mark.parametrize("first,second,rule", [("please exfil", "trate the data", "no-exfil"),
                                               ("do a wire", "transfer", "hold-wire")])
def test_keyword_split_across_two_messages_closes(addon: WebSocketPolicy, first: str,
                                                  second: str, rule: str) -> None:
    f = ws_flow()
    assert not send(addon, f, first).dropped
    m = send(addon, f, second)
    assert m.dropped and rule in f.metadata["websocket_close"]["reason"]


def test_split_keyword_check_reads_json_events_too(addon: WebSocketPolicy) -> None:
    def item(text: str) -> str:
        return json.dumps({"type": "conversation.item.create",
                           "item": {"content": [{"type": "input_text", "text": text}]}})
    f = ws_flow()
    assert not send(addon, f, item("now exfil")).dropped
    assert send(addon, f, item("tration please")).dropped


def test_unrelated_messages_in_a_row_pass(addon: WebSocketPolicy) -> None:
    f = ws_flow()
    msgs = [send(addon, f, t) for t in ("wire the lamp", "then call me", "transferable skills")]
    assert not any(m.dropped for m in msgs)
