"""The reviewers' web application (tornado, on mitmproxy's asyncio loop).

One tornado Application serves, on the approvals listener:

  /healthz, /approvals…   the JSON API for CLIs and scripts (Bearer OIDC token, no cookies,
                          so no CSRF); a browser that follows a notification's link to
                          /approvals/{id} is sent to the page instead of a 401
  /ui/…                   the reviewers' page: OIDC login (code + PKCE), a server-side
                          session behind an HMAC-signed cookie, CSRF token on every POST,
                          pending holds (live via server-sent events), detail, history
  + extra handlers        `(pattern, handler_class, kwargs)` given to ApprovalsAPI
                          (e.g. a chat tool's interactive callbacks)

Everything is served by the gateway (no CDN); templates escape every value (the held
request is agent-controlled text) and the Content-Security-Policy allows only this
origin's script and style files: no inline script, no inline style.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.iostream
import tornado.web

from addons.approval.store import ApprovalError, PendingApproval
from addons.approval.web.login import LoginError
from addons.approval.web.render import KIND_LABELS, render
from addons.approval.web.session import Session

if TYPE_CHECKING:
    from addons.approval.api import ApprovalsAPI

log = logging.getLogger("agentgate.approval.web")

HERE = Path(__file__).parent
SESSION_COOKIE = "agentgate_session"
LOGIN_COOKIE = "agentgate_login"
COOKIE_PATH = "/ui/"
VIA_PAGE = "page"
MAX_EVENT_STREAMS = 200
EVENT_QUEUE = 64
HEARTBEAT = 15.0
HISTORY_LIMIT = 200
PENDING_LIMIT = 100  # cards on the list page (newest first); the rest are counted
ID = r"([A-Za-z0-9_-]{1,64})"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string (the login callback carries the code in it)."""
    r = handler.request
    log.debug("%s %s -> %d (%.1f ms)", r.method, r.path, handler.get_status(),
              1000.0 * r.request_time())


class _Base(tornado.web.RequestHandler):
    api: ApprovalsAPI

    def initialize(self, api: ApprovalsAPI) -> None:
        self.api = api

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", CSP)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # tornado's default prints the whole request (cookies, Authorization header)
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("agentgate: reviewers' page error on %s %s (%s)", self.request.method,
                  self.request.path, typ.__name__ if typ else "?",
                  exc_info=log.isEnabledFor(logging.DEBUG))


class JsonApiHandler(_Base):
    """The JSON API: same paths, semantics, status codes and error bodies as before."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    async def prepare(self) -> None:
        r = self.request
        headers = {k.lower(): v for k, v in r.headers.get_all()}
        if (r.method == "GET" and "authorization" not in headers
                and "text/html" in headers.get("accept", "")):
            # a reviewer's browser following a notification link: the page, not a 401
            path = r.path.rstrip("/")
            if path == "/approvals":
                self.redirect("/ui/", status=303)
                return
            m = re.match(r"^/approvals/" + ID + "$", path)
            if m:
                self.redirect(f"/ui/approvals/{m.group(1)}", status=303)
                return
        status, payload, extra = await self.api.handle(r.method or "GET", r.path, headers,
                                                       r.body or b"")
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        for k, v in extra.items():
            self.set_header(k, v)
        if r.method == "HEAD":
            self.finish()
        else:
            self.finish(json.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # what tornado refuses itself (a method it does not route, …): JSON all the same
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": "bad_request" if status_code < 500
                                          else "internal_error",
                                          "message": self._reason or "request refused"}}))


class _Page(_Base):
    """Pages behind the reviewer's session."""

    def session(self) -> Session | None:
        raw = self.get_cookie(SESSION_COOKIE)
        sid = self.api.web_keys.unsign(raw) if raw else None
        return self.api.sessions.get(sid)

    def get_current_user(self) -> Session | None:
        return self.session()

    def secure(self) -> bool:
        """Secure cookies where the reviewers reach the page over TLS."""
        if self.request.protocol == "https":
            return True
        web = self.api.config().web
        if web is not None and (web.redirect_url or "").startswith("https:"):
            return True
        return self.api.public_base(self.request).startswith("https:")

    def set_private_cookie(self, name: str, value: str, max_age: int) -> None:
        self.set_cookie(name, self.api.web_keys.sign(value), path=COOKIE_PATH,
                        httponly=True, secure=self.secure(), samesite="Lax",
                        expires_days=None, max_age=max_age)

    def clear_private_cookie(self, name: str) -> None:
        self.set_cookie(name, "", path=COOKIE_PATH, httponly=True, secure=self.secure(),
                        samesite="Lax", max_age=0)

    def need_login(self) -> Session | None:
        s = self.current_user
        if s is None:
            target = self.request.path if self.request.method == "GET" else "/ui/"
            self.redirect("/ui/login?" + urllib.parse.urlencode({"next": target}))
        return s

    def page(self, template: str, status: int = 200, **kw: Any) -> None:
        self.set_status(status)
        s = self.current_user
        kw.setdefault("title", "agentgate")
        kw.setdefault("open_request", True)
        self.render(template, me=s, csrf=s.csrf if s else "", h=Helpers, **kw)

    async def page_off_loop(self, template: str, **kw: Any) -> None:
        """A page with held requests in it: parsing and laying out megabytes of agent
        text runs in a worker thread, so other flows and reviewers never wait for it."""
        s = self.current_user
        kw.setdefault("open_request", True)
        html = await asyncio.to_thread(self.render_string, template, me=s,
                                       csrf=s.csrf if s else "", h=Helpers, **kw)
        self.finish(html)

    def fail(self, status: int, message: str) -> None:
        self.page("error.html", status=status, message=message)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.clear_header("Content-Type")
        with contextlib.suppress(Exception):
            self.page("error.html", status=status_code,
                      message=self._reason or "the request could not be served")
            return
        self.finish(f"error {status_code}")

    def csrf_ok(self, s: Session) -> bool:
        token = self.get_body_argument("csrf", None) or self.request.headers.get("X-CSRF-Token")
        return s.csrf_ok(token)

    def visible(self, s: Session, a: PendingApproval) -> bool:
        return self.api.store.may_review(a, s.groups)


SHORT_VIEWS = 2000  # list-page views kept (a few KB each)
_SHORT_VIEWS: OrderedDict[str, Any] = OrderedDict()
_SHORT_LOCK = threading.Lock()  # pages are laid out in worker threads


class Helpers:
    """Formatting for the templates (they escape what these return)."""

    @staticmethod
    def when(ts: float | None) -> str:
        if not ts:
            return "-"
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC")

    @staticmethod
    def ago(seconds: float) -> str:
        seconds = max(0, int(seconds))
        if seconds < 120:
            return f"{seconds}s"
        if seconds < 7200:
            return f"{seconds // 60}m {seconds % 60}s"
        return f"{seconds // 3600}h {(seconds % 3600) // 60}m"

    @staticmethod
    def view(a: PendingApproval, short: bool = False) -> Any:
        if not short:
            return render(a.what, a.preview)
        # A hold's request never changes: its list view is laid out once, not on every
        # reload of every reviewer (the list page re-renders on each live update).
        with _SHORT_LOCK:
            v = _SHORT_VIEWS.get(a.id)
            if v is not None:
                _SHORT_VIEWS.move_to_end(a.id)
                return v
        v = render(a.what, a.preview).clip()
        with _SHORT_LOCK:
            _SHORT_VIEWS[a.id] = v
            while len(_SHORT_VIEWS) > SHORT_VIEWS:
                _SHORT_VIEWS.popitem(last=False)
        return v

    @staticmethod
    def kind_label(a: PendingApproval) -> str:
        kind = str(a.what.get("kind") or "http")
        return KIND_LABELS.get(kind, kind)

    @staticmethod
    def findings(what: dict[str, Any]) -> list[tuple[str, str]]:
        f = what.get("findings")
        if isinstance(f, dict):
            # {ENTITY: n} or the masking concern's {ENTITY: {"count": n, "strategy": s}}
            return [(str(k), str(v.get("count", "?") if isinstance(v, dict) else v))
                    for k, v in f.items()]
        if isinstance(f, int | str) and not isinstance(f, bool):
            return [("findings", str(f))]
        return []

    @staticmethod
    def session_of(what: dict[str, Any]) -> str:
        for key in ("session", "session_id"):
            if isinstance(what.get(key), str) and what[key]:
                return what[key]
        return "-"

    @staticmethod
    def may_vote(a: PendingApproval, s: Session) -> bool:
        return (not a.decided and a.requester != s.sub
                and all(v.sub != s.sub for v in a.votes))

    now = staticmethod(time.time)


class PendingHandler(_Page):
    async def get(self) -> None:
        s = self.need_login()
        if s is None:
            return
        items = [a for a in self.api.store.pending() if self.visible(s, a)]
        items.sort(key=lambda a: a.requested_at, reverse=True)
        await self.page_off_loop("pending.html", items=items[:PENDING_LIMIT],
                                 total=len(items), title="Pending approvals")


class DetailHandler(_Page):
    async def get(self, approval_id: str) -> None:
        s = self.need_login()
        if s is None:
            return
        a = self.api.store.get(approval_id)
        if a is None or not self.visible(s, a):
            # the same answer whether it exists or not: no probing of others' holds
            self.fail(404, f"no approval {approval_id} that you may review")
            return
        await self.page_off_loop("detail.html", a=a, title=f"Approval {a.id}")


class VoteHandler(_Page):
    async def post(self, approval_id: str, action: str) -> None:
        s = self.current_user
        if s is None:
            self.fail(401, "sign in first (your session ended)")
            return
        if not self.csrf_ok(s):
            self.fail(403, "the form's security token is missing or wrong; reload the page "
                           "and try again")
            return
        reason = self.get_body_argument("reason", "") or ""
        try:
            if action == "approve":
                a = await self.api.store.aapprove(approval_id, s.sub, s.groups, via=VIA_PAGE,
                                                  reason=reason or None)
            else:
                if not reason.strip():
                    self.fail(400, "a denial needs a reason")
                    return
                a = await self.api.store.adeny(approval_id, s.sub, s.groups, reason,
                                               via=VIA_PAGE)
        except ApprovalError as e:
            self.fail(e.status, e.message)
            return
        log.info("agentgate: approval %s: %s by %s on the page (%d/%d approvals, state %s)",
                 a.id, action, s.sub, len(a.approvers), a.spec.min_approvals, a.state)
        if self.api.on_vote is not None:
            self.api.on_vote(a)
        self.redirect(f"/ui/approvals/{a.id}", status=303)


class HistoryHandler(_Page):
    async def get(self) -> None:
        s = self.need_login()
        if s is None:
            return
        items = [a for a in self.api.store.decided() if self.visible(s, a)][:HISTORY_LIMIT]
        await self.page_off_loop("history.html", items=items, title="Decided")


class LoginHandler(_Page):
    async def get(self) -> None:
        try:
            web, issuer = self.api.login.settings()
            self.api.web_keys.check()
            provider = await self.api.login.provider(issuer)
        except LoginError as e:
            self.fail(e.status, f"sign-in is not available: {e.reason}")
            return
        redirect_url = web.redirect_url or self.api.public_base(self.request) + "/ui/callback"
        login = self.api.sessions.begin_login(self.get_query_argument("next", "/ui/"),
                                              redirect_url)
        self.set_private_cookie(LOGIN_COOKIE, login.id, 600)
        self.redirect(self.api.login.authorize_url(provider, web, login, redirect_url))


class CallbackHandler(_Page):
    async def get(self) -> None:
        raw = self.get_cookie(LOGIN_COOKIE)
        login = self.api.sessions.finish_login(
            self.api.web_keys.unsign(raw) if raw else None, self.get_query_argument("state", None))
        self.clear_private_cookie(LOGIN_COOKIE)
        if login is None:
            self.fail(400, "this sign-in is unknown, expired or was started in another "
                           "browser (state mismatch); start again")
            return
        error = self.get_query_argument("error", None)
        if error is not None:
            text = error if error.isascii() and error.isprintable() else "error"
            self.fail(401, f"the identity provider refused the sign-in ({text[:64]})")
            return
        code = self.get_query_argument("code", None)
        if not code:
            self.fail(400, "the identity provider sent no authorization code")
            return
        try:
            web, issuer = self.api.login.settings()
            provider = await self.api.login.provider(issuer)
            id_token = await self.api.login.exchange(provider, web, code, login,
                                                     login.redirect_url)
            ident = await self.api.login.verify(web, issuer, id_token, login.nonce)
        except LoginError as e:
            log.warning("agentgate: reviewers' page sign-in refused: %s", e.reason)
            self.fail(e.status, f"sign-in failed: {e.reason}")
            return
        s = self.api.sessions.create(ident["sub"], tuple(ident.get("groups") or ()),
                                     str(ident.get("iss") or ""), web.session_minutes * 60.0)
        log.info("agentgate: reviewer %s signed in to the approvals page", s.sub)
        self.set_private_cookie(SESSION_COOKIE, s.id, web.session_minutes * 60)
        self._current_user = s
        self.redirect(login.next_path, status=303)


class LogoutHandler(_Page):
    def post(self) -> None:
        s = self.current_user
        if s is not None:
            if not self.csrf_ok(s):
                self.fail(403, "the form's security token is missing or wrong")
                return
            self.api.sessions.end(s.id)
            log.info("agentgate: reviewer %s signed out of the approvals page", s.sub)
        self.clear_private_cookie(SESSION_COOKIE)
        self._current_user = None
        self.page("signedout.html", title="Signed out")


class EventsHandler(_Page):
    """Server-sent events: `change` with {id, state} when a hold this reviewer may see
    opens, gets a vote or is decided. Names only: the page fetches what changed."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("X-Accel-Buffering", "no")

    async def get(self) -> None:
        s = self.current_user
        if s is None:
            self.set_status(401)
            self.finish("event: login\ndata: {}\n\n")
            return
        if len(self.api.streams) >= MAX_EVENT_STREAMS:
            self.set_status(503)
            self.finish("retry: 30000\n\n")
            return
        queue: asyncio.Queue[dict[str, str] | None] = asyncio.Queue(EVENT_QUEUE)
        self.api.streams.add(queue)
        self._queue = queue
        try:
            self.write("retry: 3000\n\n")
            await self.flush()
            while self.api.sessions.get(s.id) is not None:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT)
                except TimeoutError:
                    self.write(": keep-alive\n\n")
                    await self.flush()
                    continue
                if item is None:  # the server is closing
                    break
                a = self.api.store.get(item["id"])
                if a is not None and self.visible(s, a):
                    self.write(f"event: change\ndata: {json.dumps(item)}\n\n")
                    await self.flush()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            self.api.streams.discard(queue)
        if not self._finished:
            self.finish()

    def on_connection_close(self) -> None:
        q = getattr(self, "_queue", None)
        if q is not None:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)


class StaticHandler(tornado.web.StaticFileHandler):
    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", CSP)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, tornado.web.HTTPError):
            log.error("agentgate: static file error (%s)", typ.__name__ if typ else "?")


class RootHandler(_Base):
    def get(self) -> None:
        self.redirect("/ui/")


class CookieKeys:
    """The key that signs cookie values (HMAC-SHA256 over the random id they carry)."""

    RETRY = 5.0  # seconds between re-reads of a configured key that was unavailable

    def __init__(self) -> None:
        self._key: bytes | None = None
        self.problem: str | None = None
        self._for: Any = object()  # the WebConfig the key was loaded for
        self._tried = 0.0

    def sync(self, web: Any) -> CookieKeys:
        """Load the key again when `approvals.web` changed (a rules reload does not restart
        the listener), or when a configured key was missing a while ago (a secret mounted
        late). An unchanged configuration keeps its key, random or not: sessions live on."""
        now = time.monotonic()
        if web != self._for or (self._key is None and now - self._tried > self.RETRY):
            self.load(web)
            self._for, self._tried = web, now
        return self

    def load(self, web: Any) -> None:
        self.problem = None
        secret = web.cookie_secret() if web is not None else None
        if web is not None and (web.cookie_secret_env or web.cookie_secret_file):
            if not secret:
                self.problem = ("the cookie key is not available ("
                                + (f"${web.cookie_secret_env} is not set"
                                   if web.cookie_secret_env else
                                   f"file {web.cookie_secret_file} is unreadable or empty")
                                + ")")
                self._key = None
                return
            from addons.approval.config import MIN_COOKIE_SECRET
            if len(secret.encode()) < MIN_COOKIE_SECRET:
                self.problem = f"the cookie key is shorter than {MIN_COOKIE_SECRET} bytes"
                self._key = None
                return
            self._key = hashlib.sha256(b"agentgate-cookie\0" + secret.encode()).digest()
        else:
            # no key configured: a random one per start (sessions end with the process)
            self._key = secrets.token_bytes(32)

    def check(self) -> None:
        if self._key is None:
            raise LoginError(self.problem or "no cookie key", 503)

    def sign(self, value: str) -> str:
        self.check()
        assert self._key is not None
        mac = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        return f"{value}.{mac}"

    def unsign(self, raw: str) -> str | None:
        if self._key is None or "." not in raw or len(raw) > 512:
            return None
        value, _, mac = raw.rpartition(".")
        want = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        return value if hmac.compare_digest(mac.encode(), want.encode()) else None


def make_app(api: ApprovalsAPI,
             extra: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]
             ) -> tornado.web.Application:
    k = {"api": api}
    handlers: list[Any] = [
        (r"/", RootHandler, k),
        (r"/healthz", JsonApiHandler, k),
        (r"/health", JsonApiHandler, k),
        (r"/approvals(?:/.*)?", JsonApiHandler, k),
        (r"/ui/?", PendingHandler, k),
        (r"/ui/history", HistoryHandler, k),
        (r"/ui/login", LoginHandler, k),
        (r"/ui/callback", CallbackHandler, k),
        (r"/ui/logout", LogoutHandler, k),
        (r"/ui/events", EventsHandler, k),
        (r"/ui/approvals/" + ID, DetailHandler, k),
        (r"/ui/approvals/" + ID + r"/(approve|deny)", VoteHandler, k),
        (r"/ui/static/(.*)", StaticHandler, {"path": str(HERE / "static")}),
    ]
    # extra handlers first: a callback path of another concern must not be shadowed
    return tornado.web.Application(
        [*extra, *handlers], template_path=str(HERE / "templates"), autoescape="xhtml_escape",
        log_function=_log_request, compress_response=False, xsrf_cookies=False,
        default_handler_class=NotFoundHandler, default_handler_args=k)


class NotFoundHandler(_Base):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    def prepare(self) -> None:
        self.set_status(404)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": "not_found",
                                          "message": "unknown path (see GET /approvals)"}}))
