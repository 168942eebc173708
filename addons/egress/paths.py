"""Default-deny paths per dialect. Pure; no mitmproxy import.

Each LLM dialect (and `mcp`) declares the endpoints it knows; anything else on such an
upstream is refused unless the upstream's `paths:` globs allow it (webhook/generic
upstreams: any path unless `paths:` is given). Paths are decoded once and must be
unambiguous before matching: an encoded slash, backslash or NUL, a double-encoded `%`, a
dot segment (`..`, `%2e%2e`) or an empty segment is refused outright, so what we match is
what the upstream routes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

_OPENAI = (
    "chat/completions", "chat/completions/*", "chat/completions/*/messages", "completions",
    "responses", "responses/*", "responses/*/input_items", "responses/*/cancel",
    "responses/input_tokens", "embeddings", "models", "models/*", "files", "files/*",
    "files/*/content", "batches", "batches/*", "batches/*/cancel", "audio/speech",
    "audio/transcriptions", "audio/translations", "images/generations", "images/edits",
    "images/variations", "moderations", "uploads", "uploads/*", "uploads/*/parts",
    "uploads/*/complete", "uploads/*/cancel", "realtime",
)
# Azure OpenAI: the model (deployment) is named in the path.
_AZURE_DEPLOYMENT = (
    "chat/completions", "completions", "embeddings", "audio/speech", "audio/transcriptions",
    "audio/translations", "images/generations", "images/edits",
)
_ANTHROPIC = (
    "messages", "messages/count_tokens", "messages/batches", "messages/batches/*",
    "messages/batches/*/results", "messages/batches/*/cancel", "models", "models/*",
    "complete", "files", "files/*", "files/*/content",
)

DIALECT_PATHS: dict[str, tuple[str, ...]] = {
    "openai": tuple(f"{prefix}/{e}" for prefix in ("/v1", "/openai/v1", "/openai")
                    for e in _OPENAI)
    + tuple(f"/openai/deployments/*/{e}" for e in _AZURE_DEPLOYMENT),
    "anthropic": tuple(f"/v1/{e}" for e in _ANTHROPIC),
    # MCP Streamable HTTP: one endpoint (POST messages, GET the server's stream, DELETE the
    # session); a server that serves it elsewhere (or the older HTTP+SSE transport's
    # /sse and /messages) names its paths in the upstream's `paths:`.
    "mcp": ("/mcp",),
}

_BAD_ESCAPES = re.compile(r"%(2f|5c|00|25)", re.IGNORECASE)


class PathError(ValueError):
    """The path is ambiguous or malformed; refuse it rather than guess."""


def normalise(raw_path: str) -> str:
    """The decoded path (no query) to match, or PathError for an ambiguous one."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise PathError("path must start with '/'")
    if _BAD_ESCAPES.search(path):
        raise PathError("encoded '/', '\\', NUL or '%' in the path")
    if "%" in path and re.search(r"%(?![0-9A-Fa-f]{2})", path):
        raise PathError("malformed percent-escape in the path")
    decoded = unquote(path, errors="strict")
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in decoded):
        raise PathError("control character, space or backslash in the path")
    segments = decoded.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise PathError("dot segment in the path")
    if any(s == "" for s in segments[:-1]):
        raise PathError("empty segment ('//') in the path")
    return decoded


@lru_cache(maxsize=512)
def _glob_re(glob: str) -> re.Pattern[str]:
    """`*` matches within one segment, `**` across segments."""
    out = []
    for part in re.split(r"(\*\*|\*)", glob):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + "/?")


def path_allowed(dialect: str, extra: tuple[str, ...] | None, path: str) -> bool:
    """Is the normalised `path` an endpoint of `dialect` or allowed by `extra` globs?"""
    known = DIALECT_PATHS.get(dialect)
    if known is None and extra is None:
        return True  # webhook/generic: any path unless `paths:` restricts it
    globs = (*(known or ()), *(extra or ()))
    return any(_glob_re(g).fullmatch(path) for g in globs)
