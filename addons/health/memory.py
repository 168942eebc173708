"""The gateway's memory per flow: decoded bodies let go as soon as they are dead, and the
start-up heap kept out of the cyclic garbage collector's way.

The last addon on the chain (addons/gateway.py puts it there):
- `request`, after every other request hook (policy, masking, approval, credentials): the
  flow's decoded request (frame/decode.py's cache: decoded text, parsed JSON and, when
  masking rewrote the body, the original bytes) is released before the upstream round trip,
  which takes seconds with a real model. Every step that reads the request body has read
  it by then; one that reads it later (McpAnswers on a refusal) decodes again.
- `response` / `error`, after the recorder: the decoded response is released too.
- `running`: the objects that exist once the suite is loaded (modules, compiled patterns,
  rules) are moved out of the collector's generations (`gc.freeze`). Why: mitmproxy's
  finished flows die in reference cycles (its HTTP stream layer keeps bound methods of
  itself), so a flow's bodies go back only when the cyclic GC collects the oldest
  generation; CPython runs that collection only when the objects promoted since the last
  one exceed a quarter of the long-lived ones, and the suite's start-up heap is hundreds of
  thousands of them: flows that lived through two young collections (every flow in flight
  at c=16) piled up between full collections, each holding its bodies.
  Frozen, the start-up heap no longer counts nor is traversed, so full collections come at
  the collector's own thresholds and cost only what was allocated since.
"""

from __future__ import annotations

import gc
import logging

from mitmproxy import http

from addons.frame import decode
from addons.frame.guard import guarded

log = logging.getLogger("agentgate.memory")

STEP = "memory"


class Memory:
    def __init__(self) -> None:
        self.frozen = 0  # objects gc.freeze moved out of the collector's generations

    # sync on purpose: mitmproxy invokes `running` with invoke_addon_sync on a reload
    def running(self) -> None:
        gc.collect()  # the garbage of loading goes first: what is frozen is never freed
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        log.debug("agentgate: %d start-up objects frozen out of the cyclic GC", self.frozen)

    # Guarded like every flow hook. skip_answered=False: a refused flow's decoded body is
    # released too.
    @guarded(STEP, skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        decode.release(flow, "request")

    @guarded(STEP, skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        decode.release(flow)

    @guarded(STEP, skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        decode.release(flow)
