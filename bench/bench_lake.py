"""Audit lake: what shipping to the lake costs the recorder, as a ratio (one run).

The real `AuditWriter` records the recorder bench's realistic flows (~2 KB request, ~1 KB
answer) as fast as one thread submits them, twice in the same run: alone, and with a
`LakeShipper` (addons/recording/lake.py) shipping the same store to a DuckLake (local DuckDB
catalog, Parquet data, segments of 2,000 every 0.2 s) while it writes. Reported: rows/s
committed locally in each case, the ratio (with / without), and how long after the last
local commit the lake had every record (sealed, verifiable).

Then, end to end in the same run: two identical real gateways, one with `audit_lake:` at its
defaults (local catalog, every 5 s), requests alternating between them on one keep-alive
connection each: flows/s with and without the lake, as a ratio. The shipper lives in the
gateway's process, so its Python work shares the GIL with the event loop.

Run alone: `python -m bench.bench_lake [--quick]`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness as h
from bench.bench_recorder import _alternate, _rules, _states


def _record(n: int, d: Path, with_lake: bool) -> dict[str, Any]:
    from addons.recording import lake, store
    from addons.recording.addon import build_row
    from addons.recording.writer import AuditWriter

    states = _states(min(n, 2000))
    secrets = ("sk-bench-REAL-0000000000000000",)
    db = d / ("with.duckdb" if with_lake else "without.duckdb")
    w = AuditWriter(db, build=build_row, batch_size=500, interval=0.05, serve_queries=False)
    w.start()
    shipper = None
    cfg = lake.LakeConfig(catalog=str(d / "audit.ducklake"), data=str(d / "parquet"),
                          interval_s=0.2, segment_rows=2000)
    if with_lake:
        shipper = lake.LakeShipper(cfg, "bench", lambda: lake.open_local(db))
        shipper.start()
    t0 = time.perf_counter()
    for i in range(n):
        st = dict(states[i % len(states)])
        st["id"] = f"flow-{i}"
        w.submit(store.Pending(state=st, session=f"s{i % 20}", secrets=secrets,
                               origin_url="https://api.openai.com/v1/chat/completions"))
    assert w.flush(600), "writer did not drain"
    local_s = time.perf_counter() - t0
    out: dict[str, Any] = {"rows": n, "rows_per_s": round(n / local_s)}
    if shipper is not None:
        t1 = time.perf_counter()
        w.close()
        shipper.stop(600)  # ships what is left, then lets go of the catalog
        out["lake_lag_s"] = round(time.perf_counter() - t1, 2)
        out["segments"] = shipper.segments
        out["shipped"] = shipper.shipped
        con = lake.connect(cfg, read_only=True)
        r = lake.verify(con)
        con.close()
        out["lake_verified"] = r.ok and r.replicas[0].count == n
    else:
        w.close()
    return out


def gateway_ratio(n: int) -> dict[str, Any]:
    """Two identical real gateways (full suite, masking off as in the recorder bench), one
    with `audit_lake:` (local catalog, default interval_s 5); requests alternate between
    them on one keep-alive connection each; flows/s = requests / time spent in them."""
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        certs = work / "certs"
        ca, _leaf, _key = h.upstream_certs(certs)
        standin = h.start_standin(work, certs)
        confdir = h.make_confdir(work / "conf")
        gws = []
        try:
            for name, lake_on in (("lake", True), ("plain", False)):
                rules = work / f"rules_{name}"
                rules.mkdir()
                text = _rules(standin.url, True)
                if lake_on:
                    text += (f"audit_lake:\n  catalog: {work / 'audit.ducklake'}\n"
                             f"  data: {work / 'parquet'}\n")
                (rules / "rules.yaml").write_text(text)
                data = work / f"data_{name}"
                data.mkdir()
                gws.append(h.start_mitmdump(
                    name, work, confdir, ca, scripts=[str(h.ROOT / "addons/gateway.py")],
                    sets=[f"agentgate_rules={rules}", f"agentgate_data={data}"],
                    env={"OPENAI_API_KEY": "sk-bench-REAL-0000000000000000"}))
            lat = _alternate([g.port for g in gws], n)
        finally:
            for g in gws:
                g.stop()
            standin.stop()
        from addons.recording import lake
        con = lake.connect(lake.LakeConfig(catalog=str(work / "audit.ducklake")), read_only=True)
        shipped = con.execute("SELECT count(*) FROM lake.flows").fetchone()[0]
        ok = lake.verify(con).ok
        con.close()
    with_lake, without = n / sum(lat[0]), n / sum(lat[1])
    return {"requests_each": n, "flows_per_s_with_lake": round(with_lake, 1),
            "flows_per_s_without": round(without, 1),
            "ratio": round(with_lake / without, 3), "shipped": shipped, "lake_verified": ok}


def run(quick: bool = False) -> dict:
    n = 3000 if quick else 20000
    with tempfile.TemporaryDirectory() as d:
        without = _record(n, Path(d), with_lake=False)
        with_lake = _record(n, Path(d), with_lake=True)
    return {"machine": h.machine_facts(), "without": without, "with_lake": with_lake,
            "ratio": round(with_lake["rows_per_s"] / without["rows_per_s"], 2),
            "gateway": gateway_ratio(150 if quick else 1000)}


def markdown(r: dict) -> str:
    a, b, g = r["without"], r["with_lake"], r["gateway"]
    return (f"### Audit lake (shipping cost)\n\n"
            f"Writer thread, {a['rows']:,} realistic flows, same run: **{a['rows_per_s']:,} "
            f"rows/s** alone, **{b['rows_per_s']:,} rows/s** while a shipper sends the same "
            f"store to a DuckLake (local catalog, Parquet): ratio **{r['ratio']}**. The lake "
            f"had every record {b['lake_lag_s']} s after the last local commit "
            f"({b['segments']} segments, chain verified in the lake: {b['lake_verified']}).\n\n"
            f"End to end, same run: two identical gateways, one with `audit_lake:`, "
            f"{g['requests_each']} alternating requests each on one keep-alive connection: "
            f"**{g['flows_per_s_with_lake']} flows/s** with the lake, "
            f"**{g['flows_per_s_without']}** without: ratio **{g['ratio']}** "
            f"({g['shipped']:,} records in the lake after the stop, verified: "
            f"{g['lake_verified']}).\n")


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=1, default=str))
    print(markdown(res))
