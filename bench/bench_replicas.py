"""Replicas on this machine, in one run: throughput of one gateway vs two behind HAProxy,
and what the shared approval store (AGENTGATE_STATE, Postgres) costs.

Throughput (hey, 1 KB chat completions, the full suite: identity, policy, masking,
recording; nginx as the upstream), each configuration started, warmed up and measured in
turn, `repeats` rounds interleaved, medians:
  one            one mitmdump, approvals in memory (today's default), hey straight at it
  one+state      one mitmdump with AGENTGATE_STATE (flows not held never touch Postgres:
                 the ratio to `one` is the store's cost on ordinary traffic)
  one+haproxy    one replica behind HAProxy (the balancer's own cost)
  two+haproxy    two replicas behind HAProxy, sharing the state database
On a 2-core machine hey, nginx, HAProxy and Postgres share the cores with the gateways, so
`two/one` is what a second process buys here, not what a second node would.

Holds (in-process, asyncio): open a hold, decide it through another store (replica), until
the first sees the decision — in memory (one store: no other replica) vs two
PgApprovalStores on the same Postgres (the decision travels by NOTIFY): per-hold ms.

Run alone: `python -m bench.bench_replicas [--quick]`.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from addons.approval.pgstore import PgApprovalStore
from addons.approval.store import ApprovalSpec, ApprovalStore
from addons.devkit.launch import start_gateway
from addons.devkit.replicas import HAProxy, LocalPostgres, start_replica
from bench import e2e
from bench import harness as h

CONC = 32


def _settings(quick: bool) -> dict[str, Any]:
    return {"seconds": 2.0 if quick else 5.0, "repeats": 1 if quick else 2,
            "warmup_s": 0.5 if quick else 1.0, "holds": 30 if quick else 200,
            "concurrency": CONC}


async def _holds(dsn: str, n: int) -> dict[str, Any]:
    spec = ApprovalSpec(rule="bench", groups=("reviewers",), timeout=60)
    out: dict[str, Any] = {}
    mem = ApprovalStore(max_pending=n + 10, max_pending_per_identity=n + 10)
    seen: set[str] = set()
    mem.on_decided = lambda a: seen.add(a.id)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        a = await mem.acreate(spec, f"agent-{i}", {"kind": "llm"}, "preview", owner=f"o{i}")
        await mem.aapprove(a.id, "rev", ["reviewers"])
        assert a.id in seen
        times.append((time.perf_counter() - t0) * 1000)
    out["memory"] = _stats(times)
    a_store = PgApprovalStore(dsn, replica="bench-a")
    b_store = PgApprovalStore(dsn, replica="bench-b")
    for s in (a_store, b_store):
        s.max_pending = s.max_pending_per_identity = n + 10
        await s.start()
    while not (a_store.ready and b_store.ready):
        await asyncio.sleep(0.02)
    events: dict[str, asyncio.Event] = {}
    a_store.on_decided = lambda ap: events.setdefault(ap.id, asyncio.Event()).set()
    times, opens, releases = [], [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            a = await a_store.acreate(spec, f"agent-{i}", {"kind": "llm"}, "preview",
                                      owner=f"o{i}")
            t1 = time.perf_counter()
            await b_store.aapprove(a.id, "rev", ["reviewers"])
            t2 = time.perf_counter()
            await asyncio.wait_for(events.setdefault(a.id, asyncio.Event()).wait(), 5)
            t3 = time.perf_counter()
            times.append((t3 - t0) * 1000)
            opens.append((t1 - t0) * 1000)
            releases.append((t3 - t2) * 1000)
    finally:
        await a_store.aclose()
        await b_store.aclose()
    out["postgres"] = _stats(times)
    out["postgres_open"] = _stats(opens)
    out["postgres_release_after_vote"] = _stats(releases)
    out["ratio_p50"] = round(out["postgres"]["p50_ms"] / max(out["memory"]["p50_ms"], 1e-6),
                             1)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"n": len(s), "p50_ms": round(h.percentile(s, 50), 3),
            "p99_ms": round(h.percentile(s, 99), 3)}


def run(quick: bool = False) -> dict[str, Any]:
    cfg = _settings(quick)
    out: dict[str, Any] = {"settings": cfg}
    if not h.HEY:
        return {**out, "error": "hey is not installed (apt-get install -y hey)"}
    tmp = Path(tempfile.mkdtemp(prefix="agentgate-bench-replicas-"))
    procs: list[Any] = []
    pg = issuer = None
    try:
        pg = LocalPostgres().start()
        out["holds"] = asyncio.run(_holds(pg.dsn, cfg["holds"]))
        certs = tmp / "upstream-certs"
        upstream_ca, _, _ = h.upstream_certs(certs)
        nginx = h.start_nginx(tmp, certs)
        procs.append(nginx)
        issuer = h.TokenIssuer().start()
        hp = nginx.url.removeprefix("https://")
        rules = tmp / "rules"
        e2e.write_rules(rules, e2e.suite_rules(hp, hp, issuer, e2e.CONCERNS))
        confdir = h.make_confdir(tmp / "conf")
        token = issuer.token(lifetime=7200)
        url = nginx.url + "/v1/chat/completions"
        body = tmp / "body-1k.json"
        body.write_bytes(h.chat_body(1024))
        env = dict(e2e.GATEWAY_ENV)

        def one(state: bool) -> tuple[list[Any], int, list[int]]:
            name = "one-state" if state else "one"
            d = tmp / f"data-{name}-{time.monotonic_ns()}"
            d.mkdir()
            gw = start_gateway(rules, confdir, d, tmp / f"{name}.log", standin_ca=upstream_ca,
                               gateway_env={**env, **({"AGENTGATE_STATE": pg.dsn}
                                                      if state else {})})
            return [gw], gw.port, [gw.proc.pid]

        def behind(n: int) -> tuple[list[Any], int, list[int]]:
            reps = [start_replica(f"r{i}-{time.monotonic_ns()}", rules, confdir, tmp / "data",
                                  pg.dsn, tmp, standin_ca=upstream_ca, gateway_env=env)
                    for i in range(n)]
            ha = HAProxy(("127.0.0.1", h.free_port()),
                         [(f"r{i}", r.gateway.port, r.probe_port) for i, r in enumerate(reps)],
                         Path(tempfile.mkdtemp(dir=tmp))).start()
            deadline = time.monotonic() + 60
            while not all(r.ready() for r in reps):
                if time.monotonic() > deadline:
                    raise RuntimeError("replicas not ready")
                time.sleep(0.1)
            time.sleep(1.2)  # two HAProxy health checks: every server is up
            return [*(r.gateway for r in reps), ha], ha.listen[1], \
                [r.gateway.proc.pid for r in reps]

        configs = {"one": lambda: one(False), "one+state": lambda: one(True),
                   "one+haproxy": lambda: behind(1), "two+haproxy": lambda: behind(2)}
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
        for _ in range(cfg["repeats"]):
            for name, start in configs.items():
                parts, port, pids = start()
                try:
                    proxy = f"http://agent:{token}@127.0.0.1:{port}"
                    h.run_hey(url, concurrency=16, seconds=cfg["warmup_s"], proxy=proxy,
                              body_file=body)
                    cpu0 = sum(h.cpu_seconds(p) for p in pids)
                    r = h.run_hey(url, concurrency=cfg["concurrency"], seconds=cfg["seconds"],
                                  proxy=proxy, body_file=body).as_dict()
                    if r["requests"]:
                        r["gateway_cpu_ms_per_req"] = round(
                            (sum(h.cpu_seconds(p) for p in pids) - cpu0) * 1000
                            / r["requests"], 3)
                    rounds[name].append(r)
                finally:
                    for p in reversed(parts):
                        p.stop()
        out["throughput"] = {
            name: {"rps": round(statistics.median(r["rps"] for r in rs), 1),
                   "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 2),
                   "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 2),
                   "errors": sum(r["errors"] for r in rs),
                   "gateway_cpu_ms_per_req": round(statistics.median(
                       r.get("gateway_cpu_ms_per_req", 0.0) for r in rs), 3)}
            for name, rs in rounds.items()}
        t = out["throughput"]
        base = max(t["one"]["rps"], 1e-6)
        out["ratios"] = {"two_haproxy_vs_one": round(t["two+haproxy"]["rps"] / base, 2),
                         "two_vs_one_both_haproxy": round(
                             t["two+haproxy"]["rps"] / max(t["one+haproxy"]["rps"], 1e-6), 2),
                         "state_vs_memory_store": round(t["one+state"]["rps"] / base, 3),
                         "haproxy_vs_direct": round(t["one+haproxy"]["rps"] / base, 3),
                         # CPU per request: steadier than req/s on a machine others share
                         "state_cpu_per_req_vs_memory": round(
                             t["one+state"]["gateway_cpu_ms_per_req"]
                             / max(t["one"]["gateway_cpu_ms_per_req"], 1e-6), 3)}
    finally:
        for p in reversed(procs):
            p.stop()
        if issuer is not None:
            issuer.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    if res.get("error"):
        return f"### Replicas\n\nnot run: {res['error']}\n"
    cfg = res["settings"]
    lines = ["### Replicas: one gateway vs two behind HAProxy, the shared approval store", "",
             f"hey -c {cfg['concurrency']}, 1 KB chat completions, full suite, nginx "
             f"upstream, {cfg['seconds']:g} s x {cfg['repeats']} interleaved rounds "
             "(medians); all on this machine's cores.", "",
             "| configuration | req/s | p50 ms | p99 ms | gateway CPU ms/req | errors |",
             "|---|---|---|---|---|---|"]
    for name, t in res.get("throughput", {}).items():
        lines.append(f"| {name} | {t['rps']} | {t['p50_ms']} | {t['p99_ms']} | "
                     f"{t['gateway_cpu_ms_per_req']} | {t['errors']} |")
    r = res.get("ratios", {})
    if r:
        lines += ["", "- two replicas behind HAProxy / one gateway: "
                  f"**{r['two_haproxy_vs_one']}x** "
                  f"(both behind HAProxy: {r['two_vs_one_both_haproxy']}x)",
                  f"- shared approval store on ordinary (not held) traffic: "
                  f"**{r['state_vs_memory_store']}x** the in-memory store's throughput, "
                  f"{r['state_cpu_per_req_vs_memory']}x its gateway CPU per request",
                  f"- HAProxy in front of one replica: {r['haproxy_vs_direct']}x"]
    hd = res.get("holds")
    if hd:
        lines += ["", "Holds (open, decide on another store, decision seen; "
                  f"n={hd['memory']['n']}): "
                  f"in memory p50 {hd['memory']['p50_ms']} ms / p99 {hd['memory']['p99_ms']} ms; "
                  f"Postgres p50 {hd['postgres']['p50_ms']} ms / p99 {hd['postgres']['p99_ms']} ms "
                  f"(**{hd['ratio_p50']}x**; opening {hd['postgres_open']['p50_ms']} ms, "
                  f"release on the holding replica after the vote "
                  f"{hd['postgres_release_after_vote']['p50_ms']} ms p50 / "
                  f"{hd['postgres_release_after_vote']['p99_ms']} ms p99). A hold waits for a "
                  "human: milliseconds do not matter there; the global limits and the "
                  "cross-replica release do."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json
    res = run(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=1, default=repr))
    print(markdown(res))
