"""Fail-closed plumbing shared by every addon: refusals and the hook guard.

mitmproxy's addon manager logs an exception raised by a hook and lets the flow go on,
which for a security gateway means "pass unchecked". Every hook of ours is wrapped by
`guarded(step)`: an exception answers the flow with a 502 JSON error naming the step,
and nothing is forwarded.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from addons.frame.errors import error_body, guess_dialect

log = logging.getLogger("agentgate")

REQUEST_HOOKS = {"requestheaders", "request", "http_connect", "http_connect_upstream"}


def dialect_of(flow: http.HTTPFlow) -> str:
    up = flow.metadata.get("upstream")
    if isinstance(up, dict) and up.get("dialect"):
        return up["dialect"]
    return guess_dialect(flow.request.pretty_host, flow.request.path)


def refuse(flow: http.HTTPFlow, status: int, message: str, code: str, step: str,
           rule: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Answer the flow with a JSON error in the caller's dialect; it never goes upstream.

    `message` must never contain a secret or a token: it reaches the agent and the record.
    """
    body = error_body(dialect_of(flow), status, message, code, rule)
    hdrs = {"content-type": "application/json", "x-agentgate-refused": code}
    if headers:
        hdrs.update(headers)
    flow.response = http.Response.make(status, body, hdrs)
    flow.metadata["refusal"] = {"status": status, "code": code, "step": step,
                                "rule": rule or "", "message": message,
                                "at": time.time()}
    flow.marked = ":no_entry:"


def already_answered(flow: Any) -> bool:
    return bool(getattr(flow, "response", None) is not None or getattr(flow, "error", None))


def _fail(step: str, hook: str, flow: Any, exc: BaseException) -> None:
    # Log the type and the hook, not str(exc): an exception text may quote request data.
    log.error("agentgate: %s.%s failed (%s); refusing flow", step, hook, type(exc).__name__,
              exc_info=log.isEnabledFor(logging.DEBUG))
    if not isinstance(flow, http.HTTPFlow):
        kill = getattr(flow, "kill", None)
        if callable(kill):
            kill()
        return
    status = 503 if hook in ("requestheaders", "request", "http_connect") else 502
    try:
        if flow.response is not None and flow.response.stream:
            # Headers may already be on the wire for a streamed body: cut the stream.
            flow.response.stream = _poisoned_stream
        refuse(flow, status, f"internal error in {step} ({hook}); request refused",
               "gateway_error", step)
    except Exception:  # noqa: BLE001 - last resort: never let a flow pass
        log.exception("agentgate: could not build the error response; killing the flow")
        flow.kill()


def _poisoned_stream(data: bytes) -> bytes:
    raise RuntimeError("stream aborted after an addon failure")


def guarded(step: str, *, skip_answered: bool | None = None
            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a hook so that any exception refuses the flow instead of passing it.

    Request-phase hooks also skip flows an earlier addon already answered, unless
    `skip_answered=False` (recording and annotation want to see refused flows too).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        hook = fn.__name__
        skip = hook in REQUEST_HOOKS if skip_answered is None else skip_answered

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(self: Any, flow: Any, *args: Any) -> Any:
                if skip and already_answered(flow):
                    return None
                try:
                    return await fn(self, flow, *args)
                except Exception as exc:  # noqa: BLE001 - fail closed
                    _fail(step, hook, flow, exc)
                    return None
            return awrapper

        @functools.wraps(fn)
        def wrapper(self: Any, flow: Any, *args: Any) -> Any:
            if skip and already_answered(flow):
                return None
            try:
                return fn(self, flow, *args)
            except Exception as exc:  # noqa: BLE001 - fail closed
                _fail(step, hook, flow, exc)
                return None
        return wrapper

    return deco
