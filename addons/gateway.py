"""The addon list mitmdump loads: `mitmdump -s addons/gateway.py`.

Order is the data path (ARCHITECTURE.md): rules -> edge options and limits -> upstreams
(default-deny, paths) -> destinations (pinning, address vetting) -> identity -> sessions ->
mcp (JSON-RPC, pins) -> policy (+ the MCP tools/list filter) -> masking -> approval ->
credentials on the way out; WebSocket messages, mcp and masking (responses) and the
recorder on the way back; refusals on MCP upstreams become JSON-RPC answers just before
the recorder. Addons talk only through `flow.metadata`. The Postgres listeners of the
`databases:` rules (addons/database/) are owned by the last addon and reuse identity's
verifier, the approval store and the recorder.
Two small guards are put on mitmproxy's chain directly, outside the script, while this
module is imported: the pipeline sentinel (refuses all traffic while the pipeline is not
loaded) and the layer guard (closes every connection that is not TLS or HTTP).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import ctx

from addons.approval.addon import Approval
from addons.config.addon import RulesLoader
from addons.config.holder import RulesHolder
from addons.database.addon import Databases
from addons.egress.credentials import Credentials
from addons.egress.destination import Destinations
from addons.egress.edge import EdgeOptions, attach_layer_guard
from addons.egress.limits import EdgeLimits
from addons.egress.upstreams import Upstreams
from addons.egress.websocket import WebSockets
from addons.frame import dispatch, sentinel, typecheck
from addons.frame.annotate import Annotate
from addons.health.addon import Health
from addons.health.memory import Memory
from addons.identity.addon import Identity, state_for
from addons.masking.addon import Masking
from addons.masking.websocket import WebSocketMasking
from addons.mcp.addon import Mcp, McpAnswers
from addons.policy.addon import Policy
from addons.policy.mcp import ToolListFilter
from addons.policy.websocket import WebSocketPolicy
from addons.recording.addon import Recorder
from addons.recording.lake import LakeShipping
from addons.recording.sessions import Sessions


def build(holder: RulesHolder | None = None) -> list[object]:
    holder = holder or RulesHolder()
    masking = Masking(holder)
    mcp = Mcp(holder)
    policy = Policy(holder)
    approval = Approval(holder)
    recorder = Recorder(holder)
    return [
        RulesLoader(holder),
        EdgeOptions(),
        EdgeLimits(),
        Upstreams(holder),
        Destinations(holder),
        Identity(holder),
        Sessions(holder),
        mcp,
        policy,
        ToolListFilter(holder, mcp, policy),
        WebSocketPolicy(holder),
        masking,
        WebSocketMasking(masking),
        approval,
        Credentials(holder),
        WebSockets(holder),
        Annotate(),
        McpAnswers(),
        recorder,
        LakeShipping(holder, recorder),
        Databases(holder, approval, recorder, masking=masking),
        Health(readiness(holder, approval, recorder)),
        # last: lets go of a flow's decoded bodies once every step above has read them
        Memory(),
    ]


def readiness(holder: RulesHolder, approval: Approval, recorder: Recorder
              ) -> dict[str, Callable[[], str | None]]:
    """What /readyz asks (addons/health): each check says why not, or None."""
    def keys() -> str | None:
        missing = [s["issuer"] for s in state_for(holder).store.status() if not s["loaded"]]
        return f"no signing keys yet from {', '.join(missing)}" if missing else None

    return {
        "rules": lambda: None if holder.rules is not None else "no valid rules loaded",
        "identity_keys": keys,
        "approvals": lambda: None if approval.ready
        else "the shared approval store is unreachable or not configured correctly",
        "audit": recorder.unavailable,
    }


def _guard_the_edge() -> None:
    """Put the closed-by-default guards on the master *while this module is imported*.

    If loading the script fails after the import (e.g. mitmproxy raising on an option given
    twice while applying deferred `--set`s), no addon of ours gets `load()`ed and mitmproxy
    runs on as an open proxy. With the sentinel (0 pipelines loaded: refuse every flow) and
    the layer guard already in place, a half-loaded gateway refuses instead."""
    master = getattr(ctx, "master", None)
    if master is not None and hasattr(master, "addons"):
        sentinel.attach(master)
        attach_layer_guard(master)
        # the same event dispatch, cheaper: a hook table per event (frame/dispatch.py)
        dispatch.install()
        # mitmproxy's type check of every message it builds, the same verdicts cheaper
        typecheck.install()


logging.getLogger("agentgate").setLevel(logging.INFO)
_guard_the_edge()
addons = build()
