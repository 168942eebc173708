"""Base64 payloads in MCP results made readable to the masking concern.

Pure (no mitmproxy). An MCP server returns resource contents as `text` or as a base64
`blob` (resources/read, an embedded `resource` in a tools/call result or a prompts/get
message), and media as base64 `data` (`image` / `audio` content). Masking reads text: PII
a server sends as a blob of text (whatever mimeType it claims) reached the agent and its LLM
unmasked. `readable()` rewrites every blob or media payload that decodes to UTF-8 text into
its `text` form — `{uri, mimeType, blob}` becomes `{uri, mimeType, text}` and an image or
audio item becomes a `text` item, both shapes the MCP schema allows — so masking sees it like
any other text. A payload that is not valid base64 is replaced by a note (a lenient client
could still decode what the gateway could not read). Binary payloads (not UTF-8: images,
PDFs, archives) stay as they are: masking does not read into them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

# a payload decodes to text when it is UTF-8 without NUL (a PNG, JPEG, PDF or zip header
# is not UTF-8; UTF-16 text has NULs and stays binary). Other control characters do not
# make it binary: a tool's log with colours (ESC [31m) is text a client shows, and one
# \x01 put before the PII let a whole text blob pass unread. UTF-8 without NUL read as
# text is lossless (its UTF-8 encoding is the payload's bytes).
INVALID_NOTE = "[agentgate: a base64 payload that is not valid base64 was removed]"
MAX_DEPTH = 64  # results nest content a few levels deep; bound the walk


class TooDeep(Exception):
    """A result nested deeper than MAX_DEPTH: the caller refuses it (a payload hidden below
    the walk's bound would pass unread)."""


def _text(payload: Any) -> str | None | bool:
    """The payload's text; None when binary; False when it is not valid base64."""
    if not isinstance(payload, str):
        return False
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text


def readable(obj: Any) -> tuple[Any, bool]:
    """(obj with text-like base64 payloads as text, whether anything changed). New
    containers are built only along changed paths; `obj` itself is not modified.
    Raises TooDeep."""
    return _walk(obj, 0)


def _walk(obj: Any, depth: int) -> tuple[Any, bool]:
    if isinstance(obj, (list, dict)) and depth > MAX_DEPTH:
        raise TooDeep(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, list):
        out, changed = [], False
        for v in obj:
            nv, c = _walk(v, depth + 1)
            out.append(nv)
            changed |= c
        return (out, True) if changed else (obj, False)
    if not isinstance(obj, dict):
        return obj, False
    new: dict[str, Any] | None = None
    if "blob" in obj:
        t = _text(obj["blob"])
        if t is not None:
            new = {k: v for k, v in obj.items() if k != "blob"}
            # an item with a `text` too (the schema allows one of them) keeps its text,
            # masked: a client reading the blob first got the blob's text unmasked
            if "text" not in obj:
                new["text"] = INVALID_NOTE if t is False else t
    elif obj.get("type") in ("image", "audio") and "data" in obj:
        t = _text(obj["data"])
        if t is not None:
            new = {"type": "text", "text": INVALID_NOTE if t is False else t}
            if "annotations" in obj:
                new["annotations"] = obj["annotations"]
    base = new if new is not None else obj
    out: dict[str, Any] = {}
    changed = new is not None
    for k, v in base.items():
        nv, c = _walk(v, depth + 1)
        out[k] = nv
        changed |= c
    return (out, True) if changed else (obj, False)
