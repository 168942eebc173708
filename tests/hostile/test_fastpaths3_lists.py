"""Hostile: the session's parse memo (decode.parse_memo) remembers the FIRST message list
of a body in document order ("messages" or "input"), while masking's incremental path
masks the list it prefers ("messages" when it holds messages, else "input"). A body that
carries both lists, in the order that makes the two disagree, continues the memo through
one list while the other list changes: masking must not splice the previous turn's
masked messages in place of the list the agent sent now.

Differential through a real mitmdump: the second turn of a session must reach the
upstream exactly as the same body does in a fresh session (a full mask)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
RESPONSES = "https://api.openai.com/v1/responses"
HOOK = "https://hooks.example.com/ev"
FILLER = "lorem ipsum dolor sit amet " * 400  # past decode.MEMO_MIN_CHARS


def body(first: str, first_items: list, second: str, second_items: list) -> str:
    return json.dumps({"model": "gpt-4o-mini", first: first_items, second: second_items})


def msg(text: str) -> dict:
    return {"role": "user", "content": text}


def variants() -> list[tuple[str, str, str]]:
    pad = [msg(FILLER)]
    return [
        # memo: "input" (first in the document); masking: "messages"
        ("input before messages",
         body("input", pad, "messages", [msg("first question")]),
         body("input", pad, "messages", [msg("a different question, 4111111111111111")])),
        # memo: "messages" (first), whose parts are not all messages; masking: "input"
        ("messages of parts before input",
         body("messages", [msg(FILLER), {"text": "part"}], "input", [msg("one")]),
         body("messages", [msg(FILLER), {"text": "part"}], "input",
              [msg("two: mail me at eve@example.org")])),
        # same count of items in both lists, both changing place
        ("equal counts",
         body("input", pad, "messages", [msg("alpha")]),
         body("input", pad, "messages", [msg("omega omega")])),
    ]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def send(c: httpx.Client, url: str, session: str, text: str) -> httpx.Response:
    return c.post(url, content=text.encode(), headers={
        "content-type": "application/json", "x-agent-session": session,
        "authorization": "Bearer sk-agent"})


@pytest.mark.parametrize("url", [OPENAI, RESPONSES, HOOK], ids=["chat", "responses", "hook"])
def test_the_other_list_is_masked_as_sent(gw, standin, url) -> None:
    bad = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for i, (name, one, two) in enumerate(variants()):
            standin.clear()
            r = send(c, url, f"s-{i}", one)
            assert r.status_code == 200, (name, r.text[:300])
            standin.clear()
            r = send(c, url, f"s-{i}", two)
            assert r.status_code == 200, (name, r.text[:300])
            cont = [q["body"] for q in standin.requests]
            standin.clear()
            r = send(c, url, f"fresh-{i}", two)
            assert r.status_code == 200, (name, r.text[:300])
            full = [q["body"] for q in standin.requests]
            if cont != full:
                bad.append((name, [b[-160:] for b in cont], [b[-160:] for b in full]))
    assert bad == [], bad
