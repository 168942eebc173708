"""Reading the audit store in seq order without sorting the whole table at once.

`audit verify` and `export --all` sorted every record with all its columns in one ORDER BY:
on a store of ~20,000 records that ran out of the store's 64 MB memory_limit. rows_by_seq
reads a window of seq numbers at a time; these tests hold it to the same order and rows as
the one ORDER BY, in less memory than that ORDER BY needs."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb
import pytest

from addons.recording import store


def _table(tmp_path: Path, seqs: list[int | None], payload: int) -> duckdb.DuckDBPyConnection:
    """A `flows` table of these seqs, reopened with a 24 MB memory_limit (written with more:
    a checkpoint of the whole table needs it)."""
    path = str(tmp_path / "w.duckdb")
    con = duckdb.connect(path, config={"memory_limit": "512MB", "threads": 1})
    con.execute("CREATE TABLE flows (seq BIGINT, id VARCHAR, body VARCHAR)")
    rng = random.Random(7)
    rows = [(s, f"id{i}", rng.randbytes(payload // 2).hex()) for i, s in enumerate(seqs)]
    for i in range(0, len(rows), 500):
        con.executemany("INSERT INTO flows VALUES (?, ?, ?)", rows[i:i + 500])
    con.close()
    return duckdb.connect(path, config={"memory_limit": "24MB", "threads": 1})


def test_windows_give_the_order_and_rows_of_one_order_by(tmp_path: Path) -> None:
    # gaps (retention, deletions), a seq shared by two records (the lake: replicas), the
    # largest and smallest BIGINT, records without a seq (last, as NULLS LAST)
    seqs: list[int | None] = [*range(1, 1200), *range(5000, 5003), 5001, 10**12,
                              2**63 - 1, -2**63, None, 7, None]
    random.Random(3).shuffle(seqs)
    con = _table(tmp_path, seqs, 64)
    want = con.execute("SELECT seq, id FROM flows ORDER BY seq, id").fetchall()
    got = [(s, i) for s, i, _ in store.rows_by_seq(con, "SELECT seq, id, body FROM flows",
                                                   width=100)]
    # within one seq the order is the database's, as with ORDER BY seq: compare by seq groups
    assert [s for s, _ in got] == [s for s, _ in want]
    assert sorted(got, key=lambda r: (r[0] is None, r[0] or 0, r[1])) == want
    got_where = [i for _, i, _ in store.rows_by_seq(
        con, "SELECT seq, id, body FROM flows", "id LIKE ?", ["id1%"], width=7)]
    assert sorted(got_where) == sorted(i for _, i in want if i.startswith("id1"))


def test_a_store_larger_than_memory_is_read_in_windows(tmp_path: Path) -> None:
    """60 MB of records under a 24 MB memory_limit: one ORDER BY cannot sort them (the
    failure `audit verify` had), the windows read every one, in order."""
    con = _table(tmp_path, list(range(1, 6001)), 10_000)
    with pytest.raises(duckdb.OutOfMemoryException):
        con.execute("SELECT seq, body FROM flows ORDER BY seq").fetchall()
    n, last = 0, 0
    for seq, body in store.rows_by_seq(con, "SELECT seq, body FROM flows"):
        assert seq == last + 1 and len(body) == 10_000
        n, last = n + 1, seq
    assert n == 6000
