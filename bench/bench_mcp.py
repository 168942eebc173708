"""MCP per-message costs (pure parts, no proxy): what the gateway adds to each JSON-RPC
message on top of masking and recording.

- a `tools/call` request (~1 KB of arguments): strict parse + validation, then policy with
  100 rules (a third of them `mcp` rules with tool globs and argument fields);
- an SSE response event carrying a tool result (~2 KB): reassembled from 512-byte chunks,
  parsed and validated;
- a `tools/list` answer of 50 tools: fingerprint + description scan + the pin store's
  read-compare (file unchanged: no write), then the per-caller filter (50 never-callable
  analyses against the 100 rules).

Run alone: `python -m bench.bench_mcp [--quick]`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from addons.config.schema import Where
from addons.egress.config import Upstream
from addons.mcp import jsonrpc
from addons.mcp.pins import PinStore
from addons.mcp.sse import Event, Splitter
from addons.policy.config import parse_policies
from addons.policy.engine import RequestFacts, evaluate
from addons.policy.mcp import may_call, tool_facts

UPSTREAMS = (Upstream("tools", ("tools.example.com",), "mcp", None),
             Upstream("openai", ("api.openai.com",), "openai", None))
IDENT = {"sub": "agent-7", "iss": "https://idp.example", "groups": ["agents"]}


def rules(n: int = 100) -> Any:
    items = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            r = {"name": f"r{i}", "action": "block",
                 "match": {"mcp": {"tool": [f"danger_{i}_*"]}, "groups": [f"team-{i}"]}}
        elif kind == 1:
            r = {"name": f"r{i}", "action": "approve", "approvers": ["ops"],
                 "match": {"mcp": {"tool": [f"refund_{i}"]},
                           "fields": {"params.arguments.amount": f"> {i}"}}}
        else:
            r = {"name": f"r{i}", "action": "block",
                 "match": {"upstream": ["openai"], "model": [f"restricted-{i}"]}}
        items.append((r, Where("bench.yaml", f"policies[{i}]")))
    return parse_policies(items, UPSTREAMS)


def _stats(samples: list[int]) -> dict[str, float]:
    samples.sort()
    return {"median_us": statistics.median(samples) / 1000,
            "p99_us": samples[max(int(len(samples) * 0.99) - 1, 0)] / 1000}


def call_body() -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 17, "method": "tools/call", "params": {
        "name": "send_email", "arguments": {"to": "ops@example.com", "subject": "weekly",
                                            "body": "status report line. " * 45}}}).encode()


def tools(n: int = 50) -> list[dict[str, Any]]:
    return [{"name": f"tool_{i}", "description": f"Does thing {i} for the caller. " * 4,
             "inputSchema": {"type": "object", "properties": {
                 "q": {"type": "string", "description": "what to look up"},
                 "limit": {"type": "integer"}}}} for i in range(n)]


def run(quick: bool = False) -> dict[str, Any]:
    n = 300 if quick else 3000
    ps = rules()
    body = call_body()
    out: dict[str, Any] = {"call_bytes": len(body)}
    parse, policy = [], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        jsonrpc.parse_payload(jsonrpc.loads_strict(body.decode()))
        t1 = time.perf_counter_ns()
        evaluate(ps, RequestFacts("POST", "tools.example.com", "/mcp", upstream="tools",
                                  identity=IDENT, body=body, content_type="application/json",
                                  dialect="mcp"))
        t2 = time.perf_counter_ns()
        parse.append(t1 - t0)
        policy.append(t2 - t1)
    out["call_parse"], out["call_policy"] = _stats(parse), _stats(policy)

    result = {"jsonrpc": "2.0", "id": 17, "result": {
        "content": [{"type": "text", "text": "row of the report. " * 100}],
        "structuredContent": {"rows": 100}}}
    event = b"event: message\ndata: " + json.dumps(result).encode() + b"\n\n"
    chunks = [event[i:i + 512] for i in range(0, len(event), 512)]
    out["event_bytes"] = len(event)
    ev_samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sp = Splitter(4 << 20)
        for c in chunks:
            for lines in sp.feed(c):
                ev = Event.parse(lines)
                jsonrpc.parse_payload(jsonrpc.loads_strict(ev.data or ""))
        ev_samples.append(time.perf_counter_ns() - t0)
    out["sse_event"] = _stats(ev_samples)

    listed = tools()
    with tempfile.TemporaryDirectory() as d:
        store = PinStore(Path(d) / "pins.json")
        store.observe("tools", listed)  # first sight: pinned (one write)
        pin_s, filt_s = [], []
        for _ in range(max(n // 10, 30)):
            t0 = time.perf_counter_ns()
            store.observe("tools", listed)
            t1 = time.perf_counter_ns()
            for t in listed:
                may_call(ps, tool_facts(t["name"], host="tools.example.com", path="/mcp",
                                        upstream="tools", identity=IDENT))
            filt_s.append(time.perf_counter_ns() - t1)
            pin_s.append(t1 - t0)
    out["tools"] = len(listed)
    out["list_pins"], out["list_filter"] = _stats(pin_s), _stats(filt_s)
    return out


def markdown(r: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return f"| {name} | {s['median_us']:.1f} µs | {s['p99_us']:.1f} µs |"
    return "\n".join([
        "## MCP per message (bench/bench_mcp.py)",
        "",
        "Pure parts, no proxy; 100 policy rules (a third `mcp` tool-glob rules, a third with "
        "argument fields).",
        "",
        "| step | median | p99 |",
        "|---|---:|---:|",
        row(f"tools/call ({r['call_bytes']} B): strict JSON-RPC parse + validate",
            r["call_parse"]),
        row("tools/call: policy, 100 rules", r["call_policy"]),
        row(f"SSE event ({r['event_bytes']} B, 512 B chunks): reassemble + parse",
            r["sse_event"]),
        row(f"tools/list of {r['tools']}: fingerprints + scan + pin store compare",
            r["list_pins"]),
        row(f"tools/list of {r['tools']}: per-caller filter", r["list_filter"]),
    ])


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
