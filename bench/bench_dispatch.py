"""mitmproxy's addon event dispatch, in process: CPU per flow with the gateway's chain.

The chain is the real one — mitmproxy's default addons plus `addons/gateway.py` loaded
through mitmproxy's ScriptLoader — with the gateway's own hooks replaced by no-op stand-ins
(same hooks on the same objects' places), so only the dispatch and mitmproxy's own addons'
hooks are measured. One flow = requestheaders, request, responseheaders, response, each
followed by `update` (what mitmproxy's proxy server dispatches per HTTP/1 exchange).

Rows: mitmproxy 12.2's own dispatch; addons/frame/dispatch.py's; and the floor: the same
hook functions called from a flat list (what any dispatch must at least cost).

    python -m bench.bench_dispatch [--flows 500] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT

FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "update")


async def _measure(which: str, flows: int, repeat: int) -> float:
    """Best CPU seconds per flow over `repeat` rounds of `flows` flows."""
    from mitmproxy import addonmanager, options
    from mitmproxy.proxy.layers.http import (
        HttpRequestHeadersHook,
        HttpRequestHook,
        HttpResponseHeadersHook,
        HttpResponseHook,
    )
    from mitmproxy.test import tflow
    from mitmproxy.tools.dump import DumpMaster

    from addons.frame import dispatch

    cls = addonmanager.AddonManager
    saved = {k: getattr(cls, k) for k in dispatch.ORIGINAL}
    o = options.Options()
    m = DumpMaster(o, with_termlog=False, with_dumper=False)
    try:
        o.update(scripts=[str(ROOT / "addons" / "gateway.py")])
        await asyncio.sleep(0.3)  # the script's watcher task loads it
        for k, fn in (dispatch.ORIGINAL if which == "mitmproxy"
                      else dispatch.REPLACEMENTS).items():
            setattr(cls, k, fn)
        module = next(a for a in addonmanager.traverse(m.addons.chain)
                      if isinstance(a, type(os)) and hasattr(a, "addons"))

        class StandIn:
            def __init__(self, hooks: list[str]) -> None:
                for h in hooks:
                    setattr(self, h, lambda *a: None)

        module.addons[:] = [StandIn([h for h in FLOW_HOOKS if callable(getattr(a, h, None))])
                            for a in module.addons]
        f = tflow.tflow(resp=True)
        events = [HttpRequestHeadersHook(f), HttpRequestHook(f), HttpResponseHeadersHook(f),
                  HttpResponseHook(f)]
        if which == "floor":
            table: list[tuple[Any, list[Any]]] = [
                (e, [getattr(a, e.name) for a in addonmanager.traverse(m.addons.chain)
                     if callable(getattr(a, e.name, None))]) for e in events]

            async def one() -> None:
                for e, fns in table:
                    args = e.args()
                    for fn in fns:
                        r = fn(*args)
                        if r is not None and inspect.isawaitable(r):
                            await r
        else:
            async def one() -> None:
                for e in events:
                    await m.addons.handle_lifecycle(e)
        await one()
        best = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            for _ in range(flows):
                await one()
            best = min(best, time.process_time() - t)
        return best / flows
    finally:
        for k, fn in saved.items():
            setattr(cls, k, fn)
        m.shutdown()


def run(flows: int = 500, repeat: int = 7) -> dict[str, float]:
    """{mitmproxy, ours, floor: µs of CPU per flow}, interleaved twice, best of each."""
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-dispatch-") as tmp:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(
            "upstreams:\n  - name: x\n    hosts: [example.com]\n    dialect: openai\n"
            "identity:\n  required: false\nrecorder:\n  enabled: false\n"
            "approvals:\n  listen: 127.0.0.1:0\n")
        os.environ["AGENTGATE_RULES"] = str(rules)
        os.environ["AGENTGATE_DATA"] = str(Path(tmp) / "data")
        out: dict[str, float] = {}
        for _ in range(2):
            for which in ("mitmproxy", "ours", "floor"):
                us = asyncio.run(_measure(which, flows, repeat)) * 1e6
                out[which] = round(min(out.get(which, us), us), 1)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_dispatch",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)
    r = run(a.flows, a.repeat)
    print("| dispatch | CPU µs per flow (4 events + 4 updates) |\n|---|---|")
    for k, label in (("mitmproxy", "mitmproxy 12.2's own"), ("ours", "addons/frame/dispatch.py"),
                     ("floor", "floor: the hooks called from a flat list")):
        print(f"| {label} | {r[k]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
