"""The agent's session, named in the request body, known before policy and masking.

The session groups an agent's flows: the recorder stores it (`session_id`), masking keys
its placeholder map by it (placeholders stable within a session, restore per session).
The recorder's `requestheaders` names it from a session header (`recorder.session_headers`,
e.g. `X-Agent-Session`), else from the client connection (`conn-<id>`), and notes where
from in `flow.metadata["recorder"]["session_source"]`. Agents such as LangGraph say which
thread a call belongs to in the JSON body instead (`metadata.thread_id`, …:
`recorder.session_body_keys`); this addon's `request` hook reads it there. It runs right
after identity, before policy and masking (every addon's `requestheaders` has run by
then), so masking sees the same session as the record. A header always wins over the body.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from mitmproxy import http

from addons.config.holder import RulesHolder
from addons.frame import decode, flowbody
from addons.frame.guard import guarded
from addons.recording.config import RecorderConfig

_SESSION_RE = re.compile(r"[^A-Za-z0-9._:@/+=#-]")
MAX_SESSION_LEN = 128
MAX_BODY = 1 << 20  # bodies above this are not searched for a session id


def clean_session(value: Any) -> str | None:
    """A session id safe for comments, logs and SQL output (bounded, printable)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = _SESSION_RE.sub("_", str(value).strip())[:MAX_SESSION_LEN]
    return text or None


def body_session(doc: Any, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(key, value) of the first dotted key present in a JSON document."""
    for key in keys:
        cur = doc
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        value = clean_session(cur)
        if value:
            return key, value
    return None


@functools.lru_cache(maxsize=8)
def _first_segments(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """The distinct first segments of the dotted keys, encoded: what a body must contain
    to name a session. The default keys all start with `metadata`: one scan of the body
    instead of four (~50 us each at 100 KB). Few key sets ever exist (one per rules
    load), so the cache stays tiny."""
    return tuple(dict.fromkeys(k.split(".", 1)[0].encode() for k in keys))


class Sessions:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def keys(self) -> tuple[str, ...]:
        rules = self.holder.rules
        cfg = getattr(rules, "recorder", None) if rules is not None else None
        return (cfg if isinstance(cfg, RecorderConfig) else RecorderConfig()).session_body_keys

    # skip_answered=False: a flow refused earlier (bad token …) is recorded under its
    # thread's session too.
    @guarded("sessions", skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        keys = self.keys()
        info = flow.metadata.get("recorder")
        if not isinstance(info, dict) or info.get("session_source") != "connection":
            return  # a header named it (or no recorder ran): the body does not override
        req = flow.request
        raw = req.raw_content
        if not keys or not raw or len(raw) > MAX_BODY:
            return
        # both headers from one pass over the fields (each headers.get is a scan of its own)
        encoding, ctype = decode.coding_and_type(req.headers)
        if "json" not in ctype.lower():
            return
        if not encoding and b"\0" not in raw[:4] and \
                not raw.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")) and \
                not any(seg in raw for seg in _first_segments(keys)):
            return  # cheap pre-check (UTF-8 only): parse only bodies that mention a key
        try:
            # parsed once, shared with policy; a compressed body only while it decodes to
            # at most MAX_BODY too (this runs on the event loop: ~20 KB of gzip may
            # decode to MBs, decode.MAX_RATIO)
            doc = flowbody.parsed_json(flow, max_bytes=MAX_BODY) \
                if req.headers.get("content-encoding") else flowbody.parsed_json(flow)
        except ValueError:
            return  # undecodable (or too large) content-encoding: not ours to judge
        found = body_session(doc, keys)
        if found:
            info["session_source"] = f"body:{found[0]}"
            flow.metadata["session"] = found[1]
