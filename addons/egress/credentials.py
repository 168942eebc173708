"""Strip every credential the agent sent and inject the upstream's real one.

Runs last on the request path, after identity, policy, masking and approval, so nothing
before it ever sees the real secret and nothing after it (the upstream) sees the agent's.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate.credentials")

# Headers that carry a caller credential for some API; none of them may pass.
CREDENTIAL_HEADERS = (
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie",
    "x-goog-api-key", "x-auth-token", "x-access-token", "ocp-apim-subscription-key",
    "x-amz-security-token",
)
CREDENTIAL_QUERY_KEYS = {"key", "api_key", "apikey", "access_token", "token"}


def strip_credentials(headers: http.Headers, extra: str | None = None) -> list[str]:
    removed = []
    for name in (*CREDENTIAL_HEADERS, *( (extra,) if extra else ())):
        if name in headers:
            del headers[name]
            removed.append(name)
    return removed


REDACTED = "[injected by agentgate]"


def scrub_injected(flow: http.HTTPFlow) -> None:
    """Replace the injected real credential on the flow once it has been sent.

    mitmproxy serialises `flow.request` to the wire after the request hooks; from the first
    hook after that (responseheaders / error) the value is only a liability: mitmdump's
    dumper, `-w` flow files, mitmweb and our recorder all read the flow object.
    """
    meta = flow.metadata.get("upstream")
    header = meta.get("injected") if isinstance(meta, dict) else None
    if header and flow.request.headers.get(header, REDACTED) != REDACTED:
        flow.request.headers[header] = REDACTED


class CredentialScrubber:
    """Runs first in the addon chain so no default addon (dumper, save, view) sees the
    secret on the response/error path; see scrub_injected."""

    name = "agentgate_scrubber"

    @guarded("credentials", skip_answered=False)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        scrub_injected(flow)

    @guarded("credentials", skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        scrub_injected(flow)

    @guarded("credentials", skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        scrub_injected(flow)


class Credentials:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.scrubber = CredentialScrubber()

    def load(self, loader) -> None:
        # mitmproxy runs addons in chain order and scripts come after the built-in addons,
        # so the scrubber is put at the very front of the chain explicitly.
        master = getattr(ctx, "master", None)
        addons = getattr(master, "addons", None)
        if addons is None or addons.get(CredentialScrubber.name) is not None:
            return
        addons.register(self.scrubber)
        addons.chain.insert(0, self.scrubber)

    def done(self) -> None:
        master = getattr(ctx, "master", None)
        if master is not None and master.addons.get(CredentialScrubber.name) is self.scrubber:
            master.addons.remove(self.scrubber)

    @guarded("credentials")
    def request(self, flow: http.HTTPFlow) -> None:
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        if up is None:
            # Upstreams resolved this flow earlier; losing it means something is wrong.
            refuse(flow, 503, "no upstream resolved for this request", "no_upstream",
                   "credentials")
            return
        removed = strip_credentials(flow.request.headers,
                                    up.credential.header if up.credential else None)
        query = flow.request.query
        if any(k.lower() in CREDENTIAL_QUERY_KEYS for k in query):
            kept = [(k, v) for k, v in parse_qsl(flow.request.url.partition("?")[2],
                                                 keep_blank_values=True)
                    if k.lower() not in CREDENTIAL_QUERY_KEYS]
            flow.request.path = flow.request.path.split("?", 1)[0] + (
                "?" + urlencode(kept) if kept else "")
            removed.append("query")
        if up.credential is not None:
            value = up.credential.resolve()
            if value is None:
                refuse(flow, 503, f"gateway has no credential for upstream {up.name!r} "
                       f"({up.credential.describe()} is not set)", "credential_missing",
                       "credentials")
                return
            flow.request.headers[up.credential.header] = value
        meta["stripped"] = removed
        meta["injected"] = up.credential.header if up.credential else ""
        if up.forward_to is not None:
            scheme, host, port = up.forward_to
            meta["forwarded_to"] = f"{scheme}://{host}:{port}"
            # Route to a different address (local model server, test stand-in).
            flow.request.scheme, flow.request.host, flow.request.port = scheme, host, port
