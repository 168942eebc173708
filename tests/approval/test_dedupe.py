"""One hold per intent: an SDK's retries of a held request join its hold (one approval id,
one notification) instead of multiplying holds, notifications and 409s."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path

import duckdb
import openai
import pytest
from mitmproxy.test import taddons

from addons.approval.config import ApprovalsConfig
from tests.approval.test_addon import Receiver, decision, held_flow, make_addon, run, until
from tests.approval.test_integration import api_url


def test_same_intent_joins_other_intents_do_not() -> None:
    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=None, retry_grace=5))
        with taddons.context(addon):
            first, retry = held_flow(decision()), held_flow(decision())
            t1 = asyncio.create_task(addon.request(first))
            await until(lambda: len(addon.store) == 1)
            t2 = asyncio.create_task(addon.request(retry))
            await until(lambda: retry.intercepted)
            assert len(addon.store) == 1
            aid = first.metadata["approval"]["id"]
            assert retry.metadata["approval"]["id"] == aid
            assert retry.metadata["approval"]["joined"] is True
            # not the same intent: another body, another identity, another rule
            others = [held_flow(decision(), body={"model": "gpt-4o", "n": 2}),
                      held_flow(decision(), sub="agent-2"),
                      held_flow(decision(rule="other"))]
            tasks = [asyncio.create_task(addon.request(f)) for f in others]
            await until(lambda: len(addon.store) == 4)
            assert len({f.metadata["approval"]["id"] for f in others} | {aid}) == 4

            # the first client gives up: the hold stays for the retry, which gets approved
            addon.client_disconnected(first.client_conn)
            await asyncio.wait_for(t1, 5)
            assert addon.store.get(aid).state == "pending" and retry.intercepted
            addon.store.approve(aid, "alice", ["reviewers"], reason="ok")
            await asyncio.wait_for(t2, 5)
            assert retry.response is None and retry.metadata["approval"]["state"] == "approved"

            # after a decision the same request is a new intent: a new hold
            again = held_flow(decision())
            t3 = asyncio.create_task(addon.request(again))
            await until(lambda: again.intercepted)
            assert again.metadata["approval"]["id"] != aid
            for a in addon.store.pending():
                addon.store.deny(a.id, "bob", ["reviewers"], "done")
            await asyncio.wait_for(asyncio.gather(t3, *tasks), 5)
    run(main)


def test_joined_requests_all_get_the_decision() -> None:
    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            flows = [held_flow(decision()) for _ in range(3)]
            tasks = [asyncio.create_task(addon.request(f)) for f in flows]
            await until(lambda: all(f.intercepted for f in flows))
            assert len(addon.store) == 1
            addon.store.deny(flows[0].metadata["approval"]["id"], "bob", ["reviewers"], "no")
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
            assert [f.response.status_code for f in flows] == [403, 403, 403]
            assert len({f.metadata["approval"]["id"] for f in flows}) == 1
    run(main)


@pytest.mark.integration
def test_sdk_timeouts_and_retries_make_one_hold(gateway_factory, oidc_provider,
                                                standin) -> None:
    """The reported case: an OpenAI SDK whose timeout is shorter than the review. Before,
    each retry was a new hold (three holds, three notifications, approving the notified id
    answered 409). Now: one approval id, one notification; approving it lets the retry
    through and the SDK call succeeds."""
    standin.clear()
    receiver = Receiver()
    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + """
policies:
  - name: bulk-synthetic
    match: {model: ["bulk-one"]}
    action: approve
    approvers: [reviewers]
    timeout: 60
approvals:
  retry_grace: 10
""" + f"  notify: {{url: '{receiver.url}', retries: 2, backoff: 0.2}}\n")
    gw = gateway_factory(rules)
    base = api_url(gw)
    agent = oidc_provider.token(sub="agent-7", groups=["agents"])
    alice = oidc_provider.token(sub="alice", groups=["reviewers"])
    client = openai.OpenAI(api_key="unused", max_retries=4, timeout=2.0,
                           http_client=openai.DefaultHttpxClient(
                               proxy=gw.proxy_url(agent), verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(lambda: client.chat.completions.create(
        model="bulk-one", messages=[{"role": "user", "content": "500 synthetic records"}]))

    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def api(method: str, path: str) -> dict:
        req = urllib.request.Request(base + path, method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {alice}"})
        with opener.open(req, timeout=10) as r:
            return json.load(r)

    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        # wait until the SDK has timed out and retried at least twice (both joined)
        while gw.logs().count("joined (no new hold)") < 2:
            assert time.monotonic() < deadline, gw.logs()[-3000:]
            assert not fut.done(), fut.exception()
            seen |= {a["id"] for a in api("GET", "/approvals")["approvals"]}
            time.sleep(0.1)
        pending = api("GET", "/approvals")["approvals"]
        seen |= {a["id"] for a in pending}
        assert len(seen) == 1 and len(pending) == 1, seen
        # approve the one notified id: no 409, and the SDK's current attempt goes through
        assert receiver.bodies and receiver.bodies[0]["approval_id"] == pending[0]["id"]
        assert api("POST", f"/approvals/{pending[0]['id']}/approve")["approval"][
            "state"] == "approved"
        reply = fut.result(30)
        assert reply.choices[0].message.content == "echo: 500 synthetic records"
        assert len(standin.requests) == 1
        time.sleep(0.5)
        created = [b for b in receiver.bodies if b["state"] == "pending"]
        assert len(created) == 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        receiver.stop()
    gw.stop()
    # the record: every attempt is a row, all under the one approval id
    [db] = list(Path(gw.data_dir).rglob("*.duckdb"))
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT approval_id, status, json_extract_string(approval, '$.state') "
                       "FROM flows WHERE approval_id IS NOT NULL ORDER BY seq").fetchall()
    con.close()
    assert len(rows) >= 3 and len({r[0] for r in rows}) == 1, rows
    assert rows[-1][1] == 200 and rows[-1][2] == "approved"


def test_joins_are_capped_like_holds() -> None:
    """Joining costs no approval but parks a flow: one agent cannot park thousands of
    copies of a request on one hold (the per-identity cap applies to joins too)."""
    async def main() -> None:
        addon = make_addon(ApprovalsConfig(listen=None, max_pending_per_identity=3))
        with taddons.context(addon):
            flows = [held_flow(decision()) for _ in range(3)]
            tasks = [asyncio.create_task(addon.request(f)) for f in flows]
            await until(lambda: all(f.intercepted for f in flows))
            extra = held_flow(decision())
            await addon.request(extra)
            assert extra.response.status_code == 429 and not extra.intercepted
            assert json.loads(extra.response.content)["error"]["code"] == \
                "approval_quota_exceeded"
            addon.store.deny(flows[0].metadata["approval"]["id"], "bob", ["reviewers"], "x")
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
    run(main)


def test_sql_hold_message_shows_the_statement() -> None:
    from addons.approval.slack import message
    from addons.approval.store import ApprovalSpec, ApprovalStore

    a = ApprovalStore().create(ApprovalSpec(rule="writes", groups=("dba",)), "agent-1", {
        "kind": "sql", "upstream": "orders", "database": "shop",
        "sql": "DELETE FROM customers\n WHERE id = $1", "statement_kind": "delete"})
    text = json.dumps(message(a, ""))
    assert "SQL on orders/shop" in text and "DELETE FROM customers WHERE id = $1" in text


def test_big_bodies_join_too() -> None:
    """Bodies above HASH_INLINE_BYTES are hashed in a worker thread: same result."""
    from addons.approval.addon import HASH_INLINE_BYTES

    async def main() -> None:
        addon = make_addon()
        with taddons.context(addon):
            body = {"model": "gpt-4o", "messages": [
                {"role": "user", "content": "x" * (HASH_INLINE_BYTES * 3)}]}
            flows = [held_flow(decision(), body=body) for _ in range(2)]
            other = held_flow(decision(), body=dict(body, model="gpt-4o-mini"))
            tasks = [asyncio.create_task(addon.request(f)) for f in (*flows, other)]
            await until(lambda: all(f.intercepted for f in (*flows, other)))
            assert len(addon.store) == 2
            for a in addon.store.pending():
                addon.store.deny(a.id, "bob", ["reviewers"], "x")
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
    run(main)
