"""Hostile: the per-session caches and maps are keyed by WHO the agent is, and an OIDC
subject is only unique within its issuer (OpenID Connect Core 2: `sub` is "locally unique
... within the Issuer"). A gateway trusting two issuers (a CI system and a company IdP, say)
sees `sub: alice` from each as two principals; the approval store already keeps them apart.

Through a real mitmdump with two real (local) issuers, both signing `sub: alice`, the
stand-in upstream echoing the last user text, `restore: true`: the second issuer's alice,
naming the first one's session, must get nothing of the first one's — no original restored
for a placeholder she quotes, no placeholder number taken from the first one's map, and
the first one's next turn unaffected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import standin_upstreams_yaml

# one chat helper for the cross-identity tests (one X-Agent-Session for every identity)
from tests.hostile.test_session_cache import chat
from tests.hostile.test_session_cache import sent_messages as sent

pytestmark = pytest.mark.integration

MAIL = "alice.cooper@example.com"
OTHER = "bob.dylan@example.org"
FILLER = "lorem ipsum dolor sit amet " * 400  # over the parse memo's 8 KB floor


@pytest.fixture
def two(gateway_factory, make_local_issuer, standin):
    a, b = make_local_issuer(), make_local_issuer()
    ups = standin_upstreams_yaml(standin).replace(
        "    dialect: openai\n", "    dialect: openai\n    restore: true\n", 1)
    identity = (f"identity:\n  required: true\n  issuers:\n"
                f"    - {{issuer: \"{a.issuer}\", audience: agentgate}}\n"
                f"    - {{issuer: \"{b.issuer}\", audience: agentgate}}\n")
    gw = gateway_factory({"rules.yaml": ups, "id.yaml": identity})
    return gw, a.token(sub="alice"), b.token(sub="alice")


def test_same_subject_other_issuer_gets_no_original_back(two, standin) -> None:
    gw, alice_a, alice_b = two
    standin.clear()
    assert chat(gw, alice_a, [{"role": "user", "content": f"mail {MAIL}"}]) == \
        (200, f"echo: mail {MAIL}")
    assert sent(standin) == ["mail [EMAIL_1]"]
    # the other issuer's alice quotes the placeholder in the same session: the echo must
    # stay a placeholder (her session has no [EMAIL_1]), never the first alice's address
    status, answer = chat(gw, alice_b, [{"role": "user", "content": "say [EMAIL_1]"}])
    assert status == 200
    assert MAIL not in answer, "an original restored to another issuer's subject"
    assert answer == "echo: say [EMAIL_1]"
    # her own first address is her [EMAIL_1], not the next number of the other map
    status, _ = chat(gw, alice_b, [{"role": "user", "content": f"write {OTHER}"}])
    assert status == 200 and sent(standin) == ["write [EMAIL_1]"]
    # the first alice is unaffected: her map still has only her address
    assert chat(gw, alice_a, [{"role": "user", "content": "say [EMAIL_1] [EMAIL_2]"}]) == \
        (200, f"echo: say {MAIL} [EMAIL_2]")


def test_same_subject_other_issuer_long_history(two, standin) -> None:
    """The same through the incremental paths (parse memo, cached masked history, policy
    prompt history): a history over the memo floor, re-sent by the other issuer's alice
    with her own first message."""
    gw, alice_a, alice_b = two
    m1 = {"role": "user", "content": f"{FILLER} mail {MAIL}"}
    a1 = {"role": "assistant", "content": "Noted."}
    m2 = {"role": "user", "content": f"{FILLER} also {OTHER}"}
    standin.clear()
    for turn in range(2):
        assert chat(gw, alice_a, [m1, a1, m2] + [a1, m2] * turn)[0] == 200
        got = sent(standin)
        assert got[0].endswith("mail [EMAIL_1]") and got[2].endswith("also [EMAIL_2]")
    standin.clear()
    status, answer = chat(gw, alice_b, [{"role": "user", "content": f"{FILLER} hi"}, a1, m2,
                                        a1, {"role": "user",
                                             "content": "say [EMAIL_1] [EMAIL_2]"}])
    assert status == 200
    # her map: the address she sent is her [EMAIL_1] (hers to get back), [EMAIL_2] unknown
    assert answer == f"echo: say {OTHER} [EMAIL_2]", answer
    got = sent(standin)
    assert got[2].endswith("also [EMAIL_1]"), got[2][-40:]
    raw = "\n".join(r["body"] for r in standin.requests)
    assert MAIL not in raw and OTHER not in raw


def test_mcp_session_of_same_subject_other_issuer_refused(gateway_factory, make_local_issuer,
                                                          standin) -> None:
    """The gateway keeps each MCP session to the identity that opened it (the server sees
    one credential for every agent): the other issuer's alice is another identity."""
    from tests.hostile.test_mcp import RULES, URL, HostileServer, call

    evil = HostileServer(Path(standin.ca_path).parent)
    evil.thread.start()
    try:
        a, b = make_local_issuer(), make_local_issuer()
        rules = RULES.format(port=evil.port).replace("identity:\n  required: false\n", "")
        gw = gateway_factory(rules + (
            f"identity:\n  required: true\n  issuers:\n"
            f"    - {{issuer: \"{a.issuer}\", audience: agentgate}}\n"
            f"    - {{issuer: \"{b.issuer}\", audience: agentgate}}\n"))

        def script(method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
            msg = json.loads(body)
            hdrs = {"content-type": "application/json"}
            if msg.get("method") == "initialize":
                hdrs["mcp-session-id"] = "S-alice"
            return 200, hdrs, json.dumps({"jsonrpc": "2.0", "id": msg.get("id"),
                                          "result": {"content": []}}).encode()
        evil.script = script

        def as_(token: str, body: Any, sid: str | None = None) -> httpx.Response:
            hdrs = {"accept": "application/json, text/event-stream"}
            if sid:
                hdrs["mcp-session-id"] = sid
            with httpx.Client(proxy=gw.proxy_url(token), verify=str(gw.ca_cert),
                              timeout=30) as c:
                return c.post(URL, json=body, headers=hdrs)

        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}
        alice_a, alice_b = a.token(sub="alice"), b.token(sub="alice")
        assert as_(alice_a, init).headers["mcp-session-id"] == "S-alice"
        evil.requests.clear()
        r = as_(alice_b, call("add", 5), sid="S-alice")
        assert r.json().get("error", {}).get("data", {}).get("rule") == "mcp.session", r.text
        assert evil.requests == []
        assert "result" in as_(alice_a, call("add", 6), sid="S-alice").json()
    finally:
        evil.httpd.shutdown()
        evil.httpd.server_close()


def test_held_request_not_shown_to_same_subject_of_another_issuer(gateway_factory,
                                                                   make_local_issuer,
                                                                   standin) -> None:
    """An agent may read its own held requests in the reviewers' API; "its own" is issuer
    AND subject: the other issuer's alice sees nothing of the first alice's hold (its
    masked preview, rule, what), by list or by id."""
    import concurrent.futures
    import time

    from tests.hostile.test_approval_fairness import RULES, _api, _client

    a, b = make_local_issuer(), make_local_issuer()
    gw = gateway_factory("{standin_upstreams}" + RULES + (
        f"identity:\n  required: true\n  issuers:\n"
        f"    - {{issuer: \"{a.issuer}\", audience: agentgate}}\n"
        f"    - {{issuer: \"{b.issuer}\", audience: agentgate}}\n"))
    deadline = time.monotonic() + 10
    while not gw.approvals_url and time.monotonic() < deadline:
        time.sleep(0.05)
    url = gw.approvals_url
    assert url, gw.logs()
    alice_a, alice_b = a.token(sub="alice"), b.token(sub="alice")
    reviewer = a.token(sub="rita", groups=["reviewers"])
    pool = concurrent.futures.ThreadPoolExecutor(1)
    aid = None
    held = pool.submit(lambda: _client(gw, alice_a).chat.completions.create(
        model="held-model", messages=[{"role": "user", "content": "merger plans: hold me"}]))
    try:
        deadline = time.monotonic() + 30
        while True:
            status, out = _api(url, "GET", "/approvals", alice_a)
            assert status == 200, out
            if out["approvals"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(out["approvals"]) == 1, out  # her own request: she sees it
        aid = out["approvals"][0]["id"]
        status, out = _api(url, "GET", "/approvals", alice_b)
        assert status == 200 and out["approvals"] == [], out
        status, out = _api(url, "GET", f"/approvals/{aid}", alice_b)
        assert status == 403, out
        assert "merger" not in json.dumps(out)
    finally:
        if aid is not None:
            _api(url, "POST", f"/approvals/{aid}/deny", reviewer, {"reason": "test over"})
        try:
            held.result(30)
        except Exception:  # noqa: BLE001 - denied: the client raises, as it should
            pass
        pool.shutdown()
