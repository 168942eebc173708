"""The writer's CPU per row: DuckDB's parameter binding must not search for pandas on every
bound value (it did: ~50 us per value, ~2 ms of GIL-holding CPU per 1 KB flow)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from addons.recording import store
from addons.recording.writer import open_db

from .test_store import pending


class _Spy(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.lookups: list[str] = []

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib API
        self.lookups.append(name)
        return None


@pytest.mark.skipif(importlib.util.find_spec("pandas") is not None
                    and sys.modules.get("pandas") is not None,
                    reason="pandas installed: DuckDB imports it once and caches it")
def test_appending_rows_searches_for_no_module(tmp_path: Path) -> None:
    con = open_db(tmp_path / "a.duckdb")
    rows = [store.build_row(pending(i)) for i in range(200)]
    spy = _Spy()
    sys.meta_path.insert(0, spy)
    try:
        store.append(con, rows, store.head(con))
    finally:
        sys.meta_path.remove(spy)
        con.close()
    # before: two failed `import pandas` per bound value (200 rows x 42 columns)
    assert spy.lookups.count("pandas") == 0, len(spy.lookups)
    assert len(spy.lookups) < 20, sorted(set(spy.lookups))


@pytest.mark.parametrize("text", ["plain", "é ✓ 😀 \u2028 \u2029", "tab\tnl\n\"quote\" \\ /",
                                  "ctl \x01\x1f\x7f", "nul \x00 inside", "\udc80 lone",
                                  "\ud800 lone"])
def test_batch_json_keeps_every_value_exact(tmp_path: Path, text: str) -> None:
    """Rows reach DuckDB as one JSON text: every value must come back exactly as hashed
    (else verify fails), and a value JSON cannot carry still leaves a (reduced) record."""
    from addons.recording.writer import AuditWriter
    w = AuditWriter(tmp_path / "a.duckdb", build=store.build_row, serve_queries=False,
                    interval=0.01)
    w.start()
    try:
        p = pending(1, meta={"note": text, "n": 2**62, "x": 1.1, "b": text.encode(
            "utf-8", "surrogatepass")})
        p.origin_url = "https://api.openai.com/v1/chat?q=" + text
        w.submit(p)
        assert w.flush(30)
        assert w.failure is None
        assert w._con is not None
        (url, latency, meta) = w._con.execute(
            "SELECT url, latency_ms, metadata FROM flows").fetchone()
        assert store.verify(w._con).ok
        if not text.endswith(" lone"):
            assert url.endswith(text) and json.loads(meta)["note"] == text
        else:  # undecodable bytes an agent sent: stored replaced, the store keeps working
            for got in (url, json.loads(meta)["note"]):
                assert got.endswith("\ufffd lone") and got.encode("utf-8")
        assert latency == store.build_row(p)["latency_ms"]
    finally:
        w.close()
