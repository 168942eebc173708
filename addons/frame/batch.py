"""Requests carried inside other requests: batch uploads and inline batches. Pure.

A batch is a way to send many model requests past a gateway that only looks at the
envelope: OpenAI's Batch API uploads a JSONL file (`POST /v1/files`, multipart, field
`purpose=batch`) whose every line `{custom_id, method, url, body}` is a request the provider
runs later; Anthropic's `POST /v1/messages/batches` carries `requests[].params` inline.
`batch_requests` yields each of them as the request it describes, so policy (and masking)
can judge every one as if it had been sent on its own. A batch that cannot be read is an
error (DecodeError), never "no requests".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from addons.frame.decode import Body, DecodeError, loads_strict, parse_content_type

MAX_LINES = 100_000  # OpenAI's limit is 50,000 requests per batch file


@dataclass(frozen=True)
class BatchRequest:
    index: int          # 1-based line / request number
    custom_id: str      # as given by the agent, bounded and printable
    method: str
    url: str            # path (and query) the provider would call
    body: Any           # the JSON body of that request

    @property
    def label(self) -> str:
        # the number only: custom_id is agent text, and the label reaches the agent's error
        # and the audit record unmasked
        return f"batch request {self.index}"


@dataclass(frozen=True)
class Part:
    name: str | None
    filename: str | None
    content_type: str
    data: bytes


def _clean(value: Any, limit: int = 64) -> str:
    s = value if isinstance(value, str) else "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in s[:limit])


def multipart_parts(data: bytes, boundary: str) -> list[Part]:
    """The parts of a multipart/form-data body; DecodeError when it is malformed."""
    if not boundary or len(boundary) > 200:
        raise DecodeError("multipart body without a usable boundary", 400)
    delim = b"--" + boundary.encode("latin-1", "replace")
    chunks = data.split(delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise DecodeError("malformed multipart body", 400)
    parts: list[Part] = []
    for chunk in chunks[1:-1]:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        else:
            raise DecodeError("malformed multipart body", 400)
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = chunk.find(sep)
            if end >= 0:
                head, body = chunk[:end], chunk[end + len(sep):]
                break
        else:
            raise DecodeError("malformed multipart body", 400)
        if body.endswith(b"\r\n"):
            body = body[:-2]
        elif body.endswith(b"\n"):
            body = body[:-1]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").splitlines():
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        cte = headers.get("content-transfer-encoding", "").lower()
        if cte not in ("", "7bit", "8bit", "binary"):
            raise DecodeError(f"multipart content-transfer-encoding {cte[:20]!r}", 415)
        _, disp = parse_content_type(headers.get("content-disposition", ""))
        parts.append(Part(disp.get("name"), disp.get("filename"),
                          headers.get("content-type", ""), body))
    return parts


def jsonl_requests(file: Body, *, default_url: str = "") -> Iterator[BatchRequest]:
    """Every line of an OpenAI batch input file as the request it describes."""
    n = 0
    for raw_line in file.text.splitlines():
        if not raw_line.strip():
            continue
        n += 1
        if n > MAX_LINES:
            raise DecodeError(f"batch file with more than {MAX_LINES} requests", 413)
        try:
            line = loads_strict(raw_line)
        except DecodeError as e:
            raise DecodeError(f"batch line {n}: {e.reason}", 400) from None
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            raise DecodeError(f"batch line {n}: not a request object with a JSON body", 400)
        url = line.get("url", default_url)
        if not isinstance(url, str) or not url:
            raise DecodeError(f"batch line {n}: no url", 400)
        method = line.get("method", "POST")
        yield BatchRequest(n, _clean(line.get("custom_id")),
                           method.upper() if isinstance(method, str) else "POST",
                           url, line["body"])


def batch_requests(method: str, path: str, body: Body) -> list[BatchRequest] | None:
    """The requests a batch carries, or None when this request is not a batch.

    `path` is the normalised URL path. Raises DecodeError when it is a batch that cannot be
    read completely (the caller refuses it: an unread line would pass unchecked)."""
    if method.upper() != "POST":
        return None
    p = path.rstrip("/")
    if p.endswith("/files") and body.mime.startswith("multipart/"):
        parts = multipart_parts(body.data, body.params.get("boundary", ""))
        purposes = {_clean(x.data.decode("utf-8", "replace").strip().lower(), 40)
                    for x in parts if x.name == "purpose"}
        if "batch" not in purposes:
            return None
        files = [x for x in parts if x.name == "file" or x.filename is not None]
        if not files:
            raise DecodeError("batch upload without a file", 400)
        out: list[BatchRequest] = []
        for f in files:
            mime, params = parse_content_type(f.content_type)
            out.extend(jsonl_requests(Body(f.data, mime, params)))
            if len(out) > MAX_LINES:
                raise DecodeError(f"batch file with more than {MAX_LINES} requests", 413)
        return out
    if p.endswith("/batches") and body.data:
        doc = body.json
        if not isinstance(doc, dict) or "requests" not in doc:
            return None  # OpenAI's create names an uploaded file: matched by path rules
        reqs = doc["requests"]
        if not isinstance(reqs, list):
            raise DecodeError("batch requests is not a list", 400)
        if len(reqs) > MAX_LINES:
            raise DecodeError(f"batch with more than {MAX_LINES} requests", 413)
        # Anthropic Message Batches: each params is a Messages API request
        url = p[: -len("/batches")] if p.endswith("/messages/batches") else "/v1/messages"
        out = []
        for i, r in enumerate(reqs, 1):
            if not isinstance(r, dict) or not isinstance(r.get("params"), dict):
                raise DecodeError(f"batch request {i}: no params object", 400)
            out.append(BatchRequest(i, _clean(r.get("custom_id")), "POST", url, r["params"]))
        return out
    return None


def dumps_body(body: Any) -> bytes:
    """A batch request's body as bytes (for steps that want bytes, e.g. body_size)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
