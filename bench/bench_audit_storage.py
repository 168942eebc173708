"""Audit storage of multi-turn conversations: bytes per session and recorder CPU per turn.

The workload of issue 16: agents that each hold a 40-turn conversation and re-send the whole
history every turn (request bodies 1.6 KB at turn 1 to ~120 KB at turn 40; each answer
~2 KB). Every turn is a real mitmproxy flow state (`tflow`) recorded by the real recorder
code: the writer process's `writerproc.build` (`store.build_row` with its per-session split cache:
redaction, decoding, splitting, hashing; in the writer process since
issue 16's PERF-G, a thread of the gateway before) and `store.append` in batches of at most
500 rows and 8 MiB, as the writer does; and what stays in the gateway process (serialising
the snapshot for the writer process's pipe, `wire.frame`).

Measured per session:
- audit bytes: every value of its rows (text and blobs, as DuckDB is handed them) plus the
  blobs stored for it; and the DuckDB file size after CHECKPOINT divided by the sessions;
- distinct content sent: every distinct message of its requests once (as serialised in the
  body) plus every answer body — what a store that keeps each piece of content once needs;
- recorder CPU per row (build + insert), turns 1-10 vs 31-40.

Before/after in one run: with AGENTGATE_BENCH_BASE=<a checkout of the older code> the same
workload also runs against that tree (in its own process), side by side.
Run alone: `python -m bench.bench_audit_storage [--quick]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TURNS = 40

_CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
agents, turns = int(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from mitmproxy.test import tflow
from addons.recording import store
try:  # what the writer process runs (with its per-session split cache, PERF-K)
    from addons.recording.writerproc import build as build_row
except ImportError:  # an older tree: the writer was a thread of the gateway
    from addons.recording.addon import build_row
from addons.recording.writer import open_db, row_bytes
try:
    from addons.recording import wire  # the writer process (issue 16, PERF-G)
except ImportError:  # an older tree: the writer was a thread of the gateway
    wire = None

SYSTEM = {"role": "system", "content": "You are a support agent for ACME. Follow policy. " * 24}

def user(a, t):
    return {"role": "user", "content": f"[agent {a} turn {t}] " + "Please look at ticket "
            f"#{a * 1000 + t} and tell me what to do next; the customer wrote again. " * 9}

def answer(a, t):
    return f"[answer {a}/{t}] " + "Checked the ticket history and the refund policy. " * 40

def conversation(a):
    msgs = [SYSTEM]
    for t in range(turns):
        msgs.append(user(a, t))
        req = json.dumps({"model": "gpt-4o-mini", "messages": msgs, "temperature": 0.2,
                          "user": f"agent-{a}"}).encode()
        ans = answer(a, t)
        resp = json.dumps({"id": f"chatcmpl-{a}-{t}", "object": "chat.completion",
                           "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {
                               "role": "assistant", "content": ans},
                               "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": len(req) // 4,
                                     "completion_tokens": 400}}).encode()
        yield t, msgs, req, resp
        msgs = msgs + [{"role": "assistant", "content": ans}]

def flow_state(a, t, req, resp):
    f = tflow.tflow(resp=True)
    f.request.scheme, f.request.host, f.request.port = "https", "api.openai.com", 443
    f.request.path = "/v1/chat/completions"
    f.request.headers["content-type"] = "application/json"
    f.request.headers["authorization"] = "Bearer sk-bench-REAL-0000000000000000"
    f.request.headers["x-agent-session"] = f"agent-{a}"
    f.request.content = req
    f.response.headers["content-type"] = "application/json"
    f.response.content = resp
    f.metadata.update({"upstream": {"name": "openai", "dialect": "openai"},
                       "session": f"agent-{a}", "decision": {"action": "allow"},
                       "recorder": {"origin": "https://api.openai.com/v1/chat/completions"}})
    now = time.time()
    f.request.timestamp_start = now
    f.response.timestamp_end = now + 0.5
    return f.get_state()

out = {}
failures = []
seen_blobs = set()
logical = 0


def value_bytes(row):
    n = 0
    for k, v in row.items():
        if k == "_blobs":
            for b in v:
                if b[0] not in seen_blobs:
                    seen_blobs.add(b[0])
                    n += len(b[1] or b"") + len(b[0]) + len(b[2] or "") + len(b[3] or "") + 8
        elif isinstance(v, (str, bytes, bytearray)):
            n += len(v)
        elif isinstance(v, list):
            n += sum(len(x) for x in v if isinstance(x, str))
    return n


def append(con, rows, head):
    # as the writer: a failed write is retried on a reopened connection
    for attempt in range(2):
        try:
            return con, store.append(con, rows, head)
        except Exception as e:
            failures.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            try:
                con.close()
            except Exception:
                pass
            con = open_db(db)
            head = store.head(con)
    return con, head


with tempfile.TemporaryDirectory() as d:
    db = Path(d) / "a.duckdb"
    con = open_db(db)
    head = store.head(con)
    distinct = 0
    sent = 0
    cpu = {"early": [], "late": []}
    gw = {"early": [], "late": []}
    batch = []
    size = 0
    for a in range(agents):
        seen = set()
        for t, msgs, req, resp in conversation(a):
            sent += len(req) + len(resp)
            for m in msgs:
                k = json.dumps(m)
                if k not in seen:
                    seen.add(k)
                    distinct += len(k.encode())
            distinct += len(resp)
            p = store.Pending(state=flow_state(a, t, req, resp), session=f"agent-{a}",
                              origin_url="https://api.openai.com/v1/chat/completions",
                              secrets=("sk-bench-REAL-0000000000000000",))
            if wire is not None:  # the gateway's share since the writer process: serialise
                g0 = time.process_time()
                wire.frame(wire.pending_msg(t + 1, p))
                g = time.process_time() - g0
                if t < 10: gw["early"].append(g)
                elif t >= turns - 10: gw["late"].append(g)
            c0 = time.process_time()
            row = build_row(p)
            c1 = time.process_time()
            batch.append((t, row, c1 - c0))
            size += row_bytes(row)
            if len(batch) >= 500 or size >= 8 * 1024 * 1024:  # the writer's bounds
                size = 0
                for _, r, _ in batch:
                    logical += value_bytes(r)
                c0 = time.process_time()
                con, head = append(con, [r for _, r, _ in batch], head)
                per = (time.process_time() - c0) / len(batch)
                for tt, _, b in batch:
                    if tt < 10: cpu["early"].append(b + per)
                    elif tt >= turns - 10: cpu["late"].append(b + per)
                batch = []
    if batch:
        for _, r, _ in batch:
            logical += value_bytes(r)
        c0 = time.process_time()
        con, head = append(con, [r for _, r, _ in batch], head)
        per = (time.process_time() - c0) / len(batch)
        for tt, _, b in batch:
            if tt < 10: cpu["early"].append(b + per)
            elif tt >= turns - 10: cpu["late"].append(b + per)
    text_cols = [c for c, t in store.FLOW_COLUMNS if t in ("VARCHAR", "JSON", "BLOB")]
    extra = [c for c in getattr(store, "REF_NAMES", ())]
    expr = " + ".join(f"coalesce(octet_length(CAST({c} AS BLOB)), 0)"
                      if t == "BLOB" else f"coalesce(strlen(CAST({c} AS VARCHAR)), 0)"
                      for c, t in list(store.FLOW_COLUMNS) + [(c, "VARCHAR") for c in extra]
                      if c in text_cols + extra)
    try:
        rows_bytes = con.execute(f"SELECT sum({expr}) FROM flows").fetchone()[0]
    except Exception as e:  # the old layout: even this scan can exceed the memory_limit
        failures.append(f"size query: {type(e).__name__}")
        rows_bytes = None
    has_blobs = con.execute("SELECT count(*) FROM information_schema.tables WHERE "
                            "table_name = 'blobs'").fetchone()[0]
    blob_bytes = 0
    if has_blobs:
        blob_bytes = con.execute(
            "SELECT coalesce(sum(coalesce(octet_length(data), 0) + strlen(hash) "
            "+ coalesce(strlen(prev), 0) + coalesce(strlen(part), 0) + 8), 0) FROM blobs"
            ).fetchone()[0]
    try:
        ok = store.verify(con).ok
    except Exception as e:  # the old layout's verify can run out of DuckDB's memory_limit
        ok = f"verify failed: {type(e).__name__}"
    try:
        con.execute("CHECKPOINT")
    except Exception as e:
        failures.append(f"CHECKPOINT: {type(e).__name__}")
    con.close()
    size = db.stat().st_size
    for k in ("early", "late"):
        v = sorted(cpu[k])
        out[f"cpu_ms_per_row_{k}"] = round(sum(v) / len(v) * 1000, 3)
        # in the gateway process: all of it with the writer thread, serialising with the
        # writer process (which does the build + insert above)
        out[f"gateway_cpu_ms_per_row_{k}"] = (round(sum(gw[k]) / len(gw[k]) * 1000, 3)
                                              if gw[k] else out[f"cpu_ms_per_row_{k}"])
    out.update(agents=agents, turns=turns, rows=agents * turns,
               sent_bytes_per_session=round(sent / agents),
               distinct_bytes_per_session=round(distinct / agents),
               audit_bytes_per_session=round(((rows_bytes if rows_bytes is not None
                                               else logical) + blob_bytes) / agents),
               row_bytes_per_session=None if rows_bytes is None else round(rows_bytes / agents),
               blob_bytes_per_session=round(blob_bytes / agents),
               file_bytes_per_session=round(size / agents), verified=ok,
               logical_bytes_per_session=round(logical / agents),
               store_failures=len(failures), first_failure=failures[0] if failures else None)
print(json.dumps(out))
"""


def measure(code_root: Path, agents: int, turns: int = TURNS) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    p = subprocess.run([sys.executable, "-c", _CHILD, str(agents), str(turns),
                        str(code_root)], capture_output=True, text=True, env=env,
                       cwd=str(code_root), timeout=1800, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"storage bench failed in {code_root}: {p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["logical_ratio_to_distinct"] = round(res["logical_bytes_per_session"]
                                             / res["distinct_bytes_per_session"], 2)
    res["ratio_to_distinct"] = round(res["audit_bytes_per_session"]
                                     / res["distinct_bytes_per_session"], 2)
    res["file_ratio_to_distinct"] = round(res["file_bytes_per_session"]
                                          / res["distinct_bytes_per_session"], 2)
    res["late_over_early_cpu"] = round(res["cpu_ms_per_row_late"]
                                       / res["cpu_ms_per_row_early"], 2)
    return res


def run(quick: bool = False) -> dict[str, Any]:
    agents = 5 if quick else 20
    res: dict[str, Any] = {"after": measure(ROOT, agents)}
    base = os.environ.get("AGENTGATE_BENCH_BASE")
    if base:
        res["before"] = measure(Path(base), agents)
    return res


def markdown(res: dict[str, Any]) -> str:
    cols = [k for k in ("before", "after") if k in res]
    lines = ["### Audit storage, multi-turn conversations (recorder)", "",
             f"{res['after']['agents']} agents x {res['after']['turns']} turns, every request "
             "re-sending the whole history; real flow states through `store.build_row` and "
             "`store.append` (batches of <= 500 rows and 8 MiB, as the writer) into DuckDB. "
             "Target: audit bytes per session <= 2x the distinct content sent.", "",
             "| per session | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    rows = [("bytes sent (requests + answers)", "sent_bytes_per_session"),
            ("distinct content sent", "distinct_bytes_per_session"),
            ("bytes handed to the store (row values + new blobs)", "logical_bytes_per_session"),
            ("audit bytes in the store (row values + blobs)", "audit_bytes_per_session"),
            ("  of which row values", "row_bytes_per_session"),
            ("  of which blobs", "blob_bytes_per_session"),
            ("DuckDB file bytes / sessions", "file_bytes_per_session"),
            ("bytes handed to the store / distinct content", "logical_ratio_to_distinct"),
            ("audit bytes in the store / distinct content", "ratio_to_distinct"),
            ("file bytes / distinct content", "file_ratio_to_distinct"),
            ("recorder CPU ms per row, turns 1-10", "cpu_ms_per_row_early"),
            ("recorder CPU ms per row, turns 31-40", "cpu_ms_per_row_late"),
            ("late / early CPU", "late_over_early_cpu"),
            ("of that in the gateway process, turns 1-10", "gateway_cpu_ms_per_row_early"),
            ("of that in the gateway process, turns 31-40", "gateway_cpu_ms_per_row_late"),
            ("chain verified", "verified"),
            ("store write failures (retried on a reopened connection)", "store_failures"),
            ("first failure", "first_failure")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(str(res[c].get(key)) for c in cols) + " |")
    a = res["after"]
    met = "met" if a["ratio_to_distinct"] <= 2.0 else "missed"
    lines += ["", f"Audit bytes per session <= 2x distinct content: **{met}** "
              f"({a['ratio_to_distinct']}x; file {a['file_ratio_to_distinct']}x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    r = run(quick="--quick" in sys.argv)
    print(markdown(r))
