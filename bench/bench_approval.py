"""Held approvals must not slow anything else: 200 flows held while 1,000 others run.

Two identical real gateways (`mitmdump -s addons/gateway.py`, full addon suite, real OIDC
tokens from a local issuer, a policy rule `approve` on model `bulk-hold`) in front of the
stand-in. The client (plain-HTTP proxy requests, keep-alive, 4 workers, each request timed
from its first byte sent to its last byte read) alternates every request between the two,
so that load from elsewhere on a shared machine hits both alike:

  phase 1  gateway A holds H requests (one connection each), B holds nothing; N/2
           ordinary requests to each; then all H approved through A's reviewers' API
  phase 2  the same with the roles swapped

Result: median latency of ordinary requests on the gateway that holds H, over the median
on the gateway that holds nothing (both gateways contribute to both sides). Masking is
switched off (in both) to isolate the cost of holding.

Run alone: `python -m bench.bench_approval [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench import harness as h

TARGET_RATIO = 1.10
CONCURRENCY = 4


def _rules(standin_url: str, issuer: str) -> str:
    return textwrap.dedent(f"""\
        upstreams:
          - name: openai
            hosts: [api.openai.com]
            scheme: http  # the bench speaks plain HTTP to the proxy (declared: issue 11)
            dialect: openai
            forward_to: {standin_url}
            credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
        identity:
          required: true
          issuers:
            - issuer: {issuer}
              audience: agentgate
        masking:
          enabled: false
        approvals:
          max_pending_per_identity: 1000  # one bench agent holds them all (cap: issue 11)
        policies:
          - name: hold-bulk
            match: {{model: [bulk-hold]}}
            action: approve
            message: bulk generation needs a reviewer
            approvers: [reviewers]
            timeout: 900
        """)


class ProxyConn:
    """One keep-alive client connection to the proxy, plain-HTTP proxy requests."""

    def __init__(self, port: int, auth: str) -> None:
        self.port = port
        self.auth = auth
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> ProxyConn:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def send(self, body: bytes) -> None:
        assert self.w is not None
        self.w.write((
            "POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\n"
            "Host: api.openai.com\r\n"
            f"Proxy-Authorization: {self.auth}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body)

    async def response(self) -> int:
        assert self.r is not None
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in
                (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in hdrs:
            await self.r.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.r.readline()).split(b";")[0], 16)
                await self.r.readexactly(size + 2)
                if size == 0:
                    break
        return status

    async def request(self, body: bytes) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.send(body)
        await self.w.drain()  # type: ignore[union-attr]
        status = await self.response()
        return status, time.perf_counter() - t0

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


async def _load(ports: tuple[int, int], auth: str, n: int, body: bytes
                ) -> tuple[list[float], list[float]]:
    """n requests to each of two gateways, interleaved request by request (every worker
    alternates between them), so that load from outside hits both alike."""
    pairs = [(await ProxyConn(ports[0], auth).open(), await ProxyConn(ports[1], auth).open())
             for _ in range(CONCURRENCY)]
    lat: tuple[list[float], list[float]] = ([], [])
    todo = iter(range(n))

    async def worker(k: int, conns: tuple[ProxyConn, ProxyConn]) -> None:
        for i in todo:
            for j in ((0, 1) if (i + k) % 2 else (1, 0)):
                status, secs = await conns[j].request(body)
                if status != 200:
                    raise RuntimeError(f"ordinary request answered {status}")
                lat[j].append(secs)

    await asyncio.gather(*(worker(k, c) for k, c in enumerate(pairs)))
    for a, b in pairs:
        a.close()
        b.close()
    return lat


async def _api(api_port: int, token: str, method: str, path: str) -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", api_port)
    body = b"{}" if method == "POST" else b""
    w.write((f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
             "Connection: close\r\n\r\n").encode() + body)
    await w.drain()
    data = await r.read()
    w.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


async def _hold(port: int, api_port: int, auth: str, reviewer: str, held_n: int
                ) -> tuple[list[ProxyConn], list[dict[str, Any]], float]:
    """Send held_n requests the policy holds; wait until the API lists them all."""
    body = h.chat_body(1000, model="bulk-hold")
    t0 = time.perf_counter()
    held = [await ProxyConn(port, auth).open() for _ in range(held_n)]
    for c in held:
        c.send(body)
    await asyncio.gather(*(c.w.drain() for c in held))  # type: ignore[union-attr]
    pending: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while len(pending) < held_n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(pending)} of {held_n} requests were held")
        await asyncio.sleep(0.1)
        status, payload = await _api(api_port, reviewer, "GET", "/approvals")
        pending = json.loads(payload)["approvals"] if status == 200 else []
    return held, pending, time.perf_counter() - t0


async def _release(api_port: int, reviewer: str, held: list[ProxyConn],
                   pending: list[dict[str, Any]]) -> float:
    """Approve every held request through the API; seconds until all of them completed."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def approve(aid: str) -> int:
        async with sem:
            return (await _api(api_port, reviewer, "POST", f"/approvals/{aid}/approve"))[0]

    codes = await asyncio.gather(*(approve(a["id"]) for a in pending))
    statuses = await asyncio.gather(*(c.response() for c in held))
    secs = time.perf_counter() - t0
    for c in held:
        c.close()
    if set(codes) != {200} or set(statuses) != {200}:
        raise RuntimeError(f"release failed: API {set(codes)}, held flows {set(statuses)}")
    return secs


async def _scenario(ports: tuple[int, int], api_ports: tuple[int, int], agent_auth: str,
                    reviewer: str, n: int, held_n: int, warmup: int) -> dict[str, Any]:
    """Phase 1: gateway 0 holds, gateway 1 holds nothing; phase 2 the other way round.
    Both phases send n/2 requests to each gateway, interleaved."""
    ordinary = h.chat_body(1000)
    await _load(ports, agent_auth, warmup, ordinary)
    held_lat: list[float] = []
    free_lat: list[float] = []
    setups: list[float] = []
    releases: list[float] = []
    for g in (0, 1):
        conns, pending, setup = await _hold(ports[g], api_ports[g], agent_auth, reviewer,
                                            held_n)
        await asyncio.sleep(0.5)  # let the burst of new holds settle before measuring
        lat = await _load(ports, agent_auth, n // 2, ordinary)
        held_lat += lat[g]
        free_lat += lat[1 - g]
        status, payload = await _api(api_ports[g], reviewer, "GET", "/approvals")
        if status != 200 or len(json.loads(payload)["approvals"]) != held_n:
            raise RuntimeError("held requests were released during the measurement")
        releases.append(await _release(api_ports[g], reviewer, conns, pending))
        setups.append(setup)
    return {"held": held_lat, "free": free_lat, "hold_setup_s": max(setups),
            "release_s": max(releases)}


def _stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "median_ms": statistics.median(s) * 1000,
            "p90_ms": h.percentile(s, 90) * 1000, "p99_ms": h.percentile(s, 99) * 1000}


def run(quick: bool = False) -> dict[str, Any]:
    n, held_n, warmup = (200, 50, 30) if quick else (1000, 200, 100)
    with tempfile.TemporaryDirectory(prefix="bench-approval-") as tmp:
        work = Path(tmp)
        ca, _, _ = h.upstream_certs(work / "certs")
        standin = h.start_standin(work, work / "certs")
        issuer = h.TokenIssuer().start()
        gws: list[h.Proc] = []
        try:
            confdir = h.make_confdir(work / "confdir")
            api_ports = (h.free_port(), h.free_port())
            for i, api_port in enumerate(api_ports):
                rules, data = work / f"rules{i}", work / f"data{i}"
                rules.mkdir()
                data.mkdir()
                (rules / "rules.yaml").write_text(_rules(standin.url, issuer.issuer))
                gws.append(h.start_mitmdump(
                    f"gateway{i}", work, confdir, ca,
                    scripts=[str(h.ROOT / "addons" / "gateway.py")],
                    sets=[f"agentgate_rules={rules}", f"agentgate_data={data}",
                          "agentgate_rules_poll_ms=0",
                          f"agentgate_approvals_listen=127.0.0.1:{api_port}"],
                    env={"OPENAI_API_KEY": "sk-bench-fake"}))
                h.wait_port(api_port, 30)
            agent = h.basic_proxy_auth("agent", issuer.token("bench-agent", ("agents",)))
            reviewer = issuer.token("bench-reviewer", ("reviewers",))
            cpu0 = sum(h.cpu_seconds(g.pid) for g in gws)
            res = asyncio.run(_scenario((gws[0].port, gws[1].port), api_ports, agent,
                                        reviewer, n, held_n, warmup))
            cpu = sum(h.cpu_seconds(g.pid) for g in gws) - cpu0
        finally:
            for g in gws:
                g.stop()
            issuer.stop()
            standin.stop()
    base = _stats(res["free"])
    held = _stats(res["held"])
    ratio = held["median_ms"] / base["median_ms"]
    return {
        "quick": quick, "requests": n, "held": held_n, "concurrency": CONCURRENCY,
        "baseline": base, "while_held": held,
        "ratio": ratio, "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        "hold_setup_s": res["hold_setup_s"], "release_s": res["release_s"],
        "gateway_cpu_s": cpu, "facts": h.machine_facts(),
    }


def markdown(r: dict[str, Any]) -> str:
    b, d = r["baseline"], r["while_held"]
    verdict = "met" if r["target_met"] else "MISSED"
    return "\n".join([
        "## Approvals: held flows vs. everything else (bench/bench_approval.py)",
        "",
        f"Two identical real gateways (full addon suite, OIDC tokens; masking off in both). "
        f"One holds {r['held']} requests for approval (`policies: action: approve`, one "
        f"connection each) while the client sends {r['requests']:,} ordinary chat requests "
        f"to each, alternating request by request ({r['concurrency']} keep-alive workers, "
        "plain-HTTP proxy requests to the stand-in); then the roles swap. Same run, same "
        "client, same moment: drift from other load on the machine hits both sides alike.",
        "",
        "| ordinary requests on the gateway that | requests | median | p90 | p99 |",
        "|---|---:|---:|---:|---:|",
        f"| holds nothing | {b['n']} | {b['median_ms']:.2f} ms | "
        f"{b['p90_ms']:.2f} ms | {b['p99_ms']:.2f} ms |",
        f"| holds {r['held']} | {d['n']} | {d['median_ms']:.2f} ms | {d['p90_ms']:.2f} ms | "
        f"{d['p99_ms']:.2f} ms |",
        "",
        f"Median ratio held / nothing held: **{r['ratio']:.3f}** (target <= "
        f"{r['target_ratio']:.2f}: {verdict}).",
        f"Holding {r['held']} requests (sent until all listed pending in the API): "
        f"{r['hold_setup_s']:.2f} s; approving all {r['held']} through the API until every "
        f"held request completed: {r['release_s']:.2f} s. Gateway CPU for the whole run "
        f"(both): {r['gateway_cpu_s']:.1f} s. Machine: {r['facts']['cpu_model']}, "
        f"{r['facts']['cores_usable']} usable cores, load average "
        f"{' '.join(r['facts']['loadavg_at_start'])} (shared with other work).",
    ])


if __name__ == "__main__":
    result = run(quick="--quick" in sys.argv)
    print(markdown(result))
