"""The reviewers' page without a browser: OIDC login through a real provider
(oidc-provider-mock) with PKCE/state/nonce, session cookie, CSRF, group checks, XSS,
live events, and the renderer of held requests."""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.cookiejar
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons.approval.store import ApprovalSpec, ApprovalStore
from addons.approval.web.render import format_sql, render
from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.devkit.idp import DemoIdP
from tests.approval.test_api import Server

CLIENT_ID = "agentgate-reviewers"
COOKIE_ENV = "AGENTGATE_TEST_COOKIE_SECRET"


class RecordingIdP(DemoIdP):
    """The real provider, recording what the gateway sent to it (PKCE, nonce)."""

    def __init__(self) -> None:
        super().__init__()
        self.authorize_args: list[dict[str, str]] = []
        self.token_forms: list[dict[str, str]] = []

        @self.app.before_request
        def _record() -> None:
            import flask
            if flask.request.path == "/oauth2/authorize":
                self.authorize_args.append(dict(flask.request.args))
            if flask.request.path == "/oauth2/token":
                self.token_forms.append(dict(flask.request.form))

    def set_user(self, sub: str, groups: list[str]) -> None:
        now = int(time.time())
        req = urllib.request.Request(
            f"{self.issuer}/users/{urllib.parse.quote(sub, safe='')}",
            data=json.dumps({"groups": groups, "iat": now, "exp": now + 300}).encode(),
            method="PUT", headers={"content-type": "application/json"})
        _PLAIN.open(req, timeout=10).close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_PLAIN = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Client:
    """A cookie-keeping HTTP client that follows no redirect (each hop is checked)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect())
        self.set_cookies: list[str] = []

    def open(self, url: str, data: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
        if url.startswith("/"):
            url = self.base + url
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as r:
                status, h, text = r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            status, h, text = e.code, e.headers, e.read().decode()
        self.set_cookies += h.get_all("set-cookie") or []
        return status, h, text

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def csrf(self, page: str = "/ui/") -> str:
        status, _, text = self.open(page)
        assert status == 200, text
        m = re.search(r'name="csrf" value="([^"]+)"', text)
        assert m, text
        return m.group(1)


def login(c: Client, idp: RecordingIdP, sub: str, groups: list[str],
          next_path: str = "/ui/") -> str:
    """The whole authorization-code flow, hop by hop; returns the page it lands on."""
    idp.set_user(sub, groups)
    status, h, _ = c.open(next_path)
    assert status == 302 and h["location"].startswith("/ui/login?"), (status, h)
    status, h, text = c.open(h["location"])
    assert status == 302, text
    authorize = h["location"]
    assert authorize.startswith(idp.issuer + "/oauth2/authorize?")
    status, h, _ = c.open(authorize, {"sub": sub})  # the provider's login form
    assert status == 302
    callback = h["location"]
    status, h, text = c.open(callback)
    assert status == 303, text
    assert h["location"] == next_path
    status, _, text = c.open(next_path)
    assert status == 200
    return text


@pytest.fixture(scope="module")
def idp() -> Iterator[RecordingIdP]:
    p = RecordingIdP().start()
    yield p
    p.stop()


def rules_holder(tmp: Path, idp: RecordingIdP, **web: Any) -> RulesHolder:
    web = {"client_id": CLIENT_ID, "cookie_secret_env": COOKIE_ENV, **web}
    approvals: dict[str, Any] = {"listen": "off", "web": web}
    link_base = web.pop("link_base", None)
    if link_base:
        approvals["link_base"] = link_base
    (tmp / "rules.yaml").write_text(idp.identity_yaml() + "approvals: "
                                    + json.dumps(approvals) + "\n")
    holder = RulesHolder()
    holder.rules = load_rules(tmp)
    return holder


@pytest.fixture
def web(tmp_path: Path, idp: RecordingIdP, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv(COOKIE_ENV, "k" * 40)
    s = Server(holder=rules_holder(tmp_path, idp))
    yield s
    s.stop()


CHAT = {"model": "gpt-4o", "messages": [
    {"role": "system", "content": "You write synthetic records."},
    {"role": "user", "content": "make 500 records for <PERSON_1>"}]}


def held(s: Server, body: dict[str, Any] | None = None, requester: str = "agent-7",
         groups: tuple[str, ...] = ("reviewers",), **spec: Any) -> Any:
    return s.hold(requester=requester, groups=groups,
                  preview=json.dumps(body or CHAT), **spec)


# ---------------------------------------------------------------- login
def test_login_code_flow_with_pkce_state_nonce(web: Server, idp: RecordingIdP) -> None:
    a = held(web)
    c = Client(web.url)
    page = login(c, idp, "alice", ["reviewers"])
    assert "make 500 records for &lt;PERSON_1&gt;" in page and a.id in page
    args = idp.authorize_args[-1]
    form = idp.token_forms[-1]
    assert args["client_id"] == CLIENT_ID and args["response_type"] == "code"
    assert args["code_challenge_method"] == "S256" and len(args["state"]) >= 32
    assert args["nonce"] and args["redirect_uri"] == web.url + "/ui/callback"
    # PKCE: what the gateway proved at the token endpoint matches the challenge it sent
    verifier = form["code_verifier"]
    assert 43 <= len(verifier) <= 128
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    assert digest.rstrip(b"=").decode() == args["code_challenge"]
    assert form["redirect_uri"] == args["redirect_uri"]
    # the session cookie: HttpOnly, SameSite, scoped, expiring; not Secure over plain http
    cookie = next(x for x in c.set_cookies if x.startswith("agentgate_session="))
    low = cookie.lower()
    assert "httponly" in low and "samesite=lax" in low and "path=/ui/" in low
    assert "max-age=28800" in low and "secure" not in low
    # the cookie is a random id with a MAC, not the identity
    assert "alice" not in cookie and "reviewers" not in cookie


def test_secure_cookie_when_reached_over_tls(tmp_path: Path, idp: RecordingIdP,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COOKIE_ENV, "s" * 40)
    s = Server(holder=rules_holder(tmp_path, idp, link_base="https://gw.example:8443"))
    try:
        c = Client(s.url)
        status, h, _ = c.open("/ui/login")
        assert status == 302
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(h["location"]).query)
        assert q["redirect_uri"] == ["https://gw.example:8443/ui/callback"]
        cookie = next(x for x in c.set_cookies if x.startswith("agentgate_login="))
        assert "; secure" in cookie.lower() and "httponly" in cookie.lower()
    finally:
        s.stop()


def test_state_and_nonce_are_checked(web: Server, idp: RecordingIdP) -> None:
    idp.set_user("alice", ["reviewers"])
    c = Client(web.url)
    status, h, _ = c.open("/ui/login")
    authorize = h["location"]
    status, h, _ = c.open(authorize, {"sub": "alice"})
    callback = h["location"]
    # a callback with another state (a login CSRF / mix-up) is refused
    bad = re.sub(r"state=[^&]+", "state=forged", callback)
    status, _, text = c.open(bad)
    assert status == 400 and "state mismatch" in text
    # the login was used up by that attempt: the real callback no longer works either
    status, _, _ = c.open(callback)
    assert status == 400
    assert c.cookie("agentgate_session") is None
    # a callback in a browser that never started the login (no login cookie)
    c2 = Client(web.url)
    status, h, _ = c2.open("/ui/login")
    _, h2, _ = c2.open(h["location"], {"sub": "alice"})
    stranger = Client(web.url)
    status, _, _ = stranger.open(h2["location"])
    assert status == 400 and stranger.cookie("agentgate_session") is None
    # an ID token minted for another nonce (replayed from another login) is refused
    c3 = Client(web.url)
    _, h, _ = c3.open("/ui/login")
    swapped = re.sub(r"nonce=[^&]+", "nonce=someone-elses-nonce", h["location"])
    _, h, _ = c3.open(swapped, {"sub": "alice"})
    status, _, text = c3.open(h["location"])
    assert status == 401 and "nonce does not match" in text
    assert c3.cookie("agentgate_session") is None


def test_forged_or_foreign_cookie_is_no_session(web: Server, idp: RecordingIdP) -> None:
    c = Client(web.url)
    login(c, idp, "alice", ["reviewers"])
    sid = c.cookie("agentgate_session")
    assert sid
    value, mac = sid.rsplit(".", 1)
    for forged in (value + "." + "0" * len(mac), "alice", value):
        status, h, _ = _get_with_cookie(web.url + "/ui/", forged)
        assert status == 302 and h["location"].startswith("/ui/login"), forged


def _get_with_cookie(url: str, cookie: str) -> tuple[int, Any, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    req = urllib.request.Request(url, headers={"Cookie": f"agentgate_session={cookie}"})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


# ---------------------------------------------------------------- deciding
def test_csrf_on_every_post(web: Server, idp: RecordingIdP) -> None:
    a = held(web)
    alice, bob = Client(web.url), Client(web.url)
    login(alice, idp, "alice", ["reviewers"])
    login(bob, idp, "bob", ["reviewers"])
    bobs_token = bob.csrf()
    path = f"/ui/approvals/{a.id}/approve"
    for form in ({"reason": "ok"}, {"reason": "ok", "csrf": "wrong"},
                 {"reason": "ok", "csrf": bobs_token}):  # another session's token
        status, _, text = alice.open(path, form)
        assert status == 403 and "security token" in text, form
    status, _, _ = alice.open("/ui/logout", {})
    assert status == 403  # logging out is a POST too
    assert not a.decided and web.votes == []
    status, h, _ = alice.open(path, {"reason": "synthetic data only", "csrf": alice.csrf()})
    assert status == 303 and h["location"] == f"/ui/approvals/{a.id}"
    assert a.state == "approved" and web.votes == [a.id]
    vote = a.votes[0]
    assert (vote.sub, vote.via, vote.reason) == ("alice", "page", "synthetic data only")
    status, _, text = alice.open(f"/ui/approvals/{a.id}")
    assert "alice</b> approved via page" in text and "synthetic data only" in text


def test_deny_needs_a_reason_and_two_reviewers_progress(web: Server, idp: RecordingIdP
                                                        ) -> None:
    a = held(web, min_approvals=2)
    alice, bob = Client(web.url), Client(web.url)
    login(alice, idp, "alice", ["reviewers"])
    login(bob, idp, "bob", ["reviewers"])
    status, _, text = alice.open(f"/ui/approvals/{a.id}/deny",
                                 {"reason": "  ", "csrf": alice.csrf()})
    assert status == 400 and "needs a reason" in text and not a.decided
    alice.open(f"/ui/approvals/{a.id}/approve", {"csrf": alice.csrf()})
    _, _, text = bob.open("/ui/")
    assert "1 of 2" in text and a.state == "pending"
    status, _, text = alice.open(f"/ui/approvals/{a.id}/approve", {"csrf": alice.csrf()})
    assert status == 409 and "already voted" in text
    bob.open(f"/ui/approvals/{a.id}/deny", {"reason": "not today", "csrf": bob.csrf()})
    assert a.state == "denied"
    _, _, text = bob.open("/ui/history")
    assert a.id in text and "not today" in text and "alice approved via page" in text


def test_outsider_sees_nothing_and_cannot_decide(web: Server, idp: RecordingIdP) -> None:
    a = held(web)
    own = held(web, requester="mallory", groups=("finance",))
    m = Client(web.url)
    page = login(m, idp, "mallory", ["developers"])
    assert "Nothing waiting for you" in page and a.id not in page
    assert own.id not in page  # not an approver of the rule: nothing to decide
    status, _, text = m.open(f"/ui/approvals/{a.id}")
    assert status == 404 and "make 500" not in text
    token = m.csrf("/ui/history")
    status, _, text = m.open(f"/ui/approvals/{a.id}/approve", {"csrf": token})
    assert status == 403 and "not in an approver group" in text
    status, _, _ = m.open(f"/ui/approvals/{a.id}/deny", {"csrf": token, "reason": "no"})
    assert status == 403
    assert not a.decided and not a.votes
    # and the agent itself, even in the group, cannot approve its own request
    agent = Client(web.url)
    login(agent, idp, "agent-7", ["reviewers"])
    status, _, text = agent.open(f"/ui/approvals/{a.id}/approve", {"csrf": agent.csrf()})
    assert status == 403 and "own request" in text and not a.decided


def test_logout_ends_the_session(web: Server, idp: RecordingIdP) -> None:
    c = Client(web.url)
    login(c, idp, "alice", ["reviewers"])
    sid = c.cookie("agentgate_session")
    status, _, text = c.open("/ui/logout", {"csrf": c.csrf()})
    assert status == 200 and "Signed out" in text
    status, h, _ = _get_with_cookie(web.url + "/ui/", sid or "")
    assert status == 302  # the old cookie, replayed, is no session any more


def test_login_refused_when_not_configured(tmp_path: Path, idp: RecordingIdP,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COOKIE_ENV, raising=False)
    s = Server(holder=rules_holder(tmp_path, idp))
    try:
        status, _, text = Client(s.url).open("/ui/login")
        assert status == 503 and f"${COOKIE_ENV} is not set" in text
    finally:
        s.stop()
    s = Server()  # no rules at all: no login, a clear page, no crash
    try:
        status, _, text = Client(s.url).open("/ui/login")
        assert status == 503 and "approvals.web.client_id" in text
    finally:
        s.stop()


# ---------------------------------------------------------------- escaping, headers
XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>\"'><svg onload=alert(2)>"


def test_agent_text_is_rendered_as_text(web: Server, idp: RecordingIdP) -> None:
    body = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": XSS},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": XSS, "arguments": json.dumps({"q": XSS})}}]}]}
    a = web.hold(requester=XSS, groups=("reviewers",), preview=json.dumps(body),
                 what={"kind": "llm", "upstream": XSS, "method": "POST",
                       "url": "https://x/" + XSS, "session": XSS,
                       "findings": {XSS: 2}}, rule=XSS)
    c = Client(web.url)
    for page in (login(c, idp, "alice", ["reviewers"]), c.open(f"/ui/approvals/{a.id}")[2]):
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "<svg" not in page and "onerror=alert(1)>" not in page
        assert "&lt;script&gt;alert(" in page and "&lt;/script&gt;&lt;img src=x" in page
    web.call(lambda: web.store.deny(a.id, "alice", ("reviewers",), XSS))
    _, h, page = c.open("/ui/history")
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    csp = h["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert h["x-content-type-options"] == "nosniff" and h["cache-control"] == "no-store"
    # nothing inline for the CSP to block: every script and style is a same-origin file
    assert not re.search(r"<script(?![^>]*\bsrc=\"/ui/static/)", page)
    assert " style=" not in page and "<style" not in page
    status, h, js = c.open("/ui/static/app.js")
    assert status == 200 and "innerHTML" not in js


# ---------------------------------------------------------------- live updates
def test_events_tell_only_what_the_reviewer_may_see(web: Server, idp: RecordingIdP) -> None:
    alice, mallory = Client(web.url), Client(web.url)
    login(alice, idp, "alice", ["reviewers"])
    login(mallory, idp, "mallory", ["developers"])

    def stream(c: Client) -> tuple[http.client.HTTPConnection, Any]:
        conn = http.client.HTTPConnection(web.host, web.port, timeout=5)
        conn.request("GET", "/ui/events",
                     headers={"Cookie": f"agentgate_session={c.cookie('agentgate_session')}"})
        r = conn.getresponse()
        assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
        assert r.readline().startswith(b"retry:")
        r.readline()
        return conn, r

    ca, ra = stream(alice)
    cm, rm = stream(mallory)
    try:
        a = held(web)
        lines = [ra.readline(), ra.readline(), ra.readline()]
        assert lines[2] == b"\n"
        assert lines[0] == b"event: change\n"
        assert json.loads(lines[1].split(b":", 1)[1]) == {"id": a.id, "state": "pending"}
        web.call(lambda: web.store.approve(a.id, "bob", ("reviewers",)))
        assert ra.readline() == b"event: change\n"
        assert json.loads(ra.readline().split(b":", 1)[1]) == {"id": a.id,
                                                               "state": "approved"}
        assert cm.sock is not None
        cm.sock.settimeout(0.5)
        with pytest.raises((TimeoutError, socket.timeout)):
            rm.readline()  # mallory is told nothing about a hold she cannot review
    finally:
        ca.close()
        cm.close()
    status, _, _ = Client(web.url).open("/ui/events")
    assert status == 401


# ---------------------------------------------------------------- the renderer
def test_render_openai_chat_with_tool_calls() -> None:
    body = {"model": "gpt-4o", "tools": [{"type": "function", "function": {"name": "lookup"}}],
            "messages": [
                {"role": "system", "content": "S" * 2700},
                {"role": "user", "content": [{"type": "text", "text": "find <EMAIL_1>"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": '{"email": "<EMAIL_1>"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found 1"},
                {"role": "user", "content": "now make 500 of them"}]}
    v = render({"kind": "llm"}, json.dumps(body))
    assert v.shape == "transcript" and v.title == "OpenAI chat completions"
    assert [t.role for t in v.turns] == ["system", "user", "assistant", "tool", "user"]
    assert len(v.turns[0].text) == 2700  # never cut: the last message stays visible
    assert v.turns[1].text == "find <EMAIL_1>" and v.turns[1].notes == ["image omitted"]
    call = v.turns[2].tool_calls[0]
    assert call.name == "lookup" and json.loads(call.arguments) == {"email": "<EMAIL_1>"}
    assert v.turns[3].tool_result_for == "call_1"
    assert v.turns[-1].text == "now make 500 of them"
    assert ("model", "gpt-4o") in v.params and ("tools offered", "lookup") in v.params


def test_render_anthropic_and_responses() -> None:
    body = {"model": "claude", "system": [{"type": "text", "text": "be careful"}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "tu1", "name": "sql", "input": {"q": "x"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "tu1", "content": "3 rows"}]}]}
    v = render({"kind": "llm", "host": "api.anthropic.com"}, json.dumps(body))
    assert v.title == "Anthropic messages"
    assert [(t.role, t.text) for t in v.turns] == [
        ("system", "be careful"), ("user", "hi"), ("assistant", "checking"),
        ("tool", "3 rows")]
    assert v.turns[2].tool_calls[0].name == "sql"
    assert v.turns[3].tool_result_for == "tu1"
    r = render({"kind": "llm", "path": "/v1/responses"}, json.dumps({
        "model": "gpt-5", "instructions": "sys", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "go"}]},
            {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "k"},
            {"type": "function_call_output", "call_id": "k", "output": "done"}]}))
    assert r.title == "OpenAI Responses"
    assert [(t.role, t.text) for t in r.turns] == [("system", "sys"), ("user", "go"),
                                                   ("assistant", ""), ("tool", "done")]
    assert render({"kind": "llm"}, json.dumps({"model": "m", "input": "plain"})).turns[0].text \
        == "plain"


def test_render_tool_call_sql_and_fallbacks() -> None:
    v = render({"kind": "tool"}, json.dumps({
        "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "delete_rows", "arguments": {"table": "users", "where": "1=1"}}}))
    assert v.shape == "tool" and v.calls[0].name == "delete_rows"
    assert json.loads(v.calls[0].arguments) == {"table": "users", "where": "1=1"}
    batch = render({"kind": "tool"}, json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"}]))
    assert [c.name for c in batch.calls] == ["a"]
    assert ("other methods", "notifications/initialized") in batch.params
    sql = render({"kind": "sql", "sql": "delete from users where email = '<EMAIL_1>' -- x from\n"
                   " and id > 1", "database": "crm", "statement_kind": "DELETE",
                   "tables": ["users"]}, "")
    assert sql.shape == "sql" and sql.text.splitlines() == [
        "DELETE FROM users", "WHERE email = '<EMAIL_1>' -- x from", "and id > 1"]
    assert ("tables", "users") in sql.params
    assert format_sql("select 'a from b' from t") == "SELECT 'a from b'\nFROM t"
    assert render({"kind": "http"}, '{"a": [1, 2]}').shape == "json"
    assert render({"kind": "webhook"}, "not json <b>").text == "not json <b>"
    assert render({"kind": "http"}, "").shape == "empty"
    odd = render({"kind": "llm"}, json.dumps({"messages": [1, {"role": "user",
                                                                "content": {"x": 1}}]}))
    assert odd.shape == "transcript" and odd.turns[0].role == "?"


# ---------------------------------------------------------------- store and config
def test_store_listeners_and_history_order() -> None:
    seen: list[tuple[str, str]] = []
    store = ApprovalStore()
    store.listeners.append(lambda a: seen.append((a.id, a.state)))
    store.listeners.append(lambda a: 1 / 0)  # a broken watcher is dropped, not fatal
    spec = ApprovalSpec(rule="r", groups=("g",), min_approvals=2)
    a = store.create(spec, "agent", {}, now=1.0)
    b = store.create(spec, "agent", {}, now=2.0)
    store.approve(a.id, "x", ("g",), now=3.0)
    store.deny(b.id, "x", ("g",), "no", now=4.0)
    store.deny(a.id, "y", ("g",), "no", now=5.0)
    assert seen == [(a.id, "pending"), (b.id, "pending"), (a.id, "pending"),
                    (b.id, "denied"), (a.id, "denied")]
    assert len(store.listeners) == 1
    assert [x.id for x in store.decided()] == [a.id, b.id]


def test_web_config_errors_name_file_and_key(tmp_path: Path) -> None:
    cases = {
        "approvals:\n  web: {}\n": "approvals.web: needs 'client_id'",
        "approvals:\n  web: {client_id: x, cookie_secret_env: 'a b'}\n":
            "approvals.web.cookie_secret_env: not an environment variable name",
        "approvals:\n  web: {client_id: x, cookie_secret_env: A, cookie_secret_file: /f}\n":
            "give at most one of 'cookie_secret_env' and 'cookie_secret_file'",
        "approvals:\n  web: {client_id: x, scopes: [profile]}\n": "must include 'openid'",
        "approvals:\n  web: {client_id: x, redirect_url: 'ftp://x'}\n":
            "approvals.web.redirect_url: expected an http",
        "approvals:\n  web: {client_id: x, sessions: 3}\n": "sessions",
    }
    for text, wanted in cases.items():
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(ConfigError) as e:
            load_rules(tmp_path)
        assert wanted in str(e.value) and "r.yaml" in str(e.value), (text, str(e.value))


def test_tool_and_sql_holds_on_the_page(web: Server, idp: RecordingIdP) -> None:
    tool = web.hold(requester="agent-7", groups=("reviewers",), what={
        "kind": "tool", "upstream": "crm-mcp", "method": "POST", "url": "https://mcp/x",
        "tool": "delete_rows"}, preview=json.dumps({
            "jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "delete_rows", "arguments": {"table": "customers",
                                                            "where": "region = 'EU'"}}}))
    sql = web.hold(requester="agent-7", groups=("reviewers",), what={
        "kind": "sql", "upstream": "crm-db", "database": "crm", "statement_kind": "DELETE",
        "tables": ["customers"], "sql": "delete from customers where email = $1"},
        preview="delete from customers where email = $1")
    c = Client(web.url)
    login(c, idp, "alice", ["reviewers"])
    _, _, page = c.open(f"/ui/approvals/{tool.id}")
    assert "tool call" in page and "MCP tools/call" in page
    assert "tool <code>delete_rows</code>" in page
    assert "&quot;where&quot;: &quot;region = &#x27;EU&#x27;&quot;" in page
    _, _, page = c.open(f"/ui/approvals/{sql.id}")
    assert ">SQL<" in page and "DELETE FROM customers\nWHERE email = $1" in page
    assert "<dt>tables</dt><dd>customers</dd>" in page
    counted = web.hold(requester="agent-7", groups=("reviewers",), what={
        "kind": "llm", "summary": "make <b>500</b> records",
        "findings": {"EMAIL": {"count": 3, "strategy": "pseudonymize"}, "IBAN": 1}})
    _, _, page = c.open(f"/ui/approvals/{counted.id}")
    assert '<span class="finding">EMAIL: 3</span>' in page
    assert '<span class="finding">IBAN: 1</span>' in page
    assert '<p class="summary">make &lt;b&gt;500&lt;/b&gt; records</p>' in page


def test_json_api_ignores_the_page_session(web: Server, idp: RecordingIdP) -> None:
    """The JSON API takes Bearer tokens only: a page session cookie (which a cross-site
    form would carry) authenticates nothing there, so the API needs no CSRF token."""
    a = held(web)
    c = Client(web.url)
    login(c, idp, "alice", ["reviewers"])
    sid = c.cookie("agentgate_session")
    req = urllib.request.Request(f"{web.url}/approvals/{a.id}/approve", data=b"{}",
                                 headers={"Cookie": f"agentgate_session={sid}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        _PLAIN.open(req, timeout=10)
    assert e.value.code == 401 and not a.decided


def test_cookie_key_follows_the_rules(tmp_path: Path, idp: RecordingIdP,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A rules reload keeps the listener; the page must use the key the rules name now."""
    monkeypatch.delenv(COOKIE_ENV, raising=False)
    holder = rules_holder(tmp_path, idp)
    s = Server(holder=holder)
    try:
        status, _, text = Client(s.url).open("/ui/login")
        assert status == 503 and "is not set" in text
        key = tmp_path / "key"
        key.write_text("z" * 40)
        holder.rules = load_rules(_rewrite(tmp_path, idp, cookie_secret_file=str(key)))
        c = Client(s.url)
        login(c, idp, "alice", ["reviewers"])
        sid = c.cookie("agentgate_session") or ""
        # an unrelated reload leaves the key (and the session) alone
        holder.rules = load_rules(_rewrite(tmp_path, idp, cookie_secret_file=str(key)))
        assert _get_with_cookie(s.url + "/ui/", sid)[0] == 200
        # another key: cookies signed with the old one are no session any more
        key2 = tmp_path / "key2"
        key2.write_text("y" * 40)
        holder.rules = load_rules(_rewrite(tmp_path, idp, cookie_secret_file=str(key2)))
        assert _get_with_cookie(s.url + "/ui/", sid)[0] == 302
    finally:
        s.stop()


def _rewrite(tmp: Path, idp: RecordingIdP, **web: Any) -> Path:
    approvals = {"listen": "off", "web": {"client_id": CLIENT_ID, **web}}
    (tmp / "rules.yaml").write_text(idp.identity_yaml() + "approvals: "
                                    + json.dumps(approvals) + "\n")
    return tmp


def test_agents_token_lifetime_cap_does_not_refuse_reviewer_logins(
        tmp_path: Path, idp: RecordingIdP, monkeypatch: pytest.MonkeyPatch) -> None:
    """identity.issuers[].max_lifetime caps agents' bearer tokens; the page's ID token is
    used once at sign-in and may live longer (the provider's tokens here: 300 s)."""
    monkeypatch.setenv(COOKIE_ENV, "m" * 40)
    (tmp_path / "rules.yaml").write_text(
        f"identity:\n  issuers:\n    - issuer: {idp.issuer}\n      audience: agentgate\n"
        "      max_lifetime: 60\n"
        "approvals: " + json.dumps({"listen": "off", "web": {
            "client_id": CLIENT_ID, "cookie_secret_env": COOKIE_ENV}}) + "\n")
    holder = RulesHolder()
    holder.rules = load_rules(tmp_path)
    s = Server(holder=holder)
    try:
        login(Client(s.url), idp, "alice", ["reviewers"])
    finally:
        s.stop()


def test_list_page_shortens_long_requests_detail_shows_all(web: Server,
                                                           idp: RecordingIdP) -> None:
    msgs = [{"role": "system", "content": "S" * 5000}]
    msgs += [{"role": "user", "content": f"turn {i}"} for i in range(30)]
    msgs.append({"role": "user", "content": "the last ask: " + "x" * 4000 + " END"})
    a = held(web, {"model": "gpt-4o", "messages": msgs})
    c = Client(web.url)
    page = login(c, idp, "alice", ["reviewers"])
    card = page[page.index(f'id="{a.id}"'):]
    assert "turn 29" in card and "turn 5<" not in card and "S" * 5000 not in card
    assert "the last ask: " in card and " END" in card  # the newest message, head and tail
    assert "20 earlier turns not shown" in card and "characters cut" in card
    _, _, detail = c.open(f"/ui/approvals/{a.id}")
    assert "S" * 5000 in detail and "turn 0<" in detail and "x" * 4000 + " END" in detail
    assert "Shortened here" not in detail


def test_rules_check_names_the_page_login(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("approvals:\n  web: {client_id: reviewers-app}\n")
    assert "page sign-in as OIDC client reviewers-app" in \
        load_rules(tmp_path).approvals.describe()
    (tmp_path / "r.yaml").write_text("approvals: {}\n")
    assert "page sign-in off" in load_rules(tmp_path).approvals.describe()


def test_provider_refusal_is_shown(web: Server, idp: RecordingIdP) -> None:
    c = Client(web.url)
    _, h, _ = c.open("/ui/login")
    status, h, _ = c.open(h["location"], {"action": "deny"})  # the user says no at the IdP
    assert status == 302 and "error=access_denied" in h["location"]
    status, _, text = c.open(h["location"])
    assert status == 401 and "refused the sign-in (access_denied)" in text
    assert c.cookie("agentgate_session") is None


def test_session_table_expiry_bounds_and_next_paths() -> None:
    from addons.approval.web.session import LOGIN_TTL, SessionTable, safe_next
    now = [1000.0]
    t = SessionTable(clock=lambda: now[0], max_sessions=3, max_logins=2)
    s = t.create("alice", ("reviewers",), "iss", 60)
    assert t.get(s.id) is s
    now[0] += 60
    assert t.get(s.id) is None and len(t) == 0  # expired: gone
    ids = [t.create(f"u{i}", (), "iss", 60).id for i in range(5)]
    assert len(t) == 3 and t.get(ids[0]) is None and t.get(ids[4]) is not None
    a, b, c = (t.begin_login("/ui/") for _ in range(3))
    assert t.finish_login(a.id, a.state) is None  # pushed out by the bound
    assert t.finish_login(b.id, "wrong") is None and t.finish_login(b.id, b.state) is None
    now[0] += LOGIN_TTL + 1
    assert t.finish_login(c.id, c.state) is None  # too old
    d = t.begin_login("/ui/history")
    assert t.finish_login(d.id, d.state) is d and t.finish_login(d.id, d.state) is None
    for evil in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/x",
                 "/ui/\r\nSet-Cookie: x", None, ""):
        assert safe_next(evil) == "/ui/", evil
    assert safe_next("/ui/approvals/ap-1") == "/ui/approvals/ap-1"
    assert not s.csrf_ok(None) and not s.csrf_ok("") and s.csrf_ok(s.csrf)


def test_holds_carry_findings_counts_for_the_page() -> None:
    from mitmproxy.test import tflow

    from addons.approval.addon import describe_request
    f = tflow.tflow()
    f.request.content = b'{"model": "m", "messages": [{"role": "user", "content": "<EMAIL_1>"}]}'
    f.metadata["upstream"] = {"name": "openai", "dialect": "openai"}
    f.metadata["findings"] = {"EMAIL": {"count": 2, "strategy": "pseudonymize"},
                              "IBAN": {"count": 1, "strategy": "redact"}}
    what, _, _ = describe_request(f, 4096)
    assert what["findings"] == {"EMAIL": 2, "IBAN": 1}
    assert "pseudonymize" not in json.dumps(what)
    f.metadata.pop("findings")
    assert describe_request(f, 4096)[0]["findings"] == {}
