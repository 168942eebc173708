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

from addons.policy import engine
from addons.policy.engine import RequestFacts
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


def test_incremental_policy_still_blocks_late_content(gateway_factory, standin,
                                                      oidc_provider) -> None:
    """A long conversation (the prompt searches become incremental past 8 KB) whose later
    turns bring a forbidden value: at the end of the text, straddling what the session
    sent before (its last message grown), and in another identity's turn under the same
    session id: each is blocked, as a full search would."""
    policy = ("policies:\n"
              "  - name: no-ssn\n"
              "    match: {prompt: {regex: ['\\b\\d{3}-\\d{2}-\\d{4}\\b']}}\n"
              "    action: block\n"
              "    message: forbidden content\n")
    gw = gateway_factory({"rules.yaml": "{standin_upstreams}", "id.yaml":
                          oidc_provider.identity_yaml(), "p.yaml": policy})
    alice = oidc_provider.token(sub="alice", groups=["agents"])
    mallory = oidc_provider.token(sub="mallory", groups=["agents"])
    msgs = [{"role": "system", "content": "be brief " * 40}]
    for turn in range(6):
        msgs = [*msgs, {"role": "user", "content": f"turn {turn}: order 12-345 " * 150},
                {"role": "assistant", "content": "noted 555-12 " * 150}]
        assert chat(gw, alice, msgs)[0] == 200
    # the last message grows by the value's tail ('555-12' + '-3456'), with the end of what
    # was sent before 3 characters past a 4096-character block boundary of the prompt
    # text: the match starts in the shared blocks, before where they end
    def prompt_len(messages: list[dict]) -> int:
        body = json.dumps({"model": "gpt-4o-mini", "messages": messages}).encode()
        return len(RequestFacts("POST", "api.openai.com", "/v1/chat/completions",
                                body=body, content_type="application/json").prompt_text)

    base = " noted" * 150 + " 555-12"
    pad = (3 - prompt_len([*msgs[:-1], {"role": "assistant", "content": base}])) \
        % engine.BLOCK_CHARS
    last = "x" * pad + base
    before = [*msgs[:-1], {"role": "assistant", "content": last}]
    assert prompt_len(before) % engine.BLOCK_CHARS == 3
    assert chat(gw, alice, before)[0] == 200
    status, body = chat(gw, alice, [*msgs[:-1], {"role": "assistant",
                                                 "content": last + "-3456"}])
    assert status == 403 and "no-ssn" in body
    # an ordinary next turn still passes, then the value in a new message is blocked
    assert chat(gw, alice, [*msgs, {"role": "user", "content": "thanks"}])[0] == 200
    status, body = chat(gw, alice, [*msgs, {"role": "user", "content": "ssn 536-22-4519"}])
    assert status == 403
    # another identity, same session id, same history plus the value: blocked too
    status, body = chat(gw, mallory, [*msgs, {"role": "user", "content": "ssn 536-22-4519"}])
    assert status == 403
