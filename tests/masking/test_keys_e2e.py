"""Through a real mitmdump: a JSON object key masked together with its value (or something
under it) reaches the upstream with neither original. The value used to be written back
under the ORIGINAL key, so the upstream got the key in clear and the unmasked value under
the placeholder key. Both dialect paths: a webhook (whole-body walk of the shared parse)
and an LLM request (per-message units with the session's message cache, turn after turn).
The audit store holds neither either."""

from __future__ import annotations

import json

import duckdb
import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com"
OPENAI = "https://api.openai.com"
ORIGINALS = ["ann.lee@example.com", "bob.ray@example.com", "cy.dale@example.com",
             "dee.ford@example.com", "4111 1111 1111 1111"]


def body() -> dict:
    return {"ann.lee@example.com": "bob.ray@example.com",
            "meta": {"cy.dale@example.com": {"card": "4111 1111 1111 1111"}},
            "notes": json.dumps({"dee.ford@example.com": "x"})}


def chat(turn: int) -> dict:
    msgs = [{"role": "user", "content": f"turn {t}",
             "ann.lee@example.com": {"bob.ray@example.com": "cy.dale@example.com"}}
            for t in range(turn + 1)]
    return {"model": "gpt-4o-mini", "messages": msgs,
            "dee.ford@example.com": "4111 1111 1111 1111"}


def leaked(text: str) -> list[str]:
    return [v for v in ORIGINALS if v in text or v in text.replace("\\\"", "\"")]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def test_masked_keys_and_their_values_never_reach_the_upstream(gw: Gateway, standin) -> None:
    standin.clear()
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as c:
        r = c.post(HOOK + "/events", json=body())
        assert r.status_code == 200, r.text
        for turn in range(3):
            r = c.post(OPENAI + "/v1/chat/completions", json=chat(turn),
                       headers={"x-agent-session": "keys-e2e"})
            assert r.status_code == 200, r.text
    got = [req["body"] for req in standin.requests]
    assert len(got) == 4
    for text in got:
        doc = json.loads(text)  # still one valid document
        assert leaked(text) == [], text
        assert leaked(json.dumps(doc, ensure_ascii=False)) == []
    hook = json.loads(got[0])
    assert set(hook) == {"[EMAIL_1]", "meta", "notes"} and hook["[EMAIL_1]"] == "[EMAIL_2]"
    # every turn's history is forwarded the same way (cached messages spliced as masked)
    last = json.loads(got[-1])["messages"]
    assert all(m == last[0] | {"content": f"turn {i}"} for i, m in enumerate(last))
    gw.stop()
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        rows = con.execute("select * from flows").fetchall()
    finally:
        con.close()
    assert rows and leaked(repr(rows)) == []
