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
- observe-only decisions are recorded in `flow.metadata["websocket_observed"]` and pass;
- a keyword split across messages (`exfil` + `trate`, `wire` + `transfer`): a message the
  rules allow is judged once more with the end of the previous message's text
  (JOIN_TAIL characters) in front of its own, joined directly and with a space.

Messages from the upstream are not policed (as HTTP responses are not); they are masked.
"""

from __future__ import annotations

import logging
import weakref
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
from addons.frame import decode
from addons.frame.guard import guarded
from addons.frame.offload import Busy, run_heavy
from addons.policy.engine import BodyUnavailable, RequestFacts, evaluate

log = logging.getLogger("agentgate.policy")

STEP = "policy"
THREAD_MIN_BYTES = 64 * 1024
MAX_OBSERVED = 100  # observed decisions kept per socket (the record's metadata stays small)
JOIN_TAIL = 256  # characters of the previous message read again in front of the next
# RFC 6455 registry: try again later. The identity's (or the gateway's) heavy-work queue
# is full: the message is not judged, so it is not forwarded (masking/websocket.py closes
# with the same code for the same reason).
CLOSE_TRY_AGAIN = 1013


def message_facts(flow: http.HTTPFlow, content: bytes) -> RequestFacts:
    """Facts of one message: the upgrade request's facts with the message as its body."""
    up = flow.metadata.get("upstream")
    ident = flow.metadata.get("identity")
    is_json = content.lstrip()[:1] in (b"{", b"[")

    def as_json() -> Any:
        try:
            # (bytes: json.loads finds the UTF encoding, as before)
            obj = decode.loads_strict(content)  # type: ignore[arg-type]
        except decode.DecodeError as e:
            if e.reason.startswith("body is not valid JSON"):
                return None  # text after all
            # duplicate keys (parsers disagree on which one wins: the upstream may read the
            # one not judged), a number past a double: unreadable for a rule that needs
            # the event's structure (1008), as the HTTP body is refused
            raise BodyUnavailable(f"cannot read the message: {e.reason}") from None
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


# values that name a JSON event's structure, not its text: left out of the running text
# that is read across messages (every string is still read by the message's own judgement)
STRUCTURE_KEYS = frozenset({"type", "role", "id", "event_id", "item_id", "call_id",
                            "response_id", "previous_item_id", "object", "status"})


def running_text(content: bytes, facts: RequestFacts) -> str:
    """The message's text as it continues the previous one: the text itself, or a JSON
    event's string values in document order (structure values left out)."""
    obj = facts.json if content.lstrip()[:1] in (b"{", b"[") else None
    if obj is None:
        return facts.decoded.text  # not text in its charset: raises, the socket closes
    out: list[str] = []
    _values(obj, out, 0)
    return " ".join(out)


def _values(node: Any, out: list[str], depth: int) -> None:
    if depth > 64:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                if k not in STRUCTURE_KEYS:
                    out.append(v)
            else:
                _values(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                out.append(v)
            else:
                _values(v, out, depth + 1)


def _judge(policies: Any, flow: http.HTTPFlow, content: bytes, tail: str,
           observe_only: bool) -> tuple[Any, str]:
    """(decision, the message's running text). An allowed message is judged again with the
    previous message's tail in front of its running text (a keyword split in two)."""
    facts = message_facts(flow, content)
    decision = evaluate(policies, facts, observe_only=observe_only)
    text = running_text(content, facts)
    if decision.action != "allow" or decision.observed or not tail:
        return decision, text
    for sep in ("", " "):
        joined = message_facts(flow, content)
        # the engine caches the prompt text here (and derives its normalised forms from
        # it): the other facts stay this message's own
        if not hasattr(joined, "_prompt"):
            raise RuntimeError("policy engine has no prompt text cache")  # fail closed
        joined._prompt = tail + sep + text  # noqa: SLF001
        d = evaluate(policies, joined, observe_only=observe_only)
        if d.action != "allow":
            return d, text
    return decision, text


class WebSocketPolicy:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        # per socket: the end of the previous agent message's text (memory only)
        self._tails: weakref.WeakKeyDictionary[http.HTTPFlow, str] = \
            weakref.WeakKeyDictionary()

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
        tail = self._tails.get(flow, "")
        args = (rules.policies, flow, message.content, tail, observe_only)
        try:
            if len(message.content) >= THREAD_MIN_BYTES:
                # in this identity's share of the worker threads (frame/offload.py), not
                # asyncio's executor: one identity's flood of large messages must not take
                # every thread the others' work waits for
                decision, text = await run_heavy(flow, _judge, *args)
            else:
                decision, text = _judge(*args)
        except Busy as e:
            flow.metadata["decision"] = {"action": "block", "rule": "<busy>",
                                         "message": e.message, "observed": False}
            close_websocket(flow, CLOSE_TRY_AGAIN, f"agentgate: {e.message}")
            return
        except BodyUnavailable as e:
            flow.metadata["decision"] = {"action": "block", "rule": "<uninspectable>",
                                         "message": str(e), "observed": False}
            close_websocket(flow, CLOSE_POLICY, "agentgate: message cannot be inspected")
            return
        self._tails[flow] = text[-JOIN_TAIL:]
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
