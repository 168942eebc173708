"""Policy through a real mitmdump with real SDK clients; rule reload without restart."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

POLICIES = """
policies:
  - name: restricted-models
    match: {model: ["gpt-5*", "claude-opus-*"]}
    action: block
    message: this model is not approved for agents
  - name: no-customer-ssn
    match: {prompt: {regex: ['\\b\\d{3}-\\d{2}-\\d{4}\\b'], words: [project bluebird]}}
    action: block
    message: forbidden content in prompt
"""


def oa(gw: Gateway, sent: list[bytes] | None = None) -> openai.OpenAI:
    hooks = {"request": [lambda r: sent.append(r.read())]} if sent is not None else {}
    return openai.OpenAI(api_key="sk-agent", max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(
                             proxy=gw.proxy_url(), verify=str(gw.ca_cert), event_hooks=hooks))


def an(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-agent", max_retries=0, timeout=30,
                               http_client=anthropic.DefaultHttpxClient(
                                   proxy=gw.proxy_url(), verify=str(gw.ca_cert)))


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity + POLICIES)


def test_sdks_see_the_rule(gw: Gateway, standin) -> None:
    standin.clear()
    client = oa(gw)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="gpt-5-pro",
                                       messages=[{"role": "user", "content": "hello"}])
    assert "restricted-models" in str(ei.value)
    assert "this model is not approved for agents" in str(ei.value)
    assert ei.value.status_code == 403
    assert ei.value.body["code"] == "policy_blocked"

    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.responses.create(model="gpt-4o-mini", input="my ssn is 123-45-6789")
    assert "no-customer-ssn" in str(ei.value)

    # a streamed request gets a proper error, not a broken stream
    with pytest.raises(openai.PermissionDeniedError) as ei:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", stream=True,
            messages=[{"role": "user", "content": "status of Project Bluebird?"}])
        list(stream)
    assert "no-customer-ssn" in str(ei.value)

    with pytest.raises(anthropic.PermissionDeniedError) as ei:
        an(gw).messages.create(model="claude-sonnet-4", max_tokens=50,
                               system="Context: project bluebird launch",
                               messages=[{"role": "user", "content": "summarise"}])
    assert "no-customer-ssn" in str(ei.value)
    with pytest.raises(anthropic.PermissionDeniedError) as ei:
        with an(gw).messages.stream(model="claude-opus-4", max_tokens=50,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            list(s)
    assert "restricted-models" in str(ei.value)
    assert standin.requests == []  # nothing blocked ever left the gateway


def test_allowed_request_passes_untouched(gw: Gateway, standin) -> None:
    standin.clear()
    sent: list[bytes] = []
    r = oa(gw, sent).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "ping"}], max_tokens=20)
    assert r.choices[0].message.content == "echo: ping"
    (got,) = standin.requests
    assert got["body"].encode() == sent[0]
    chunks = list(an(gw).messages.create(model="claude-sonnet-4", max_tokens=20, stream=True,
                                         messages=[{"role": "user", "content": "pong"}]))
    assert chunks


def wait_for_log(gw: Gateway, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.logs().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in logs:\n{gw.logs()[-3000:]}")


def post(gw: Gateway, model: str) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        return c.post("https://api.openai.com/v1/chat/completions",
                      json={"model": model, "messages": [{"role": "user", "content": "x"}]})


def test_reload_valid_and_invalid_edits(gateway_factory, no_identity, standin) -> None:
    gw = gateway_factory({"a.yaml": "{standin_upstreams}" + no_identity,
                          "policies.yaml": "policies: []\n"})
    assert post(gw, "gpt-4o").status_code == 200
    # a valid edit takes effect without restart
    (gw.rules_dir / "policies.yaml").write_text(
        "policies:\n  - {name: no-4o, match: {model: gpt-4o}, action: block}\n")
    wait_for_log(gw, "rules reloaded")
    r = post(gw, "gpt-4o")
    assert r.status_code == 403 and r.json()["error"]["rule"] == "no-4o"
    # an invalid edit is reported and the previous rules stay in force
    (gw.rules_dir / "policies.yaml").write_text(
        "policies:\n  - {name: no-4o, match: {model: gpt-4o}, action: explode}\n")
    wait_for_log(gw, "rules change rejected")
    logs = gw.logs()
    assert "policies.yaml: policies[0].action: must be one of" in logs
    r = post(gw, "gpt-4o")
    assert r.status_code == 403 and r.json()["error"]["rule"] == "no-4o"
    assert post(gw, "gpt-4o-mini").status_code == 200
    # an unknown upstream name is rejected too (validated against declared upstreams)
    (gw.rules_dir / "policies.yaml").write_text(
        "policies:\n  - {name: x, match: {upstream: [nope]}, action: block}\n")
    wait_for_log(gw, "rules change rejected", 2)
    assert "no upstream named 'nope'" in gw.logs()
    assert post(gw, "gpt-4o").status_code == 403


def test_observe_only_option_lets_blocked_requests_pass(gateway_factory, no_identity,
                                                        standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity + POLICIES,
                         extra_args=("--set", "agentgate_observe_only=true"))
    standin.clear()
    r = oa(gw).chat.completions.create(model="gpt-5-pro",
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "echo: hi"
    assert len(standin.requests) == 1
    assert json.loads(standin.requests[0]["body"])["model"] == "gpt-5-pro"
    wait_for_log(gw, "block (observed, not enforced) by rule restricted-models")


def test_a_long_conversation_is_judged_as_from_scratch(gw: Gateway, standin) -> None:
    """Turns that re-send a growing history (past the sizes where a session's facts are
    continued from its last request) through the real gateway: a phrase completed at the
    end of what was sent before is blocked, the turns around it pass."""
    prose = "the order ships on friday; the invoice address is unchanged. " * 60
    msgs = [{"role": "system", "content": "be brief"}]
    hdr = {"x-agent-session": "long-conversation"}

    def send(messages: list) -> httpx.Response:
        with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
            return c.post("https://api.openai.com/v1/chat/completions", headers=hdr,
                          json={"model": "gpt-4o-mini", "messages": messages})

    for turn in range(6):
        msgs = [*msgs, {"role": "user", "content": f"turn {turn}: {prose}"},
                {"role": "assistant", "content": prose}]
        assert send(msgs).status_code == 200
    for head, tail in (("about project", " bluebird"), ("my number is 536-22-", "4519")):
        start = [*msgs, {"role": "user", "content": head}]
        assert send(start).status_code == 200
        done = [*msgs, {"role": "user", "content": head + tail}]
        r = send(done)
        assert r.status_code == 403 and r.json()["error"]["rule"] == "no-customer-ssn"
        assert send([*start, {"role": "assistant", "content": "ok"}]).status_code == 200
