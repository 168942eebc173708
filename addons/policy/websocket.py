"""Policy on WebSocket messages (agent -> upstream) for upstreams with `websocket: true`.

Each message the agent sends is judged by addons/policy/engine.py exactly like a request
body sent to the upgrade request's upstream, host, method and path, with the identity bound
at the upgrade: keyword/regex rules read its text (every string of a JSON event), field
rules read the JSON event, `models` reads `model` (top level, or `session.model` of a
Realtime `session.update`). Runs before masking, as for HTTP.

- block: the message is not forwarded; the socket is closed on both sides with 1008 and a
  reason naming the rule (and `flow.metadata["decision"]` names it for the record);
- approve: a live socket cannot be held for a reviewer, so it is a block whose reason says
  the rule needs approval (documented in rules/README.md);
- a message the engine cannot read under a rule that needs it (BodyUnavailable): closed
  with 1008 too (fail closed);
- observe-only decisions are recorded in `flow.metadata["websocket_observed"]` and pass.

Messages from the upstream are not policed (as HTTP responses are not); they are masked.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.egress.websocket import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    admissible,
    close_websocket,
    closing,
    is_slot,
)
from addons.frame.guard import guarded
from addons.policy.engine import BodyUnavailable, RequestFacts, evaluate

log = logging.getLogger("agentgate.policy")

STEP = "policy"
THREAD_MIN_BYTES = 64 * 1024
MAX_OBSERVED = 100  # observed decisions kept per socket (the record's metadata stays small)


def message_facts(flow: http.HTTPFlow, content: bytes) -> RequestFacts:
    """Facts of one message: the upgrade request's facts with the message as its body."""
    up = flow.metadata.get("upstream")
    ident = flow.metadata.get("identity")
    is_json = content.lstrip()[:1] in (b"{", b"[")

    def as_json() -> Any:
        try:
            obj = json.loads(content)
        except ValueError:
            return None
        if isinstance(obj, dict) and "model" not in obj:
            sess = obj.get("session")
            if isinstance(sess, dict) and "model" in sess:
                obj = {**obj, "model": sess["model"]}  # Realtime session.update
        return obj

    return RequestFacts(
        flow.request.method, flow.request.host, flow.request.path,
        upstream=up.get("name") if isinstance(up, dict) else None,
        identity=ident if isinstance(ident, dict) else None,
        body=content, content_type="application/json" if is_json else "text/plain",
        json_loader=as_json if is_json else None, batch=False)


class WebSocketPolicy:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    @guarded(STEP, skip_answered=False)
    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if closing(flow) or is_slot(message) or not message.from_client:
            return
        try:
            await self._judge(flow, message)
        except Exception as exc:  # noqa: BLE001 - fail closed: never forward it unjudged
            log.error("agentgate: policy on a WebSocket message failed (%s); closing",
                      type(exc).__name__)
            close_websocket(flow, CLOSE_INTERNAL, "agentgate: message could not be judged")

    async def _judge(self, flow: http.HTTPFlow, message: Any) -> None:
        why = admissible(flow, message)
        if why is not None:
            close_websocket(flow, *why)
            return
        rules = self.holder.rules
        if rules is None:
            raise RuntimeError("no rules loaded")
        observe_only = bool(getattr(ctx.options, "agentgate_observe_only", False))
        facts = message_facts(flow, message.content)
        try:
            if len(message.content) >= THREAD_MIN_BYTES:
                decision = await asyncio.to_thread(evaluate, rules.policies, facts,
                                                   observe_only=observe_only)
            else:
                decision = evaluate(rules.policies, facts, observe_only=observe_only)
        except BodyUnavailable as e:
            flow.metadata["decision"] = {"action": "block", "rule": "<uninspectable>",
                                         "message": str(e), "observed": False}
            close_websocket(flow, CLOSE_POLICY, "agentgate: message cannot be inspected")
            return
        if decision.action == "allow" and not decision.observed:
            return
        log.info("agentgate: policy %s%s by rule %s on a WebSocket message to %s",
                 decision.action, " (observed, not enforced)" if decision.observed else "",
                 decision.rule, flow.request.pretty_host)
        if decision.observed:
            seen = flow.metadata.setdefault("websocket_observed", [])
            if isinstance(seen, list) and len(seen) < MAX_OBSERVED:
                seen.append({"rule": decision.rule, "action": decision.action})
            return
        meta = decision.to_metadata()
        meta.pop("approval", None)  # nothing is held: the socket is closed
        flow.metadata["decision"] = meta
        if decision.action == "approve":
            meta["message"] = "a live WebSocket message cannot be held for approval"
            close_websocket(flow, CLOSE_POLICY,
                            f"agentgate: rule {decision.rule} needs approval, "
                            f"which a live WebSocket cannot wait for")
        else:
            close_websocket(flow, CLOSE_POLICY, f"agentgate: blocked by rule {decision.rule}")
