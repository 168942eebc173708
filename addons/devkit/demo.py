"""`agentgate demo`: a real LangGraph agent through a real gateway, all on this machine.

It starts the local stand-in upstream (OpenAI wire format + a webhook receiver), a real OIDC
provider (oidc-provider-mock) that issues the agent's short-lived token, and the gateway
(`mitmdump -s addons/gateway.py`) on free ports, with rules that route api.openai.com and
hooks.example.com to the stand-in. The agent runs as a separate process whose whole
configuration is `HTTPS_PROXY` (token as proxy password), `SSL_CERT_FILE` and a placeholder
`OPENAI_API_KEY` (the SDK refuses to start without one; the gateway injects the real key).
Then it prints what the agent sent, what the upstream received and where the flows were
recorded. Its work directory (`/tmp/agentgate-demo-*`) is removed at exit unless `--keep`.

It also shows the gateway deciding (session `demo-review`): a bulk request blocked by a
rule, and a gpt-4o call held until the demo's reviewer approves it **on the reviewers'
page**, the way a browser does (devkit/reviewer.py: the gateway's OIDC login at the local
provider's form, the CSRF token read from the page, the page's approve form with a reason;
the page is an OAuth client registered at that provider). An MCP tool call is held and
approved through the JSON API.
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
import time
from pathlib import Path
from typing import Any

from addons.devkit.launch import ROOT, Gateway, free_port, standin_upstreams_yaml, start_gateway

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
REVIEWER = "demo-reviewer"
REVIEWER_GROUP = "demo-reviewers"
DEMO_SESSION = "demo-review"  # the blocked and the held LLM call name this session
HELD_ASK = "Summarise the release notes of the nightly build for the customer newsletter."
APPROVE_REASON = "newsletter summary, fine to send to gpt-4o"
PAGE_SECRET_ENV = "AGENTGATE_DEMO_PAGE_CLIENT_SECRET"
# printed in double quotes: no $, `, " or \\ in it
VOTES_SQL = ("SELECT id, rule, decision, v->>'sub' AS who, v->>'via' AS via, "
             "v->>'reason' AS why FROM approvals, unnest(votes::JSON::JSON[]) AS t(v) "
             "ORDER BY requested_at")
MCP_TOOL_ARGS = {"to": "jane.doe@example.com", "subject": "Release", "body": "The build is green."}


def _demo_rules(standin: Any, identity_yaml: str, mcp_url: str | None = None,
                page: dict[str, str] | None = None) -> dict[str, str]:
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
              - name: gpt-4o-needs-a-reviewer
                match: {upstream: [openai], model: [gpt-4o]}
                action: approve
                message: gpt-4o calls from agents need a reviewer
                approvers: [demo-reviewers]
                timeout: 60
            """),
    } | ({"approvals.yaml": textwrap.dedent(f"""\
            approvals:
              link_base: {page["base"]}
              web:
                client_id: {page["client_id"]}
                client_secret_env: {PAGE_SECRET_ENV}
                redirect_url: {page["base"]}/ui/callback
            """)} if page else {})


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
    idp = DemoIdP(users={REVIEWER: {"groups": [REVIEWER_GROUP]}}).start()
    standin = StandIn(certdir=workdir / "standin-certs").start()
    # the MCP tool server shares the stand-in's CA, which the gateway is told to trust
    mcp = MCPTestServer(certdir=workdir / "standin-certs").start()
    gw: Gateway | None = None
    try:
        # the reviewers' page: an OAuth client registered at the provider for this run
        page_listen = f"127.0.0.1:{free_port()}"
        page_base = f"http://{page_listen}"
        client = idp.register_client([f"{page_base}/ui/callback"])
        secrets_env[PAGE_SECRET_ENV] = client["client_secret"]
        page = {"base": page_base, "client_id": client["client_id"]}
        rules_dir = workdir / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        for name, text in _demo_rules(standin, idp.identity_yaml(), mcp.base_url,
                                      page).items():
            (rules_dir / name).write_text(text)
        confdir = workdir / "certs"
        confdir.mkdir(exist_ok=True)
        from mitmproxy.certs import CertStore
        CertStore.from_store(confdir, "mitmproxy", 2048)
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
        gw = start_gateway(rules_dir, confdir, data_dir, workdir / "gateway.log",
                           standin_ca=standin.ca_path, gateway_env=secrets_env,
                           approvals_listen=page_listen)
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
        blocked = _blocked_call(gw, token)
        review = _held_on_the_page(gw, token, page_base)
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
            "blocked": blocked,
            "review": review,
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


def _openai_client(gw: Gateway, token: str) -> Any:
    """The agent's identity, in this process: an OpenAI SDK client configured as an agent
    is (proxy + CA + placeholder key), naming the demo's session."""
    import openai
    return openai.OpenAI(api_key=PLACEHOLDER_KEY, max_retries=0, timeout=90,
                         default_headers={"X-Agent-Session": DEMO_SESSION},
                         http_client=openai.DefaultHttpxClient(
                             proxy=gw.proxy_url(token), verify=str(gw.ca_cert)))


def _blocked_call(gw: Gateway, token: str) -> dict[str, Any]:
    """A request for 20 completions at once: rule no-bulk-generation refuses it."""
    import openai
    try:
        _openai_client(gw, token).chat.completions.create(
            model="gpt-4o-mini", n=20,
            messages=[{"role": "user", "content": "Write 20 product reviews."}])
    except openai.PermissionDeniedError as e:
        return {"status": e.status_code, "message": _error_message(e)}
    except Exception as e:  # noqa: BLE001 - the demo reports what failed and exits 1
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": "the bulk request was not blocked"}


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return str(e)


def _held_on_the_page(gw: Gateway, token: str, page_base: str) -> dict[str, Any]:
    """A gpt-4o call held by rule gpt-4o-needs-a-reviewer; the demo's reviewer signs in to
    the reviewers' page as a browser does and approves it there with a reason."""
    import concurrent.futures

    from addons.devkit.reviewer import PageError, PageReviewer
    client = _openai_client(gw, token)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    call = pool.submit(lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": HELD_ASK}]))
    try:
        reviewer = PageReviewer(page_base)
        reviewer.sign_in(REVIEWER)
        deadline = time.monotonic() + 30
        while not (held := reviewer.pending()):
            if call.done() or time.monotonic() > deadline:
                return {"error": "the gpt-4o call was not held for a reviewer"
                        + (f" ({call.exception() or 'it completed'})" if call.done() else "")}
            time.sleep(0.1)
        approval_id = held[0]
        waiting = not call.done()
        outcome = reviewer.vote(approval_id, "approve", APPROVE_REASON)
        answer = call.result(timeout=60).choices[0].message.content
        history = reviewer.history()
    except (PageError, concurrent.futures.TimeoutError) as e:
        return {"error": f"reviewers' page: {e}"}
    except Exception as e:  # noqa: BLE001 - the demo reports what failed and exits 1
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    vote = f"{REVIEWER} approved via page: {APPROVE_REASON}"
    return {"page": f"{page_base}/ui/", "history_page": f"{page_base}/ui/history",
            "approval_id": approval_id, "reviewer": REVIEWER, "waiting": waiting,
            "reason": APPROVE_REASON, "approved_on_page": "approved" in outcome,
            "in_history": approval_id in history and vote in history,
            "answer": answer, "session": DEMO_SESSION}


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
    blocked = result.get("blocked") or {}
    print("\n== a request the rules refuse (rule no-bulk-generation)")
    if "error" in blocked:
        print(f"   FAILED: {blocked['error']}")
    elif blocked:
        print(f"   the agent asked for 20 completions at once -> {blocked['status']}: "
              f"{blocked['message']}")
    review = result.get("review") or {}
    print("\n== an LLM call held for a reviewer, approved on the reviewers' page "
          "(rule gpt-4o-needs-a-reviewer)")
    if "error" in review:
        print(f"   FAILED: {review['error']}")
    elif review:
        print(f"   the agent called gpt-4o: held as {review['approval_id']}, the call waiting: "
              f"{review['waiting']}")
        print(f"   {review['reviewer']} opened {review['page']}, signed in at the local OIDC "
              f"provider (code + PKCE, as a browser does)")
        print(f"   and approved it on the page with the reason \"{review['reason']}\"; "
              f"the call then returned: {review['answer']}")
    print("\n== where to look")
    if review.get("page"):
        print(f"   the reviewers' page: {review['page']} (pending) and "
              f"{review['history_page']} (decided:")
        print("      who, when, why, via); this demo's gateway has stopped with it: "
              "`./run_proxy.sh dev` keeps one running")
    print("   mitmweb: every flow carries a comment whose first line is the decision and rule "
          "(⛔ blocked, ✅ approved)")
    if result.get("kept"):
        db = result["recorded_in"]
        cli = cli_command()
        web = "./run_proxy.sh" if cli == "./run_proxy.sh cli" else f"{ROOT / 'run_proxy.sh'}"
        mitm = str(Path(result["workdir"]) / f"{DEMO_SESSION}.mitm")
        print(f"   the record of session {DEMO_SESSION} (the block and the approved hold):")
        print(f"      {cli} audit sessions --db {db} --session {DEMO_SESSION}")
        print("   every vote (who, via page/api/cli/slack/mitmweb, when, why):")
        print(f'      {cli} audit query --db {db} "{VOTES_SQL}"')
        print("   the same flows in mitmweb, read-only:")
        print(f"      {cli} export --db {db} --session {DEMO_SESSION} -o {mitm}")
        print(f"      {web} web -r {mitm}")
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
                 or any("error" in (result.get(k) or {})
                        for k in ("mcp", "blocked", "review"))) else 0
