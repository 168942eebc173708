"""The audit store's layout choices that bound the writer process's memory (writer.DB_CONFIG).

Checkpoints write new row groups and never merge old ones back in. DuckDB's default
(max_vacuum_tasks 100) merges small row groups at a checkpoint: every other automatic
checkpoint of the writer read the rows it had written before back from the file,
decompressed them and rewrote them with the new ones, a transient +25-45 MiB that set the
writer process's peak RSS. What must hold: a checkpoint leaves the row groups it wrote
before as they are (same blocks, not rewritten), the chain still verifies, and retention's
DELETE of a prefix still gives whole row groups back.

A new store uses 64 KiB blocks (DuckDB's default 256 KiB: the partly filled block of each
of ~40 columns held ~20 MiB); a store made with another block size keeps it and goes on
being appended to and verified.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from addons.recording import store, writer
from addons.recording.writerproc import build
from tests.recording.test_write_path import _pendings


def _row_groups(con: duckdb.DuckDBPyConnection, table: str = "flows") -> list[tuple]:
    """(row group, first block) of each row group's first column, in order."""
    return con.execute(
        "SELECT row_group_id, min(block_id) FROM pragma_storage_info(?) "
        "WHERE column_id = 0 AND segment_type <> 'VALIDITY' GROUP BY ALL ORDER BY 1",
        [table]).fetchall()


def test_a_checkpoint_does_not_rewrite_the_row_groups_before_it(tmp_path: Path) -> None:
    rows = [build(p) for p in _pendings(5)]
    thirds = [rows[k::3] for k in range(3)]
    con = writer.open_db(tmp_path / "a.duckdb")
    try:
        head = store.head(con)
        seen: list[list[tuple]] = []
        for batch in thirds:
            head = store.append(con, [dict(r) for r in batch], head, store.BlobCache())
            con.execute("CHECKPOINT")
            seen.append(_row_groups(con))
        # one row group per checkpoint, each left where it was written (with DuckDB's
        # default the second checkpoint merged the first two into one new row group)
        assert [len(s) for s in seen] == [1, 2, 3], seen
        assert seen[2][:2] == seen[1] and seen[1][:1] == seen[0], seen
        assert store.verify(con).ok
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (len(rows),)
        assert con.execute("SELECT current_setting('max_vacuum_tasks')").fetchone() == (0,)
    finally:
        con.close()


def test_deleting_a_prefix_still_frees_its_row_groups(tmp_path: Path) -> None:
    """Retention deletes the oldest records (a prefix of seq): the row groups they filled
    are dropped at the next checkpoint and their blocks return to the file's free list."""
    con = duckdb.connect(str(tmp_path / "b.duckdb"), config=dict(writer.DB_CONFIG))
    try:
        con.execute("CREATE TABLE t (seq BIGINT, s VARCHAR)")
        for i in range(6):
            con.execute("INSERT INTO t SELECT range + ?, repeat(md5(range::VARCHAR), 40) "
                        "FROM range(3000)", [i * 3000])
            con.execute("CHECKPOINT")
        assert len(_row_groups(con, "t")) == 6
        free_before = con.execute("SELECT free_blocks FROM pragma_database_size()").fetchone()
        con.execute("DELETE FROM t WHERE seq < 12000")
        con.execute("CHECKPOINT")
        assert len(_row_groups(con, "t")) == 2
        free_after = con.execute("SELECT free_blocks FROM pragma_database_size()").fetchone()
        assert free_after[0] > free_before[0]
        assert con.execute("SELECT min(seq), count(*) FROM t").fetchone() == (12000, 6000)
    finally:
        con.close()


def _block_size(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]


def test_a_new_store_uses_64_kib_blocks(tmp_path: Path) -> None:
    con = writer.open_db(tmp_path / "n.duckdb")
    try:
        assert _block_size(con) == 64 * 1024
    finally:
        con.close()


def test_a_store_made_with_256_kib_blocks_keeps_them_and_goes_on(tmp_path: Path) -> None:
    """A store created before (DuckDB's default block size) opens with today's config,
    takes new batches on the chain it has, and verifies; its block size does not change."""
    path = tmp_path / "old.duckdb"
    rows = [build(p) for p in _pendings(5)]
    old_config = {k: v for k, v in writer.DB_CONFIG.items() if k != "default_block_size"}
    con = duckdb.connect(str(path), config=old_config)
    store.init_schema(con)
    head = store.append(con, [dict(r) for r in rows[:10]], store.head(con), store.BlobCache())
    con.close()
    con = writer.open_db(path)
    try:
        assert _block_size(con) == 256 * 1024
        assert store.head(con) == head
        store.append(con, [dict(r) for r in rows[10:]], head, store.BlobCache())
        con.execute("CHECKPOINT")
        assert store.verify(con).ok
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (len(rows),)
    finally:
        con.close()
    ro = writer.open_db(path, read_only=True)
    try:
        assert store.verify(ro).ok and _block_size(ro) == 256 * 1024
    finally:
        ro.close()
