"""`agentgate demo`: a real LangGraph agent through a real gateway, all on this machine.

It starts the local stand-in upstream (OpenAI wire format + a webhook receiver), a real OIDC
provider (oidc-provider-mock) that issues the agent's short-lived token, and the gateway
(`mitmdump -s addons/gateway.py`) on free ports, with rules that route api.openai.com and
hooks.example.com to the stand-in. The agent runs as a separate process whose whole
configuration is `HTTPS_PROXY` (token as proxy password), `SSL_CERT_FILE` and a placeholder
`OPENAI_API_KEY` (the SDK refuses to start without one; the gateway injects the real key).
Then it prints what the agent sent, what the upstream received and where the flows were
recorded. Its work directory (`/tmp/agentgate-demo-*`) is removed at exit unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from addons.devkit.launch import ROOT, Gateway, standin_upstreams_yaml, start_gateway

# What the agent's SDK gets as its API key: any non-empty value; never reaches an upstream.
PLACEHOLDER_KEY = "managed-by-agentgate"

PII_QUESTION = ("Tell the team that the nightly build is green. Customer contact for the "
                "release note: jane.doe@example.com, +1 415 555 0100.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a real LangGraph agent through a local gateway")
    p.add_argument("question", nargs="?", default=PII_QUESTION)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (rules, DuckDB, logs) instead of removing it")
    p.set_defaults(func=run_cli)


MCP_HOST = "mcp.crm.example"
MCP_TOOL_ARGS = {"to": "jane.doe@example.com", "subject": "Release", "body": "The build is green."}


def _demo_rules(standin: Any, identity_yaml: str, mcp_url: str | None = None
                ) -> dict[str, str]:
    mcp_upstream = textwrap.indent(textwrap.dedent(f"""\
        - name: crm-tools
          hosts: [{MCP_HOST}]
          dialect: mcp
          forward_to: {mcp_url}
        """), "  ") if mcp_url else ""
    return {
        "upstreams.yaml": standin_upstreams_yaml(standin) + mcp_upstream,
        "identity.yaml": identity_yaml,
        "policies.yaml": textwrap.dedent("""\
            policies:
              - name: no-bulk-generation
                match: {upstream: [openai], fields: {n: "> 10"}}
                action: block
                message: bulk generation is not allowed from agents
              - name: emails-need-a-reviewer
                match: {mcp: {tool: send_email}}
                action: approve
                approvers: [demo-reviewers]
                timeout: 60
            """),
    }


def _redact(value: str, secret_values: list[str]) -> str:
    for s in secret_values:
        if s and s in value:
            value = value.replace(s, f"<gateway secret, {len(s)} chars>")
    return value


def run_demo(question: str, workdir: Path) -> dict[str, Any]:
    from addons.devkit.idp import DemoIdP
    from addons.devkit.mcpserver import MCPTestServer
    from addons.devkit.standin import StandIn

    secrets_env = {
        "OPENAI_API_KEY": "sk-demo-" + secrets.token_hex(20),
        "ANTHROPIC_API_KEY": "sk-ant-demo-" + secrets.token_hex(20),
        "WEBHOOK_TOKEN": "whk-demo-" + secrets.token_hex(12),
    }
    idp = DemoIdP().start()
    standin = StandIn(certdir=workdir / "standin-certs").start()
    # the MCP tool server shares the stand-in's CA, which the gateway is told to trust
    mcp = MCPTestServer(certdir=workdir / "standin-certs").start()
    gw: Gateway | None = None
    try:
        rules_dir = workdir / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        for name, text in _demo_rules(standin, idp.identity_yaml(), mcp.base_url).items():
            (rules_dir / name).write_text(text)
        confdir = workdir / "certs"
        confdir.mkdir(exist_ok=True)
        from mitmproxy.certs import CertStore
        CertStore.from_store(confdir, "mitmproxy", 2048)
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
        gw = start_gateway(rules_dir, confdir, data_dir, workdir / "gateway.log",
                           standin_ca=standin.ca_path, gateway_env=secrets_env)
        token = idp.token(sub="langgraph-demo-agent", groups=["demo-agents"])
        env = gw.client_env(token)
        env["OPENAI_API_KEY"] = PLACEHOLDER_KEY
        env["DEMO_WEBHOOK_URL"] = "https://hooks.example.com/agent-events"
        proc = subprocess.run([sys.executable, "-m", "addons.devkit.agent", question], env=env,
                              capture_output=True, text=True, timeout=180, cwd=str(ROOT))
        try:
            agent = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            agent = {"error": f"agent exited {proc.returncode}: {proc.stderr[-2000:]}"}
        mcp_call = _mcp_held_call(gw, idp, token, mcp)
        gw.stop()
        secret_values = list(secrets_env.values()) + [token]
        received = []
        for r in standin.requests:
            headers = {k: _redact(v, secret_values) for k, v in r["headers"]
                       if k in ("authorization", "x-api-key", "x-webhook-token", "host")}
            received.append({"method": r["method"], "path": r["path"], "headers": headers,
                             "body": r["body"]})
        return {
            "agent": agent,
            "agent_env": {"HTTPS_PROXY": gw.proxy_url("<token>"),
                          "SSL_CERT_FILE": str(gw.ca_cert),
                          "OPENAI_API_KEY": PLACEHOLDER_KEY},
            "upstream_received": received,
            "mcp": mcp_call,
            "recorded_in": str(data_dir / "agentgate.duckdb"),
            "gateway_log": str(workdir / "gateway.log"),
            "leaked": [k for k, v in secrets_env.items()
                       if v in proc.stdout or v in proc.stderr],
        }
    finally:
        if gw is not None:
            gw.stop()
        mcp.stop()
        standin.stop()
        idp.stop()


def _mcp_held_call(gw: Gateway, idp: Any, token: str, mcp: Any) -> dict[str, Any]:
    """One MCP tool call by the agent's identity, held by `emails-need-a-reviewer` until a
    reviewer approves it through the approvals API."""
    from addons.devkit.mcpserver import held_tool_call
    if not gw.approvals_url:
        return {"error": "the gateway's approvals API is not listening"}
    reviewer = idp.token(sub="demo-reviewer", groups=["demo-reviewers"])
    try:
        out = held_tool_call(f"https://{MCP_HOST}/mcp", proxy=gw.proxy_url(token),
                             ca=gw.ca_cert, approvals_url=gw.approvals_url,
                             reviewer_token=reviewer, tool="send_email",
                             arguments=MCP_TOOL_ARGS, reason="release note, ok to send")
    except Exception as e:  # noqa: BLE001 - the demo reports what failed and exits 1
        return {"error": f"{type(e).__name__}: {e}"}
    out["server_received"] = [m["params"]["arguments"] for m in mcp.jsonrpc("tools/call")]
    return out


def cli_command() -> str:
    """How to run the `agentgate` command from the repository root: the installed script
    when it is on PATH, else the bootstrap script (which needs no install)."""
    if shutil.which("agentgate"):
        return "agentgate"
    if Path.cwd().resolve() == ROOT.resolve():
        return "./run_proxy.sh cli"
    return f"{ROOT / 'run_proxy.sh'} cli"


def _commands(db: str) -> list[str]:
    cli = cli_command()
    return [f"{cli} audit sessions --db {db}", f"{cli} audit verify --db {db}"]


def _print_human(result: dict[str, Any]) -> None:
    agent = result["agent"]
    env = result["agent_env"]
    print("== the agent (a LangGraph graph: model node + webhook tool node)")
    print(f"   configured with only: HTTPS_PROXY={env['HTTPS_PROXY']}")
    print(f"                         SSL_CERT_FILE={env['SSL_CERT_FILE']}")
    print(f"                         OPENAI_API_KEY={env['OPENAI_API_KEY']}"
          "  (a placeholder: the SDK needs one, the gateway injects the real key)")
    if "error" in agent:
        print(f"   FAILED: {agent['error']}")
    for m in agent.get("transcript", []):
        line = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
        calls = "".join(f" -> tool {c['name']}({json.dumps(c['args'])})"
                        for c in m.get("tool_calls", []))
        print(f"   {m['role']:>6}: {line}{calls}")
    print("\n== what the upstream received (after the gateway)")
    for r in result["upstream_received"]:
        print(f"   {r['method']} {r['path']}")
        for k, v in r["headers"].items():
            print(f"      {k}: {v}")
        print(f"      body: {r['body'][:300]}")
    mcp = result.get("mcp") or {}
    print("\n== an MCP tool call held for a reviewer (rule emails-need-a-reviewer)")
    if "error" in mcp:
        print(f"   FAILED: {mcp['error']}")
    elif mcp.get("held"):
        what = mcp["held"]["what"] or {}
        print(f"   agent called {what.get('tool')} on {MCP_HOST}: held as {mcp['held']['id']} "
              f"(kind {what.get('kind')}), waiting: {mcp['waited_for_reviewer']}")
        print(f"   demo-reviewer approved it -> {mcp['decision']}; the tool answered: "
              f"{mcp['result']}")
        print(f"   the MCP server received (masked by the gateway): {mcp['server_received']}")
    if result.get("kept"):
        print(f"\n== recorded in {result['recorded_in']}")
        print("   query it (from the repository root):")
        for cmd in result["commands"]:
            print(f"      {cmd}")
        print(f"   gateway log: {result['gateway_log']}")
        print(f"   work directory (rules, DuckDB, logs): {result['workdir']}")
    else:
        print("\n== the work directory (rules, DuckDB, logs) was removed; run again with "
              "--keep to keep it and get the commands to query the recording")


def run_cli(args: argparse.Namespace) -> int:
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the IdP's access log
    keep = bool(getattr(args, "keep", False))
    workdir = Path(tempfile.mkdtemp(prefix="agentgate-demo-"))
    try:
        result = run_demo(args.question, workdir)
    finally:
        if not keep:  # also on failure or Ctrl-C: no /tmp/agentgate-demo-* left behind
            shutil.rmtree(workdir, ignore_errors=True)
    result.update(workdir=str(workdir), kept=keep and workdir.exists(),
                  commands=_commands(result["recorded_in"]))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(result)
    return 1 if ("error" in result["agent"] or result["leaked"]
                 or "error" in (result.get("mcp") or {})) else 0
