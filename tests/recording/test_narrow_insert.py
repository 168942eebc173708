"""A batch's INSERT names only the columns some row of it sets (store.rows_doc, PERF-AQ).

The rows a batch stores must be exactly those the INSERT of every column stores (each row's
object holding every column, null where it has none): the same values, NULL where NULL,
for batches whose rows leave different columns NULL — a column set in one row only, in
none, in all — and the chain must verify. The reference here is that full INSERT
(store.INSERT_FLOWS_JSON with the old document), the same rows chained the same way.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import pytest

from addons.recording import store, writer
from addons.recording.writerproc import build
from tests.recording.test_write_path import _pendings

# columns a built row may leave NULL (the chain's own, the id and the times always set;
# the references stay as built: verify reads the blobs they name)
NULLABLE = [c for c in store.COLUMN_NAMES
            if c not in ("id", "seq", "session_id", "started", "ended", "prev_hash", "hash")]


def _full_doc(rows: list[dict[str, Any]], checked: bool = False) -> tuple[str, str]:
    """The batch as it was written before: every column in every row's object."""
    doc = [{c: (store._b64(r.get(c)) if c in store._BLOB_COLS else r.get(c))  # noqa: SLF001
            for c in store.ALL_NAMES} for r in rows]
    return store._batch_json(doc), store.INSERT_FLOWS_JSON  # noqa: SLF001


def _rows(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = [build(p) for p in _pendings(seed)]
    for r in rows:
        # each row leaves a random part of its columns NULL, or sets one NULL elsewhere
        for c in rng.sample(NULLABLE, rng.randrange(len(NULLABLE) // 2)):
            r[c] = None
        if rng.random() < 0.3:
            r["approval_id"], r["error"] = f"ap-{rng.randrange(99)}", "only this row's"
    for k, r in enumerate(rows[:8]):  # set in the first batch, NULL throughout the second
        r["approval_id"], r["error"] = ("ap-first", "first") if k == 0 else (None, None)
    return rows


def _store(path: Path, rows: list[dict[str, Any]], sizes: list[int]) -> list[tuple]:
    con = writer.open_db(path)
    try:
        head, k = store.head(con), 0
        for n in sizes:
            head = store.append(con, [dict(r) for r in rows[k:k + n]], head)
            k += n
        assert store.verify(con).ok
        return con.execute("SELECT * FROM flows ORDER BY seq").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_store_what_the_insert_of_every_column_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rows = _rows(seed)
    sizes = [1, 7, 2, len(rows)]  # a one-row batch, small ones, the rest in one
    new = _store(tmp_path / "new.duckdb", rows, sizes)
    monkeypatch.setattr(store, "rows_doc", _full_doc)
    ref = _store(tmp_path / "ref.duckdb", rows, sizes)
    assert len(new) == len(rows) and new == ref
    names = store.ALL_NAMES
    # the batches did leave columns out (else this compared nothing new): some column is
    # NULL in every row of a batch, and set in another
    for c in ("approval_id", "error"):
        assert new[0][names.index(c)] == ref[0][names.index(c)] != None  # noqa: E711
        assert all(row[names.index(c)] is None for row in new[1:8])


def test_the_statement_names_only_the_columns_set() -> None:
    rows = [{"id": "a", "seq": 1, "hash": "h", "error": None, "flow_state": b"\x00"},
            {"id": "b", "seq": 2, "hash": "i", "model": "m"}]
    text, sql = store.rows_doc(rows)
    con = duckdb.connect()
    try:
        got = con.execute("SELECT unnest(from_json(?, '[\"json\"]'))", [text]).fetchall()
    finally:
        con.close()
    assert [str(x[0]) for x in got] == ['{"id":"a","seq":1,"flow_state":"AA==","hash":"h"}',
                                        '{"id":"b","seq":2,"model":"m","hash":"i"}']
    head = sql.split(" SELECT ")[0]
    assert head == "INSERT INTO flows (id, seq, model, flow_state, hash)"
    assert store.rows_doc(rows)[1] is sql  # made once per set of columns
