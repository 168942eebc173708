"""A light agent's latency while two other identities flood findings-dense bodies.

    python -m bench.bench_fairness --compare base=/tmp/base_tree new=. [--seconds 8]
        [--repeats 2] [--flood-conc 3]

One run, real parts: the bench's upstream (nginx, canned completion), one mitmdump with
the suite per tree (bench/e2e.py's rules and token issuer), interleaved base/new per
repeat. Per tree and repeat: the light agent (its own identity) sends a 1 KB chat request
every 50 ms on one keep-alive connection, first alone, then while two other identities
each keep `--flood-conc` requests in flight of ~60 KB bodies of distinct e-mail addresses
(every request new values: no cache hit). Reported: the light agent's p50/p90/max (ms),
the flooders' completed requests and statuses (a 429/503 is the gateway's bound).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import harness as h
from bench.e2e import CONCERNS, _Env, _settings


def _dense(n: int) -> bytes:
    text = " ".join(f"u{n}x{i}.name@example{i % 7}.com" for i in range(2400))
    return json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": text}]}).encode()


def _light(url: str, proxy: str, stop: threading.Event, out: list[float]) -> None:
    body = h.chat_body(1024)
    conn, path = h._open(url, proxy, None)  # noqa: SLF001 - the bench's keep-alive client
    try:
        while not stop.is_set():
            t = time.perf_counter()
            status, _, _ = conn.request(path, body)
            if status != 200:
                raise RuntimeError(f"light agent got {status}")
            out.append((time.perf_counter() - t) * 1000)
            stop.wait(0.05)
    finally:
        conn.close()


def _flood(url: str, proxy: str, stop: threading.Event, tag: int, stats: dict) -> None:
    conn, path = h._open(url, proxy, None)  # noqa: SLF001
    n = 0
    try:
        while not stop.is_set():
            n += 1
            status, _, _ = conn.request(path, _dense(tag * 1_000_000 + n))
            with stats["lock"]:
                stats[status] = stats.get(status, 0) + 1
    finally:
        conn.close()


def _pct(xs: list[float], q: float) -> float:
    return round(h.percentile(sorted(xs), q), 1) if xs else float("nan")


def _phase(env: _Env, proxies: dict[str, str], seconds: float, flood_conc: int,
           flood: bool) -> dict[str, Any]:
    stop = threading.Event()
    lat: list[float] = []
    stats: dict[Any, Any] = {"lock": threading.Lock()}
    threads = [threading.Thread(target=_light, args=(env.url, proxies["light"], stop, lat))]
    if flood:
        for k, who in enumerate(("flood1", "flood2")):
            for c in range(flood_conc):
                threads.append(threading.Thread(
                    target=_flood, args=(env.url, proxies[who], stop, k * 100 + c, stats)))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    del stats["lock"]
    return {"n": len(lat), "p50": _pct(lat, 50), "p90": _pct(lat, 90),
            "max": round(max(lat), 1) if lat else None,
            "flood_status": {str(k): v for k, v in stats.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_fairness")
    ap.add_argument("--compare", nargs="+", metavar="NAME=PATH", required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--flood-conc", type=int, default=3)
    args = ap.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (s.split("=", 1) for s in args.compare)]
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as d:
        env = _Env(Path(d), _settings(False), 0)
        out: dict[str, Any] = {"facts": {"load": h._read("/proc/loadavg").split()[:3]}}  # noqa: SLF001
        try:
            _, _, err = env.start_common(out)
            if err:
                raise SystemExit(err)
            suites = {}
            for name, tree in trees:
                proc, proxy, active, err = env.start_suite(CONCERNS, name=name, tree=tree)
                if err or set(active) != set(CONCERNS):
                    raise SystemExit(f"{name}: {err or active}")
                assert env.issuer is not None
                base = proc.url
                suites[name] = {
                    who: base.replace("http://", f"http://agent:{env.issuer.token(sub=who)}@")
                    for who in ("light", "flood1", "flood2")}
            rows: dict[str, list] = {n: [] for n, _ in trees}
            for r in range(args.repeats):
                for name, _ in trees:
                    alone = _phase(env, suites[name], 3.0, args.flood_conc, False)
                    loaded = _phase(env, suites[name], args.seconds, args.flood_conc, True)
                    rows[name].append({"alone": alone, "flood": loaded})
                    print(name, r, json.dumps(rows[name][-1]), flush=True)
            out["rows"] = rows
            out["notes"] = env.notes
        finally:
            env.stop()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
