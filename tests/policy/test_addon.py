"""The policy addon on mitmproxy test flows: decisions, dialects, observe-only, replays, reload."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.frame import flowbody
from addons.policy.addon import Policy

RULES = """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
  - {name: anthropic, hosts: [api.anthropic.com], dialect: anthropic}
  - {name: hook, hosts: [hooks.example.com], dialect: webhook}
policies:
  - {name: admins-anything, match: {groups: [admins]}, action: allow}
  - name: no-opus
    match: {model: ["claude-opus-*", "gpt-5*"]}
    action: block
    message: this model is restricted
  - name: no-secrets
    match: {prompt: {words: [project bluebird]}}
    action: block
  - name: bulk
    match: {fields: {n: "> 10"}}
    action: approve
    approvers: [reviewers]
    min_approvals: 2
    timeout: 60
  - {name: watch-hooks, match: {upstream: [hook]}, action: observe}
"""


def make_holder(tmp_path: Path, text: str = RULES) -> RulesHolder:
    d = tmp_path / "rules"
    d.mkdir(parents=True, exist_ok=True)
    (d / "r.yaml").write_text(text)
    return RulesHolder(load_rules(d))


def flow_for(url: str, body: dict | bytes | None, *, upstream: str, dialect: str,
             identity: dict | None = None, headers: dict[str, str] | None = None
             ) -> http.HTTPFlow:
    f = tflow.tflow()
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    f.request = http.Request.make("POST", url, content or b"",
                                  {"content-type": "application/json", **(headers or {})})
    f.metadata["upstream"] = {"name": upstream, "dialect": dialect}
    if identity is not None:
        f.metadata["identity"] = identity
    return f


def openai_flow(body, **kw) -> http.HTTPFlow:
    return flow_for("https://api.openai.com/v1/chat/completions", body, upstream="openai",
                    dialect="openai", **kw)


def anthropic_flow(body, **kw) -> http.HTTPFlow:
    return flow_for("https://api.anthropic.com/v1/messages", body, upstream="anthropic",
                    dialect="anthropic", **kw)


def drop_stale_log_handlers() -> None:
    """taddons.context() leaves its master's log handler on the root logger; once that
    master's loop is closed, any later log record raises in the handler. Drop those."""
    root = logging.getLogger()
    for h in list(root.handlers):
        loop = getattr(getattr(h, "master", None), "event_loop", None)
        if loop is not None and loop.is_closed():
            root.removeHandler(h)


@pytest.fixture(autouse=True)
def _no_stale_mitmproxy_log_handlers():
    drop_stale_log_handlers()
    yield
    drop_stale_log_handlers()


@pytest.fixture
def addon(tmp_path: Path) -> Policy:
    return Policy(make_holder(tmp_path))


def run(addon: Policy, flow: http.HTTPFlow, **options) -> http.HTTPFlow:
    async def go() -> None:
        # inside a running loop: mitmproxy's log handler forwards records to it
        with taddons.context(addon) as tctx:
            if options:
                tctx.configure(addon, **options)
            await addon.request(flow)
    asyncio.run(go())
    drop_stale_log_handlers()
    return flow


def chat(model: str, text: str = "hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def test_block_answers_openai_dialect_naming_rule(addon: Policy) -> None:
    f = run(addon, openai_flow(chat("gpt-5-pro")))
    assert f.response.status_code == 403
    err = json.loads(f.response.content)["error"]
    assert err["code"] == "policy_blocked" and err["rule"] == "no-opus"
    assert err["type"] == "permission_error"
    assert "this model is restricted" in err["message"] and "no-opus" in err["message"]
    assert f.metadata["decision"] == {"action": "block", "rule": "no-opus",
                                      "message": "this model is restricted", "observed": False}
    assert f.metadata["refusal"]["rule"] == "no-opus"
    assert f.metadata["refusal"]["step"] == "policy"


def test_block_answers_anthropic_dialect(addon: Policy) -> None:
    body = {"model": "claude-sonnet-4", "max_tokens": 10, "system": "Project  Bluebird rules",
            "messages": [{"role": "user", "content": "hello"}]}
    f = run(addon, anthropic_flow(body))
    assert f.response.status_code == 403
    doc = json.loads(f.response.content)
    assert doc["type"] == "error" and doc["error"]["type"] == "permission_error"
    assert doc["error"]["rule"] == "no-secrets"


def test_streamed_request_blocked_with_plain_json(addon: Policy) -> None:
    f = run(addon, openai_flow(chat("gpt-4o", "about project bluebird", stream=True)))
    assert f.response.status_code == 403
    assert f.response.headers["content-type"] == "application/json"
    assert f.response.stream is False or f.response.stream is None
    assert json.loads(f.response.content)["error"]["rule"] == "no-secrets"


def test_allow_leaves_flow_untouched(addon: Policy) -> None:
    body = json.dumps(chat("gpt-4o", "hello")).encode()
    f = run(addon, openai_flow(body))
    assert f.response is None
    assert f.request.content == body
    assert f.metadata["decision"] == {"action": "allow", "rule": "<default>", "message": "",
                                      "observed": False}


def test_identity_from_metadata(addon: Policy) -> None:
    ident = {"sub": "alice", "iss": "https://idp", "groups": ["admins"], "roles": []}
    f = run(addon, openai_flow(chat("gpt-5-pro"), identity=ident))
    assert f.response is None
    assert f.metadata["decision"]["rule"] == "admins-anything"


def test_approve_sets_approval_metadata_and_passes_on(addon: Policy) -> None:
    f = run(addon, openai_flow(chat("gpt-4o", n=20)))
    assert f.response is None
    d = f.metadata["decision"]
    assert d["action"] == "approve" and d["rule"] == "bulk" and d["observed"] is False
    assert d["approval"] == {"groups": ["reviewers"], "min_approvals": 2, "timeout": 60,
                             "on_timeout": None, "allow_mitmweb": False}


def test_observe_rule_passes(addon: Policy) -> None:
    f = flow_for("https://hooks.example.com/x", {"a": 1}, upstream="hook", dialect="webhook")
    run(addon, f)
    assert f.response is None
    assert f.metadata["decision"]["action"] == "observe"
    assert f.metadata["decision"]["observed"] is True


def test_observe_only_option(addon: Policy) -> None:
    flows = [openai_flow(chat("gpt-5")), openai_flow(chat("gpt-4o", n=20)),
             openai_flow(chat("gpt-5"))]

    async def go() -> None:
        with taddons.context(addon) as tctx:
            tctx.configure(addon, agentgate_observe_only=True)
            await addon.request(flows[0])
            await addon.request(flows[1])
            tctx.configure(addon, agentgate_observe_only=False)
            await addon.request(flows[2])
    asyncio.run(go())
    assert flows[0].response is None
    assert flows[0].metadata["decision"]["action"] == "block"
    assert flows[0].metadata["decision"]["observed"] is True
    assert flows[1].response is None and "approval" not in flows[1].metadata["decision"]
    # and back: enforcement again once the option is off
    assert flows[2].response.status_code == 403


def test_replays_are_checked(addon: Policy) -> None:
    f = openai_flow(chat("gpt-5"))
    f.is_replay = "request"
    run(addon, f)
    assert f.response.status_code == 403


def test_gzip_body_is_inspected(addon: Policy) -> None:
    raw = gzip.compress(json.dumps(chat("gpt-4o", "project bluebird")).encode())
    f = openai_flow(None, headers={"content-encoding": "gzip"})
    f.request.raw_content = raw
    run(addon, f)
    assert f.response.status_code == 403
    assert f.metadata["decision"]["rule"] == "no-secrets"


def test_undecodable_body_fails_closed(addon: Policy, tmp_path: Path) -> None:
    f = openai_flow(None, headers={"content-encoding": "gzip"})
    f.request.raw_content = b"definitely not gzip"
    run(addon, f)
    assert f.response.status_code == 400
    assert json.loads(f.response.content)["error"]["code"] == "policy_uninspectable"
    # with no rule that needs the body, the same request is not refused by policy
    quiet = Policy(make_holder(tmp_path / "q", """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
policies:
  - {name: only-deletes, match: {method: DELETE, model: x}, action: block}
"""))
    f = openai_flow(None, headers={"content-encoding": "gzip"})
    f.request.raw_content = b"definitely not gzip"
    run(quiet, f)
    assert f.response is None


def test_reload_takes_effect_on_next_flow(tmp_path: Path) -> None:
    holder = make_holder(tmp_path)
    addon = Policy(holder)
    assert run(addon, openai_flow(chat("gpt-4o"))).response is None
    d = tmp_path / "rules2"
    d.mkdir()
    (d / "r.yaml").write_text(RULES + "  - {name: no-4o, match: {model: gpt-4o}, "
                              "action: block}\n")
    holder.install(load_rules(d))
    f = run(addon, openai_flow(chat("gpt-4o")))
    assert f.response.status_code == 403
    assert f.metadata["decision"]["rule"] == "no-4o"


def test_flowbody_cache_follows_body_changes() -> None:
    f = openai_flow(chat("a"))
    first = flowbody.parsed_json(f)
    assert flowbody.parsed_json(f) is first       # parsed once
    f.request.content = json.dumps(chat("b")).encode()  # e.g. masking rewrote it
    assert flowbody.parsed_json(f)["model"] == "b"
    f.request.content = b"not json"   # declared application/json: malformed, not "no JSON"
    with pytest.raises(ValueError):
        flowbody.parsed_json(f)
    f.request.headers["content-type"] = "text/plain"
    assert flowbody.parsed_json(f) is None


def test_host_condition_uses_real_destination_not_host_header(tmp_path: Path) -> None:
    addon = Policy(make_holder(tmp_path, """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
policies:
  - {name: no-openai-embeddings, match: {host: [api.openai.com], path: ["/v1/embeddings"]},
     action: block}
"""))
    f = flow_for("https://api.openai.com/v1/./embeddings?x=1", {"input": "x"},
                 upstream="openai", dialect="openai")
    f.request.headers["host"] = "innocent.example"
    assert f.request.pretty_host == "innocent.example"
    run(addon, f)
    assert f.response.status_code == 403
