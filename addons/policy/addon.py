"""The policy addon: one decision per request, named after the rule that made it.

Thin adapter from a flow to addons/policy/engine.py. The decision goes to
`flow.metadata["decision"]` = {action, rule, message, observed[, approval][, observations]}
for the approval addon, the annotations and the recorder. A `block` decision is answered
here with a 403 in the caller's dialect naming the rule; an `approve` decision is held by
the approval addon later in the chain (it holds exactly when `decision["approval"]` is set).
Replayed flows are evaluated like live ones.

Prompt searches are incremental per session (identity subject and session id): a turn
that re-sends the history searches only past the part of the text the session's last
request shared with it, with exactly the answer of a full search (engine.SearchHistory);
the strings and tool names of the messages it sent before, the skeleton of its text and
the literal prefilters are taken from that request too, so a turn costs what its new
messages cost. Reloaded rules start every session afresh.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.frame import decode
from addons.frame.guard import guarded, refuse
from addons.frame.offload import Busy, run_heavy
from addons.frame.principal import flow_session_key
from addons.policy.engine import (
    BodyUnavailable,
    PolicySet,
    RequestFacts,
    SearchHistories,
    evaluate,
)
from addons.policy.mcp import pin_decision

log = logging.getLogger("agentgate.policy")

# Bodies from this many bytes on (and compressed ones, and batches) are evaluated in a
# worker thread, so the event loop keeps serving other flows meanwhile — unless the body
# continues its session's last one and adds at most INLINE_NEW_CHARS to it: then what is
# left to do is proportional to that new part (the parse memo, the session's history),
# and handing it to a thread costs more than it (ThreadPoolExecutor.submit and the GIL
# hand-over: ~13 % of the gateway's time in the last turns of the multi-turn bench).
THREAD_MIN_BYTES = 64 * 1024
INLINE_NEW_CHARS = 16 * 1024
# ... and the body is at most this long (a memcmp and a decode of the whole body remain)
INLINE_MAX_BYTES = 1024 * 1024


def facts_from_flow(flow: http.HTTPFlow, now: float | None = None,
                    max_bytes: int = decode.MAX_BYTES,
                    memo_key: str | None = None) -> RequestFacts:
    """Facts of a flow; the body is read through the one decoder (addons/frame/decode.py),
    with masking's size limit, so policy reads exactly what masking reads. `memo_key`:
    the session (session_key), whose previous body's parse the JSON parse may continue
    (decode.parse_memo: the same value as a full parse)."""
    up = flow.metadata.get("upstream")
    ident = flow.metadata.get("identity")

    def body() -> decode.Body:
        if flow.request.raw_content is None:
            raise BodyUnavailable("the request body is streamed and cannot be inspected")
        got = decode.request_body(flow, max_bytes=max_bytes, memo_key=memo_key)
        return got if got is not None else decode.Body(b"")

    return RequestFacts(
        # request.host is where the request really goes (CONNECT target / absolute URL),
        # not the Host header the agent chose
        flow.request.method, flow.request.host, flow.request.path,
        upstream=up.get("name") if isinstance(up, dict) else None,
        identity=ident if isinstance(ident, dict) else None,
        body=body, now=now, dialect=up.get("dialect") if isinstance(up, dict) else None)


# the agent's session, as masking keys it (frame/principal.flow_session_key)
session_key = flow_session_key


def continues(facts: RequestFacts, key: str, size: int) -> bool:
    """Does this (uncompressed) body of `size` bytes, at most INLINE_MAX_BYTES, continue
    its session's last one, adding at most INLINE_NEW_CHARS, with the session's history in
    place? Decoding an uncompressed body is a copy; the comparison one memcmp. Anything
    unusual: no (a worker thread evaluates it, and meets the same error there)."""
    h = facts.history
    if size > INLINE_MAX_BYTES or h is None or h.last("prompt_text") is None:
        return False
    try:
        text = facts.decoded.text
    except Exception:  # noqa: BLE001 - evaluated (and refused) in the thread instead
        return False
    new = decode.memo_new_chars(text, key)
    return new is not None and new <= INLINE_NEW_CHARS


class Policy:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.observe_only = False
        # per session: its last prompt texts and which searches found nothing in them
        # (in memory, bounded in bytes), so a turn that re-sends the history searches
        # only what is new (engine.SearchHistory)
        self.histories = SearchHistories()
        self._rules: object = None  # the rules the histories were made under

    def load(self, loader) -> None:
        loader.add_option(
            "agentgate_observe_only", bool, False,
            "Rollout mode: record block/approve decisions as observed and let flows pass "
            "(same as a `- mode: observe_only` item in the policies).")

    def configure(self, updated: set[str]) -> None:
        if "agentgate_observe_only" in updated:
            self.observe_only = ctx.options.agentgate_observe_only
            if self.observe_only:
                log.warning("agentgate: policy observe-only mode: block and approve "
                            "decisions are recorded, not enforced")

    @guarded("policy")
    async def request(self, flow: http.HTTPFlow) -> None:
        rules = self.holder.rules
        if rules is None:
            raise RuntimeError("no rules loaded")  # guarded: refuses the flow
        policies: PolicySet = rules.policies
        if rules is not self._rules:
            # new rules: nothing a session learnt under the old ones is carried over (its
            # searches were of other patterns; the body limit may differ)
            self.histories, self._rules = SearchHistories(), rules
        cfg = getattr(rules, "masking", None)
        limit = getattr(cfg, "max_body_bytes", decode.MAX_BYTES)
        if not isinstance(limit, int) or limit <= 0:
            limit = decode.MAX_BYTES
        key = session_key(flow)
        facts = facts_from_flow(flow, max_bytes=limit, memo_key=key)
        facts.history = self.histories.get(key)
        req = flow.request
        try:
            size = len(req.raw_content or b"")
            if decode.coding_and_type(req.headers)[0] or \
                    facts.path.rstrip("/").endswith(("/files", "/batches", "/uploads")) or \
                    size >= THREAD_MIN_BYTES and not continues(facts, key, size):
                # decoding (up to the caps), the skeleton of a large text and a batch of
                # up to 100,000 requests run in a worker thread: other flows keep moving
                decision = await run_heavy(flow, evaluate, policies, facts,
                                           observe_only=self.observe_only)
            else:
                decision = evaluate(policies, facts, observe_only=self.observe_only)
        except Busy as e:  # this identity's share of worker threads is full
            refuse(flow, e.status, e.message, "busy", "policy", headers={"retry-after": "1"})
            return
        except BodyUnavailable as e:
            flow.metadata["decision"] = {"action": "block", "rule": "<uninspectable>",
                                         "message": str(e), "observed": False}
            refuse(flow, 400, f"request refused: {e}", "policy_uninspectable", "policy")
            return
        decision = pin_decision(rules, flow.metadata.get("mcp"), decision)
        flow.metadata["decision"] = decision.to_metadata()
        if decision.observed or decision.action != "allow":
            # names only: rule, action, method, host; never body, token or identity values
            log.info("agentgate: policy %s%s by rule %s: %s %s", decision.action,
                     " (observed, not enforced)" if decision.observed else "", decision.rule,
                     flow.request.method, flow.request.pretty_host)
        if decision.action == "block" and not decision.observed:
            refuse(flow, 403, decision.message, "policy_blocked", "policy", rule=decision.rule)
