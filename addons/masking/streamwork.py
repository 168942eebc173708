"""Masking a streamed (SSE) chunk off the event loop when it is heavy work.

mitmproxy calls a response's stream function synchronously, on the event loop, inside the
HTTP layer (`HttpStream.state_stream_response_body`), once per chunk from the upstream and
once with b"" at the end. Masking an event happens there when the event is complete: one
event dense with values (a hostile upstream's e-mail addresses, up to
masking.max_body_bytes) held the loop — every other flow of the gateway — for as long as
it took (seconds for MBs).

Here the layer's handler is wrapped (version-pinned, checked against its source): before
the layer handles a chunk (or the end), it asks the stream function
(`agentgate_offload(data)`: masking's, or the mcp addon's own when masking does not wrap
it) whether the work for it is heavy; if so the layer yields a
blocking hook, `StreamWorkHook`, and the masking addon runs the work in a worker thread
(frame/offload: the identity's share) while the loop serves others. A blocking hook pauses
this stream's layer exactly as mitmproxy's own hooks do: later chunks queue in order, so
event order and the stream's hold-back are unchanged; the layer then calls the stream
function with the same chunk, which hands back what the thread computed (or re-raises its
error: the stream aborts, fail closed). While the thread works, reading from the upstream
connection is paused (the chunks queued meanwhile would not be bounded otherwise).
Anything unexpected (another mitmproxy version, no handler for the hook, no upstream
transport to pause) leaves the work where it was: on the loop, same bytes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mitmproxy import version as mitmproxy_version
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layers

from addons.frame.offload import StreamJob

log = logging.getLogger("agentgate.masking")

PINNED_MITMPROXY = "12.2."
_PINS = ('chunks = self.flow.response.stream(event.data)',
         'chunks = self.flow.response.stream(b"")',
         'yield from self.send_response(already_streamed=True)')
_MARK = "_agentgate_stream_work"


@dataclass
class StreamWorkHook(commands.StartHook):
    """A streamed chunk whose masking is heavy: run `job` off the loop (the stream's layer
    waits; the loop does not)."""

    job: StreamJob
    name = "agentgate_stream_work"


def _wrapped(original: Any) -> Any:
    def state_stream_response_body(self: Any, event: Any) -> Iterator[Any]:
        resp = self.flow.response
        offload = getattr(resp.stream, "agentgate_offload", None) if resp else None
        if offload is not None:
            if isinstance(event, http_layers.ResponseData):
                job = offload(event.data)
            elif isinstance(event, http_layers.ResponseEndOfMessage):
                job = offload(b"")
            else:
                job = None
            if job is not None:
                yield StreamWorkHook(job)
        yield from original(self, event)

    setattr(state_stream_response_body, _MARK, original)
    return state_stream_response_body


def install() -> bool:
    """Wrap the HTTP layer's streamed-response handler (once). False (and mitmproxy's own
    handler left in place: the work stays on the loop) when the version or source is not
    the one this was written against."""
    cls = http_layers.HttpStream
    current = cls.state_stream_response_body
    if getattr(current, _MARK, None) is not None:
        return True
    if not mitmproxy_version.VERSION.startswith(PINNED_MITMPROXY):
        log.warning("masking: streamed chunks stay on the event loop (mitmproxy %s, "
                    "written for %sx)", mitmproxy_version.VERSION, PINNED_MITMPROXY)
        return False
    try:
        src = inspect.getsource(current)
    except (OSError, TypeError):
        src = ""
    if not all(p in src for p in _PINS):
        log.warning("masking: streamed chunks stay on the event loop (the HTTP layer's "
                    "stream handler is not the one expected)")
        return False
    cls.state_stream_response_body = _wrapped(current)
    return True


def upstream_transport(flow: Any, proxyserver: Any) -> Any:
    """The asyncio transport of the flow's upstream connection (to pause reading), or
    None."""
    conns = getattr(proxyserver, "connections", None)
    if not isinstance(conns, dict):
        return None
    for handler in list(conns.values()):
        if getattr(handler, "client", None) is flow.client_conn:
            io = getattr(handler, "transports", {}).get(flow.server_conn)
            writer = getattr(io, "writer", None)
            return getattr(writer, "transport", None)
    return None
