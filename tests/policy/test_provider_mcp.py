"""Provider-side MCP (the provider connects to the tool server, not the agent): OpenAI Responses
`tools: [{type: mcp, server_url, allowed_tools, require_approval}]` and Anthropic
`mcp_servers` (+ `mcp_toolset`). Rules allow/block by server URL and exposed tool names, and
an allow-list cannot be slipped past by omitting allowed_tools, by URL tricks, or by case."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import anthropic
import openai
import pytest

from addons.policy.engine import DEFAULT_RULE, normalize_server_url, provider_tools
from tests.policy.test_facts import decide, policies

CRM = "https://mcp.crm.example/mcp"

ALLOW_LIST = """\
    policies:
      - name: only-crm-server
        action: block
        match: {provider_tools: {type: [mcp], not_server_url: ["https://mcp.crm.example/*"]}}
        message: this MCP server is not allowed
      - name: only-crm-read-tools
        action: block
        match:
          provider_tools: {type: [mcp], server_url: ["https://mcp.crm.example/*"],
                           not_tools: [lookup_customer, list_*]}
      - name: no-unattended-writes
        action: block
        match: {provider_tools: {type: [mcp], tools: ["delete_*"], require_approval: [never]}}
    """


def oa(**kw) -> dict:
    return {"model": "gpt-4o-mini", "input": "hi",
            "tools": [{"type": "mcp", "server_label": "crm", "server_url": CRM, **kw}]}


@pytest.mark.parametrize("tool, rule", [
    ({"allowed_tools": ["lookup_customer"]}, DEFAULT_RULE),
    ({"allowed_tools": {"tool_names": ["lookup_customer", "list_orders"]}}, DEFAULT_RULE),
    ({"allowed_tools": ["lookup_customer", "send_email"]}, "only-crm-read-tools"),
    ({}, "only-crm-read-tools"),                       # no allowed_tools: every tool exposed
    ({"allowed_tools": {"read_only": True}}, "only-crm-read-tools"),  # names unknown
    ({"allowed_tools": ["Lookup_Customer"]}, "only-crm-read-tools"),  # tool names are exact
    ({"server_url": "https://evil.example/mcp", "allowed_tools": ["lookup_customer"]},
     "only-crm-server"),
    ({"server_url": "https://mcp.crm.example.evil.example/mcp",
      "allowed_tools": ["lookup_customer"]}, "only-crm-server"),
    ({"server_url": "https://mcp.crm.example@evil.example/mcp",
      "allowed_tools": ["lookup_customer"]}, "only-crm-server"),
    ({"server_url": "HTTPS://MCP.CRM.EXAMPLE:443/mcp", "allowed_tools": ["lookup_customer"]},
     DEFAULT_RULE),                                     # same server, spelled differently
    ({"server_url": None, "connector_id": "connector_gmail"}, "only-crm-server"),
])
def test_openai_responses_mcp_tools(tmp_path: Path, tool: dict, rule: str) -> None:
    ps = policies(ALLOW_LIST, tmp_path)
    assert decide(ps, oa(**tool), "/v1/responses").rule == rule


def test_approval_setting_is_a_fact(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - name: no-unattended-writes
            action: block
            match: {provider_tools: {type: [mcp], tools: ["delete_*"],
                                     require_approval: [never]}}
        """, tmp_path)
    d = {"allowed_tools": ["delete_user"]}
    assert decide(ps, oa(**d), "/v1/responses").rule == DEFAULT_RULE  # default: always asks
    assert decide(ps, oa(**d, require_approval="never"), "/v1/responses").rule \
        == "no-unattended-writes"
    assert decide(ps, oa(**d, require_approval={"never": {"tool_names": ["x"]}}),
                  "/v1/responses").rule == "no-unattended-writes"
    assert decide(ps, oa(require_approval="never"), "/v1/responses").rule \
        == "no-unattended-writes"  # every tool, so delete_* too
    assert decide(ps, oa(allowed_tools=["read"], require_approval="never"),
                  "/v1/responses").rule == DEFAULT_RULE


def am(servers: list[dict], toolsets: list[dict] | None = None) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}], "mcp_servers": servers,
            **({"tools": toolsets} if toolsets else {})}


def srv(url: str = CRM, **kw) -> dict:
    return {"type": "url", "url": url, "name": "crm", **kw}


@pytest.mark.parametrize("body, rule", [
    (am([srv(tool_configuration={"allowed_tools": ["lookup_customer"]})]), DEFAULT_RULE),
    (am([srv(tool_configuration={"allowed_tools": ["lookup_customer"], "enabled": True})]),
     DEFAULT_RULE),
    (am([srv()]), "only-crm-read-tools"),
    (am([srv(tool_configuration={"allowed_tools": ["send_email"]})]), "only-crm-read-tools"),
    (am([srv(tool_configuration={"enabled": False})]), DEFAULT_RULE),  # exposes nothing
    (am([srv(tool_configuration={"allowed_tools": ["lookup_customer"]}),
         {"type": "url", "url": "https://evil.example/sse", "name": "evil",
          "tool_configuration": {"allowed_tools": ["lookup_customer"]}}]), "only-crm-server"),
    # the newer mcp_toolset form
    (am([srv()], [{"type": "mcp_toolset", "mcp_server_name": "crm",
                   "default_config": {"enabled": False},
                   "configs": {"lookup_customer": {"enabled": True}}}]), DEFAULT_RULE),
    (am([srv()], [{"type": "mcp_toolset", "mcp_server_name": "crm",
                   "configs": {"send_email": {"enabled": False}}}]), "only-crm-read-tools"),
    (am([srv()], [{"type": "mcp_toolset", "mcp_server_name": "nowhere"}]), "only-crm-server"),
])
def test_anthropic_mcp_servers(tmp_path: Path, body: dict, rule: str) -> None:
    ps = policies(ALLOW_LIST, tmp_path)
    assert decide(ps, body, "/v1/messages").rule == rule


def test_facts_and_url_normalization() -> None:
    got = provider_tools(oa(allowed_tools=["a"], require_approval="never"))
    assert got == [("mcp", CRM, "crm", ("a",), "never")]
    assert provider_tools(am([srv()]))[0].approval == "never"  # Anthropic never asks
    assert normalize_server_url("HTTPS://Host.Example:443") == "https://host.example/"
    assert normalize_server_url("http://h.example:8080/x?y=1") == "http://h.example:8080/x?y=1"
    assert normalize_server_url("https://u:p@h.example/").startswith("invalid:")
    assert normalize_server_url("https://h.example:99999/").startswith("invalid:")


@pytest.mark.parametrize("match, reason", [
    ("{provider_tools: {}}", "give one or more of"),
    ("{provider_tools: {tools: []}}", ""),
    ("{provider_tools: {server: [x]}}", "unknown key"),
])
def test_bad_rules_name_the_key(tmp_path: Path, match: str, reason: str) -> None:
    from addons.config.schema import ConfigError
    with pytest.raises(ConfigError) as e:
        policies(f"policies:\n  - {{name: r, action: block, match: {match}}}\n", tmp_path)
    assert "b.yaml" in str(e.value) and "provider_tools" in str(e.value) and reason in str(e.value)


# ---------------------------------------------------------------- through a real mitmdump
@pytest.mark.integration
def test_sdks_through_the_gateway(gateway_factory, standin, no_identity) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity + 'approvals: {listen: "off"}\n'
                         + textwrap.dedent(ALLOW_LIST))
    http = dict(proxy=gw.proxy_url(), verify=str(gw.ca_cert))
    oai = openai.OpenAI(api_key="sk-agent", max_retries=0, timeout=30,
                        http_client=openai.DefaultHttpxClient(**http))
    ant = anthropic.Anthropic(api_key="sk-agent", max_retries=0, timeout=30,
                              http_client=anthropic.DefaultHttpxClient(**http))
    standin.clear()
    ok = oai.responses.create(model="gpt-4o-mini", input="hello", tools=[
        {"type": "mcp", "server_label": "crm", "server_url": CRM,
         "allowed_tools": ["lookup_customer"], "require_approval": "never"}])
    assert ok.output_text.startswith("echo: hello") or ok.output
    assert len(standin.requests) == 1
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai.responses.create(model="gpt-4o-mini", input="hello", tools=[
            {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp",
             "require_approval": "never"}])
    assert "only-crm-server" in str(e.value) and e.value.status_code == 403
    with pytest.raises(anthropic.PermissionDeniedError) as e2:
        ant.beta.messages.create(
            model="claude-sonnet-4-5", max_tokens=10, betas=["mcp-client-2025-04-04"],
            messages=[{"role": "user", "content": "hi"}],
            mcp_servers=[{"type": "url", "url": CRM, "name": "crm",
                          "tool_configuration": {"allowed_tools": ["send_email"]}}])
    assert "only-crm-read-tools" in json.dumps(e2.value.body)
    assert len(standin.requests) == 1  # neither refused request reached the provider


def test_readme_example(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "rules" / "README.md").read_text()
    section = readme[readme.index("**Provider-side MCP.**"):]
    example = section[section.index("```yaml\n") + 8:]
    ps = policies(example[:example.index("```")], tmp_path)
    ok = "https://mcp.crm.example.com/mcp"
    assert decide(ps, oa(server_url=ok, allowed_tools=["lookup_customer"]),
                  "/v1/responses").rule == DEFAULT_RULE
    assert decide(ps, oa(server_url=ok), "/v1/responses").rule == "only-read-tools"
    assert decide(ps, oa(allowed_tools=["lookup_customer"]), "/v1/responses").rule \
        == "only-our-tool-servers"
