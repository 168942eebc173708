"""Policy for MCP beyond one request's decision: tools/list filtering and pin holds.

- `tools/list` is filtered per caller: a tool is removed when the rules would block every
  call to it whatever its arguments (`may_call`). The Mcp addon runs the filter on each
  server message, JSON or streamed (ToolListFilter registers it as a transform).
- A `tools/call` of a tool whose pinned definition changed is held for approval when
  `mcp.pinning.on_change: approve` (`pin_decision`; with `block` the mcp addon has
  refused it already).

`may_call` is exact where it can be and errs towards listing: walking the rules in
order, a rule whose conditions on who, where and which tool all hold decides when it has
no other condition (block: never callable); a rule that also tests the arguments (fields,
prompt, body size, time, not/any) is one some call might meet: an allow or approve rule of
that kind makes the tool callable, a block rule of that kind blocks some calls only.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from addons.config.holder import RulesHolder
from addons.mcp.addon import Mcp
from addons.policy.engine import (
    ApprovalSpec,
    BodyUnavailable,
    Decision,
    PolicySet,
    RequestFacts,
)

log = logging.getLogger("agentgate.policy")

# match keys that do not depend on a call's arguments
_FIXED_KEYS = frozenset({"sub", "iss", "groups", "roles", "authenticated", "upstream",
                         "host", "method", "path", "mcp"})


def tool_facts(tool: str, *, host: str, path: str, upstream: str | None,
               identity: dict[str, Any] | None) -> RequestFacts:
    msg = {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {"name": tool}}
    return RequestFacts("POST", host, path, upstream=upstream, identity=identity,
                        body=b"", json_loader=lambda: msg, batch=False, dialect="mcp",
                        content_type="application/json")


# per rule set (the rules in force change on reload only): for each deciding rule, its
# checks that do not depend on the arguments, and whether it has others
_PLANS: dict[int, tuple[PolicySet, list[tuple[str, tuple[Any, ...], bool]]]] = {}


def _plan(policies: PolicySet) -> list[tuple[str, tuple[Any, ...], bool]]:
    got = _PLANS.get(id(policies))
    if got is not None and got[0] is policies:
        return got[1]
    plan = []
    for rule in policies.rules:
        if rule.observing:
            continue
        fixed = tuple(c.check for c in rule.match.conditions if c.key in _FIXED_KEYS)
        plan.append((rule.action, fixed, len(fixed) < len(rule.match.conditions)))
    if len(_PLANS) >= 8:
        _PLANS.clear()
    _PLANS[id(policies)] = (policies, plan)
    return plan


def may_call(policies: PolicySet, facts: RequestFacts, *, observe_only: bool = False
             ) -> bool:
    """Could any call of the tool in `facts` be let through (allowed or approved)?"""
    if observe_only or policies.observe_only:
        return True
    for action, fixed, depends in _plan(policies):
        try:
            for check in fixed:
                if not check(facts):
                    break
            else:
                fixed = ()
        except BodyUnavailable:
            return True
        if fixed:
            continue  # some condition on who, where or which tool does not hold
        if depends:
            if action in ("allow", "approve"):
                return True
            continue
        return action != "block"
    return True


def pin_decision(rules: Any, meta: Any, decision: Decision) -> Decision:
    """The decision for a call of a changed tool with `on_change: approve`: held (unless
    a rule blocks it anyway), named after the pin."""
    cfg = getattr(rules, "mcp", None)
    if not isinstance(meta, dict) or meta.get("pin") != "changed" or cfg is None:
        return decision
    pinning = cfg.pinning
    if pinning.on_change != "approve" or decision.enforced_action == "block":
        return decision
    changed = meta.get("pin_changed")
    # the changed tool (in a batch, the first changed one; not the batch's first message)
    tool = changed[0] if isinstance(changed, list) and changed else meta.get("tool") or "?"
    return Decision("approve", f"mcp.pin:{tool}",
                    f"tool {tool!r} changed since it was pinned; held for approval",
                    False, ApprovalSpec(groups=pinning.approvers, timeout=pinning.timeout),
                    decision.observations)


class ToolListFilter:
    """Registers the per-caller tools/list filter with the Mcp addon."""

    def __init__(self, holder: RulesHolder, mcp: Mcp, observe_only: Any = None) -> None:
        self.holder = holder
        self.observe_only = observe_only  # the Policy addon (its observe-only option)
        mcp.transforms.append(self.filter)

    def filter(self, flow: http.HTTPFlow, method: str | None, obj: dict[str, Any]
               ) -> dict[str, Any] | None:
        if method != "tools/list":
            return obj
        result = obj.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return obj
        rules = self.holder.rules
        if rules is None:
            raise RuntimeError("no rules loaded")
        up = flow.metadata.get("upstream")
        ident = flow.metadata.get("identity")
        observe = bool(getattr(self.observe_only, "observe_only", False))
        kept, removed = [], []
        for tool in result["tools"]:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                removed.append("?")
                continue
            facts = tool_facts(name, host=flow.request.host, path=flow.request.path,
                               upstream=up.get("name") if isinstance(up, dict) else None,
                               identity=ident if isinstance(ident, dict) else None)
            if may_call(rules.policies, facts, observe_only=observe):
                kept.append(tool)
            else:
                removed.append(name)
        if not removed:
            return obj
        meta = flow.metadata.setdefault("mcp", {})
        meta["filtered"] = removed[:200]
        log.info("agentgate: mcp: tools/list for %s: %d tool(s) the caller may never call "
                 "removed", up.get("name") if isinstance(up, dict) else "?", len(removed))
        return {**obj, "result": {**result, "tools": kept}}
