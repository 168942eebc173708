"""The request body of a flow, decoded and parsed as JSON once, shared by every addon.

Several addons look at the same JSON body (policy, masking, recorder). `parsed_json(flow)`
parses it once and caches the result beside the flow. The cache is keyed by the flow
object (a weak reference: nothing to clean up when the flow is gone) and remembers which
`raw_content` it parsed, so after an addon rewrites the body (masking) the next call
parses the new body instead of returning a stale value. Callers must not mutate the
returned object. No mitmproxy import: it only reads `flow.request`.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

_cache: weakref.WeakKeyDictionary[Any, tuple[bytes | None, Any]] = weakref.WeakKeyDictionary()


def request_body(flow: Any) -> bytes | None:
    """The decoded request body. Raises ValueError on an undecodable content-encoding."""
    return flow.request.content


def parse_json(body: bytes | None) -> Any:
    """The JSON value of a body, or None if it is empty or not JSON."""
    if not body:
        return None
    head = body.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def parsed_json(flow: Any) -> Any:
    """The request's JSON body (None when not JSON), parsed at most once per body."""
    raw = flow.request.raw_content
    hit = _cache.get(flow)
    if hit is not None and hit[0] is raw:
        return hit[1]
    value = parse_json(request_body(flow))
    _cache[flow] = (raw, value)
    return value
