"""The audit store's layout choices that bound the writer process's memory (writer.DB_CONFIG).

Row groups stay merged at checkpoints (DuckDB's default). Turning merging off
(max_vacuum_tasks 0) removed a transient spike at every other checkpoint, but then each
checkpoint added a row group whose metadata stays pinned and whose blocks stay loaded: the
writer's memory grew with uptime (a 10-minute soak drifted 6.95 %). What must hold: however
many checkpoints a long-running writer makes, its table stays a few row groups and DuckDB's
memory for it stays small. The writer's row groups hold ROW_GROUP_SIZE rows (4,096, not
DuckDB's 122,880): a checkpoint rewrites at most one partial group.

A new store uses 64 KiB blocks (DuckDB's default 256 KiB: the partly filled block of each
of ~40 columns held ~20 MiB); a store made with another block size keeps it and goes on
being appended to and verified.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from addons.recording import store, writer
from addons.recording.writerproc import build
from tests.recording.test_write_path import _pendings


def _row_groups(con: duckdb.DuckDBPyConnection, table: str = "flows") -> int:
    return con.execute("SELECT count(DISTINCT row_group_id) FROM pragma_storage_info(?)",
                       [table]).fetchone()[0]


def _table_mib(con: duckdb.DuckDBPyConnection) -> float:
    got = con.execute("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory() "
                      "WHERE tag IN ('BASE_TABLE', 'METADATA')").fetchone()
    return got[0] / (1 << 20)


def test_many_checkpoints_leave_few_row_groups_and_little_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that has checkpointed ~100 times (small WAL threshold, batches as the writer
    appends them) holds a few row groups and a few MiB of table memory, not one row group
    and its pinned metadata and loaded blocks per checkpoint (with merging off: ~100 row
    groups and ~25 MiB, growing)."""
    monkeypatch.setitem(writer.DB_CONFIG, "checkpoint_threshold", "256KB")
    path = tmp_path / "long.duckdb"
    rows = [build(p) for p in _pendings(5)]
    con = writer.open_db(path)
    wal = Path(f"{path}.wal")
    try:
        head, known = store.head(con), store.BlobCache()
        checkpoints, last, mid = 0, 0, None
        for _ in range(3000):
            head = store.append(con, [dict(r) for r in rows], head, known)
            size = wal.stat().st_size if wal.exists() else 0
            checkpoints += size < last
            last = size
            if checkpoints == 50 and mid is None:
                mid = _table_mib(con)
            if checkpoints >= 100:
                break
        assert checkpoints >= 100
        assert _row_groups(con) <= 4, _row_groups(con)
        end = _table_mib(con)
        assert end < 8 and end < mid + 2, (mid, end)
        assert store.verify(con).ok
    finally:
        con.close()


def _block_size(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT block_size FROM pragma_database_size() "
                       "WHERE database_name = current_database()").fetchone()[0]


def _group_rows(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Rows per row group of `flows` (its first column's segments summed)."""
    return [r[0] for r in con.execute(
        "SELECT sum(count) FROM pragma_storage_info('flows') WHERE column_id = 0 "
        "AND segment_type <> 'VALIDITY' GROUP BY row_group_id ORDER BY row_group_id"
    ).fetchall()]


def test_checkpoints_keep_row_groups_at_the_writers_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's row groups hold at most ROW_GROUP_SIZE rows, however the checkpoints
    fell: a checkpoint then rewrites at most one partial group, not the whole growing
    default-sized (122,880-row) group, which made the writer's CPU per flow grow with the
    store. A connection without the option (connect() by path) merges them into one."""
    monkeypatch.setattr(writer, "ROW_GROUP_SIZE", 2048)
    monkeypatch.setitem(writer.DB_CONFIG, "checkpoint_threshold", "256KB")
    path = tmp_path / "g.duckdb"
    rows = [build(p) for p in _pendings(5)]
    con = writer.open_db(path)
    try:
        head, known = store.head(con), store.BlobCache()
        while sum(_group_rows(con) or [0]) < 5000:
            for _ in range(20):
                head = store.append(con, [dict(r) for r in rows], head, known)
            con.execute("CHECKPOINT")
        groups = _group_rows(con)
        assert len(groups) >= 3 and max(groups) <= 2048, groups
        assert store.verify(con).ok
    finally:
        con.close()
    other = duckdb.connect(str(path), config=dict(writer.DB_CONFIG))
    try:
        store.append(other, [dict(r) for r in rows], store.head(other), store.BlobCache())
        other.execute("CHECKPOINT")
        assert max(_group_rows(other)) > 2048  # (what the writer's option prevents)
    finally:
        other.close()


def test_the_writing_connection_keeps_its_temporary_files_beside_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory instance's temporary directory defaults to `.tmp` in the working
    directory: the writer's is the store's own, as for a file opened by path."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data" / "t.duckdb"
    con = writer.open_db(path)
    try:
        got = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
        assert got == f"{path}.tmp"
    finally:
        con.close()


def test_one_process_cannot_open_the_store_for_writing_twice(tmp_path: Path) -> None:
    """Two writing instances of one file in one process (a reopen while an old connection
    lives) are refused by DuckDB, not run side by side; the first one goes on."""
    path = tmp_path / "one.duckdb"
    rows = [build(p) for p in _pendings(5)]
    con = writer.open_db(path)
    try:
        with pytest.raises(duckdb.Error, match="already attached"):
            writer.open_db(path)
        with pytest.raises(duckdb.Error, match="already attached"):
            duckdb.connect(str(path), config=dict(writer.DB_CONFIG))
        store.append(con, [dict(r) for r in rows], store.head(con), store.BlobCache())
        assert store.verify(con).ok
    finally:
        con.close()


def test_the_writing_connection_has_no_external_access(tmp_path: Path) -> None:
    """The store is attached before external access is turned off: nothing else can be
    attached, read or written through the writer's connection or its cursors."""
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    con = writer.open_db(tmp_path / "x.duckdb")
    cur = writer.store_cursor(con)
    try:
        for c in (con, cur):
            for sql in (f"ATTACH '{tmp_path / 'y.duckdb'}' AS y",
                        f"SELECT * FROM read_csv('{outside}')",
                        f"COPY (SELECT 1) TO '{tmp_path / 'z.csv'}'",
                        "SET enable_external_access = true"):
                with pytest.raises(duckdb.Error):
                    c.execute(sql)
        assert cur.execute("SELECT count(*) FROM flows").fetchone() == (0,)
        assert not (tmp_path / "y.duckdb").exists() and not (tmp_path / "z.csv").exists()
    finally:
        cur.close()
        con.close()


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
    old_config["memory_limit"] = "64MB"  # (the limit such a store was written with)
    con = duckdb.connect(str(path), config=old_config)
    store.init_schema(con)
    head = store.append(con, [dict(r) for r in rows[:10]], store.head(con), store.BlobCache())
    con.close()
    con = writer.open_db(path)
    try:
        assert _block_size(con) == 256 * 1024
        assert _limit_mib(con) > 60  # its checkpoints pin 256 KiB blocks: 32 MB failed
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


def _limit_mib(con: duckdb.DuckDBPyConnection) -> float:
    text = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    value, unit = text.split()
    return float(value) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def test_a_batch_that_does_not_fit_the_memory_limit_raises_it_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DB_CONFIG's memory_limit is small (it bounds the writer process); a batch or a
    checkpoint that needs more must not stop recording, which refuses every flow until
    restart (a 4 MB limit did: "could not allocate block", the gateway failing closed
    forever). The writer doubles the limit for the rest of the run, logs it, and writes
    the same batch whole: no record reduced, none lost, the chain intact; a reopened
    connection keeps the raised limit."""
    monkeypatch.setitem(writer.DB_CONFIG, "memory_limit", "4MB")
    w = writer.AuditWriter(tmp_path / "a.duckdb", build=store.build_row,
                           serve_queries=False, interval=0.01)
    w.start()
    try:
        with caplog.at_level("WARNING", logger="agentgate.recorder"):
            pendings = _pendings(7)
            for p in pendings:
                w.submit(p)
            assert w.flush(60), w.failure
        assert w.failure is None
        assert w.memory_limit_mb > 4
        assert "raised to 8 MB for this run" in caplog.text
        assert w._con is not None
        got = w._con.execute("SELECT count(*), count(flow_state), count(error) FROM flows"
                             ).fetchone()
        assert got == (len(pendings), len(pendings), 0)  # every record whole
        assert _limit_mib(w._con) > 4
        w._reopen()
        assert _limit_mib(w._con) > 4
        w._con.execute("SET memory_limit = '64MB'")  # (verify's windows, not the writer's)
        assert store.verify(w._con).ok
    finally:
        w.close()


def test_the_raised_limit_stops_at_its_maximum(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(writer.DB_CONFIG, "memory_limit", "32MB")
    w = writer.AuditWriter(tmp_path / "a.duckdb", build=store.build_row, serve_queries=False)
    w._con = writer.open_db(w.path)
    w._settings = writer.store_cursor(w._con)
    try:
        steps = []
        while w._grow_memory():
            steps.append(w.memory_limit_mb)
        assert steps == [64, writer.MAX_MEMORY_LIMIT_MB] and _limit_mib(w._con) > 120
    finally:
        w._settings.close()
        w._con.close()


def test_readers_get_the_read_limit_while_they_read(tmp_path: Path) -> None:
    """The writer's 32 MB is sized for appends; verify's joins alone hold ~22 MB. While an
    audit query or a lake shipment reads in the writer process (reading()), the instance
    has READ_MEMORY_LIMIT_MB; the writer's limit is back once the last reader is done."""
    w = writer.AuditWriter(tmp_path / "a.duckdb", build=store.build_row,
                           serve_queries=False, interval=0.01)
    w.start()
    try:
        for p in _pendings(3):
            w.submit(p)
        assert w.flush(30), w.failure
        assert w._con is not None
        low = _limit_mib(w._con)
        assert low < 40
        with w.reading():
            with w.reading():
                assert _limit_mib(w._con) > 60
            assert _limit_mib(w._con) > 60  # one reader still reads
            cur = w.cursor()
            try:
                assert store.verify(cur).ok
            finally:
                cur.close()
        assert _limit_mib(w._con) == low
    finally:
        w.close()


def test_a_reading_connection_gets_the_read_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    writer.open_db(path).close()
    ro = writer.open_db(path, read_only=True)
    try:
        assert _limit_mib(ro) > 60
    finally:
        ro.close()


def test_a_limit_that_could_not_be_lowered_is_lowered_after_the_next_batch(
        tmp_path: Path) -> None:
    """DuckDB refuses a lower memory_limit when it cannot evict enough: the readers'
    limit stays, and the writer thread lowers it after its next batch."""
    w = writer.AuditWriter(tmp_path / "a.duckdb", build=store.build_row,
                           serve_queries=False, interval=0.01)
    w.start()
    real = w._settings
    assert real is not None and w._con is not None

    class Refusing:
        """The first SET to the writer's limit fails, as DuckDB's does when it cannot
        evict down to it."""
        refused = 0

        def execute(self, sql: str) -> object:
            if f"'{w.memory_limit_mb}MB'" in sql and not self.refused:
                self.refused += 1
                raise duckdb.OutOfMemoryException("could not free up enough memory")
            return real.execute(sql)

        def close(self) -> None:
            real.close()

    try:
        w._settings = Refusing()  # type: ignore[assignment]
        with w.reading():
            pass
        assert w._limit_high and _limit_mib(w._con) > 60
        for p in _pendings(3)[:2]:
            w.submit(p)
        assert w.flush(30), w.failure
        assert not w._limit_high and _limit_mib(w._con) < 40
    finally:
        w.close()


def test_a_file_of_another_format_is_refused_not_opened_by_an_extension(
        tmp_path: Path) -> None:
    """The store is attached as DuckDB storage, with no extension loaded for it: a SQLite
    file where the store should be is refused with DuckDB's own reason (which the
    gateway's hint recognises), not opened as a SQLite database."""
    import sqlite3
    path = tmp_path / "agentgate.duckdb"
    lite = sqlite3.connect(path)
    lite.execute("CREATE TABLE flows (a)")
    lite.commit()
    lite.close()
    with pytest.raises(duckdb.Error) as got:
        writer.open_db(path)
    assert "not a valid DuckDB database" in str(got.value)
    assert "damaged or not a DuckDB database" in writer.open_failure_hint(path, got.value)
