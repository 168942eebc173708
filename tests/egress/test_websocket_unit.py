"""WebSockets addon: per-message token expiry, counting, size cap, opt-in re-check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.egress.limits import EdgeLimits
from addons.egress.websocket import WebSockets

RULES = """
upstreams:
  - {name: live, hosts: [ws.example.com], dialect: webhook, websocket: true, mask: false}
  - {name: plain, hosts: [api.example.com], dialect: webhook}
"""


@pytest.fixture
def holder(tmp_path: Path) -> RulesHolder:
    (tmp_path / "r.yaml").write_text(RULES)
    return RulesHolder(load_rules(tmp_path))


def ws_flow(upstream: str, exp: float | None):
    f = tflow.twebsocketflow()
    f.metadata["upstream"] = {"name": upstream, "dialect": "webhook"}
    if exp is not None:
        f.metadata["identity"] = {"sub": "a", "exp": exp}
    return f


def test_messages_counted_while_token_valid(holder: RulesHolder) -> None:
    f = ws_flow("live", time.time() + 300)
    with taddons.context(EdgeLimits()):
        WebSockets(holder).websocket_message(f)
    assert f.metadata["websocket"]["to_server"] + f.metadata["websocket"]["to_client"] == 1
    assert f.live or f.error is None


def test_expired_token_closes_the_websocket(holder: RulesHolder) -> None:
    f = ws_flow("live", time.time() - 1)
    with taddons.context(EdgeLimits()):
        WebSockets(holder).websocket_message(f)
    assert f.websocket.messages[-1].dropped
    assert f.error is not None  # killed


def test_websocket_to_upstream_without_opt_in_is_killed(holder: RulesHolder) -> None:
    f = ws_flow("plain", None)
    with taddons.context(EdgeLimits()):
        WebSockets(holder).websocket_start(f)
    assert f.error is not None


def test_websocket_with_masking_is_accepted(tmp_path: Path) -> None:
    # frames are masked and policed message by message (masking/policy websocket addons)
    (tmp_path / "r.yaml").write_text(
        "upstreams:\n  - {name: x, hosts: [a.example.com], websocket: true}\n")
    up = load_rules(tmp_path).upstream_named("x")
    assert up is not None and up.websocket and up.mask
