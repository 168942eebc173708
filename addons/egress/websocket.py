"""WebSockets to upstreams that opted in (`websocket: true`): per-message checks.

The upgrade itself is refused by `upstreams` unless the upstream opts in. For an opted-in
upstream, every message re-checks the caller's token expiry (identity's
`flow.metadata["identity"]["exp"]`): a tunnel outliving its token is closed, not trusted on.
Messages are counted per direction for the recorder (`flow.metadata["websocket"]`), and a
message above `agentgate_max_body_bytes` closes the connection.

Frames are not masked or policed message by message yet, so the rules loader only accepts
`websocket: true` together with `mask: false` (an explicit "frames pass unmasked").
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.frame.guard import guarded

log = logging.getLogger("agentgate.websocket")

STEP = "websocket"


class WebSockets:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def _opted_in(self, flow: http.HTTPFlow) -> bool:
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        return bool(up is not None and up.websocket)

    @guarded(STEP, skip_answered=False)
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if not self._opted_in(flow):  # upstreams refuses the upgrade; never trust that alone
            log.warning("agentgate: WebSocket to an upstream without websocket: true; closing")
            flow.kill()
            return
        flow.metadata["websocket"] = {"to_server": 0, "to_client": 0, "bytes": 0}

    @guarded(STEP, skip_answered=False)
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        ident = flow.metadata.get("identity")
        exp = ident.get("exp") if isinstance(ident, dict) else None
        if isinstance(exp, (int, float)) and time.time() >= exp:
            log.warning("agentgate: token expired during a WebSocket; closing it")
            message.drop()
            flow.kill()
            return
        if len(message.content) > ctx.options.agentgate_max_body_bytes:
            log.warning("agentgate: WebSocket message above the body limit; closing")
            message.drop()
            flow.kill()
            return
        stats = flow.metadata.setdefault("websocket", {"to_server": 0, "to_client": 0,
                                                       "bytes": 0})
        stats["to_server" if message.from_client else "to_client"] += 1
        stats["bytes"] += len(message.content)
