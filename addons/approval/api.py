"""The reviewers' HTTP API, served by the gateway on its own listener.

A small asyncio HTTP/1.1 server (no framework: the gateway already runs mitmproxy's event
loop, and the API is a handful of JSON endpoints). Reviewers authenticate with their own
OIDC token (`Authorization: Bearer …`), verified by the same code as agents' tokens.

  GET  /healthz                       liveness, no auth
  GET  /approvals                     pending approvals the caller may decide (and their own)
  GET  /approvals/{id}                one approval, pending or recently decided
  POST /approvals/{id}/approve        {"reason": "…"} optional
  POST /approvals/{id}/deny           {"reason": "…"} required

Errors are JSON `{"error": {"code", "message"}}` with 400/401/403/404/405/409/411/413/503.
Tokens are never logged or echoed. No mitmproxy import: the addon wires the store and the
token verifier in, so this is testable alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from addons.approval.store import ApprovalError, ApprovalStore, PendingApproval

log = logging.getLogger("agentgate.approval")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
HEAD_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONNECTION = 100

Verifier = Callable[[str], Awaitable[dict[str, Any]]]
_ROUTE = re.compile(r"^/approvals/([A-Za-z0-9_-]{1,64})(?:/(approve|deny))?/?$")


class AuthError(Exception):
    """The reviewer's token was refused; `reason` is safe to show (no token in it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ApprovalsAPI:
    def __init__(self, store: ApprovalStore, verify: Verifier, *,
                 link: Callable[[str], str] = lambda _id: "",
                 on_vote: Callable[[PendingApproval], None] | None = None) -> None:
        self.store = store
        self.verify = verify
        self.link = link
        self.on_vote = on_vote
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------ request handling
    async def handle(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request -> (status, JSON body, extra headers). Never raises."""
        try:
            return await self._route(method, path.split("?", 1)[0], headers, body)
        except ApprovalError as e:
            return _error(e.status, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - the API answers, never crashes
            log.error("agentgate: approvals API error (%s)", type(e).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return _error(500, "internal_error", "internal error in the approvals API")

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path in ("/healthz", "/health"):
            if method not in ("GET", "HEAD"):
                return _error(405, "method_not_allowed", "use GET")
            return 200, {"ok": True}, {}
        if path.rstrip("/") == "/approvals":
            if method != "GET":
                return _error(405, "method_not_allowed", "use GET /approvals")
            who = await self._reviewer(headers)
            items = self.store.visible_to(who["sub"], who["groups"])
            now = time.time()
            return 200, {"reviewer": who["sub"],
                         "approvals": [self._view(a, who, now) for a in items]}, {}
        m = _ROUTE.match(path)
        if not m:
            return _error(404, "not_found", "unknown path (see GET /approvals)")
        approval_id, action = m.group(1), m.group(2)
        if action is None:
            if method != "GET":
                return _error(405, "method_not_allowed", f"use GET {path}")
            who = await self._reviewer(headers)
            a = self.store.get(approval_id)
            if a is None:
                return _error(404, "approval_not_found", f"no approval {approval_id!r}")
            if not (self.store.may_review(a, who["groups"]) or a.requester == who["sub"]):
                return _error(403, "reviewer_not_in_group",
                              f"reviewer {who['sub']!r} is not in an approver group of rule "
                              f"{a.spec.rule!r}")
            return 200, {"approval": self._view(a, who, time.time())}, {}
        if method != "POST":
            return _error(405, "method_not_allowed", f"use POST {path}")
        who = await self._reviewer(headers)
        payload = _json_body(body)
        reason = payload.get("reason")
        if action == "approve":
            a = self.store.approve(approval_id, who["sub"], who["groups"], reason=reason)
        else:
            if not isinstance(reason, str) or not reason.strip():
                return _error(400, "reason_required", 'deny needs {"reason": "…"}')
            a = self.store.deny(approval_id, who["sub"], who["groups"], reason)
        log.info("agentgate: approval %s: %s by %s (%d/%d approvals, state %s)", a.id, action,
                 who["sub"], len(a.approvers), a.spec.min_approvals, a.state)
        if self.on_vote is not None:
            self.on_vote(a)
        return 200, {"approval": self._view(a, who, time.time())}, {}

    async def _reviewer(self, headers: dict[str, str]) -> dict[str, Any]:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApprovalError(401, "token_missing",
                                "send your OIDC token as 'Authorization: Bearer <token>'")
        try:
            ident = await self.verify(token.strip())
        except AuthError as e:
            raise ApprovalError(401, "token_invalid", f"token refused: {e.reason}") from None
        except Exception as e:  # noqa: BLE001 - fail closed, never echo the token
            log.error("agentgate: reviewer token verification failed (%s)", type(e).__name__)
            raise ApprovalError(503, "identity_unavailable",
                                "reviewer tokens cannot be verified right now") from None
        sub = ident.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ApprovalError(401, "token_invalid", "token has no subject")
        groups = tuple(g for g in (ident.get("groups") or ()) if isinstance(g, str))
        return {"sub": sub, "groups": groups}

    def _view(self, a: PendingApproval, who: dict[str, Any], now: float) -> dict[str, Any]:
        d = a.public(now)
        d["link"] = self.link(a.id)
        d["you_may_approve"] = (not a.decided and self.store.may_review(a, who["groups"])
                                and a.requester != who["sub"]
                                and all(v.sub != who["sub"] for v in a.votes))
        return d

    # ------------------------------------------------------------ the listener
    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    def close_now(self) -> None:
        """Stop listening at once (sync: mitmproxy calls `done` synchronously on a script
        reload, and an async `done` there aborts the reload)."""
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            self._server = None
            self.address = None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
            self.address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                if not await self._one(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError,
                asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False to close the connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.IncompleteReadError:
            return False
        except asyncio.LimitOverrunError:
            await _send(writer, *_error(431, "headers_too_large", "request head too large"),
                        keep=False)
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _send(writer, *_error(400, "bad_request", "malformed request line"),
                        keep=False)
            return False
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await _send(writer, *_error(400, "bad_request", "malformed header"),
                            keep=False)
                return False
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            await _send(writer, *_error(411, "length_required",
                                        "send a Content-Length body, not chunked"), keep=False)
            return False
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            await _send(writer, *_error(400, "bad_request", "bad Content-Length"), keep=False)
            return False
        if length > MAX_BODY:
            await _send(writer, *_error(413, "body_too_large",
                                        f"body larger than {MAX_BODY} bytes"), keep=False)
            return False
        body = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT) if length else b""
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        status, payload, extra = await self.handle(method.upper(), path, headers, body)
        await _send(writer, status, payload, extra, keep=keep, head_only=method == "HEAD")
        return keep


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApprovalError(400, "bad_json", "body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApprovalError(400, "bad_json", "body must be a JSON object")
    return data


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    extra = {"www-authenticate": 'Bearer realm="agentgate-approvals"'} if status == 401 else {}
    return status, {"error": {"code": code, "message": message}}, extra


async def _send(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
                extra: dict[str, str], *, keep: bool, head_only: bool = False) -> None:
    data = json.dumps(payload, indent=None).encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json",
            f"content-length: {len(data)}", "cache-control: no-store",
            f"connection: {'keep-alive' if keep else 'close'}"]
    head += [f"{k}: {v}" for k, v in extra.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(data)
    await writer.drain()


# ---------------------------------------------------------------- notifications
class Notifier:
    """POSTs Slack-compatible JSON about new holds, directly (never through the proxy).

    Each delivery runs in its own task with exponential backoff; a failure is logged and
    retried and never touches the hold. The URL is treated as a secret (Slack puts the
    token in the path): only its scheme and host appear in logs.
    """

    def __init__(self) -> None:
        self._ssl: dict[str | None, ssl.SSLContext] = {}
        self._tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.failed_attempts = 0

    def submit(self, url: str, payload: dict[str, Any], *, retries: int, backoff: float,
               max_backoff: float, timeout: float, ca_file: str | None = None,
               still_wanted: Callable[[], bool] = lambda: True) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._deliver(
            url, payload, retries, backoff, max_backoff, timeout, ca_file, still_wanted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    async def _deliver(self, url: str, payload: dict[str, Any], retries: int, backoff: float,
                       max_backoff: float, timeout: float, ca_file: str | None,
                       still_wanted: Callable[[], bool]) -> bool:
        where = safe_url(url)
        label = payload.get("approval_id", "")
        for attempt in range(retries + 1):
            if attempt and not still_wanted():
                return False  # decided meanwhile: nobody needs the reminder any more
            try:
                status = await post_json(url, payload, timeout=timeout,
                                         ssl_context=await self._context(url, ca_file))
                if 200 <= status < 300:
                    self.sent += 1
                    return True
                problem = f"HTTP {status}"
            except (OSError, TimeoutError, ssl.SSLError, ValueError,
                    asyncio.IncompleteReadError) as e:
                problem = type(e).__name__
            self.failed_attempts += 1
            if attempt == retries:
                break
            delay = min(max_backoff, backoff * (2 ** attempt))
            log.warning("agentgate: approval %s: notification to %s failed (%s); retry %d/%d "
                        "in %.1fs", label, where, problem, attempt + 1, retries, delay)
            await asyncio.sleep(delay)
        log.error("agentgate: approval %s: notification to %s failed after %d attempts (%s); "
                  "the request stays held", label, where, retries + 1, problem)
        return False

    async def _context(self, url: str, ca_file: str | None) -> ssl.SSLContext | None:
        if not url.lower().startswith("https:"):
            return None
        if ca_file not in self._ssl:
            # loading CA files is blocking file I/O: once per file, off the event loop
            self._ssl[ca_file] = await asyncio.to_thread(ssl.create_default_context,
                                                         cafile=ca_file)
        return self._ssl[ca_file]


def safe_url(url: str) -> str:
    """scheme://host[:port] of a URL: what may be logged of a webhook address."""
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.hostname or '?'}" + (f":{u.port}" if u.port else "")


async def post_json(url: str, payload: dict[str, Any], *, timeout: float,
                    ssl_context: ssl.SSLContext | None = None) -> int:
    """POST JSON over a fresh connection; returns the HTTP status. Raises OSError etc."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("not an http(s) URL")
    port = u.port or (443 if u.scheme == "https" else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    host_header = u.hostname + (f":{u.port}" if u.port else "")
    if ":" in u.hostname:
        host_header = f"[{u.hostname}]" + (f":{u.port}" if u.port else "")
    body = json.dumps(payload).encode()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            u.hostname, port, ssl=ssl_context if u.scheme == "https" else None,
            server_hostname=u.hostname if u.scheme == "https" else None)
        try:
            writer.write((f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                          "Content-Type: application/json\r\nUser-Agent: agentgate\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                          ).encode("latin-1") + body)
            await writer.drain()
            line = await reader.readline()
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError("not an HTTP response")
            return int(parts[1])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
