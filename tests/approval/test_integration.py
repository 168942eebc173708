"""Approvals through a real mitmdump, real SDK clients, a real OIDC provider and the CLI."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import anthropic
import openai
import pytest

from addons.cli import main as cli_main
from tests.approval.test_addon import Receiver
from tests.conftest import Gateway

pytestmark = pytest.mark.integration

POLICIES = """
policies:
  - name: bulk-synthetic
    match: {model: ["bulk-one", "claude-bulk"]}
    action: approve
    message: bulk synthetic records need a reviewer
    approvers: [reviewers]
    timeout: 60
  - name: two-reviewers
    match: {model: ["bulk-two"]}
    action: approve
    approvers: [reviewers]
    min_approvals: 2
    timeout: 60
  - name: quick-timeout
    match: {model: ["bulk-fast"]}
    action: approve
    approvers: [reviewers]
    timeout: 2
"""


class Env:
    def __init__(self, gw: Gateway, api_url: str, tokens: dict[str, str],
                 receiver: Receiver) -> None:
        self.gw = gw
        self.api_url = api_url
        self.tokens = tokens
        self.receiver = receiver
        self.pool = concurrent.futures.ThreadPoolExecutor(8)

    def openai(self, who: str = "agent") -> openai.OpenAI:
        return openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                             http_client=openai.DefaultHttpxClient(
                                 proxy=self.gw.proxy_url(self.tokens[who]),
                                 verify=str(self.gw.ca_cert)))

    def ask(self, model: str, text: str = "make 500 synthetic customer records"
            ) -> concurrent.futures.Future:
        return self.pool.submit(lambda: self.openai().chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]))

    def api(self, method: str, path: str, who: str | None,
            body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.api_url + path, method=method,
                                     data=json.dumps(body).encode() if body else None)
        if who:
            req.add_header("Authorization", f"Bearer {self.tokens[who]}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def wait_pending(self, model: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, out = self.api("GET", "/approvals", "alice")
            assert status == 200, out
            for a in out["approvals"]:
                if a["what"]["model"] == model:
                    return a
            time.sleep(0.1)
        raise AssertionError(f"no pending approval for {model}:\n{self.gw.logs()[-3000:]}")

    def cli(self, capsys: pytest.CaptureFixture, *args: str, who: str = "alice"
            ) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli_main(["approvals", *args, "--url", self.api_url,
                       "--token", self.tokens[who]])
        out = capsys.readouterr()
        return rc, out.out, out.err


def api_url(gw: Gateway) -> str:
    deadline = time.monotonic() + 10
    while not (m := re.search(r"approvals API listening at (http://\S+)", gw.logs())):
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.05)
    return m.group(1)


@pytest.fixture
def env(gateway_factory, oidc_provider, standin) -> Any:
    receiver = Receiver(fail=1)  # the first delivery fails: retried, hold unaffected
    # (the launcher gives every gateway its own API port with agentgate_approvals_listen)
    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + POLICIES
             + "approvals:\n  link_base: https://gw.example\n  retry_grace: 1\n"
             f"  notify: {{url: '{receiver.url}', retries: 3, backoff: 0.2}}\n")
    gw = gateway_factory(rules)
    tokens = {
        # the agent is in `reviewers` too, so that the self-approval ban is what stops it
        "agent": oidc_provider.token(sub="agent-7", groups=["agents", "reviewers"]),
        "alice": oidc_provider.token(sub="alice", groups=["reviewers"]),
        "bob": oidc_provider.token(sub="bob", groups=["reviewers", "sre"]),
        "mallory": oidc_provider.token(sub="mallory", groups=["developers"]),
    }
    e = Env(gw, api_url(gw), tokens, receiver)
    yield e
    e.pool.shutdown(wait=False, cancel_futures=True)
    receiver.stop()


def test_approve_deny_timeout_and_two_of_n(env: Env, standin, capsys) -> None:
    standin.clear()
    # -- approved through the real CLI by a reviewer with a valid OIDC token
    fut = env.ask("bulk-one", "make 500 synthetic customer records like jane.roe@example.com")
    a = env.wait_pending("bulk-one")
    assert a["rule"] == "bulk-synthetic" and a["requester"] == "agent-7"
    assert "synthetic customer records" in a["preview"] and a["min_approvals"] == 1
    assert "jane.roe@example.com" not in json.dumps(a)  # reviewers see the masked body
    assert not fut.done()
    rc, out, err = env.cli(capsys, "list")
    assert rc == 0 and a["id"] in out and "bulk-synthetic" in out and "agent-7" in out
    # a reviewer outside the group, and the requester themselves, are refused
    rc, out, err = env.cli(capsys, "approve", a["id"], who="mallory")
    assert rc == 1 and "reviewer_not_in_group" in err
    rc, out, err = env.cli(capsys, "approve", a["id"], who="agent")
    assert rc == 1 and "self_approval" in err
    assert env.api("POST", f"/approvals/{a['id']}/approve", None)[0] == 401
    assert not fut.done()
    # the console script, token on stdin
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "agentgate"), "approvals", "approve",
         a["id"], "--token", "-", "--reason", "ticket 42"],
        input=env.tokens["alice"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "AGENTGATE_APPROVALS_URL": env.api_url})
    assert proc.returncode == 0, proc.stderr
    assert "approved" in proc.stdout and "alice" in proc.stdout
    reply = fut.result(30)
    assert reply.choices[0].message.content.startswith("echo: make 500 synthetic customer")
    assert len(standin.requests) == 1
    assert "jane.roe@example.com" not in json.dumps(standin.requests[0])

    # -- denied with a reason: the SDK raises a readable PermissionDeniedError
    fut = env.ask("bulk-one", "another batch")
    a = env.wait_pending("bulk-one")
    rc, out, err = env.cli(capsys, "deny", a["id"], "--reason", "not today", who="bob")
    assert rc == 0 and "denied" in out
    with pytest.raises(openai.PermissionDeniedError) as ei:
        fut.result(30)
    assert ei.value.status_code == 403 and ei.value.body["code"] == "approval_denied"
    assert "bulk-synthetic" in str(ei.value) and "not today" in str(ei.value)
    rc, out, err = env.cli(capsys, "approve", a["id"])
    assert rc == 1 and "approval_decided" in err

    # -- timeout: a clear 403, never a hang
    t0 = time.monotonic()
    with pytest.raises(openai.PermissionDeniedError) as ei:
        env.ask("bulk-fast").result(30)
    assert 1.5 < time.monotonic() - t0 < 15
    assert ei.value.body["code"] == "approval_timeout" and "quick-timeout" in str(ei.value)

    # -- 2-of-N: one approval is not enough, the same reviewer twice does not count
    fut = env.ask("bulk-two", "two reviewers please")
    a = env.wait_pending("bulk-two")
    assert env.cli(capsys, "approve", a["id"])[0] == 0
    rc, out, err = env.cli(capsys, "approve", a["id"])
    assert rc == 1 and "already_voted" in err
    rc, out, err = env.cli(capsys, "show", a["id"], "--json", who="bob")
    shown = json.loads(out)["approval"]
    assert shown["state"] == "pending" and shown["approvals"] == 1
    time.sleep(0.3)
    assert not fut.done()
    assert env.cli(capsys, "approve", a["id"], who="bob")[0] == 0
    assert fut.result(30).choices[0].message.content == "echo: two reviewers please"
    assert len(standin.requests) == 2  # the denied and timed-out requests never left

    # -- every hold was announced (the first delivery failed and was retried), and every
    # decision followed up (an incoming webhook gives no handle to edit its message)
    deadline = time.monotonic() + 10
    while len(env.receiver.bodies) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(env.receiver.bodies) == 8 and env.receiver.attempts == 9
    states = sorted(b["state"] for b in env.receiver.bodies)
    assert states == ["approved", "approved", "denied", "pending", "pending", "pending",
                      "pending", "timeout"]
    first = next(b for b in env.receiver.bodies if b["state"] == "pending")
    assert first["link"].startswith("https://gw.example/") and first["approval_id"] in \
        first["link"]
    assert "bulk-synthetic" in first["text"]
    logs = env.gw.logs()
    for tok in env.tokens.values():
        assert tok not in logs
    assert "SECRET" not in logs  # the webhook URL's path is never logged


def test_anthropic_stream_held_then_approved_and_client_gone(env: Env, standin) -> None:
    client = anthropic.Anthropic(api_key="unused", max_retries=0, timeout=60,
                                 http_client=anthropic.DefaultHttpxClient(
                                     proxy=env.gw.proxy_url(env.tokens["agent"]),
                                     verify=str(env.gw.ca_cert)))

    def stream() -> str:
        with client.messages.stream(model="claude-bulk", max_tokens=50,
                                    messages=[{"role": "user", "content": "stream it"}]) as s:
            return s.get_final_text()

    fut = env.pool.submit(stream)
    deadline = time.monotonic() + 20
    while True:
        status, out = env.api("GET", "/approvals", "bob")
        if out["approvals"]:
            break
        assert not fut.done(), (fut.exception(), env.gw.logs()[-3000:])
        assert time.monotonic() < deadline, env.gw.logs()[-3000:]
        time.sleep(0.1)
    [a] = out["approvals"]
    assert a["what"]["upstream"] == "anthropic" and a["what"]["path"] == "/v1/messages"
    assert env.api("POST", f"/approvals/{a['id']}/approve", "bob")[0] == 200
    assert fut.result(30) == "echo: stream it"

    # an agent that gives up: its approval is cancelled, not left for reviewers
    impatient = openai.OpenAI(api_key="unused", max_retries=0, timeout=1.0,
                              http_client=openai.DefaultHttpxClient(
                                  proxy=env.gw.proxy_url(env.tokens["agent"]),
                                  verify=str(env.gw.ca_cert)))
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="bulk-one",
                                          messages=[{"role": "user", "content": "x"}])
    impatient.close()
    deadline = time.monotonic() + 10
    while env.api("GET", "/approvals", "alice")[1]["approvals"]:
        assert time.monotonic() < deadline, env.gw.logs()[-2000:]
        time.sleep(0.1)
    assert "the client disconnected" in env.gw.logs()


class MitmWeb:
    """mitmweb's own REST API (what its UI and command bar call)."""

    def __init__(self, gw: Gateway, password: str) -> None:
        deadline = time.monotonic() + 20
        while not (m := re.search(r"Web server listening at (http://[^/\s]+)", gw.logs())):
            assert time.monotonic() < deadline, gw.logs()
            time.sleep(0.05)
        self.base = m.group(1)
        self.password = password
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None
                                     else (b"" if method == "POST" else None))
        req.add_header("Authorization", f"Bearer {self.password}")
        # tornado's XSRF check: the same token in cookie and header
        req.add_header("Cookie", "_mitmproxy_xsrf=agentgatetest")
        req.add_header("X-XSRFToken", "agentgatetest")
        req.add_header("Content-Type", "application/json")
        with self.opener.open(req, timeout=10) as r:
            data = r.read()
        return json.loads(data) if data.strip() else None

    def held(self, rule: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.call("GET", "/flows"):
                if f.get("intercepted") and rule in (f.get("comment") or ""):
                    return f
            time.sleep(0.1)
        raise AssertionError(f"no intercepted flow for rule {rule}")


def test_mitmweb_shows_holds_and_commands_decide(gateway_factory, no_identity,
                                                 standin) -> None:
    rules = ("{standin_upstreams}" + no_identity + """
policies:
  - name: web-reviewers-only
    match: {model: [web-strict]}
    action: approve
    approvers: [reviewers]
    timeout: 60
  - name: web-operator-may
    match: {model: [web-operator]}
    action: approve
    approvers: [reviewers]
    allow_mitmweb: true
    timeout: 60
""")
    gw = gateway_factory(rules, web=True, extra_args=("--set", "web_password=agentgate-pw"))
    web = MitmWeb(gw, "agentgate-pw")
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                 verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def ask(model: str) -> concurrent.futures.Future:
        return pool.submit(lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hi {model}"}]))

    try:
        # a strict rule: mitmweb's resume button is ignored, approve refused, deny works
        fut = ask("web-strict")
        f = web.held("web-reviewers-only")
        assert f["marked"] == "⌛" and "agentgate approvals approve ap-" in f["comment"]
        web.call("POST", f"/flows/{f['id']}/resume")
        deadline = time.monotonic() + 10
        while "mitmweb resume ignored" not in (f := web.held("web-reviewers-only"))["comment"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not fut.done()
        out = web.call("POST", "/commands/agentgate.approve", {"arguments": ["@all"]})
        assert "does not allow approval from mitmweb" in out["error"]
        assert not fut.done()
        out = web.call("POST", "/commands/agentgate.approvals", {"arguments": []})
        assert len(out["value"]) == 1 and "web-reviewers-only" in out["value"][0]
        web.call("POST", "/commands/agentgate.deny",
                 {"arguments": ["@all", "not from the web UI"]})
        with pytest.raises(openai.PermissionDeniedError) as ei:
            fut.result(30)
        assert "not from the web UI" in str(ei.value)
        assert ei.value.body["code"] == "approval_denied"

        # a rule that allows the operator: resume in mitmweb approves
        fut = ask("web-operator")
        f = web.held("web-operator-may")
        assert re.search(r"agentgate\.approve ap-\w+ in mitmweb", f["comment"])
        web.call("POST", f"/flows/{f['id']}/resume")
        assert fut.result(30).choices[0].message.content == "echo: hi web-operator"
        assert "mitmweb-operator" in gw.logs()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
