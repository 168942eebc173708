"""Summarise what agentgate decided about a flow in `flow.comment` for mitmweb.

The first line is the decision and its rule ("blocked by rule X", "approval denied by rule
Y (ap-…)", "allow by rule Z"), so that a comment column tells flows apart; identity,
session, upstream, votes and findings follow. Only names and counts: never a value."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from addons.frame.guard import guarded


def headline(meta: dict[str, Any]) -> str:
    """The first line: what was decided and by which rule (a comment column shows it)."""
    dec = meta.get("decision") if isinstance(meta.get("decision"), dict) else {}
    appr = meta.get("approval") if isinstance(meta.get("approval"), dict) else {}
    ref = meta.get("refusal") if isinstance(meta.get("refusal"), dict) else {}
    if appr.get("state"):
        state = appr["state"]
        words = "held for approval" if state == "pending" else f"approval {state}"
        return (f"{words} by rule {appr.get('rule') or dec.get('rule') or '?'}"
                + (f" ({appr['id']})" if appr.get("id") else ""))
    if ref.get("code"):
        if dec.get("action") == "block" and not dec.get("observed"):
            return f"blocked by rule {dec.get('rule') or ref.get('rule') or '?'}"
        return (f"refused {ref.get('status')}: {ref['code']} at {ref.get('step')}"
                + (f" (rule {ref['rule']})" if ref.get("rule") else ""))
    if dec.get("action"):
        return (f"{dec['action']}" + (f" by rule {dec['rule']}" if dec.get("rule") else "")
                + (" (observed only, not enforced)" if dec.get("observed") else ""))
    return ""


def summary(meta: dict[str, Any]) -> str:
    parts: list[str] = []
    first = headline(meta)
    if first:
        parts.append(first)
    appr = meta.get("approval")
    if isinstance(appr, dict) and appr.get("state"):
        if appr.get("reason") and appr["state"] != "pending":
            parts.append(f"outcome: {appr['reason']}")
        for v in appr.get("votes") or []:
            if isinstance(v, dict):
                parts.append(f"{v.get('decision')} by {v.get('sub')} via {v.get('via')}"
                             + (f": {v['reason']}" if v.get("reason") else ""))
    ident = meta.get("identity")
    if isinstance(ident, dict) and ident.get("sub"):
        groups = ",".join(ident.get("groups") or [])
        parts.append(f"identity: {ident['sub']} ({ident.get('iss', '')})"
                     + (f" groups={groups}" if groups else ""))
    if meta.get("session"):
        parts.append(f"session: {meta['session']}")
    up = meta.get("upstream")
    if isinstance(up, dict) and up.get("name"):
        parts.append(f"upstream: {up['name']}")
    findings = meta.get("findings")
    if isinstance(findings, dict) and findings:
        parts.append("masked: " + ", ".join(
            f"{k}x{v.get('count', v) if isinstance(v, dict) else v}"
            for k, v in sorted(findings.items())))
    ref = meta.get("refusal")
    if isinstance(ref, dict) and ref.get("code") and not first.startswith("refused"):
        parts.append(f"refused {ref.get('status')}: {ref['code']} at {ref.get('step')}"
                     + (f" (rule {ref['rule']})" if ref.get("rule") else ""))
    return "\n".join(parts)


class Annotate:
    def _annotate(self, flow: http.HTTPFlow) -> None:
        # The summary holds no secrets by contract: addons put only names and counts there.
        text = summary(flow.metadata)
        if text:
            flow.comment = text
        if flow.metadata.get("findings") and not flow.marked:
            flow.marked = ":lock:"

    @guarded("annotate", skip_answered=False)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            self._annotate(flow)

    @guarded("annotate", skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    @guarded("annotate", skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    @guarded("annotate", skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)
