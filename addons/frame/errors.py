"""Error bodies in the caller's API dialect, so SDKs raise readable exceptions.

Pure functions (no mitmproxy): the OpenAI SDK reads `error.message`, the Anthropic SDK
reads `error.message` under a `type: error` envelope. Every refusal carries the code and,
where a rule decided, the rule's name.
"""

from __future__ import annotations

import json

# status -> (openai error type, anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    407: ("authentication_error", "authentication_error"),
    408: ("timeout_error", "timeout_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    502: ("api_error", "api_error"),
    503: ("api_error", "overloaded_error"),
}


def guess_dialect(host: str, path: str) -> str:
    """Dialect for a request no upstream claims, from the well-known API paths."""
    p = path.split("?", 1)[0]
    if p.endswith("/messages") or "anthropic" in host:
        return "anthropic"
    if p.endswith(("/chat/completions", "/responses", "/completions", "/embeddings")) \
            or "openai" in host:
        return "openai"
    return "generic"


def error_payload(dialect: str, status: int, message: str, code: str,
                  rule: str | None = None) -> dict:
    oa_type, an_type = _TYPES.get(status, ("api_error", "api_error"))
    text = f"agentgate: {message}" + (f" (rule: {rule})" if rule else "")
    if dialect == "anthropic":
        err: dict = {"type": an_type, "message": text, "code": code}
        if rule:
            err["rule"] = rule
        return {"type": "error", "error": err}
    err = {"message": text, "type": oa_type, "param": None, "code": code}
    if rule:
        err["rule"] = rule
    return {"error": err}


def error_body(dialect: str, status: int, message: str, code: str,
               rule: str | None = None) -> bytes:
    return json.dumps(error_payload(dialect, status, message, code, rule)).encode()
