"""The approval addon with taddons/tflow: holds, decisions, timeouts, mitmweb, API, webhook."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.approval.addon import Approval, describe_request, spec_from_decision
from addons.approval.api import AuthError
from addons.approval.config import ApprovalsConfig, NotifyConfig
from addons.approval.notify import post_json
from addons.approval.store import OPERATOR, ApprovalStore
from addons.config.holder import RulesHolder

USERS = {
    "tok-alice": {"sub": "alice", "groups": ["reviewers"]},
    "tok-bob": {"sub": "bob", "groups": ["reviewers", "staff"]},
    "tok-mallory": {"sub": "mallory", "groups": ["developers"]},
    "tok-agent": {"sub": "agent-1", "groups": ["reviewers"]},  # a requester in the group
}


async def fake_verify(token: str) -> dict[str, Any]:
    if token in USERS:
        return dict(USERS[token])
    raise AuthError("signature does not verify")


class FakeRules:
    def __init__(self, approvals: ApprovalsConfig) -> None:
        self.approvals = approvals


def make_addon(cfg: ApprovalsConfig | None = None) -> Approval:
    holder = RulesHolder()
    holder.rules = FakeRules(cfg or ApprovalsConfig(listen=None))  # type: ignore[assignment]
    return Approval(holder, ApprovalStore(), verify=fake_verify)


def decision(rule: str = "bulk", **approval: Any) -> dict[str, Any]:
    ap = {"groups": ["reviewers"], "min_approvals": 1, "timeout": 30, "on_timeout": "deny",
          "allow_mitmweb": False}
    ap.update(approval)
    return {"action": "approve", "rule": rule, "message": "bulk generation", "observed": False,
            "approval": ap}


def held_flow(dec: dict[str, Any] | None = None, sub: str = "agent-1",
              body: dict[str, Any] | None = None) -> Any:
    f = tflow.tflow()
    f.request.host = "api.openai.com"
    f.request.port = 443
    f.request.scheme = "https"
    f.request.path = "/v1/chat/completions?api_key=SECRETQUERY"
    f.request.method = "POST"
    f.request.content = json.dumps(body or {
        "model": "gpt-4o", "n": 50,
        "messages": [{"role": "user", "content": "make 50 records for <PERSON_1>"}]}).encode()
    f.metadata["upstream"] = {"name": "openai", "dialect": "openai"}
    f.metadata["identity"] = {"sub": sub, "iss": "https://idp", "groups": []}
    if dec is not None:
        f.metadata["decision"] = dec
    return f


def run(coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(*args), 30))


async def until(cond: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def api(addon: Approval, method: str, path: str, token: str | None = None,
              body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    status, payload, _ = await addon.api.handle(
        method, path, headers, json.dumps(body).encode() if body is not None else b"")
    return status, payload


# ---------------------------------------------------------------- holding and deciding
def test_flows_without_approve_decision_pass() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            for dec in (None, {"action": "allow", "rule": "x"},
                        dict(decision(), observed=True)):
                f = held_flow(dec)
                await addon.request(f)
                assert not f.intercepted and f.response is None
                assert "approval" not in f.metadata
            assert len(addon.store) == 0
    run(main)


def test_hold_then_approve_via_api() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            assert f.intercepted and f.marked == ":hourglass:"
            assert "rule bulk" in f.comment
            assert f.metadata["approval"]["state"] == "pending"
            status, listing = await api(addon, "GET", "/approvals", "tok-alice")
            assert status == 200
            [item] = listing["approvals"]
            assert item["what"]["model"] == "gpt-4o" and item["requester"] == "agent-1"
            assert item["what"]["url"] == "https://api.openai.com/v1/chat/completions"
            assert "SECRETQUERY" not in json.dumps(item)
            assert "<PERSON_1>" in item["preview"] and item["you_may_approve"] is True
            status, out = await api(addon, "POST", f"/approvals/{item['id']}/approve",
                                    "tok-alice", {"reason": "ticket 42"})
            assert status == 200 and out["approval"]["state"] == "approved"
            await asyncio.wait_for(task, 5)
            assert not f.intercepted and f.response is None
            meta = f.metadata["approval"]
            assert meta["state"] == "approved" and meta["approvers"] == ["alice"]
            assert meta["decided_at"] >= meta["requested_at"]
            assert meta["requester"] == "agent-1" and meta["rule"] == "bulk"
    run(main)


def test_deny_answers_403_in_dialect() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            aid = addon.store.pending()[0].id
            status, out = await api(addon, "POST", f"/approvals/{aid}/deny", "tok-bob", {})
            assert status == 400 and out["error"]["code"] == "reason_required"
            status, _ = await api(addon, "POST", f"/approvals/{aid}/deny", "tok-bob",
                                  {"reason": "too many records"})
            assert status == 200
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 403 and not f.intercepted
            err = json.loads(f.response.content)["error"]
            assert err["code"] == "approval_denied" and err["rule"] == "bulk"
            assert "too many records" in err["message"]
            assert f.metadata["approval"]["state"] == "denied"
            assert f.metadata["approval"]["denied_by"] == "bob"
            status, out = await api(addon, "POST", f"/approvals/{aid}/approve", "tok-alice")
            assert status == 409 and out["error"]["code"] == "approval_decided"
    run(main)


@pytest.mark.parametrize(("on_timeout", "status_cfg", "expect"), [
    ("deny", 403, 403), ("deny", 408, 408), ("allow", 403, None)])
def test_timeout(on_timeout: str, status_cfg: int, expect: int | None) -> None:
    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=None, timeout_status=status_cfg))
        with taddons.context(addon):
            f = held_flow(decision(timeout=0.3, on_timeout=on_timeout))
            t0 = time.monotonic()
            await addon.request(f)
            assert 0.25 < time.monotonic() - t0 < 3
            assert not f.intercepted and f.metadata["approval"]["state"] == "timeout"
            if expect is None:
                assert f.response is None
            else:
                assert f.response.status_code == expect
                assert json.loads(f.response.content)["error"]["code"] == "approval_timeout"
            assert len(addon.store) == 0
    run(main)


def test_anthropic_dialect_and_two_of_n() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision(min_approvals=2))
            f.metadata["upstream"] = {"name": "anthropic", "dialect": "anthropic"}
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            aid = addon.store.pending()[0].id
            assert (await api(addon, "POST", f"/approvals/{aid}/approve", "tok-alice"))[0] == 200
            status, out = await api(addon, "POST", f"/approvals/{aid}/approve", "tok-alice")
            assert status == 409 and out["error"]["code"] == "already_voted"
            assert f.intercepted and not task.done()
            assert "1 so far (alice)" in f.comment
            status, out = await api(addon, "POST", f"/approvals/{aid}/deny", "tok-bob",
                                    {"reason": "no"})
            await asyncio.wait_for(task, 5)
            body = json.loads(f.response.content)
            assert body["type"] == "error" and body["error"]["code"] == "approval_denied"
    run(main)


def test_api_refusals() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            aid = addon.store.pending()[0].id
            path = f"/approvals/{aid}/approve"
            status, out = await api(addon, "POST", path)
            assert status == 401 and out["error"]["code"] == "token_missing"
            status, out = await api(addon, "POST", path, "forged.token.value")
            assert status == 401 and "signature" in out["error"]["message"]
            assert "forged" not in json.dumps(out)
            status, out = await api(addon, "POST", path, "tok-mallory")
            assert status == 403 and out["error"]["code"] == "reviewer_not_in_group"
            status, out = await api(addon, "POST", path, "tok-agent")
            assert status == 403 and out["error"]["code"] == "self_approval"
            status, out = await api(addon, "POST", "/approvals/ap-unknown/approve", "tok-bob")
            assert status == 404
            status, out = await api(addon, "GET", f"/approvals/{aid}", "tok-mallory")
            assert status == 403
            status, out = await api(addon, "GET", "/approvals", "tok-mallory")
            assert status == 200 and out["approvals"] == []
            status, out = await api(addon, "DELETE", path, "tok-bob")
            assert status == 405
            status, out, _ = await addon.api.handle("POST", path,
                                                    {"authorization": "Bearer tok-bob"}, b"[1]")
            assert status == 400
            assert f.intercepted and not task.done()  # nothing above decided anything
            addon.store.cancel(aid, "test over")
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 503
    run(main)


def test_verifier_crash_is_503_not_401() -> None:
    async def broken(token: str) -> dict[str, Any]:
        raise RuntimeError("jwks down")

    async def main() -> None:
        addon = make_addon()
        addon._verify = broken
        with taddons.context(addon):
            status, out = await api(addon, "GET", "/approvals", "tok-alice")
            assert status == 503 and out["error"]["code"] == "identity_unavailable"
    run(main)


def test_other_flows_are_not_delayed_by_held_ones() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            # 200 holds from 20 agents (the per-identity cap is 20 by default)
            # (distinct bodies: identical ones would join one hold, see test_dedupe.py)
            held = [held_flow(decision(), sub=f"agent-{i % 20}",
                              body={"model": "gpt-4o", "messages": [
                                  {"role": "user", "content": f"task {i}"}]})
                    for i in range(200)]
            tasks = [asyncio.create_task(addon.request(f)) for f in held]
            await until(lambda: len(addon.store) == 200)
            t0 = time.perf_counter()
            for _ in range(1000):
                g = held_flow({"action": "allow", "rule": "x"})
                await addon.request(g)
                assert g.response is None
            assert time.perf_counter() - t0 < 2
            assert all(f.intercepted for f in held)
            for a in addon.store.pending():
                addon.store.deny(a.id, "bob", ["reviewers"], "bulk")
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert all(f.response.status_code == 403 for f in held)
    run(main)


# ---------------------------------------------------------------- mitmweb
def test_mitmweb_resume_is_ignored_unless_rule_allows() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            f.resume()  # what mitmweb's resume button does
            await until(lambda: f.intercepted)
            assert not task.done() and "mitmweb resume ignored" in f.comment
            aid = f.metadata["approval"]["id"]
            with pytest.raises(exceptions.CommandError, match="does not allow"):
                addon.approve_cmd(aid)
            addon.deny_cmd(aid, "operator says no")
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 403
            assert f.metadata["approval"]["denied_by"] == OPERATOR

            g = held_flow(decision(allow_mitmweb=True))
            task = asyncio.create_task(addon.request(g))
            await until(lambda: len(addon.store) == 1)
            assert "agentgate.approve" in g.comment
            g.resume()
            await asyncio.wait_for(task, 5)
            assert g.response is None and g.metadata["approval"]["approvers"] == [OPERATOR]

            h = held_flow(decision(allow_mitmweb=True, min_approvals=2))
            task = asyncio.create_task(addon.request(h))
            await until(lambda: len(addon.store) == 1)
            addon.approve_cmd(h.metadata["approval"]["id"], "looks fine")
            assert h.intercepted and not task.done()
            assert "approvals=1/2 llm: gpt-4o make 50 records" in addon.list_cmd()[0]
            assert "approve by mitmweb-operator via mitmweb: looks fine" in h.comment
            aid = addon.store.pending()[0].id
            await api(addon, "POST", f"/approvals/{aid}/approve", "tok-bob")
            await asyncio.wait_for(task, 5)
            assert h.response is None
            assert h.metadata["approval"]["approvers"] == [OPERATOR, "bob"]
    run(main)


def test_killed_flow_and_client_disconnect_release_the_hold() -> None:
    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=None, retry_grace=0.3))
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            f.kill()  # the operator's kill button: mitmproxy sets no resume event
            await asyncio.wait_for(task, 5)
            assert f.metadata["approval"]["state"] == "cancelled" and f.response is None
            assert f.marked == ":heavy_multiplication_x:"  # killed: cancelled, not ⌛

            g = held_flow(decision())
            task = asyncio.create_task(addon.request(g))
            await until(lambda: len(addon.store) == 1)
            addon.client_disconnected(g.client_conn)
            await asyncio.wait_for(task, 5)
            # the flow is answered at once; the hold waits a moment for the client's retry
            assert g.metadata["approval"]["left"] and not g.intercepted
            assert g.metadata["approval"]["state"] == "cancelled"
            assert g.response.status_code == 503
            a = addon.store.get(g.metadata["approval"]["id"])
            assert a.state == "pending"
            await until(lambda: a.decided)
            assert a.state == "cancelled" and a.reason.startswith("the client disconnected")
    run(main)


def test_malformed_decision_fails_closed_and_queue_limit() -> None:
    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=None, max_pending=1))
        addon.store.max_pending = 1
        with taddons.context(addon):
            f = held_flow(decision(min_approvals=0))
            await addon.request(f)
            assert f.response.status_code == 503 and not f.intercepted
            assert json.loads(f.response.content)["error"]["code"] == "gateway_error"
            g = held_flow(decision())
            task = asyncio.create_task(addon.request(g))
            await until(lambda: len(addon.store) == 1)
            h = held_flow(decision(), body={"model": "gpt-4o", "n": 2})  # not a retry of g
            await addon.request(h)
            assert h.response.status_code == 429
            assert json.loads(h.response.content)["error"]["code"] == "approval_queue_full"
            addon.done()  # gateway stopping: held flows are answered, not hung
            await asyncio.wait_for(task, 5)
            assert g.response.status_code == 503
    run(main)


def test_spec_defaults_from_config() -> None:
    cfg = ApprovalsConfig(default_timeout=42, on_timeout="allow")
    spec = spec_from_decision({"action": "approve", "rule": "r",
                               "approval": {"groups": "reviewers"}}, cfg)
    assert spec.timeout == 42 and spec.on_timeout == "allow" and not spec.allow_mitmweb
    assert spec.groups == ("reviewers",) and spec.min_approvals == 1
    dec = decision(allow_mitmweb=True, timeout=7)
    assert spec_from_decision(dec, cfg).allow_mitmweb
    assert spec_from_decision(dec, cfg).timeout == 7
    # the section's master switch overrides every rule
    assert not spec_from_decision(dec, ApprovalsConfig(allow_mitmweb=False)).allow_mitmweb
    for bad in ({"groups": [1]}, {"timeout": -1}, {"on_timeout": "x"},
                {"allow_mitmweb": "yes"}, {"min_approvals": True}):
        with pytest.raises(ValueError):
            spec_from_decision({"action": "approve", "approval": bad}, cfg)


def test_preview_is_truncated() -> None:
    f = held_flow(body={"model": "m", "text": "x" * 5000})
    what, preview, truncated = describe_request(f, 100)
    assert len(preview) == 100 and truncated and what["model"] == "m"
    what, preview, truncated = describe_request(f, 100_000)
    assert not truncated and json.loads(preview)["text"] == "x" * 5000


# ---------------------------------------------------------------- real sockets
class Receiver:
    """A local webhook receiver that fails the first `fail` deliveries."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        rec = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers["content-length"]))
                rec.attempts += 1
                if rec.attempts <= rec.fail:
                    self.send_response(500)
                else:
                    rec.bodies.append(json.loads(data))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/SECRET"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_notification_retries_and_never_releases(caplog: pytest.LogCaptureFixture) -> None:
    rec = Receiver(fail=2)

    async def main() -> None:
        cfg = ApprovalsConfig(listen=None, link_base="https://gw.example",
                              notify=NotifyConfig(url=rec.url, retries=3, backoff=0.05,
                                                  max_backoff=0.1, timeout=2))
        addon = make_addon(cfg)
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(rec.bodies) == 1)
            assert rec.attempts == 3 and f.intercepted and not task.done()
            body = rec.bodies[0]
            aid = addon.store.pending()[0].id
            assert body["approval_id"] == aid and aid in body["text"]
            assert body["link"] == f"https://gw.example/approvals/{aid}"
            assert body["blocks"][0]["type"] == "section"
            addon.store.cancel(aid, "done")
            await asyncio.wait_for(task, 5)
            # unreachable receiver: logged, retried, hold untouched
            addon2 = make_addon(ApprovalsConfig(
                listen=None, notify=NotifyConfig(url="http://127.0.0.1:9/x/SECRET", retries=1,
                                                 backoff=0.05, max_backoff=0.05, timeout=1)))
            g = held_flow(decision())
            task = asyncio.create_task(addon2.request(g))
            await until(lambda: addon2.notifier.failed_attempts == 2)
            await asyncio.sleep(0.05)
            assert g.intercepted and not task.done()
            addon2.store.cancel(addon2.store.pending()[0].id, "done")
            await asyncio.wait_for(task, 5)
    try:
        run(main)
    finally:
        rec.stop()
    assert "failed after 2 attempts" in caplog.text
    assert "SECRET" not in caplog.text


def test_api_over_a_real_socket() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            host, port = await addon.api.start("127.0.0.1", 0)
            base = f"http://{host}:{port}"
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            aid = addon.store.pending()[0].id

            def call(method: str, path: str, token: str | None, body: bytes | None = None
                     ) -> tuple[int, dict[str, Any]]:
                req = urllib.request.Request(base + path, data=body, method=method)
                if token:
                    req.add_header("Authorization", f"Bearer {token}")
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(req, timeout=5) as r:
                        return r.status, json.load(r)
                except urllib.error.HTTPError as e:
                    return e.code, json.load(e)

            status, out = await asyncio.to_thread(call, "GET", "/healthz", None)
            assert status == 200 and out == {"ok": True}
            status, out = await asyncio.to_thread(call, "GET", "/approvals", None)
            assert status == 401
            status, out = await asyncio.to_thread(call, "GET", "/approvals", "tok-bob")
            assert status == 200 and out["approvals"][0]["id"] == aid
            status, out = await asyncio.to_thread(
                call, "POST", f"/approvals/{aid}/approve", "tok-bob", b'{"reason": "ok"}')
            assert status == 200
            await asyncio.wait_for(task, 5)
            assert f.metadata["approval"]["approvers"] == ["bob"]
            # a slow or broken client does not break the server
            r, w = await asyncio.open_connection(host, port)
            w.write(b"GARBAGE\r\n\r\n")
            assert (await r.readline()).startswith(b"HTTP/1.1 400")
            w.close()
            status = await post_json(f"{base}/approvals/x/approve", {}, timeout=5)
            assert status == 401
            await addon.api.stop()
    run(main)


def test_slack_message_names_rule_and_buttons() -> None:
    from addons.approval.slack import message
    store = ApprovalStore()
    spec = spec_from_decision(decision(), ApprovalsConfig())
    a = store.create(spec, "agent-1", {"method": "POST", "url": "https://x/y", "model": "m",
                                       "kind": "llm", "summary": "make <b>50</b> records"})
    p = message(a, "http://gw/approvals/" + a.id)
    text = json.dumps(p)
    assert a.id in p["text"] and "bulk" in text and "agent-1" in text and "model m" in text
    assert "make &lt;b&gt;50&lt;/b&gt; records" in text  # escaped: no injected markup
    b = store.create(spec, "agent-1", {"method": "POST", "url": "https://x/y", "kind": "tool",
                                       "tool": "<!channel> <https://evil|click>"})
    sent = json.dumps(message(b, ""))
    assert "<!channel>" not in sent and "<https://evil" not in sent  # no mention, no link
    buttons = p["blocks"][-1]["elements"]
    assert [b["action_id"] for b in buttons] == ["agentgate_approve", "agentgate_deny",
                                                 "agentgate_open"]
    assert buttons[2]["url"] == "http://gw/approvals/" + a.id


def test_listener_follows_option_and_rules() -> None:
    import socket

    from addons.devkit.launch import free_port

    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=("127.0.0.1", 0)))
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(addon, agentgate_approvals_listen="nowhere")
            addon.running()
            await until(lambda: addon.api.address is not None)
            assert addon.api.address[1] != 0
            # a rules reload with another address moves the listener
            port = free_port()
            addon.holder.install(FakeRules(ApprovalsConfig(listen=("127.0.0.1", port))))
            await until(lambda: addon.api.address == ("127.0.0.1", port))
            assert addon._link("ap-1") == f"http://127.0.0.1:{port}/approvals/ap-1"
            addon.holder.install(FakeRules(ApprovalsConfig(listen=None)))
            await until(lambda: addon.api.address is None)
            # the option overrides the rules
            port = free_port()
            tctx.configure(addon, agentgate_approvals_listen=f"127.0.0.1:{port}")
            await until(lambda: addon.api.address == ("127.0.0.1", port))
            # a port in use: logged, the gateway runs on (holds can still time out)
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                taken = busy.getsockname()[1]
                tctx.configure(addon, agentgate_approvals_listen=f"127.0.0.1:{taken}")
                await until(lambda: addon.api.address is None)
                await asyncio.sleep(0.05)
                assert addon.api.address is None
            addon.done()
            assert addon.api.address is None
    run(main)


def test_notification_over_https_with_own_ca(standin) -> None:
    """The stand-in's webhook receiver (HTTPS, private CA) gets the Slack JSON directly."""
    standin.clear()

    async def main() -> None:
        cfg = ApprovalsConfig(listen=None, notify=NotifyConfig(
            url=f"{standin.url}/services/T1/B1/hook", retries=0, timeout=5,
            ca_file=str(standin.ca_path)))
        addon = make_addon(cfg)
        with taddons.context(addon):
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: addon.notifier.sent == 1)
            aid = addon.store.pending()[0].id
            addon.store.approve(aid, "bob", ["reviewers"])
            await asyncio.wait_for(task, 5)
            # the follow-up is posted in the background once the flow is released: wait for
            # its delivery, not for the flow (under load it came after the read below)
            await until(lambda: addon.notifier.sent == 2, timeout=30)
        # without the CA the TLS handshake fails: logged, counted, not delivered
        bad = make_addon(ApprovalsConfig(listen=None, notify=NotifyConfig(
            url=f"{standin.url}/services/T1/B1/hook", retries=0, timeout=5)))
        with taddons.context(bad):
            g = held_flow(decision())
            task = asyncio.create_task(bad.request(g))
            await until(lambda: bad.notifier.failed_attempts == 1)
            assert g.intercepted and not task.done()
            bad.store.cancel(bad.store.pending()[0].id, "done")
            await asyncio.wait_for(task, 5)
    run(main)
    # the message of the new hold, then (an incoming webhook gives no handle to edit it)
    # a follow-up saying it was approved; the second addon's deliveries never arrived
    created, decided = [json.loads(r["body"]) for r in standin.requests
                        if r["path"].startswith("/services/")]
    assert created["rule"] == "bulk" and created["state"] == "pending"
    assert [b["action_id"] for b in created["blocks"][-1]["elements"]][:2] == [
        "agentgate_approve", "agentgate_deny"]
    assert decided["approval_id"] == created["approval_id"] and decided["state"] == "approved"
    assert "Approved by bob via api" in json.dumps(decided)


def test_contract_with_the_policy_engine() -> None:
    """What the policy engine really writes is what this addon reads."""
    from addons.config.schema import Where
    from addons.policy.config import parse_policies
    from addons.policy.engine import Decision

    ps = parse_policies([
        ({"name": "defaults", "action": "approve", "approvers": ["g"]}, Where("f", "p[0]")),
        ({"name": "explicit", "action": "approve", "approvers": ["g", "h"], "timeout": 12,
          "min_approvals": 2, "on_timeout": "allow", "allow_mitmweb": True},
         Where("f", "p[1]")),
    ], ())
    cfg = ApprovalsConfig(default_timeout=77, on_timeout="deny")
    specs = []
    for rule in ps.rules:
        meta = Decision(action="approve", rule=rule.name, message="m",
                        approval=rule.approval).to_metadata()
        json.dumps(meta)  # plain data only
        specs.append(spec_from_decision(meta, cfg))
    assert specs[0].timeout == 77 and specs[0].on_timeout == "deny"
    assert specs[0].groups == ("g",) and not specs[0].allow_mitmweb
    assert specs[1].timeout == 12 and specs[1].on_timeout == "allow"
    assert specs[1].min_approvals == 2 and specs[1].allow_mitmweb
    assert specs[1].groups == ("g", "h") and specs[1].rule == "explicit"


def test_per_identity_cap_refuses_in_the_callers_dialect() -> None:
    async def main() -> None:
        addon = make_addon()
        addon.store.max_pending_per_identity = 2
        with taddons.context(addon):
            held = [held_flow(decision(), sub="hog", body={"model": "m", "n": i})
                    for i in range(2)]
            tasks = [asyncio.create_task(addon.request(f)) for f in held]
            await until(lambda: len(addon.store) == 2)
            extra = held_flow(decision(), sub="hog", body={"model": "m", "n": 3})
            await addon.request(extra)
            assert extra.response is not None and extra.response.status_code == 429
            err = json.loads(extra.response.content)["error"]
            assert err["code"] == "approval_quota_exceeded"
            assert err["type"] == "rate_limit_error"
            other = held_flow(decision(), sub="someone-else")
            task = asyncio.create_task(addon.request(other))
            await until(lambda: len(addon.store) == 3)
            assert other.response is None and other.intercepted
            for a in addon.store.pending():
                addon.store.deny(a.id, "bob", ["reviewers"], "bulk")
            await asyncio.wait_for(asyncio.gather(*tasks, task), 10)
    run(main)


# ---------------------------------------------------------------- holds that are not flows
def test_external_hold_is_decided_like_a_flow() -> None:
    """The database path holds a statement (no HTTP flow) through `Approval.hold`: the same
    store, reviewers and quotas; approve, deny and timeout come back as the decided approval."""
    from addons.approval.store import ApprovalSpec

    async def main() -> None:
        addon = make_addon()
        spec = ApprovalSpec(rule="writes", groups=("reviewers",), timeout=5)
        what = {"kind": "sql", "database": "analytics", "sql": "DELETE FROM t WHERE id = 1"}
        with taddons.context(addon):
            task = asyncio.create_task(addon.hold(spec, "agent-1", what, what["sql"]))
            await until(lambda: len(addon.store.pending()) == 1)
            a = addon.store.pending()[0]
            assert a.what["kind"] == "sql"
            addon.store.approve(a.id, "alice", ("reviewers",), reason="looks fine")
            done = await task
            assert done.state == "approved"

            task = asyncio.create_task(addon.hold(spec, "agent-1", what, what["sql"]))
            await until(lambda: len(addon.store.pending()) == 1)
            addon.store.deny(addon.store.pending()[0].id, "bob", ("reviewers",), reason="no")
            assert (await task).state == "denied"

            short = ApprovalSpec(rule="writes", groups=("reviewers",), timeout=0.2)
            assert (await addon.hold(short, "agent-1", what, "")).state == "timeout"

            gone = {"yes": False}
            task = asyncio.create_task(addon.hold(spec, "agent-1", what, "",
                                                  gone=lambda: gone["yes"]))
            await until(lambda: len(addon.store.pending()) == 1)
            gone["yes"] = True
            assert (await task).state == "cancelled"
            assert not addon._external
    run(main)


def test_kind_of_a_held_flow() -> None:
    f = held_flow(decision())
    assert describe_request(f, 100)[0]["kind"] == "llm"
    f.metadata["upstream"] = {"name": "tools", "dialect": "mcp"}
    assert describe_request(f, 100)[0]["kind"] == "tool"
    f.metadata["upstream"] = {"name": "x", "dialect": "generic"}
    assert describe_request(f, 100)[0]["kind"] == "http"


def test_reviewers_see_the_whole_masked_request_and_a_summary() -> None:
    """A 2.7 KB system prompt cut the triggering user message out of a 2,000-character
    preview; now the whole request (up to preview_bytes) is kept, and `what` names the
    kind, model, tool and a one-line summary."""
    system = "You are a careful data assistant. " * 80  # ~2.7 KB
    f = held_flow(body={"model": "gpt-4o", "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "export all <PERSON_1>\n"
                                                              "records as CSV"}]}]})
    what, preview, truncated = describe_request(f, ApprovalsConfig().preview_bytes)
    assert not truncated and "export all <PERSON_1>" in preview and system in preview
    assert what["kind"] == "llm" and what["model"] == "gpt-4o"
    assert what["summary"] == "export all <PERSON_1> records as CSV"
    # an MCP tools/call: the tool and its argument names (values stay in the preview)
    f = held_flow(body={"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                        "params": {"name": "delete_file", "arguments": {"path": "/etc/x",
                                                                        "force": True}}})
    f.metadata["upstream"] = {"name": "files", "dialect": "mcp"}
    what, preview, _ = describe_request(f, 1000)
    assert what["kind"] == "tool" and what["tool"] == "delete_file"
    assert what["summary"] == "tools/call delete_file(force, path)" and "/etc/x" in preview
    # a long summary is cut to one short line; a multi-byte character is never split
    f = held_flow(body={"model": "m", "messages": [{"role": "user", "content": "é" * 500}]})
    what, preview, truncated = describe_request(f, 101)
    assert len(what["summary"]) <= 160 and what["summary"].endswith("…")
    assert truncated and "\ufffd" not in preview


def test_decided_approvals_keep_a_short_preview() -> None:
    """Up to keep_decided approvals stay in memory after their decision: each keeps a
    short preview, not the whole 256 KiB request."""
    from addons.approval.addon import DECIDED_PREVIEW_CHARS

    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            f = held_flow(decision(), body={"model": "m", "messages": [
                {"role": "user", "content": "y" * 100_000}]})
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(addon.store) == 1)
            a = addon.store.pending()[0]
            assert len(a.preview) > 100_000 and not a.preview_truncated
            addon.store.approve(a.id, "bob", ["reviewers"])
            await asyncio.wait_for(task, 5)
            assert len(a.preview) == DECIDED_PREVIEW_CHARS and a.preview_truncated
    run(main)
