"""Slack notifications that act, through real sockets: the reviewers' tornado listener
serves /slack/actions, a local HTTP receiver stands in for Slack (incoming webhook,
response_url, Web API), and every callback is signed here the way Slack signs it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from mitmproxy.test import taddons

from addons.approval.config import ApprovalsConfig, NotifyConfig
from addons.approval.slack import SlackConfig
from tests.approval.test_addon import decision, held_flow, make_addon, run, until

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
ENV = "AGENTGATE_TEST_SLACK_SECRET"
BOT_ENV = "AGENTGATE_TEST_SLACK_BOT"
USERS = {"UALICE01": "alice", "UBOB0001": "bob", "UMAL0001": "mallory"}
GROUPS = {"reviewers": ("UALICE01", "UBOB0001"), "developers": ("UMAL0001",)}


class Slack:
    """What Slack's side does with our posts: records them; the Web API answers ok."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                me.posts.append((self.path, dict(self.headers), body))
                answer = b"ok"
                if self.path.startswith("/api/"):
                    answer = json.dumps({"ok": True, "channel": "C0AGENTS", "ts": "1700.0001"}
                                        ).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, prefix: str) -> list[dict[str, Any]]:
        return [b for p, _h, b in self.posts if p.startswith(prefix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV, SECRET)
    s = Slack()
    yield s
    s.stop()


def config(slack: Slack, *, bot: bool = False) -> ApprovalsConfig:
    return ApprovalsConfig(
        listen=None, link_base="https://gw.example:8081",
        notify=NotifyConfig(url=f"{slack.base}/services/T0/B0/HOOK", retries=1, backoff=0.05,
                            timeout=5),
        slack=SlackConfig(signing_secret_env=ENV, users=dict(USERS), groups=dict(GROUPS),
                          bot_token_env=BOT_ENV if bot else None,
                          channel="C0AGENTS" if bot else None, api_url=f"{slack.base}/api"))


def signed(payload: dict[str, Any], *, secret: str = SECRET, ts: int | None = None
           ) -> tuple[bytes, dict[str, str]]:
    """A callback as Slack sends it: form-encoded `payload`, v0 HMAC-SHA256 signature."""
    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    ts_text = str(int(time.time()) if ts is None else ts)
    mac = hmac.new(secret.encode(), b"v0:" + ts_text.encode() + b":" + body, hashlib.sha256)
    return body, {"X-Slack-Request-Timestamp": ts_text,
                  "X-Slack-Signature": "v0=" + mac.hexdigest(),
                  "Content-Type": "application/x-www-form-urlencoded"}


def click(slack: Slack, user: str, action: str, approval_id: str, n: int = 0
          ) -> dict[str, Any]:
    return {"type": "block_actions", "user": {"id": user, "username": user.lower()},
            "trigger_id": f"trig-{n}", "response_url": f"{slack.base}/respond/{n}",
            "actions": [{"action_id": f"agentgate_{action}", "value": approval_id,
                         "type": "button"}]}


async def post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    def go() -> tuple[int, Any]:
        req = urllib.request.Request(f"{base}/slack/actions", data=body, headers=headers,
                                     method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                data = r.read()
                return r.status, json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            data = e.read()
            return e.code, json.loads(data) if data else None
    return await asyncio.to_thread(go)


def buttons(msg: dict[str, Any]) -> list[str]:
    acts = [b for b in msg["blocks"] if b["type"] == "actions"]
    return [e["action_id"] for e in acts[0]["elements"]] if acts else []


def test_signed_click_approves_and_the_message_is_updated(slack: Slack) -> None:
    async def main() -> None:
        addon = make_addon(config(slack))
        with taddons.context(addon):
            host, port = await addon.api.start("127.0.0.1", 0)
            base = f"http://{host}:{port}"
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(slack.to("/services/")) == 1)
            msg = slack.to("/services/")[0]
            aid = msg["approval_id"]
            assert buttons(msg) == ["agentgate_approve", "agentgate_deny", "agentgate_open"]
            assert "make 50 records for &lt;PERSON_1&gt;" in json.dumps(msg)  # the summary

            # wrongly signed, stale, unsigned: refused before anything is read
            body, hdrs = signed(click(slack, "UALICE01", "approve", aid), secret="wrong")
            assert (await post(base, body, hdrs))[0] == 401
            body, hdrs = signed(click(slack, "UALICE01", "approve", aid),
                                ts=int(time.time()) - 301)
            status, answer = await post(base, body, hdrs)
            assert status == 401 and "window" in answer["error"]["message"]
            body, hdrs = signed(click(slack, "UALICE01", "approve", aid))
            tampered = body.replace(b"UALICE01", b"UBOB0001")
            assert (await post(base, tampered, hdrs))[0] == 401
            assert (await post(base, body, {"Content-Type": hdrs["Content-Type"]}))[0] == 401

            # a Slack user mapped to nobody, and one outside the rule's groups: no decision,
            # an ephemeral note to the clicking user only
            body, hdrs = signed(click(slack, "UNOBODY1", "approve", aid, 1))
            status, answer = await post(base, body, hdrs)
            assert status == 200 and answer["error"]["code"] == "slack_user_unmapped"
            body, hdrs = signed(click(slack, "UMAL0001", "approve", aid, 2))
            status, answer = await post(base, body, hdrs)
            assert answer["error"]["code"] == "reviewer_not_in_group"
            await until(lambda: len(slack.to("/respond/")) == 2)
            assert all(m["response_type"] == "ephemeral" and not m["replace_original"]
                       for m in slack.to("/respond/"))
            assert f.intercepted and addon.store.get(aid).state == "pending"

            # alice, correctly signed: approved; the flow goes on
            body, hdrs = signed(click(slack, "UALICE01", "approve", aid, 3))
            assert await post(base, body, hdrs) == (200, None)
            await asyncio.wait_for(task, 5)
            assert f.response is None and not f.intercepted
            vote = f.metadata["approval"]["votes"][0]
            assert (vote["sub"], vote["via"]) == ("alice", "slack")
            # the same request again (a replay inside the window): refused
            status, answer = await post(base, body, hdrs)
            assert status == 401 and "replay" in answer["error"]["message"]

            # the original message replaced through the click's response_url
            await until(lambda: len(slack.to("/respond/3")) == 1)
            upd = slack.to("/respond/3")[0]
            assert upd["replace_original"] is True and upd["state"] == "approved"
            assert buttons(upd) == ["agentgate_open"]  # no Approve/Deny on a decided hold
            assert "Approved by alice via slack" in json.dumps(upd)
            await addon.api.stop()
    run(main)


def test_every_terminal_state_updates_the_message(slack: Slack) -> None:
    """denied (Slack, no bot token: fixed reason), timed out, cancelled, and a decision
    made elsewhere (the API) with no click to answer: a follow-up to the webhook."""
    async def main() -> None:
        addon = make_addon(config(slack))
        with taddons.context(addon):
            host, port = await addon.api.start("127.0.0.1", 0)
            base = f"http://{host}:{port}"

            async def hold(timeout: float = 30, n: int = 0) -> tuple[Any, asyncio.Task, str]:
                f = held_flow(decision(timeout=timeout),
                              body={"model": "gpt-4o", "n": n})
                task = asyncio.create_task(addon.request(f))
                await until(lambda: f.metadata.get("approval") is not None)
                return f, task, f.metadata["approval"]["id"]

            # denied in Slack
            f, task, aid = await hold(n=1)
            body, hdrs = signed(click(slack, "UBOB0001", "deny", aid, 10))
            assert await post(base, body, hdrs) == (200, None)
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 403
            assert f.metadata["approval"]["reason"] == "denied in Slack by bob"
            assert f.marked == ":no_entry_sign:"
            await until(lambda: len(slack.to("/respond/10")) == 1)
            upd = slack.to("/respond/10")[0]
            assert upd["state"] == "denied" and buttons(upd) == ["agentgate_open"]
            assert "Denied by bob via slack (denied in Slack by bob)" in json.dumps(upd)

            # timed out, after an ineligible click gave us its response_url
            f, task, aid = await hold(timeout=1.0, n=2)
            body, hdrs = signed(click(slack, "UMAL0001", "approve", aid, 11))
            await post(base, body, hdrs)
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 403 and f.marked == ":alarm_clock:"
            await until(lambda: any(m.get("state") == "timeout"
                                    for m in slack.to("/respond/11")))
            upd = [m for m in slack.to("/respond/11") if m.get("replace_original")][-1]
            assert upd["state"] == "timeout" and "Timed out: no decision within 1s" in \
                json.dumps(upd)

            # cancelled (the gateway stops)
            f, task, aid = await hold(n=3)
            body, hdrs = signed(click(slack, "UNOBODY1", "deny", aid, 12))
            await post(base, body, hdrs)
            addon.store.cancel(aid, "the gateway is stopping")
            await asyncio.wait_for(task, 5)
            assert f.marked == ":heavy_multiplication_x:"
            await until(lambda: any(m.get("state") == "cancelled"
                                    for m in slack.to("/respond/12")))

            # approved on the page / API: nobody clicked, so a follow-up message says it
            f, task, aid = await hold(n=4)
            addon.store.approve(aid, "alice", ["reviewers"], reason="fine for the demo")
            await asyncio.wait_for(task, 5)
            await until(lambda: any(m.get("state") == "approved" and m["approval_id"] == aid
                                    for m in slack.to("/services/")))
            upd = [m for m in slack.to("/services/") if m["approval_id"] == aid][-1]
            assert "Approved by alice via api (fine for the demo)" in json.dumps(upd)
            await addon.api.stop()
    run(main)


def test_bot_token_posts_updates_in_place_and_asks_a_deny_reason(
        slack: Slack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOT_ENV, "xoxb-test-token")

    async def main() -> None:
        addon = make_addon(config(slack, bot=True))
        with taddons.context(addon):
            host, port = await addon.api.start("127.0.0.1", 0)
            base = f"http://{host}:{port}"
            f = held_flow(decision(min_approvals=2))
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(slack.to("/api/chat.postMessage")) == 1)
            aid = f.metadata["approval"]["id"]
            path, headers, posted = next(p for p in slack.posts
                                         if p[0] == "/api/chat.postMessage")
            assert headers["Authorization"] == "Bearer xoxb-test-token"
            assert posted["channel"] == "C0AGENTS" and posted["approval_id"] == aid
            assert not slack.to("/services/")  # the bot posts; the webhook stays quiet

            # first approval: the same message shows the progress (chat.update, its ts)
            body, hdrs = signed(click(slack, "UALICE01", "approve", aid, 20))
            assert await post(base, body, hdrs) == (200, None)
            await until(lambda: len(slack.to("/api/chat.update")) == 1)
            upd = slack.to("/api/chat.update")[0]
            assert (upd["channel"], upd["ts"]) == ("C0AGENTS", "1700.0001")
            assert "1/2 approvals so far: alice via slack" in json.dumps(upd)
            assert buttons(upd)[:2] == ["agentgate_approve", "agentgate_deny"]

            # Deny opens a modal asking why; its submission decides with that reason
            body, hdrs = signed(click(slack, "UBOB0001", "deny", aid, 21))
            assert await post(base, body, hdrs) == (200, None)
            await until(lambda: len(slack.to("/api/views.open")) == 1)
            modal = slack.to("/api/views.open")[0]
            assert modal["trigger_id"] == "trig-21" and f.intercepted
            view = dict(modal["view"], state={"values": {"reason": {"reason": {
                "type": "plain_text_input", "value": ""}}}})
            body, hdrs = signed({"type": "view_submission", "user": {"id": "UBOB0001"},
                                 "view": view})
            status, answer = await post(base, body, hdrs)
            assert answer["response_action"] == "errors" and f.intercepted  # reason required
            view["state"]["values"]["reason"]["reason"]["value"] = "exports real PII"
            body, hdrs = signed({"type": "view_submission", "user": {"id": "UBOB0001"},
                                 "view": view})
            assert await post(base, body, hdrs) == (200, None)
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 403
            assert "exports real PII" in f.response.text
            await until(lambda: len(slack.to("/api/chat.update")) == 2)
            upd = slack.to("/api/chat.update")[1]
            assert upd["state"] == "denied" and "Denied by bob via slack (exports real PII)" \
                in json.dumps(upd)
            await addon.api.stop()
    run(main)


def test_json_webhook_events(slack: Slack) -> None:
    """The generic variant for other chat tools: plain approval.* events, no body."""
    async def main() -> None:
        cfg = ApprovalsConfig(listen=None, notify=NotifyConfig(
            url=f"{slack.base}/hooks/generic", retries=0, timeout=5, format="json"))
        addon = make_addon(cfg)
        with taddons.context(addon):
            f = held_flow(decision(min_approvals=2))
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(slack.to("/hooks/")) == 1)
            aid = f.metadata["approval"]["id"]
            addon.store.approve(aid, "alice", ["reviewers"], reason="ok")
            addon.store.deny(aid, "bob", ["reviewers"], "no")
            await asyncio.wait_for(task, 5)
            await until(lambda: len(slack.to("/hooks/")) == 3)
    run(main)
    created, voted, decided = slack.to("/hooks/")
    assert [e["event"] for e in (created, voted, decided)] == [
        "approval.created", "approval.voted", "approval.decided"]
    assert created["approval"]["what"]["summary"] == "make 50 records for <PERSON_1>"
    assert "preview" not in created["approval"]
    assert decided["state"] == "denied" and decided["approval"]["votes"][1]["reason"] == "no"


def test_slack_config_errors_name_the_key() -> None:
    from addons.approval.config import parse_approvals
    from addons.config.schema import ConfigError, MapSection

    def parse(slack: Any) -> Any:
        return parse_approvals(MapSection("approvals", {"slack": slack}, {"slack": "r.yaml"}))

    for bad, words in (
            ({"users": {}}, "signing_secret_env"),
            ({"signing_secret_env": "X", "users": {"alice": "a"}}, "not a Slack user id"),
            ({"signing_secret_env": "X", "groups": {"g": ["U123"]}}, "not in slack.users"),
            ({"signing_secret_env": "X", "bot_token_env": "B"}, "channel"),
            ({"signing_secret_env": "X", "bogus": 1}, "bogus")):
        with pytest.raises(ConfigError) as ei:
            parse(bad)
        assert "r.yaml" in str(ei.value) and "approvals.slack" in str(ei.value)
        assert words in str(ei.value)
    cfg = parse({"signing_secret_file": "/run/s", "users": {"U123": "alice@corp"},
                 "groups": {"approvers": ["U123"]}}).slack
    assert cfg.reviewer("U123") == ("alice@corp", ("approvers",))
    assert cfg.reviewer("U999") is None


@pytest.mark.integration
def test_slack_click_releases_a_real_agent_call(gateway_factory, oidc_provider, standin,
                                                slack: Slack) -> None:
    """End to end: a real mitmdump with the suite, a real OpenAI SDK call held by a rule,
    the Slack message at the webhook, a signed click on /slack/actions of the gateway's
    reviewers' listener, the call completes and the message is replaced."""
    import concurrent.futures

    from tests.approval.test_integration import api_url

    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + f"""
policies:
  - name: bulk-synthetic
    match: {{model: ["bulk-one"]}}
    action: approve
    approvers: [reviewers]
    timeout: 60
approvals:
  notify: {{url: '{slack.base}/services/T0/B0/HOOK', retries: 2, backoff: 0.2}}
  slack:
    signing_secret_env: {ENV}
    users: {{UALICE01: alice}}
    groups: {{reviewers: [UALICE01]}}
""")
    gw = gateway_factory(rules, env={ENV: SECRET})
    base = api_url(gw)
    agent = oidc_provider.token(sub="agent-7", groups=["agents"])
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(
                               proxy=gw.proxy_url(agent), verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        fut = pool.submit(lambda: client.chat.completions.create(
            model="bulk-one", messages=[{"role": "user", "content": "500 records please"}]))
        deadline = time.monotonic() + 20
        while not slack.to("/services/"):
            assert time.monotonic() < deadline, gw.logs()[-3000:]
            time.sleep(0.1)
        msg = slack.to("/services/")[0]
        assert "500 records please" in json.dumps(msg)  # the summary tells holds apart
        body, hdrs = signed(click(slack, "UALICE01", "approve", msg["approval_id"], 7))
        status, _ = asyncio.run(post(base, body, hdrs))
        assert status == 200
        assert fut.result(30).choices[0].message.content == "echo: 500 records please"
        deadline = time.monotonic() + 10
        while not slack.to("/respond/7"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert slack.to("/respond/7")[0]["state"] == "approved"
        assert SECRET not in gw.logs() and agent not in gw.logs()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
