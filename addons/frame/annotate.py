"""Summarise what agentgate decided about a flow in `flow.comment` for mitmweb."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from addons.frame.guard import guarded


def summary(meta: dict[str, Any]) -> str:
    parts: list[str] = []
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
    dec = meta.get("decision")
    if isinstance(dec, dict) and dec.get("action"):
        parts.append(f"decision: {dec['action']}"
                     + (f" by rule {dec['rule']}" if dec.get("rule") else "")
                     + (" (observed only, not enforced)" if dec.get("observed") else ""))
    appr = meta.get("approval")
    if isinstance(appr, dict) and appr.get("state"):
        parts.append(f"approval: {appr['state']}"
                     + (f" ({appr['id']})" if appr.get("id") else ""))
    findings = meta.get("findings")
    if isinstance(findings, dict) and findings:
        parts.append("masked: " + ", ".join(
            f"{k}x{v.get('count', v) if isinstance(v, dict) else v}"
            for k, v in sorted(findings.items())))
    ref = meta.get("refusal")
    if isinstance(ref, dict) and ref.get("code"):
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
