"""`agentgate approvals list|show|approve|deny`: the reviewers' CLI over the approvals API.

  agentgate approvals list                       pending approvals you may decide
  agentgate approvals show ID                    one approval with its masked body preview
  agentgate approvals approve ID [--reason …]
  agentgate approvals deny ID --reason …

The reviewer's own OIDC token comes from `--token TOKEN`, `--token -` (stdin),
$AGENTGATE_TOKEN, or stdin when it is not a terminal. The API address from `--url`,
$AGENTGATE_APPROVALS_URL, or http://127.0.0.1:8081. The CLI talks to the API directly,
never through an HTTP(S)_PROXY (an agent's proxy settings would route it into the gateway).
Exit status: 0 done, 1 refused by the API (message printed), 2 usage or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8081"


class CLIError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        self.code = code
        super().__init__(message)


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help="approvals API base URL (default $AGENTGATE_APPROVALS_URL or "
                             f"{DEFAULT_URL})")
    common.add_argument("--token", default=None,
                        help="your OIDC token, or '-' to read it from stdin "
                             "(default $AGENTGATE_TOKEN, else stdin)")
    common.add_argument("--cacert", default=None,
                        help="CA bundle for an https:// API URL")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    common.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")

    p = sub.add_parser("approvals", help="list, approve or deny held requests",
                       description="Review requests the gateway holds for approval.")
    asub = p.add_subparsers(dest="approvals_command", required=True)
    ls = asub.add_parser("list", parents=[common], help="pending approvals you may decide")
    ls.set_defaults(func=cmd_list)
    show = asub.add_parser("show", parents=[common], help="one approval, with body preview")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)
    ap = asub.add_parser("approve", parents=[common], help="approve a held request")
    ap.add_argument("id")
    ap.add_argument("--reason", default="", help="optional note for the record")
    ap.set_defaults(func=cmd_approve)
    dn = asub.add_parser("deny", parents=[common], help="deny a held request")
    dn.add_argument("id")
    dn.add_argument("--reason", required=True, help="why (the agent sees it)")
    dn.set_defaults(func=cmd_deny)


# ---------------------------------------------------------------- plumbing
def base_url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get("AGENTGATE_APPROVALS_URL") or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise CLIError(f"not an http(s) URL: {url!r}")
    return url.rstrip("/")


def read_token(args: argparse.Namespace, stdin: Any = None) -> str:
    stdin = stdin or sys.stdin
    token = args.token
    if token == "-" or (token is None and not os.environ.get("AGENTGATE_TOKEN")
                        and not stdin.isatty()):
        token = stdin.readline()
    elif token is None:
        token = os.environ.get("AGENTGATE_TOKEN")
    token = (token or "").strip()
    if not token:
        raise CLIError("no token: give --token, set AGENTGATE_TOKEN, or pipe it on stdin")
    return token


def call(args: argparse.Namespace, method: str, path: str,
         body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = base_url(args) + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={  # noqa: S310 - http(s) checked
        "Authorization": f"Bearer {read_token(args)}", "Accept": "application/json",
        **({"Content-Type": "application/json"} if data is not None else {})})
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(
            context=ssl.create_default_context(cafile=args.cacert)))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=args.timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            err = json.load(e).get("error", {})
            message = f"{err.get('message', e.reason)} ({err.get('code', e.code)})"
        except (ValueError, AttributeError):
            message = str(e.reason)
        raise CLIError(f"refused: HTTP {e.code}: {message}", 1) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CLIError(f"cannot reach the approvals API at {base_url(args)}: {reason}") from None


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


KIND_WORDS = {"llm": "LLM", "tool": "tool", "sql": "SQL", "webhook": "webhook",
              "http": "HTTP"}


def _what(a: dict[str, Any]) -> str:
    """kind, model or tool, and the request's one-line summary: what tells holds apart
    (every LLM hold used to read `POST https://api.openai.com/v1/chat/completions`)."""
    w = a.get("what") or {}
    kind = w.get("kind") or "http"
    parts = [KIND_WORDS.get(kind, kind)]
    if kind == "sql":
        parts.append(f"{w.get('upstream')}/{w.get('database')}")
    elif w.get("tool"):
        parts.append(f"tool={w['tool']}")
    if w.get("model"):
        parts.append(f"model={w['model']}")
    if not w.get("tool") and not w.get("model") and kind != "sql":
        parts.append(f"{w.get('method', '?')} {w.get('url', '?')}")
    summary = w.get("summary") or (w.get("sql") if kind == "sql" else "")
    if summary:
        summary = " ".join(str(summary).split())
        parts.append(f'"{summary[:80]}{"…" if len(summary) > 80 else ""}"')
    return " ".join(parts)


def _request_line(a: dict[str, Any]) -> str:
    w = a.get("what") or {}
    if w.get("kind") == "sql":
        return f"SQL on {w.get('upstream')}/{w.get('database')}"
    return f"{w.get('method', '?')} {w.get('url', '?')}"


def format_list(payload: dict[str, Any]) -> str:
    items = payload.get("approvals") or []
    if not items:
        return "no pending approvals for you"
    rows = [("ID", "AGE", "RULE", "REQUESTER", "VOTES", "WHAT")]
    for a in items:
        votes = f"{a.get('approvals', 0)}/{a.get('min_approvals', 1)}"
        if not a.get("you_may_approve"):
            votes += " (not yours)"
        rows.append((a["id"], _age(a.get("age_seconds", 0)), a.get("rule", ""),
                     a.get("requester") or "-", votes, _what(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:5])) + "  " + r[5]
                     for r in rows)


def format_one(a: dict[str, Any]) -> str:
    lines = [f"approval {a['id']}: {a.get('state')}",
             f"  rule:      {a.get('rule')}" + (f" ({a['message']})" if a.get("message") else ""),
             f"  requester: {a.get('requester') or '-'}",
             f"  what:      {_what(a)}",
             f"  request:   {_request_line(a)}"
             + (f" (upstream {a['what']['upstream']})" if (a.get("what") or {}).get("upstream")
                else ""),
             f"  approvals: {a.get('approvals', 0)}/{a.get('min_approvals', 1)} from "
             f"{', '.join(a.get('groups') or []) or '-'}",
             f"  age:       {_age(a.get('age_seconds', 0))}"
             + (f", expires in {_age(a.get('expires_in_seconds', 0))} "
                f"(then {a.get('on_timeout')})" if a.get("state") == "pending" else "")]
    for v in a.get("votes") or []:
        when = time.strftime("%H:%M:%S", time.localtime(v.get("at", 0)))
        lines.append(f"  vote:      {v['decision']} by {v['sub']} via {v.get('via')} at {when}"
                     + (f": {v['reason']}" if v.get("reason") else ""))
    if a.get("reason") and a.get("state") != "pending":
        lines.append(f"  outcome:   {a['reason']}")
    w = a.get("what") or {}
    if w.get("session"):
        lines.append(f"  session:   {w['session']}")
    if w.get("summary"):
        lines.append(f"  summary:   {w['summary']}")
    if a.get("preview"):
        lines.append("  preview (masked)" + (", truncated" if a.get("preview_truncated")
                                              else "") + ":")
        lines += [f"    {line}" for line in a["preview"].splitlines()[:40]]
    return "\n".join(lines)


def _run(args: argparse.Namespace, fn: Any) -> int:
    try:
        payload = fn()
    except CLIError as e:
        print(f"agentgate approvals: {e}", file=sys.stderr)
        return e.code
    if args.json:
        print(json.dumps(payload, indent=2))
    elif "approvals" in payload:
        print(format_list(payload))
    else:
        print(format_one(payload["approval"]))
    return 0


def _id(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def cmd_list(args: argparse.Namespace) -> int:
    return _run(args, lambda: call(args, "GET", "/approvals"))


def cmd_show(args: argparse.Namespace) -> int:
    return _run(args, lambda: call(args, "GET", f"/approvals/{_id(args.id)}"))


def cmd_approve(args: argparse.Namespace) -> int:
    # `via` names this client in the recorded vote (the API accepts "api" or "cli")
    body = {"reason": args.reason, "via": "cli"} if args.reason else {"via": "cli"}
    return _run(args, lambda: call(args, "POST", f"/approvals/{_id(args.id)}/approve", body))


def cmd_deny(args: argparse.Namespace) -> int:
    return _run(args, lambda: call(args, "POST", f"/approvals/{_id(args.id)}/deny",
                                   {"reason": args.reason, "via": "cli"}))
