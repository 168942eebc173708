"""Resolve which declared upstream a request goes to; refuse everything else.

Default-deny egress: a host that no upstream declares gets a 403 at CONNECT time (no TLS
handshake, no upstream connection) or on the request for plain HTTP.
"""

from __future__ import annotations

from mitmproxy import http

from addons.config.holder import RulesHolder
from addons.frame.guard import guarded, refuse


class Upstreams:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def _resolve(self, flow: http.HTTPFlow) -> bool:
        rules = self.holder.rules
        assert rules is not None  # RulesLoader refuses flows before rules exist
        host, port = flow.request.host, flow.request.port
        up = rules.upstream_for(host, port)
        if up is None:
            flow.metadata.pop("upstream", None)
            refuse(flow, 403, f"destination {host}:{port} is not a declared upstream "
                   "(default-deny egress)", "destination_not_allowed", "upstreams")
            return False
        flow.metadata["upstream"] = {"name": up.name, "dialect": up.dialect}
        return True

    @guarded("upstreams")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._resolve(flow)

    @guarded("upstreams")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._resolve(flow)
