"""Probes and graceful drain: what an orchestrator or a load balancer needs of a replica.

- `GET /healthz` (live while the event loop turns) and `GET /readyz` (ready only when the
  rules, the identity keys, the approval store and the audit store are loaded, and not
  draining) on their own small listener: `--set agentgate_health_listen=HOST:PORT` or
  `$AGENTGATE_HEALTH_LISTEN` (default off). Not on the proxy port (every request there is
  a proxied one) nor on the reviewers' listener (that one may be off, or public).
- SIGTERM drains instead of stopping at once: readyz turns 503, the proxy listeners close
  (no new connections; open ones finish what they are doing and get `connection: close`),
  flows in flight get up to `agentgate_drain_seconds` (`$AGENTGATE_DRAIN_SECONDS`, default
  25: below Kubernetes' default 30 s grace period) to finish, then mitmproxy shuts down,
  which flushes the audit store (the recorder's `done`) and cancels holds still waiting;
  the process exits 0. A second SIGTERM (or SIGINT) stops at once.
- Every `agentgate_heap_trim_seconds` (default 10; 0: never) the heap's free memory goes
  back to the OS (heap.py: glibc malloc_trim, in a worker thread), so RSS after a burst of
  large bodies falls back instead of staying at the burst's peak; and so do the shared
  libraries' pages (frame/pages.py), those read only once in a while (a new host's
  certificate) included: what serving reads comes back on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.approval.config import bind_reason, listen_text, parse_listen
from addons.frame.guard import guarded
from addons.frame.pages import drop_library_pages
from addons.health.heap import HeapTrimmer
from addons.health.probes import Check, ProbeServer

log = logging.getLogger("agentgate.health")

LISTEN_ENV = "AGENTGATE_HEALTH_LISTEN"
DRAIN_ENV = "AGENTGATE_DRAIN_SECONDS"
DEFAULT_DRAIN = 25
DEFAULT_HEAP_TRIM = 10  # seconds between malloc_trim calls
STEP = "health"


def _env_drain() -> int:
    text = os.environ.get(DRAIN_ENV, "").strip()
    return int(text) if text.isdigit() else DEFAULT_DRAIN


class Health:
    def __init__(self, checks: dict[str, Check]) -> None:
        self.draining = False
        self.probes = ProbeServer(checks, lambda: self.draining)
        self._inflight: set[str] = set()
        self._listening: tuple[str, int] | None = None
        self._drain_task: asyncio.Task | None = None
        self._start_task: asyncio.Task | None = None  # keeps the listener's start alive
        self.heap = HeapTrimmer()
        self._trim_task: asyncio.Task | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "agentgate_health_listen", str, os.environ.get(LISTEN_ENV, "").strip(),
            "Address of the probe listener (GET /healthz, /readyz), host:port or 'off' "
            f"(default: ${LISTEN_ENV}, else off).")
        loader.add_option(
            "agentgate_drain_seconds", int, _env_drain(),
            "On SIGTERM, how long flows in flight may take to finish before the gateway "
            f"stops (default: ${DRAIN_ENV}, else {DEFAULT_DRAIN}).")
        loader.add_option(
            "agentgate_heap_trim_seconds", int, DEFAULT_HEAP_TRIM,
            "Every this many seconds, give the heap's free memory and the shared "
            "libraries' resident pages back to the OS (glibc malloc_trim, madvise; off "
            "the event loop); 0: never.")

    def configure(self, updated: set[str]) -> None:
        if "agentgate_health_listen" in updated:
            try:
                parse_listen(ctx.options.agentgate_health_listen)
            except ValueError as e:
                raise exceptions.OptionsError(f"agentgate_health_listen: {e}") from None
        if "agentgate_drain_seconds" in updated and ctx.options.agentgate_drain_seconds < 0:
            raise exceptions.OptionsError("agentgate_drain_seconds: must be >= 0")
        if "agentgate_heap_trim_seconds" in updated:
            if ctx.options.agentgate_heap_trim_seconds < 0:
                raise exceptions.OptionsError(
                    "agentgate_heap_trim_seconds: must be >= 0 (seconds; 0: never)")

    # `running` and `done` are sync on purpose: on a script reload mitmproxy invokes them
    # with invoke_addon_sync, which refuses coroutine hooks and aborts the reload.
    def running(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start_task = loop.create_task(self._start())
        if self.heap.available and self._trim_task is None:
            self._trim_task = loop.create_task(self._trim_loop())
        with contextlib.suppress(NotImplementedError, RuntimeError):
            # replaces mitmproxy's own SIGTERM handler (an immediate shutdown)
            loop.add_signal_handler(signal.SIGTERM, self.sigterm)

    async def _start(self) -> None:
        want = parse_listen(ctx.options.agentgate_health_listen)
        if want is None:
            return
        try:
            self._listening = await self.probes.start(*want)
        except OSError as e:
            log.error("agentgate: probe listener cannot listen on %s: %s (set %s or "
                      "agentgate_health_listen)", listen_text(want), bind_reason(e),
                      LISTEN_ENV)
            return
        log.info("agentgate: probes at http://%s/healthz and /readyz",
                 listen_text(self._listening))

    async def _trim_loop(self) -> None:
        # reads the option each round: --set at runtime takes effect within a round
        while True:
            every = ctx.options.agentgate_heap_trim_seconds
            await asyncio.sleep(every if every > 0 else 1)
            if every > 0:
                try:
                    await asyncio.to_thread(self.heap.trim)
                    # and the libraries' pages read since the last round (the first
                    # connections' certificate code, a rules reload's compiler): what
                    # serving reads comes back on first use, once a round
                    await asyncio.to_thread(drop_library_pages)
                except Exception:  # noqa: BLE001 - housekeeping: log, keep serving
                    log.exception("agentgate: returning free heap memory failed")

    def done(self) -> None:
        self.probes.stop()
        if self._trim_task is not None:
            self._trim_task.cancel()
            self._trim_task = None

    # ------------------------------------------------------------ flows in flight
    # Guarded like every flow hook (an exception refuses the flow, never passes it); run for
    # answered flows too: what is in flight is what a drain waits for.
    @guarded(STEP, skip_answered=False)
    def requestheaders(self, f: http.HTTPFlow) -> None:
        self._inflight.add(f.id)

    @guarded(STEP, skip_answered=False)
    def response(self, f: http.HTTPFlow) -> None:
        self._inflight.discard(f.id)
        if self.draining and f.response is not None and f.request.http_version.startswith(
                "HTTP/1"):
            # the client's next request opens a new connection: to another replica
            f.response.headers["connection"] = "close"

    @guarded(STEP, skip_answered=False)
    def error(self, f: http.HTTPFlow) -> None:
        self._inflight.discard(f.id)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------ drain
    def sigterm(self) -> None:
        if self._drain_task is not None:
            log.warning("agentgate: second SIGTERM: stopping now (%d flows in flight)",
                        self.inflight)
            ctx.master.shutdown()
            return
        self._drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        self.draining = True
        bound = ctx.options.agentgate_drain_seconds
        log.info("agentgate: SIGTERM: draining — not ready, no new connections, up to %ds "
                 "for %d flow(s) in flight", bound, self.inflight)
        ctx.options.update(server=False)  # closes the proxy listeners, not open connections
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._inflight:
            log.warning("agentgate: drain bound (%ds) reached with %d flow(s) in flight: "
                        "they are cut", bound, self.inflight)
        else:
            log.info("agentgate: drained; stopping (the audit store is flushed on the way out)")
        ctx.master.shutdown()
