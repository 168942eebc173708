"""Peak memory of gateway trees side by side: `python -m bench.soak_compare`.

    python -m bench.soak_compare --compare base=/tmp/base-x new=. [new_arena2=.:MALLOC_ARENA_MAX=2]
        [--bodies 1KB,100KB[,2MB]] [--concurrency 16] [--seconds 5] [--repeats 3] [--json FILE]

The issue-16 memory target is the gateway's peak RSS (VmHWM) against bare mitmdump's. A
peak is a high-water mark, so one process gives one number: every repetition starts bare
mitmdump and one suite per configuration afresh (same nginx upstream, same rules, all
running at once but loaded one at a time, the order rotating each repetition so drift in
the machine's load is shared), sends a warm-up, then each body at c=N through each, and
reads each process's VmHWM, its RSS at the end, the VmHWM of its child processes (the audit
writer) and the gateway process's CPU per request. Medians and every value are reported.

A configuration is NAME=PATH (a checkout, "." for this one) optionally followed by
`:VAR=VALUE,VAR=VALUE` environment for the gateway (e.g. a glibc tunable), to compare one
tree with and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import e2e
from bench import harness as h


def parse_config(spec: str) -> tuple[str, Path | None, dict[str, str]]:
    """'NAME=PATH[:VAR=VAL,VAR=VAL]' -> (name, tree or None for this one, env)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or name == "bare":
        raise ValueError(f"{spec!r}: want NAME=PATH[:VAR=VALUE,…] (NAME not 'bare')")
    path, _, env_text = rest.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, env_text.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"{spec!r}: environment item {item!r} is not VAR=VALUE")
        env[k] = v
    tree = None if path in (".", "") else Path(path).resolve()
    return name, tree, env


def body_size(name: str) -> int:
    """'1KB' -> 1024, '2MB' -> 2 MiB. Raises ValueError."""
    units = {"KB": 1 << 10, "MB": 1 << 20}
    n, unit = name[:-2], name[-2:].upper()
    if unit not in units or not n.isdigit() or int(n) < 1:
        raise ValueError(f"body size {name!r}: want NKB or NMB")
    return int(n) * units[unit]


def _one_round(env: e2e._Env, configs: list[tuple[str, Path | None, dict[str, str]]],
               bodies: tuple[str, ...], concurrency: int, seconds: float,
               rotate: int) -> dict[str, dict[str, Any]]:
    """Fresh processes; each loaded in turn; their peaks. {name: measures}."""
    procs: dict[str, h.Proc] = {}
    proxies: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        bare = h.start_mitmdump(f"bare-r{rotate}", env.tmp, env.confdir, env.upstream_ca)
        procs["bare"], proxies["bare"] = bare, bare.url
        for name, tree, extra in configs:
            suite, proxy, active, err = env.start_suite(e2e.CONCERNS, name=f"{name}-r{rotate}",
                                                        tree=tree, env=extra)
            if err:
                suite.stop()
                raise RuntimeError(f"{name} could not serve a request: {err.splitlines()[0]}")
            procs[name], proxies[name] = suite, proxy
            out[name] = {"concerns": active}
        out.setdefault("bare", {})
        for px in proxies.values():
            h.run_hey(env.url, concurrency=concurrency, seconds=1.0, proxy=px,
                      body_file=env.bodies["1KB"])
        order = list(procs)
        k = rotate % len(order)
        order = order[k:] + order[:k]
        for body in bodies:
            for name in order:
                pid = procs[name].pid
                cpu0 = h.cpu_seconds(pid)
                r = h.run_hey(env.url, concurrency=concurrency, seconds=seconds,
                              proxy=proxies[name], body_file=env.bodies[body])
                cell = out[name].setdefault("load", {})[body] = {
                    "requests": r.requests, "errors": r.errors, "rps": r.rps}
                if r.requests:
                    cell["cpu_ms_per_req"] = round(
                        (h.cpu_seconds(pid) - cpu0) * 1000 / r.requests, 3)
                cell["hwm_kib"] = h.proc_status(pid).get("VmHWM")
        for name, p in procs.items():
            st = h.proc_status(p.pid)
            kids = h.descendants(p.pid)
            out[name].update(hwm_kib=st.get("VmHWM"), rss_kib=st.get("VmRSS"),
                             children_hwm_kib=sum(h.proc_status(c).get("VmHWM") or 0
                                                  for c in kids))
        return out
    finally:
        for p in reversed(list(procs.values())):
            p.stop()


def run(configs: list[tuple[str, Path | None, dict[str, str]]],
        bodies: tuple[str, ...] = ("1KB", "100KB"), concurrency: int = 16,
        seconds: float = 5.0, repeats: int = 3, workdir: Path | None = None
        ) -> dict[str, Any]:
    if not h.HEY:
        return {"error": "hey is not installed (apt-get install -y hey)"}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="agentgate-memcmp-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = e2e._Env(tmp, {}, 0)
    res: dict[str, Any] = {"configs": {n: {"tree": str(t or h.ROOT), "env": e}
                                       for n, t, e in configs},
                           "bodies": list(bodies), "concurrency": concurrency,
                           "seconds": seconds, "repeats": repeats,
                           "loadavg_start": os.getloadavg(), "rounds": [],
                           "notes": env.notes}
    try:
        _standin, bare, err = env.start_common(res)
        bare.stop()  # each round starts its own
        if err:
            res["error"] = err
            return res
        for b in bodies:  # sizes beyond the shared two (e.g. 2MB: big bodies)
            if b not in env.bodies:
                env.bodies[b] = tmp / f"body-{b}.json"
                env.bodies[b].write_bytes(h.chat_body(body_size(b)))
        for r in range(repeats):
            res["rounds"].append(_one_round(env, configs, bodies, concurrency, seconds, r))
        res["loadavg_end"] = os.getloadavg()
        return res
    except Exception as e:  # noqa: BLE001 - the report says what failed
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        env.stop()
        h.drop_workdir(tmp, workdir)


def _med(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def markdown(res: dict[str, Any]) -> str:
    rounds = res.get("rounds") or []
    lines = [f"configurations: {json.dumps(res.get('configs'))}; bodies "
             f"{','.join(res.get('bodies', []))} at c={res.get('concurrency')}, "
             f"{res.get('seconds')} s each, {len(rounds)} rounds of fresh processes; load "
             f"average {res.get('loadavg_start')} -> {res.get('loadavg_end')}"]
    if res.get("error"):
        lines.append(f"FAILED: {res['error']}")
    if not rounds:
        return "\n".join(lines)
    names = list(rounds[0])
    bare = _med([r.get("bare", {}).get("hwm_kib") for r in rounds])
    lines += ["", "| config | peak RSS MiB (median) | / bare | every round | RSS at end "
              "| + writer peak | CPU ms/req per body | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        hwm = [r[n].get("hwm_kib") for r in rounds if n in r]
        med = _med(hwm)
        ratio = f"{med / bare:.2f}" if med and bare else ""
        cpu = ", ".join(
            f"{b} {_med([r[n].get('load', {}).get(b, {}).get('cpu_ms_per_req') for r in rounds])}"
            for b in res.get("bodies", []))
        errs = sum(c.get("errors", 0) for r in rounds for c in r[n].get("load", {}).values())
        lines.append(
            f"| {n} | {med / 1024:.1f} | {ratio} | "
            f"{' '.join(f'{v / 1024:.1f}' for v in hwm if v)} | "
            f"{(_med([r[n].get('rss_kib') for r in rounds]) or 0) / 1024:.1f} | "
            f"{(_med([r[n].get('children_hwm_kib') for r in rounds]) or 0) / 1024:.1f} | "
            f"{cpu} | {errs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs="+", required=True, metavar="NAME=PATH[:VAR=VAL,…]")
    ap.add_argument("--bodies", default="1KB,100KB")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    try:
        configs = [parse_config(s) for s in a.compare]
    except ValueError as e:
        ap.error(str(e))
    bodies = tuple(b for b in a.bodies.split(",") if b)
    try:
        for b in bodies:
            body_size(b)
    except ValueError as e:
        ap.error(f"--bodies: {e}")
    res = run(configs, bodies, a.concurrency, a.seconds, a.repeats)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=repr))
    print(markdown(res))
    return 1 if res.get("error") else 0


if __name__ == "__main__":
    raise SystemExit(main())
