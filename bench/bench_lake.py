"""Audit lake: what shipping to the lake costs the recorder, as a ratio (one run).

The real `AuditWriter` records the recorder bench's realistic flows (~2 KB request, ~1 KB
answer) as fast as one thread submits them, twice in the same run: alone, and with a
`LakeShipper` (addons/recording/lake.py) shipping the same store to a DuckLake (local DuckDB
catalog, Parquet data, segments of 2,000 every 0.2 s) while it writes. Reported: rows/s
committed locally in each case, the ratio (with / without), and how long after the last
local commit the lake had every record (sealed, verifiable).

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
from bench.bench_recorder import _states


def _record(n: int, d: Path, with_lake: bool) -> dict[str, Any]:
    from addons.recording import lake, store
    from addons.recording.addon import build_row
    from addons.recording.writer import AuditWriter, open_db

    states = _states(min(n, 2000))
    secrets = ("sk-bench-REAL-0000000000000000",)
    db = d / ("with.duckdb" if with_lake else "without.duckdb")
    w = AuditWriter(db, build=build_row, batch_size=500, interval=0.05, serve_queries=False)
    w.start()
    shipper = None
    cfg = lake.LakeConfig(catalog=str(d / "audit.ducklake"), data=str(d / "parquet"),
                          interval_s=0.2, segment_rows=2000)
    if with_lake:
        shipper = lake.LakeShipper(cfg, "bench", lambda: open_db(db))
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


def run(quick: bool = False) -> dict:
    n = 3000 if quick else 20000
    with tempfile.TemporaryDirectory() as d:
        without = _record(n, Path(d), with_lake=False)
        with_lake = _record(n, Path(d), with_lake=True)
    return {"machine": h.machine_facts(), "without": without, "with_lake": with_lake,
            "ratio": round(with_lake["rows_per_s"] / without["rows_per_s"], 2)}


def markdown(r: dict) -> str:
    a, b = r["without"], r["with_lake"]
    return (f"### Audit lake (shipping cost)\n\n"
            f"Writer thread, {a['rows']:,} realistic flows, same run: **{a['rows_per_s']:,} "
            f"rows/s** alone, **{b['rows_per_s']:,} rows/s** while a shipper sends the same "
            f"store to a DuckLake (local catalog, Parquet): ratio **{r['ratio']}**. The lake "
            f"had every record {b['lake_lag_s']} s after the last local commit "
            f"({b['segments']} segments, chain verified in the lake: {b['lake_verified']}).\n")


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=1, default=str))
    print(markdown(res))
