"""A gateway that stops with holds pending tells the chat: the "cancelled" update (Slack
follow-up or JSON `approval.decided`) is delivered within a short grace before mitmdump
exits, and a chat server that never answers delays the stop by no more than that grace.
Real mitmdump with the suite, a real OIDC provider and SDK client, a webhook receiver on
loopback; the gateway is stopped with SIGTERM as a supervisor would."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from addons.approval.notify import SHUTDOWN_GRACE
from tests.conftest import Gateway

pytestmark = pytest.mark.integration

POLICIES = """
policies:
  - name: bulk-synthetic
    match: {model: ["bulk-one"]}
    action: approve
    approvers: [reviewers]
    timeout: 120
"""


class Chat:
    """A webhook receiver; after `answer` deliveries it stops answering (a hung chat)."""

    def __init__(self, answer: int = 1_000_000) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer
        self.release = threading.Event()
        chat = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers["content-length"]))
                if len(chat.bodies) >= chat.answer:
                    chat.release.wait(30)  # hung: never answers while the gateway stops
                    return
                chat.bodies.append(json.loads(data))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/SECRET"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n:
            assert time.monotonic() < deadline, self.bodies
            time.sleep(0.05)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _gateway(gateway_factory: Any, oidc_provider: Any, chat: Chat, fmt: str) -> Gateway:
    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + POLICIES
             + f"approvals:\n  notify: {{url: '{chat.url}', format: {fmt}, retries: 3, "
               "backoff: 0.2, timeout: 20}\n")
    # SIGTERM first drains flows in flight (held ones too: a reviewer may still decide)
    # for agentgate_drain_seconds; 1 s here, then mitmproxy's shutdown runs the hooks
    return gateway_factory(rules, extra_args=("--set", "agentgate_drain_seconds=1"))


def _hold(gw: Gateway, oidc_provider: Any) -> concurrent.futures.Future:
    token = oidc_provider.token(sub="agent-7", groups=["agents"])
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(
                               proxy=gw.proxy_url(token), verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(lambda: client.chat.completions.create(
        model="bulk-one", messages=[{"role": "user", "content": "500 records"}]))
    pool.shutdown(wait=False)
    return fut


@pytest.mark.parametrize("fmt", ["json", "slack"])
def test_stopping_gateway_delivers_the_cancelled_update(gateway_factory: Any,
                                                        oidc_provider: Any, fmt: str) -> None:
    chat = Chat()
    try:
        gw = _gateway(gateway_factory, oidc_provider, chat, fmt)
        held = _hold(gw, oidc_provider)
        chat.wait_for(1)  # the hold was announced
        assert not held.done()
        aid = (chat.bodies[0].get("approval_id") if fmt == "json"
               else json.dumps(chat.bodies[0]).split("ap-", 1)[1][:12])
        aid = aid if aid.startswith("ap-") else "ap-" + aid
        assert gw.stop(signal.SIGTERM) == 0
        # the agent was answered (503 approval cancelled), and the chat was told before exit
        with pytest.raises(openai.APIStatusError) as refused:
            held.result(timeout=10)
        assert refused.value.status_code == 503
        assert len(chat.bodies) == 2, chat.bodies
        last = chat.bodies[1]
        if fmt == "json":
            assert last["event"] == "approval.decided" and last["state"] == "cancelled"
            assert last["approval_id"] == aid
        else:
            text = json.dumps(last)
            assert aid in text and "cancelled" in text.lower()
            assert "the gateway is stopping" in text
    finally:
        chat.stop()


def test_a_held_client_gets_its_503_when_the_gateway_stops(gateway_factory: Any,
                                                           oidc_provider: Any) -> None:
    """No notifications configured: the agent still gets an answer (503 approval
    cancelled, the gateway is stopping), not a connection cut by the exit."""
    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + POLICIES)
    gw = gateway_factory(rules, extra_args=("--set", "agentgate_drain_seconds=1"))
    held = _hold(gw, oidc_provider)
    deadline = time.monotonic() + 20
    while "for approval ap-" not in gw.logs():
        assert time.monotonic() < deadline, gw.logs()[-3000:]
        time.sleep(0.05)
    assert gw.stop(signal.SIGTERM) == 0
    with pytest.raises(openai.APIStatusError) as refused:
        held.result(timeout=10)
    assert refused.value.status_code == 503
    assert "the gateway is stopping" in str(refused.value)


def test_a_hung_chat_delays_the_stop_by_the_grace_only(gateway_factory: Any,
                                                        oidc_provider: Any) -> None:
    chat = Chat(answer=1)  # the announcement is answered, the cancellation never is
    try:
        gw = _gateway(gateway_factory, oidc_provider, chat, "json")
        held = _hold(gw, oidc_provider)
        chat.wait_for(1)
        t0 = time.monotonic()
        assert gw.stop(signal.SIGTERM) == 0
        took = time.monotonic() - t0
        # the 1 s drain, the grace, process exit: not the delivery's 20 s timeout x retries
        assert took < 1 + SHUTDOWN_GRACE + 6, took
        assert "not delivered within" in gw.logs()
        assert "SECRET" not in gw.logs()  # the webhook URL's secret path is never logged
        with pytest.raises(openai.APIStatusError):
            held.result(timeout=10)
    finally:
        chat.stop()


def test_done_is_awaited_at_shutdown_and_harmless_on_a_script_reload() -> None:
    """mitmproxy awaits the awaitable a hook returns when it stops (invoke_addon), and a
    script reload (invoke_addon_sync) refuses `async def` hooks: done() is a plain function
    returning the drain task. If mitmproxy stops awaiting it, this fails."""
    from mitmproxy import hooks
    from mitmproxy.test import taddons

    from addons.approval.config import ApprovalsConfig, NotifyConfig
    from tests.approval.test_addon import decision, held_flow, make_addon, until

    chat = Chat()
    slow = threading.Event()

    async def main() -> None:
        cfg = ApprovalsConfig(listen=None, notify=NotifyConfig(
            url=chat.url, format="json", retries=0, timeout=5))
        addon = make_addon(cfg)
        with taddons.context(addon) as tctx:
            f = held_flow(decision())
            task = asyncio.create_task(addon.request(f))
            await until(lambda: len(chat.bodies) == 1)
            chat.answer = 1  # the "cancelled" event hangs at the chat until released
            threading.Timer(0.5, lambda: (chat.bodies.append({"released": True}),
                                          chat.release.set(), slow.set())).start()
            t0 = time.monotonic()
            await tctx.master.addons.invoke_addon(addon, hooks.DoneHook())
            # awaited: returned only once the delivery ended (released after 0.5 s)
            assert slow.is_set() and time.monotonic() - t0 >= 0.4
            await asyncio.wait_for(task, 5)
            assert f.response.status_code == 503

            # a reload's sync call: no error, the drain runs on in the background
            again = make_addon(cfg)
            with taddons.context(again) as tctx2:
                tctx2.master.addons.invoke_addon_sync(again, hooks.DoneHook())
                await asyncio.sleep(0)

    try:
        asyncio.run(main())
    finally:
        chat.stop()
