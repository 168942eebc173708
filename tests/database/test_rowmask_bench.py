"""Smoke test of bench/bench_postgres.py's pieces that need no server: the in-process masker
run masks what it measures, and the report renders from a result of the real shape."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_postgres


def test_masker_alone_masks_and_counts() -> None:
    r = bench_postgres.masker_alone(300)
    assert r["rows"] == 300 and r["rows_per_s"] > 0
    assert r["first_row"] == ["0", "[EMAIL_1]", "**** **** **** 1111",
                              "customer 0 asked for a refund on order 0"]


def test_markdown_renders_every_table() -> None:
    run = {"direct": {"tps": 1000.0, "p50_ms": 0.05, "p99_ms": 0.3, "transactions": 10},
           "gateway": {"tps": 100.0, "p50_ms": 0.8, "p99_ms": 9.0, "transactions": 1},
           "tps_ratio": 0.1, "added_p50_ms": 0.75}
    res = {"seconds_per_run": 3, "clients": 4, "threads": 2, "rows": 1000,
           "pgbench": {"simple": run, "prepared": run},
           "masked_select": {"text": {"direct_rows_per_s": 9e5, "gateway_rows_per_s": 1e4,
                                      "gateway_s": 0.1, "direct_s": 0.01,
                                      "first_row": ["1", "[EMAIL_1]"]}},
           "masker_alone": {"rows": 1000, "seconds": 0.1, "rows_per_s": 1e4}}
    md = bench_postgres.markdown(json.loads(json.dumps(res)))
    assert "| simple | 1000.0 | 100.0 | 0.10 |" in md and "[EMAIL_1]" in md
    assert "10,000 rows/s" in md


def test_component_is_discovered_by_the_runner() -> None:
    from bench import __main__ as runner
    assert "bench_postgres" in runner.components()
    assert runner.selected(["postgres"])[0] == ["bench_postgres"]
    assert Path(bench_postgres.__file__).name == "bench_postgres.py"
