"""The reviewers' HTTP endpoints, served by the gateway on its own listener (tornado).

`ApprovalsAPI` runs one tornado application (addons/approval/web/app.py) on mitmproxy's
asyncio loop: the JSON API below, the reviewers' page under /ui/ (OIDC login) and any
extra handlers another part of the gateway mounts (`(pattern, handler_class, kwargs)`).
The JSON API's logic (`handle`) has no tornado in it: reviewers authenticate with their
own OIDC token (`Authorization: Bearer …`), verified by the same code as agents' tokens.

  GET  /healthz                       liveness, no auth
  GET  /approvals                     pending approvals the caller may decide (and their own)
  GET  /approvals/{id}                one approval, pending or recently decided
  POST /approvals/{id}/approve        {"reason": "…"} optional
  POST /approvals/{id}/deny           {"reason": "…"} required

Both POSTs take an optional `"via"` naming the client, recorded with the vote: only what
a bearer-token client may claim (API_VIAS: "api", the default, or "cli"). "page",
"slack" and "mitmweb" are recorded only by those paths themselves; the store treats
"mitmweb" as the shared operator, so an API client naming it would skip the group check.

Errors are JSON `{"error": {"code", "message"}}` with 400/401/403/404/405/409/413/503.
Tokens are never logged or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

from addons.approval.config import ApprovalsConfig
from addons.approval.store import VIA_API, ApprovalError, ApprovalStore, PendingApproval
from addons.approval.web.app import CookieKeys, make_app
from addons.approval.web.login import OIDCLogin
from addons.approval.web.session import SessionTable
from addons.config.holder import RulesHolder
from addons.frame import listeners

log = logging.getLogger("agentgate.approval")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
# what the listener reads at most: a JSON API body between MAX_BODY and this gets a clean
# 413 in JSON; beyond it tornado answers 400 and closes (nothing larger is ever buffered)
MAX_READ = 256 * 1024
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0  # an idle keep-alive connection (not an open event stream) is closed

Verifier = Callable[[str], Awaitable[dict[str, Any]]]
Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]
# what a JSON API client may name as `via` (see the module docstring)
API_VIAS = (VIA_API, "cli")
_ROUTE = re.compile(r"^/approvals/([A-Za-z0-9_-]{1,64})(?:/(approve|deny))?/?$")


class AuthError(Exception):
    """The reviewer's token was refused; `reason` is safe to show (no token in it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ApprovalsAPI:
    def __init__(self, store: ApprovalStore, verify: Verifier, *,
                 link: Callable[[str], str] = lambda _id: "",
                 on_vote: Callable[[PendingApproval], None] | None = None,
                 holder: RulesHolder | None = None, handlers: Iterable[Route] = ()) -> None:
        self.store = store
        self.verify = verify
        self.link = link
        self.on_vote = on_vote
        self.holder = holder
        self.handlers: list[Route] = list(handlers)
        self.sessions = SessionTable()
        self.login = OIDCLogin(holder)
        self._web_keys = CookieKeys()
        # live-update streams of the page: one bounded queue per open event stream
        self.streams: set[asyncio.Queue[dict[str, str] | None]] = set()
        self._server: tornado.httpserver.HTTPServer | None = None
        self._app: tornado.web.Application | None = None
        self.address: tuple[str, int] | None = None
        store.listeners.append(self._changed)

    def mount(self, *routes: Route) -> None:
        """Serve more handlers on this listener, `(pattern, handler_class, kwargs)` each
        (matched before the built-in paths); effective at once when already listening."""
        self.handlers.extend(routes)
        if self._app is not None:
            router = self._app.wildcard_router
            router.rules[:0] = [router.process_rule(tornado.web.url(p, h, k))
                                for p, h, k in routes]

    @property
    def web_keys(self) -> CookieKeys:
        """The cookie-signing key of the `approvals.web` in force."""
        return self._web_keys.sync(self.config().web)

    def config(self) -> ApprovalsConfig:
        cfg = getattr(self.holder.rules, "approvals", None) if self.holder else None
        return cfg if isinstance(cfg, ApprovalsConfig) else ApprovalsConfig()

    def public_base(self, request: tornado.httputil.HTTPServerRequest) -> str:
        """The page's own origin as reviewers reach it: link_base, else this request's."""
        base = self.config().link_base
        return base.rstrip("/") if base else f"{request.protocol}://{request.host}"

    def _changed(self, a: PendingApproval) -> None:
        item = {"id": a.id, "state": a.state}
        for q in list(self.streams):
            with contextlib.suppress(asyncio.QueueFull):  # a stalled page: it resyncs
                q.put_nowait(item)

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
        if len(body) > MAX_BODY:
            return _error(413, "body_too_large", f"body larger than {MAX_BODY} bytes")
        if path in ("/healthz", "/health"):
            if method not in ("GET", "HEAD"):
                return _error(405, "method_not_allowed", "use GET")
            return 200, {"ok": True}, {}
        if path.rstrip("/") == "/approvals":
            if method != "GET":
                return _error(405, "method_not_allowed", "use GET /approvals")
            who = await self._reviewer(headers)
            items = self.store.visible_to(who["owner"], who["groups"])
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
            if not (self.store.may_review(a, who["groups"])
                    or (a.owner != "" and a.owner == who["owner"])):
                return _error(403, "reviewer_not_in_group",
                              f"reviewer {who['sub']!r} is not in an approver group of rule "
                              f"{a.spec.rule!r}")
            return 200, {"approval": self._view(a, who, time.time())}, {}
        if method != "POST":
            return _error(405, "method_not_allowed", f"use POST {path}")
        who = await self._reviewer(headers)
        payload = _json_body(body)
        reason = payload.get("reason")
        via = payload.get("via", VIA_API)
        if via not in API_VIAS:  # also refuses non-strings
            return _error(400, "bad_via", "via must be one of: " + ", ".join(API_VIAS))
        if action == "approve":
            a = await self.store.aapprove(approval_id, who["sub"], who["groups"],
                                          reason=reason, via=via)
        else:
            if not isinstance(reason, str) or not reason.strip():
                return _error(400, "reason_required", 'deny needs {"reason": "…"}')
            a = await self.store.adeny(approval_id, who["sub"], who["groups"], reason, via=via)
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
        # `owner`: the caller as a hold's owner names it (approval addon owner_of), so an
        # agent finds its own requests by issuer AND subject
        iss = ident.get("iss")
        return {"sub": sub, "groups": groups,
                "owner": f"id:{iss if isinstance(iss, str) else ''}|{sub}"}

    def _view(self, a: PendingApproval, who: dict[str, Any], now: float) -> dict[str, Any]:
        d = a.public(now)
        d["link"] = self.link(a.id)
        d["you_may_approve"] = (not a.decided and self.store.may_review(a, who["groups"])
                                and a.requester != who["sub"]
                                and all(v.sub != who["sub"] for v in a.votes))
        return d

    # ------------------------------------------------------------ the listener
    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._app = make_app(self, self.handlers)
        server = tornado.httpserver.HTTPServer(
            self._app, max_header_size=MAX_HEAD, max_body_size=MAX_READ,
            body_timeout=HEAD_TIMEOUT, idle_connection_timeout=IDLE_TIMEOUT, xheaders=False)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sockets = tornado.netutil.bind_sockets(port, host, family=family, backlog=128)
        server.add_sockets(sockets)
        listeners.register(self, sockets)  # never an upstream (egress), port 0 included
        self._server = server
        sock = sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    def _end_streams(self) -> None:
        for q in list(self.streams):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    def close_now(self) -> None:
        """Stop listening at once (sync: mitmproxy calls `done` synchronously on a script
        reload, and an async `done` there aborts the reload); open connections are closed
        in the background."""
        server, self._server = self._server, None
        listeners.unregister(self)
        self.address = None
        self._app = None
        if server is not None:
            server.stop()
            self._end_streams()
            with contextlib.suppress(RuntimeError):  # no running loop: nothing left open
                task = asyncio.get_running_loop().create_task(server.close_all_connections())
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def stop(self) -> None:
        server, self._server = self._server, None
        listeners.unregister(self)
        self.address = None
        self._app = None
        if server is not None:
            server.stop()
            self._end_streams()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.close_all_connections(), 2)


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
