"""`agentgate policy test`: a dry run of the policies against recorded or written requests.

  agentgate policy test --rules DIR FILE.json|FILE.mitm [...] [--json] [--at TIME]
                        [--observe-only]

FILE.json holds one request or a list of them:
  {"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
   "headers": {...}, "body": {...} | "text", "identity": {"sub": …, "groups": […]}}
FILE.mitm is a mitmproxy flow file (e.g. one exported by the recorder); the identity is
taken from each flow's recorded metadata. The upstream is resolved with the rules given,
as the gateway would. Prints each request's decision and the rule that made it; exit 0
(1 for invalid rules, 2 for an unreadable input file).

The reviewers' `agentgate approvals …` commands live in addons/approval/cli.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from addons.config.loader import Rules, load_rules
from addons.config.schema import ConfigError
from addons.policy.engine import BodyUnavailable, RequestFacts, evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="work with policies")
    psub = p.add_subparsers(dest="policy_command", required=True)
    t = psub.add_parser("test", help="evaluate the policies against requests (dry run)",
                        description="Evaluate the policies of a rules directory against "
                        "hand-written (.json) or recorded (.mitm) requests and print each "
                        "decision and the rule that made it.")
    t.add_argument("--rules", default=os.environ.get("AGENTGATE_RULES", "rules"),
                   help="rules directory (default: $AGENTGATE_RULES or ./rules)")
    t.add_argument("files", nargs="+", metavar="FILE", help="requests: .json or .mitm")
    t.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    t.add_argument("--at", help="evaluate time-of-day rules at this ISO time "
                   "(default: now; no zone means UTC)")
    t.add_argument("--observe-only", action="store_true",
                   help="as if the gateway ran with agentgate_observe_only=true")
    t.set_defaults(func=run_test)


# ---------------------------------------------------------------- inputs
class InputError(Exception):
    pass


def _json_requests(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    items = doc if isinstance(doc, list) else [doc]
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(doc, list) else str(path)
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise InputError(f"{where}: each request needs at least a 'url'")
        body = item.get("body")
        if body is None:
            raw = b""
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = json.dumps(body).encode()
        ident = item.get("identity")
        if ident is not None and not isinstance(ident, dict):
            raise InputError(f"{where}: 'identity' must be an object")
        out.append({"method": str(item.get("method", "POST" if raw else "GET")),
                    "url": item["url"], "body": raw, "identity": ident, "source": where})
    return out


def _mitm_requests(path: Path) -> list[dict[str, Any]]:
    from mitmproxy import http, io
    from mitmproxy.exceptions import FlowReadException
    out = []
    try:
        with path.open("rb") as fh:
            for i, flow in enumerate(io.FlowReader(fh).stream()):
                if not isinstance(flow, http.HTTPFlow):
                    continue
                try:
                    raw = flow.request.content or b""
                    err = None
                except ValueError as e:
                    raw, err = b"", f"cannot decode the request body ({type(e).__name__})"
                ident = flow.metadata.get("identity")
                out.append({"method": flow.request.method, "url": flow.request.pretty_url,
                            "body": raw, "body_error": err,
                            "identity": ident if isinstance(ident, dict) else None,
                            "source": f"{path}#{i}"})
    except (OSError, FlowReadException) as e:
        raise InputError(f"{path}: cannot read flows: {e}") from None
    return out


def load_requests(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        return _json_requests(path)
    if path.suffix in (".mitm", ".flows", ".flow"):
        return _mitm_requests(path)
    raise InputError(f"{path}: expected a .json or .mitm file")


# ---------------------------------------------------------------- evaluation
def decide(rules: Rules, req: dict[str, Any], now: float, observe_only: bool = False
           ) -> dict[str, Any]:
    """What the gateway would do with one request, as a JSON-friendly dict."""
    parts = urlsplit(req["url"])
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    ident = req.get("identity") or {}
    result: dict[str, Any] = {"source": req["source"], "method": req["method"].upper(),
                              "url": req["url"], "sub": ident.get("sub") or ""}
    up = rules.upstream_for(host, port)
    if up is None:
        result.update(decision="refuse", rule="", observed=False, step="upstreams",
                      message=f"destination {host}:{port} is not a declared upstream "
                      "(default-deny egress)")
        return result
    result["upstream"] = up.name
    body_error = req.get("body_error")

    def body() -> bytes:
        if body_error:
            raise BodyUnavailable(body_error)
        return req["body"]

    facts = RequestFacts(req["method"], host, path, upstream=up.name,
                         identity=ident or None, body=body, now=now)
    try:
        d = evaluate(rules.policies, facts, observe_only=observe_only)
    except BodyUnavailable as e:
        result.update(decision="refuse", rule="", observed=False, step="policy",
                      message=f"request refused: {e}")
        return result
    meta = d.to_metadata()
    result.update(decision=d.action, rule=d.rule, observed=d.observed, message=d.message)
    for key in ("approval", "observations"):
        if key in meta:
            result[key] = meta[key]
    return result


def _parse_at(text: str | None) -> float:
    if not text:
        return datetime.datetime.now(datetime.UTC).timestamp()
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--at: not an ISO date/time: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("#", "METHOD", "URL", "WHO", "DECISION", "RULE", "MESSAGE")
    lines = [head]
    for i, r in enumerate(rows, 1):
        url = r["url"] if len(r["url"]) <= 60 else r["url"][:57] + "..."
        decision = r["decision"] + (" (observed)" if r.get("observed") else "")
        lines.append((str(i), r["method"], url, r["sub"] or "-", decision,
                      r["rule"] or "-", r.get("message") or ""))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  " + line[-1] for line in lines).rstrip()


def run_test(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.rules)
    except ConfigError as e:
        print(f"invalid rules: {e}", file=sys.stderr)
        return 1
    try:
        now = _parse_at(args.at)
        requests = [r for f in args.files for r in load_requests(Path(f))]
    except InputError as e:
        print(f"agentgate policy test: {e}", file=sys.stderr)
        return 2
    rows = [decide(rules, r, now, args.observe_only) for r in requests]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows))
        mode = "observe_only" if (args.observe_only or rules.policies.observe_only) \
            else "enforce"
        print(f"\n{len(rows)} requests; policies: {rules.policies.describe()}; mode {mode}")
    return 0
