"""Strict JSON-RPC 2.0 as MCP uses it: parse, validate and correlate messages. Pure.

A message is a request (method + id), a notification (method, no id), a response (id +
result) or an error (id + error). Anything else, and anything a lenient parser would
guess at (a `jsonrpc` other than "2.0", a null or boolean or fractional id, `result` and
`error` together, unknown top-level members, `params` that is not an object for the
methods MCP defines), is refused: what the gateway judged must be exactly what the server
reads. A batch (a JSON array) is judged message by message.

Error codes are JSON-RPC's own (-32700 parse error, -32600 invalid request, -32601
method not found, -32602 invalid params, -32603 internal error) plus REFUSED (-32001,
in the range JSON-RPC leaves to servers) for a message the gateway's rules refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REFUSED = -32001

# What an MCP client may send (besides notifications/* and responses to the server's own
# requests); anything else is refused unless `mcp.unknown_methods: allow`.
CLIENT_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
    "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
})
# Requests a server sends to the client that ask the client (its model or its user) for
# something: refused unless the rules allow them.
SAMPLING = "sampling/createMessage"
ELICITATION = "elicitation/create"

MAX_BATCH = 1000
_KEYS = {
    "request": {"jsonrpc", "id", "method", "params"},
    "notification": {"jsonrpc", "method", "params"},
    "response": {"jsonrpc", "id", "result"},
    "error": {"jsonrpc", "id", "error"},
}


class JsonRpcError(ValueError):
    """A message that is not valid JSON-RPC / MCP. `id` is the message's id when it has a
    usable one (the error answer carries it), else None."""

    def __init__(self, code: int, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def _is_id(v: Any) -> bool:
    return (isinstance(v, str) and len(v) <= 256) or \
        (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63)


@dataclass(frozen=True)
class Message:
    kind: str  # request | notification | response | error
    id: str | int | None
    method: str | None
    params: Any
    raw: dict[str, Any]

    @property
    def is_request(self) -> bool:
        return self.kind == "request"

    @property
    def tool(self) -> str | None:
        """The tool a `tools/call` calls."""
        if self.method == "tools/call" and isinstance(self.params, dict):
            return self.params.get("name")
        return None

    @property
    def uri(self) -> str | None:
        """The resource a `resources/read` (or subscribe) names, or whose template
        arguments a `completion/complete` completes (a rule on a resource holds there too:
        completions list the values behind it)."""
        if self.method and self.method.startswith("resources/") and \
                isinstance(self.params, dict) and isinstance(self.params.get("uri"), str):
            return self.params["uri"]
        return self._ref("ref/resource", "uri")

    @property
    def prompt(self) -> str | None:
        """The prompt a `prompts/get` gets, or whose arguments a `completion/complete`
        completes."""
        if self.method == "prompts/get" and isinstance(self.params, dict):
            return self.params.get("name")
        return self._ref("ref/prompt", "name")

    def _ref(self, kind: str, key: str) -> str | None:
        if self.method != "completion/complete" or not isinstance(self.params, dict):
            return None
        ref = self.params.get("ref")
        if isinstance(ref, dict) and ref.get("type") == kind and isinstance(ref.get(key), str):
            return ref[key]
        return None

    def names(self) -> dict[str, Any]:
        """Names only (never argument or result values): what metadata may carry. Of a
        resource URI only its scheme and authority: its path or query may hold a value
        (`crm://customers/jane@example.com`), and metadata is stored and shown unmasked
        (the masked request body keeps the whole URI)."""
        return {"method": self.method, "tool": _cut(self.tool), "uri": uri_origin(self.uri),
                "prompt": _cut(self.prompt), "id": self.id, "kind": self.kind}


def _cut(name: Any) -> Any:
    return name[:200] if isinstance(name, str) else name


def uri_origin(uri: str | None) -> str | None:
    if uri is None:
        return None
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri.partition(":")[0][:40] + ":"
    return f"{scheme[:40]}://{rest.split('/', 1)[0].split('?', 1)[0].rpartition('@')[2][:200]}"


def parse_message(obj: Any) -> Message:
    """One JSON-RPC message. Raises JsonRpcError."""
    if not isinstance(obj, dict):
        raise JsonRpcError(INVALID_REQUEST, "a JSON-RPC message must be an object")
    mid = obj.get("id")
    usable_id = mid if _is_id(mid) else None
    if obj.get("jsonrpc") != "2.0":
        raise JsonRpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"', usable_id)
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method or len(method) > 256:
            raise JsonRpcError(INVALID_REQUEST, "method must be a non-empty string",
                               usable_id)
        kind = "request" if "id" in obj else "notification"
    elif "result" in obj and "error" not in obj:
        kind, method = "response", None
    elif "error" in obj and "result" not in obj:
        kind, method = "error", None
    else:
        raise JsonRpcError(INVALID_REQUEST,
                           "a message needs a method, or exactly one of result and error",
                           usable_id)
    extra = set(obj) - _KEYS[kind]
    if extra:
        raise JsonRpcError(INVALID_REQUEST, f"unexpected member {sorted(extra)[0]!r}",
                           usable_id)
    if "id" in obj and not _is_id(mid) and not (kind == "error" and mid is None):
        raise JsonRpcError(INVALID_REQUEST, "id must be a string or an integer")
    params = obj.get("params")
    if kind == "error":
        err = obj["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), int) or \
                isinstance(err.get("code"), bool) or not isinstance(err.get("message"), str):
            raise JsonRpcError(INVALID_REQUEST, "error must have an integer code and a "
                               "string message", usable_id)
    if "params" in obj and not isinstance(params, dict | list):
        raise JsonRpcError(INVALID_REQUEST, "params must be an object or an array",
                           usable_id)
    msg = Message(kind, mid if "id" in obj else None, method, params, obj)
    _check_params(msg)
    return msg


def _check_params(msg: Message) -> None:
    """The members the rules look at must be what they claim: a tool name that is not a
    string, or arguments that are not an object, would be judged as absent and read by the
    server as something else."""
    m, p = msg.method, msg.params
    if m is None:
        return
    if m.startswith(("tools/", "resources/", "prompts/", "completion/", "logging/",
                     "sampling/", "elicitation/", "notifications/")) or m == "initialize":
        if p is not None and not isinstance(p, dict):
            raise JsonRpcError(INVALID_PARAMS, f"params of {m} must be an object", msg.id)
    if m == "tools/call":
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            raise JsonRpcError(INVALID_PARAMS, "tools/call needs params.name (a string)",
                               msg.id)
        if "arguments" in p and p["arguments"] is not None and \
                not isinstance(p["arguments"], dict):
            raise JsonRpcError(INVALID_PARAMS, "tools/call params.arguments must be an "
                               "object", msg.id)
    elif m in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        if not isinstance(p, dict) or not isinstance(p.get("uri"), str):
            raise JsonRpcError(INVALID_PARAMS, f"{m} needs params.uri (a string)", msg.id)
    elif m == "prompts/get":
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            raise JsonRpcError(INVALID_PARAMS, "prompts/get needs params.name (a string)",
                               msg.id)
    elif m == "completion/complete":
        # what it completes must be what the rules read: a ref whose uri or name is not a
        # string would be judged as naming nothing
        ref = p.get("ref") if isinstance(p, dict) else None
        kind = ref.get("type") if isinstance(ref, dict) else None
        key = {"ref/resource": "uri", "ref/prompt": "name"}.get(kind) \
            if isinstance(kind, str) else None
        if key is None or not isinstance(ref, dict) or not isinstance(ref.get(key), str):
            raise JsonRpcError(INVALID_PARAMS, "completion/complete needs params.ref with "
                               "type ref/resource and a uri, or ref/prompt and a name",
                               msg.id)


@dataclass(frozen=True)
class Payload:
    messages: tuple[Message, ...]
    batch: bool
    # may a member named "blob" or "data" be in it (mcp/blobs.py walks only then)
    payloads: bool = True


def may_hold_payloads(text: str) -> bool:
    """Could the JSON text have a `blob` or `data` member? A key is written literally
    unless spelled with \\u escapes: any escape counts as maybe (C-speed substring checks
    instead of a walk of every value of a large answer)."""
    return '"blob"' in text or '"data"' in text or "\\u" in text


def parse_payload(value: Any) -> Payload:
    """A parsed JSON body: one message or a batch. Raises JsonRpcError; for a batch with an
    invalid member the error names it (by index) and carries its id when it has one."""
    if isinstance(value, list):
        if not value:
            raise JsonRpcError(INVALID_REQUEST, "an empty batch")
        if len(value) > MAX_BATCH:
            raise JsonRpcError(INVALID_REQUEST, f"a batch of more than {MAX_BATCH} messages")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(parse_message(item))
            except JsonRpcError as e:
                raise JsonRpcError(e.code, f"batch message {i}: {e.message}", e.id) from None
        ids = [m.id for m in out if m.kind == "request"]
        if len(ids) != len(set(map(repr, ids))):
            raise JsonRpcError(INVALID_REQUEST, "two requests of one batch share an id")
        return Payload(tuple(out), True)
    return Payload((parse_message(value),), False)


def parse_cost(data: bytes) -> int:
    """Estimated microseconds of reading `data` as JSON-RPC and writing it back (strict
    parse, checks, transforms, serialisation): what the event loop would spend on it.
    From C-level counts: ~0.01 us a byte, and per JSON value (measured in process, MB
    bodies: 0.12-0.15 us per ',' or ':' of numbers or short strings, 0.6-1.3 us per object
    with the strict parser's duplicate-key check, 0.5 per nested array). Errs high."""
    return len(data) // 100 + (data.count(b",") + data.count(b":") + data.count(b"[")
                               + 2 * data.count(b"{")) // 6


def loads_strict(data: bytes | str) -> Any:
    """json.loads refusing duplicate object keys (two readers could take different ones)
    and non-standard constants (NaN, Infinity). Raises JsonRpcError(PARSE_ERROR)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise JsonRpcError(PARSE_ERROR, f"duplicate key {k[:40]!r}")
            d[k] = v
        return d

    def bad_constant(name: str) -> Any:
        raise JsonRpcError(PARSE_ERROR, f"{name} is not JSON")

    try:
        return json.loads(data, object_pairs_hook=pairs, parse_constant=bad_constant)
    except JsonRpcError:
        raise
    except (ValueError, RecursionError) as e:
        raise JsonRpcError(PARSE_ERROR, f"not JSON ({type(e).__name__})") from None


def error_message(id: Any, code: int, message: str, data: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


HEAD_SCAN = 4096


def head_id(data: bytes) -> tuple[bool, Any]:
    """(found, id) of a single JSON-RPC message from its first HEAD_SCAN bytes, without
    parsing the body: for an answer when the body itself cannot be read now (the worker
    pool is full). Only a top-level `"id"` member with a string or number value counts
    (every SDK writes `jsonrpc`, `id`, `method` first); anything else: (False, None)."""
    head = data[:HEAD_SCAN].decode("utf-8", "ignore")
    i, n, depth = 0, len(head), 0
    dec = json.JSONDecoder()
    while i < n:
        c = head[i]
        if c == '"':
            try:
                key, end = dec.raw_decode(head, i)
            except ValueError:
                return False, None
            j = end
            while j < n and head[j] in " \t\r\n":
                j += 1
            if depth == 1 and key == "id" and j < n and head[j] == ":":
                j += 1
                while j < n and head[j] in " \t\r\n":
                    j += 1
                if j < n and (head[j] == '"' or head[j] == "-" or head[j].isdigit()):
                    try:
                        value, _ = dec.raw_decode(head, j)
                    except ValueError:
                        return False, None
                    return (True, value) if _is_id(value) else (False, None)
                return False, None
            i = end
            continue
        if c in "{[":
            if depth == 0 and c == "[":
                return False, None  # a batch: its ids are not read from a prefix
            depth += 1
        elif c in "}]":
            depth -= 1
        i += 1
    return False, None


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
