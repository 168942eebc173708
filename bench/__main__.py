"""`python -m bench [--quick] [--only NAME…] [--soak-minutes N]` (or `./run_proxy.sh bench`).

Runs every component micro-benchmark (`bench/bench_*.py`, each in its own process so one
that fails or hangs is reported without stopping the others), then the end-to-end load
comparison (`bench/e2e.py`), and writes BENCHMARKS.md: the machine, the targets and whether
they are met, every section, all from this one run.

NAME for --only: `e2e`, `soak`, a component's concern (`masking` for bench/bench_masking.py)
or its module name. `--soak-minutes 10` adds the memory soak (suite under steady load, RSS
drift) to the e2e run; `--only soak` runs the memory phases and the soak alone (bench/soak.py,
10 minutes unless --soak-minutes says otherwise, 1 in --quick).
"""

from __future__ import annotations

import argparse
import json
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import bench
from bench import e2e, soak
from bench import harness as h

MASKING_TARGET_MB_S = 50.0

# Run inside a child process: the component's run() and markdown(), results as JSON.
_CHILD = """
import json, sys, time
import importlib
name, quick, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
mod = importlib.import_module("bench." + name)
t0 = time.monotonic()
res = mod.run(quick=quick)
secs = time.monotonic() - t0
md = mod.markdown(res)
with open(out, "w") as f:
    json.dump({"results": res, "markdown": md, "seconds": secs}, f, default=repr)
"""


def components() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if m.name.startswith("bench_"))


def selected(only: list[str] | None) -> tuple[list[str], bool]:
    comps = components()
    if not only:
        return comps, True
    want = {w.removeprefix("bench.").removesuffix(".py") for w in only}
    picked = [c for c in comps if c in want or c.removeprefix("bench_") in want]
    unknown = want - {"e2e", "soak"} - set(picked) - {c.removeprefix("bench_") for c in picked}
    if unknown:
        raise SystemExit(f"bench: unknown benchmark(s) {sorted(unknown)}; have: e2e, soak, "
                         f"{', '.join(c.removeprefix('bench_') for c in comps)}")
    return picked, "e2e" in want


def run_component(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run bench.<name> in a child process; never raises."""
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-") as d:
        out = Path(d) / "result.json"
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-c", _CHILD, name, "1" if quick else "0",
                                str(out)], cwd=str(h.ROOT), capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                    "seconds": time.monotonic() - t0}
        if p.returncode != 0 or not out.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
            return {"ok": False, "error": "\n".join(tail) or f"exit {p.returncode}",
                    "seconds": time.monotonic() - t0}
        data = json.loads(out.read_text())
        data["ok"] = True
        return data


def masking_throughput(results: dict[str, Any]) -> tuple[float, str] | None:
    """Masking MB/s per core with all detectors on, prose-like text, from the component
    benches: `mb_per_s_all_detectors` if a bench reports it; else bench_detectors'
    `speed` table (the slowest prose size, dense-findings rows excluded); else the lowest
    value under any key naming MB/s. Returns (MB/s, where it came from)."""
    for comp in ("bench_masking", "bench_detectors"):
        r = (results.get(comp) or {}).get("results")
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("mb_per_s_all_detectors"), int | float):
            return float(r["mb_per_s_all_detectors"]), f"{comp}: mb_per_s_all_detectors"
        speed = r.get("speed")
        if isinstance(speed, dict):
            vals = [(float(v), f"{size} {kind}") for size, row in speed.items()
                    if isinstance(row, dict) and "dense" not in size
                    for kind, v in row.items()
                    if isinstance(v, int | float) and kind != "findings"]
            if vals:
                v, where = min(vals)
                return v, f"{comp}: slowest prose size ({where})"
        found: list[float] = []
        _walk_mb(r, "", found)
        if found:
            return min(found), f"{comp}: lowest MB/s value"
    return None


def _walk_mb(x: Any, key: str, found: list[float]) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _walk_mb(v, f"{key}.{k}".lower(), found)
    elif isinstance(x, list):
        for v in x:
            _walk_mb(v, key, found)
    elif isinstance(x, int | float) and not isinstance(x, bool) and any(
            m in key for m in ("mb_s", "mb/s", "mbps", "mb_per_s")):
        found.append(float(x))


def render(facts: dict[str, Any], comps: dict[str, dict[str, Any]], e2e_res: dict | None,
           args: argparse.Namespace, total_s: float) -> str:
    cmd = "python -m bench" + (" --quick" if args.quick else "") + \
        (f" --only {' '.join(args.only)}" if args.only else "") + \
        (f" --soak-minutes {args.soak_minutes:g}" if args.soak_minutes else "")
    out = ["# agentgate benchmarks", "",
           f"Written by `{cmd}` (`./run_proxy.sh bench`) in {total_s:.0f} s. Every number "
           "below comes from this one run on this machine; absolute numbers vary by "
           "machine, the ratios are the point. Rerun to refresh."]
    if args.quick:
        out += ["", "> **Quick mode**: short runs, for checking the harness; not for "
                "conclusions."]
    out += ["", "## Machine", "", h.facts_markdown(facts), ""]
    rows = e2e.targets(e2e_res) if e2e_res and not e2e_res.get("error") else []
    found = masking_throughput(comps)
    if found is not None:
        mb, src = found
        ok = mb >= MASKING_TARGET_MB_S
        rows.append(("masking, prose, all detectors (>= 50 MB/s per core)", f"{mb:.1f} MB/s",
                     "met" if ok else "MISSED",
                     (f"from {src}" if ok else
                      f"missed by {MASKING_TARGET_MB_S - mb:.1f} MB/s ({src})")))
    elif comps:
        rows.append(("masking, prose, all detectors (>= 50 MB/s per core)", "n/a",
                     "not measured", "no masking component benchmark result"))
    if rows:
        out += ["## Targets (issue 7)", "", "| target | measured | verdict | note |",
                "|---|---|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        out.append("")
    if e2e_res is not None:
        out += [e2e.markdown(e2e_res), ""]
    if comps:
        out += ["## Component micro-benchmarks", ""]
        for name, r in comps.items():
            if r.get("ok"):
                md = (r.get("markdown") or "").strip()
                if not md.startswith("#"):
                    out += [f"### {name}", ""]
                out += [_demote(md), "", f"_({name}: {r.get('seconds', 0):.1f} s)_", ""]
            else:
                out += [f"### {name}: FAILED", "", "The component benchmark failed; the "
                        "others ran. Its error:", "", "```", str(r.get("error", ""))[-2000:],
                        "```", ""]
    if e2e_res and e2e_res.get("profile"):
        out += [e2e.profile_markdown(e2e_res["profile"]), ""]
    return "\n".join(out).rstrip() + "\n"


def _demote(md: str) -> str:
    """A component's headings shift so its top level becomes ### (under "Component
    micro-benchmarks"); code blocks are left alone."""
    def heading(line: str) -> int:
        n = len(line) - len(line.lstrip("#"))
        return n if n and line[n:n + 1] == " " else 0

    in_code = False
    levels = []
    for line in md.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and heading(line):
            levels.append(heading(line))
    shift = 3 - min(levels) if levels else 0
    lines = []
    in_code = False
    for line in md.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and shift > 0 and heading(line):
            line = "#" * shift + line
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (harness check)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only these: e2e and/or component names (e.g. masking)")
    ap.add_argument("--soak-minutes", type=float, default=0,
                    help="add a memory soak of N minutes under steady load (RSS drift)")
    ap.add_argument("--concerns", default=",".join(e2e.CONCERNS),
                    help="suite concerns to switch on in the e2e run (default: all: "
                         f"{','.join(e2e.CONCERNS)})")
    ap.add_argument("--profile-seconds", type=float, default=None,
                    help="seconds of py-spy profile of bare mitmdump and of the suite under "
                         "load (default 10 each, 0 in --quick)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure a suite per concern alone (default: on, off in --quick)")
    ap.add_argument("--component-timeout", type=float, default=None,
                    help="seconds before a component benchmark is abandoned (default 180)")
    ap.add_argument("--output", default=str(h.ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    comps_to_run, want_e2e = selected(args.only)
    concerns = tuple(c.strip() for c in args.concerns.split(",") if c.strip())
    bad = set(concerns) - set(e2e.CONCERNS)
    if bad:
        ap.error(f"unknown concern(s) {sorted(bad)}; choose from {','.join(e2e.CONCERNS)}")
    profile_s = args.profile_seconds if args.profile_seconds is not None else \
        (0 if args.quick else 10)
    timeout = args.component_timeout or (90 if args.quick else 180)

    t0 = time.monotonic()
    facts = h.machine_facts()
    comps: dict[str, dict[str, Any]] = {}
    for name in comps_to_run:
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        comps[name] = run_component(name, args.quick, timeout)
        status = "ok" if comps[name]["ok"] else "FAILED: " + \
            comps[name]["error"].splitlines()[-1][:200]
        print(f"bench: {name} {status} ({comps[name].get('seconds', 0):.1f} s)",
              file=sys.stderr, flush=True)
    soak_res = None
    if args.only and "soak" in args.only:
        minutes = args.soak_minutes or (1 if args.quick else 10)
        print(f"bench: soak (memory phases + {minutes:g} min soak) …", file=sys.stderr,
              flush=True)
        soak_res = soak.run(minutes=minutes, concerns=concerns, quick=args.quick)
        print(f"bench: soak {'FAILED: ' + soak_res['error'] if soak_res.get('error') else 'ok'}",
              file=sys.stderr, flush=True)
    e2e_res = None
    if want_e2e:
        print("bench: e2e (direct / bare mitmdump / suite) …", file=sys.stderr, flush=True)
        try:
            e2e_res = e2e.run(quick=args.quick, soak_minutes=args.soak_minutes,
                              concerns=concerns, profile_seconds=profile_s,
                              breakdown=args.breakdown)
        except Exception as e:  # noqa: BLE001 - report, keep the component results
            e2e_res = {"error": f"{type(e).__name__}: {e}",
                       "suite_log_tail": traceback.format_exc()[-1500:]}
        print(f"bench: e2e {'FAILED: ' + e2e_res['error'] if e2e_res.get('error') else 'ok'}",
              file=sys.stderr, flush=True)
    facts["loadavg_at_end"] = h.machine_facts()["loadavg_at_start"]
    text = render(facts, comps, e2e_res, args, time.monotonic() - t0)
    if soak_res is not None:
        text = text.rstrip() + "\n\n" + soak.markdown(soak_res) + "\n"
    Path(args.output).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "components": comps,
                                               "e2e": e2e_res, "soak": soak_res}, indent=1,
                                              default=repr))
    print(f"bench: wrote {args.output} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    print(text)
    failed = [n for n, r in comps.items() if not r.get("ok")]
    return 1 if failed or (e2e_res and e2e_res.get("error")) or \
        (soak_res and soak_res.get("error")) else 0


if __name__ == "__main__":
    sys.exit(main())
