"""Hostile: a rules reload in the middle of a session, through a real mitmdump. The turns
before it filled every per-session cache (the parse memo, the masked messages, the policy's
prompt-search history); the turn after it re-sends the same history. What the new rules
say about that history must hold on it — a cached "nothing found" of the old rules is not
an answer for the new ones — in both directions (a pattern added, a pattern removed)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
FILLER = "lorem ipsum dolor sit amet " * 400  # past the parse memo's 8 KB floor
BADGE = "EMP-314159"
MASKING = """masking:
  custom:
    - name: EMPLOYEE_ID
      pattern: 'EMP-\\d{6}'
"""
POLICY = """policies:
  - name: no-bluebird
    match:
      prompt:
        words: [project bluebird]
    action: block
    message: forbidden content in prompt
"""
SID = {"X-Agent-Session": "reload-1", "authorization": "Bearer sk-agent"}


def reload(gw: Gateway, old: str, new: str) -> None:
    path = next(p for p in gw.rules_dir.glob("*.yaml") if old in p.read_text())
    before = gw.logs().count("rules reloaded")
    path.write_text(path.read_text().replace(old, new))
    deadline = time.monotonic() + 30
    while gw.logs().count("rules reloaded") <= before:
        assert time.monotonic() < deadline, gw.logs()[-2000:]
        time.sleep(0.1)


def chat(gw: Gateway, messages: list[dict]) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        return c.post(OPENAI, headers=SID, json={"model": "gpt-4o-mini",
                                                 "messages": messages})


def history(turns: int) -> list[dict]:
    msgs = [{"role": "user", "content": f"{FILLER} my badge is {BADGE}, project bluebird"}]
    for t in range(turns):
        msgs += [{"role": "assistant", "content": f"ok {t}"},
                 {"role": "user", "content": f"{FILLER} turn {t}"}]
    return msgs


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    # the marker lines are where the reload puts (or takes out) the new sections
    return gateway_factory({"rules.yaml": "{standin_upstreams}" + no_identity
                            + "# MASKING\n# POLICY\n"})


def test_patterns_added_by_a_reload_apply_to_the_cached_history(gw, standin) -> None:
    standin.clear()
    for turn in range(3):  # caches warm: the same history, growing
        r = chat(gw, history(turn))
        assert r.status_code == 200, r.text[:300]
    assert BADGE in standin.requests[-1]["body"]  # no such detector yet
    reload(gw, "# MASKING\n", MASKING)
    standin.clear()
    r = chat(gw, history(3))
    assert r.status_code == 200, r.text[:300]
    got = json.loads(standin.requests[-1]["body"])["messages"]
    assert BADGE not in json.dumps(got), "the new detector skipped the cached history"
    assert "[EMPLOYEE_ID_1]" in got[0]["content"]
    # a policy added by a reload sees the history too (its searches were never run on it)
    reload(gw, "# POLICY\n", POLICY)
    standin.clear()
    r = chat(gw, history(4))
    assert r.status_code == 403 and "no-bluebird" in r.text, gw.logs()[-3000:]
    assert standin.requests == []


def test_patterns_removed_by_a_reload_no_longer_apply(gw, standin) -> None:
    reload(gw, "# MASKING\n# POLICY\n", MASKING + POLICY)
    standin.clear()
    for turn in range(3):
        r = chat(gw, history(turn))
        assert r.status_code == 403, gw.logs()[-3000:]
    clean = [{"role": "user", "content": f"{FILLER} my badge is {BADGE}"}]
    for turn in range(3):
        clean += [{"role": "assistant", "content": f"ok {turn}"},
                  {"role": "user", "content": f"{FILLER} turn {turn}"}]
        assert chat(gw, clean).status_code == 200
    assert "[EMPLOYEE_ID_1]" in standin.requests[-1]["body"]
    reload(gw, MASKING + POLICY, "# MASKING\n# POLICY\n")
    standin.clear()
    r = chat(gw, history(3))
    assert r.status_code == 200, r.text[:300]
    assert BADGE in json.loads(standin.requests[-1]["body"])["messages"][0]["content"]
