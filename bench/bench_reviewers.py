"""The reviewers' page must not stall the gateway: pages are laid out off the event loop.

In one process: the real approvals listener (tornado, `ApprovalsAPI`) on its own event loop,
H pending holds whose masked requests are OpenAI chat bodies of B KiB each (the default
`preview_bytes` is 256 KiB), one reviewer session. Measured:

  render    laying out one hold's detail page (parse + transcript + template), median ms
  page      fetching the pending list (H cards, every request in full), median ms and size
  loop      latency of `GET /healthz` on the same listener, idle vs while reviewers keep
            fetching the list page: p50 / p99 / max ms (the event loop's responsiveness;
            the same loop would carry the proxy's flows in the gateway)

Run alone: `python -m bench.bench_reviewers [--quick]`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from addons.approval.api import ApprovalsAPI
from addons.approval.store import ApprovalSpec, ApprovalStore

TARGET_P99_MS = 50.0


def _body(kib: int) -> str:
    turn = "Generate synthetic CRM records with <EMAIL_1> and <PERSON_1>. " * 16
    msgs = [{"role": "system", "content": "You write synthetic records. " * 100}]
    while len(json.dumps(msgs)) < kib * 1024:
        msgs.append({"role": "user", "content": turn})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": "c", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": turn[:200]})}}]})
    return json.dumps({"model": "gpt-4o", "messages": msgs})


def _get(host: str, port: int, path: str, cookie: str = "") -> tuple[float, int]:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    t0 = time.perf_counter()
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    r = conn.getresponse()
    n = len(r.read())
    conn.close()
    assert r.status == 200, r.status
    return (time.perf_counter() - t0) * 1000, n


_RELOADER = """
import http.client, signal, sys, time
host, port, cookie = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n = 0
def done(*_):
    print(n, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("GET", "/ui/", headers={"Cookie": cookie})
    c.getresponse().read()
    c.close()
    n += 1
    time.sleep(0.05)  # 20 page loads a second each: far above what live updates cause
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(quick: bool = False) -> dict[str, Any]:
    holds, kib = (20, 64) if quick else (100, 256)
    probes = 100 if quick else 400
    store = ApprovalStore(max_pending_per_identity=10_000)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(fn: Any) -> Any:
        async def go() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(go(), loop).result(60)

    async def verify(token: str) -> dict[str, Any]:
        raise RuntimeError("no bearer tokens in this bench")

    api = on_loop(lambda: ApprovalsAPI(store, verify))
    host, port = asyncio.run_coroutine_threadsafe(api.start("127.0.0.1", 0), loop).result(10)
    body = _body(kib)
    spec = ApprovalSpec(rule="bulk", groups=("reviewers",), timeout=3600)
    ids = on_loop(lambda: [store.create(spec, "agent-7", {"kind": "llm", "upstream": "openai"},
                                        body).id for _ in range(holds)])
    session = on_loop(lambda: api.sessions.create("alice", ("reviewers",), "bench", 3600))
    cookie = "agentgate_session=" + on_loop(lambda: api.web_keys.sign(session.id))

    res: dict[str, Any] = {"holds": holds, "kib": kib, "probes": probes}
    detail = [_get(host, port, f"/ui/approvals/{ids[0]}", cookie)[0] for _ in range(5)]
    res["detail_ms"] = statistics.median(detail)
    pages = [_get(host, port, "/ui/", cookie) for _ in range(3)]
    res["page_ms"] = statistics.median(p[0] for p in pages)
    res["page_mb"] = pages[0][1] / 1e6

    def probe() -> list[float]:
        out = []
        for _ in range(probes):
            out.append(_get(host, port, "/healthz")[0])
            time.sleep(0.005)
        return out

    idle = probe()
    # the reviewers' browsers are other processes: their reading must not compete for
    # this process's GIL, only the gateway's own work does
    workers = [subprocess.Popen([sys.executable, "-c", _RELOADER, host, str(port), cookie],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    busy = probe()
    loads = 0
    for w in workers:
        w.terminate()
        out, _ = w.communicate(timeout=30)
        loads += int(out.strip() or 0)
    res["page_loads_during"] = loads
    for name, xs in (("idle", idle), ("busy", busy)):
        res[f"{name}_p50_ms"] = _pct(xs, 0.5)
        res[f"{name}_p99_ms"] = _pct(xs, 0.99)
        res[f"{name}_max_ms"] = max(xs)
    res["target_p99_ms"] = TARGET_P99_MS
    res["met"] = res["busy_p99_ms"] <= TARGET_P99_MS
    asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    return res


def markdown(results: dict[str, Any]) -> str:
    r = results
    lines = [
        "### Reviewers' page: pages laid out off the event loop",
        "",
        f"{r['holds']} pending holds, each an OpenAI chat body of {r['kib']} KiB, one "
        "reviewer session, the real tornado listener (in-process).",
        "",
        "| case | value |",
        "|---|---:|",
        f"| one hold's detail page | {r['detail_ms']:.1f} ms |",
        f"| pending list ({r['holds']} cards, {r['page_mb']:.1f} MB of HTML) | "
        f"{r['page_ms']:.0f} ms |",
        f"| `/healthz` idle, p50 / p99 / max | {r['idle_p50_ms']:.2f} / "
        f"{r['idle_p99_ms']:.2f} / {r['idle_max_ms']:.1f} ms |",
        "| `/healthz` while 2 reviewers reload the list 20×/s each "
        f"({r['page_loads_during']} loads), "
        f"p50 / p99 / max | {r['busy_p50_ms']:.2f} / {r['busy_p99_ms']:.2f} / "
        f"{r['busy_max_ms']:.1f} ms |",
        "",
        f"Target: p99 of `/healthz` while pages render ≤ {r['target_p99_ms']:.0f} ms "
        f"({'met' if r['met'] else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=2))
    print(markdown(res))
