"""The request body of a flow, decoded and parsed as JSON once, shared by every addon.

A thin view on addons/frame/decode.py (the one bounded, strict decoder): the decoded body
and its JSON value are cached beside the flow (a weak reference) and keyed by the
`raw_content` object, so after an addon rewrites the body (masking) the next call decodes
the new body instead of returning a stale value. Callers must not mutate the returned
object. No mitmproxy import: it only reads `flow.request`.
"""

from __future__ import annotations

from typing import Any

from addons.frame import decode


def request_body(flow: Any, *, max_bytes: int = decode.MAX_BYTES) -> bytes | None:
    """The decoded request body (bounded). Raises decode.DecodeError (a ValueError) on an
    unsupported, corrupt or oversized content-encoding, or a streamed body."""
    body = decode.request_body(flow, max_bytes=max_bytes)
    return None if body is None else body.data


def parse_json(body: bytes | None) -> Any:
    """The JSON value of a body, or None if it is empty or not JSON (BOMs and UTF-16/32
    understood, exactly as every step reads it)."""
    if not body:
        return None
    try:
        return decode.Body(body).json
    except decode.DecodeError:
        return None


def parsed_json(flow: Any, *, max_bytes: int = decode.MAX_BYTES) -> Any:
    """The request's JSON body (None when not JSON), parsed at most once per body.
    Raises decode.DecodeError when it cannot be decoded or is malformed declared JSON."""
    body = decode.request_body(flow, max_bytes=max_bytes)
    return None if body is None else body.json
