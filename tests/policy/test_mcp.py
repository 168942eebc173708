"""MCP in the policy engine, alone: the `mcp` match key, `fields` on params.arguments,
batches judged message by message, the never-callable analysis behind tools/list
filtering, and pin holds."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from addons.config.schema import ConfigError, Where
from addons.egress.config import parse_upstreams
from addons.mcp.config import McpConfig, PinningConfig
from addons.policy.config import parse_policies
from addons.policy.engine import BodyUnavailable, Decision, RequestFacts, evaluate
from addons.policy.mcp import may_call, pin_decision, tool_facts

UPSTREAMS = parse_upstreams([
    ({"name": "tools", "hosts": ["tools.example.com"], "dialect": "mcp"},
     Where("r.yaml", "upstreams[0]")),
    ({"name": "crm", "hosts": ["crm.example.com"], "dialect": "mcp"},
     Where("r.yaml", "upstreams[1]")),
])


def policies(text: str):
    items = yaml.safe_load(text)
    return parse_policies([(r, Where("r.yaml", f"policies[{i}]")) for i, r in enumerate(items)],
                          UPSTREAMS)


RULES = policies("""
- name: interns-never-email
  match: {groups: [interns], mcp: {tool: "send_*"}}
  action: block
- name: no-drop-prod
  match: {mcp: {tool: run_sql}, fields: {params.arguments.db: prod}}
  action: block
- name: big-refunds
  match: {upstream: crm, mcp: {tool: refund}, fields: {params.arguments.amount: "> 100"}}
  action: approve
  approvers: [finance]
- name: secrets-resources
  match: {mcp: {resource: "file:///etc/*"}}
  action: block
- name: no-admin-prompts
  match: {mcp: {method: prompts/get, prompt: "admin*"}}
  action: block
- name: ops-only-deploy
  match: {not: {groups: [ops]}, mcp: {tool: deploy}}
  action: block
""")


def msg(method: str, id: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


def facts(body: Any, groups: tuple[str, ...] = (), upstream: str = "tools") -> RequestFacts:
    return RequestFacts("POST", f"{upstream}.example.com", "/mcp", upstream=upstream,
                        identity={"sub": "a", "groups": list(groups)},
                        body=json.dumps(body).encode(), content_type="application/json",
                        dialect="mcp")


def decide(body: Any, **kw: Any) -> Decision:
    return evaluate(RULES, facts(body, **kw))


def test_tool_globs_identity_and_arguments() -> None:
    call = msg("tools/call", name="send_email", arguments={"to": "x"})
    assert decide(call, groups=("interns",)).rule == "interns-never-email"
    assert decide(call, groups=("devs",)).action == "allow"
    assert decide(msg("tools/call", name="run_sql", arguments={"db": "prod"})).rule \
        == "no-drop-prod"
    assert decide(msg("tools/call", name="run_sql", arguments={"db": "dev"})).action \
        == "allow"
    d = decide(msg("tools/call", name="refund", arguments={"amount": 500}), upstream="crm")
    assert d.action == "approve" and d.approval is not None
    assert decide(msg("tools/call", name="refund", arguments={"amount": 5}),
                  upstream="crm").action == "allow"
    # same tool name on another server: the rule names its server
    assert decide(msg("tools/call", name="refund", arguments={"amount": 500})).action \
        == "allow"
    assert decide(msg("resources/read", uri="file:///etc/passwd")).rule == "secrets-resources"
    assert decide(msg("resources/read", uri="file:///home/x")).action == "allow"
    assert decide(msg("prompts/get", name="admin-reset")).rule == "no-admin-prompts"
    # tool names are case-sensitive, as servers treat them
    assert decide(msg("tools/call", name="Send_email"), groups=("interns",)).action == "allow"


def test_mcp_key_holds_only_on_mcp_upstreams() -> None:
    f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions",
                     body=json.dumps(msg("tools/call", name="send_email")).encode(),
                     identity={"sub": "a", "groups": ["interns"]},
                     content_type="application/json", dialect="openai")
    assert evaluate(RULES, f).action == "allow"


def test_batch_each_message_judged_strictest_wins() -> None:
    ok = msg("tools/call", 1, name="add", arguments={})
    held = msg("tools/call", 2, name="refund", arguments={"amount": 500})
    blocked = msg("tools/call", 3, name="send_email", arguments={})
    d = decide([ok, held], upstream="crm")
    assert d.action == "approve" and "batch message 1 (tools/call)" in d.message
    d = decide([ok, held, blocked], groups=("interns",), upstream="crm")
    assert d.action == "block" and d.rule == "interns-never-email"
    assert "batch message 2" in d.message
    # a blocked call hidden after a notification is found too
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}
    assert decide([note, blocked], groups=("interns",)).action == "block"


def test_invalid_message_is_refused_not_guessed() -> None:
    with pytest.raises(BodyUnavailable):
        decide({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 7}},
               groups=("interns",))


def test_may_call() -> None:
    def can(tool: str, groups: tuple[str, ...] = (), upstream: str = "tools") -> bool:
        f = tool_facts(tool, host=f"{upstream}.example.com", path="/mcp", upstream=upstream,
                       identity={"sub": "a", "groups": list(groups)})
        return may_call(RULES, f)
    assert not can("send_email", ("interns",))  # blocked whatever the arguments
    assert can("send_email", ("devs",))
    assert can("run_sql")  # blocked only for some arguments
    assert can("refund", upstream="crm")  # held, maybe
    assert can("deploy", ("ops",))
    assert can("deploy", ("devs",))  # `not` is treated as depending on the call: listed
    assert may_call(RULES, tool_facts("send_email", host="t", path="/mcp", upstream="tools",
                                      identity={"sub": "a", "groups": ["interns"]}),
                    observe_only=True)
    # an allow rule before the block wins
    rules = policies("""
- name: allow-alice
  match: {sub: alice, mcp: {tool: send_email}}
  action: allow
- name: nobody-else
  match: {mcp: {tool: send_email}}
  action: block
""")
    assert may_call(rules, tool_facts("send_email", host="t", path="/mcp", upstream="tools",
                                      identity={"sub": "alice"}))
    assert not may_call(rules, tool_facts("send_email", host="t", path="/mcp",
                                          upstream="tools", identity={"sub": "bob"}))


class _Rules:
    def __init__(self, on_change: str) -> None:
        approvers = ("security",) if on_change == "approve" else ()
        self.mcp = McpConfig(pinning=PinningConfig(on_change=on_change, approvers=approvers))


def test_pin_decision() -> None:
    allow = Decision("allow", "<default>")
    meta = {"pin": "changed", "tool": "lookup"}
    d = pin_decision(_Rules("approve"), meta, allow)
    assert d.action == "approve" and d.rule == "mcp.pin:lookup"
    assert d.to_metadata()["approval"]["groups"] == ["security"]
    block = Decision("block", "r")
    assert pin_decision(_Rules("approve"), meta, block) is block
    assert pin_decision(_Rules("block"), meta, allow) is allow
    assert pin_decision(_Rules("approve"), {"pin": "same"}, allow) is allow
    # in a batch the hold names the changed tool, not the batch's first message
    batch = {"pin": "changed", "tool": "add", "pin_changed": ["lookup"]}
    assert pin_decision(_Rules("approve"), batch, allow).rule == "mcp.pin:lookup"


@pytest.mark.parametrize("match,key", [
    ({"mcp": {}}, "policies[0].match.mcp"),
    ({"mcp": {"tools": ["x"]}}, "policies[0].match.mcp.tools"),
    ({"mcp": {"tool": []}}, "policies[0].match.mcp.tool"),
])
def test_config_errors(match: dict, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_policies([({"name": "r", "match": match, "action": "block"},
                         Where("r.yaml", "policies[0]"))], UPSTREAMS)
    assert ei.value.key == key
