"""Issue 11, class 11: one agent cannot starve the approval queue.

A hostile agent fills its own per-identity quota of held requests; its next approvable
request is refused at once with 429 in its own dialect, while another identity's approvable
request is still held (and can be approved). Through a real mitmdump with real OIDC tokens.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

CAP = 20  # the default approvals.max_pending_per_identity (not set below, on purpose)
RULES = """
policies:
  - name: needs-review
    match: {model: ["held-model"]}
    action: approve
    approvers: [reviewers]
    timeout: 120
approvals:
  max_pending: 50
"""


def _client(gw, token: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(token),
                                                               verify=str(gw.ca_cert)))


def _api(url: str, method: str, path: str, token: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body else None)
    req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _pending(url: str, token: str, requester: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        status, out = _api(url, "GET", "/approvals", token)
        assert status == 200, out
        mine = [a for a in out["approvals"] if a["requester"] == requester]
        if len(mine) >= n or time.monotonic() > deadline:
            return mine
        time.sleep(0.1)


def test_one_identity_cannot_fill_the_approval_queue(gateway_factory, oidc_provider,
                                                     standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + oidc_provider.identity_yaml() + RULES)
    deadline = time.monotonic() + 10
    while not gw.approvals_url and time.monotonic() < deadline:
        time.sleep(0.05)
    url = gw.approvals_url
    assert url, gw.logs()
    hog = oidc_provider.token(sub="hog-agent", groups=["agents"])
    other = oidc_provider.token(sub="polite-agent", groups=["agents"])
    alice = oidc_provider.token(sub="alice", groups=["reviewers"])
    pool = concurrent.futures.ThreadPoolExecutor(CAP + 2)

    def ask(token: str, model: str = "held-model", text: str = "hold me"):
        return pool.submit(lambda: _client(gw, token).chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]))

    try:
        standin.clear()
        held = [ask(hog, text=f"hog {i}") for i in range(CAP)]
        assert len(_pending(url, alice, "hog-agent", CAP)) == CAP
        # the hog's next approvable request: refused at once, 429 in the OpenAI dialect
        with pytest.raises(openai.RateLimitError) as ei:
            ask(hog, text="one too many").result(30)  # before: held like the others
        assert ei.value.status_code == 429
        assert ei.value.body["code"] == "approval_quota_exceeded"
        assert ei.value.body["type"] == "rate_limit_error"
        # another identity is still held, not refused
        polite = ask(other, text="please review")
        mine = _pending(url, alice, "polite-agent", 1)
        assert len(mine) == 1 and not polite.done()
        status, out = _api(url, "POST", f"/approvals/{mine[0]['id']}/approve", alice)
        assert status == 200, out
        assert polite.result(30).choices[0].message.content == "echo: please review"
        # deny the hog's holds: its quota frees up, and nothing of it reached the upstream
        for a in _pending(url, alice, "hog-agent", CAP):
            assert _api(url, "POST", f"/approvals/{a['id']}/deny", alice,
                        {"reason": "flood"})[0] == 200
        for f in held:
            with pytest.raises(openai.PermissionDeniedError):
                f.result(30)
        sent = [json.dumps(r) for r in standin.requests]
        assert len(sent) == 1 and "please review" in sent[0]
        assert not any(re.search(r"hog \d|one too many", s) for s in sent)
        # the gateway still serves a normal request of the former hog
        reply = _client(gw, hog).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content == "echo: hello"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
