"""The JSON API on the tornado listener: same paths, semantics, status codes and error
bodies as the hand-written server it replaced, over a real socket."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from addons.approval.api import ApprovalsAPI, AuthError
from addons.approval.store import ApprovalSpec, ApprovalStore, PendingApproval

USERS = {
    "tok-alice": {"sub": "alice", "groups": ["reviewers"]},
    "tok-bob": {"sub": "bob", "groups": ["reviewers", "staff"]},
    "tok-mallory": {"sub": "mallory", "groups": ["developers"]},
    "tok-agent": {"sub": "agent-1", "groups": ["reviewers"]},
}


async def fake_verify(token: str) -> dict[str, Any]:
    if token in USERS:
        return dict(USERS[token])
    raise AuthError("signature does not verify")


class Server:
    """The real ApprovalsAPI (tornado) on its own event loop in a thread."""

    def __init__(self, holder: Any = None, verify: Any = fake_verify) -> None:
        self.store = ApprovalStore()
        self.votes: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.api = self.call(lambda: ApprovalsAPI(self.store, verify, holder=holder,
                                                  on_vote=lambda a: self.votes.append(a.id)))
        host, port = asyncio.run_coroutine_threadsafe(
            self.api.start("127.0.0.1", 0), self.loop).result(10)
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (the store is not thread-safe)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def hold(self, requester: str = "agent-1", groups: tuple[str, ...] = ("reviewers",),
             what: dict[str, Any] | None = None, preview: str = "", **spec: Any
             ) -> PendingApproval:
        s = ApprovalSpec(rule=spec.pop("rule", "bulk"), groups=groups, **spec)
        w = what or {"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                     "kind": "llm", "upstream": "openai", "model": "gpt-4o"}
        return self.call(lambda: self.store.create(s, requester, w, preview))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(base: str, method: str, path: str, token: str | None = None,
         body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, Any, Any]:
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _DIRECT.open(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None, r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None, e.headers


def test_health_and_listing(server: Server) -> None:
    status, out, headers = call(server.url, "GET", "/healthz")
    assert status == 200 and out == {"ok": True}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    a = server.hold()
    server.hold(groups=("finance",))  # another group's hold: not listed for alice
    status, out, _ = call(server.url, "GET", "/approvals", "tok-alice")
    assert status == 200 and out["reviewer"] == "alice"
    assert [x["id"] for x in out["approvals"]] == [a.id]
    assert out["approvals"][0]["you_may_approve"] is True
    status, out, _ = call(server.url, "GET", f"/approvals/{a.id}", "tok-alice")
    assert status == 200 and out["approval"]["id"] == a.id


def test_refusals_keep_their_codes(server: Server) -> None:
    a = server.hold()
    path = f"/approvals/{a.id}/approve"
    status, out, headers = call(server.url, "POST", path)
    assert status == 401 and out["error"]["code"] == "token_missing"
    assert headers["www-authenticate"] == 'Bearer realm="agentgate-approvals"'
    status, out, _ = call(server.url, "POST", path, "forged.token.value")
    assert status == 401 and "signature" in out["error"]["message"]
    assert "forged" not in json.dumps(out)
    status, out, _ = call(server.url, "POST", path, "tok-mallory")
    assert status == 403 and out["error"]["code"] == "reviewer_not_in_group"
    status, out, _ = call(server.url, "POST", path, "tok-agent")
    assert status == 403 and out["error"]["code"] == "self_approval"
    status, out, _ = call(server.url, "POST", "/approvals/ap-unknown/approve", "tok-bob")
    assert status == 404 and out["error"]["code"] == "approval_not_found"
    status, out, _ = call(server.url, "GET", f"/approvals/{a.id}", "tok-mallory")
    assert status == 403
    status, out, _ = call(server.url, "DELETE", path, "tok-bob")
    assert status == 405 and out["error"]["code"] == "method_not_allowed"
    status, out, _ = call(server.url, "POST", path, "tok-bob", b"[1]")
    assert status == 400 and out["error"]["code"] == "bad_json"
    status, out, _ = call(server.url, "POST", f"/approvals/{a.id}/deny", "tok-bob", b"{}")
    assert status == 400 and out["error"]["code"] == "reason_required"
    status, out, _ = call(server.url, "GET", "/nowhere", "tok-bob")
    assert status == 404 and out["error"]["code"] == "not_found"
    assert not a.decided and server.votes == []
    # a method tornado itself does not route still gets a JSON error
    status, out, headers = call(server.url, "TRACE", path, "tok-bob")
    assert status == 405 and headers["content-type"] == "application/json"
    assert out["error"]["message"]


def test_approve_then_late_vote_is_409(server: Server) -> None:
    a = server.hold(min_approvals=1)
    status, out, _ = call(server.url, "POST", f"/approvals/{a.id}/approve", "tok-bob",
                          b'{"reason": "looks fine"}')
    assert status == 200 and out["approval"]["state"] == "approved"
    assert out["approval"]["votes"][0]["reason"] == "looks fine"
    assert server.votes == [a.id]
    status, out, _ = call(server.url, "POST", f"/approvals/{a.id}/deny", "tok-alice",
                          b'{"reason": "too late"}')
    assert status == 409 and out["error"]["code"] == "approval_decided"


def test_via_is_recorded_from_a_closed_set(server: Server) -> None:
    """A bearer-token client may say it is the API (default) or the CLI; it may not claim
    the page, Slack or mitmweb (the store treats "mitmweb" as the shared operator, who
    skips the approver-group check): those are refused and nothing is voted."""
    a = server.hold(min_approvals=2)
    base = f"/approvals/{a.id}"
    for bad in ("mitmweb", "page", "slack", "CLI", "", None, 1, ["cli"], {"via": "cli"}):
        for action, body in (("approve", {"via": bad}), ("deny", {"via": bad, "reason": "x"})):
            status, out, _ = call(server.url, "POST", f"{base}/{action}", "tok-bob",
                                  json.dumps(body).encode())
            assert status == 400 and out["error"]["code"] == "bad_via", (bad, action)
    # an outsider claiming mitmweb gets no operator vote either
    status, out, _ = call(server.url, "POST", f"{base}/approve", "tok-mallory",
                          b'{"via": "mitmweb"}')
    assert status == 400 and not a.votes and server.votes == []
    status, out, _ = call(server.url, "POST", f"{base}/approve", "tok-bob",
                          b'{"via": "cli", "reason": "ok"}')
    assert status == 200 and out["approval"]["votes"][0]["via"] == "cli"
    status, out, _ = call(server.url, "POST", f"{base}/approve", "tok-alice", b"{}")
    assert status == 200 and out["approval"]["state"] == "approved"
    assert [(v.sub, v.via) for v in a.votes] == [("bob", "cli"), ("alice", "api")]
    b = server.hold()
    status, out, _ = call(server.url, "POST", f"/approvals/{b.id}/deny", "tok-bob",
                          b'{"via": "cli", "reason": "no"}')
    assert status == 200 and [(v.sub, v.via) for v in b.votes] == [("bob", "cli")]


def test_limits_and_garbage(server: Server) -> None:
    a = server.hold()
    # a body over the limit is refused, not buffered
    status, _, _ = call(server.url, "POST", f"/approvals/{a.id}/approve", "tok-bob",
                        b"{" + b" " * (70 * 1024) + b"}")
    assert status == 413
    # a malformed request line gets a 400 and the server keeps serving
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    status, _, _ = call(server.url, "GET", "/healthz")
    assert status == 200
    assert not a.decided


def test_browser_following_a_link_gets_the_page(server: Server) -> None:
    a = server.hold()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    for path, where in ((f"/approvals/{a.id}", f"/ui/approvals/{a.id}"),
                        ("/approvals", "/ui/")):
        req = urllib.request.Request(server.url + path, headers={"Accept": "text/html"})
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(req, timeout=5)
        assert e.value.code == 303 and e.value.headers["location"] == where
    # a script without a token still gets the API's 401
    status, out, _ = call(server.url, "GET", f"/approvals/{a.id}")
    assert status == 401 and out["error"]["code"] == "token_missing"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_mounted_handlers_and_stop() -> None:
    import tornado.web

    class Ping(tornado.web.RequestHandler):
        def initialize(self, word: str) -> None:
            self.word = word

        def post(self) -> None:
            self.finish({"said": self.word})

    s = Server()
    try:
        s.call(lambda: s.api.mount((r"/hook/ping", Ping, {"word": "pong"})))
        status, out, _ = call(s.url, "POST", "/hook/ping", body=b"")
        assert status == 200 and out == {"said": "pong"}
    finally:
        s.stop()
    with pytest.raises(OSError):
        socket.create_connection((s.host, s.port), timeout=2).close()
    # close_now (sync, on the loop) stops listening at once as well
    s2 = Server()
    s2.call(s2.api.close_now)
    assert s2.api.address is None
    with pytest.raises(OSError):
        socket.create_connection((s2.host, s2.port), timeout=2).close()
    s2.stop()
