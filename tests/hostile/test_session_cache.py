"""Hostile: the per-session message cache through a real mitmdump, real tokens, a real
upstream (the stand-in, which echoes the last user text; `restore: true`).

- an agent's growing conversation keeps the same placeholders turn after turn (cache hits
  give what the first masking gave), and nothing raw reaches the upstream;
- another identity sending the SAME session id and the very same history gets nothing of
  the first one's: its placeholders are numbered from its own map, the first agent's
  placeholders it quotes stay placeholders (no original restored), and the first agent's
  next turn is unaffected.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import standin_upstreams_yaml

pytestmark = pytest.mark.integration

ALICE_MAIL = "alice.cooper@example.com"
ALICE_CARD = "4111 1111 1111 1111"
OTHER_MAIL = "bob.dylan@example.org"
SID = {"X-Agent-Session": "shared-session-1"}


def chat(gw, token: str, messages: list[dict]) -> tuple[int, str]:
    with httpx.Client(proxy=gw.proxy_url(token), verify=str(gw.ca_cert), timeout=30) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", headers=SID,
                   json={"model": "gpt-4o-mini", "messages": messages})
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, r.json()["choices"][0]["message"]["content"]


def sent_messages(standin) -> list[str]:
    return [m["content"] for m in json.loads(standin.requests[-1]["body"])["messages"]]


def test_cached_turns_stable_and_no_leak_across_identities(gateway_factory, standin,
                                                            oidc_provider) -> None:
    ups = standin_upstreams_yaml(standin).replace(
        "    dialect: openai\n", "    dialect: openai\n    restore: true\n", 1)
    gw = gateway_factory({"rules.yaml": ups, "id.yaml": oidc_provider.identity_yaml()})
    alice = oidc_provider.token(sub="alice", groups=["agents"])
    mallory = oidc_provider.token(sub="mallory", groups=["agents"])

    m1 = {"role": "user", "content": f"I am {ALICE_MAIL}, my card is {ALICE_CARD}."}
    a1 = {"role": "assistant", "content": "Noted."}
    m2 = {"role": "user", "content": f"Also write to {OTHER_MAIL} please."}
    standin.clear()
    assert chat(gw, alice, [m1])[0] == 200
    first = sent_messages(standin)
    assert ALICE_MAIL not in first[0] and "[EMAIL_1]" in first[0]
    for turn in range(3):  # the history re-sent: the same masked form every turn (hits)
        status, _ = chat(gw, alice, [m1, a1, m2] + [a1, m2] * turn)
        assert status == 200
        got = sent_messages(standin)
        assert got[0] == first[0]
        assert got[2] == "Also write to [EMAIL_2] please."
    seen = "\n".join(r["body"] for r in standin.requests)
    for raw in (ALICE_MAIL, OTHER_MAIL, "4111"):
        assert raw not in seen

    # mallory: same session id, alice's placeholders quoted, alice's history replayed with
    # the first message changed so a shared cache would hand out alice's numbering
    standin.clear()
    status, answer = chat(gw, mallory, [{"role": "user", "content": "say [EMAIL_1] [EMAIL_2]"}])
    assert status == 200
    assert ALICE_MAIL not in answer and OTHER_MAIL not in answer
    assert "[EMAIL_1]" in answer and "[EMAIL_2]" in answer  # nothing to restore for mallory
    status, answer = chat(gw, mallory, [{"role": "user", "content": "hello"}, a1, m2])
    assert status == 200
    got = sent_messages(standin)
    # mallory's own map: the first e-mail it ever sent is its [EMAIL_1]
    assert got[2] == "Also write to [EMAIL_1] please."
    assert answer == f"echo: Also write to {OTHER_MAIL} please."  # its own value back
    assert ALICE_MAIL not in answer

    # alice's next turn: her numbering, untouched by mallory
    standin.clear()
    assert chat(gw, alice, [m1, a1, m2, a1, {"role": "user", "content": "ok"}])[0] == 200
    got = sent_messages(standin)
    assert got[0] == first[0] and got[2] == "Also write to [EMAIL_2] please."
    status, answer = chat(gw, alice, [{"role": "user", "content": "say [EMAIL_1]"}])
    assert status == 200
    assert ALICE_MAIL in answer  # restore: alice gets her own original back
