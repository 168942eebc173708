"""Every issue-16 target measured in one invocation, with a met/missed table.

    python -m bench.issue16 [--quick] [--soak-minutes 10] [--output FILE] [--json FILE]

Runs, in this order and in one process tree on this machine:
1. the masking engine (`bench_fastscan`): whole-body MB/s per core at a realistic PII density;
2. the end-to-end comparison (`e2e`): direct / bare mitmdump / the suite, 1 KB and 100 KB at
   c=1 and c=16 (no per-concern breakdown, no profile: those are `python -m bench`);
3. the multi-turn conversations (`bench_multiturn`): 20 agents x 40 turns;
4. memory (`soak`): RSS of bare and suite after start, warm-up and load, then the soak.

Each part's own report follows the summary table. Ratios are only compared within this run:
the machine is shared, so absolute numbers move between runs and ratios much less.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import bench_fastscan, bench_multiturn, e2e, soak
from bench import harness as h

# the targets (issue 16, "Targets")
T_C16_1K = 0.75
T_ADDED_P50_MS = 1.0
T_C16_100K = 0.5
T_MASK_MB_S = 100.0
T_RSS_RATIO = 2.0
T_DRIFT_PCT = 5.0


def _row(rows: list[tuple[str, str, str]], name: str, value: float | None, limit: float,
         higher_is_better: bool, fmt: str = "{:.2f}") -> None:
    if value is None:
        rows.append((name, "n/a", "not measured"))
        return
    ok = value >= limit if higher_is_better else value <= limit
    rows.append((name, fmt.format(value), "met" if ok else "MISSED"))


def summary(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every issue-16 target, from this run."""
    rows: list[tuple[str, str, str]] = []
    fs = res.get("fastscan") or {}
    real = (fs.get("rows") or {}).get(bench_fastscan.REALISTIC) or {}
    mb = (real.get("fast") or {}).get("body_mb_s")
    if mb is not None and not real.get("same_findings", False):
        rows.append(("masking >= 100 MB/s whole body, 1 value per 1.1 KB", f"{mb}",
                     "MISSED (findings differ from the reference engine)"))
    else:
        _row(rows, "masking >= 100 MB/s per core, whole body, 1 value per 1.1 KB", mb,
             T_MASK_MB_S, True, "{:.1f} MB/s")
    r = e2e.ratios(res["e2e"]) if res.get("e2e") and not res["e2e"].get("error") else {}
    _row(rows, "1 KB chat c=16: suite/bare req/s >= 0.75", r.get("suite/bare rps 1KB c=16"),
         T_C16_1K, True)
    _row(rows, "  same, from CPU per request (bare CPU / suite CPU)",
         r.get("suite/bare CPU-bound rps 1KB c=16"), T_C16_1K, True)
    _row(rows, "1 KB chat c=1: added p50 <= 1 ms over bare", r.get("added p50 ms 1KB c=1"),
         T_ADDED_P50_MS, False, "{:.2f} ms")
    _row(rows, "100 KB chat c=16: suite/bare req/s >= 0.5", r.get("suite/bare rps 100KB c=16"),
         T_C16_100K, True)
    _row(rows, "  same, from CPU per request (bare CPU / suite CPU)",
         r.get("suite/bare CPU-bound rps 100KB c=16"), T_C16_100K, True)
    mt = res.get("multiturn") or {}
    for label, val, verdict in bench_multiturn.verdicts(mt) if mt else []:
        rows.append(("multi-turn: " + label, val, verdict))
    # Memory, twice: the gateway (mitmdump) process alone, and with its child processes (the
    # audit writer process holds DuckDB): moving memory into a child must not hide it.
    mem = res.get("soak") or {}
    peak = mem.get("peak_kib") or mem.get("peak_before_soak_kib") or {}
    b = peak.get("bare")
    for label, key in (("gateway process", "suite"), ("with its writer process",
                                                      "suite+children")):
        _row(rows, f"peak RSS suite/bare (1 KB and 100 KB load, soak), {label} <= 2.0",
             peak[key] / b if peak.get(key) and b else None, T_RSS_RATIO, False)
    st, bt = mt.get("suite") or {}, mt.get("bare") or {}
    for label, key in (("gateway process", "own_peak_rss_mib"),
                       ("with its writer process", "peak_rss_mib")):
        _row(rows, f"peak RSS suite/bare, multi-turn run, {label} <= 2.0",
             st[key] / bt["own_peak_rss_mib"] if st.get(key) and bt.get("own_peak_rss_mib")
             else None, T_RSS_RATIO, False)
    soak_res = mem.get("soak") or {}
    minutes = soak_res.get("minutes") or 0
    _row(rows, f"soak RSS drift < 5 % ({minutes:g} min), gateway process",
         soak_res.get("drift_pct"), T_DRIFT_PCT, False, "{:.2f} %")
    _row(rows, f"soak RSS drift < 5 % ({minutes:g} min), with its writer process",
         (soak_res.get("tree") or {}).get("drift_pct"), T_DRIFT_PCT, False, "{:.2f} %")
    return rows


def markdown(res: dict[str, Any]) -> str:
    facts = res.get("machine") or {}
    out = ["# Issue 16 targets, one run (`python -m bench.issue16`)", "",
           f"{res.get('started', '')}; {facts.get('cores', '?')} cores, load average at start "
           f"{' '.join(facts.get('loadavg_at_start') or [])}; {res.get('seconds', 0):.0f} s "
           "in all.", "",
           "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {a} | {b} | **{c}** |" for a, b, c in summary(res)]
    out.append("")
    if res.get("fastscan"):
        out += [_demote(bench_fastscan.markdown(res["fastscan"])), ""]
    if res.get("e2e"):
        out += [_demote(e2e.markdown(res["e2e"])), ""]
    if res.get("multiturn"):
        out += [_demote(bench_multiturn.markdown(res["multiturn"])), ""]
    if res.get("soak"):
        out += [_demote(soak.markdown(res["soak"])), ""]
    return "\n".join(out).rstrip() + "\n"


def _demote(md: str) -> str:
    """Each part's headings one level down, under this report's title."""
    lines, in_code = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines)


def run(quick: bool = False, soak_minutes: float = 10.0,
        parts: tuple[str, ...] = ("fastscan", "e2e", "multiturn", "soak")) -> dict[str, Any]:
    t0 = time.monotonic()
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": h.machine_facts()}
    steps = {
        "fastscan": lambda: bench_fastscan.run(quick=quick),
        "e2e": lambda: e2e.run(quick=quick, profile_seconds=0, breakdown=False),
        "multiturn": lambda: bench_multiturn.run(quick=quick),
        "soak": lambda: soak.run(minutes=soak_minutes, quick=quick),
    }
    for name in parts:
        print(f"issue16: {name} …", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            res[name] = steps[name]()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"issue16: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr,
              flush=True)
    res["seconds"] = time.monotonic() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.issue16", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (harness check)")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--parts", default="fastscan,e2e,multiturn,soak",
                    help="which parts to run (comma-separated)")
    ap.add_argument("--output", help="write the markdown report here (default: stdout)")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args(argv)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    bad = set(parts) - {"fastscan", "e2e", "multiturn", "soak"}
    if bad:
        ap.error(f"unknown part(s) {sorted(bad)}")
    res = run(quick=a.quick, soak_minutes=a.soak_minutes, parts=parts)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    if a.output:
        Path(a.output).write_text(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
