"""Error bodies in the caller's API dialect, so SDKs raise readable exceptions.

Pure functions (no mitmproxy): the OpenAI SDK reads `error.message`, the Anthropic SDK
reads `error.message` under a `type: error` envelope, an MCP client reads a JSON-RPC error
object (`error.code`, `error.message`, `error.data`). Every refusal carries the code and,
where a rule decided, the rule's name. For `mcp` the body made here has `id: null`: the
mcp addon (addons/mcp/addon.py, McpAnswers) gives it the ids of the refused requests and
the HTTP status an MCP client reads a JSON-RPC answer from.
"""

from __future__ import annotations

import json

# status -> (openai error type, anthropic error type), for every status the gateway emits
# (its own refusals and the mitmproxy-made errors edge.py rewrites). The SDKs pick their
# exception class by status; the type is what a caller's error handling reads next.
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    407: ("authentication_error", "authentication_error"),
    408: ("timeout_error", "timeout_error"),
    409: ("invalid_request_error", "invalid_request_error"),
    410: ("not_found_error", "not_found_error"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    421: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    431: ("invalid_request_error", "request_too_large"),
    500: ("api_error", "api_error"),
    501: ("invalid_request_error", "invalid_request_error"),
    502: ("api_error", "api_error"),
    503: ("api_error", "overloaded_error"),
    504: ("timeout_error", "timeout_error"),
    505: ("invalid_request_error", "invalid_request_error"),
}


def error_types(status: int) -> tuple[str, str]:
    """(openai type, anthropic type); a status not listed still gets a client or server
    type by its class, never a 4xx typed as the provider's own failure."""
    if status in _TYPES:
        return _TYPES[status]
    if 400 <= status < 500:
        return ("invalid_request_error", "invalid_request_error")
    return ("api_error", "api_error")


def guess_dialect(host: str, path: str) -> str:
    """Dialect for a request no upstream claims, from the well-known API paths."""
    p = path.split("?", 1)[0]
    if p.endswith("/messages") or "anthropic" in host:
        return "anthropic"
    if p.endswith(("/chat/completions", "/responses", "/completions", "/embeddings")) \
            or "openai" in host:
        return "openai"
    return "generic"


# JSON-RPC error codes for the gateway's refusals of MCP traffic: JSON-RPC's own for a body
# that is not JSON-RPC, -32001 (the range JSON-RPC leaves to servers) for a refusal by rule
# or step, -32603 for the gateway's own failure.
JSONRPC_PARSE_ERROR = -32700
JSONRPC_INVALID_REQUEST = -32600
JSONRPC_REFUSED = -32001
JSONRPC_INTERNAL = -32603


_JSONRPC_CODES = {"invalid_json": JSONRPC_PARSE_ERROR, "invalid_jsonrpc": JSONRPC_INVALID_REQUEST,
                  "invalid_params": -32602, "mcp_method_refused": -32601,
                  "gateway_error": JSONRPC_INTERNAL}


def jsonrpc_code(status: int, code: str) -> int:
    return _JSONRPC_CODES.get(code, JSONRPC_REFUSED)


def error_payload(dialect: str, status: int, message: str, code: str,
                  rule: str | None = None) -> dict:
    oa_type, an_type = error_types(status)
    text = f"agentgate: {message}" + (f" (rule: {rule})" if rule else "")
    if dialect == "mcp":
        data: dict = {"code": code, "status": status}
        if rule:
            data["rule"] = rule
        return {"jsonrpc": "2.0", "id": None,
                "error": {"code": jsonrpc_code(status, code), "message": text, "data": data}}
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
