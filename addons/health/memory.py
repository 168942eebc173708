"""The gateway's memory per flow: decoded bodies let go as soon as they are dead, finished
flows collected by body bytes, and the start-up heap kept out of the collector's way.

The last addon on the chain (addons/gateway.py puts it there):
- `request`, after every other request hook (policy, masking, approval, credentials): the
  flow's decoded request (frame/decode.py's cache: decoded text, parsed JSON and, when
  masking rewrote the body, the original bytes) is released before the upstream round trip,
  which takes seconds with a real model. Every step that reads the request body has read
  it by then; one that reads it later (McpAnswers on a refusal) decodes again.
- `response` / `error`, after the recorder: the decoded response is released too, and the
  flow's body bytes are counted; every COLLECT_BYTES of finished flows' bodies, one full
  cyclic collection runs (scheduled on the event loop right after the hook).
- `response` / `error` in mitmdump: the request body itself goes too (`request.content`
  reads None after). It went upstream long before, every step read it (the recorder's
  snapshot, taken at `response`, holds it, and mitmproxy's own `save` wrote the flow
  before the script's hooks ran). A finished flow lives on until a collection finds it
  (below): a long conversation's turn re-sends ~120 KB of history, and up to COLLECT_BYTES
  of them waited dead. Multi-turn bench, interleaved with the code before, 4 rounds: the
  gateway's peak 123.8 -> 117.6 MiB, same CPU. Kept where the process keeps flows to show
  them (mitmweb, mitmproxy's console: a `view` addon) and with
  `--set agentgate_keep_request_bodies=true` (a script loaded after the gateway that reads
  request bodies after the response).
- `running`: the objects that exist once the suite is loaded (modules, compiled patterns,
  rules) are moved out of the collector's generations (`gc.freeze`), so that a full
  collection only walks what was allocated since (a few ms, not tens); and the shared
  libraries' pages that loading faulted in are dropped (frame/pages.py): ~15 MiB of the
  process's peak (hyperscan's compiler, cryptography's and OpenSSL's start-up code) that
  serving flows never reads again; what it does read comes back once. They are dropped
  again at the first collection (the first flows' certificate and TLS code) and with each
  periodic heap trim (health/addon.py).
- after each full collection, the heap's free memory goes back to the OS
  (`malloc_trim`, in a worker thread): the bodies the collection freed leave holes that
  glibc keeps resident, and as a conversation's bodies grow turn by turn a freed body is
  too small for the next one, so the holes add up instead of being reused.

Why the collections: mitmproxy's finished flows die in reference cycles (its HTTP stream
layer keeps bound methods of itself), so a flow and its bodies go back only when the cyclic
GC collects the oldest generation. CPython's own thresholds count container objects, not
bytes: every flow in flight at a young collection is promoted, and the oldest generation
was collected about once per hundred young collections: 120-160 finished flows, each with
its (masked) request and its response, were alive at once at 100 KB c=16 and in the
multi-turn run. Counted in body bytes, 1 KB traffic collects about once per 4,000 flows
(nothing to win there) and 100 KB traffic once per ~40. A full collection walks every
tracked object that is not frozen, which is small in mitmdump (~6k objects, a few ms) but
grows with whatever the process keeps (mitmweb keeps every flow): so the next collection
waits at least COLLECT_SPACING times as long as the last one took (at most ~2 % of a core
spent in these collections, however large the heap).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http

from addons.frame import decode
from addons.frame.guard import guarded
from addons.frame.pages import drop_library_pages
from addons.health.heap import HeapTrimmer

log = logging.getLogger("agentgate.memory")

STEP = "memory"
# Finished flows' body bytes (request + response, as on the wire) between two full
# collections: what dead flows may hold beyond the ones in flight.
COLLECT_BYTES = 8 << 20
# The wait after a collection, in multiples of its own duration.
COLLECT_SPACING = 50


class Memory:
    def __init__(self, collect_bytes: int = COLLECT_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.frozen = 0  # objects gc.freeze moved out of the collector's generations
        self.collect_bytes = collect_bytes
        self.clock = clock
        self.not_before = 0.0  # no collection before this (clock) time
        self.pending = 0  # body bytes of the flows finished since the last collection
        self.scheduled = False
        self.collections = 0
        self.collect_seconds = 0.0
        self.trimmer = HeapTrimmer()
        self.dropped_kib = 0  # library pages dropped since the last `running`
        self.drop_requests = False  # finished flows' request bodies let go (`running`)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "agentgate_keep_request_bodies", bool, False,
            "Keep each finished flow's request body in memory after its response (mitmweb "
            "and mitmproxy's console always keep it, to show it). For a script loaded after "
            "the gateway that reads request bodies after the response; the audit store "
            "has every body either way.")

    # sync on purpose: mitmproxy invokes `running` with invoke_addon_sync on a reload
    def running(self) -> None:
        # On a script reload (running again) the previous freeze is undone first: what it
        # froze and is garbage now (the old addons) is collected, not kept for good.
        gc.unfreeze()
        gc.collect()  # the garbage of loading goes first: what is frozen is never freed
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        # and one (now nearly empty) full collection after: CPython waits for a quarter of
        # the long-lived count of the last full collection to be promoted before the next
        # one, and that count (the whole start-up heap) survives the freeze
        gc.collect()
        self.dropped_kib = drop_library_pages()
        self.drop_requests = not keeps_requests()
        log.debug("agentgate: %d start-up objects frozen out of the cyclic GC, %d KiB of "
                  "library pages dropped", self.frozen, self.dropped_kib)

    # Guarded like every flow hook. skip_answered=False: a refused flow's decoded body is
    # released too.
    @guarded(STEP, skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        decode.release(flow, "request")

    @guarded(STEP, skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    @guarded(STEP, skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        decode.release(flow)
        size = len(flow.request.raw_content or b"")
        if flow.response is not None:
            size += len(flow.response.raw_content or b"")
        if self.drop_requests and flow.websocket is None:
            # (a WebSocket's handshake has no body, and its flow is recorded again at its
            # end: left as it is)
            flow.request.data.content = None
        # Counted as before, the request body included: a dead flow holds more than its
        # bodies (its state, metadata, connection objects), which the collections free.
        self.pending += size
        if self.pending < self.collect_bytes or self.scheduled or \
                self.clock() < self.not_before:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.collect()
            return
        # after the hook: this flow's answer is not held up by the collection
        self.scheduled = True
        loop.call_soon(self.collect)

    def collect(self) -> None:
        """One full cyclic collection (the finished flows' bodies go back)."""
        self.scheduled = False
        self.pending = 0
        t0 = self.clock()
        gc.collect()
        took = self.clock() - t0
        self.not_before = t0 + took * (1 + COLLECT_SPACING)
        self.collect_seconds += took
        self.collections += 1
        if self.collections == 1:
            # once more after the first flows: what their one-time work faulted in (the
            # first connections' certificates and TLS set-up, lazy imports) is not read
            # again either (-5 to -7 MiB of the multi-turn peak; ~6 ms, once)
            self.dropped_kib += drop_library_pages()
        if self.trimmer.available:
            try:
                asyncio.get_running_loop().run_in_executor(None, self._trim)
            except RuntimeError:
                self._trim()

    def _trim(self) -> None:
        try:
            self.trimmer.trim()
        except Exception:  # noqa: BLE001 - housekeeping: log, keep serving
            log.exception("agentgate: returning free heap memory failed")


def keeps_requests() -> bool:
    """Whether finished flows' request bodies stay: the option says so, or the process
    keeps its flows to show them (a `view` addon: mitmweb, mitmproxy's console)."""
    try:
        opts, master = ctx.options, ctx.master
    except AttributeError:  # no mitmproxy context (unit use): keep them
        return True
    if getattr(opts, "agentgate_keep_request_bodies", False):
        return True
    return master.addons.get("view") is not None
