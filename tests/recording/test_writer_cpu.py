"""The writer's CPU per row: DuckDB's parameter binding must not search for pandas on every
bound value (it did: ~50 us per value, ~2 ms of GIL-holding CPU per 1 KB flow)."""

from __future__ import annotations

import importlib.abc
import importlib.util
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
